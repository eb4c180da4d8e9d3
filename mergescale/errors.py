"""Errors a user can cause.  The CLI prints them as one line, without a traceback, and exits 2.

Anything else that escapes a command is a bug: the CLI says so in one line, keeps the traceback
in the run's log file and exits 1 (``cli.py``).  Raise the most specific class; every message
names the file / key / tensor and says how to fix it.
"""


class MergescaleError(Exception):
    """A problem with the user's input: the message names the file / key / tensor and the fix."""


class SpecError(MergescaleError):
    """A YAML spec, a command-line argument or a method parameter is wrong (names the key)."""


class ModelError(MergescaleError):
    """A model directory, checkpoint file or tensor cannot be used as given (names the file / tensor)."""


class ClusterError(MergescaleError):
    """The Ray cluster cannot run what was asked (no GPU for ``--device cuda``, a node's worker kept dying)."""
