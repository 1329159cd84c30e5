"""One exception type for problems the user can fix (bad path, bad file, unknown name).

The CLI prints its message as a single line and exits with code 1; library callers can catch it.
Messages say what was wrong, where, and what to do.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
