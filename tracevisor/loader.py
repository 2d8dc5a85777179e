"""Kernel loading: static ELF64 x86-64 executables and Hermit kernels (entry-version note, PIE).

The rules follow uhyve 0.2.1 (see docs/compatibility.md for where tracevisor is stricter or more
lenient): ET_EXEC images load at their PT_LOAD addresses, ET_DYN (PIE) images at 0x40_0000 with their
R_X86_64_RELATIVE relocations applied.  Parsing is separated from placing so that a bad image is refused
before any VM exists, with one clear message per problem.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import LoaderError

PIE_LOAD_ADDRESS = 0x40_0000
BOOT_STACK_SIZE = 0x8000
BOOT_STRUCTURES_END = 0x1_3000  # GDT 0x1000, boot info 0x9000, page tables 0x10000-0x12FFF
SUPPORTED_ENTRY_VERSIONS = (2, 3, 4)

PT_LOAD, PT_DYNAMIC, PT_NOTE, PT_TLS = 1, 2, 4, 7
#: At most this many program headers.  Linkers emit a handful (a Hermit kernel has under 10; even one
#: segment per section stays in the hundreds); 4096 is far above any real image while bounding what a
#: hostile one costs to parse and place (each header is parsed several times, each PT_LOAD copied).
MAX_PROGRAM_HEADERS = 4096
ET_EXEC, ET_DYN = 2, 3
EM_X86_64 = 62
R_X86_64_RELATIVE = 8
HERMIT_NOTE_NAME = b"HERMIT"
HERMIT_NOTE_TYPE = 0x5A00

_MACHINES = {3: "i386", 40: "ARM", 183: "AArch64", 243: "RISC-V", 8: "MIPS", 20: "PowerPC",
             21: "PowerPC64", 22: "s390"}


@dataclass
class Segment:
    gpa: int
    data: bytes
    memsz: int


@dataclass
class KernelImage:
    """A parsed kernel, ready to be placed into guest memory."""

    path: str
    sha256: str
    file_size: int
    entry: int
    load_address: int
    image_end: int
    segments: list[Segment]
    entry_version: int | None  # None: a plain ELF without the Hermit note
    pie: bool
    relocations: list[tuple[int, int]] = field(default_factory=list)  # (gpa, value)
    tls: tuple[int, int, int, int] = (0, 0, 0, 0)  # start, filesz, memsz, align

    @property
    def boot_stack(self) -> tuple[int, int]:
        return self.load_address - BOOT_STACK_SIZE, self.load_address

    def place(self, memory) -> None:
        """Copy segments (zero-filling up to memsz) and apply relocations through GuestMemory."""
        for seg in self.segments:
            memory.write(seg.gpa, seg.data, "kernel segment")
            if seg.memsz > len(seg.data):
                memory.fill(seg.gpa + len(seg.data), seg.memsz - len(seg.data))
        for gpa, value in self.relocations:
            memory.write_u64(gpa, value)


def overlapping_pair(segments: list[Segment]) -> tuple[int, int] | None:
    """Indices (ascending) of two segments whose [gpa, gpa + memsz) ranges overlap, or None.

    Sorted sweep, O(n log n): each segment is compared with the one reaching furthest among those that start
    at or before it (a quadratic all-pairs check cost minutes of CPU for a hostile image's many PT_LOADs,
    before --timeout applied).  Empty segments overlap only a range they lie strictly inside."""
    order = sorted(range(len(segments)), key=lambda i: (segments[i].gpa, segments[i].gpa + segments[i].memsz))
    reach, reach_i = -1, -1  # the furthest end so far, and whose it is
    for i in order:
        seg = segments[i]
        end = seg.gpa + seg.memsz
        if seg.gpa < reach and segments[reach_i].gpa < end:
            return (min(i, reach_i), max(i, reach_i))
        if end > reach:
            reach, reach_i = end, i
    return None


def _hermit_entry_version(elf, path: str) -> int | None:
    """The descriptor byte of the HERMIT/0x5A00 note, searching every PT_NOTE segment."""
    for seg in elf.iter_segments():
        if seg["p_type"] != "PT_NOTE":
            continue
        data = seg.data()
        align = max(4, seg["p_align"] or 4)
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name_off = pos + 12
            desc_off = name_off + ((namesz + align - 1) // align) * align
            end = desc_off + ((descsz + align - 1) // align) * align
            if desc_off + descsz > len(data):
                break
            name = data[name_off:name_off + namesz].rstrip(b"\0")
            if name == HERMIT_NOTE_NAME and ntype == HERMIT_NOTE_TYPE:
                if descsz < 1:
                    raise LoaderError(f"{path}: the HERMIT entry-version note is empty")
                return data[desc_off]
            pos = end
    return None


def load_kernel(path: str | os.PathLike, memory_size: int) -> KernelImage:
    """Parse and validate ``path``; raise LoaderError with one clear line on any problem."""
    path = str(path)
    if not path:
        raise LoaderError("no kernel given (the kernel path is empty)")
    p = Path(path)
    if not p.exists():
        raise LoaderError(f"kernel not found: {path}")
    if p.is_dir():
        raise LoaderError(f"kernel path is a directory, not an ELF file: {path}")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; only regular files are read at all
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise LoaderError(f"cannot read kernel {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise LoaderError(f"kernel {path} is not a regular file (a device, FIFO or socket)")
        try:
            raw = f.read()
        except OSError as e:
            raise LoaderError(f"cannot read kernel {path}: {e.strerror}") from None
    if raw[:4] != b"\x7fELF":
        raise LoaderError(f"{path} is not an ELF file (no ELF magic)")
    if len(raw) < 20:
        raise LoaderError(f"{path} is a truncated ELF file ({len(raw)} bytes)")
    if raw[4] == 1:
        raise LoaderError(f"{path} is a 32-bit ELF (ELFCLASS32); tracevisor boots 64-bit x86-64 kernels only")
    if raw[4] != 2:
        raise LoaderError(f"{path} has an invalid ELF class byte {raw[4]}")
    if raw[5] != 1:
        raise LoaderError(f"{path} is a big-endian ELF; x86-64 kernels are little-endian")
    machine = struct.unpack_from("<H", raw, 18)[0]
    if machine != EM_X86_64:
        name = _MACHINES.get(machine, f"machine {machine}")
        raise LoaderError(f"{path} is built for {name}, not x86-64")
    if len(raw) < 64:
        raise LoaderError(f"{path} is a truncated ELF file ({len(raw)} bytes)")
    try:
        return _parse(path, raw, memory_size)
    except LoaderError:
        raise
    except Exception as e:  # pyelftools raises many kinds of errors on malformed files
        raise LoaderError(f"{path}: malformed ELF ({type(e).__name__}: {e})") from None


def _parse(path: str, raw: bytes, memory_size: int) -> KernelImage:
    import io

    from elftools.elf.elffile import ELFFile

    elf = ELFFile(io.BytesIO(raw))
    e_type = elf["e_type"]
    if e_type not in ("ET_EXEC", "ET_DYN"):
        raise LoaderError(f"{path} is an ELF of type {e_type}; a kernel must be ET_EXEC or ET_DYN")
    pie = e_type == "ET_DYN"
    version = _hermit_entry_version(elf, path)
    if version is not None and version not in SUPPORTED_ENTRY_VERSIONS:
        hint = " (uhyve 0.1.3 kernels)" if version == 1 else ""
        raise LoaderError(f"{path} announces Hermit entry version {version}{hint}; "
                          f"tracevisor boots entry versions {', '.join(map(str, SUPPORTED_ENTRY_VERSIONS))}")

    n_headers = elf.num_segments()
    if n_headers > MAX_PROGRAM_HEADERS:
        raise LoaderError(f"{path} has {n_headers} program headers; tracevisor loads kernels with at most "
                          f"{MAX_PROGRAM_HEADERS} (linkers emit a handful)")
    loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
    if not loads:
        raise LoaderError(f"{path} has no PT_LOAD segment")
    first = loads[0]
    load_address = PIE_LOAD_ADDRESS if pie else first["p_vaddr"]
    bias = load_address if pie else 0
    image_start = first["p_vaddr"] + bias
    image_end = max(s["p_vaddr"] + s["p_memsz"] for s in loads) + bias
    mib = memory_size / (1 << 20)
    if image_end > memory_size:
        raise LoaderError(
            f"{path} needs guest memory up to {image_end:#x} ({image_end / (1 << 20):.1f} MiB) but guest "
            f"memory is {mib:g} MiB; raise --memory")
    if load_address < BOOT_STRUCTURES_END + BOOT_STACK_SIZE:
        raise LoaderError(
            f"{path} loads at {load_address:#x}, which leaves no room for the boot structures "
            f"(0x0-{BOOT_STRUCTURES_END:#x}) and the 32 KiB boot stack below it; link it at 0x400000 or above")
    stack_lo = load_address - BOOT_STACK_SIZE
    segments: list[Segment] = []
    for i, s in enumerate(loads):
        gpa = s["p_vaddr"] + bias
        memsz, filesz = s["p_memsz"], s["p_filesz"]
        end = gpa + memsz
        if filesz > memsz:
            raise LoaderError(f"{path}: segment {i} has p_filesz > p_memsz")
        if end > memory_size or gpa < 0:
            raise LoaderError(f"{path}: segment {i} [{gpa:#x}, {end:#x}) lies outside guest memory "
                              f"[0, {memory_size:#x}); raise --memory")
        if gpa < BOOT_STRUCTURES_END:
            raise LoaderError(f"{path}: segment {i} [{gpa:#x}, {end:#x}) overlaps the boot structures "
                              f"(GDT, boot info, page tables at 0x0-{BOOT_STRUCTURES_END:#x})")
        if gpa < load_address and end > stack_lo:
            raise LoaderError(f"{path}: segment {i} [{gpa:#x}, {end:#x}) overlaps the boot stack "
                              f"[{stack_lo:#x}, {load_address:#x})")
        if s["p_offset"] + filesz > len(raw):
            raise LoaderError(f"{path}: segment {i} extends past the end of the file (truncated?)")
        segments.append(Segment(gpa, raw[s["p_offset"]:s["p_offset"] + filesz], memsz))
    pair = overlapping_pair(segments)
    if pair is not None:
        raise LoaderError(f"{path}: segments {pair[0]} and {pair[1]} overlap")

    relocations: list[tuple[int, int]] = []
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_DYNAMIC":
            relocations = _relocations(path, elf, seg, bias, pie, image_start, image_end)

    tls = (0, 0, 0, 0)
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_TLS":
            tls = (seg["p_vaddr"] + bias, seg["p_filesz"], seg["p_memsz"], seg["p_align"])
            break

    entry = elf["e_entry"] + bias
    if not any(sg.gpa <= entry < sg.gpa + sg.memsz for sg in segments):
        raise LoaderError(f"{path}: entry point {entry:#x} lies outside every loaded segment")
    return KernelImage(
        path=path, sha256=hashlib.sha256(raw).hexdigest(), file_size=len(raw), entry=entry,
        load_address=load_address, image_end=image_end, segments=segments, entry_version=version,
        pie=pie, relocations=relocations, tls=tls)


def _relocations(path, elf, dyn_seg, bias, pie, image_start, image_end) -> list[tuple[int, int]]:
    tags = {}
    needed = []
    for tag in dyn_seg.iter_tags():
        if tag.entry.d_tag == "DT_NEEDED":
            needed.append(tag.needed)
        else:
            tags[tag.entry.d_tag] = tag.entry.d_val
    if needed:
        raise LoaderError(f"{path} is dynamically linked (needs {', '.join(needed)}); "
                          "a kernel must be self-contained")
    if tags.get("DT_RELCOUNT", 0) or tags.get("DT_REL"):
        raise LoaderError(f"{path} uses DT_REL relocations; only DT_RELA R_X86_64_RELATIVE is supported")
    if not pie or "DT_RELA" not in tags:
        return []
    rela, relasz = tags["DT_RELA"], tags.get("DT_RELASZ", 0)
    entsz = tags.get("DT_RELAENT", 24) or 24
    # DT_RELA is a virtual address; find the file offset through the PT_LOAD that contains it.
    off = None
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= rela < seg["p_vaddr"] + seg["p_filesz"]:
            off = seg["p_offset"] + (rela - seg["p_vaddr"])
    if off is None:
        raise LoaderError(f"{path}: DT_RELA {rela:#x} is not inside a loaded segment")
    data = elf.stream.getvalue()
    out = []
    for i in range(relasz // entsz):
        r_offset, r_info, r_addend = struct.unpack_from("<QQq", data, off + i * entsz)
        rtype = r_info & 0xFFFF_FFFF
        if rtype == 0:  # R_X86_64_NONE
            continue
        if rtype != R_X86_64_RELATIVE:
            raise LoaderError(f"{path}: relocation {i} has type {rtype}; only R_X86_64_RELATIVE (8) is "
                              "supported")
        target = r_offset + bias
        if not (image_start <= target and target + 8 <= image_end):
            raise LoaderError(f"{path}: relocation {i} targets {target:#x}, outside the image")
        out.append((target, (bias + r_addend) & 0xFFFF_FFFF_FFFF_FFFF))
    return out
