"""What a person sees: mergescale's own progress bars, warnings and results, and nothing else.

A command runs inside :func:`session`.  Unless ``verbose``, the process's standard output and error
(file descriptors 1 and 2, so native code and child processes too) go to the run's log file:
vLLM, Ray (and the worker logs it forwards to the driver), transformers, lm-eval.  mergescale writes
to the terminal through :func:`stdout` / :func:`stderr` (duplicates of the original descriptors) and
:func:`progress`; the ``mergescale`` logger's warnings reach the terminal, and every log record
(DEBUG and up, every library) reaches the log file.  With ``verbose`` nothing is redirected and debug
records are shown live.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from rich.console import Console

#: the terminal streams for mergescale's own output inside a quiet session (None: the process's own)
_out: TextIO | None = None
_err: TextIO | None = None
_console: Console | None = None
_log: Path | None = None  # this session's log file, until its path has been printed
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def stdout() -> TextIO:
    """Where results go: the terminal's standard output (the process's, outside a quiet session)."""
    return _out or sys.stdout


def stderr() -> TextIO:
    """Where bars, warnings and messages go: the terminal's standard error."""
    return _err or sys.stderr


def console() -> Console:
    """The rich console for progress bars: the terminal's stderr."""
    global _console
    if _console is None or _console.file is not stderr():
        _console = Console(file=stderr())
    return _console


def results_console() -> Console:
    """A rich console for tables of results: the terminal's stdout."""
    return Console(file=stdout())


def progress(*columns: str, enabled: bool = True):
    """A rich progress display on the terminal: description, bar, done/total, extra text columns
    (``{task.fields[...]}`` templates or plain words), elapsed time and ETA."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    if enabled:
        announce_log()
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *(TextColumn(c) for c in columns),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console(), disable=not enabled,
    )  # fmt: skip


def announce_log() -> None:
    """Print the session's log path, once: when long work starts (the first progress bar) or at the end
    of a command that succeeded.  A command refused for bad input prints its one error line only."""
    global _log
    if _log is not None:
        print(f"log: {_log}", file=stderr())
        _log = None


def default_log(kind: str) -> Path:
    """A log file for a run without an output directory of its own: ``$MERGESCALE_CACHE/logs``."""
    from mergescale.cache import cache_root

    return cache_root() / "logs" / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


class _Short(logging.Formatter):
    """``mergescale: warning: …`` on the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return f"mergescale: {record.levelname.lower()}: {record.getMessage()}"


class _TerminalFilter(logging.Filter):
    """mergescale's own warnings and errors; every other library's records stay in the log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "mergescale" or record.name.startswith("mergescale.")


def _writer(fd: int) -> TextIO:
    """An unbuffered text stream on a duplicate of ``fd`` (closing it leaves ``fd`` open)."""
    return io.TextIOWrapper(os.fdopen(os.dup(fd), "wb", buffering=0), write_through=True)


@contextlib.contextmanager
def session(log_file: Path | None, verbose: bool = False) -> Iterator[Path | None]:
    """Run a command with a quiet terminal and a complete log file (see the module docstring)."""
    global _out, _err, _log
    caller_out, caller_err = sys.stdout, sys.stderr
    root = logging.getLogger()
    saved_level, saved_handlers = root.level, root.handlers[:]
    root.handlers = []
    root.setLevel(logging.DEBUG)
    logging.captureWarnings(True)  # warnings.warn from libraries become log records (log file only)
    opened: list[TextIO] = []
    saved_fds: list[tuple[int, int]] = []
    try:
        if log_file is not None:
            log_file = Path(log_file)
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_stream = open(log_file, "a", buffering=1)  # noqa: SIM115 (closed below)
            opened.append(log_stream)
            handler = logging.StreamHandler(log_stream)
            handler.setFormatter(logging.Formatter(_LOG_FORMAT))
            root.addHandler(handler)
        if not verbose and log_file is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            for fd in (1, 2):
                saved = os.dup(fd)
                saved_fds.append((fd, saved))
                os.dup2(log_stream.fileno(), fd)
            _out, _err = _writer(saved_fds[0][1]), _writer(saved_fds[1][1])
            # Python writes that were meant for the terminal now land in the log file too
            sys.stdout, sys.stderr = _writer(1), _writer(2)
            opened += [_out, _err, sys.stdout, sys.stderr]
        terminal = logging.StreamHandler(stderr())
        terminal.setLevel(logging.DEBUG if verbose else logging.WARNING)
        terminal.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s") if verbose else _Short())
        if not verbose:
            terminal.addFilter(_TerminalFilter())
        root.addHandler(terminal)
        _log = log_file if not verbose else None
        yield log_file
    finally:
        for handler in root.handlers:
            handler.flush()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
        logging.captureWarnings(False)
        for fd, saved in saved_fds:
            os.dup2(saved, fd)
            os.close(saved)
        sys.stdout, sys.stderr = caller_out, caller_err
        for stream in reversed(opened):
            with contextlib.suppress(Exception):
                stream.close()
        _out, _err, _log = None, None, None
