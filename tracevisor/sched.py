"""One vCPU at a time: the recorded schedule that makes multi-vCPU shared-memory races replay exactly.

In an exact recording of a guest with several vCPUs, a token passes between the vCPU threads and only its
holder is inside KVM_RUN.  The holder gives it up

* after :data:`SLICE_EXITS` exits (``why="slice"``), or at a HLT exit (``"hlt"``) — points every replay
  reaches by counting the vCPU's exits; or
* when it has held the token for :data:`QUANTUM_S`: if it made an exit within the last
  :data:`EXIT_GRACE_S`, at its next exit (``"slice"`` again — a point found by counting exits); if not (a
  spin loop waiting for a vCPU that cannot run meanwhile), the scheduler kicks it out of KVM_RUN at
  whatever instruction it is on (``"kick"``).  There is no instruction counter on these hosts, so a kick
  point is recorded as the RIP and the CRC-32 of all general registers (the per-exit register digest of
  the trace format).  Kicks are the last resort because such a point can be ambiguous (below).

Each switch is a ``sched`` event in the giving vCPU's stream: ``n`` (its exits in the slice), ``next``
(who gets the token), ``why``, for a kick ``rip`` and ``digest``, and always ``mdigest``: the CRC-32 over
(page number, contents) of the pages written since the previous event (KVM's dirty log and the host's
writes; only the holder ran meanwhile).

A replay follows the list: the holder runs until it has made ``n`` exits and compares ``mdigest``; for a
kick it then runs on with an execution breakpoint (DR3) on ``rip`` and stops at the first hit whose
registers have the recorded digest and whose memory has the recorded ``mdigest`` — rr's method, with the
registers and the memory written standing in for the branch counter.  A hit whose RIP matches but whose
registers or memory do not is stepped over (one single-step without the breakpoint); one with the registers
but not the memory (a loop that repeats its registers while memory changes) is counted as ambiguous.  A
point at an instruction KVM cannot emulate is found at its emulation-failure exit (no breakpoint fires
there on these hosts).  A vCPU that halted before reaching the point is kicked after :data:`QUANTUM_S` and
its registers compared in place; one that makes an exit first has diverged.

While a vCPU does not hold the token it waits outside KVM_RUN, so interrupts other vCPUs send it (IPIs
through the in-kernel LAPIC) are delivered at its next entry — a point the schedule fixes.

**Timer points** (exact mode's user-space interrupt path, :mod:`tracevisor.interrupts`, any number of
vCPUs).  When a timer of the holder falls due while it runs without exits, the recorder kicks it and
records the point like a kick (``why="timer"``, ``next`` = the same vCPU, RIP and digest) — or, when the
vCPU is making exits, takes it at the next exit (no RIP: found by counting exits); virtual time
jumps to the deadline there and the interrupt is injected before the vCPU re-enters.  The replay finds
the point as it finds a kick point.  An interrupt that is pending while the guest has interrupts off
waits for the next exit with interrupts on; when none comes within :data:`BLOCKED_S` the recorder kicks
again and records that point (``why="irq"``: no time jump, the interrupt is offered there).  A kick is
never taken while an interrupt or exception injected before it still waits for delivery: a replay could
not stop in front of it.
"""

from __future__ import annotations

import signal
import threading
import time
import zlib

from .errors import Divergence, TracevisorError
from .interrupts import event_in_delivery
from .kvm import uapi as U
from .status import StopReason

SLICE_EXITS = 2000
QUANTUM_S = 0.005
SEEK_LIMIT_S = 60.0  # replay: host time after which a recorded point not reached is a divergence
BLOCKED_S = 0.0005  # record: an interrupt waiting this long for interrupts to be enabled gets a kick point
EXIT_GRACE_S = 0.002  # record: a holder that made an exit this recently gets its switch/timer point at the next exit
SYNC_REGS = slice(304, 304 + 144)
RIP_OFFSET = 432
DR_SLOT = 3  # DR0–DR2 are left to the debug-register fallback of ndinsn


def digest(mm) -> int:
    """CRC-32 of the 144-byte struct kvm_regs in the kvm_run page (the trace format's register digest)."""
    return zlib.crc32(mm[SYNC_REGS])


class Scheduler:
    """The token and the schedule of one VM (record: writes it; replay: follows it)."""

    def __init__(self, machine, schedule: list[dict] | None = None) -> None:
        self.m = machine
        self.recording = schedule is None
        self.schedule = schedule or []
        self.i = 0  # replay: the next schedule entry
        self.cond = threading.Condition(threading.RLock())
        self.holder = 0
        self.count = 0  # exits of the holder in the current slice
        self.since = time.monotonic()
        self.slice_since = self.since  # record: when the holder got the token (timer points do not move it)
        self.last_exit = self.since  # record: host time of the holder's latest exit
        self.at_exit: str | None = None  # record: a switch or timer point to take at the holder's next exit
        self.kick_pending = False
        self.seek_started = 0.0
        self.seeking: tuple[int, int] | None = None  # replay: (rip, digest) of the kick point sought
        self.armed = False
        self.stepping = False
        self.switches = 0
        self.hits = 0  # replay: breakpoint hits at the sought point's RIP (matching or not) in this seek
        self.irq = getattr(machine, "irq", None)  # exact mode's user-space interrupts (timer points)
        self.kick_why: str | None = None  # record: why the pending kick was sent ("kick" or "timer")
        self.timer_points = 0
        self.pending_point: int | None = None  # record: a timer kick's RIP, armed in DR3 (hit at once)
        self.point_why = "timer"

        self._timer: threading.Thread | None = None
        self.tracker = None  # the dirty-page log (memory digests of the points), from start()
        self.consumer = 0
        self.slice_pages: set[int] = set()  # pages written since the last point
        self.ambiguous = 0  # replay: hits with the recorded registers but not the recorded memory (all seeks)
        self.seek_ambiguous = 0  # … in the current seek
        self.sought = 0  # replay: points found by RIP, registers and memory
        self.mem_compared = 0  # replay: points whose memory digest was compared
        self._base_debug: list[int] = [0] * 8
        self._base_control = 0

    # -- the vCPU threads' side ----------------------------------------------------------------------
    def start(self) -> None:
        if self.m.ndi is not None and self.m.ndi.debug_sites:
            self._base_debug = self.m.ndi.debug_registers()
            self._base_control = U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_USE_HW_BP
        from .checkpoint import DirtyTracker

        self.tracker = DirtyTracker.of(self.m)
        self.consumer = self.tracker.subscribe()
        self._new_slice()
        self.since = time.monotonic()
        if not self.recording:
            self._check_entry()
        self._timer = threading.Thread(target=self._tick, name="sched", daemon=True)
        self._timer.start()

    def wait_turn(self, v) -> bool:
        """Block until ``v`` holds the token; False when the VM is stopping."""
        if self.holder == v.cpu:
            if self.armed is False and self.seeking is not None:
                self._arm(v, True)
            return True
        stopping = self.m._stopping
        with self.cond:
            while self.holder != v.cpu:
                if stopping.is_set():
                    return False
                self.cond.wait(0.05)
        # Time spent waiting for the token is not time spent spinning with interrupts off: the spin
        # watchdog's clock starts again when this vCPU next runs without an exit.
        v.spin_since = None
        if self.seeking is not None:
            self._arm(v, True)
        return not stopping.is_set()

    def after_exit(self, v, reason: int) -> None:
        """Count an exit of the holder; pass the token at a slice end."""
        self.count += 1
        if self.recording:
            self.last_exit = time.monotonic()
            if self.pending_point is not None:  # an exit instead of the breakpoint: no point; kicked again later
                self.pending_point = None
                self._arm(v, False)
            due, self.at_exit = self.at_exit, None
            if reason == U.KVM_EXIT_HLT or self.count >= SLICE_EXITS or due == "kick":
                self._switch(v, "hlt" if reason == U.KVM_EXIT_HLT else "slice")
            elif due == "timer":
                self._timer_point(v, None, None, "timer")
        else:
            if self.seeking is not None:
                e = self.schedule[self.i]
                raise Divergence(f"vCPU {self.holder} made an exit while running towards the recorded {e.get('why')} "
                                 f"point (rip {self.seeking[0]:#x}, register digest {self.seeking[1]:#010x}), which the "
                                 f"recording reached before that exit ({self.hits} breakpoint hits at that rip, none "
                                 f"with the recorded registers and memory; {self.seek_ambiguous} with the registers only)",
                                 kind="sched", seq=e.get("seq"))
            self._check_entry()

    def on_interrupted(self, v) -> None:
        """KVM_RUN returned EINTR: a scheduler kick ends the slice (record), or a halted vCPU may be at the
        sought point (replay)."""
        if not self.kick_pending or self.holder != v.cpu:
            return
        self.kick_pending = False
        mm = v.vcpu.run_mmap
        rip = int.from_bytes(mm[RIP_OFFSET:RIP_OFFSET + 8], "little")
        if self.recording:
            if self.kick_why in ("timer", "irq"):
                if not self._undelivered(v):
                    # (an interrupt injected but not yet delivered would run before the instruction at rip:
                    # the point is taken at the next kick instead.)  The point is taken at the breakpoint
                    # hit DR3 gives at once on the current instruction — the way a replay reaches it, so
                    # that KVM sees the same sequence (a debug exit, then the interrupt) in both.
                    self.pending_point = rip
                    self.point_why = self.kick_why
                    self._arm(v, True, rip)
                return
            if self._undelivered(v):
                # KVM returned before entering the guest with an interrupt or exception just injected: a point
                # here would come before its delivery, which a replay cannot stop in front of.  The next kick
                # switches.
                return
            self._switch(v, "kick", rip, digest(mm))
        elif self.seeking is not None and (rip, digest(mm)) == self.seeking and self._sought_memory_matches():
            self._reached(v)

    @staticmethod
    def _undelivered(v) -> bool:
        """Is an event injected before this KVM_RUN — an interrupt, or an exception from the instruction
        fallback (#NM, #PF …) — still waiting for delivery (KVM returned without entering the guest)?
        Once the guest ran, KVM delivered it."""
        if event_in_delivery(bytes(v.vcpu.get_vcpu_events().raw)):
            return True
        v.irq_queued = False
        return False

    def on_unemulated(self, v, rip: int) -> bool:
        """Replay: KVM could not emulate the instruction at ``rip`` (an INTERNAL_ERROR exit, before the
        fallback runs it).  A recorded point at that instruction is reached here — on this host a hardware
        breakpoint does not fire on an instruction KVM fails to emulate.  True if it was the point (the
        run loop then re-enters without running the fallback: the exit comes again, as in the recording)."""
        if self.recording or self.seeking is None or rip != self.seeking[0]:
            return False
        self.hits += 1
        if digest(v.vcpu.run_mmap) == self.seeking[1] and self._sought_memory_matches():
            self._reached(v)
            return True
        return False

    def on_debug(self, v, pc: int) -> bool:
        """A breakpoint or single-step exit: True if it was the scheduler's (the run loop then continues)."""
        if self.recording:
            if self.pending_point is None or pc != self.pending_point:
                return False
            self.pending_point = None
            self._arm(v, False)
            self._timer_point(v, pc, digest(v.vcpu.run_mmap), self.point_why)
            return True
        if self.stepping:  # stepped over a non-matching hit: put the breakpoint back
            self.stepping = False
            self._arm(v, self.seeking is not None)
            v.eintr = True  # the seek's own exit, not one of the recording: no interrupt is injected after it
            return True
        if self.seeking is None or pc != self.seeking[0] or not self.armed:
            return False
        self.hits += 1
        if digest(v.vcpu.run_mmap) == self.seeking[1] and self._sought_memory_matches():
            self._reached(v)
        else:  # the right place at another time: execute this one instruction without the breakpoint
            v.vcpu.set_guest_debug(self._base_control | U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_SINGLESTEP,
                                   self._base_debug)
            self.stepping = True
            v.eintr = True
        return True

    # -- internals ---------------------------------------------------------------------------------
    def _pick(self, cpu: int) -> int:
        vs = self.m.vcpus
        now = time.monotonic() - self.m.started_at
        irq = self.irq
        for k in range(1, len(vs) + 1):
            c = (cpu + k) % len(vs)
            v = vs[c]
            if c != cpu and not v.finished and now >= c * self.m.config.stagger_s and (irq is None or irq.runnable(c)):
                return c
        if irq is not None and not irq.runnable(cpu):
            # everyone is halted: the vCPU whose timer expires first wakes first (virtual time jumps there)
            waking = [(irq.deadline_for(c), c) for c, v in enumerate(vs)
                      if not v.finished and now >= c * self.m.config.stagger_s and irq.deadline_for(c) is not None]
            if waking:
                return min(waking)[1]
        return cpu

    def mem_digest(self) -> int:
        """CRC-32 over (page number, contents) of every page written since the last point — by KVM (the
        dirty log) or by the host — in page order.  Only the holder ran meanwhile, so the same slice
        replayed writes the same pages with the same bytes."""
        self.slice_pages |= self.tracker.take(self.consumer)
        mv = self.m.memory._mv
        crc = 0
        for p in sorted(self.slice_pages):
            crc = zlib.crc32(mv[p << 12:(p + 1) << 12], zlib.crc32(p.to_bytes(4, "little"), crc))
        return crc

    def _new_slice(self, digested: bool = False) -> None:
        """A point was taken: the next memory digest covers the pages written from here on.  ``digested``:
        :meth:`mem_digest` has just read the dirty log at this point (no second KVM_GET_DIRTY_LOG)."""
        if self.tracker is not None and not digested:
            self.tracker.take(self.consumer)
        self.slice_pages = set()

    def _check_memory(self, e: dict) -> bool:
        """Replay: does the memory written since the last point match the recorded point's digest
        (True for a point recorded without one)?"""
        want = e.get("mdigest")
        if want is None:
            return True
        return self.mem_digest() == want

    def _switch(self, v, why: str, rip: int | None = None, dig: int | None = None) -> None:
        nxt = self._pick(v.cpu)
        if nxt == v.cpu:
            self.slice_since = time.monotonic()  # nobody else can run: a new quantum of the same slice
            return  # (no event, so replay counts on too)
        fields = {"n": self.count, "next": nxt, "why": why}
        if rip is not None:
            fields |= {"rip": rip, "digest": dig}
        fields["mdigest"] = self.mem_digest()
        if self.m.sink is not None:
            self.m.sink.event("sched", v.cpu, self.m.clock.now(), **fields)
        self._new_slice(digested=True)
        self._give(nxt)

    def _timer_point(self, v, rip: int | None, dig: int | None, why: str) -> None:
        """Record: a timer of ``v`` falls due here (``timer``: virtual time jumps to its deadline), or an
        interrupt that waited for interrupts to be enabled is offered again (``irq``)."""
        fields = {"n": self.count, "next": v.cpu, "why": why}
        if rip is not None:  # a kicked point; without: at the exit that ends the count
            fields |= {"rip": rip, "digest": dig}
        fields["mdigest"] = self.mem_digest()
        if self.m.sink is not None:
            self.m.sink.event("sched", v.cpu, self.m.clock.now(), **fields)
        self._new_slice(digested=True)
        self.timer_points += 1
        self.count = 0
        self.since = time.monotonic()
        if why == "timer":
            self.irq.timer_kick(v.cpu)
        elif self.irq.blocked[v.cpu]:
            self.irq.blocked[v.cpu] = time.monotonic()  # still blocked after this point: wait again

    def _give(self, nxt: int) -> None:
        with self.cond:
            self.holder = nxt
            # The new holder resumes at a recorded switch point: interrupts may be injected at its next entry.
            # (Set here, not when its thread wakes: whether that thread was already waiting is a matter of
            # host timing, and the decision must be the same in the replay.)
            self.m.vcpus[nxt].eintr = False
            self.count = 0
            self.since = self.slice_since = self.last_exit = time.monotonic()
            self.at_exit = None
            self.switches += 1
            if not self.recording:
                self._check_entry()  # the new holder's slice may end before its first exit
            self.cond.notify_all()

    def _check_entry(self) -> None:
        """Replay: has the holder reached the end of its recorded slice?"""
        while self.i < len(self.schedule) and self.seeking is None:
            e = self.schedule[self.i]
            if e["cpu"] != self.holder:
                raise Divergence(f"the recorded schedule gives vCPU {e['cpu']} the next slice, but vCPU "
                                 f"{self.holder} holds the token", kind="sched", seq=e.get("seq"))
            if self.count < e["n"]:
                return
            if self.count > e["n"]:
                raise Divergence(f"vCPU {self.holder} made more exits ({self.count}) than in its recorded "
                                 f"slice ({e['n']})", kind="sched", seq=e.get("seq"))
            if e.get("why") in ("kick", "timer", "irq") and e.get("rip") is not None:
                self.seeking = (int(e["rip"]), int(e["digest"]))
                self.since = self.seek_started = time.monotonic()
                self.hits = self.seek_ambiguous = 0
                return
            if not self._check_memory(e):
                raise Divergence(f"the memory vCPU {self.holder} wrote in its slice differs from the recording's at "
                                 f"the recorded {e.get('why')} point after {e['n']} exits", kind="sched",
                                 seq=e.get("seq"))
            self.mem_compared += "mdigest" in e
            self._new_slice(digested="mdigest" in e)
            self.i += 1
            if e.get("why") in ("timer", "irq"):
                self._replay_timer(e)
                continue
            self._give(int(e["next"]))

    def _reached(self, v) -> None:
        e = self.schedule[self.i]
        # At the recorded point: its interrupt (a timer or irq point) is injected at the next entry, as in
        # the recording — also when the point was found at a kick's EINTR rather than at a breakpoint hit.
        v.eintr = False
        self.sought += 1
        self.mem_compared += "mdigest" in e
        self._new_slice(digested="mdigest" in e)  # (the match compared it)
        self.seeking = None
        self._arm(v, False)
        self.i += 1
        if e.get("why") in ("timer", "irq"):
            self._replay_timer(e)
            self._check_entry()
            return
        self._give(int(e["next"]))

    def _sought_memory_matches(self) -> bool:
        """Replay, at a hit with the recorded RIP and registers: is memory the recorded memory too?  A hit
        that has the registers but not the memory is a loop that repeats its registers while memory
        changes — the recorded point is a later pass: counted as ambiguous and stepped over."""
        if self._check_memory(self.schedule[self.i]):
            return True
        self.ambiguous += 1
        self.seek_ambiguous += 1
        return False

    def _replay_timer(self, e: dict) -> None:
        if self.irq is None:
            raise Divergence("the recording has timer points but this replay has no user-space interrupt "
                             "controller", kind="sched", seq=e.get("seq"))
        self.timer_points += 1
        self.count = 0
        self.since = time.monotonic()
        if e.get("why") == "timer":
            self.irq.timer_kick(self.holder)

    def _arm(self, v, on: bool, rip: int | None = None) -> None:
        regs = list(self._base_debug)
        control = self._base_control
        if on:
            regs[DR_SLOT] = self.seeking[0] if rip is None else rip
            regs[7] |= 1 << (2 * DR_SLOT)
            control = U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_USE_HW_BP
        v.vcpu.set_guest_debug(control, regs)
        self.armed = on

    def _tick(self) -> None:
        """Kick a holder that has run QUANTUM_S without a switch point or whose timer is due (record), or
        that may sit halted at the sought point (replay)."""
        stopping = self.m._stopping
        wait = QUANTUM_S / 2
        several = len(self.m.vcpus) > 1
        while not stopping.wait(wait):
            wait = QUANTUM_S / 2
            if self.kick_pending:
                continue
            now = time.monotonic()
            why = None
            if self.recording:
                # A holder past its quantum is switched first: timer and irq points do not extend its
                # slice (a vCPU spinning with interrupts off on a lock another vCPU holds would otherwise
                # get one irq point after another and never let the owner run).
                if several and now - self.slice_since >= QUANTUM_S and self.pending_point is None:
                    why = "kick"
                elif self.irq is not None and self.pending_point is None:
                    due = self.irq.host_due(self.holder)
                    blocked = self.irq.blocked[self.holder]
                    if blocked and now - blocked >= BLOCKED_S:
                        why = "irq"
                    elif due is not None:
                        if now >= due:
                            why = "timer"
                        else:
                            wait = min(wait, max(due - now, 0.0001))
                    if blocked and why is None:
                        wait = min(wait, BLOCKED_S)
            elif self.seeking is not None and now - self.since >= QUANTUM_S:
                why = "seek"
                if now - self.seek_started > SEEK_LIMIT_S:  # a point that never comes: say so, do not spin
                    v = self.m.vcpus[self.holder]
                    v.stop_request = (StopReason.DIVERGED, f"replay diverged on vCPU {self.holder}: the recorded "
                                      f"{self.schedule[self.i].get('why')} point (rip {self.seeking[0]:#x}, digest "
                                      f"{self.seeking[1]:#010x}) was not reached in {SEEK_LIMIT_S:g} s "
                                      f"({self.hits} breakpoint hits at that rip: none with the recorded registers and "
                                      "memory)")
            if why is None:
                continue
            if self.recording and now - self.last_exit < EXIT_GRACE_S:
                # The holder is making exits: take the switch or timer point at its next exit, a point the
                # replay reaches by counting exits, instead of kicking it to an instruction that only a RIP
                # and register digest identify.  (An interrupt waiting for interrupts to be enabled needs
                # nothing: every exit offers it again.)  No exit within the grace time: kick below.
                if why in ("kick", "timer") and self.at_exit != "kick":
                    self.at_exit = why
                wait = min(wait, EXIT_GRACE_S)
                continue
            v = self.m.vcpus[self.holder]
            if v.thread is None or not v.running:
                continue
            self.at_exit = None
            self.kick_why = why
            self.kick_pending = True
            self.since = time.monotonic()
            v.vcpu.run.immediate_exit = 1
            try:
                signal.pthread_kill(v.thread.ident, self.m.kick_signal)
            except (ProcessLookupError, OSError, TypeError):
                pass

    def leftover(self) -> int:
        return len(self.schedule) - self.i


def load_schedule(path: str) -> list[dict]:
    """Every ``sched`` event of a trace, in order (a replay follows them)."""
    from .trace import open_trace

    reader = open_trace(path)
    try:
        out = []
        for ev in reader.events(kinds=["sched"]):
            if not isinstance(ev.get("n"), int) or not isinstance(ev.get("next"), int):
                raise TracevisorError(f"{path}: malformed sched event #{ev.get('seq')}")
            out.append(ev)
        return out
    finally:
        reader.close()
