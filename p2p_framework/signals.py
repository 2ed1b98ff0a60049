"""Ending a run cleanly on Ctrl-C (SIGINT) and SIGTERM.

``p2p-run`` runs each command inside :func:`handling`: both signals raise an exception
(:class:`KeyboardInterrupt`, or :class:`Terminated` for SIGTERM) and are also recorded. Python
drops an exception raised inside a ``__del__`` or a callback it ignores ("Exception ignored
in ..."), which once let a Ctrl-C during model loading be swallowed and the run finish;
:func:`raise_pending` raises the recorded signal again, and the run calls it at safe points
(after the model loads, after each denoising step, before its folder is swapped in), so a
swallowed signal still ends the run there. Outside :func:`handling` (the Python API) nothing
is recorded and :func:`raise_pending` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

#: Exit status of a run ended by each signal (128 + the signal's number, as shells report).
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Terminated(KeyboardInterrupt):
    """Raised by SIGTERM inside :func:`handling`; a :class:`KeyboardInterrupt`, so the
    clean-up that Ctrl-C runs (no half-written file) runs for it too."""


_pending: int | None = None


def pending() -> int | None:
    """The signal number received inside :func:`handling`, or None."""
    return _pending


def _interrupt(signum: int) -> KeyboardInterrupt:
    if signum == signal.SIGTERM:
        return Terminated("terminated by SIGTERM")
    return KeyboardInterrupt()


def _handler(signum: int, frame: Any) -> None:
    global _pending
    _pending = signum
    raise _interrupt(signum)


def raise_pending() -> None:
    """Raise the interrupt of a signal received inside :func:`handling` (also one whose first
    exception was swallowed); nothing when none was."""
    if _pending is not None:
        raise _interrupt(_pending)


@contextlib.contextmanager
def handling() -> Iterator[None]:
    """Within the block, SIGINT raises ``KeyboardInterrupt`` and SIGTERM :class:`Terminated`,
    and both are recorded for :func:`raise_pending`. The previous handlers come back after.
    Only in the main thread (elsewhere the block changes nothing)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in EXIT_STATUS}
    _pending = None
    try:
        for signum in EXIT_STATUS:
            signal.signal(signum, _handler)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _pending = None


__all__ = ["EXIT_STATUS", "Terminated", "handling", "pending", "raise_pending"]
