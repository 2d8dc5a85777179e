"""Stop reports for a vCPU: registers, the code bytes at rip, hints, and the bounded "first time" notes.

Reading registers takes vCPU ioctls, which block while the vCPU runs: build a report only on the vCPU's
own thread.  Everything here degrades instead of raising — a report about a broken vCPU must not fail.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from .errors import GuestError, TracevisorError
from .status import ExitStatus, StopInfo, StopReason

MAX_NOTES = 32  # distinct unknown ports/MMIO addresses reported before going quiet


class Reporter:
    """Fault reports over one guest memory, and a log that says each unusual thing once."""

    def __init__(self, memory, log: Callable[[str], None]) -> None:
        self.memory = memory
        self.log = log
        self._noted: set[tuple[str, int]] = set()  # unknown IN ports / MMIO addresses already logged
        self._lock = threading.Lock()

    def first_note(self, kind: str, key: int) -> bool:
        """True the first time (kind, key) is seen, for at most MAX_NOTES keys: a guest touching many ports
        or addresses gets a bounded number of lines (and of remembered keys), then one line saying so."""
        with self._lock:
            if (kind, key) in self._noted or len(self._noted) > MAX_NOTES:
                return False
            self._noted.add((kind, key))
            if len(self._noted) > MAX_NOTES:
                self.log(f"more than {MAX_NOTES} unknown I/O ports or MMIO addresses touched; "
                         "not reporting further ones")
                return False
            return True

    @staticmethod
    def registers(v) -> dict:
        """Registers of a stopped vCPU as a dict (reports, replay callbacks)."""
        regs = v.vcpu.get_regs().as_dict()
        s = v.vcpu.get_sregs()
        sregs = {"cr0": s.cr0, "cr2": s.cr2, "cr3": s.cr3, "cr4": s.cr4, "efer": s.efer,
                 "cs": s.cs.selector, "ss": s.ss.selector}
        return {"regs": regs, "sregs": sregs}

    def code_bytes(self, rip: int, cr3: int, n: int = 16) -> str:
        try:
            gpa, room = self.memory.translate(rip, cr3)
        except GuestError as e:
            return f"(not readable: {e})"
        if gpa >= self.memory.size:
            return f"(none: rip maps to guest-physical {gpa:#x}, outside guest RAM [0, {self.memory.size:#x}))"
        n = min(n, room, self.memory.size - gpa)
        return " ".join(f"{b:02x}" for b in self.memory.read(gpa, n))

    def rip_outside_ram(self, v) -> bool:
        """Does v's rip translate to a guest-physical address beyond RAM (so no instruction could be fetched)?"""
        try:
            regs = v.vcpu.get_regs()
            cr3 = v.vcpu.get_sregs().cr3
            gpa, _ = self.memory.translate(regs.rip, cr3)
        except (GuestError, TracevisorError, AttributeError):
            return False
        return gpa >= self.memory.size

    def fault(self, v, reason: StopReason, message: str, *, hints=None, extra=None) -> StopInfo:
        """A stop report with registers and code bytes; call only from v's own thread."""
        report: dict = {}
        try:
            report.update(self.registers(v))
            report["code_bytes"] = self.code_bytes(report["regs"]["rip"], report["sregs"]["cr3"])
        except Exception as e:  # registers may be unavailable if KVM itself failed
            report["registers_error"] = str(e)
        if hints:
            report["hints"] = hints
        if extra:
            report.update(extra)
        status = ExitStatus.ERROR if reason == StopReason.ERROR else ExitStatus.GUEST_FAULT
        return StopInfo(reason, int(status), message, cpu=v.cpu, report=report)
