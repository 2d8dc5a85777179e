"""gdb over a replay, with reverse execution (``reverse-continue``, ``reverse-stepi`` and what gdb builds
on them).

Forward motion is the live target's (hardware breakpoints, single-step) running a deterministic replay.
Going backwards restores a checkpoint (see tracevisor/checkpoint.py) and re-executes forward:

* a point in the run is named by a coordinate (seq, hits): the last recorded event replayed, and how
  many times execution arrived at a breakpoint address since it (stopped there by a continue, or landed
  there by a step).  The replay is deterministic, so the same breakpoints stop
  at the same coordinates every time;
* ``reverse-continue`` scans forward from the nearest checkpoint before the current point, notes every
  breakpoint stop before it, then re-executes to the last one (falling back to earlier checkpoints when
  a window has none; at the start of the recording it stops with ``replaylog:begin``);
* ``reverse-stepi`` re-executes to the point after the current event and single-steps to one
  instruction before the current register state (for the first instruction after an exit, from the exit
  before that).  A point whose registers repeat exactly between two exits (a spin that changes no
  register) is found at its first occurrence.
"""

from __future__ import annotations

from tracevisor.debugtarget import LiveTarget
from tracevisor.errors import TracevisorError
from tracevisor.gdbstub import SIGTRAP, Stop


class ReplayTarget(LiveTarget):
    """The live target over a replay: forward motion is the Replayer's resume (which replays and takes
    checkpoints); backward motion restores checkpoints."""

    supports_reverse = True

    def __init__(self, replayer, **kw) -> None:
        if not replayer.checkpoint_every:
            raise TracevisorError("reverse debugging needs checkpoints: Replayer(path, checkpoint_every=N)")
        replayer.boot()
        self.r = replayer
        super().__init__(replayer.machine, run_vm=replayer.resume, **kw)
        self._hit_seq = -2
        self._hits = 0
        self._at_hit = False

    # -- coordinates -------------------------------------------------------------------------------
    def _coord(self) -> tuple[int, int]:
        pos = self.r.checker.position
        return (pos, self._hits if self._hit_seq == pos else 0)

    def resume(self, singlestep: bool, skip_at: int | None) -> Stop:
        stop = super().resume(singlestep, skip_at)
        # An arrival at a breakpoint address counts whether a continue stopped there or a step landed
        # there: either way a continue from before would have stopped at this point.
        arrived = stop.reason in ("breakpoint", "watchpoint") or (
            stop.reason == "step" and self.exec_slot_at(self.vcpu.get_regs().rip) is not None)
        if arrived:
            pos = self.r.checker.position
            if pos != self._hit_seq:
                self._hit_seq, self._hits = pos, 0
            self._hits += 1
            self._at_hit = True
        else:
            self._at_hit = False
        return stop

    # -- moving backwards ------------------------------------------------------------------------
    def _restore(self, index: int) -> None:
        self.r.restore_checkpoint(index)
        self.final = None
        self._hit_seq, self._hits, self._at_hit = -2, 0, False

    def _seek_event(self, seq: int) -> None:
        """The point right after recorded event ``seq`` was replayed (no breakpoints armed meanwhile)."""
        self.vcpu.set_guest_debug(0, [0] * 8)
        self._restore(self.r.store.latest_at_or_before(seq))
        if self.r.checker.position < seq:
            self.r.run_to(seq)
        self.final = None
        self._hit_seq, self._hits, self._at_hit = -2, 0, False

    def reverse_continue(self) -> Stop:
        store = self.r.store
        limit, strict = self._coord(), self._at_hit
        i = store.latest_at_or_before(limit[0])
        while i is not None and i >= 0:
            self._restore(i)
            hits = self._scan(limit, strict)
            if hits:
                self._restore(i)
                return self._forward_to(hits[-1])
            if i == 0:
                break
            limit, strict = (store.checkpoints[i].position, 1), True
            i -= 1
        self._restore(0)
        return Stop("step", SIGTRAP, replaylog="begin", message="reached the start of the recording")

    def _scan(self, limit: tuple[int, int], strict: bool) -> list[tuple[int, int]]:
        """Breakpoint stops from here up to ``limit`` (exclusive when ``strict``)."""
        found = []
        checker = self.r.checker
        checker.until = limit[0] + 1
        try:
            while True:
                stop = self.cont()
                if stop.reason not in ("breakpoint", "watchpoint"):
                    return found
                c = self._coord()
                if c > limit or (strict and c == limit):
                    return found
                found.append(c)
                if c == limit:
                    return found
        finally:
            checker.until = None

    def _forward_to(self, target: tuple[int, int]) -> Stop:
        while True:
            stop = self.cont()
            if stop.reason not in ("breakpoint", "watchpoint") or self._coord() >= target:
                return stop

    def reverse_step(self) -> Stop:
        regs = bytes(self.vcpu.get_regs())
        pos = self.r.checker.position
        if pos < 0:
            return Stop("step", SIGTRAP, replaylog="begin")
        self._seek_event(pos)
        n = 0
        while bytes(self.vcpu.get_regs()) != regs:
            stop = self.step()
            n += 1
            if stop.reason != "step" or self.r.checker.position != pos or n > 1_000_000:
                raise TracevisorError("reverse-stepi could not find the current point again")
        if n > 0:
            self._seek_event(pos)
            for _ in range(n - 1):
                self.step()
            return Stop("step", SIGTRAP)
        # The current point is the first instruction after event `pos`: go to the instruction that
        # caused that exit, from the exit before it.
        prev = self.r.exit_before(pos)
        if prev is None:
            self._restore(0)
        else:
            self._seek_event(prev)
        m = 0
        while self.r.checker.position < pos:
            stop = self.step()
            m += 1
            if stop.reason != "step" or m > 1_000_000:
                break
        if prev is None:
            self._restore(0)
        else:
            self._seek_event(prev)
        for _ in range(m - 1):
            self.step()
        return Stop("step", SIGTRAP)
