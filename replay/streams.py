"""Per-vCPU event streams over a trace, for re-execution.

A replay consumes the recording in two places at once: the divergence checker walks each vCPU's exits,
hypercalls and lifecycle events; the replaying HostIO walks the same vCPU's ``hostio`` events.  Each is
a :class:`CpuStream`, a lazy walk of the trace chunks that yields only the kinds it asked for, so a long
trace is never held in memory.  Exits come out as ``("exit", seq, row)`` with the raw row fields
(t_ns, rip, value, port, vcpu, reason, dir, size[, digest]); rich events as ``(kind, seq, dict)``.  The
walk is strict: it ends at the first damaged or out-of-sequence chunk, since nothing after a break in the
recording can be checked against it.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator

from tracevisor.trace import open_trace
from tracevisor.trace.schema import EXIT_ROW, EXIT_ROW_V1

_EXIT = "exit"


def _layouts(row: struct.Struct, digests: bool) -> tuple[struct.Struct, struct.Struct]:
    """(key, time) structs over a row of layout ``row``: the key is the row without t_ns (and without the
    digest unless ``digests``), the time struct reads only t_ns."""
    fmt = row.format.lstrip("<")[1:]
    if row.size == EXIT_ROW.size and not digests:
        key = struct.Struct("<8x" + EXIT_ROW_V1.format.lstrip("<")[1:] + "4x")
    else:
        key = struct.Struct("<8x" + fmt)
    return key, struct.Struct("<Q%dx" % (row.size - 8))


def _chunk_items(path: str, cpu: int, kinds: frozenset[str], want_exits: bool, keep=None, digests: bool = True
                 ) -> Iterator[tuple[list, list[int]]]:
    """Per chunk, this vCPU's events of the wanted kinds in seq order, as (items, seqs, ts): an exit is the
    tuple (rip, value, port, vcpu, reason, dir, size[, digest]) — what replay compares — a rich event its
    dict; ``ts`` holds the exits' timestamps.  For the common case (one vCPU, few rich events) the exit
    tuples come straight from ``struct.iter_unpack``: no per-exit Python work."""
    reader = open_trace(path)
    _KEY, _TIME = _layouts(reader.row, digests)
    try:
        for chunk in reader.chunks(strict=True):
            rich = [e for e in chunk.events if e.get("k") in kinds and e.get("cpu", 0) == cpu]
            if keep is not None:
                rich = [e for e in rich if keep(e)]
            if not want_exits or not chunk.exits:
                yield rich, [e["seq"] for e in rich], [e.get("t", 0) for e in rich]
                continue
            rows = list(_KEY.iter_unpack(chunk.exits))
            ts = [t for (t,) in _TIME.iter_unpack(chunk.exits)]
            seqs = list(chunk.exit_seqs())
            if any(r[3] != cpu for r in rows):
                mine = [k for k, r in enumerate(rows) if r[3] == cpu]
                rows = [rows[k] for k in mine]
                seqs = [seqs[k] for k in mine]
                ts = [ts[k] for k in mine]
            for e in rich:  # few per chunk: insert each at its place
                k = bisect.bisect_left(seqs, e["seq"])
                seqs.insert(k, e["seq"])
                rows.insert(k, e)
                ts.insert(k, e.get("t", 0))
            yield rows, seqs, ts
    finally:
        reader.close()


def triple(item, seq: int, t: int = 0) -> tuple:
    """(kind, seq, payload) for an item of a stream: payload is the full exit row (t, rip, value, port,
    vcpu, reason, dir, size) of an exit, the dict otherwise."""
    if type(item) is tuple:
        return _EXIT, seq, (t, *item)
    return item["k"], seq, item


class CpuStream:
    """The recorded events of one vCPU, of the given kinds, in order.

    Events are decoded a chunk at a time into :attr:`items` (exit rows as tuples, rich events as dicts)
    with their sequence numbers in :attr:`seqs`; :attr:`i` is the next one.  The replay's hot path reads
    ``items[i]`` directly; :meth:`next` and :meth:`peek` return ``(kind, seq, payload)`` triples.
    """

    def __init__(self, path: str, cpu: int, kinds: set[str], keep=None, digests: bool = True) -> None:
        self.cpu = cpu
        self.kinds = frozenset(kinds)
        self.keep = keep  # optional predicate on rich events: False drops the event from the stream
        self.digests = digests
        self._chunks = _chunk_items(path, cpu, self.kinds - {_EXIT}, _EXIT in self.kinds, keep, digests)
        self.items: list = []
        self.seqs: list[int] = []
        self.ts: list[int] = []
        self.i = 0
        self._before = 0  # events consumed in earlier chunks
        self._last_seq = -1  # seq of the last event of earlier chunks

    def refill(self) -> bool:
        """Load the next chunk that has events for this stream; False at the end of the recording."""
        for items, seqs, ts in self._chunks:
            if items:
                self._before += len(self.items)
                if self.seqs:
                    self._last_seq = self.seqs[-1]
                self.items, self.seqs, self.ts = items, seqs, ts
                self.i = 0
                return True
        return False

    @property
    def last_seq(self) -> int:
        """The seq of the last consumed event (-1 before the first)."""
        return self.seqs[self.i - 1] if self.i else self._last_seq

    @property
    def consumed(self) -> int:
        return self._before + self.i

    @classmethod
    def at(cls, path: str, cpu: int, kinds: set[str], consumed: int, keep=None, digests: bool = True) -> CpuStream:
        """A stream positioned after its first ``consumed`` events (restoring a checkpoint)."""
        s = cls(path, cpu, kinds, keep, digests)
        while s.consumed < consumed:
            if s.i >= len(s.items) and not s.refill():
                break
            s.i = min(len(s.items), s.i + consumed - s.consumed)
        return s

    def next(self) -> tuple | None:
        """The next event as (kind, seq, payload), or None at the end of the recording."""
        if self.i >= len(self.items) and not self.refill():
            return None
        i = self.i
        self.i = i + 1
        return triple(self.items[i], self.seqs[i], self.ts[i])

    def peek(self) -> tuple | None:
        if self.i >= len(self.items) and not self.refill():
            return None
        return triple(self.items[self.i], self.seqs[self.i], self.ts[self.i])

    def recent(self, n: int, upto: int | None = None) -> list[tuple]:
        """Up to ``n`` events before index ``upto`` (default: the next one), within the current chunk."""
        end = self.i if upto is None else upto
        return [triple(self.items[k], self.seqs[k], self.ts[k]) for k in range(max(0, end - n), end)]

    def rest(self) -> list[tuple]:
        out = []
        while (ev := self.next()) is not None:
            out.append(ev)
        return out
