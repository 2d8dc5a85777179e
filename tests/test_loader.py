"""Kernel loading: what is accepted, and one clear error for each thing that is not."""

from __future__ import annotations

import shutil
import struct
import subprocess

import pytest

from tracevisor.errors import LoaderError
from tracevisor.loader import load_kernel
from tracevisor.memory import GuestMemory

MB = 1 << 20

NOTE = """
.section .note.hermit, "a"
.balign 4
.long 7, 1, 0x5A00
.asciz "HERMIT"
.byte 0
.byte {version}
.balign 4
"""

BODY = """
.globl _start
.text
_start: hlt
.data
.quad 0x1122334455667788
"""


def build(tmp_path, name, asm, *ldflags, note=None):
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    src = tmp_path / f"{name}.S"
    src.write_text(asm + (NOTE.format(version=note) if note is not None else ""))
    out = tmp_path / name
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-o", str(out), str(src), *ldflags],
                   check=True, capture_output=True)
    return out


def test_plain_static_elf(tmp_path):
    from elftools.elf.elffile import ELFFile

    path = build(tmp_path, "k", BODY, "-Wl,-Ttext=0x400000")
    k = load_kernel(path, 64 * MB)
    with open(path, "rb") as f:
        first = next(s for s in ELFFile(f).iter_segments() if s["p_type"] == "PT_LOAD")["p_vaddr"]
    assert k.entry_version is None and not k.pie and k.entry == 0x400000
    assert k.load_address == first and k.boot_stack == (first - 0x8000, first)
    mem = GuestMemory(64 * MB)
    k.place(mem)
    assert mem.read(0x400000, 1) == b"\xf4"


def test_hermit_note_versions(tmp_path):
    assert load_kernel(build(tmp_path, "v2", BODY, "-Wl,-Ttext=0x400000", note=2), 64 * MB).entry_version == 2
    assert load_kernel(build(tmp_path, "v3", BODY, "-Wl,-Ttext=0x400000", note=3), 64 * MB).entry_version == 3
    with pytest.raises(LoaderError, match="entry version 1 .*uhyve 0.1.3"):
        load_kernel(build(tmp_path, "v1", BODY, "-Wl,-Ttext=0x400000", note=1), 64 * MB)
    with pytest.raises(LoaderError, match="entry version 9"):
        load_kernel(build(tmp_path, "v9", BODY, "-Wl,-Ttext=0x400000", note=9), 64 * MB)


def test_missing_and_directory(tmp_path):
    with pytest.raises(LoaderError, match="kernel not found"):
        load_kernel(tmp_path / "nope", 64 * MB)
    with pytest.raises(LoaderError, match="is a directory"):
        load_kernel(tmp_path, 64 * MB)


def test_not_elf(tmp_path):
    p = tmp_path / "script.sh"
    p.write_text("#!/bin/sh\necho hi\n")
    with pytest.raises(LoaderError, match="not an ELF file"):
        load_kernel(p, 64 * MB)


def test_elf32(tmp_path):
    p = tmp_path / "elf32"
    # a minimal ELF32 header: magic, class 1, little-endian, version 1, then zeros
    p.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(45))
    with pytest.raises(LoaderError, match="32-bit ELF"):
        load_kernel(p, 64 * MB)


def test_other_machine(tmp_path):
    raw = bytearray(build(tmp_path, "k", BODY, "-Wl,-Ttext=0x400000").read_bytes())
    struct.pack_into("<H", raw, 18, 183)
    p = tmp_path / "arm"
    p.write_bytes(raw)
    with pytest.raises(LoaderError, match="AArch64, not x86-64"):
        load_kernel(p, 64 * MB)


def test_truncated_elf(tmp_path):
    raw = build(tmp_path, "k", BODY, "-Wl,-Ttext=0x400000").read_bytes()
    p = tmp_path / "trunc"
    p.write_bytes(raw[:80])
    with pytest.raises(LoaderError):
        load_kernel(p, 64 * MB)


def test_too_big_for_memory(tmp_path):
    asm = BODY + "\n.bss\n.lcomm big, 40*1024*1024\n"
    k = build(tmp_path, "big", asm, "-Wl,-Ttext=0x400000")
    with pytest.raises(LoaderError, match="raise --memory"):
        load_kernel(k, 16 * MB)
    assert load_kernel(k, 64 * MB).image_end > 40 * MB


def test_overlaps_boot_structures(tmp_path):
    with pytest.raises(LoaderError, match="no room for the boot structures"):
        load_kernel(build(tmp_path, "low", BODY, "-Wl,-Ttext=0x10000"), 64 * MB)


def test_segment_outside_memory(tmp_path):
    with pytest.raises(LoaderError, match="raise --memory"):
        load_kernel(build(tmp_path, "high", BODY, "-Wl,-Ttext=0x8000000"), 64 * MB)


def many_loads(path, n: int, step: int = 0x1000, overlap_at: int | None = None):
    """A hand-made static ELF with ``n`` tiny PT_LOADs (one page apart), entry in the first."""
    phoff = 64
    data_off = phoff + 56 * n
    hdr = bytearray(64)
    hdr[:16] = b"\x7fELF\x02\x01\x01" + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 2, 62, 1, 0x400000, phoff, 0, 0, 64, 56, n, 64, 0, 0)
    phdrs = bytearray()
    for i in range(n):
        vaddr = 0x400000 + i * step
        if overlap_at is not None and i == overlap_at:
            vaddr -= step - 8  # starts inside the previous segment
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, data_off, vaddr, vaddr, 1, 16, 0x1000)
    path.write_bytes(bytes(hdr) + bytes(phdrs) + b"\xf4")
    return path


def test_segment_overlap_check_is_a_sweep_and_matches_all_pairs():
    import random

    from tracevisor.loader import Segment, overlapping_pair

    rnd = random.Random(7)
    for _ in range(500):
        segs = [Segment(rnd.randrange(0, 64), b"", rnd.choice([0, 1, 2, 5, 9])) for _ in range(rnd.randrange(1, 8))]
        brute = [(a, b) for a in range(len(segs)) for b in range(a + 1, len(segs))
                 if segs[a].gpa < segs[b].gpa + segs[b].memsz and segs[b].gpa < segs[a].gpa + segs[a].memsz]
        got = overlapping_pair(segs)
        assert (got is None) == (not brute), (segs, got, brute)
        assert got is None or got in brute
    # 200 000 segments: the all-pairs check needed 2e10 comparisons (hours); the sweep a moment
    segs = [Segment(0x1000 * i, b"", 16) for i in range(200_000)]
    assert overlapping_pair(segs) is None
    segs.append(Segment(0x1000 * 123_456 + 8, b"", 16))
    assert overlapping_pair(segs) == (123_456, 200_000)


def test_many_program_headers_load_or_are_refused_clearly(tmp_path):
    from tracevisor.loader import MAX_PROGRAM_HEADERS

    img = load_kernel(many_loads(tmp_path / "k4096", MAX_PROGRAM_HEADERS), 64 * MB)
    assert len(img.segments) == MAX_PROGRAM_HEADERS
    with pytest.raises(LoaderError, match="segments 2999 and 3000 overlap"):
        load_kernel(many_loads(tmp_path / "over", 4000, overlap_at=3000), 64 * MB)
    with pytest.raises(LoaderError, match=r"has 20000 program headers; tracevisor loads kernels with at most 4096"):
        load_kernel(many_loads(tmp_path / "k20000", 20_000), 256 * MB)
