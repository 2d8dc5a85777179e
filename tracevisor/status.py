"""Why a VM stopped and what the process returns: the one table of stop reasons and exit statuses.

A :class:`StopInfo` is the outcome of every run, record, replay and debug session.  Its ``reason`` is a
:class:`StopReason` (a ``str`` enum, so the value written to a trace's ``stop`` record and compared by
older code is the plain word, e.g. ``"exit"``), its ``status`` the process exit status the CLI returns.
Where a reason has one status it comes from :data:`STATUS_OF`; a guest's exit uses its own code.

Standard library only and nothing slow to import (no dataclasses): tracevisor.signals uses the table
before the rest of the CLI is imported.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum


class StopReason(StrEnum):
    """Why the VM stopped (or paused).  The values are the words traces and reports carry."""

    EXIT = "exit"  # the guest called EXIT; the status is its code
    FAULT = "fault"  # triple fault, internal error, failed entry, unexpected exit
    GUEST_ERROR = "guest-error"  # a bad hypercall block, pointer, unknown port write, broken virtqueue
    HANG = "hang"  # every vCPU halted with interrupts off (or parked after INIT)
    INTERRUPTED = "interrupted"  # Ctrl-C
    TERMINATED = "terminated"  # SIGTERM
    TIMEOUT = "timeout"  # --timeout expired
    ERROR = "error"  # a host problem or a tracevisor bug
    STOPPED = "stopped"  # ended from outside without a verdict (a replay callback's stop())
    PAUSED = "paused"  # not an end: a debugger stop, a replay pause or checkpoint; resume() continues
    DIVERGED = "diverged"  # a replay left the recording
    TRACE_FULL = "trace-full"  # --max-trace-size reached; the trace is complete up to there
    KILLED = "killed"  # gdb's kill
    END_OF_TRACE = "end-of-trace"  # a replay re-created a recording up to a stop that was not the guest's
    REPLAY_TIMEOUT = "replay-timeout"  # replay --timeout expired (never a verdict)


class ExitStatus(IntEnum):
    """Process exit statuses besides the guest's own exit code."""

    OK = 0
    ERROR = 1  # host/configuration error
    USAGE = 2
    GUEST_FAULT = 3  # the VM was stopped because of the guest (fault, bad request, hang)
    DIVERGED = 4  # replay diverged from the recording
    PARTIAL = 5  # replay re-created the recording up to its recorded stop (timeout, signal, trace full, killed,
    #              damaged trace): not the whole run, and not a divergence
    UNCHECKED = 6  # replay had nothing to check (a trace without events)
    TIMEOUT = 124  # as timeout(1)
    INTERRUPTED = 130  # 128 + SIGINT
    KILLED = 137  # 128 + SIGKILL: killed from gdb
    TERMINATED = 143  # 128 + SIGTERM


#: The status of each reason that has one (EXIT uses the guest's code).
STATUS_OF: dict[StopReason, ExitStatus] = {
    StopReason.FAULT: ExitStatus.GUEST_FAULT,
    StopReason.GUEST_ERROR: ExitStatus.GUEST_FAULT,
    StopReason.HANG: ExitStatus.GUEST_FAULT,
    StopReason.INTERRUPTED: ExitStatus.INTERRUPTED,
    StopReason.TERMINATED: ExitStatus.TERMINATED,
    StopReason.TIMEOUT: ExitStatus.TIMEOUT,
    StopReason.ERROR: ExitStatus.ERROR,
    StopReason.STOPPED: ExitStatus.OK,
    StopReason.PAUSED: ExitStatus.OK,
    StopReason.DIVERGED: ExitStatus.DIVERGED,
    StopReason.TRACE_FULL: ExitStatus.ERROR,
    StopReason.KILLED: ExitStatus.KILLED,
    StopReason.END_OF_TRACE: ExitStatus.PARTIAL,
    StopReason.REPLAY_TIMEOUT: ExitStatus.TIMEOUT,
}

_REG_NAMES = ("rip", "rsp", "rbp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class StopInfo:
    """Why and how the VM stopped; ``status`` is the process exit status the CLI returns."""

    __slots__ = ("reason", "status", "message", "code", "cpu", "report")

    def __init__(self, reason: StopReason, status: int, message: str = "", code: int | None = None,
                 cpu: int | None = None, report: dict | None = None) -> None:
        self.reason = reason
        self.status = status
        self.message = message
        self.code = code  # the guest's exit code, for reason == EXIT
        self.cpu = cpu
        self.report = {} if report is None else report

    def __repr__(self) -> str:
        return (f"StopInfo(reason={str(self.reason)!r}, status={self.status}, message={self.message!r}, "
                f"code={self.code}, cpu={self.cpu})")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, StopInfo):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    @classmethod
    def of(cls, reason: StopReason, message: str = "", **kw) -> StopInfo:
        """A stop whose status follows from its reason (see :data:`STATUS_OF`)."""
        return cls(reason, int(STATUS_OF[reason]), message, **kw)

    @classmethod
    def paused(cls, message: str = "paused", **kw) -> StopInfo:
        return cls(StopReason.PAUSED, 0, message, **kw)

    @classmethod
    def guest_exit(cls, code: int, cpu: int | None = None) -> StopInfo:
        """The guest's EXIT: the process status is its code's low byte, as a shell sees it."""
        return cls(StopReason.EXIT, code & 0xFF, f"guest exited with code {code}", code=code, cpu=cpu)

    @property
    def is_paused(self) -> bool:
        return self.reason == StopReason.PAUSED

    def as_dict(self) -> dict:
        return {"reason": str(self.reason), "status": self.status, "code": self.code, "cpu": self.cpu,
                "message": self.message, "report": self.report}

    def format(self) -> str:
        """The human-readable stop report (empty for a normal guest exit)."""
        if self.reason == StopReason.EXIT:
            return ""
        lines = [f"tracevisor: {self.message}"]
        r = self.report
        if "regs" in r:
            g = r["regs"]
            for i in range(0, len(_REG_NAMES), 4):
                lines.append("  " + "  ".join(f"{n:>6}={g[n]:#018x}" for n in _REG_NAMES[i:i + 4] if n in g))
        if "sregs" in r:
            s = r["sregs"]
            lines.append("  " + "  ".join(f"{n}={s[n]:#x}" for n in ("cr0", "cr2", "cr3", "cr4", "efer")
                                          if n in s))
        if r.get("code_bytes"):
            lines.append(f"  code at rip: {r['code_bytes']}")
        for hint in r.get("hints", []):
            lines.append(f"  hint: {hint}")
        return "\n".join(lines)
