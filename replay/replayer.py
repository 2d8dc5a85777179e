"""Re-execution of a recorded run under KVM, with divergence detection, callbacks and pausing.

    r = replay.Replayer("run.tvt")
    r.on("hypercall", lambda ev: print(ev.seq, ev["call"], ev.regs["rip"]))
    result = r.run()

    r = replay.Replayer("run.tvt")
    r.run_to(120)                 # paused after recorded event #120 was replayed
    r.registers()["rip"], r.memory.read(0x400000, 16), print(r.memory.dump(0x400000, 64))
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from tracevisor import session
from tracevisor.errors import Divergence, TracevisorError
from tracevisor.hostio import Console
from tracevisor.machine import Machine
from tracevisor.status import ExitStatus, StopInfo, StopReason
from tracevisor.trace import open_trace

from .backend import ReplayingHostIO
from .checker import Checker, exit_dict

KINDS = ("exit", "hypercall", "vcpu", "mmio", "virtio", "net", "event")


class ReadOnlyMemory:
    """Guest memory as callbacks and paused replays see it: reads only."""

    def __init__(self, memory, machine: Machine | None = None, cpu: int = 0) -> None:
        self._m = memory
        self._machine = machine
        self._cpu = cpu
        self.size = memory.size

    def read(self, gpa: int, length: int) -> bytes:
        return self._m.read(gpa, length)

    def read_u32(self, gpa: int) -> int:
        return self._m.read_u32(gpa)

    def read_u64(self, gpa: int) -> int:
        return self._m.read_u64(gpa)

    def read_cstr(self, gpa: int, limit: int = 4096) -> bytes:
        return self._m.read_cstr(gpa, limit)

    def read_virt(self, va: int, length: int) -> bytes:
        """Read through the vCPU's current page tables."""
        cr3 = self._machine.vcpus[self._cpu].vcpu.get_sregs().cr3
        return self._m.read_virt(va, length, cr3)

    def dump(self, gpa: int, length: int) -> str:
        """A hexdump (offset, 16 bytes in hex, ASCII) of guest-physical [gpa, gpa+length)."""
        data = self._m.read(gpa, length)
        lines = []
        for off in range(0, len(data), 16):
            row = data[off:off + 16]
            hexpart = " ".join(f"{b:02x}" for b in row)
            text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
            lines.append(f"{gpa + off:016x}  {hexpart:<47}  |{text}|")
        return "\n".join(lines)


class ReplayEvent:
    """What a callback receives: the recorded event, and the machine state at that point."""

    __slots__ = ("kind", "seq", "cpu", "fields", "_replayer")

    def __init__(self, replayer: Replayer, cpu: int, ev: tuple) -> None:
        self.kind, self.seq, payload = ev
        self.cpu = cpu
        self.fields = exit_dict(self.seq, payload) if self.kind == "exit" else payload
        self._replayer = replayer

    def __getitem__(self, key):
        return self.fields[key]

    def get(self, key, default=None):
        return self.fields.get(key, default)

    @property
    def regs(self) -> dict:
        """General registers of this vCPU now (callbacks run on the vCPU's thread, between exits)."""
        return self._replayer.machine.vcpus[self.cpu].vcpu.get_regs().as_dict()

    @property
    def sregs(self) -> dict:
        s = self._replayer.machine.vcpus[self.cpu].vcpu.get_sregs()
        return {"cr0": s.cr0, "cr2": s.cr2, "cr3": s.cr3, "cr4": s.cr4, "efer": s.efer}

    @property
    def memory(self) -> ReadOnlyMemory:
        return ReadOnlyMemory(self._replayer.machine.memory, self._replayer.machine, self.cpu)

    def pause(self) -> None:
        """Pause the replay once this event has been handled; :meth:`Replayer.run` resumes it."""
        self._replayer._pause(self.cpu)

    def stop(self) -> None:
        """End the replay here (the result reports reason "stopped")."""
        self._replayer.checker.stopped_by_callback = True
        self._replayer._pause(self.cpu, "stopped by a callback")

    def __repr__(self) -> str:
        return f"ReplayEvent({self.kind} #{self.seq} cpu{self.cpu} {self.fields})"


@dataclass
class ReplayResult:
    status: int  # process exit status for the CLI
    reason: str  # exit | diverged | paused | stopped | end-of-trace | fault | ...
    matched: int  # recorded events reproduced
    exits: int
    code: int | None
    recorded_code: int | None
    recorded_reason: str | None
    verified: bool
    message: str
    report: dict = field(default_factory=dict)
    stop: StopInfo | None = None

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "matched": self.matched, "exits": self.exits,
                "code": self.code, "recorded_code": self.recorded_code, "recorded_reason": self.recorded_reason,
                "verified": self.verified, "message": self.message, "report": self.report}


class Replayer:
    """Re-executes a trace.  ``kernel`` overrides the recorded kernel path; ``force`` accepts a kernel whose
    SHA-256 differs (divergence detection then shows where it matters)."""

    def __init__(self, path: str | os.PathLike, kernel: str | None = None, force: bool = False,
                 quiet: bool = True, checkpoint_every: int = 0, max_checkpoints: int = 64,
                 mode: str | None = None) -> None:
        self.path = os.fspath(path)
        reader = open_trace(self.path)
        self.header = reader.header
        self.complete = reader.complete
        self.recorded_stop = (reader.footer or {}).get("stop")
        if self.recorded_stop is None:
            for ev in reader.events(kinds=["stop"]):
                self.recorded_stop = ev
        self.warnings = list(reader.warnings)
        reader.close()
        self.config, self.image = session.replay_kernel(self.header, self.path, kernel, force, mode)
        self.mode = session.replay_mode(self.header, self.path)
        self.quiet = quiet
        self.checkpoint_every = checkpoint_every
        self.max_checkpoints = max_checkpoints
        self.store = None  # CheckpointStore, when time travel is on
        self._want_checkpoint = False
        self._user_pause = False
        self.session: session.Session | None = None
        self.machine: Machine | None = None
        self.checker: Checker | None = None
        self.hostio: ReplayingHostIO | None = None
        self._callbacks: dict[str, list[Callable]] = {}
        self.result: ReplayResult | None = None

    # -- API -------------------------------------------------------------------------------------
    def on(self, kind: str, fn: Callable[[ReplayEvent], object]) -> Replayer:
        """Call ``fn(event)`` for each replayed event of ``kind`` (exit, hypercall, vcpu, mmio, virtio, net or
        event=all)."""
        if kind not in KINDS:
            raise TracevisorError(f"unknown callback kind {kind!r}; use one of {', '.join(KINDS)}")
        self._callbacks.setdefault(kind, []).append(fn)
        if self.checker is not None:
            self.checker.callbacks = self._callbacks
        return self

    def run(self) -> ReplayResult:
        """Replay to the end (or to the next pause), then return the result."""
        if self.checker is not None:
            self.checker.until = None
        return self._go()

    def run_to(self, seq: int) -> ReplayResult:
        """Replay until recorded event ``seq`` has been reproduced, then pause (VM kept for inspection)."""
        self.prepare()
        if seq <= self.checker.position:
            raise TracevisorError(f"already past event {seq} (at {self.checker.position}); "
                                  "replay forward only here (seek/step_back need checkpoints)")
        self.checker.until = seq
        return self._go()

    def seek(self, seq: int) -> ReplayResult:
        """Move to just after recorded event ``seq`` — forward by replaying, backward by restoring the
        nearest earlier checkpoint and replaying from there (needs ``checkpoint_every``)."""
        self.boot()
        if seq == self.checker.position:
            return self._paused_result()
        if seq < self.checker.position or not self.machine.pause_requested():
            if self.store is None:
                raise TracevisorError("seeking backwards needs checkpoints: Replayer(path, checkpoint_every=N)")
            cp = self.restore_checkpoint(self.store.latest_at_or_before(seq))
            if cp.position >= seq:
                return self._paused_result()
        return self.run_to(seq)

    def restore_checkpoint(self, index: int):
        """Bring the VM, the checker and the replaying HostIO back to checkpoint ``index`` (paused there)."""
        cp = self.store.restore(index)
        self.checker.load(self.path, cp.extra["checker"])
        self.hostio.load(self.path, cp.extra["hostio"])
        self.checker.stopped_by_callback = False
        self.machine.mark_paused(f"restored checkpoint at #{cp.position}")
        return cp

    def step_back(self) -> ReplayResult:
        """Go back to the exit before the current position."""
        self.prepare()
        target = self.exit_before(self.checker.position)
        if target is None:
            raise TracevisorError("already at the first exit")
        return self.seek(target)

    def exit_before(self, seq: int) -> int | None:
        """The seq of the last recorded exit before event ``seq`` (None if there is none)."""
        import bisect

        reader = open_trace(self.path)
        try:
            refs = reader.chunk_index
            for i in range(len(refs) - 1, -1, -1):
                chunk = reader.chunk(i)
                if chunk is None or chunk.seq0 >= seq:
                    continue
                seqs = list(chunk.exit_seqs())
                j = bisect.bisect_left(seqs, seq)
                if j > 0:
                    return seqs[j - 1]
            return None
        finally:
            reader.close()

    def _paused_result(self) -> ReplayResult:
        c = self.checker
        rec = self.recorded_stop or {}
        return ReplayResult(status=0, reason=StopReason.PAUSED, matched=c.matched, exits=c.exits, code=None,
                            recorded_code=rec.get("code"), recorded_reason=rec.get("reason"), verified=False,
                            message=f"paused after recorded event #{c.position}", stop=self.machine.stop_info)

    @property
    def position(self) -> int:
        return self.checker.position if self.checker else -1

    def registers(self, cpu: int = 0) -> dict:
        self._require_paused()
        return self.machine.vcpus[cpu].vcpu.get_regs().as_dict()

    @property
    def memory(self) -> ReadOnlyMemory:
        self._require_paused()
        return ReadOnlyMemory(self.machine.memory, self.machine, 0)

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None
            self.machine = None

    def __enter__(self) -> Replayer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------------
    def _require_paused(self) -> None:
        if self.machine is None:
            raise TracevisorError("the replay has not started; call run_to(N) first")

    def prepare(self) -> None:
        """Create the VM, the replaying HostIO and the checker (once)."""
        if self.machine is not None:
            return
        self.hostio = ReplayingHostIO(self.path, self.config.cpus, Console(quiet=self.quiet))
        self.checker = Checker(self.path, self.config.cpus, console=self.config.coalesce_console)
        self.checker.callbacks = self._callbacks
        self.checker.on_pause = self._pause
        self.checker.make_event = lambda cpu, ev: ReplayEvent(self, cpu, ev)
        if self.checkpoint_every:
            if self.config.cpus != 1:
                raise TracevisorError("time travel (checkpoints) supports single-vCPU traces only")
            self.checker.checkpoint_every = self.checkpoint_every
            self.checker.on_checkpoint = self._checkpoint_request
        self.session = session.build_replay(self.config, self.image, self.hostio, self.checker,
                                            log=lambda msg: None if self.quiet else print(f"tracevisor: {msg}"))
        self.machine = self.session.machine

    def boot(self) -> None:
        """Prepare and boot the VM (once), taking the first checkpoint when time travel is on; the VM is
        then paused before the first guest instruction."""
        self.prepare()
        m = self.machine
        if m.booted:
            return
        self.session.boot()
        if self.checkpoint_every:
            from tracevisor.checkpoint import CheckpointStore

            self.store = CheckpointStore(m, self.max_checkpoints)
            self._take_checkpoint()

    def _take_checkpoint(self) -> None:
        self.store.take(self.checker.position, {"checker": self.checker.save(), "hostio": self.hostio.save()})

    def _checkpoint_request(self, cpu: int) -> None:
        self._want_checkpoint = True
        self.machine.request_pause(self.machine.vcpus[cpu], "checkpoint")

    def _pause(self, cpu: int, message: str | None = None) -> None:
        self.checker.until = None
        self._user_pause = True
        self.machine.request_pause(self.machine.vcpus[cpu],
                                   message or f"paused after event #{self.checker.position}")

    def _go(self) -> ReplayResult:
        self.prepare()
        try:
            self.boot()
        except Divergence as e:  # a host answer needed to boot (boot time, CPU frequency) is missing or bad
            info = StopInfo.of(StopReason.DIVERGED, f"replay diverged while booting: {e}", cpu=0,
                               report=dict(e.details))
            self.machine.stop(info)
            self.result = self._result(info)
            return self.result
        m = self.machine
        if m.stop_info is not None and (not m.pause_requested() or self.checker.stopped_by_callback):
            return self.result
        self.result = self._result(self.resume())
        return self.result

    def resume(self) -> StopInfo:
        """Resume the VM until a stop that is not one of our own checkpoint pauses."""
        m = self.machine
        while True:
            self._user_pause = False
            info = m.resume()
            if info.is_paused and self._want_checkpoint:
                self._want_checkpoint = False
                self._take_checkpoint()
                if not self._user_pause and not info.report.get("debug"):
                    continue
            return info

    def _result(self, info: StopInfo) -> ReplayResult:
        rec = self.recorded_stop or {}
        rec_code, rec_reason = rec.get("code"), rec.get("reason")
        c = self.checker
        base = dict(matched=c.matched, exits=c.exits, code=info.code, recorded_code=rec_code,
                    recorded_reason=rec_reason, stop=info)
        if info.is_paused:
            reason = StopReason.STOPPED if c.stopped_by_callback else StopReason.PAUSED
            return ReplayResult(status=0, reason=reason, verified=False,
                                message=f"replay {reason} after recorded event #{c.position} "
                                        f"({c.matched} events matched)", **base)
        if info.reason == StopReason.DIVERGED:
            report = dict(info.report)
            if not self.complete and report.get("expected") is None:
                return ReplayResult(status=0, reason=StopReason.END_OF_TRACE, verified=False,
                                    message=f"reached the end of an incomplete recording after {c.matched} "
                                            "matching events (the recorder did not finish)", report=report,
                                    **base)
            return ReplayResult(status=int(ExitStatus.DIVERGED), reason=StopReason.DIVERGED, verified=False,
                                message=info.message, report=report, **base)
        if info.reason == StopReason.EXIT:
            left = c.leftover()
            ending_cpu = info.cpu if info.cpu is not None else 0
            if ending_cpu in left:
                return ReplayResult(status=int(ExitStatus.DIVERGED), reason=StopReason.DIVERGED, verified=False,
                                    message=f"the replayed guest exited (code {info.code}) before the "
                                            f"recording did: recorded events remain on vCPU {ending_cpu}",
                                    report={"leftover": left}, **base)
            sched = self.machine.sched if self.machine is not None else None
            if sched is not None and sched.leftover():
                return ReplayResult(status=int(ExitStatus.DIVERGED), reason=StopReason.DIVERGED, verified=False,
                                    message=f"the replayed guest exited (code {info.code}) with "
                                            f"{sched.leftover()} recorded vCPU switches not reached", **base)
            if rec_reason == StopReason.EXIT and rec_code == info.code:
                return ReplayResult(status=info.status, reason=StopReason.EXIT, verified=True,
                                    message=f"replay verified: {c.matched} events matched ({c.exits} exits), "
                                            f"exit code {info.code} identical to the recording", **base)
            return ReplayResult(status=int(ExitStatus.DIVERGED), reason=StopReason.DIVERGED, verified=False,
                                message=f"the replay exited with code {info.code}, the recording ended with "
                                        f"{rec_reason} (code {rec_code})", **base)
        # A fault/hang/timeout in the replay: verified if the recording ended the same way.
        same = rec_reason == info.reason and not c.leftover().get(info.cpu or 0)
        if same:
            return ReplayResult(status=info.status, reason=info.reason, verified=True,
                                message=f"replay verified: {c.matched} events matched; the guest stopped "
                                        f"with {info.reason} as in the recording", report=info.report, **base)
        return ReplayResult(status=info.status, reason=info.reason, verified=False,
                            message=info.message, report=info.report, **base)
