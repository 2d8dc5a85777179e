"""Per-vCPU event streams over a trace, for re-execution.

A replay consumes the recording in two places at once: the divergence checker walks each vCPU's exits,
hypercalls and lifecycle events; the replaying HostIO walks the same vCPU's ``hostio`` events.  Each is
a :class:`CpuStream`, a lazy walk of the trace chunks that yields only the kinds it asked for, so a long
trace is never held in memory.  Exits come out as ``("exit", seq, row)`` with the raw 27-byte row fields
(t_ns, rip, value, port, vcpu, reason, dir, size); rich events as ``(kind, seq, dict)``.
"""

from __future__ import annotations

from typing import Iterator

from tracevisor.trace import open_trace
from tracevisor.trace.schema import EXIT_ROW

_EXIT = "exit"


def _walk(path: str, cpu: int, kinds: frozenset[str], want_exits: bool) -> Iterator[tuple]:
    reader = open_trace(path)
    try:
        for chunk in reader.chunks():
            rich = [e for e in chunk.events if e.get("cpu", 0) == cpu and e.get("k") in kinds]
            if not want_exits:
                for e in rich:
                    yield e["k"], e["seq"], e
                continue
            seqs = chunk.exit_seqs()
            rows = EXIT_ROW.iter_unpack(chunk.exits)
            ri = 0
            nrich = len(rich)
            for seq, row in zip(seqs, rows):
                if row[4] != cpu:
                    continue
                while ri < nrich and rich[ri]["seq"] < seq:
                    e = rich[ri]
                    yield e["k"], e["seq"], e
                    ri += 1
                yield _EXIT, seq, row
            while ri < nrich:
                e = rich[ri]
                yield e["k"], e["seq"], e
                ri += 1
    finally:
        reader.close()


class CpuStream:
    """The recorded events of one vCPU, of the given kinds, in order."""

    def __init__(self, path: str, cpu: int, kinds: set[str]) -> None:
        self.cpu = cpu
        self.kinds = frozenset(kinds)
        self._it = _walk(path, cpu, self.kinds - {_EXIT}, _EXIT in self.kinds)
        self._peeked: tuple | None = None
        self.consumed = 0

    @classmethod
    def at(cls, path: str, cpu: int, kinds: set[str], consumed: int) -> "CpuStream":
        """A stream positioned after its first ``consumed`` events (restoring a checkpoint)."""
        s = cls(path, cpu, kinds)
        for _ in range(consumed):
            if s.next() is None:
                break
        return s

    def next(self) -> tuple | None:
        """The next event, or None at the end of the recording."""
        if self._peeked is not None:
            ev, self._peeked = self._peeked, None
        else:
            ev = next(self._it, None)
        if ev is not None:
            self.consumed += 1
        return ev

    def peek(self) -> tuple | None:
        if self._peeked is None:
            self._peeked = next(self._it, None)
        return self._peeked

    def rest(self) -> list[tuple]:
        out = []
        while (ev := self.next()) is not None:
            out.append(ev)
        return out
