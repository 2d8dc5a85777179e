"""Thin, typed wrappers around the KVM file descriptors: the system (/dev/kvm), a VM and its vCPUs.

Every ioctl goes through :func:`fcntl.ioctl`, which releases the GIL while the kernel works, so
vCPU threads run in parallel.  Nothing here knows about guests, hypercalls or traces.
"""

from __future__ import annotations

import ctypes as C
import errno
import fcntl
import mmap
import os

from ..errors import KvmUnavailable, TracevisorError
from . import uapi as U

DEFAULT_KVM_PATH = "/dev/kvm"
_libc = C.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [C.c_int, C.c_ulong, C.c_ulong]
_libc.ioctl.restype = C.c_int


def kvm_path() -> str:
    """The KVM device to open; ``TRACEVISOR_KVM_DEVICE`` overrides it (tests simulate a missing one)."""
    return os.environ.get("TRACEVISOR_KVM_DEVICE", DEFAULT_KVM_PATH)


def _ioctl(fd: int, request: int, arg, what: str):
    try:
        return fcntl.ioctl(fd, request, arg, True) if not isinstance(arg, int) else fcntl.ioctl(fd, request, arg)
    except OSError as e:
        raise TracevisorError(f"KVM {what} failed: {os.strerror(e.errno or 0)} (errno {e.errno})") from None


class Kvm:
    """The KVM system file descriptor: capabilities, supported CPUID, MSR list; creates VMs."""

    def __init__(self, path: str | None = None) -> None:
        path = path or kvm_path()
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: this machine offers no KVM (enable virtualization in the "
                "firmware or the host hypervisor, and load kvm_intel or kvm_amd)") from None
        except PermissionError:
            raise KvmUnavailable(
                f"no permission to open {path}: add your user to the group owning it "
                "(usually 'kvm') or run as root") from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        try:
            version = fcntl.ioctl(self.fd, U.KVM_GET_API_VERSION, 0)
        except OSError as e:
            os.close(self.fd)
            raise KvmUnavailable(f"{path} is not a KVM device (KVM_GET_API_VERSION: {e.strerror})") from None
        if version != U.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailable(
                f"{path} speaks KVM API version {version}; tracevisor needs version {U.KVM_API_VERSION}")
        self.path = path
        self.api_version = version

    def check_extension(self, cap: int) -> int:
        try:
            return fcntl.ioctl(self.fd, U.KVM_CHECK_EXTENSION, cap)
        except OSError:
            return 0

    def vcpu_mmap_size(self) -> int:
        return _ioctl(self.fd, U.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self) -> list[U.kvm_cpuid_entry2]:
        buf = U.kvm_cpuid2()
        buf.nent = U.MAX_CPUID_ENTRIES
        _ioctl(self.fd, U.KVM_GET_SUPPORTED_CPUID, buf, "KVM_GET_SUPPORTED_CPUID")
        out = []
        for i in range(buf.nent):
            e = U.kvm_cpuid_entry2()
            C.memmove(C.addressof(e), C.addressof(buf.entries[i]), C.sizeof(e))
            out.append(e)
        return out

    def msr_index_list(self) -> list[int]:
        n = 1024
        lst = U.kvm_msr_list(n)()
        lst.nmsrs = n
        _ioctl(self.fd, U.KVM_GET_MSR_INDEX_LIST, lst, "KVM_GET_MSR_INDEX_LIST")
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> Vm:
        while True:
            try:
                vmfd = fcntl.ioctl(self.fd, U.KVM_CREATE_VM, 0)
                break
            except InterruptedError:
                continue
            except OSError as e:
                raise TracevisorError(f"KVM_CREATE_VM failed: {e.strerror}") from None
        return Vm(self, vmfd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vm:
    """A KVM virtual machine: memory slots, irqchip, capabilities; creates vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def set_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        region = U.kvm_userspace_memory_region(slot=slot, flags=flags, guest_phys_addr=gpa,
                                               memory_size=size, userspace_addr=host_addr)
        _ioctl(self.fd, U.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """The slot's dirty-page bitmap since the last call (bit i = page i), and reset it."""
        bitmap = C.create_string_buffer(((pages + 63) // 64) * 8)
        log = U.kvm_dirty_log(slot=slot, dirty_bitmap=C.addressof(bitmap))
        _ioctl(self.fd, U.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        return bitmap.raw

    def create_irqchip(self) -> None:
        _ioctl(self.fd, U.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def register_coalesced_pio(self, port: int, size: int) -> None:
        """Make OUTs to ports [port, port+size) complete in the kernel, queued in the coalesced-I/O ring."""
        zone = U.kvm_coalesced_mmio_zone(addr=port, size=size, pio=1)
        _ioctl(self.fd, U.KVM_REGISTER_COALESCED_MMIO, zone, "KVM_REGISTER_COALESCED_MMIO")

    def create_pit2(self) -> None:
        _ioctl(self.fd, U.KVM_CREATE_PIT2, U.kvm_pit_config(), "KVM_CREATE_PIT2")

    def set_tss_addr(self, addr: int) -> None:
        # The argument is an unsigned long, beyond fcntl.ioctl's C int: call libc directly.
        if _libc.ioctl(self.fd, U.KVM_SET_TSS_ADDR, addr) < 0:
            err = C.get_errno()
            raise TracevisorError(f"KVM_SET_TSS_ADDR failed: {os.strerror(err)}")

    def enable_cap(self, cap: int, *args: int) -> bool:
        """Enable a VM capability; returns False (instead of raising) when the host refuses it."""
        req = U.kvm_enable_cap(cap=cap)
        for i, a in enumerate(args):
            req.args[i] = a
        try:
            fcntl.ioctl(self.fd, U.KVM_ENABLE_CAP, req, True)
            return True
        except OSError:
            return False

    def deny_msrs(self, ranges: list[tuple[int, int]]) -> None:
        """KVM_X86_SET_MSR_FILTER: reads and writes of the MSRs in ``ranges`` ([(first, count)], at most 16)
        exit to user space (with KVM_CAP_X86_USER_SPACE_MSR's FILTER reason); every other MSR stays KVM's."""
        flt = U.kvm_msr_filter(flags=0)  # KVM_MSR_FILTER_DEFAULT_ALLOW
        bitmaps = []
        for i, (base, n) in enumerate(ranges):
            bm = C.create_string_buffer((n + 7) // 8)  # all zero: every MSR of the range denied
            bitmaps.append(bm)
            flt.ranges[i] = U.kvm_msr_filter_range(flags=U.KVM_MSR_FILTER_READ | U.KVM_MSR_FILTER_WRITE,
                                                   nmsrs=n, base=base, bitmap=C.addressof(bm))
        _ioctl(self.fd, U.KVM_X86_SET_MSR_FILTER, flt, "KVM_X86_SET_MSR_FILTER")

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = _ioctl(self.fd, U.KVM_CREATE_VCPU, vcpu_id, "KVM_CREATE_VCPU")
        vcpu = Vcpu(self, vcpu_id, fd, self.kvm.vcpu_mmap_size())
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Vcpu:
    """One vCPU: its fd, the shared ``kvm_run`` page, and typed register accessors."""

    def __init__(self, vm: Vm, vcpu_id: int, fd: int, mmap_size: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self.run_mmap = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run = U.kvm_run.from_buffer(self.run_mmap)
        self.sync_regs = False

    # -- running ---------------------------------------------------------------------------------
    def enable_sync_regs(self) -> bool:
        """Ask KVM to copy the GPRs into kvm_run on every exit (free RIP, no KVM_GET_REGS ioctl)."""
        if self.vm.kvm.check_extension(U.KVM_CAP_SYNC_REGS) & U.KVM_SYNC_X86_REGS:
            self.run.kvm_valid_regs = U.KVM_SYNC_X86_REGS
            self.sync_regs = True
        return self.sync_regs

    # -- registers -------------------------------------------------------------------------------
    def get_regs(self) -> U.kvm_regs:
        regs = U.kvm_regs()
        _ioctl(self.fd, U.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: U.kvm_regs) -> None:
        _ioctl(self.fd, U.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> U.kvm_sregs:
        sregs = U.kvm_sregs()
        _ioctl(self.fd, U.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: U.kvm_sregs) -> None:
        _ioctl(self.fd, U.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self) -> U.kvm_fpu:
        fpu = U.kvm_fpu()
        _ioctl(self.fd, U.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: U.kvm_fpu) -> None:
        _ioctl(self.fd, U.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def set_msrs(self, values: dict[int, int]) -> int:
        msrs = U.kvm_msrs(len(values))()
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        return _ioctl(self.fd, U.KVM_SET_MSRS, msrs, "KVM_SET_MSRS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        msrs = U.kvm_msrs(len(indices))()
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        n = _ioctl(self.fd, U.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_cpuid(self, entries: list[U.kvm_cpuid_entry2]) -> None:
        buf = U.kvm_cpuid2()
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            buf.entries[i] = e
        _ioctl(self.fd, U.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")

    def get_mp_state(self) -> int:
        st = U.kvm_mp_state()
        _ioctl(self.fd, U.KVM_GET_MP_STATE, st, "KVM_GET_MP_STATE")
        return st.mp_state

    def set_mp_state(self, state: int) -> None:
        _ioctl(self.fd, U.KVM_SET_MP_STATE, U.kvm_mp_state(mp_state=state), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> U.kvm_vcpu_events:
        ev = U.kvm_vcpu_events()
        _ioctl(self.fd, U.KVM_GET_VCPU_EVENTS, ev, "KVM_GET_VCPU_EVENTS")
        return ev

    def set_vcpu_events(self, ev: U.kvm_vcpu_events) -> None:
        _ioctl(self.fd, U.KVM_SET_VCPU_EVENTS, ev, "KVM_SET_VCPU_EVENTS")

    def get_xsave(self) -> U.kvm_xsave:
        xs = U.kvm_xsave()
        _ioctl(self.fd, U.KVM_GET_XSAVE, xs, "KVM_GET_XSAVE")
        return xs

    def set_xsave(self, xs: U.kvm_xsave) -> None:
        _ioctl(self.fd, U.KVM_SET_XSAVE, xs, "KVM_SET_XSAVE")

    def get_xcrs(self) -> dict[int, int]:
        """The extended control registers (XCR0 after the guest's XSETBV), as {index: value}."""
        xc = U.kvm_xcrs()
        _ioctl(self.fd, U.KVM_GET_XCRS, xc, "KVM_GET_XCRS")
        return {xc.xcrs[i].xcr: xc.xcrs[i].value for i in range(min(xc.nr_xcrs, 16))}

    def get_lapic(self) -> U.kvm_lapic_state:
        st = U.kvm_lapic_state()
        _ioctl(self.fd, U.KVM_GET_LAPIC, st, "KVM_GET_LAPIC")
        return st

    def set_lapic(self, st: U.kvm_lapic_state) -> None:
        _ioctl(self.fd, U.KVM_SET_LAPIC, st, "KVM_SET_LAPIC")

    def interrupt(self, vector: int) -> None:
        """KVM_INTERRUPT: deliver external interrupt ``vector`` at the next entry (only without an in-kernel
        irqchip, and only when kvm_run.ready_for_interrupt_injection says the guest can take it)."""
        _ioctl(self.fd, U.KVM_INTERRUPT, U.kvm_interrupt(irq=vector), "KVM_INTERRUPT")

    def set_guest_debug(self, control: int, debugregs: list[int] | None = None) -> None:
        dbg = U.kvm_guest_debug(control=control)
        for i, v in enumerate(debugregs or []):
            dbg.arch.debugreg[i] = v
        _ioctl(self.fd, U.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")

    def tsc_khz(self) -> int:
        try:
            return fcntl.ioctl(self.fd, U.KVM_GET_TSC_KHZ, 0)
        except OSError as e:
            if e.errno in (errno.EIO, errno.ENOTTY, errno.EINVAL):
                return 0
            raise

    def close(self) -> None:
        try:
            del self.run
        except AttributeError:
            pass
        try:
            self.run_mmap.close()
        except BufferError:
            pass  # a ctypes view is still alive somewhere; the mapping goes with the process
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
