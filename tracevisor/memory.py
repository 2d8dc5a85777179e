"""GuestMemory: the only way tracevisor touches guest RAM.

Every access names a guest-physical (address, length) range and is checked against the RAM size with
overflow-safe arithmetic; a range that leaves RAM (or wraps around 2^64) raises :class:`GuestError`.
Guest-virtual buffers are translated page by page by walking the guest's 4-level page tables from the
CR3 the caller supplies, honouring 2 MiB / 1 GiB pages and the Present bit.  No other module slices the
mapping.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

from .errors import GuestError

PAGE = 4096
_ADDR_MASK = 0x000F_FFFF_FFFF_F000  # physical-address bits of a page-table entry
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")


def is_canonical(va: int) -> bool:
    """x86-64 48-bit canonical form: bits 63..47 all equal."""
    top = va >> 47
    return top == 0 or top == 0x1FFFF


class GuestMemory:
    """Guest RAM at guest-physical [0, size), backed by one anonymous host mapping."""

    def __init__(self, size: int) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest memory size must be a positive multiple of {PAGE}")
        self.size = size
        self._mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                             mmap.PROT_READ | mmap.PROT_WRITE)
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self.host_address = ctypes.addressof(self._anchor)
        self._mv = memoryview(self._mm)
        self.host_dirty: set[int] | None = None  # pages written by the host, when tracking (checkpoints)

    # -- checks ----------------------------------------------------------------------------------
    def check(self, gpa: int, length: int, what: str = "guest buffer") -> None:
        """Raise GuestError unless [gpa, gpa+length) lies inside RAM."""
        if gpa < 0 or length < 0 or gpa > self.size or length > self.size - gpa:
            end = gpa + length
            raise GuestError(
                f"{what} [{gpa:#x}, {end:#x}) lies outside guest RAM [0, {self.size:#x})"
                + (" (wraps around 2^64)" if end >= 1 << 64 else ""),
                gpa=gpa, length=length)

    # -- physical access ---------------------------------------------------------------------------
    def read(self, gpa: int, length: int, what: str = "guest buffer") -> bytes:
        self.check(gpa, length, what)
        return self._mm[gpa:gpa + length]

    def _mark(self, gpa: int, n: int) -> None:
        if n:
            self.host_dirty.update(range(gpa >> 12, ((gpa + n - 1) >> 12) + 1))

    def write(self, gpa: int, data: bytes | bytearray | memoryview, what: str = "guest buffer") -> None:
        n = len(data)
        self.check(gpa, n, what)
        self._mv[gpa:gpa + n] = data
        if self.host_dirty is not None:
            self._mark(gpa, n)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.check(gpa, length)
        ctypes.memset(self.host_address + gpa, byte, length)
        if self.host_dirty is not None:
            self._mark(gpa, length)

    def read_u16(self, gpa: int, what: str = "guest u16") -> int:
        self.check(gpa, 2, what)
        return _U16.unpack_from(self._mm, gpa)[0]

    def read_u32(self, gpa: int, what: str = "guest u32") -> int:
        self.check(gpa, 4, what)
        return _U32.unpack_from(self._mm, gpa)[0]

    def read_u64(self, gpa: int, what: str = "guest u64") -> int:
        self.check(gpa, 8, what)
        return _U64.unpack_from(self._mm, gpa)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.check(gpa, 2)
        if self.host_dirty is not None:
            self._mark(gpa, 2)
        _U16.pack_into(self._mm, gpa, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        self.check(gpa, 4)
        if self.host_dirty is not None:
            self._mark(gpa, 4)
        _U32.pack_into(self._mm, gpa, value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        self.check(gpa, 8)
        if self.host_dirty is not None:
            self._mark(gpa, 8)
        _U64.pack_into(self._mm, gpa, value & 0xFFFF_FFFF_FFFF_FFFF)

    def read_cstr(self, gpa: int, limit: int = 4096, what: str = "string") -> bytes:
        """A NUL-terminated string starting at ``gpa``; the NUL must lie inside RAM and within ``limit``."""
        self.check(gpa, 1, what)
        end = min(self.size, gpa + limit)
        nul = self._mm.find(b"\0", gpa, end)
        if nul < 0:
            if end == self.size:
                raise GuestError(f"{what} at {gpa:#x} has no NUL terminator before the end of guest RAM",
                                 gpa=gpa)
            raise GuestError(f"{what} at {gpa:#x} is longer than {limit} bytes (no NUL found)", gpa=gpa)
        return self._mm[gpa:nul]

    def page(self, pfn: int) -> bytes:
        return self._mm[pfn << 12:(pfn + 1) << 12]

    def put_page(self, pfn: int, data: bytes) -> None:
        self._mv[pfn << 12:(pfn + 1) << 12] = data

    def snapshot(self) -> bytes:
        """A copy of all of RAM (checkpoints, tests)."""
        return self._mm[:]

    def restore(self, data: bytes) -> None:
        if len(data) != self.size:
            raise ValueError("snapshot size differs from guest memory size")
        self._mv[:] = data

    # -- virtual addresses -------------------------------------------------------------------------
    def translate(self, va: int, cr3: int, paging: bool = True) -> tuple[int, int]:
        """Guest-virtual → guest-physical.  Returns (gpa, bytes left in that page)."""
        if not paging:
            self.check(va, 1, "guest address")
            return va, PAGE - (va & (PAGE - 1))
        if va < 0 or va >= 1 << 64 or not is_canonical(va):
            raise GuestError(f"virtual address {va:#x} is not canonical", va=va)
        table = cr3 & _ADDR_MASK
        for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
            entry = self.read_u64(table + ((va >> shift) & 511) * 8, "page-table entry")
            if not entry & 1:
                raise GuestError(f"virtual address {va:#x} is not mapped (level-{level} entry not present)",
                                 va=va)
            if level in (3, 2) and entry & 0x80:  # 1 GiB / 2 MiB page
                size = 1 << shift
                gpa = (entry & _ADDR_MASK & ~(size - 1)) | (va & (size - 1))
                return gpa, size - (va & (size - 1))
            table = entry & _ADDR_MASK
        return table | (va & (PAGE - 1)), PAGE - (va & (PAGE - 1))

    def virt_ranges(self, va: int, length: int, cr3: int, paging: bool = True,
                    what: str = "guest buffer") -> list[tuple[int, int]]:
        """Physical (gpa, length) pieces of the virtual buffer [va, va+length), each checked against RAM."""
        if length < 0 or va < 0 or va + length > 1 << 64:
            raise GuestError(f"{what} [{va:#x}, +{length:#x}) wraps around the address space", va=va)
        if length > self.size:
            raise GuestError(f"{what} of {length} bytes is larger than guest RAM ({self.size} bytes)",
                             va=va, length=length)
        out: list[tuple[int, int]] = []
        buf = f"{what} [{va:#x}, +{length:#x})"  # reports name the whole buffer, not just the failing piece
        while length:
            try:
                gpa, room = self.translate(va, cr3, paging)
            except GuestError as e:
                raise GuestError(f"{buf}: {e}", **e.details) from None
            n = min(room, length)
            if gpa > self.size or n > self.size - gpa:
                raise GuestError(f"{buf} reaches physical [{gpa:#x}, {gpa + n:#x}), outside guest RAM "
                                 f"[0, {self.size:#x})", va=va, gpa=gpa, length=n)
            if out and out[-1][0] + out[-1][1] == gpa:
                out[-1] = (out[-1][0], out[-1][1] + n)
            else:
                out.append((gpa, n))
            va += n
            length -= n
        return out

    def read_virt(self, va: int, length: int, cr3: int, paging: bool = True,
                  what: str = "guest buffer") -> bytes:
        ranges = self.virt_ranges(va, length, cr3, paging, what)
        if len(ranges) == 1:
            gpa, n = ranges[0]
            return self._mm[gpa:gpa + n]
        return b"".join(self._mm[g:g + n] for g, n in ranges)

    def write_virt(self, va: int, data: bytes, cr3: int, paging: bool = True,
                   what: str = "guest buffer") -> None:
        pos = 0
        for gpa, n in self.virt_ranges(va, len(data), cr3, paging, what):
            self._mv[gpa:gpa + n] = data[pos:pos + n]
            if self.host_dirty is not None:
                self._mark(gpa, n)
            pos += n

    def close(self) -> None:
        self._mv.release()
        del self._anchor
        try:
            self._mm.close()
        except BufferError:
            pass
