"""The Linux KVM user-space API for x86-64, as ctypes structures and ioctl numbers.

Only what tracevisor needs.  Every structure's size and field offsets are checked by
tests/test_kvm_layout.py against ``<linux/kvm.h>`` (compiled with gcc) and against fixed values,
and every ioctl number is derived from ``sizeof`` of its argument, as the kernel's ``_IOW`` macros do,
so a layout mistake shows up as a test failure rather than as a guest that silently misbehaves.
"""

from __future__ import annotations

import ctypes as C

u8, u16, u32, u64 = C.c_uint8, C.c_uint16, C.c_uint32, C.c_uint64

# --------------------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h)
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ, nr, C.sizeof(ctype))


def _iow(nr: int, ctype: type) -> int:
    return _ioc(_IOC_WRITE, nr, C.sizeof(ctype))


def _iowr(nr: int, ctype: type) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, C.sizeof(ctype))


# --------------------------------------------------------------------------------------------------
# Structures


class Struct(C.Structure):
    """Base with a readable repr and dict export (used in stop reports and traces)."""

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name, *_ in self._fields_ if not name.startswith("pad")}


class kvm_regs(Struct):
    _fields_ = [(n, u64) for n in (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")]


class kvm_segment(Struct):
    _fields_ = [
        ("base", u64), ("limit", u32), ("selector", u16), ("type", u8), ("present", u8),
        ("dpl", u8), ("db", u8), ("s", u8), ("l", u8), ("g", u8), ("avl", u8),
        ("unusable", u8), ("padding", u8),
    ]


class kvm_dtable(Struct):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(Struct):
    _fields_ = [
        ("cs", kvm_segment), ("ds", kvm_segment), ("es", kvm_segment), ("fs", kvm_segment),
        ("gs", kvm_segment), ("ss", kvm_segment), ("tr", kvm_segment), ("ldt", kvm_segment),
        ("gdt", kvm_dtable), ("idt", kvm_dtable),
        ("cr0", u64), ("cr2", u64), ("cr3", u64), ("cr4", u64), ("cr8", u64),
        ("efer", u64), ("apic_base", u64),
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(Struct):
    _fields_ = [
        ("fpr", (u8 * 16) * 8), ("fcw", u16), ("fsw", u16), ("ftwx", u8), ("pad1", u8),
        ("last_opcode", u16), ("last_ip", u64), ("last_dp", u64), ("xmm", (u8 * 16) * 16),
        ("mxcsr", u32), ("pad2", u32),
    ]


class kvm_msr_entry(Struct):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs_header(Struct):
    _fields_ = [("nmsrs", u32), ("pad", u32)]


def kvm_msrs(n: int) -> type:
    """struct kvm_msrs with room for ``n`` entries (the kernel struct has a flexible array)."""

    class _kvm_msrs(Struct):
        _fields_ = [("nmsrs", u32), ("pad", u32), ("entries", kvm_msr_entry * n)]

    return _kvm_msrs


class kvm_msr_list_header(Struct):
    _fields_ = [("nmsrs", u32)]


def kvm_msr_list(n: int) -> type:
    class _kvm_msr_list(Struct):
        _fields_ = [("nmsrs", u32), ("indices", u32 * n)]

    return _kvm_msr_list


class kvm_cpuid_entry2(Struct):
    _fields_ = [
        ("function", u32), ("index", u32), ("flags", u32),
        ("eax", u32), ("ebx", u32), ("ecx", u32), ("edx", u32), ("padding", u32 * 3),
    ]


class kvm_cpuid2_header(Struct):
    _fields_ = [("nent", u32), ("padding", u32)]


MAX_CPUID_ENTRIES = 256


class kvm_cpuid2(Struct):
    _fields_ = [("nent", u32), ("padding", u32), ("entries", kvm_cpuid_entry2 * MAX_CPUID_ENTRIES)]


class kvm_userspace_memory_region(Struct):
    _fields_ = [
        ("slot", u32), ("flags", u32), ("guest_phys_addr", u64),
        ("memory_size", u64), ("userspace_addr", u64),
    ]


class kvm_enable_cap(Struct):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_mp_state(Struct):
    _fields_ = [("mp_state", u32)]


class kvm_guest_debug_arch(Struct):
    _fields_ = [("debugreg", u64 * 8)]


class kvm_guest_debug(Struct):
    _fields_ = [("control", u32), ("pad", u32), ("arch", kvm_guest_debug_arch)]


class kvm_pit_config(Struct):
    _fields_ = [("flags", u32), ("pad", u32 * 15)]


class kvm_dirty_log(Struct):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_coalesced_mmio_zone(Struct):
    # ``pio`` shares a union with ``pad``: 1 makes the zone a port range (KVM_CAP_COALESCED_PIO)
    _fields_ = [("addr", u64), ("size", u32), ("pio", u32)]


class kvm_lapic_state(Struct):
    _fields_ = [("regs", C.c_char * 1024)]


class kvm_vcpu_events(Struct):
    # Kept opaque: saved and restored as a whole (checkpoints); only its size matters here.
    _fields_ = [("raw", u8 * 64)]


class kvm_xsave(Struct):
    _fields_ = [("region", u8 * 4096)]


class kvm_xcr(Struct):
    _fields_ = [("xcr", u32), ("reserved", u32), ("value", u64)]


class kvm_xcrs(Struct):
    _fields_ = [("nr_xcrs", u32), ("flags", u32), ("xcrs", kvm_xcr * 16), ("padding", u64 * 16)]


class kvm_debugregs(Struct):
    _fields_ = [("db", u64 * 4), ("dr6", u64), ("dr7", u64), ("flags", u64), ("reserved", u64 * 9)]


# kvm_run and its exit-information union --------------------------------------------------------


class kvm_interrupt(Struct):
    _fields_ = [("irq", u32)]


class kvm_msr_filter_range(Struct):
    _fields_ = [("flags", u32), ("nmsrs", u32), ("base", u32), ("pad", u32), ("bitmap", u64)]


KVM_MSR_FILTER_MAX_RANGES = 16


class kvm_msr_filter(Struct):
    _fields_ = [("flags", u32), ("pad", u32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


class kvm_run_io(Struct):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_mmio(Struct):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_fail_entry(Struct):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(Struct):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_debug(Struct):
    # struct kvm_debug_exit_arch (x86): exception, pad, pc, dr6, dr7
    _fields_ = [("exception", u32), ("pad", u32), ("pc", u64), ("dr6", u64), ("dr7", u64)]


class kvm_run_system_event(Struct):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_msr(Struct):
    # KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR (KVM_CAP_X86_USER_SPACE_MSR): error = 1 makes KVM inject #GP
    _fields_ = [("error", u8), ("pad", u8 * 7), ("reason", u32), ("index", u32), ("data", u64)]


class kvm_run_exit(C.Union):
    _fields_ = [
        ("io", kvm_run_io), ("mmio", kvm_run_mmio), ("fail_entry", kvm_run_fail_entry),
        ("internal", kvm_run_internal), ("debug", kvm_run_debug),
        ("system_event", kvm_run_system_event), ("msr", kvm_run_msr), ("padding", u8 * 256),
    ]


class kvm_sync_regs(Struct):
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_run_s(C.Union):
    _fields_ = [("regs", kvm_sync_regs), ("padding", u8 * 2048)]


class kvm_run(Struct):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", u16), ("cr8", u64), ("apic_base", u64),
        ("exit", kvm_run_exit),
        ("kvm_valid_regs", u64), ("kvm_dirty_regs", u64),
        ("s", kvm_run_s),
    ]


# --------------------------------------------------------------------------------------------------
# ioctl numbers

KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_GET_MSR_INDEX_LIST = _iowr(0x02, kvm_msr_list_header)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2_header)

KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, u64)
KVM_REGISTER_COALESCED_MMIO = _iow(0x67, kvm_coalesced_mmio_zone)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_CREATE_PIT2 = _iow(0x77, kvm_pit_config)

KVM_RUN = _io(0x80)
KVM_INTERRUPT = _iow(0x86, kvm_interrupt)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs_header)
KVM_SET_MSRS = _iow(0x89, kvm_msrs_header)
KVM_GET_LAPIC = _ior(0x8E, kvm_lapic_state)
KVM_SET_LAPIC = _iow(0x8F, kvm_lapic_state)
KVM_GET_FPU = _ior(0x8C, kvm_fpu)
KVM_SET_FPU = _iow(0x8D, kvm_fpu)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2_header)
KVM_GET_CPUID2 = _iowr(0x91, kvm_cpuid2_header)
KVM_GET_MP_STATE = _ior(0x98, kvm_mp_state)
KVM_SET_MP_STATE = _iow(0x99, kvm_mp_state)
KVM_SET_GUEST_DEBUG = _iow(0x9B, kvm_guest_debug)
KVM_GET_VCPU_EVENTS = _ior(0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _iow(0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _ior(0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _iow(0xA2, kvm_debugregs)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, kvm_xsave)
KVM_SET_XSAVE = _iow(0xA5, kvm_xsave)
KVM_GET_XCRS = _ior(0xA6, kvm_xcrs)
KVM_X86_SET_MSR_FILTER = _iow(0xC6, kvm_msr_filter)

KVM_API_VERSION = 12

# Capabilities (KVM_CHECK_EXTENSION / KVM_ENABLE_CAP)
KVM_CAP_IRQCHIP = 0
KVM_CAP_USER_MEMORY = 3
KVM_CAP_COALESCED_MMIO = 15  # the answer is the page offset of the ring in the vCPU mapping
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_SET_GUEST_DEBUG = 23
KVM_CAP_PIT2 = 33
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_SYNC_REGS = 74
KVM_CAP_X2APIC_API = 129
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_COALESCED_PIO = 162
KVM_CAP_X86_USER_SPACE_MSR = 188
KVM_CAP_X86_MSR_FILTER = 189

# KVM_CAP_X86_USER_SPACE_MSR: which failing MSR accesses exit to user space (kvm_run.msr.reason)
KVM_MSR_EXIT_REASON_INVAL = 1 << 0  # an access KVM would answer with #GP (x2APIC MSRs without an in-kernel LAPIC)
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2  # denied by KVM_X86_SET_MSR_FILTER
KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1

KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3

KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

# Exit reasons (the numbers also go into traces)
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30

EXIT_REASON_NAMES: dict[int, str] = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR",
    12: "TPR_ACCESS", 13: "S390_SIEIC", 14: "S390_RESET", 15: "DCR", 16: "NMI",
    17: "INTERNAL_ERROR", 18: "OSI", 19: "PAPR_HCALL", 20: "S390_UCONTROL", 21: "WATCHDOG",
    22: "S390_TSCH", 23: "EPR", 24: "SYSTEM_EVENT", 25: "S390_STSI", 26: "IOAPIC_EOI",
    27: "HYPERV", 28: "ARM_NISV", 29: "X86_RDMSR", 30: "X86_WRMSR", 31: "DIRTY_RING_FULL",
    32: "AP_RESET_HOLD", 33: "X86_BUS_LOCK", 34: "XEN", 35: "RISCV_SBI", 36: "RISCV_CSR",
    37: "NOTIFY", 38: "LOONGARCH_IOCSR", 39: "MEMORY_FAULT",
}


def exit_reason_name(reason: int) -> str:
    """The name of a KVM_EXIT_* number (``REASON_<n>`` when linux/kvm.h has none)."""
    return EXIT_REASON_NAMES.get(reason, f"REASON_{reason}")

INTERNAL_ERROR_SUBERRORS: dict[int, str] = {
    1: "emulation failure (KVM's instruction emulator could not execute the instruction)",
    2: "simultaneous exceptions",
    3: "delivery event failed",
    4: "unexpected exit reason",
}

# MSR numbers used by the x86 set-up
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
