"""Replay: deterministic re-execution of traces, and an offline walk over them.

* :func:`open` — walk a trace without KVM: events, filters, the rebuilt file table and console.
* :class:`Replayer` — re-execute under KVM from the trace, with divergence detection, callbacks
  (``.on("hypercall", fn)``) and pausing (``.run_to(seq)``).
"""

from .offline import TraceWalk, open  # noqa: A004
from .replayer import ReadOnlyMemory, Replayer, ReplayEvent, ReplayResult

__all__ = ["open", "TraceWalk", "Replayer", "ReplayResult", "ReplayEvent", "ReadOnlyMemory"]
