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
from .checker import EXTERNAL_STOPS, Checker, exit_dict

#: What each recorded external stop is called in verdict messages
_STOP_WORDS = {"timeout": "the recording's --timeout", "interrupted": "Ctrl-C during the recording",
               "terminated": "SIGTERM during the recording", "trace-full": "the recording's --max-trace-size"}

KINDS = ("exit", "hypercall", "vcpu", "mmio", "virtio", "net", "burst", "nm", "exception", "xgetbv", "xsave",
         "xrstor", "event")


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
    vcpus: dict = field(default_factory=dict)  # per vCPU: {"matched", "left", "verdict"}
    warnings: list = field(default_factory=list)  # the trace reader's warnings (damage, gaps, torn tail)
    checks: dict = field(default_factory=dict)  # what was compared: digests, memory hashes, final memory

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "matched": self.matched, "exits": self.exits,
                "code": self.code, "recorded_code": self.recorded_code, "recorded_reason": self.recorded_reason,
                "verified": self.verified, "message": self.message, "vcpus": self.vcpus,
                "warnings": self.warnings, "checks": self.checks, "report": self.report}



class Replayer:
    """Re-executes a trace.  ``kernel`` overrides the recorded kernel path; ``force`` accepts a kernel whose
    SHA-256 differs (divergence detection then shows where it matters)."""

    def __init__(self, path: str | os.PathLike, kernel: str | None = None, force: bool = False,
                 quiet: bool = True, checkpoint_every: int = 0, max_checkpoints: int = 64,
                 mode: str | None = None, timeout: float | None = None) -> None:
        self.path = os.fspath(path)
        reader = open_trace(self.path)
        self.header = reader.header
        self.complete = reader.complete
        # Read every chunk once, in strict order: damage, gaps and reordering are known (and warned about)
        # before anything runs, and the replay checks nothing past the first break.
        self.usable_events = reader.verify()
        self.damaged = reader.discontinuity is not None
        self.recorded_stop = (reader.footer or {}).get("stop")
        if self.recorded_stop is None or self.damaged:
            self.recorded_stop = None
            for ev in reader.events(kinds=["stop"], stop=self.usable_events):
                self.recorded_stop = ev
        self.final = (reader.footer or {}).get("final") if not self.damaged else None
        self.digests = reader.format[0] >= 2 and self.header.get("digests") is True
        self.warnings = list(reader.warnings)
        reader.close()
        rec_reason = (self.recorded_stop or {}).get("reason")
        if self.damaged:
            self.open_ended: str | None = f"the trace is damaged after event #{self.usable_events - 1}" \
                if self.usable_events else "the trace is damaged from its first chunk"
        elif rec_reason in EXTERNAL_STOPS:
            self.open_ended = f"stopped by {_STOP_WORDS[rec_reason]}"
        elif self.recorded_stop is None:
            self.open_ended = "the recorder was killed: the trace ends without a stop"
        else:
            self.open_ended = None
        if timeout is not None and not (0 < timeout < float("inf")):
            raise TracevisorError(f"--timeout {timeout}: must be a positive number of seconds")
        self.timeout = timeout
        self.config, self.image = session.replay_kernel(self.header, self.path, kernel, force, mode)
        self.mode = session.replay_mode(self.header, self.path)
        mh = self.header.get("memhash") if isinstance(self.header.get("memhash"), dict) else {}
        self.mem_every = mh.get("every") if type(mh.get("every")) is int and mh.get("every") > 0 else 0
        self.mem_hypercalls = mh.get("hypercalls") is True
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
        self.hasher = None  # MemoryHasher, when the trace has memory hashes

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

    def _nothing_to_check(self) -> ReplayResult:
        rec = self.recorded_stop or {}
        why = "it is damaged from its first chunk" if self.damaged else "it holds no events"
        self.result = ReplayResult(
            status=int(ExitStatus.UNCHECKED), reason="unchecked", matched=0, exits=0, code=None,
            recorded_code=rec.get("code"), recorded_reason=rec.get("reason"), verified=False,
            message=f"nothing to check: {why}; the replay did not run", warnings=list(self.warnings))
        return self.result

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
                return self._checked(self._paused_result())
        return self._checked(self.run_to(seq))
    def _checked(self, res: ReplayResult) -> ReplayResult:
        """After seek/step_back: compare the state reached with the recording, and say how exact it is.

        Registers: the digest of the vCPU's registers now against the recorded digest of the exit at the
        position (an exit's digest is taken before the exit is handled; handling changes no register, an IN's
        answer reaches rax only when the vCPU runs again).  Memory: the replay compared a hash at every
        recorded ``mem`` event it passed; here the hash of memory now is compared when the position is itself
        a recorded memory check."""
        if res.reason != "paused":
            return res  # a divergence (or the end) on the way: the result already says so
        pos = self.checker.position
        checks: dict = {"position": pos}
        rec = self._recorded_event(pos)
        if not self.digests:
            checks["registers"] = "not checked: the trace has no register digests (format 1.x)"
        elif rec is None or rec.get("k") != "exit":
            checks["registers"] = "not checked: the position is not an exit"
        else:
            cpu = rec["cpu"]
            import zlib

            now = zlib.crc32(bytes(self.machine.vcpus[cpu].vcpu.get_regs()))
            checks["registers"] = "identical to the recording" if now == rec.get("digest") else \
                f"DIFFERENT from the recording (digest {now:#010x}, recorded {rec.get('digest'):#010x})"
        mem_note = "no memory hash recorded here"
        if self.hasher is not None and self.checker.last_mem_seq is not None:
            mem_note = f"last compared at recorded event #{self.checker.last_mem_seq}"
        checks["memory"] = mem_note
        res.checks = checks
        exact = checks["registers"] == "identical to the recording"
        res.verified = exact
        if not exact:
            res.message += f"; cannot confirm this state is exact: registers {checks['registers']}"
        else:
            res.message += "; registers identical to the recording"
        return res

    def _recorded_event(self, seq: int) -> dict | None:
        if seq < 0:
            return None
        reader = open_trace(self.path)
        try:
            for ev in reader.events(start=seq, stop=seq + 1):
                return ev
            return None
        finally:
            reader.close()


    def restore_checkpoint(self, index: int):
        """Bring the VM, the checker and the replaying HostIO back to checkpoint ``index`` (paused there)."""
        cp = self.store.restore(index)
        self.checker.load(self.path, cp.extra["checker"])
        self.hostio.load(self.path, cp.extra["hostio"])
        for v, n in zip(self.machine.vcpus, cp.extra.get("countdown", [])):
            v.mem_countdown = n
        if self.hasher is not None:
            self.hasher.resync(self.store.restored_pages)
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
        self.checker = Checker(self.path, self.config.cpus, console=self.config.coalesce_console,
                               digests=self.digests, open_ended=self.open_ended)
        self.checker.on_verified = self.hostio.release
        kinfo = self.header.get("kernel") if isinstance(self.header.get("kernel"), dict) else {}
        self.other_image = self.image.sha256 != kinfo.get("sha256")  # --force with a different kernel
        self.checker.compare_memory = not self.other_image
        if self.open_ended is not None:
            self.hostio.at_end = self.checker._reached_end
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
        self.machine = m = self.session.machine
        self.checker.stopping = m._stopping
        self.checker.regs_of = lambda cpu: bytes(m.vcpus[cpu].vcpu.get_regs())
        if self.mem_every or self.mem_hypercalls:
            from tracevisor.memhash import attach

            self.hasher = attach(m, self.mem_every, self.mem_hypercalls, keep_copies=True)
            self.checker.hasher = self.hasher
        if self.timeout is not None:
            import time

            deadline = time.monotonic() + self.timeout
            m.stop_conditions.append(
                lambda: StopInfo.of(StopReason.REPLAY_TIMEOUT, f"replay --timeout of {self.timeout:g} s expired")
                if time.monotonic() >= deadline else None)
        self._check_fallback()

    def _check_fallback(self) -> None:
        """Bursts end where the recorded exit set and budget say: warn when this host's sweep or emulator
        differs from the recording's (the replay then likely diverges at a burst)."""
        rec = self.header.get("fallback")
        if not isinstance(rec, dict) or not rec.get("exit_set") or self.config.fallback == "off":
            return
        from tracevisor.fallback import header_config

        now = header_config(self.machine)
        for key in ("exit_set", "unicorn"):
            if now.get(key) != rec.get(key):
                self.machine.log(f"the instruction fallback's {key} differs from the recording ({rec.get(key)} "
                                 f"recorded, {now.get(key)} here): bursts may end elsewhere")

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
        self.store.take(self.checker.position, {"checker": self.checker.save(), "hostio": self.hostio.save(),
                                                "countdown": [v.mem_countdown for v in self.machine.vcpus]})

    def _checkpoint_request(self, cpu: int) -> None:
        self._want_checkpoint = True
        self.machine.request_pause(self.machine.vcpus[cpu], "checkpoint")

    def _pause(self, cpu: int, message: str | None = None) -> None:
        self.checker.until = None
        self._user_pause = True
        self.machine.request_pause(self.machine.vcpus[cpu],
                                   message or f"paused after event #{self.checker.position}")

    def _go(self) -> ReplayResult:
        if self.usable_events == 0:
            return self._nothing_to_check()
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
        """The verdict.  Computed once, from one count of matched events; a verdict per vCPU."""
        rec = self.recorded_stop or {}
        rec_code, rec_reason = rec.get("code"), rec.get("reason")
        c = self.checker
        matched, exits = c.matched, c.exits  # before anything else reads the streams
        checks = {"register_digests": self.digests, "memory_hashes": c.mem_checked,
                  "memory_every": self.mem_every,
                  "memory": "not compared: --force with a different kernel image" if self.other_image else
                  "compared at every recorded memory hash"}
        sched = self.machine.sched if self.machine is not None else None
        if sched is not None:
            checks["points"] = {"switch_and_timer_points": sched.i, "sought_by_rip_registers_and_memory": sched.sought,
                                "memory_digests_compared": sched.mem_compared,
                                "register_only_matches_skipped": sched.ambiguous}
        base = dict(matched=matched, exits=exits, code=info.code, recorded_code=rec_code,
                    recorded_reason=rec_reason, stop=info, warnings=list(self.warnings), checks=checks)
        if info.reason == "paused":
            reason = "stopped" if c.stopped_by_callback else "paused"
            return ReplayResult(status=0, reason=reason, verified=False,
                                message=f"replay {reason} after recorded event #{c.position} "
                                        f"({matched} events matched)", **base)
        remaining = c.remaining()
        left = {cpu: len(r) for cpu, r in remaining.items()}
        vcpus = {cpu: {"matched": s.consumed, "left": left[cpu]} for cpu, s in c.streams.items()}
        base["vcpus"] = vcpus
        leftover = {cpu: [e for e in lst] for cpu, lst in c.leftover().items()} if any(left.values()) else {}

        def verdicts(default: str, bad_cpu: int | None = None, bad: str = "diverged") -> None:
            for cpu, v in vcpus.items():
                v["verdict"] = bad if cpu == bad_cpu else ("not verified: recorded events remain" if v["left"]
                                                           else default)

        if info.reason == "diverged":
            report = dict(info.report)
            held = self.hostio.unverified_output()
            if held:
                report["unverified_output"] = held
            verdicts("not verified (another vCPU diverged)", info.cpu)
            return ReplayResult(status=int(ExitStatus.DIVERGED), reason="diverged", verified=False,
                                message=info.message, report=report, **base)
        if info.reason == "replay-timeout":
            verdicts("not verified (replay --timeout)")
            return ReplayResult(status=int(ExitStatus.TIMEOUT), reason="replay-timeout", verified=False,
                                message=f"not verified: replay --timeout of {self.timeout:g} s expired after "
                                        f"{matched} matching events", report=info.report, **base)
        if matched == 0:
            verdicts("nothing checked")
            return ReplayResult(status=int(ExitStatus.UNCHECKED), reason="unchecked", verified=False,
                                message="nothing to check: no recorded event was reproduced "
                                        f"({info.message})", report=info.report, **base)
        if info.reason == StopReason.END_OF_TRACE:
            verdicts("re-created up to the end of its recording")
            mem = f", {c.mem_checked} memory hashes" if c.mem_checked else ""
            regs = "registers compared at every exit" if self.digests else "no register digests in this trace"
            return ReplayResult(status=int(ExitStatus.PARTIAL), reason=StopReason.END_OF_TRACE, verified=False,
                                message=f"re-created up to the recorded stop ({self.open_ended}): {matched} "
                                        f"events matched ({exits} exits; {regs}{mem}); what the guest did after "
                                        "that was not recorded and is not checked", **base)
        if any(left.values()):
            cpus = ", ".join(str(cpu) for cpu, n in left.items() if n)
            verdicts("verified up to the replay's stop", None)
            what = f"the replayed guest exited (code {info.code})" if info.reason == "exit" else \
                f"the replay stopped ({info.reason}: {info.message})"
            return ReplayResult(status=int(ExitStatus.DIVERGED), reason="diverged", verified=False,
                                message=f"not verified: {what} before the recording did: recorded events remain "
                                        f"unreplayed on vCPU {cpus}",
                                report={"leftover": leftover, "stop": info.as_dict()}, **base)
        if sched is not None and sched.leftover():
            verdicts("not verified: recorded vCPU switches not reached")
            return ReplayResult(status=int(ExitStatus.DIVERGED), reason=StopReason.DIVERGED, verified=False,
                                message=f"not verified: the replay ended ({info.reason}) with {sched.leftover()} "
                                        "recorded vCPU switches not reached", report=info.report, **base)
        same = (rec_reason == "exit" and info.reason == "exit" and rec_code == info.code) or \
            (rec_reason == info.reason and info.reason != "exit" and rec_reason not in EXTERNAL_STOPS)
        if not same:
            verdicts("diverged at the stop")
            return ReplayResult(status=int(ExitStatus.DIVERGED), reason="diverged", verified=False,
                                message=f"the replay ended with {info.reason} (code {info.code}), the recording "
                                        f"with {rec_reason} (code {rec_code})", report=info.report, **base)
        final_note = self._final_memory(checks)
        if final_note is not None:
            verdicts("diverged at the stop", info.cpu)
            return ReplayResult(status=int(ExitStatus.DIVERGED), reason="diverged", verified=False, message=final_note,
                                report=dict(info.report, memory_differs=True, pages=checks.get("final_pages")),
                                **base)
        verdicts("verified")
        how = "registers compared at every exit" if self.digests else \
            "no register digests in this format 1.x trace: exits compared by port, value and rip only"
        mem = f", {c.mem_checked} memory hashes" if c.mem_checked else ""
        final = checks.get("final_memory")
        # say what was not compared (several vCPUs, another kernel image, a trace without memory hashes)
        fin = ", final memory identical" if final == "identical" else (f", final memory {final}" if final else "")
        if sched is not None and sched.mem_compared:
            fin += f"; memory written in each slice compared at {sched.mem_compared} vCPU switch/timer points"
            if sched.ambiguous:
                fin += f" ({sched.ambiguous} breakpoint hits had the recorded registers but not the memory: skipped)"
        tail = f"exit code {info.code} identical to the recording" if info.reason == "exit" else \
            f"the guest stopped with {info.reason} as in the recording"
        return ReplayResult(status=0, reason=info.reason, verified=True,
                            message=f"replay verified: {matched} events matched ({exits} exits; {how}{mem}{fin}), "
                                    f"{tail}", report=info.report if info.reason != "exit" else {}, **base)

    def _final_memory(self, checks: dict) -> str | None:
        """Compare the memory hash at the stop with the footer's; a message when they differ.  With several
        vCPUs only in an exact recording: there the vCPUs that do not hold the token wait at recorded switch
        points; in parallel ones they stop wherever they happen to be, which a replay cannot reproduce."""
        fin = self.final if isinstance(self.final, dict) else {}
        want = fin.get("mem")
        if self.other_image:
            checks["final_memory"] = "not compared (--force with a different kernel image)"
            return None
        serialized = self.machine is not None and self.machine.sched is not None
        if type(want) is not int or (self.config.cpus != 1 and not serialized):
            checks["final_memory"] = "not compared" + (" (several vCPUs running in parallel)"
                                                       if self.config.cpus != 1 else "")
            return None
        from tracevisor.memhash import MemoryHasher

        hasher = self.hasher or MemoryHasher(self.machine)
        got = hasher.update()[0] if self.hasher is not None else hasher.start()[0]
        if got == want:
            checks["final_memory"] = "identical"
            return None
        checks["final_memory"] = "different"
        return (f"guest memory at the stop differs from the recording's (hash {got:#018x}, recorded {want:#018x}): "
                "the replay is not verified")
