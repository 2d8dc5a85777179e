"""GuestMemory: checked physical access and guest-virtual translation."""

from __future__ import annotations

import pytest

from tracevisor import arch_x86_64 as arch
from tracevisor.errors import GuestError
from tracevisor.memory import GuestMemory, is_canonical

MB = 1 << 20


@pytest.fixture
def mem():
    m = GuestMemory(4 * MB)
    arch.write_boot_structures(m)
    yield m
    m.close()


@pytest.mark.parametrize("gpa,n", [(4 * MB, 1), (4 * MB - 1, 2), (-1, 1), (0, 4 * MB + 1),
                                   ((1 << 64) - 1, 2), (10, -1)])
def test_out_of_range(mem, gpa, n):
    with pytest.raises(GuestError):
        mem.read(gpa, n)


def test_edges(mem):
    mem.write(4 * MB - 4, b"abcd")
    assert mem.read(4 * MB - 4, 4) == b"abcd"
    assert mem.read(4 * MB, 0) == b""
    assert mem.read_u32(4 * MB - 4) == int.from_bytes(b"abcd", "little")


def test_cstr(mem):
    mem.write(0x20000, b"name\0rest")
    assert mem.read_cstr(0x20000) == b"name"
    mem.write(0x21000, b"x" * 100)
    with pytest.raises(GuestError, match="longer than 10"):
        mem.read_cstr(0x21000, limit=10)


def test_identity_translation(mem):
    assert mem.translate(0x123456, arch.PML4_ADDR) == (0x123456, 0x200000 - 0x123456 % 0x200000)
    assert mem.virt_ranges(0x1FFFF0, 0x20, arch.PML4_ADDR) == [(0x1FFFF0, 0x20)]


def test_4k_pages_noncontiguous(mem):
    # Map virtual 0x4000_0000 (PDPT[1]) through a page table with two scattered 4 KiB pages.
    mem.write_u64(arch.PDPT_ADDR + 8, 0x30000 | 3)  # PD at 0x30000
    mem.write_u64(0x30000, 0x31000 | 3)  # PT at 0x31000
    mem.write_u64(0x31000, 0x50000 | 3)
    mem.write_u64(0x31008, 0x70000 | 3)
    mem.write(0x50FFC, b"ABCD")
    mem.write(0x70000, b"EFGH")
    assert mem.virt_ranges(0x4000_0FFC, 8, arch.PML4_ADDR) == [(0x50FFC, 4), (0x70000, 4)]
    assert mem.read_virt(0x4000_0FFC, 8, arch.PML4_ADDR) == b"ABCDEFGH"
    mem.write_virt(0x4000_0FFE, b"xyzw", arch.PML4_ADDR)
    assert mem.read(0x50FFC, 4) == b"ABxy" and mem.read(0x70000, 4) == b"zwGH"
    with pytest.raises(GuestError, match="not mapped"):
        mem.translate(0x4000_2000, arch.PML4_ADDR)


def test_canonical():
    assert is_canonical(0x7FFF_FFFF_FFFF) and is_canonical(0xFFFF_8000_0000_0000)
    assert not is_canonical(0x8000_0000_0000)


def test_recursive_slot_maps_pml4(mem):
    # PML4[511] points at the PML4 itself (uhyve's recursive map): 0xFFFF_FF80_0000_0000 + ... walks to it
    va = 0xFFFF_FFFF_FFFF_F000
    gpa, _ = mem.translate(va, arch.PML4_ADDR)
    assert gpa == arch.PML4_ADDR
