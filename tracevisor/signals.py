"""SIGINT/SIGTERM as state: the handlers only note which signal came; the run loop polls for it.

Why: a handler that raises (KeyboardInterrupt, or an exception of our own for SIGTERM) lands in whatever
the main thread happens to run — joining the vCPU threads, writing the trace footer — and can end a
recording with a traceback and no footer.  ``timeout(1)`` sends SIGTERM twice (to the process and to its
group), so a second signal during shutdown is the normal case, not a corner.

While :func:`defer` is in force, SIGINT and SIGTERM set :data:`_received` and nothing else; the VM's
supervisor (Machine) polls :func:`pending` and stops the VM with reason ``interrupted``/``terminated``.
Nothing is raised, so the footer is always written.  The handler is installed whatever the disposition
inherited from the parent: a process started with SIGINT ignored (``nohup``, a shell's background job)
still stops on SIGINT.

This module imports only the standard library (and tracevisor.status, which does too) so that
``python -m tracevisor`` can install the handlers before anything slow is imported.
"""

from __future__ import annotations

import signal

from .status import STATUS_OF, StopReason

SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: How a VM (or the process, before there is one) stops on each signal, and its status (128 + signal).
REASON = {signal.SIGINT: StopReason.INTERRUPTED, signal.SIGTERM: StopReason.TERMINATED}
STATUS = {sig: int(STATUS_OF[reason]) for sig, reason in REASON.items()}
NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}

_received: int | None = None  # the first deferred signal, or None
_count = 0  # deferred signals received in total


def _note(signum: int, frame: object) -> None:
    """The handler: record the signal, nothing else (no I/O, no locks, no exception)."""
    global _received, _count
    _count += 1
    if _received is None:
        _received = signum


def defer() -> dict[int, object]:
    """Install the state-only handlers for SIGINT and SIGTERM (main thread only); returns the previous
    handlers for :func:`restore`."""
    return {sig: signal.signal(sig, _note) for sig in SIGNALS}


def deferring() -> bool:
    """Are both signals currently handled by :func:`defer`'s handler (e.g. installed by the CLI)?"""
    return all(signal.getsignal(sig) is _note for sig in SIGNALS)


def restore(previous: dict[int, object]) -> None:
    """Put back handlers returned by :func:`defer`."""
    for sig, h in previous.items():
        signal.signal(sig, h if h is not None else signal.SIG_DFL)


def interactive() -> None:
    """Ordinary handlers for commands that have nothing to finish: Ctrl-C raises KeyboardInterrupt (even
    if the process was started with SIGINT ignored), SIGTERM ends the process."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pending() -> int | None:
    """The first signal received while deferred (signal.SIGINT or SIGTERM), or None."""
    return _received


def clear() -> None:
    """Forget a received signal (a library caller that handled it and may run again)."""
    global _received, _count
    _received = None
    _count = 0


class Interrupted(Exception):
    """Raised (by ordinary code, never by a handler) at a safe point when a deferred signal arrived
    before there was a VM to stop; the CLI turns it into one line and status 130/143."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        reason = REASON.get(signum, StopReason.INTERRUPTED)
        self.status = int(STATUS_OF[reason])
        word = str(reason)
        super().__init__(f"{word} ({NAMES.get(signum, signum)})")


def check() -> None:
    """Raise :class:`Interrupted` if a deferred signal is pending: call it before starting work that would
    leave something behind (a trace file)."""
    if _received is not None:
        raise Interrupted(_received)
