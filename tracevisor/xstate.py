"""XSAVE / XRSTOR in the standard (non-compacted) format, over KVM's XSAVE image of a vCPU.

Why: KVM's instruction emulator on nested/paravirtualised hosts cannot execute XSAVE/XRSTOR, and the
user-space CPU emulator used for bursts (Unicorn) does not implement them either.  Hermit saves and
restores task FPU state with them, so tracevisor performs them itself: the vCPU's extended state comes
from KVM_GET_XSAVE (already in the standard format), the save area lives in guest memory, and the
component offsets are those of CPUID leaf 0xD — exactly the architectural definition (Intel SDM vol. 1,
ch. 13).  These functions are pure over bytes so they are unit-tested without KVM.
"""

from __future__ import annotations

import struct

LEGACY_SIZE = 512
HEADER_OFFSET = 512
HEADER_SIZE = 64
MXCSR_OFFSET = 24
X87_RANGES = ((0, 24), (32, 160))  # FCW…FDP, then ST0–ST7 (the x87 component of the legacy region)
XMM_RANGE = (160, 416)
MXCSR_RESERVED_DEFAULT = 0xFFFF  # MXCSR_MASK as most CPUs report it: bits outside it #GP on load


class XstateFault(Exception):
    """The instruction raises #GP in the guest (bad alignment, reserved bits, compacted form…)."""


def components(cpuid_0d: dict[int, tuple[int, int]], rfbm: int) -> list[tuple[int, int, int]]:
    """(component, offset, size) of the extended components (≥ 2) selected by rfbm, from CPUID 0xD
    sub-leaves given as {i: (size=EAX, offset=EBX)}."""
    out = []
    for i in range(2, 64):
        if rfbm >> i & 1:
            if i not in cpuid_0d:
                raise XstateFault(f"component {i} has no CPUID 0xD sub-leaf")
            size, offset = cpuid_0d[i]
            out.append((i, offset, size))
    return out


def area_size(cpuid_0d: dict[int, tuple[int, int]], rfbm: int) -> int:
    """Bytes of a standard-format save area holding rfbm."""
    end = LEGACY_SIZE + HEADER_SIZE
    for _i, off, size in components(cpuid_0d, rfbm):
        end = max(end, off + size)
    return end


def _x87_init(image: bytes) -> bool:
    """Is the x87 part of a legacy region in its initial configuration (FCW 0x37F, all else 0)?"""
    return (struct.unpack_from("<H", image, 0)[0] == 0x37F and not any(image[2:24])
            and not any(image[32:160]))


def in_use(kvm_image: bytes, mxcsr: int, rfbm: int, cpuid_0d: dict[int, tuple[int, int]]) -> int:
    """The components of rfbm that are *not* in their initial configuration, judged from the register
    contents.  The CPU's own in-use tracking (XINUSE, what KVM's image header reports) may call a
    component in use after it returned to its initial values, and whether it does depends on the host
    and on when the host last saved the vCPU's state: a save area written from it would differ between
    a recording and its replay.  Judging by content is one of the answers the architecture allows
    (XINUSE[i] = 0 only in the initial configuration) and the same on every run."""
    bv = 0
    if rfbm & 1 and not _x87_init(kvm_image):
        bv |= 1
    a, b = XMM_RANGE
    if rfbm & 2 and (any(kvm_image[a:b]) or mxcsr != 0x1F80):
        bv |= 2
    for i, off, size in components(cpuid_0d, rfbm):
        if any(kvm_image[off:off + size]):
            bv |= 1 << i
    return bv


def xsave(kvm_image: bytes, area: bytes, rfbm: int, mxcsr: int,
          cpuid_0d: dict[int, tuple[int, int]]) -> bytes:
    """The save area after ``XSAVE`` with requested-feature bitmap ``rfbm`` (= XCR0 & EDX:EAX).

    ``kvm_image`` is the vCPU's state from KVM_GET_XSAVE.  A component in its initial configuration
    (see :func:`in_use`; KVM's own header bits are not used) is not written and its XSTATE_BV bit
    becomes 0, as the CPU does; MXCSR is written whenever SSE or AVX is requested."""
    out = bytearray(area)
    used = in_use(kvm_image, mxcsr, rfbm, cpuid_0d)
    bv = struct.unpack_from("<Q", out, HEADER_OFFSET)[0] & ~rfbm
    if used & 1:
        for a, b in X87_RANGES:
            out[a:b] = kvm_image[a:b]
    if rfbm & 6:
        struct.pack_into("<I", out, MXCSR_OFFSET, mxcsr)
        out[MXCSR_OFFSET + 4:MXCSR_OFFSET + 8] = kvm_image[MXCSR_OFFSET + 4:MXCSR_OFFSET + 8]
    if used & 2:
        a, b = XMM_RANGE
        out[a:b] = kvm_image[a:b]
    for i, off, size in components(cpuid_0d, rfbm):
        if used >> i & 1:
            out[off:off + size] = kvm_image[off:off + size]
    struct.pack_into("<Q", out, HEADER_OFFSET, bv | used)
    return bytes(out)


def xrstor(kvm_image: bytes, area: bytes, rfbm: int, cpuid_0d: dict[int, tuple[int, int]],
           mxcsr_mask: int = MXCSR_RESERVED_DEFAULT) -> bytes:
    """The vCPU's new KVM XSAVE image after ``XRSTOR`` from ``area`` with ``rfbm``.

    A component selected by rfbm is loaded from the area when its XSTATE_BV bit is set there, otherwise
    put in its initial configuration (its bit in KVM's header cleared: KVM restores it as init).
    Raises XstateFault for what makes the CPU raise #GP: XCOMP_BV ≠ 0 (compacted form), reserved header
    bytes, XSTATE_BV bits outside XCR0 (checked by the caller through rfbm ⊆ XCR0), MXCSR reserved bits."""
    img = bytearray(kvm_image)
    bv, xcomp = struct.unpack_from("<QQ", area, HEADER_OFFSET)
    if xcomp != 0:
        raise XstateFault("XRSTOR of a compacted-format area (XCOMP_BV ≠ 0) is not supported")
    if any(area[HEADER_OFFSET + 16:HEADER_OFFSET + HEADER_SIZE]):
        raise XstateFault("reserved bytes of the XSAVE header are not zero")
    kvm_bv = struct.unpack_from("<Q", img, HEADER_OFFSET)[0]
    if rfbm & 6:
        mxcsr = struct.unpack_from("<I", area, MXCSR_OFFSET)[0]
        if mxcsr & ~mxcsr_mask:
            raise XstateFault(f"MXCSR value {mxcsr:#x} sets reserved bits")
        struct.pack_into("<I", img, MXCSR_OFFSET, mxcsr)
    if rfbm & 1:
        if bv & 1:
            for a, b in X87_RANGES:
                img[a:b] = area[a:b]
            kvm_bv |= 1
        else:  # initial x87 state: FCW 0x37F, everything else 0 (KVM keeps the legacy region as given)
            for a, b in X87_RANGES:
                img[a:b] = bytes(b - a)
            struct.pack_into("<H", img, 0, 0x37F)
            kvm_bv &= ~1
    if rfbm & 2:
        a, b = XMM_RANGE
        if bv & 2:
            img[a:b] = area[a:b]
            kvm_bv |= 2
        else:
            img[a:b] = bytes(b - a)
            kvm_bv &= ~2
    for i, off, size in components(cpuid_0d, rfbm):
        if bv >> i & 1:
            img[off:off + size] = area[off:off + size]
            kvm_bv |= 1 << i
        else:
            img[off:off + size] = bytes(size)
            kvm_bv &= ~(1 << i)
    struct.pack_into("<Q", img, HEADER_OFFSET, kvm_bv)
    return bytes(img)
