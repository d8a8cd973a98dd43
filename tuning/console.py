"""What a study prints: our own lines on the terminal, what Ray and the libraries say in a log file.

A clean ``python -m tuning.run`` prints the plan, one line per trial event,
the summary and the export; ``--verbose`` shows everything else on the
terminal as well. Without it, :func:`quiet_console` sends the rest to
``{output}/{study}/study.log`` (:data:`LOG_NAME`), each source by the
narrowest means that catches it:

* Python logging of Ray, Ray Data, Tune, Optuna, MLflow, Lightning and torch:
  every console handler writes to the log instead (``setStream``), and records
  of loggers without a handler fall back to the log rather than to stderr.
  A handler a library adds later would escape, so MLflow, which adds its own
  on first import, is imported first.
* Python warnings (deprecations and the like): ``logging.captureWarnings``.
* The C++ core worker inside this process (``core_worker.cc`` lines, some of
  them at error level about Ray's own internals): it writes to file
  descriptor 2 directly, and the only Ray knob for it,
  ``RAY_BACKEND_LOG_LEVEL``, is inherited by every process of a local cluster
  and would drop the same lines from Ray's own logs. So descriptor 2 itself
  points at the log, and ``sys.stderr`` at a copy of the terminal: our
  ``error:`` lines, progress bars and the traceback of a crash stay visible.
* Tune's "Configuration for experiment" box, which its new output engine
  prints even at ``verbose=0``: ``RAY_AIR_NEW_OUTPUT=0`` while the study runs.

Ray Data's progress bars and the forwarding of worker output are switched off
where Ray starts (:func:`tuning.run.start_ray`); worker logs stay in Ray's
session directory (the dashboard shows them).
"""
from __future__ import annotations

import importlib
import io
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import IO

__all__ = ["LOG_NAME", "quiet_console"]

#: The study's log file, in its output directory.
LOG_NAME = "study.log"

_TUNE_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
#: Libraries that add their console handler when first imported, which a study does only later
#: (MLflow: when the registry is checked): imported first, so that handler is redirected too.
_LATE_CONSOLE_HANDLERS = ("mlflow",)


@contextmanager
def quiet_console(log_path: Path, *, verbose: bool) -> Iterator[Path | None]:
    """Send what Ray and the libraries print to ``log_path`` (appended) while the block runs.

    Args:
        log_path: the log file; its directory is created.
        verbose: do nothing (everything stays on the terminal).

    Yields:
        ``log_path``, or None when ``verbose``.
    """
    if verbose:
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", encoding="utf-8", buffering=1) as log, ExitStack() as stack:
        stack.enter_context(_descriptor_2_to(log))
        stack.enter_context(_logging_to(log))
        stack.enter_context(_environ(_TUNE_OUTPUT_ENV, "0"))
        yield log_path


@contextmanager
def _descriptor_2_to(log: IO[str]) -> Iterator[None]:
    """Point file descriptor 2 at ``log`` and ``sys.stderr`` at a copy of what it was."""
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    saved = os.dup(2)
    before = sys.stderr
    terminal = None
    if _fileno(before) == 2:  # else sys.stderr is already elsewhere (a test's capture): leave it
        terminal = open(os.dup(saved), "w", encoding=getattr(before, "encoding", None) or "utf-8",
                        errors=getattr(before, "errors", None) or "backslashreplace", buffering=1)
        sys.stderr = terminal
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        log.flush()
        os.dup2(saved, 2)
        os.close(saved)
        if terminal is not None:
            terminal.flush()
            sys.stderr = before
            terminal.close()


@contextmanager
def _logging_to(log: IO[str]) -> Iterator[None]:
    """Every console handler of every logger writes to ``log``; so do warnings and handler-less records."""
    for module in _LATE_CONSOLE_HANDLERS:
        importlib.import_module(module)
    stream = _Unclosable(log)
    moved: list[tuple[logging.StreamHandler, IO[str]]] = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if _is_console(handler):
                moved.append((handler, _set_stream(handler, stream)))
    last_resort = logging.lastResort
    logging.lastResort = logging.StreamHandler(stream)
    logging.lastResort.setLevel(logging.WARNING)
    # Warnings become records of "py.warnings", which would otherwise get a NullHandler.
    captured = logging._warnings_showwarning is not None  # type: ignore[attr-defined]  # already on: leave it on
    warnings_handler = logging.StreamHandler(stream)
    logging.getLogger("py.warnings").addHandler(warnings_handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(captured)
        logging.getLogger("py.warnings").removeHandler(warnings_handler)
        logging.lastResort = last_resort
        for handler, stream in moved:
            _set_stream(handler, stream)


def _set_stream(handler: logging.StreamHandler, stream: IO[str]) -> IO[str]:
    """``handler.setStream(stream)``, also for a handler whose stream was closed under it (one made
    while a finished test's capture was ``sys.stderr``): ``setStream`` would flush it and raise."""
    try:
        return handler.setStream(stream)
    except ValueError:
        old, handler.stream = handler.stream, stream
        return old


def _is_console(handler: logging.Handler) -> bool:
    """A stream handler writing to descriptor 1 or 2, or to a stream without one that is not an
    in-memory buffer (MLflow's writes to whatever ``sys.stderr`` is; a test's log capture is a buffer).
    Handlers of files, or of files opened later (torch's trace handler has no stream yet), are not."""
    if not isinstance(handler, logging.StreamHandler) or isinstance(handler, logging.FileHandler):
        return False
    stream = handler.stream
    if stream is None or isinstance(stream, io.StringIO):
        return False
    return _fileno(stream) in (1, 2, None)


class _Unclosable:
    """The log as a handler's stream: a library that closes its handlers must not close the study's log."""

    def __init__(self, log: IO[str]) -> None:
        self._log = log

    def write(self, text: str) -> int:
        return self._log.write(text)

    def flush(self) -> None:
        self._log.flush()

    def fileno(self) -> int:
        return self._log.fileno()


@contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _fileno(stream: object) -> int | None:
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None
