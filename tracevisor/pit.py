"""The legacy timer path in user space, on virtual time: an 8254 PIT (channel 0) and the 8259 PIC pair.

Exact recordings run ``--pit`` guests without KVM's in-kernel PIT (which counts host time).  Like
:mod:`tracevisor.apic` these are pure models: their inputs are port accesses and the virtual time ``now``
(ns), their output is an interrupt vector for vCPU 0.  Channel 0 counts at 1.193182 MHz in mode 0
(one interrupt at terminal count), 2 (rate generator) or 3 (square wave), and raises IRQ 0 of the master
PIC, whose ICW2 gives the vector.  Channels 1 and 2 store their programming; their counts read back as
loaded (nothing here is wired to them).
"""

from __future__ import annotations

PIT_HZ = 1_193_182
PIT_PORTS = (0x40, 0x41, 0x42, 0x43)
PIC_PORTS = (0x20, 0x21, 0xA0, 0xA1)


def _ns(ticks: int) -> int:
    """PIT input-clock ticks → ns, rounded up (an expiry never comes early)."""
    return -(-ticks * 1_000_000_000 // PIT_HZ)


class Pit:
    """Channel 0 of an 8254 on virtual time."""

    def __init__(self) -> None:
        self.mode = [0, 0, 0]
        self.access = [3, 3, 3]  # 1 lo, 2 hi, 3 lo then hi
        self.reload = [0x10000, 0x10000, 0x10000]
        self.start = [0, 0, 0]  # virtual ns the count was loaded
        self.write_hi = [False] * 3  # lo/hi access: the next write is the high byte
        self.read_hi = [False] * 3
        self.latch: list[int | None] = [None] * 3
        self.partial = [0, 0, 0]
        self.armed = False  # channel 0 counting with its output wired to IRQ 0
        self.loaded = False  # channel 0 has a count since it was last programmed
        self.deadline: int | None = None  # virtual ns of the next IRQ 0
        self.k = 0  # expiries since the load

    def count(self, ch: int, now: int) -> int:
        if ch != 0 or not self.loaded:
            return self.reload[ch] & 0xFFFF
        ticks = (now - self.start[0]) * PIT_HZ // 1_000_000_000
        n = self.reload[0]
        if self.mode[0] in (2, 3):
            return (n - ticks % n) & 0xFFFF
        return max(0, n - ticks) & 0xFFFF

    def _load(self, ch: int, value: int, now: int) -> None:
        self.reload[ch] = value or 0x10000
        if ch != 0:
            return
        self.start[0] = now
        self.k = 0
        self.armed = self.loaded = True
        self.deadline = now + _ns(self.reload[0])

    def expire(self, now: int) -> bool:
        """True (IRQ 0 raised once) if the deadline passed at ``now``; periodic modes re-arm after ``now``."""
        if self.deadline is None or now < self.deadline:
            return False
        if self.mode[0] in (2, 3):
            n = self.reload[0]
            while self.deadline <= now:
                self.k += 1
                self.deadline = self.start[0] + _ns((self.k + 1) * n)
        else:
            self.deadline = None
            self.armed = False
        return True

    def write(self, port: int, value: int, now: int) -> None:
        value &= 0xFF
        if port == 0x43:
            ch = value >> 6
            if ch == 3:  # read-back: latch the counts named
                for c in range(3):
                    if not value & 0x20 and value & (2 << c):
                        self.latch[c] = self.count(c, now)
                return
            access = (value >> 4) & 3
            if access == 0:  # counter latch
                self.latch[ch] = self.count(ch, now)
                return
            self.access[ch] = access
            mode = (value >> 1) & 7
            self.mode[ch] = mode - 4 if mode in (6, 7) else mode
            self.write_hi[ch] = self.read_hi[ch] = False
            if ch == 0:  # programming stops the count until the new one is written
                self.armed = self.loaded = False
                self.deadline = None
            return
        ch = port - 0x40
        acc = self.access[ch]
        if acc == 1:
            self._load(ch, value, now)
        elif acc == 2:
            self._load(ch, value << 8, now)
        elif not self.write_hi[ch]:
            self.partial[ch] = value
            self.write_hi[ch] = True
        else:
            self.write_hi[ch] = False
            self._load(ch, self.partial[ch] | value << 8, now)

    def read(self, port: int, now: int) -> int:
        if port == 0x43:
            return 0xFF
        ch = port - 0x40
        v = self.latch[ch] if self.latch[ch] is not None else self.count(ch, now)
        acc = self.access[ch]
        if acc == 1:
            self.latch[ch] = None
            return v & 0xFF
        if acc == 2:
            self.latch[ch] = None
            return v >> 8 & 0xFF
        if not self.read_hi[ch]:
            self.read_hi[ch] = True
            return v & 0xFF
        self.read_hi[ch] = False
        self.latch[ch] = None
        return v >> 8 & 0xFF


class Pic:
    """One 8259 (the master; the slave is a second instance with nothing wired to it)."""

    def __init__(self) -> None:
        self.imr = 0xFF
        self.irr = 0
        self.isr = 0
        self.base = 0x08
        self.icw_step = 0  # 0: initialised; 2..4: the next ICW expected
        self.icw4 = False
        self.auto_eoi = False
        self.read_isr = False

    def raise_irq(self, irq: int) -> None:
        self.irr |= 1 << irq

    def pending(self) -> int | None:
        """The vector the PIC would present now, or None (fixed priority, IRQ 0 highest)."""
        ready = self.irr & ~self.imr
        if not ready:
            return None
        irq = (ready & -ready).bit_length() - 1
        if self.isr and (self.isr & -self.isr) <= (1 << irq):
            return None  # an equal or higher priority interrupt is in service
        return self.base + irq

    def ack(self, vector: int) -> None:
        irq = vector - self.base
        self.irr &= ~(1 << irq)
        if not self.auto_eoi:
            self.isr |= 1 << irq

    def write(self, cmd: bool, value: int) -> None:
        value &= 0xFF
        if cmd:
            if value & 0x10:  # ICW1
                self.icw_step = 2
                self.icw4 = bool(value & 1)
                self.imr = 0
                self.isr = 0
                self.irr = 0
                self.auto_eoi = False
            elif value & 0x08:  # OCW3
                if value & 2:
                    self.read_isr = bool(value & 1)
            elif (value >> 5) & 7 in (1, 5):  # non-specific EOI
                if self.isr:
                    self.isr &= self.isr - 1
            elif (value >> 5) & 7 in (3, 7):  # specific EOI
                self.isr &= ~(1 << (value & 7))
            return
        if self.icw_step == 2:
            self.base = value & 0xF8
            self.icw_step = 3
        elif self.icw_step == 3:
            self.icw_step = 4 if self.icw4 else 0
        elif self.icw_step == 4:
            self.auto_eoi = bool(value & 2)
            self.icw_step = 0
        else:
            self.imr = value

    def read(self, cmd: bool) -> int:
        if cmd:
            return self.isr if self.read_isr else self.irr
        return self.imr
