"""The trace clock: nanoseconds since a session's start, one for exit rows, events and the stop record."""

from __future__ import annotations

import time


class Clock:
    """``now()`` = ns since ``t0`` on the monotonic clock.  A recording starts it at the trace writer's
    start (``Clock(writer.t0_ns)``) so that exit rows, events and the footer share one time base."""

    __slots__ = ("t0",)

    def __init__(self, t0_ns: int | None = None) -> None:
        self.t0 = time.monotonic_ns() if t0_ns is None else t0_ns

    def now(self) -> int:
        return time.monotonic_ns() - self.t0
