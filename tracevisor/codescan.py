"""Sweep a kernel's executable segments with a real disassembler and classify instruction starts.

Why: the instruction fallback (tracevisor/fallback.py) runs guest code in a user-space CPU emulator in
*bursts* and must stop before every instruction whose effect KVM has to see (port I/O, interrupt flag,
MSRs, control registers, time and random sources, atomics, XSAVE-family…).  Deciding that per executed
instruction would cost a Python callback each; instead the kernel's executable PT_LOAD segments are
disassembled once (capstone, linear sweep), and the start address of every such instruction becomes an
exit address of the emulator.  The same classification lists the sites of nondeterministic instructions
(RDTSC, RDRAND, RDSEED…) for later use.

The sweep is cached per kernel SHA-256 under ``~/.cache/tracevisor`` (it takes about a second).
capstone is imported lazily: guests that never need the fallback never load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field

SCAN_VERSION = 3  # 2: runs of int3 padding are not exits; 3: atomic instructions listed apart

# Instructions that only KVM may execute (the emulator must stop before them), by mnemonic.
KVM_ONLY = frozenset("""
in out insb insw insd outsb outsw outsd
cli sti hlt iret iretd iretq int int1 int3 into syscall sysret sysretq sysenter sysexit
rdmsr wrmsr rdtsc rdtscp rdpmc rdrand rdseed cpuid rdpid rdpkru wrpkru
lgdt lidt lldt ltr sgdt sidt sldt str invlpg invlpga invpcid wbinvd invd clts lmsw smsw swapgs
xsave xsave64 xsaveopt xsaveopt64 xsavec xsavec64 xsaves xsaves64 xrstor xrstor64 xrstors xrstors64
xgetbv xsetbv monitor mwait monitorx mwaitx vmcall vmmcall vmfunc ud2 ud0 ud1 popf popfq popfd
ljmp lcall retf retfq lret lretq lss lfs lgs pushf pushfq
encls enclu getsec senduipi uiret clui stui testui tpause umwait umonitor
""".split())
# Nondeterministic for replay (a subset of KVM_ONLY, listed separately for other users of the sweep).
NONDETERMINISTIC = frozenset("rdtsc rdtscp rdrand rdseed rdpmc cpuid".split())
_CTRL_REG = re.compile(r"(?:^|, )[cd]r\d+\b")
_SEGMENT_REGS = ("ss", "ds", "es", "fs", "gs", "cs")


@dataclass
class CodeScan:
    """The result of one sweep: exit addresses for the emulator and nondeterministic sites."""

    exits: list[int] = field(default_factory=list)  # instruction starts the emulator must not execute
    kinds: dict[str, int] = field(default_factory=dict)  # why, counted per class (for reports/headers)
    nondeterministic: dict[str, list[int]] = field(default_factory=dict)  # mnemonic → addresses
    atomic: list[int] = field(default_factory=list)  # the exits that are there only for atomicity (lock, xchg)
    ranges: list[tuple[int, int]] = field(default_factory=list)  # swept [start, end) guest-virtual ranges
    instructions: int = 0

    def exit_set(self, atomics: bool = True) -> list[int]:
        """The exits the emulator uses.  ``atomics=False`` when only one vCPU runs at a time (one vCPU, or
        exact mode's serialized vCPUs): a locked instruction is then atomic in the emulator too, and a
        burst need not stop there."""
        if atomics or not self.atomic:
            return self.exits
        drop = set(self.atomic)
        return [a for a in self.exits if a not in drop]

    def digest(self, atomics: bool = True) -> str:
        """A short hash of the exit set (recorded in the trace header; replay must use the same)."""
        h = hashlib.sha256()
        for a in self.exit_set(atomics):
            h.update(a.to_bytes(8, "little"))
        return h.hexdigest()[:16]

    def as_json(self) -> dict:
        return {"version": SCAN_VERSION, "exits": self.exits, "kinds": self.kinds,
                "nondeterministic": self.nondeterministic, "ranges": self.ranges,
                "instructions": self.instructions, "atomic": self.atomic}

    @classmethod
    def from_json(cls, d: dict) -> CodeScan:
        return cls(exits=list(d["exits"]), kinds=dict(d["kinds"]),
                   nondeterministic={k: list(v) for k, v in d["nondeterministic"].items()},
                   ranges=[tuple(r) for r in d["ranges"]], instructions=int(d["instructions"]),
                   atomic=list(d.get("atomic", [])))


def classify(mnemonic: str, op_str: str) -> str | None:
    """Why an instruction must run in KVM rather than the emulator, or None if the emulator may run it.

    Works on capstone's "lite" output (mnemonic with prefixes, operand text), which is enough and
    several times faster than full operand details."""
    words = mnemonic.split()
    if not words:
        return None
    if words[0] == "lock":
        return "atomic"  # multi-vCPU atomicity: only the real CPU provides it
    base = words[-1]
    if base in KVM_ONLY:
        if base in NONDETERMINISTIC:
            return "nondeterministic"
        if base.startswith(("xsave", "xrstor", "xgetbv", "xsetbv")):
            return "xsave"
        if base in ("in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd"):
            return "io"
        return "system"
    if base == "xchg" and "ptr" in op_str:
        return "atomic"  # xchg with memory is implicitly locked
    if base == "mov" and _CTRL_REG.search(op_str):
        return "system"  # control/debug register access
    if base in ("mov", "pop") and op_str:
        first = op_str.split(",")[0].strip()
        if first in _SEGMENT_REGS:
            return "system"  # segment loads read the GDT and change state the fallback does not copy
    if base.startswith("v") and ("mm" in op_str or base in ("vzeroupper", "vzeroall")):
        return "avx"  # VEX/EVEX encodings: not in the emulator (Unicorn 2 has no AVX)
    if base.startswith("k") and ("k0" in op_str or "k1" in op_str or " k" in op_str):
        return "avx"  # AVX-512 mask-register instructions
    return None


def sweep(chunks: list[tuple[int, bytes]]) -> CodeScan:
    """Linear-sweep disassembly of (guest-virtual address, bytes) chunks; undecodable bytes are skipped
    one at a time (capstone's skipdata) so the sweep resynchronises after padding and data."""
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.skipdata = True
    scan = CodeScan()
    exits = []
    kinds: dict[str, int] = {}
    nondet: dict[str, list[int]] = {}
    atomic: list[int] = []
    n = 0
    for base, data in chunks:
        scan.ranges.append((base, base + len(data)))
        prev_int3 = None  # address of an int3 kept as an exit just before this instruction
        for addr, _size, mnem, ops in md.disasm_lite(data, base):
            n += 1
            if mnem == ".byte":
                prev_int3 = None
                continue
            why = classify(mnem, ops)
            if why is None:
                prev_int3 = None
                continue
            if mnem == "int3":
                # Runs of int3 are the compiler's padding between functions (tens of thousands in a Rust
                # kernel) and never execute; Unicorn's cost per burst grows with the number of exits, so
                # only an isolated int3 stays one.  An executed padding int3 still stops the emulator:
                # it raises #BP there (an interrupt), which the fallback injects as KVM would.
                if prev_int3 is not None:
                    if exits and exits[-1] == prev_int3:
                        exits.pop()
                        kinds[why] -= 1
                    prev_int3 = addr
                    continue
                prev_int3 = addr
            else:
                prev_int3 = None
            exits.append(addr)
            kinds[why] = kinds.get(why, 0) + 1
            if why == "nondeterministic":
                nondet.setdefault(mnem.split()[-1], []).append(addr)
            elif why == "atomic":
                atomic.append(addr)
    scan.exits = sorted(set(exits))
    scan.kinds = kinds
    scan.nondeterministic = nondet
    scan.atomic = sorted(set(atomic))
    scan.instructions = n
    return scan


def executable_chunks(path: str, bias: int) -> list[tuple[int, bytes]]:
    """The executable PT_LOAD segments of an ELF file as (guest-virtual address, file bytes)."""
    from elftools.elf.elffile import ELFFile

    out = []
    with open(path, "rb") as f:
        elf = ELFFile(f)
        for seg in elf.iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_flags"] & 1:
                out.append((seg["p_vaddr"] + bias, seg.data()))
    return out


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tracevisor")


def scan_kernel(path: str, sha256: str, bias: int) -> CodeScan:
    """The sweep of a kernel, from the per-host cache when present (keyed by kernel hash, load bias and
    the scanner version)."""
    key = f"codescan-v{SCAN_VERSION}-{sha256[:24]}-{bias:x}.json"
    file = os.path.join(cache_dir(), key)
    try:
        with open(file) as f:
            return CodeScan.from_json(json.load(f))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    scan = sweep(executable_chunks(path, bias))
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        tmp = f"{file}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(scan.as_json(), f)
        os.replace(tmp, file)
    except OSError:
        pass  # a read-only home only costs the sweep next time
    return scan
