"""The two error families of tracevisor.

* :class:`TracevisorError` — a host or configuration problem (missing kernel, no /dev/kvm, a bad option,
  an unreadable trace).  The CLI prints its message as one line and exits non-zero; no traceback.
* :class:`GuestError` — the guest did something the hypervisor refuses (a pointer outside its RAM, an
  unknown port, a malformed ring).  The run loop stops the VM and prints a report; never a traceback.
"""

from __future__ import annotations


class TracevisorError(Exception):
    """A host-side or configuration error, reported as one clear line."""


class KvmUnavailable(TracevisorError):
    """/dev/kvm is missing, not accessible, or speaks an unexpected API version."""


class LoaderError(TracevisorError):
    """The kernel image cannot be loaded (not ELF, wrong class/machine, does not fit...)."""


class TraceError(TracevisorError):
    """A trace file cannot be read (not a trace, unsupported version, unreadable)."""


class GuestError(Exception):
    """The guest misbehaved; the VM is stopped with a report naming what it did."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class Divergence(Exception):
    """Replay: the guest did something other than what the recording says at this point.

    Raised on a vCPU thread (by the replay checker or the replaying HostIO); the machine stops the VM
    with a divergence report that adds the vCPU's registers.
    """

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.details = details


class Pause(Exception):
    """Raised on a vCPU thread to pause the VM at a consistent point (between exits)."""
