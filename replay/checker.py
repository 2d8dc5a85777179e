"""The divergence checker: the trace sink the machine writes to during a replay.

Where recording appends each exit and hypercall to a file, replay hands them to a :class:`Checker`,
which compares them with the recording of the same vCPU, field by field, and raises
:class:`~tracevisor.errors.Divergence` at the first difference.  It also drives user callbacks and
"pause at event N".
"""

from __future__ import annotations

from collections.abc import Callable

from tracevisor.errors import Divergence
from tracevisor.kvm.uapi import exit_reason_name
from tracevisor.trace.schema import EXIT_FIELDS as SCHEMA_EXIT_FIELDS
from tracevisor.trace.schema import KINDS

from .streams import CpuStream, triple

_EXIT_KIND = "exit"

COMPARED_KINDS = {"exit", "hypercall", "vcpu", "mmio", "virtio", "net"}
#: Fields of an event that are not the guest's doing: timing (``t`` and ``seq`` are common fields, never
#: compared), and why a vCPU's thread ended (a replay paused or stopped early ends it differently).
NOT_COMPARED = {"hypercall": {"t_end"}, "vcpu": {"reason"}}
#: What is compared, per rich kind: every field trace/schema.py defines for it except the above.
COMPARED_FIELDS: dict[str, tuple[str, ...]] = {
    kind: tuple(f.name for f in KINDS[kind].fields if f.name not in NOT_COMPARED.get(kind, ()))
    for kind in COMPARED_KINDS - {"exit"}}
#: The compared fields of an exit row (the time and the vCPU are not the guest's doing / already matched).
EXIT_FIELDS = tuple(f for f in SCHEMA_EXIT_FIELDS if f not in ("t_ns", "vcpu"))
#: Coalesced console output (--coalesce-console): the bytes between two exits are compared
CONSOLE_FIELDS = ("stream", "data")


def _coalesced_console(ev: dict) -> bool:
    """Keep every compared event, and of the console events those of the coalesced UART ring."""
    return ev.get("k") != "console" or ev.get("coalesced") is True


def exit_dict(seq: int, row: tuple) -> dict:
    t, rip, value, port, vcpu, reason, direction, size = row
    return {"k": "exit", "seq": seq, "cpu": vcpu, "t": t, "reason": reason, "rip": rip, "port": port,
            "dir": direction, "size": size, "value": value}


def _a(kind: str) -> str:
    """The event kind with its article: "an exit", "a hypercall"."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind}"


def _plain(v):
    if isinstance(v, (bytes, bytearray, memoryview)):
        b = bytes(v)
        return b.hex() if len(b) <= 32 else b[:32].hex() + f"... ({len(b)} bytes)"
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _summary(ev: tuple) -> dict:
    kind, seq, payload = ev
    d = exit_dict(seq, payload) if kind == "exit" else payload
    return {k: _plain(v) for k, v in d.items()}


class Checker:
    """Compares the replayed run with the recording; one instance per replay."""

    def __init__(self, path: str, cpus: int, history: int = 5, console: bool = False) -> None:
        # console: the recording coalesced its UART output (--coalesce-console); those console events, which
        # stand where UART exits stand otherwise, are compared too.
        self.kinds = COMPARED_KINDS | {"console"} if console else COMPARED_KINDS
        self._keep = _coalesced_console if console else None
        self.streams = {cpu: CpuStream(path, cpu, self.kinds, self._keep) for cpu in range(cpus)}
        self.history = history
        self._rich = 0  # rich events matched (the rest of what the streams consumed are exits)
        self._until: int | None = None
        self._callbacks: dict[str, list[Callable]] = {}
        self._checkpoint_every = 0  # exits between checkpoints (0 = none)
        self._slow = False  # anything to do after a match besides counting (callbacks, until, checkpoints)
        self.on_pause: Callable[[int], None] | None = None  # set by the Replayer: pause(cpu)
        self.make_event: Callable | None = None  # set by the Replayer: builds the callback's event object
        self.stopped_by_callback = False
        self.on_checkpoint: Callable[[int], None] | None = None
        self._since_checkpoint = 0

    # Counters derive from how far the streams got, so the hot path only advances an index.
    @property
    def matched(self) -> int:
        """Recorded events reproduced so far."""
        return sum(s.consumed for s in self.streams.values())

    @property
    def exits(self) -> int:
        return self.matched - self._rich

    @property
    def position(self) -> int:
        """The seq of the last reproduced recorded event (-1 before the first)."""
        return max(s.last_seq for s in self.streams.values())

    def native_stream(self, cpu: int) -> CpuStream | None:
        """The recorded stream of ``cpu`` for a native run loop that compares UART exits itself (advancing
        ``stream.i`` past each match and leaving any mismatch to :meth:`exit`), or None while each match must
        reach Python (callbacks, a pause point, checkpoints)."""
        return None if self._slow else self.streams[cpu]

    def _refresh(self) -> None:
        self._slow = bool(self._callbacks) or self._until is not None or bool(self._checkpoint_every)

    @property
    def until(self) -> int | None:
        return self._until

    @until.setter
    def until(self, seq: int | None) -> None:
        self._until = seq
        self._refresh()

    @property
    def callbacks(self) -> dict[str, list[Callable]]:
        return self._callbacks

    @callbacks.setter
    def callbacks(self, cbs: dict[str, list[Callable]]) -> None:
        self._callbacks = cbs
        self._refresh()

    @property
    def checkpoint_every(self) -> int:
        return self._checkpoint_every

    @checkpoint_every.setter
    def checkpoint_every(self, n: int) -> None:
        self._checkpoint_every = n
        self._refresh()

    # -- helpers -----------------------------------------------------------------------------------
    def _diverge(self, cpu: int, message: str, expected: dict | None, actual: dict, seq=None) -> None:
        st = self.streams[cpu]
        recent = st.recent(self.history, max(0, st.i - 1))
        raise Divergence(message, kind=actual.get("k"), seq=seq, expected=expected, actual=actual,
                         last_matching=[_summary(e) for e in recent])

    def _next(self, cpu: int, kind: str, actual: dict) -> tuple:
        ev = self.streams[cpu].next()
        if ev is None or ev[0] != kind:
            self._wrong_kind(cpu, ev, kind, actual)
        return ev

    def _wrong_kind(self, cpu: int, ev: tuple | None, kind: str, actual: dict) -> None:
        actual = {k: _plain(v) for k, v in actual.items()}
        if ev is None:
            self._diverge(cpu, f"the guest went on past the end of the recording ({_a(kind)} that was never "
                          "recorded)", None, actual)
        self._diverge(cpu, f"recorded event #{ev[1]} is {_a(ev[0])}, the replay produced {_a(kind)}",
                      _summary(ev), actual, seq=ev[1])

    def _matched(self, cpu: int, ev: tuple) -> None:
        self._rich += 1
        if self._slow:
            self._after_match(cpu, ev)

    def _after_match(self, cpu: int, ev: tuple) -> None:
        if self._callbacks:
            self._fire(cpu, ev)
        if self._until is not None and ev[1] >= self._until and self.on_pause is not None:
            self.on_pause(cpu)

    def _fire(self, cpu: int, ev: tuple) -> None:
        kind = ev[0]
        fns = self.callbacks.get(kind, []) + self.callbacks.get("event", [])
        if not fns:
            return
        obj = self.make_event(cpu, ev)
        for fn in fns:
            fn(obj)

    # -- the trace-sink interface the machine calls ----------------------------------------------------
    def exit(self, cpu, t_ns, reason, rip, port=0, direction=0, size=0, value=0) -> None:
        st = self.streams[cpu]
        i = st.i
        if i >= len(st.items):
            if not st.refill():
                self._wrong_kind(cpu, None, "exit", {"k": "exit", "cpu": cpu, "reason": reason, "rip": rip,
                                                     "port": port, "dir": direction, "size": size, "value": value})
            i = 0
        row = st.items[i]
        st.i = i + 1
        # the hot path: one tuple comparison against the recorded (rip, value, port, vcpu, reason, dir, size)
        if row == (rip, value, port, cpu, reason, direction, size):
            if self._slow:
                self._after_match(cpu, triple(row, st.seqs[i], st.ts[i]))
                if self._checkpoint_every:
                    self._since_checkpoint += 1
                    if self._since_checkpoint >= self._checkpoint_every:
                        self._since_checkpoint = 0
                        self.on_checkpoint(cpu)
            return
        ev = triple(row, st.seqs[i], st.ts[i])
        if ev[0] != _EXIT_KIND:
            self._wrong_kind(cpu, ev, "exit", {"k": "exit", "cpu": cpu, "reason": reason, "rip": rip,
                                               "port": port, "dir": direction, "size": size, "value": value})
        rec = exit_dict(ev[1], ev[2])
        actual = {"reason": reason, "rip": rip, "port": port, "dir": direction, "size": size, "value": value}
        diff_e = {f: rec[f] for f in EXIT_FIELDS if rec[f] != actual[f]}
        diff_a = {f: actual[f] for f in diff_e}
        name = exit_reason_name(reason)
        self._diverge(cpu, f"exit #{ev[1]} differs ({name} exit; " +
                      ", ".join(f"{f}: recorded {_fmt(diff_e[f])}, replay {_fmt(diff_a[f])}" for f in diff_e) + ")",
                      rec, dict(actual, k="exit", cpu=cpu), seq=ev[1])

    def event(self, kind: str, cpu: int, t_ns: int, **fields) -> int:
        if kind not in self.kinds or (kind == "console" and not fields.get("coalesced")):
            return -1
        actual = dict(fields, k=kind, cpu=cpu)
        ev = self._next(cpu, kind, actual)
        rec = ev[2]
        keys = CONSOLE_FIELDS if kind == "console" else COMPARED_FIELDS[kind]
        diff = [k for k in keys if _norm(rec.get(k)) != _norm(fields.get(k))]
        if diff:
            what = f"{kind} {rec.get('call', '')}".strip()
            self._diverge(cpu, f"{what} #{ev[1]} differs in " + ", ".join(diff),
                          {k: _plain(rec.get(k)) for k in diff} | {"seq": ev[1]},
                          {k: _plain(fields.get(k)) for k in diff}, seq=ev[1])
        self._matched(cpu, ev)
        return ev[1]

    def save(self) -> dict:
        """Where the checker stands (for a checkpoint)."""
        return {"rich": self._rich, "consumed": {c: s.consumed for c, s in self.streams.items()},
                "since": self._since_checkpoint}

    def load(self, path: str, st: dict) -> None:
        self._rich = st["rich"]
        self._since_checkpoint = st["since"]
        for c, n in st["consumed"].items():
            self.streams[c] = CpuStream.at(path, c, self.kinds, n, self._keep)

    def leftover(self) -> dict[int, list[dict]]:
        """Recorded exits/hypercalls never replayed, per vCPU (vcpu stop events excluded)."""
        out = {}
        for cpu, s in self.streams.items():
            rest = [e for e in s.rest() if e[0] != "vcpu"]
            if rest:
                out[cpu] = [_summary(e) for e in rest[:5]] + ([{"more": len(rest) - 5}] if len(rest) > 5 else [])
        return out


def _norm(v):
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, tuple):
        return list(v)
    return v


def _fmt(v) -> str:
    return f"{v:#x}" if isinstance(v, int) and v > 9 else str(v)
