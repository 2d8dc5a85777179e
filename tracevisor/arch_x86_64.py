"""x86-64 machine set-up exactly as uhyve 0.2.1 does it: GDT, identity page tables, long mode, CPUID,
MSRs, the boot-info block and the initial registers of every vCPU.

All addresses and values come from the guest/host ABI reference; docs/compatibility.md lists the few
places where tracevisor deliberately differs (PAT kept at its reset value, RDRAND/RDSEED hidden).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .kvm import uapi as U

GDT_ADDR = 0x1000
BOOT_INFO_ADDR = 0x9000
PML4_ADDR = 0x1_0000
PDPT_ADDR = 0x1_1000
PD_ADDR = 0x1_2000
UART_PORT = 0x800


def serial_port_for(entry_version: int | None, verbose: bool) -> int:
    """The boot info's serial port: uhyve 0.2.1 gives entry-version-2 (and plain) kernels the UART only with
    -v; later uhyve always gives version-3/4 kernels one — Hermit 0.6.x–0.7 panics without it and then
    spins with interrupts off."""
    if entry_version is not None and entry_version >= 3:
        return UART_PORT
    return UART_PORT if verbose else 0

# GDT: null, 64-bit ring-0 code (selector 0x08), ring-0 data (selector 0x10)
GDT_ENTRIES = (0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF)

CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1 << 0, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11

BRAND = b"uhyve - unikernel hypervisor\0rne"  # 32 bytes: leaves 0x8000_0002 and 0x8000_0003

PLATFORM_UHYVE = 1


def write_boot_structures(memory) -> None:
    """GDT at 0x1000 and the identity map of the first GiB with the recursive PML4 slot."""
    memory.write(GDT_ADDR, struct.pack("<3Q", *GDT_ENTRIES))
    memory.write_u64(PML4_ADDR, PDPT_ADDR | 0x3)
    memory.write_u64(PML4_ADDR + 511 * 8, PML4_ADDR | 0x3)  # recursive self-map
    memory.write_u64(PDPT_ADDR, PD_ADDR | 0x3)
    memory.write(PD_ADDR, struct.pack("<512Q", *((i << 21) | 0x83 for i in range(512))))


@dataclass
class BootInfo:
    ram_size: int
    serial_port: int
    image_start: int
    image_end: int
    tls: tuple[int, int, int, int]
    num_cpus: int
    cpu_freq_khz: int
    boot_time_ns: int
    has_pci: bool = True

    def encode(self, entry_version: int | None) -> bytes:
        """The RawBootInfo bytes for a kernel of ``entry_version`` (plain ELFs get version 2's layout)."""
        tls_start, tls_filesz, tls_memsz, tls_align = self.tls
        time = self.boot_time_ns.to_bytes(16, "little", signed=True)
        if entry_version in (None, 2):
            return (struct.pack("<QQH6xQQQQQQI4xB7xQI4x", 0, self.ram_size, self.serial_port,
                                self.image_start, self.image_end, tls_start, tls_filesz, tls_memsz,
                                tls_align, PLATFORM_UHYVE, int(self.has_pci), self.num_cpus,
                                self.cpu_freq_khz) + time)
        # entry versions 3 and 4: a device-tree pointer (0 = none) after the serial port
        return (struct.pack("<QQH6xQQQQQQQI4xB7xQI4x", 0, self.ram_size, self.serial_port, 0,
                            self.image_start, self.image_end, tls_start, tls_filesz, tls_memsz, tls_align,
                            PLATFORM_UHYVE, int(self.has_pci), self.num_cpus, self.cpu_freq_khz) + time)


def _segment(selector: int, type_: int, long: int, db: int) -> U.kvm_segment:
    return U.kvm_segment(base=0, limit=0xFFFF_FFFF, selector=selector, type=type_, present=1, dpl=0,
                         db=db, s=1, l=long, g=1, avl=0, unusable=0)


def setup_sregs(sregs: U.kvm_sregs) -> U.kvm_sregs:
    """Long mode with paging, uhyve's segments and GDTR, CR3 = the boot PML4."""
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE
    sregs.cs = _segment(0x08, 11, 1, 0)
    data = _segment(0x10, 3, 0, 1)
    sregs.ds = data
    sregs.es = data
    sregs.ss = data
    sregs.gdt.base = GDT_ADDR
    sregs.gdt.limit = len(GDT_ENTRIES) * 8 - 1
    return sregs


def initial_regs(entry: int, cpu: int, stack_bottom: int) -> U.kvm_regs:
    return U.kvm_regs(rip=entry, rdi=BOOT_INFO_ADDR, rsi=cpu, rsp=stack_bottom, rflags=0x2)


def initial_fpu() -> U.kvm_fpu:
    """x87 control word and MXCSR at their reset defaults, so a kernel's first FPU use is well defined."""
    return U.kvm_fpu(fcw=0x37F, mxcsr=0x1F80)


def initial_msrs() -> dict[int, int]:
    """uhyve writes MISC_ENABLE = 1 (fast strings); PAT keeps its architectural reset value."""
    return {U.MSR_IA32_MISC_ENABLE: 1, U.MSR_IA32_CR_PAT: 0x0007_0406_0007_0406}


def guest_cpuid(supported: list[U.kvm_cpuid_entry2], hide_rdrand: bool = True) -> list[U.kvm_cpuid_entry2]:
    """uhyve's CPUID table: brand string, hypervisor/TSC-deadline/MSR bits, no PMU; RDRAND/RDSEED hidden
    (determinism of record/replay; documented in docs/determinism.md)."""
    out = []
    for src in supported:
        e = U.kvm_cpuid_entry2.from_buffer_copy(bytes(src))
        f = e.function
        if f in (0x8000_0002, 0x8000_0003):
            base = 0 if f == 0x8000_0002 else 16
            e.eax, e.ebx, e.ecx, e.edx = struct.unpack_from("<4I", BRAND, base)
        elif f == 0x8000_0004:
            e.eax = e.ebx = e.ecx = e.edx = 0
        elif f == 0x1:
            e.ecx |= (1 << 31) | (1 << 24)
            e.edx |= 1 << 5
            if hide_rdrand:
                e.ecx &= ~(1 << 30)
        elif f == 0x7 and e.index == 0 and hide_rdrand:
            e.ebx &= ~(1 << 18)
        elif f == 0xA:
            e.eax = 0
        out.append(e)
    return out


def cpuid_for_vcpu(table: list[U.kvm_cpuid_entry2], cpu: int) -> list[U.kvm_cpuid_entry2]:
    """Per-vCPU copy with the initial APIC ID in leaf 1 EBX[31:24] and the x2APIC ID in leaves 0xB/0x1F."""
    out = []
    for src in table:
        e = U.kvm_cpuid_entry2.from_buffer_copy(bytes(src))
        if e.function == 0x1:
            e.ebx = (e.ebx & 0x00FF_FFFF) | ((cpu & 0xFF) << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = cpu
        out.append(e)
    return out


def cpuid_rows(table: list[U.kvm_cpuid_entry2]) -> list[list[int]]:
    """The table as plain rows [function, index, flags, eax, ebx, ecx, edx] (for traces and reports)."""
    return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in table]


def cpuid_from_rows(rows: list[list[int]]) -> list[U.kvm_cpuid_entry2]:
    return [U.kvm_cpuid_entry2(function=r[0], index=r[1], flags=r[2], eax=r[3], ebx=r[4], ecx=r[5], edx=r[6])
            for r in rows]
