"""One exception type for problems the user can fix (bad path, bad file, unknown name).

The CLI prints its message as a single line and exits with code 1 (EXIT_FAILURE); library callers can catch it.
The exit codes are defined here, one meaning each.
Messages say what was wrong, where, and what to do.
"""


EXIT_OK = 0          # done
EXIT_FAILURE = 1     # bad input or failure (a UserError, or anything else, as one line)
EXIT_USAGE = 2       # the command line itself is wrong (click's code)
EXIT_COLLAPSED = 3   # collapse confirmed (`watch`, `analyze --fail-on`)


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
