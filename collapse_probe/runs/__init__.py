"""A run on disk: find, write, read, join."""
