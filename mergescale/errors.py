"""Errors a user can cause.  The CLI prints them as one line, without a traceback."""


class MergescaleError(Exception):
    """A problem with the user's input: the message names the file / key / tensor and the fix."""
