"""Every KVM structure tracevisor uses has the kernel's size and field offsets.

Checked twice: against fixed values (from the x86-64 uapi headers) and, where gcc and the Linux headers
exist, against ``sizeof``/``offsetof`` compiled from <linux/kvm.h> on this machine.
"""

from __future__ import annotations

import ctypes as C
import shutil
import subprocess

import pytest

from tracevisor.kvm import uapi as U

SIZES = {
    "kvm_regs": 144, "kvm_segment": 24, "kvm_dtable": 16, "kvm_sregs": 312, "kvm_fpu": 416,
    "kvm_msr_entry": 16, "kvm_cpuid_entry2": 40, "kvm_userspace_memory_region": 32,
    "kvm_enable_cap": 104, "kvm_mp_state": 4, "kvm_guest_debug": 72, "kvm_pit_config": 64,
    "kvm_vcpu_events": 64, "kvm_debugregs": 128, "kvm_run_exit": 256, "kvm_sync_regs": 520,
    "kvm_xsave": 4096, "kvm_xcr": 16, "kvm_xcrs": 392,
    "kvm_interrupt": 4, "kvm_msr_filter_range": 24, "kvm_msr_filter": 392, "kvm_run_msr": 24,
}

# (struct, field path) -> offset
OFFSETS = {
    ("kvm_run", "exit_reason"): 8, ("kvm_run", "if_flag"): 13, ("kvm_run", "immediate_exit"): 1,
    ("kvm_run", "cr8"): 16, ("kvm_run", "apic_base"): 24, ("kvm_run", "exit"): 32,
    ("kvm_run", "kvm_valid_regs"): 288, ("kvm_run", "kvm_dirty_regs"): 296, ("kvm_run", "s"): 304,
    ("kvm_run_io", "direction"): 0, ("kvm_run_io", "size"): 1, ("kvm_run_io", "port"): 2,
    ("kvm_run_io", "count"): 4, ("kvm_run_io", "data_offset"): 8,
    ("kvm_run_mmio", "phys_addr"): 0, ("kvm_run_mmio", "data"): 8, ("kvm_run_mmio", "len"): 16,
    ("kvm_run_mmio", "is_write"): 20,
    ("kvm_run_internal", "suberror"): 0, ("kvm_run_internal", "ndata"): 4, ("kvm_run_internal", "data"): 8,
    ("kvm_regs", "rip"): 128, ("kvm_regs", "rflags"): 136, ("kvm_regs", "rsi"): 32, ("kvm_regs", "rdi"): 40,
    ("kvm_sregs", "gdt"): 192, ("kvm_sregs", "idt"): 208, ("kvm_sregs", "cr0"): 224, ("kvm_sregs", "cr3"): 240,
    ("kvm_sregs", "efer"): 264, ("kvm_sregs", "apic_base"): 272, ("kvm_sregs", "interrupt_bitmap"): 280,
    ("kvm_segment", "selector"): 12, ("kvm_segment", "type"): 14, ("kvm_segment", "l"): 19,
    ("kvm_fpu", "fcw"): 128, ("kvm_fpu", "last_ip"): 136, ("kvm_fpu", "xmm"): 152, ("kvm_fpu", "mxcsr"): 408,
    ("kvm_cpuid_entry2", "eax"): 12, ("kvm_cpuid_entry2", "edx"): 24,
    ("kvm_userspace_memory_region", "guest_phys_addr"): 8, ("kvm_userspace_memory_region", "userspace_addr"): 24,
    ("kvm_enable_cap", "args"): 8, ("kvm_guest_debug", "arch"): 8,
    ("kvm_sync_regs", "sregs"): 144, ("kvm_sync_regs", "events"): 456,
    ("kvm_run_msr", "reason"): 8, ("kvm_run_msr", "index"): 12, ("kvm_run_msr", "data"): 16,
    ("kvm_msr_filter_range", "base"): 8, ("kvm_msr_filter_range", "bitmap"): 16, ("kvm_msr_filter", "ranges"): 8,
}

# Names in <linux/kvm.h> for the anonymous members tracevisor gives names to
C_NAMES = {
    "kvm_run_io": ("struct kvm_run", "io."), "kvm_run_mmio": ("struct kvm_run", "mmio."),
    "kvm_run_internal": ("struct kvm_run", "internal."),
}


def _offset(struct_name: str, field: str) -> int:
    return getattr(getattr(U, struct_name), field).offset


@pytest.mark.parametrize("name,size", sorted(SIZES.items()))
def test_sizes(name, size):
    assert C.sizeof(getattr(U, name)) == size


@pytest.mark.parametrize("key,offset", sorted(OFFSETS.items()))
def test_offsets(key, offset):
    assert _offset(*key) == offset


def test_kvm_run_size_fits_sync_regs():
    assert C.sizeof(U.kvm_run) == 304 + 2048


def test_ioctl_numbers_from_sizeof():
    # Well-known values from the kernel headers
    assert U.KVM_RUN == 0xAE80
    assert U.KVM_GET_REGS == 0x8090AE81
    assert U.KVM_SET_REGS == 0x4090AE82
    assert U.KVM_GET_SREGS == 0x8138AE83
    assert U.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert U.KVM_SET_CPUID2 == 0x4008AE90
    assert U.KVM_GET_SUPPORTED_CPUID == 0xC008AE05
    assert U.KVM_ENABLE_CAP == 0x4068AEA3


C_PROGRAM = r"""
#include <stdio.h>
#include <stddef.h>
#include <linux/kvm.h>
#define S(t) printf("size %s %zu\n", #t, sizeof(struct t));
#define O(t, f, name) printf("off %s %zu\n", name, offsetof(struct t, f));
int main(void) {
  S(kvm_regs) S(kvm_segment) S(kvm_dtable) S(kvm_sregs) S(kvm_fpu) S(kvm_msr_entry) S(kvm_cpuid_entry2)
  S(kvm_userspace_memory_region) S(kvm_enable_cap) S(kvm_mp_state) S(kvm_guest_debug) S(kvm_pit_config)
  S(kvm_vcpu_events) S(kvm_debugregs) S(kvm_sync_regs) S(kvm_run) S(kvm_xsave) S(kvm_xcr) S(kvm_xcrs)
  S(kvm_interrupt) S(kvm_msr_filter_range) S(kvm_msr_filter)
  O(kvm_run, exit_reason, "kvm_run.exit_reason") O(kvm_run, if_flag, "kvm_run.if_flag")
  O(kvm_run, immediate_exit, "kvm_run.immediate_exit") O(kvm_run, io, "kvm_run.exit")
  O(kvm_run, kvm_valid_regs, "kvm_run.kvm_valid_regs") O(kvm_run, s, "kvm_run.s")
  O(kvm_run, io.port, "kvm_run.io.port") O(kvm_run, io.data_offset, "kvm_run.io.data_offset")
  O(kvm_run, mmio.len, "kvm_run.mmio.len") O(kvm_run, internal.data, "kvm_run.internal.data")
  O(kvm_run, s.regs.regs.rip, "kvm_run.s.rip")
  O(kvm_run, msr.index, "kvm_run.msr.index") O(kvm_run, msr.data, "kvm_run.msr.data")
  O(kvm_sregs, cr3, "kvm_sregs.cr3") O(kvm_fpu, mxcsr, "kvm_fpu.mxcsr")
  printf("ioctl KVM_RUN %lu\nioctl KVM_GET_SREGS %lu\nioctl KVM_SET_MSRS %lu\nioctl KVM_GET_VCPU_EVENTS %lu\n",
         (unsigned long)KVM_RUN, (unsigned long)KVM_GET_SREGS, (unsigned long)KVM_SET_MSRS,
         (unsigned long)KVM_GET_VCPU_EVENTS);
  printf("ioctl KVM_SET_GUEST_DEBUG %lu\nioctl KVM_GET_DEBUGREGS %lu\nioctl KVM_GET_TSC_KHZ %lu\n",
         (unsigned long)KVM_SET_GUEST_DEBUG, (unsigned long)KVM_GET_DEBUGREGS, (unsigned long)KVM_GET_TSC_KHZ);
  printf("ioctl KVM_GET_XSAVE %lu\nioctl KVM_SET_XSAVE %lu\nioctl KVM_GET_XCRS %lu\n",
         (unsigned long)KVM_GET_XSAVE, (unsigned long)KVM_SET_XSAVE, (unsigned long)KVM_GET_XCRS);
  printf("ioctl KVM_INTERRUPT %lu\nioctl KVM_X86_SET_MSR_FILTER %lu\n",
         (unsigned long)KVM_INTERRUPT, (unsigned long)KVM_X86_SET_MSR_FILTER);
  return 0;
}
"""


def test_against_linux_headers(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = tmp_path / "layout.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "layout"
    r = subprocess.run(["gcc", "-o", str(exe), str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        if "kvm.h" in r.stderr:
            pytest.skip("Linux KVM headers not installed")
        pytest.fail(r.stderr)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    ours = {
        "kvm_run.exit_reason": _offset("kvm_run", "exit_reason"), "kvm_run.if_flag": _offset("kvm_run", "if_flag"),
        "kvm_run.immediate_exit": _offset("kvm_run", "immediate_exit"), "kvm_run.exit": _offset("kvm_run", "exit"),
        "kvm_run.kvm_valid_regs": _offset("kvm_run", "kvm_valid_regs"), "kvm_run.s": _offset("kvm_run", "s"),
        "kvm_run.io.port": 32 + _offset("kvm_run_io", "port"),
        "kvm_run.io.data_offset": 32 + _offset("kvm_run_io", "data_offset"),
        "kvm_run.mmio.len": 32 + _offset("kvm_run_mmio", "len"),
        "kvm_run.internal.data": 32 + _offset("kvm_run_internal", "data"),
        "kvm_run.s.rip": 304 + _offset("kvm_regs", "rip"),
        "kvm_run.msr.index": 32 + _offset("kvm_run_msr", "index"),
        "kvm_run.msr.data": 32 + _offset("kvm_run_msr", "data"),
        "kvm_sregs.cr3": _offset("kvm_sregs", "cr3"), "kvm_fpu.mxcsr": _offset("kvm_fpu", "mxcsr"),
    }
    seen = 0
    for line in out.splitlines():
        kind, name, value = line.split()
        value = int(value)
        if kind == "size":
            assert C.sizeof(getattr(U, name)) == value, name
        elif kind == "off":
            assert ours[name] == value, name
        else:
            assert getattr(U, name) == value, name
        seen += 1
    assert seen == 22 + 15 + 12
