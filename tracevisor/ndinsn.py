"""Nondeterministic instructions (RDTSC, RDTSCP, RDRAND, RDSEED): found before boot, answered by the host.

KVM cannot make these instructions exit to user space (RDTSC runs against the TSC offset, RDRAND/RDSEED
against the hardware; this host even ignores the CPUID mask that would hide RDRAND).  So an exact
recording finds every site in the kernel's executable code *before* it runs and rewrites it into an
instruction of the same length that does exit:

    0F 31            rdtsc            →  E7 pp          out imm8, eax  (a private port)
    0F 01 F9         rdtscp           →  3E E7 pp       (a DS prefix pads to 3 bytes; it has no effect)
    [pfx] 0F C7 /6   rdrand r16/32/64 →  3E.. E7 pp
    [pfx] 0F C7 /7   rdseed r16/32/64 →  3E.. E7 pp

The OUT changes no register and does not fault in ring 0.  At its exit the host emulates the original
instruction (EDX:EAX ← TSC, ECX ← TSC_AUX, dest ← random with CF=1 and OF/SF/ZF/AF/PF cleared) with a
value from the HostIO — recorded while recording, taken from the trace while replaying — writes the
registers back through KVM_CAP_SYNC_REGS (the dirty bit, no ioctl) and sets RIP to the end of the
original instruction, whatever the host's convention for RIP at a port-I/O exit is.

Only instruction starts reached by a *consistent* linear sweep are patched: capstone sweeps each
executable PT_LOAD; a site whose preceding :data:`RESYNC_WINDOW` bytes contain bytes the disassembler could
not decode (the sweep was resynchronising after data or padding) is not trusted with a patch.  Such sites
are covered by a hardware execution breakpoint (DR0–DR3) when one is free, else listed as *uncovered*
in the trace header and reported.  The patched bytes are checked again when the run ends: a guest that
rewrote its code (or code written at run time) is reported, not silently missed.

Two private ports alternate between consecutive sites, so that a site's start can never be confused with
the end of the one just before it (KVM reports RIP at a port-I/O exit either before or after the
instruction, depending on the host).

The sweep here is small on purpose and independent of the instruction fallback's code scan; the two can
share one capstone pass later (the classification of instruction starts is the same idea).
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .codescan import executable_chunks

NDI_PORTS = (0xE6, 0xE7)
KINDS = ("rdtsc", "rdtscp", "rdrand", "rdseed")
RESYNC_WINDOW = 64  # bytes after undecodable bytes in which instruction starts are not trusted
MAX_DEBUG_SITES = 3  # DR0–DR2 (DR3 belongs to the multi-vCPU schedule, sched.py)
PAD_PREFIX = 0x3E  # DS segment override: ignored by OUT
_LEGACY_PREFIXES = frozenset((0x66, 0x67, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF0, 0xF2, 0xF3))
# x86 register number (ModRM rm + REX.B) → index in struct kvm_regs (rax rbx rcx rdx rsi rdi rsp rbp r8…r15)
_KVM_REG_INDEX = (0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15)
RAX, RCX, RDX, RIP, RFLAGS = 0, 2, 3, 16, 17
_ARITH_FLAGS = 0x8D5  # CF PF AF ZF SF OF
REGS = struct.Struct("<18Q")
SYNC_REGS_OFFSET = 304  # kvm_run.s.regs on x86-64
IA32_TSC_AUX = 0xC000_0103


@dataclass(frozen=True)
class Site:
    """One nondeterministic instruction in the kernel image."""

    addr: int  # guest-virtual address of the first byte (the kernel is identity-mapped: also its gpa)
    length: int
    kind: str  # rdtsc | rdtscp | rdrand | rdseed
    reg: int  # rdrand/rdseed: destination register (x86 number 0–15); -1 otherwise
    bits: int  # rdrand/rdseed operand size (16/32/64); 64 for the TSC reads
    original: bytes
    how: str  # patch | debugreg | uncovered
    port: int = 0  # the private port of a patched site

    @property
    def end(self) -> int:
        return self.addr + self.length

    def patch_bytes(self) -> bytes:
        return bytes([PAD_PREFIX] * (self.length - 2) + [0xE7, self.port])

    def as_row(self) -> list:
        """The trace-header form: [addr, length, kind, reg, bits, original bytes (hex), how, port]."""
        return [self.addr, self.length, self.kind, self.reg, self.bits, self.original.hex(), self.how, self.port]

    @classmethod
    def from_row(cls, row) -> Site:
        addr, length, kind, reg, bits, orig, how, port = row
        if kind not in KINDS or how not in ("patch", "debugreg", "uncovered") or not 2 <= int(length) <= 15:
            raise ValueError(f"bad site row {row!r:.80}")
        return cls(int(addr), int(length), kind, int(reg), int(bits), bytes.fromhex(orig), how, int(port))


def decode(insn: bytes) -> tuple[str, int, int] | None:
    """(kind, reg, bits) for the bytes of one RDTSC/RDTSCP/RDRAND/RDSEED instruction, or None if the
    encoding is not one this module knows how to emulate exactly (e.g. a REP prefix: RDPID/SENDUIPI)."""
    i, rex, opsize = 0, 0, False
    while i < len(insn) and insn[i] in _LEGACY_PREFIXES:
        if insn[i] in (0xF0, 0xF2, 0xF3):
            return None
        opsize |= insn[i] == 0x66
        i += 1
    if i < len(insn) and 0x40 <= insn[i] <= 0x4F:
        rex = insn[i]
        i += 1
    op = insn[i:]
    if op == b"\x0f\x31":
        return "rdtsc", -1, 64
    if op == b"\x0f\x01\xf9":
        return "rdtscp", -1, 64
    if len(op) == 3 and op[:2] == b"\x0f\xc7" and op[2] >> 6 == 3 and (op[2] >> 3) & 7 in (6, 7):
        kind = "rdrand" if (op[2] >> 3) & 7 == 6 else "rdseed"
        reg = (op[2] & 7) | ((rex & 1) << 3)
        bits = 64 if rex & 8 else 16 if opsize else 32
        return kind, reg, bits
    return None


@dataclass
class SiteScan:
    sites: list[Site]
    instructions: int  # instructions decoded by the sweep
    undecodable: int  # bytes the sweep skipped

    def summary(self) -> dict:
        by = {}
        for s in self.sites:
            by.setdefault(f"{s.kind}/{s.how}", 0)
            by[f"{s.kind}/{s.how}"] += 1
        return {"sites": len(self.sites), "by_kind": by, "instructions": self.instructions,
                "undecodable_bytes": self.undecodable}


_PATTERN = re.compile(rb"\x0f\x31|\x0f\x01\xf9|\x0f\xc7[\xf0-\xff]")


def find_sites(chunks: Iterable[tuple[int, bytes]], debug_slots: int = MAX_DEBUG_SITES) -> SiteScan:
    """Sweep (guest-virtual address, bytes) chunks of executable code and classify every nondeterministic
    instruction: ``patch`` when a consistent stretch of the sweep starts an instruction there,
    ``debugreg`` (up to ``debug_slots``) or ``uncovered`` otherwise.

    Where the sweep met undecodable bytes, it may have resynchronised on the wrong boundaries (and then
    missed an instruction that the code jumps to).  There — from the first undecodable byte to
    :data:`RESYNC_WINDOW` bytes after the last — every occurrence of an opcode pattern counts as a possible
    site: an execution breakpoint on an address that is not an instruction start never fires, so a debug
    register is always safe there, where a patch would not be."""
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.skipdata = True
    found: dict[int, tuple[bytes, bool]] = {}  # addr → (bytes, trusted)
    n = skipped = 0
    wanted = frozenset(KINDS)
    for base, data in chunks:
        data = bytes(data)
        untrusted: list[tuple[int, int]] = []  # [start, end) addresses
        for addr, size, mnem, _ops in md.disasm_lite(data, base):
            if mnem == ".byte":
                skipped += size
                if untrusted and addr <= untrusted[-1][1]:
                    untrusted[-1] = (untrusted[-1][0], addr + size + RESYNC_WINDOW)
                else:
                    untrusted.append((addr, addr + size + RESYNC_WINDOW))
                continue
            n += 1
            if mnem.split()[-1] in wanted:
                found[addr] = (data[addr - base:addr - base + size], True)
        starts = [u[0] for u in untrusted]
        for addr in list(found):
            i = bisect.bisect_right(starts, addr) - 1
            if base <= addr < base + len(data) and i >= 0 and addr < untrusted[i][1]:
                found[addr] = (found[addr][0], False)
        for lo, hi in untrusted:  # every opcode pattern there is a possible site
            seg = data[lo - base:min(hi, base + len(data)) - base]
            for m in _PATTERN.finditer(seg):
                addr = lo + m.start()
                if addr not in found:
                    found[addr] = (m.group(), False)
    sites: list[Site] = []
    slots = debug_slots
    k = 0
    for addr in sorted(found):
        raw, trusted = found[addr]
        d = decode(raw)
        if d is None:
            trusted = False
            # an encoding we cannot emulate: named by its opcode family for the report
            kind = "rdtscp" if raw.endswith(b"\x01\xf9") else "rdtsc" if raw.endswith(b"\x0f\x31") else \
                "rdseed" if (raw[-1] >> 3) & 7 == 7 else "rdrand"
            d = (kind, -1, 64)
        kind, reg, bits = d
        if trusted:
            sites.append(Site(addr, len(raw), kind, reg, bits, raw, "patch", NDI_PORTS[k % 2]))
            k += 1
        elif decode(raw) is not None and slots > 0:
            sites.append(Site(addr, len(raw), kind, reg, bits, raw, "debugreg"))
            slots -= 1
        else:
            sites.append(Site(addr, len(raw), kind, reg, bits, raw, "uncovered"))
    return SiteScan(sites, n, skipped)


def scan_image(image) -> SiteScan:
    """The sites of a loaded :class:`~tracevisor.loader.KernelImage` (PIE images at their load bias)."""
    from .loader import PIE_LOAD_ADDRESS

    return find_sites(executable_chunks(image.path, PIE_LOAD_ADDRESS if image.pie else 0))


# -- emulation (shared by the KVM exit handler and the instruction fallback) ---------------------------
def emulate(site: Site, regs: list[int], hostio, cpu: int, tsc_aux: Callable[[], int] | None = None) -> None:
    """Apply the effect of ``site``'s original instruction to ``regs`` (the 18 u64 of struct kvm_regs, in
    order, modified in place), asking ``hostio`` for the value — so a recording logs it and a replay
    answers it from the trace.  RIP is set to the end of the original instruction.

    The instruction fallback calls this too when its emulator reaches a site (see :meth:`Patcher.at`)."""
    kind = site.kind
    if kind == "rdtsc" or kind == "rdtscp":
        t = hostio.rdtsc(cpu) & 0xFFFF_FFFF_FFFF_FFFF
        regs[RAX] = t & 0xFFFF_FFFF
        regs[RDX] = t >> 32
        if kind == "rdtscp":
            regs[RCX] = (tsc_aux() if tsc_aux is not None else 0) & 0xFFFF_FFFF
    else:
        value = hostio.rdrand(cpu, site.bits, kind == "rdseed") & ((1 << site.bits) - 1)
        i = _KVM_REG_INDEX[site.reg]
        if site.bits == 16:
            regs[i] = (regs[i] & ~0xFFFF) | value
        else:
            regs[i] = value  # a 32-bit destination is zero-extended
        regs[RFLAGS] = (regs[RFLAGS] & ~_ARITH_FLAGS) | 1
    regs[RIP] = site.end


class Patcher:
    """The sites of one VM: patches them into guest memory, and answers their exits."""

    def __init__(self, sites: list[Site]) -> None:
        self.sites = sites
        self.by_exit: dict[tuple[int, int], Site] = {}
        self.by_addr: dict[int, Site] = {}
        for s in sites:
            self.by_addr[s.addr] = s
            if s.how == "patch":
                # RIP at a port-I/O exit is the instruction's start on some hosts, its end on others
                self.by_exit[(s.port, s.addr)] = s
                self.by_exit[(s.port, s.end)] = s
        self.debug_sites = [s for s in sites if s.how == "debugreg"]
        self.uncovered = [s for s in sites if s.how == "uncovered"]
        self.answered = 0

    def apply(self, memory) -> None:
        """Rewrite every ``patch`` site; the bytes there must be the recorded original ones (a replay of a
        different kernel with --force stops here with one line instead of emulating the wrong thing)."""
        from .errors import TracevisorError

        for s in self.sites:
            have = memory.read(s.addr, s.length)
            if have != s.original:
                raise TracevisorError(
                    f"the kernel's bytes at {s.addr:#x} are {have.hex()}, not the recorded {s.kind} "
                    f"({s.original.hex()}): the site table does not belong to this kernel")
        for s in self.sites:
            if s.how == "patch":
                memory.write(s.addr, s.patch_bytes(), "nondeterministic-instruction patch")

    def check_intact(self, memory) -> list[str]:
        """Problems found when the run ends: patched sites the guest overwrote (it rewrote its own code, so
        what ran there is unknown to the recording)."""
        out = []
        for s in self.sites:
            if s.how != "patch":
                continue
            try:
                have = memory.read(s.addr, s.length)
            except Exception:
                continue
            if have != s.patch_bytes():
                out.append(f"the guest overwrote the patched {s.kind} at {s.addr:#x} (now {have.hex()}): code "
                           "written at run time is not covered by the recording")
        return out

    def at(self, port: int, rip: int) -> Site | None:
        """The patched site whose exit this is (port, RIP at the exit), or None."""
        return self.by_exit.get((port, rip))

    def debug_registers(self) -> list[int]:
        """kvm_guest_debug_arch.debugreg: DR0–3 at the debugreg sites, DR7 enabling them as execution
        breakpoints (L0–L3, R/W=00, LEN=00)."""
        regs = [0] * 8
        dr7 = 0
        for i, s in enumerate(self.debug_sites[:MAX_DEBUG_SITES]):
            regs[i] = s.addr
            dr7 |= 1 << (2 * i)
        regs[7] = dr7
        return regs

    def header(self) -> dict:
        return {"sites": [s.as_row() for s in self.sites], "ports": list(NDI_PORTS)}

    @classmethod
    def from_header(cls, d: dict) -> Patcher:
        return cls([Site.from_row(r) for r in d.get("sites") or []])
