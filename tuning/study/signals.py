"""SIGINT and SIGTERM during a study: stop the way Tune stops on Ctrl-C, but let the driver know.

Used by :mod:`tuning.run`: an interrupted study saves its state, exports nothing and exits 130.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tuning.study.tune import STOPPING

__all__ = ["GracefulStop"]


class GracefulStop:
    """SIGINT and SIGTERM during a study: Tune stops after saving its state, and nothing is exported.

    Tune's own SIGINT handler ends ``fit()`` as if the study had finished, so
    the driver could not tell an interrupted study from a complete one and
    went on to publish. Here Tune's SIGINT handler is turned off
    (``TUNE_DISABLE_SIGINT_HANDLER``); ours records the signal and, while
    ``fit()`` runs, forwards it to the handler Tune installs for SIGUSR1 (the
    same graceful stop). Outside ``fit()``, and on a second signal, it raises
    KeyboardInterrupt: :func:`tuning.run.main` then prints the resume line and exits 130.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._in_fit = False
        self._saved: dict[int, Any] = {}
        self._env: str | None = None

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._saved = {s: signal.signal(s, self._handle) for s in (*self.SIGNALS, signal.SIGUSR1)}
            self._env = os.environ.get(_TUNE_SIGINT_ENV)
            os.environ[_TUNE_SIGINT_ENV] = "1"
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if self._saved:
            if self._env is None:
                os.environ.pop(_TUNE_SIGINT_ENV, None)
            else:
                os.environ[_TUNE_SIGINT_ENV] = self._env

    @contextmanager
    def fitting(self) -> Iterator[None]:
        """Mark the span of ``tuner.fit()``, the only time a signal is passed on to Tune."""
        if self._saved:  # a stale SIGUSR1 handler of an earlier fit in this process must not swallow ours
            signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self._in_fit = True
        try:
            yield
        finally:
            self._in_fit = False
            STOPPING.clear()

    def _handle(self, sig: int, frame: Any) -> None:
        first, self.signal = self.signal is None, self.signal or sig
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if first and self._in_fit and callable(tune_stop) and tune_stop is not self._handle:
            print(f"\n{signal.Signals(sig).name}: stopping the study once Tune has saved its state "
                  f"(send it again to stop at once); nothing will be exported", file=sys.stderr, flush=True)
            STOPPING.set()  # trials Tune stops now stay open in Optuna: --resume continues them
            tune_stop(sig, frame)
            return
        raise KeyboardInterrupt


_TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
