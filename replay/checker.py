"""The divergence checker: the trace sink the machine writes to during a replay.

Where recording appends each exit and hypercall to a file, replay hands them to a :class:`Checker`,
which compares them with the recording of the same vCPU, field by field — including the register digest
of every exit and the memory hash of every ``mem`` event — and raises
:class:`~tracevisor.errors.Divergence` at the first difference.  It also drives user callbacks and
"pause at event N", and notices when a vCPU has reached the end of what was recorded for it.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable

from tracevisor.errors import Divergence
from tracevisor.kvm.uapi import exit_reason_name
from tracevisor.memhash import ZERO_PAGE_CRC, unpack_pages
from tracevisor.runloop import VmStop
from tracevisor.status import StopInfo, StopReason
from tracevisor.trace.schema import DIGEST_REGS, KINDS, SYNC_REGS_SIZE
from tracevisor.trace.schema import EXIT_FIELDS as SCHEMA_EXIT_FIELDS

from .streams import CpuStream, triple

_EXIT_KIND = "exit"

COMPARED_KINDS = {"exit", "hypercall", "vcpu", "mmio", "virtio", "net", "mem",
                  # the instruction fallback (tracevisor/fallback.py): burst boundaries and what reached the guest
                  "burst", "nm", "exception", "xgetbv", "xsave", "xrstor"}
#: Recorded stops that end a recording at an arbitrary point of the guest's run (not the guest's doing)
EXTERNAL_STOPS = ("timeout", "interrupted", "terminated", "trace-full")
COMPARED_KINDS |= {"irq", "msr"}  # exact mode's user-space interrupt path (tracevisor/interrupts.py)
#: Fields of an event that are not the guest's doing: timing (``t`` and ``seq`` are common fields, never
#: compared), and why a vCPU's thread ended (a replay paused or stopped early ends it differently).
NOT_COMPARED = {"hypercall": {"t_end"}, "vcpu": {"reason"}}
#: What is compared, per rich kind: every field trace/schema.py defines for it except the above.
COMPARED_FIELDS: dict[str, tuple[str, ...]] = {
    kind: tuple(f.name for f in KINDS[kind].fields if f.name not in NOT_COMPARED.get(kind, ()))
    for kind in COMPARED_KINDS - {"exit"}}
#: The compared fields of an exit row (the time and the vCPU are not the guest's doing / already matched; the
#: register digest is compared when the trace has digests, and reported apart).
EXIT_FIELDS = tuple(f for f in SCHEMA_EXIT_FIELDS if f not in ("t_ns", "vcpu", "digest"))
#: Coalesced console output (--coalesce-console): the bytes between two exits are compared
CONSOLE_FIELDS = ("stream", "data")


def _coalesced_console(ev: dict) -> bool:
    """Keep every compared event, and of the console events those of the coalesced UART ring."""
    return ev.get("k") != "console" or ev.get("coalesced") is True


def exit_dict(seq: int, row: tuple) -> dict:
    t, rip, value, port, vcpu, reason, direction, size = row[:8]
    d = {"k": "exit", "seq": seq, "cpu": vcpu, "t": t, "reason": reason, "rip": rip, "port": port,
         "dir": direction, "size": size, "value": value}
    if len(row) > 8:
        d["digest"] = row[8]
    return d


class EndOfRecording(VmStop):
    """A vCPU reached the end of what was recorded for it, in a recording that stopped at an arbitrary point
    (timeout, signal, full trace, killed recorder, a damaged tail): nothing further can be checked."""

    def __init__(self, cpu: int, why: str) -> None:
        super().__init__(StopInfo.of(StopReason.END_OF_TRACE, f"re-created up to the end of the recording ({why})",
                                     cpu=cpu))


_ZERO_REGS_CRC = zlib.crc32(bytes(SYNC_REGS_SIZE))


def _crc_lin(buf: bytes) -> int:
    """The linear part of CRC-32: crc32(a ^ b) == crc32(a) ^ _crc_lin(b) for equal lengths."""
    return zlib.crc32(buf) ^ _ZERO_REGS_CRC


def suspect_registers(replay_block: bytes, recorded_digest: int, bits: int = 16) -> list[dict]:
    """Which single register, differing from the replay's only in its low ``bits`` bits, gives the recorded
    digest?  CRC-32 is linear, so for each register this is a small linear system over GF(2); with 16 unknown
    bits and 32 equations a solution exists by chance with probability 2^-16 per register, so a found one
    is almost certainly the real difference.  Empty when no single narrow difference explains the digest."""
    target = zlib.crc32(replay_block) ^ recorded_digest
    if len(replay_block) != SYNC_REGS_SIZE or not target:
        return []
    out = []
    for r, name in enumerate(DIGEST_REGS):
        basis = []
        for b in range(bits):
            buf = bytearray(SYNC_REGS_SIZE)
            buf[r * 8 + b // 8] = 1 << (b % 8)
            basis.append((_crc_lin(bytes(buf)), 1 << b))
        # Gaussian elimination: find a combination of basis images equal to target.
        rows: list[tuple[int, int]] = []
        for img, mask in basis:
            for pimg, pmask in rows:
                if img ^ pimg < img:
                    img, mask = img ^ pimg, mask ^ pmask
            if img:
                rows.append((img, mask))
                rows.sort(reverse=True)
        t, m = target, 0
        for pimg, pmask in rows:
            if t ^ pimg < t:
                t, m = t ^ pimg, m ^ pmask
        if t == 0 and m:
            replay_value = int.from_bytes(replay_block[r * 8:r * 8 + 8], "little")
            out.append({"register": name, "recorded": replay_value ^ m, "replay": replay_value})
    return out


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

    def __init__(self, path: str, cpus: int, history: int = 5, console: bool = False, digests: bool = False,
                 open_ended: str | None = None) -> None:
        # console: the recording coalesced its UART output (--coalesce-console); those console events, which
        # stand where UART exits stand otherwise, are compared too.
        self.kinds = COMPARED_KINDS | {"console"} if console else COMPARED_KINDS
        self._keep = _coalesced_console if console else None
        self.path = path
        self.digests = digests
        self.streams = {cpu: CpuStream(path, cpu, self.kinds, self._keep, digests) for cpu in range(cpus)}
        self.history = history
        #: Why the recording ends at an arbitrary point (a recorded timeout, a killed recorder, damage), or
        #: None when it ends with the guest's own stop: then a vCPU going on past its recording diverged.
        self.open_ended = open_ended
        self.ended: set[int] = set()  # vCPUs that reached the end of their recording (open-ended only)
        self._end_lock = threading.Lock()
        self.stopping: threading.Event | None = None  # set by the Replayer: the machine is stopping
        self.regs_of: Callable[[int], bytes] | None = None  # set by the Replayer: a vCPU's kvm_regs bytes
        self.hasher = None  # the replay's MemoryHasher, when memory hashes are compared
        self.rec_pages: dict[int, int] = {}  # page -> recorded crc, from the recorded mem events so far
        self.on_verified: Callable[[int], None] | None = None  # a hypercall matched: release its output
        self.mem_checked = 0  # mem events compared
        self.compare_memory = True  # False: mem events are matched by position only (a forced other kernel)
        self.last_mem_seq: int | None = None
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
    def _diverge(self, cpu: int, message: str, expected: dict | None, actual: dict, seq=None, extra=None) -> None:
        st = self.streams[cpu]
        if seq is not None and st.i and st.seqs[st.i - 1] == seq:
            st.i -= 1  # the differing event was taken from the stream but not reproduced: not "matched"
        recent = st.recent(self.history, st.i)
        if extra:
            raise Divergence(message, kind=actual.get("k"), seq=seq, expected=expected, actual=actual,
                             last_matching=[_summary(e) for e in recent], **extra)
        raise Divergence(message, kind=actual.get("k"), seq=seq, expected=expected, actual=actual,
                         last_matching=[_summary(e) for e in recent])

    def _next(self, cpu: int, kind: str, actual: dict) -> tuple:
        ev = self.streams[cpu].next()
        if ev is None or ev[0] != kind:
            self._wrong_kind(cpu, ev, kind, actual)
        return ev

    def _wrong_kind(self, cpu: int, ev: tuple | None, kind: str, actual: dict) -> None:
        actual = {k: _plain(v) for k, v in actual.items()}
        if self.open_ended is not None and (
                ev is None or (ev[0] == "vcpu" and isinstance(ev[2], dict) and ev[2].get("state") == "stop")):
            if ev is not None:
                self.streams[cpu].i -= 1
            self._reached_end(cpu)
        if ev is None:
            self._diverge(cpu, f"the guest went on past the end of the recording ({_a(kind)} that was never "
                          "recorded)", None, actual)
        self._diverge(cpu, f"recorded event #{ev[1]} is {_a(ev[0])}, the replay produced {_a(kind)}",
                      _summary(ev), actual, seq=ev[1])

    def _reached_end(self, cpu: int) -> None:
        """This vCPU did everything recorded for it in an open-ended recording: it waits here (its next exit
        cannot be checked) until every vCPU has, then the replay stops as re-created up to the recorded stop."""
        with self._end_lock:
            self.ended.add(cpu)
            done = len(self.ended) == len(self.streams)
        if not done and self.stopping is not None:
            while not self.stopping.wait(0.01):
                with self._end_lock:
                    if len(self.ended) == len(self.streams):
                        break
        raise EndOfRecording(cpu, self.open_ended or "")

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
    def exit(self, cpu, t_ns, reason, rip, port=0, direction=0, size=0, value=0, digest=0) -> None:
        st = self.streams[cpu]
        i = st.i
        if i >= len(st.items):
            if not st.refill():
                self._wrong_kind(cpu, None, "exit", {"k": "exit", "cpu": cpu, "reason": reason, "rip": rip,
                                                     "port": port, "dir": direction, "size": size, "value": value})
            i = 0
        row = st.items[i]
        st.i = i + 1
        # the hot path: one tuple comparison against the recorded (rip, value, port, vcpu, reason, dir, size,
        # digest) — the digest only when the trace has them
        if row == ((rip, value, port, cpu, reason, direction, size, digest) if self.digests else
                   (rip, value, port, cpu, reason, direction, size)):
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
        if self.digests:
            actual["digest"] = digest
        fields = EXIT_FIELDS + (("digest",) if self.digests else ())
        diff_e = {f: rec[f] for f in fields if rec.get(f) != actual[f]}
        diff_a = {f: actual[f] for f in diff_e}
        name = exit_reason_name(reason)
        extra = None
        text = ", ".join(f"{f}: recorded {_fmt(diff_e[f])}, replay {_fmt(diff_a[f])}" for f in diff_e
                         if f != "digest")
        if "digest" in diff_e:
            regs = self.regs_of(cpu) if self.regs_of is not None else b""
            suspects = suspect_registers(regs, rec["digest"]) if regs else []
            extra = {"registers_differ": True, "suspects": suspects}
            if suspects:
                what = "; ".join(f"{s['register']}: recorded {s['recorded']:#x}, replay {s['replay']:#x}"
                                 for s in suspects)
                regtext = f"the registers differ ({what})"
            else:
                regtext = ("the registers differ (register digest recorded "
                           f"{rec['digest']:#010x}, replay {digest:#010x}; more than one register, or a wide "
                           "difference: the replay's registers are below)")
            text = f"{text}; {regtext}" if text else regtext
        self._diverge(cpu, f"exit #{ev[1]} differs ({name} exit; {text})", rec, dict(actual, k="exit", cpu=cpu),
                      seq=ev[1], extra=extra)

    def event(self, kind: str, cpu: int, t_ns: int, **fields) -> int:
        if kind not in self.kinds or (kind == "console" and not fields.get("coalesced")):
            return -1
        actual = dict(fields, k=kind, cpu=cpu)
        ev = self._next(cpu, kind, actual)
        rec = ev[2]
        if kind == "mem":
            self._mem(cpu, ev, fields)
            self._matched(cpu, ev)
            return ev[1]
        keys = CONSOLE_FIELDS if kind == "console" else COMPARED_FIELDS[kind]
        diff = [k for k in keys if _norm(rec.get(k)) != _norm(fields.get(k))]
        if diff:
            what = f"{kind} {rec.get('call', '')}".strip()
            self._diverge(cpu, f"{what} #{ev[1]} differs in " + ", ".join(diff),
                          {k: _plain(rec.get(k)) for k in diff} | {"seq": ev[1]},
                          {k: _plain(fields.get(k)) for k in diff}, seq=ev[1])
        if kind == "hypercall" and self.on_verified is not None:
            self.on_verified(cpu)
        self._matched(cpu, ev)
        return ev[1]

    def _mem(self, cpu: int, ev: tuple, fields: dict) -> None:
        """Compare a memory hash; on a difference, name the pages (from the recorded per-page CRCs)."""
        rec = ev[2]
        for page, crc in unpack_pages(rec.get("pages", b"")):
            self.rec_pages[page] = crc
        if not self.compare_memory and rec.get("at") == fields.get("at"):
            return  # --force with another kernel image: memory differs by construction (registers still count)
        if rec.get("hash") == fields.get("hash") and rec.get("at") == fields.get("at"):
            self.mem_checked += 1
            self.last_mem_seq = ev[1]
            if rec.get("at") == "boot" and self.hasher is not None:  # equal hashes: the same page table
                self.rec_pages = {p: c for p, c in enumerate(self.hasher.crcs) if c != ZERO_PAGE_CRC}
            return
        pages = self.hasher.differing(self.rec_pages) if self.hasher is not None else []
        where = ", ".join(f"{p['gpa']:#x}" for p in pages[:8]) or "unknown pages"
        runs = next((p["changed"] for p in pages if p.get("changed")), None)
        text = f"guest memory differs from the recording at mem check #{ev[1]} ({rec.get('at')}): pages {where}"
        if runs:
            shown = ", ".join(f"{r['gpa']:#x} ({r['before']} -> {r['replay']})" for r in runs)
            text += (f"; the trace keeps only page CRCs, so the differing bytes are among those the replay "
                     f"changed there since the last matching check [{shown}] or among bytes only the "
                     "recording changed")
        self._diverge(cpu, text, {"hash": rec.get("hash"), "at": rec.get("at"), "seq": ev[1]},
                      {"hash": fields.get("hash"), "at": fields.get("at"), "k": "mem"}, seq=ev[1],
                      extra={"memory_differs": True, "pages": pages})

    def save(self) -> dict:
        """Where the checker stands (for a checkpoint)."""
        return {"rich": self._rich, "consumed": {c: s.consumed for c, s in self.streams.items()},
                "since": self._since_checkpoint, "rec_pages": dict(self.rec_pages)}

    def load(self, path: str, st: dict) -> None:
        self._rich = st["rich"]
        self._since_checkpoint = st["since"]
        self.rec_pages = dict(st["rec_pages"])
        self.ended.clear()
        for c, n in st["consumed"].items():
            self.streams[c] = CpuStream.at(path, c, self.kinds, n, self._keep, self.digests)

    def remaining(self) -> dict[int, list[tuple]]:
        """Recorded events not replayed, per vCPU (vcpu lifecycle events excluded), read from a copy of each
        stream: the checker's own position (and so :attr:`matched`) does not move."""
        out = {}
        for cpu, s in self.streams.items():
            copy = CpuStream.at(self.path, cpu, self.kinds, s.consumed, self._keep, self.digests)
            out[cpu] = [e for e in copy.rest() if e[0] != "vcpu"]
        return out

    def leftover(self) -> dict[int, list[dict]]:
        """Recorded exits/hypercalls never replayed, per vCPU: the first five of each, and how many more."""
        out = {}
        for cpu, rest in self.remaining().items():
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
