"""A local APIC in user space, on virtual time: what exact mode gives the guest instead of KVM's.

KVM's in-kernel LAPIC fires its timer on host time, so the instruction an interrupt lands on differs from
run to run.  Exact recordings therefore run without an in-kernel irqchip: the LAPIC page (0xFEE00000)
exits as MMIO, x2APIC MSRs exit as MSR accesses (KVM_CAP_X86_USER_SPACE_MSR), and this model answers
them.  It is a pure function of the accesses and of the virtual time ``now`` (ns) passed in — no host
clock, no KVM — so a replay that makes the same accesses at the same virtual times sees the same
registers and the same interrupts (:mod:`tracevisor.interrupts` decides when they are injected).

What it models: ID, version, TPR/PPR, EOI, LDR/DFR (stored), SVR (software enable), ISR/TMR/IRR, ESR,
the ICR (fixed IPIs with or without a shorthand; INIT/SIPI/NMI are reported as unsupported), every LVT
(stored; the timer's is live), the timer in one-shot, periodic and TSC-deadline mode (initial/current
count, divide configuration), the x2APIC self-IPI.  The timer counts at 1 GHz before the divider, as KVM's
in-kernel LAPIC does (a count of 1000 with divide-by-1 is 1 µs).
"""

from __future__ import annotations

from dataclasses import dataclass

BASE_GPA = 0xFEE0_0000
PAGE = 0x1000
X2APIC_MSR_BASE = 0x800
X2APIC_MSR_END = 0x900
MSR_TSC_DEADLINE = 0x6E0
VERSION = 0x0005_0014  # version 0x14, 6 LVT entries (max LVT index 5)

# register offsets (xAPIC); the x2APIC MSR is 0x800 + offset / 16
ID, VER, TPR, APR, PPR, EOI, RRD, LDR, DFR, SVR = 0x20, 0x30, 0x80, 0x90, 0xA0, 0xB0, 0xC0, 0xD0, 0xE0, 0xF0
ISR0, TMR0, IRR0, ESR, LVT_CMCI, ICR_LO, ICR_HI = 0x100, 0x180, 0x200, 0x280, 0x2F0, 0x300, 0x310
LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
TIMER_INIT, TIMER_CUR, TIMER_DIV, SELF_IPI = 0x380, 0x390, 0x3E0, 0x3F0
LVTS = (LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR)

MASKED = 1 << 16
TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2


@dataclass(frozen=True)
class Ipi:
    """An interrupt one LAPIC sends (an ICR write): ``dest`` is an APIC ID, or None with a shorthand."""

    vector: int
    mode: int  # delivery mode: 0 fixed, 4 NMI, 5 INIT, 6 SIPI, ...
    dest: int | None
    shorthand: int  # 0 none, 1 self, 2 all including self, 3 all excluding self


def divisor(dcr: int) -> int:
    """The timer divider of a divide-configuration value (bits 0, 1 and 3)."""
    v = (dcr & 3) | ((dcr & 8) >> 1)
    return 1 if v == 7 else 2 << v


class Lapic:
    """One vCPU's local APIC.  ``now`` arguments are virtual ns; ``tsc`` maps them to the guest's TSC
    (TSC-deadline mode) as ``(vtime_ref, tsc_ref, tsc_khz)``."""

    def __init__(self, apic_id: int) -> None:
        self.id = apic_id
        self.x2apic = False
        self.regs: dict[int, int] = {TPR: 0, LDR: 0, DFR: 0xFFFF_FFFF, SVR: 0xFF, ESR: 0, ICR_LO: 0, ICR_HI: 0,
                                     TIMER_INIT: 0, TIMER_DIV: 0}
        for r in LVTS:
            self.regs[r] = MASKED
        self.irr = 0  # 256-bit vectors
        self.isr = 0
        self.tmr = 0
        self.deadline: int | None = None  # virtual ns of the next timer expiry
        self.period = 0  # periodic mode: ns per period
        self.tsc_deadline = 0
        self.fired = 0  # timer expiries so far
        self.unsupported: list[str] = []  # what the guest asked that this model does not do (reported once each)

    # -- state ---------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return bool(self.regs[SVR] & 0x100)

    def timer_mode(self) -> int:
        return (self.regs[LVT_TIMER] >> 17) & 3

    def ppr(self) -> int:
        isr_class = (self.isr.bit_length() - 1) & 0xF0 if self.isr else 0
        tpr = self.regs[TPR] & 0xFF
        return tpr if (tpr & 0xF0) >= isr_class else isr_class

    def pending(self) -> int | None:
        """The vector the LAPIC would deliver now (highest IRR above the processor priority), or None."""
        if not self.irr:
            return None
        vec = self.irr.bit_length() - 1
        return vec if (vec & 0xF0) > (self.ppr() & 0xF0) else None

    def accept(self, vector: int) -> None:
        """A fixed interrupt arrives (timer, IPI): IRR bit set (vectors 0–15 are illegal: ESR bit 6)."""
        if vector < 16:
            self.regs[ESR] |= 1 << 6
            return
        self.irr |= 1 << vector

    def ack(self, vector: int) -> None:
        """The CPU took ``vector``: IRR → ISR."""
        self.irr &= ~(1 << vector)
        self.isr |= 1 << vector

    def eoi(self) -> None:
        if self.isr:
            self.isr &= ~(1 << (self.isr.bit_length() - 1))

    # -- the timer -----------------------------------------------------------------------------------------
    def next_deadline(self) -> int | None:
        return self.deadline

    def expire(self, now: int) -> bool:
        """Fire the timer if its deadline has passed at ``now``; True if it fired.  A periodic timer that
        missed several periods (virtual time jumped) fires once and re-arms after ``now``, like hardware
        that cannot queue more than one interrupt per vector."""
        if self.deadline is None or now < self.deadline:
            return False
        self.fired += 1
        lvt = self.regs[LVT_TIMER]
        if not lvt & MASKED:
            self.accept(lvt & 0xFF)
        if self.timer_mode() == TIMER_PERIODIC and self.period > 0:
            missed = (now - self.deadline) // self.period + 1
            self.deadline += missed * self.period
        else:
            self.deadline = None
            self.tsc_deadline = 0
        return True

    def _start(self, now: int) -> None:
        init = self.regs[TIMER_INIT]
        mode = self.timer_mode()
        if mode == TIMER_TSC_DEADLINE:
            return
        if init == 0:
            self.deadline = None
            self.period = 0
            return
        self.period = init * divisor(self.regs[TIMER_DIV])
        self.deadline = now + self.period

    def current_count(self, now: int) -> int:
        if self.deadline is None or self.timer_mode() == TIMER_TSC_DEADLINE:
            return 0
        return max(0, (self.deadline - now) // divisor(self.regs[TIMER_DIV]))

    def set_tsc_deadline(self, value: int, now: int, tsc: tuple[int, int, int]) -> None:
        """IA32_TSC_DEADLINE written: arm (in TSC-deadline mode) at the virtual time the guest's TSC reaches
        ``value``; 0 disarms."""
        self.tsc_deadline = value
        if self.timer_mode() != TIMER_TSC_DEADLINE:
            return
        if value == 0:
            self.deadline = None
            return
        vt_ref, tsc_ref, khz = tsc
        delta = value - tsc_ref
        self.deadline = max(now, vt_ref + (delta * 1_000_000 // khz if khz else 0))

    # -- register accesses -----------------------------------------------------------------------------------
    def read(self, off: int, now: int) -> int:
        """A 32-bit register read (xAPIC offset; x2APIC callers convert the MSR)."""
        if off == ID:
            return self.id if self.x2apic else (self.id & 0xFF) << 24
        if off == VER:
            return VERSION
        if off == PPR:
            return self.ppr()
        if off == TIMER_CUR:
            return self.current_count(now)
        if ISR0 <= off < ISR0 + 0x80 and off % 16 == 0:
            return (self.isr >> ((off - ISR0) * 2)) & 0xFFFF_FFFF
        if TMR0 <= off < TMR0 + 0x80 and off % 16 == 0:
            return (self.tmr >> ((off - TMR0) * 2)) & 0xFFFF_FFFF
        if IRR0 <= off < IRR0 + 0x80 and off % 16 == 0:
            return (self.irr >> ((off - IRR0) * 2)) & 0xFFFF_FFFF
        if off == LDR and self.x2apic:
            return ((self.id >> 4) << 16) | (1 << (self.id & 0xF))
        return self.regs.get(off, 0)

    def write(self, off: int, value: int, now: int) -> Ipi | None:
        """A 32-bit register write; returns the IPI an ICR write sends (the caller delivers it)."""
        value &= 0xFFFF_FFFF
        if off == EOI:
            self.eoi()
        elif off == TPR:
            self.regs[TPR] = value & 0xFF
        elif off == SVR:
            self.regs[SVR] = value & 0x13FF
            if not value & 0x100:  # software disable masks every LVT
                for r in LVTS:
                    self.regs[r] |= MASKED
        elif off in LVTS:
            keep = 0x700FF if off == LVT_TIMER else 0x1A7FF
            if not self.enabled:
                value |= MASKED
            old_mode = self.timer_mode()
            self.regs[off] = value & keep
            if off == LVT_TIMER and self.timer_mode() != old_mode:
                self.deadline = None  # a mode change stops the timer (SDM 10.5.4.1)
                self.tsc_deadline = 0
        elif off == TIMER_INIT:
            self.regs[TIMER_INIT] = value
            self._start(now)
        elif off == TIMER_DIV:
            self.regs[TIMER_DIV] = value & 0xB
        elif off == ESR:
            self.regs[ESR] = 0
        elif off in (LDR, DFR) and not self.x2apic:
            self.regs[off] = value
        elif off == ICR_HI:
            self.regs[ICR_HI] = value
        elif off == ICR_LO:
            self.regs[ICR_LO] = value & ~(1 << 12)  # delivery status: always idle
            dest = value >> 32 if self.x2apic else self.regs[ICR_HI] >> 24
            return Ipi(value & 0xFF, (value >> 8) & 7, dest, (value >> 18) & 3)
        elif off == SELF_IPI and self.x2apic:
            return Ipi(value & 0xFF, 0, None, 1)
        return None

    def write_icr64(self, value: int) -> Ipi:
        """x2APIC ICR (MSR 0x830): one 64-bit write, the destination in the high half."""
        self.regs[ICR_HI] = value >> 32
        lo = value & 0xFFFF_FFFF
        self.regs[ICR_LO] = lo & ~(1 << 12)
        return Ipi(lo & 0xFF, (lo >> 8) & 7, value >> 32, (lo >> 18) & 3)

    def state(self) -> dict:
        """Everything the model holds (checkpoints, reports, tests)."""
        return {"id": self.id, "x2apic": self.x2apic, "regs": dict(self.regs), "irr": self.irr, "isr": self.isr,
                "tmr": self.tmr, "deadline": self.deadline, "period": self.period, "tsc_deadline": self.tsc_deadline,
                "fired": self.fired}

    def restore(self, st: dict) -> None:
        self.id, self.x2apic = st["id"], st["x2apic"]
        self.regs = {int(k): v for k, v in st["regs"].items()}
        self.irr, self.isr, self.tmr = st["irr"], st["isr"], st["tmr"]
        self.deadline, self.period, self.tsc_deadline, self.fired = (st["deadline"], st["period"],
                                                                     st["tsc_deadline"], st["fired"])
