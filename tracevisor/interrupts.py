"""Interrupts at reproducible points: exact mode's user-space interrupt path on a virtual clock.

An exact recording runs without an in-kernel irqchip.  The LAPIC of every vCPU (:mod:`tracevisor.apic`)
and, with ``--pit``, the PIT and PIC (:mod:`tracevisor.pit`) are models in user space whose only notion
of time is the **virtual clock** ``vt`` (ns) kept here:

* every exit of the running vCPU advances it by :data:`EXIT_NS` (about what one exit costs on the
  development hosts, so a guest that makes exits sees time pass roughly as fast as on the host);
* a HLT (interrupts enabled) with nothing pending jumps it to the next timer deadline of that vCPU — a
  halted guest wakes at once instead of sleeping;
* a **timer kick** jumps it to the deadline: a tick that falls due while the vCPU runs a stretch
  without exits (measured in host time) makes the recorder kick the vCPU out of KVM_RUN and record the
  point as the vCPU's exit count, RIP and register digest (a ``sched`` event with ``why="timer"``,
  :mod:`tracevisor.sched`).  Replay stops at that RIP with a DR3 breakpoint and jumps there.

Nothing else moves ``vt``, so given the same exits and the same recorded kick points a replay computes
the same virtual times, the same timer expiries and the same register values (current count, PIT
latch).  Interrupts are injected only **between exits**: before the vCPU re-enters, the highest pending
vector is injected with KVM_INTERRUPT when the vCPU can take it (:func:`can_take_interrupt`: RFLAGS.IF,
no interrupt shadow, no event being delivered — read from the vCPU's state, not from
``kvm_run.ready_for_interrupt_injection``, which on this host can be stale after a kick).  When it
cannot (interrupts off), no interrupt window is requested — on this host the IRQ_WINDOW_OPEN exit
arrives at different instructions from run to run — the interrupt waits for the next exit with
interrupts on, or the recorder kicks the vCPU and records that point (``why="irq"``).  Each injection is an ``irq``
event — vector, the vCPU's exit count, the virtual time — which the replay's checker compares like any
exit, so an interrupt at another point is a divergence at that point.

x2APIC registers arrive as MSR exits (KVM_CAP_X86_USER_SPACE_MSR, reason INVAL: without an in-kernel
LAPIC, KVM fails every x2APIC MSR); IA32_TSC_DEADLINE is filtered to user space
(KVM_X86_SET_MSR_FILTER).  The guest's TSC, in exact mode, is what the recorded RDTSC answers say; a
TSC deadline is converted to virtual time from the vCPU's last answer and the recorded TSC rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from . import apic as A
from .kvm import uapi as U
from .pit import PIC_PORTS, PIT_PORTS, Pic, Pit

EXIT_NS = 10_000  # virtual time one exit takes
_RFLAGS_IF = 0x200


def can_take_interrupt(v) -> bool:
    """May an external interrupt be injected into ``v`` now: RFLAGS.IF set, no STI/MOV-SS shadow, and no
    exception, interrupt or NMI already being delivered?  Read from the vCPU itself: registers handed to
    KVM through sync regs and not yet applied count (``v.pending_regs``), else KVM_GET_REGS; the shadow
    and pending events come from KVM_GET_VCPU_EVENTS.  Called only when an interrupt is pending."""
    vc = v.vcpu
    pending = getattr(v, "pending_regs", None)
    if pending is not None and vc.run.kvm_dirty_regs & U.KVM_SYNC_X86_REGS:
        rflags = pending[17]
    else:
        rflags = vc.get_regs().rflags
    if not rflags & _RFLAGS_IF:
        return False
    raw = bytes(vc.get_vcpu_events().raw)
    return not (event_in_delivery(raw) or raw[11])  # interrupt.shadow


def event_in_delivery(raw: bytes) -> bool:
    """In a struct kvm_vcpu_events: is an exception (injected or pending), an interrupt or an NMI waiting
    to be delivered at the vCPU's next entry?"""
    return bool(raw[0] or raw[3] or raw[8] or raw[12])


class Interrupts:
    """The user-space interrupt controllers of one VM and the virtual clock they run on."""

    def __init__(self, cpus: int, *, pit: bool = False, tsc_khz: int = 0,
                 log: Callable[[str], None] | None = None) -> None:
        self.vt = 0
        self.cpus = cpus
        self.lapics = [A.Lapic(i) for i in range(cpus)]
        self.halted = [False] * cpus
        self.parked = [False] * cpus
        self.blocked = [0.0] * cpus  # host time since an interrupt waits for interrupts to be enabled (0: none)
        self.exits = [0] * cpus
        self.tsc = [(0, 0)] * cpus  # per vCPU: (vt, TSC) of its last recorded RDTSC answer
        self.tsc_khz = tsc_khz
        self.pit = Pit() if pit else None
        # The 8259 pair is always there, as on any PC (and in KVM's in-kernel irqchip): kernels remap and mask
        # it at boot even when they never use it.  Only the PIT needs --pit.
        self.pic = Pic()
        self.pic2 = Pic()
        self.host_mark = time.monotonic()  # host time of the last exit (record: when is a tick due?)
        self.next_due: int | None = None  # the earliest deadline of all timers (cache)
        self.injected = 0
        self.sink = None
        self.clock = None
        self.log = log or (lambda msg: None)
        self._noted: set[str] = set()

    def bind(self, sink, clock) -> None:
        self.sink = sink
        self.clock = clock

    def header(self) -> dict:
        """The trace header's ``interrupts``: what a replay must build again."""
        return {"model": "user", "exit_ns": EXIT_NS, "pit": self.pit is not None, "tsc_khz": self.tsc_khz}

    def note(self, what: str) -> None:
        if what not in self._noted:
            self._noted.add(what)
            self.log(what)

    # -- time ----------------------------------------------------------------------------------------------
    def _refresh_due(self) -> None:
        ds = [lap.deadline for lap in self.lapics if lap.deadline is not None]
        if self.pit is not None and self.pit.deadline is not None:
            ds.append(self.pit.deadline)
        self.next_due = min(ds) if ds else None

    def expire(self) -> None:
        """Fire every timer whose deadline ``vt`` has reached."""
        vt = self.vt
        for lap in self.lapics:
            lap.expire(vt)
        if self.pit is not None and self.pit.expire(vt):
            self.pic.raise_irq(0)
        self._refresh_due()

    def deadline_for(self, cpu: int) -> int | None:
        """The next virtual time a timer can interrupt ``cpu`` (the PIT goes to vCPU 0)."""
        if self.parked[cpu]:
            return None
        d = self.lapics[cpu].deadline
        if cpu == 0 and self.pit is not None and self.pit.deadline is not None and \
                (d is None or self.pit.deadline < d):
            d = self.pit.deadline
        return d

    def host_due(self, cpu: int) -> float | None:
        """Recording: the host time at which ``cpu``'s next tick is due if it makes no exit meanwhile
        (virtual time then runs at host speed); None when no timer is armed."""
        d = self.deadline_for(cpu)
        if d is None:
            return None
        return self.host_mark + max(0, d - self.vt) / 1e9

    def timer_kick(self, cpu: int) -> None:
        """A recorded timer point (kick, or the exit it fell on): virtual time jumps to the due deadline."""
        d = self.deadline_for(cpu)
        if d is not None and d > self.vt:
            self.vt = d
        self.expire()

    # -- the run loop's hooks ------------------------------------------------------------------------------
    def after_exit(self, v, reason: int) -> None:
        """Every exit of the running vCPU: virtual time advances; a HLT halts it (in user space: without an
        in-kernel irqchip KVM returns at HLT and the vCPU must not run on until an interrupt comes)."""
        self.vt += EXIT_NS
        self.exits[v.cpu] += 1
        self.host_mark = time.monotonic()
        if reason == U.KVM_EXIT_HLT:
            self.halted[v.cpu] = True
            self.parked[v.cpu] = not v.vcpu.run.if_flag  # hlt after cli: no interrupt can wake it

    def pending(self, cpu: int) -> tuple[int, str] | None:
        vec = self.lapics[cpu].pending()
        if vec is not None:
            return vec, "lapic"
        if cpu == 0 and self.pic is not None:
            vec = self.pic.pending()
            if vec is not None:
                return vec, "pic"
        return None

    def runnable(self, cpu: int) -> bool:
        """Can ``cpu`` run now (not halted, or an interrupt waits for it)?"""
        if not self.halted[cpu]:
            return True
        if self.parked[cpu]:
            return False
        if self.next_due is not None and self.vt >= self.next_due:
            self.expire()
        return self.pending(cpu) is not None

    def enter(self, v) -> str | None:
        """Before ``v`` enters the guest: fire due timers, wake a halted vCPU at its next deadline, inject
        the highest pending interrupt if the guest can take it now.  Returns a hang message when ``v`` is
        halted and nothing can ever wake it."""
        cpu = v.cpu
        if self.next_due is not None and self.vt >= self.next_due:
            self.expire()
        if self.parked[cpu]:
            return (f"vCPU {cpu} halted with interrupts disabled (hlt after cli) and no other vCPU can run: "
                    "the guest can never continue")
        got = self.pending(cpu)
        if got is None and self.halted[cpu]:
            d = self.deadline_for(cpu)
            if d is None:
                return (f"vCPU {cpu} halted with interrupts enabled and no timer armed: in exact mode nothing "
                        "else can wake it")
            self.vt = max(self.vt, d)
            self.expire()
            got = self.pending(cpu)
        if got is None:
            self.blocked[cpu] = 0.0
            return None
        if v.eintr and not self.halted[cpu]:
            # KVM_RUN came back for a signal (a watchdog probe, a kick that switched nothing, a kick whose
            # timer point is taken at the DR3 hit that follows), or for a replay's breakpoint hit on the
            # way to a recorded point: not an exit of the recording, so not a point to inject at — the
            # interrupt waits for the next exit or point.
            return None
        if not can_take_interrupt(v):
            # Interrupts are off (or in a shadow).  No interrupt window is requested: on this host KVM's
            # IRQ_WINDOW_OPEN exit comes at different instructions from run to run.  The interrupt waits for
            # the next exit with interrupts on, or for a point the recorder kicks for it (sched.py, "irq").
            if not self.blocked[cpu]:
                self.blocked[cpu] = time.monotonic()
            return None
        vec, src = got
        v.vcpu.interrupt(vec)
        v.irq_queued = True  # until KVM enters the guest with it
        self.blocked[cpu] = 0.0
        (self.lapics[cpu] if src == "lapic" else self.pic).ack(vec)
        self.halted[cpu] = False
        self.injected += 1
        if self.sink is not None:
            self.sink.event("irq", cpu, self.clock.now(), vector=vec, src=src, n=self.exits[cpu], vt=self.vt)
        return None

    def tsc_seen(self, cpu: int, value: int) -> None:
        """A recorded RDTSC answer on ``cpu``: the anchor of its TSC-deadline conversions."""
        self.tsc[cpu] = (self.vt, value)

    # -- register accesses ---------------------------------------------------------------------------------
    def mmio(self, v, addr: int, write: bool, data: bytes) -> bytes:
        """An access to the LAPIC page (xAPIC); returns the bytes a read sees."""
        lap = self.lapics[v.cpu]
        off = (addr - A.BASE_GPA) & ~0xF
        if write:
            ipi = lap.write(off, int.from_bytes(data[:4].ljust(4, b"\0"), "little"), self.vt)
            self._after_write(v.cpu, ipi)
            return data
        value = lap.read(off, self.vt)
        shift = (addr - A.BASE_GPA) & 3
        return (value >> (8 * shift)).to_bytes(8, "little")[:len(data)]

    def msr(self, v, write: bool, index: int, value: int) -> int | None:
        """An MSR access KVM handed to user space; returns the value read (or 0 for a write), None for #GP."""
        lap = self.lapics[v.cpu]
        if index == A.MSR_TSC_DEADLINE:
            if not write:
                return lap.tsc_deadline
            vt_ref, tsc_ref = self.tsc[v.cpu]
            lap.set_tsc_deadline(value, self.vt, (vt_ref, tsc_ref, self.tsc_khz))
            self._refresh_due()
            return 0
        if not A.X2APIC_MSR_BASE <= index < A.X2APIC_MSR_END:
            return None
        lap.x2apic = True
        off = (index - A.X2APIC_MSR_BASE) << 4
        if not write:
            if off == A.ICR_LO:
                return lap.regs[A.ICR_HI] << 32 | lap.regs[A.ICR_LO]
            return lap.read(off, self.vt)
        ipi = lap.write_icr64(value) if off == A.ICR_LO else lap.write(off, value, self.vt)
        self._after_write(v.cpu, ipi)
        return 0

    def _after_write(self, cpu: int, ipi: A.Ipi | None) -> None:
        self._refresh_due()
        if ipi is not None:
            self._deliver(cpu, ipi)

    def _deliver(self, src: int, ipi: A.Ipi) -> None:
        if ipi.mode != 0:
            name = {4: "NMI", 5: "INIT", 6: "SIPI"}.get(ipi.mode, f"delivery mode {ipi.mode}")
            self.note(f"vCPU {src} sent an {name} IPI: exact mode's user-space LAPIC delivers fixed interrupts "
                      "only; ignored")
            return
        if ipi.shorthand == 1:
            targets = [src]
        elif ipi.shorthand == 2:
            targets = list(range(self.cpus))
        elif ipi.shorthand == 3:
            targets = [c for c in range(self.cpus) if c != src]
        elif ipi.dest in (0xFF, 0xFFFF_FFFF):
            targets = list(range(self.cpus))
        else:
            targets = [c for c, lap in enumerate(self.lapics) if lap.id == ipi.dest]
        for c in targets:
            self.lapics[c].accept(ipi.vector)

    # -- ports: the PIC pair always, the PIT with --pit ------------------------------------------------------
    def register_ports(self, ports) -> None:
        if self.pit is not None:
            ports.register(PIT_PORTS, lambda v, port, size, value: self._pit_write(port, value),
                           lambda v, port, size: self.pit.read(port, self.vt))
        ports.register(PIC_PORTS, lambda v, port, size, value: self._pic(port).write(not port & 1, value),
                       lambda v, port, size: self._pic(port).read(not port & 1))

    def _pic(self, port: int) -> Pic:
        return self.pic if port < 0x80 else self.pic2

    def _pit_write(self, port: int, value: int) -> None:
        self.pit.write(port, value, self.vt)
        self._refresh_due()

    def state(self) -> dict:
        return {"vt": self.vt, "halted": list(self.halted), "exits": list(self.exits), "injected": self.injected,
                "lapics": [lap.state() for lap in self.lapics]}
