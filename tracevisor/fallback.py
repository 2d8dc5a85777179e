"""The instruction fallback: what KVM's instruction emulator cannot execute, tracevisor does.

On nested or paravirtualised KVM hosts, guest ring-0 code runs in KVM's instruction emulator, which
lacks XGETBV, XSAVE/XRSTOR and most SSE/x87 instructions: the vCPU stops with KVM_EXIT_INTERNAL_ERROR
(suberror 1, emulation failure).  :class:`Fallback` takes over at that point:

* **XGETBV** is answered from KVM_GET_XCRS; **XSAVE/XSAVEOPT/XRSTOR** are performed over KVM_GET/SET_XSAVE
  and guest memory (tracevisor/xstate.py).
* Everything else runs in a **burst** of Unicorn (QEMU's TCG as a library) over the guest's own RAM
  (mapped zero-copy): from the failing instruction until an instruction KVM must see (an exit address
  from the kernel sweep, tracevisor/codescan.py: I/O, CLI/STI/HLT, IRET/INT/SYSCALL, MSR and control
  registers, RDTSC/RDRAND/CPUID, XSAVE-family, AVX, atomics) or an instruction budget.  A burst's end
  depends only on the code and the budget, never on wall time, so a replay reproduces it.
* An exception raised inside a burst stops it at the faulting instruction.  If that is the burst's
  first instruction the exception is injected into the guest (KVM_SET_VCPU_EVENTS; CR2 for #PF) as the
  CPU would raise it — this is how lazy-FPU #NM (CR0.TS set) reaches Hermit; otherwise KVM re-executes
  the instruction and faults natively, or fails again and the next burst injects.
* Memory outside guest RAM (MMIO) is never accessed inside a burst: the burst stops before the access
  and KVM performs it.

Unicorn and capstone are imported only when a vCPU first needs the fallback.
"""

from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass

from . import codescan, xstate
from .errors import TracevisorError
from .kvm import uapi as U
from .runloop import SYNC_REGS_OFFSET

# Burst budgets (bound interrupt latency; deterministic).  "blocks": translation blocks, counted by the native
# extension's block hook; "instructions": Unicorn's own per-instruction counter — recordings made before
# budgets counted blocks, and hosts where the extension cannot be built (a Python block hook would cost a
# callback per block).
BUDGET_DEFAULTS = {"blocks": 10_000, "instructions": 100_000}
BUDGET_UNITS = tuple(BUDGET_DEFAULTS)
DEFAULT_BUDGET = BUDGET_DEFAULTS["blocks"]
MODES = ("auto", "on", "off")

# Exception vectors (hook_intr numbers) that are faults at an instruction, and which carry an error code
_FAULTS = {0: "#DE", 1: "#DB", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 10: "#TS", 11: "#NP", 12: "#SS",
           13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 19: "#XM"}
_HAS_ERROR_CODE = {10, 11, 12, 13, 14, 17}
_SSE_OR_X87_HINT = ("xmm", "st(")


def unicorn_missing_message() -> str:
    return ("the instruction fallback needs the 'unicorn' and 'capstone' packages (pip install unicorn "
            "capstone), or run with --fallback off")


def load_engines():
    """Import unicorn and capstone, or raise one clear TracevisorError."""
    try:
        import capstone  # noqa: F401
        import unicorn  # noqa: F401
    except ImportError:
        raise TracevisorError(unicorn_missing_message()) from None
    return unicorn, capstone


def versions() -> dict:
    unicorn, capstone = load_engines()
    return {"unicorn": unicorn.__version__, "capstone": capstone.__version__}


@dataclass
class BurstResult:
    start: int
    end: int
    count: int
    stop: str  # exit | budget | fault | mmio | unsupported
    mnemonic: str
    vector: int | None = None
    transfer_ns: int = 0


class FallbackStop(Exception):
    """The fallback cannot continue the guest (e.g. AVX, MMIO by an SSE instruction): a clear report."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


class Disassembler:
    """capstone with operand details, cached per (address, bytes at that address)."""

    def __init__(self) -> None:
        import capstone

        self.cs = capstone
        self.md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self.md.detail = True
        self.lite = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        self._cache: dict[tuple[int, bytes], object] = {}  # (address, the bytes there) → instruction

    def one(self, code: bytes, addr: int):
        key = (addr, code)
        insn = self._cache.get(key, self)
        if insn is self:
            insn = next(iter(self.md.disasm(code, addr, 1)), None)
            if len(self._cache) < 65536:
                self._cache[key] = insn
        return insn

    def mnemonic(self, code: bytes, addr: int = 0) -> str:
        for _a, _s, mnem, ops in self.lite.disasm_lite(code, addr, 1):
            return f"{mnem} {ops}".strip()
        return "(undecodable)"

    def count_between(self, code: bytes, addr: int, end: int) -> int:
        n = 0
        for a, _s, _m, _o in self.lite.disasm_lite(code, addr):
            if a >= end:
                break
            n += 1
        return n


def instruction_hint(mnemonic: str) -> str:
    """The hint of a fault report for an instruction KVM's emulator could not execute."""
    what = mnemonic.split()[0] if mnemonic else "?"
    return (f"this host's KVM could not emulate the instruction at rip ({mnemonic}); nested or "
            f"paravirtualised KVM runs guest ring-0 code in its instruction emulator, which lacks "
            f"{what}: run with --fallback on (the default on such hosts) or on a host with direct KVM")


class _Engine:
    """One vCPU's Unicorn instance, with preallocated batched register transfer.

    The registers move between KVM's own structures (kvm_regs, kvm_sregs, kvm_fpu) and Unicorn with one
    ``uc_reg_write_batch`` and one ``uc_reg_read_batch`` whose value pointers point straight into those
    ctypes structures: no per-register Python call."""

    def __init__(self, fb: Fallback, memory) -> None:
        from unicorn import UC_ARCH_X86, UC_HOOK_BLOCK, UC_HOOK_INTR, UC_HOOK_MEM_INVALID, UC_MODE_64, UC_PROT_ALL, Uc
        from unicorn import x86_const as X
        from unicorn.unicorn_py3.unicorn import uclib

        self.fb = fb
        self.X = X
        self.uclib = uclib
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.uc.mem_map_ptr(0, memory.size, UC_PROT_ALL, memory.host_address)
        self.uc.ctl_exits_enabled(True)
        if fb.exits:
            self.uc.ctl_set_exits(fb.exits)
        self.regs = U.kvm_regs()
        self.sregs = U.kvm_sregs()
        self.fpu = U.kvm_fpu()
        self.efer = None
        gpr = ["RAX", "RBX", "RCX", "RDX", "RSI", "RDI", "RSP", "RBP", "R8", "R9", "R10", "R11", "R12",
               "R13", "R14", "R15", "RIP", "RFLAGS"]
        wr_ids, wr_ptrs, rd_ids, rd_ptrs = [], [], [], []
        regs_base = ctypes.addressof(self.regs)
        for i, name in enumerate(gpr):
            rid = getattr(X, f"UC_X86_REG_{name}")
            wr_ids.append(rid)
            wr_ptrs.append(regs_base + 8 * i)
            rd_ids.append(rid)
            rd_ptrs.append(regs_base + 8 * i)
        s_base = ctypes.addressof(self.sregs)
        wr_ids.append(X.UC_X86_REG_CR2)
        wr_ptrs.append(s_base + U.kvm_sregs.cr2.offset)
        self.crs = None  # (cr0, cr3, cr4) last given to Unicorn: rewritten only when they change
        for seg, rid in (("fs", X.UC_X86_REG_FS_BASE), ("gs", X.UC_X86_REG_GS_BASE)):
            off = s_base + getattr(U.kvm_sregs, seg).offset + U.kvm_segment.base.offset
            wr_ids.append(rid)
            wr_ptrs.append(off)
            rd_ids.append(rid)
            rd_ptrs.append(off)
        f_base = ctypes.addressof(self.fpu)
        xmm_off = f_base + U.kvm_fpu.xmm.offset
        for i in range(16):
            rid = getattr(X, f"UC_X86_REG_XMM{i}")
            wr_ids.append(rid)
            wr_ptrs.append(xmm_off + 16 * i)
            rd_ids.append(rid)
            rd_ptrs.append(xmm_off + 16 * i)
        mx = f_base + U.kvm_fpu.mxcsr.offset
        wr_ids.append(X.UC_X86_REG_MXCSR)
        wr_ptrs.append(mx)
        rd_ids.append(X.UC_X86_REG_MXCSR)
        rd_ptrs.append(mx)
        # x87 control/status/tag words go through 8-byte scratch slots (Unicorn reads/writes them as
        # 16-bit values; KVM keeps an abridged tag byte)
        self.x87 = (ctypes.c_uint64 * 3)()
        x_base = ctypes.addressof(self.x87)
        for i, rid in enumerate((X.UC_X86_REG_FPCW, X.UC_X86_REG_FPSW, X.UC_X86_REG_FPTAG)):
            wr_ids.append(rid)
            wr_ptrs.append(x_base + 8 * i)
            rd_ids.append(rid)
            rd_ptrs.append(x_base + 8 * i)
        self.cr2_ptr = (ctypes.c_uint64 * 1)()
        self._wr = ((ctypes.c_int * len(wr_ids))(*wr_ids), (ctypes.c_void_p * len(wr_ptrs))(*wr_ptrs),
                    len(wr_ids))
        self._rd = ((ctypes.c_int * len(rd_ids))(*rd_ids), (ctypes.c_void_p * len(rd_ptrs))(*rd_ptrs),
                    len(rd_ids))
        self.st_ids = [getattr(X, f"UC_X86_REG_ST{i}") for i in range(8)]
        self.uch = self.uc._uch
        self.vector: int | None = None
        self.bad_access: int | None = None
        self.blocks = 0
        self.block_icount = 0
        self.counted = 0
        self.last_block = (0, 0)
        self.icount_cache: dict[tuple[int, int], int] = {}
        self.uc.hook_add(UC_HOOK_INTR, self._on_intr)
        self.uc.hook_add(UC_HOOK_MEM_INVALID, self._on_invalid)
        self.unit = fb.budget_unit
        self.tracking = False  # store hook installed: written() lists the pages a burst wrote
        self.wpages: set[int] = set()
        self.wcross: list[int] = []
        self.counter_offset = None
        self.native = None  # the C block counter (tracevisor._fastloop.BlockCounter)
        self.limit = 0
        if self.unit == "blocks":
            self.native = _native_counter(uclib)
            if self.native is not None:
                self._add_native_hook(UC_HOOK_BLOCK, self.native.hook, "block")
            else:  # no native extension: the same budget and count from a Python block hook (slower)
                self.uc.hook_add(UC_HOOK_BLOCK, self._on_block)
        else:  # a recording made with an instruction budget: Unicorn's own per-instruction budget
            self.counter_offset = _counter_offset()
            if self.counter_offset is None:  # unknown Unicorn build: count with a (slow) block hook instead
                self.uc.hook_add(UC_HOOK_BLOCK, self._on_block)

    # hooks (called from inside uc_emu_start) ---------------------------------------------------
    def _on_intr(self, uc, intno, _user) -> None:
        self.vector = intno
        uc.emu_stop()

    def _on_invalid(self, uc, access, address, size, value, _user) -> bool:
        self.bad_access = address
        return False  # Unicorn stops at the instruction, which has not executed

    def _on_block(self, uc, address, size, _user) -> None:
        # A translation block is entered: the previous one ran to its end (exits split blocks).
        if self.limit:  # a budget in blocks (the native counter's rule): stop before the block runs
            if self.blocks >= self.limit:
                self.budget_hit = True
                uc.emu_stop()
                return
            self.blocks += 1
        self.counted += self.block_icount
        key = (address, size)
        n = self.icount_cache.get(key)
        if n is None:
            n = self.icount_cache[key] = self._block_icount(address, size)
        self.block_icount = n
        self.last_block = key

    def _on_write(self, uc, access, address, size, value, _user) -> None:
        last = (address + max(size, 1) - 1) >> 12
        self.wpages.update(range(address >> 12, last + 1))
        if last != address >> 12:
            self.wcross.append(address)

    def track_writes(self) -> None:
        """From now on, note the pages each burst stores to (Unicorn writes guest RAM through the host
        mapping, so KVM's dirty log misses them): installed only while something tracks written memory
        (it makes every store call the hook)."""
        from unicorn import UC_HOOK_MEM_WRITE

        if self.native is not None:
            self._add_native_hook(UC_HOOK_MEM_WRITE, self.native.write_hook, "store")
        else:
            self.uc.hook_add(UC_HOOK_MEM_WRITE, self._on_write)
        self.tracking = True

    def written(self) -> tuple[list[int], list[int], bool]:
        """What the last burst stored to (with track_writes): the guest-physical page numbers (Unicorn's
        store hook gets physical addresses), the physical addresses of stores that crossed a page boundary
        (the hook sees only the first byte's page: the next virtual page may be anywhere), and whether
        there were more of those than the native counter keeps."""
        if self.native is not None:
            return self.native.written()
        return list(self.wpages), list(self.wcross), False

    def _add_native_hook(self, kind: int, callback: int, what: str) -> None:
        """Install one of the native counter's C hooks (its address; the counter is the user data) for
        all addresses."""
        handle = ctypes.c_size_t()
        err = self.uclib.uc_hook_add(self.uch, ctypes.byref(handle), kind, ctypes.c_void_p(callback),
                                     ctypes.c_void_p(self.native.address), ctypes.c_uint64(1), ctypes.c_uint64(0))
        if err:
            raise TracevisorError(f"unicorn rejected the {what} hook (error {err})")

    def _instructions_before(self, address: int, size: int, end: int) -> int:
        """Instructions of the translation block at ``address`` (``size`` bytes) that start before ``end``:
        what ran of a block a burst stopped inside."""
        code = self.fb.read_virtual(address, size, self.sregs.cr3)
        return self.fb.dis.count_between(code, address, end)

    def _block_icount(self, address: int, size: int) -> int:
        """Instructions in the translation block at ``address`` (virtual) of ``size`` bytes."""
        return self._instructions_before(address, size, address + size) if size else 0

    # transfer ---------------------------------------------------------------------------------
    def load(self) -> None:
        fp = self.fpu
        self.x87[0] = fp.fcw
        self.x87[1] = fp.fsw
        tag = 0
        for i in range(8):
            if not (fp.ftwx >> i) & 1:
                tag |= 3 << (2 * i)
        self.x87[2] = tag
        crs = (self.sregs.cr0, self.sregs.cr3, self.sregs.cr4)
        if crs != self.crs:
            # Writing CR0/CR4 makes Unicorn recompute its mode and drop translated code: only on change
            X = self.X
            self.uc.reg_write(X.UC_X86_REG_CR4, crs[2])
            self.uc.reg_write(X.UC_X86_REG_CR3, crs[1])
            self.uc.reg_write(X.UC_X86_REG_CR0, crs[0])
            self.crs = crs
        else:
            # the guest may have changed its page tables (KVM ran INVLPG, not Unicorn): forget cached
            # translations, as a CR3 reload would
            self.uc.reg_write(self.X.UC_X86_REG_CR3, crs[1])
        if self.sregs.efer != self.efer:
            self.uc.msr_write(0xC0000080, self.sregs.efer)
            self.efer = self.sregs.efer
        ids, ptrs, n = self._wr
        err = self.uclib.uc_reg_write_batch(self.uch, ids, ptrs, n)
        if err:
            raise TracevisorError(f"unicorn rejected the register state (error {err})")
        if fp.ftwx:
            for i in range(8):
                raw = bytes(fp.fpr[i])
                self.uc.reg_write(self.st_ids[i], (int.from_bytes(raw[:8], "little"),
                                                   int.from_bytes(raw[8:10], "little")))

    def store(self) -> bool:
        """Read Unicorn's registers back into the KVM structures; True if x87 state must be written too."""
        ids, ptrs, n = self._rd
        err = self.uclib.uc_reg_read_batch(self.uch, ids, ptrs, n)
        if err:
            raise TracevisorError(f"unicorn could not read the register state (error {err})")
        fp = self.fpu
        old = (fp.fcw, fp.fsw, fp.ftwx)
        fp.fcw = self.x87[0] & 0xFFFF
        fp.fsw = self.x87[1] & 0xFFFF
        ftwx = 0
        for i in range(8):
            if (self.x87[2] >> (2 * i)) & 3 != 3:
                ftwx |= 1 << i
        fp.ftwx = ftwx
        if ftwx:
            for i in range(8):
                mant, exp = self.uc.reg_read(self.st_ids[i])
                raw = mant.to_bytes(8, "little") + (exp & 0xFFFF).to_bytes(2, "little")
                ctypes.memmove(ctypes.addressof(fp.fpr[i]), raw, 10)
        return ftwx != 0 or old != (fp.fcw, fp.fsw, fp.ftwx)

    def run(self, rip: int, budget: int) -> tuple[str, int]:
        """One burst from ``rip``: (why it stopped, instructions executed)."""
        self.vector = None
        self.bad_access = None
        self.counted = 0
        self.block_icount = 0
        self.last_block = (0, 0)
        self.blocks = 0
        self.budget_hit = False
        self.wpages.clear()
        self.wcross.clear()
        from unicorn import UcError

        if self.unit == "blocks":
            if self.native is not None:
                self.native.start(budget)
            else:
                self.limit = budget
            count = 0
        else:
            count = budget
        try:
            self.uc.emu_start(rip, 0, 0, count)
        except UcError as e:
            if self.bad_access is None and self.vector is None:
                return f"error:{e}", 0
        end = self.uc.reg_read(self.X.UC_X86_REG_RIP)
        if self.native is not None:
            return self._native_result(end)
        if self.unit == "blocks" and self.budget_hit:
            return "budget", self.counted + self.block_icount
        if self.counter_offset is not None:
            started = ctypes.c_uint64.from_address(self.uch.value + self.counter_offset).value
            if self.vector is not None:
                return "fault", max(started - 1, 0)
            if self.bad_access is not None:
                return "mmio", max(started - 1, 0)
            if started > budget:
                return "budget", budget
            return "exit", started
        # instructions executed: whole blocks before the last one, plus the last one up to the end rip
        a, size = self.last_block
        if a <= end < a + size:
            count = self.counted + self._instructions_before(a, size, end)
        else:
            count = self.counted + self.block_icount
        if self.vector is not None:
            return "fault", count
        if self.bad_access is not None:
            return "mmio", count
        if self.unit != "blocks" and count >= budget:
            return "budget", count
        return "exit", count

    def _native_result(self, end: int) -> tuple[str, int]:
        """The native counter's burst: blocks entered, instructions — disassembling the blocks it met for the
        first time — and the part of the last block that ran when the burst stopped inside it."""
        self.blocks, insns, budget_hit, failed, last, pending = self.native.result()
        if failed:
            raise TracevisorError("the fallback's block counter ran out of memory")
        if pending:
            ns = []
            for addr, size, visits in pending:
                n = self._block_icount(addr, size)
                ns.append(n)
                insns += n * visits
            self.native.learn(ns)
            if last is not None and last[2] < 0:
                last = (last[0], last[1], ns[[p[:2] for p in pending].index(last[:2])])
        if budget_hit:
            return "budget", insns
        if self.vector is None and self.bad_access is None:
            return "exit", insns
        # stopped inside the last block, before the instruction at ``end``
        if last is not None and last[0] <= end < last[0] + last[1]:
            insns += self._instructions_before(last[0], last[1], end) - last[2]
        return ("fault" if self.vector is not None else "mmio"), insns


def _next_pages(mem, page: int, cr3: int) -> set[int]:
    """The physical pages that follow physical ``page`` in the virtual address space: for every virtual page
    mapped to it, the page the next virtual page maps to (and ``page + 1``, the identity case)."""
    out = {page + 1}
    target = page << 12
    mask = 0x000F_FFFF_FFFF_F000

    def walk(table: int, level: int, va: int) -> None:
        shift = 12 + 9 * (level - 1)
        for i in range(512):
            e = mem.read_u64(table + 8 * i, "page-table entry")
            if not e & 1:
                continue
            base = va | (i << shift)
            if level == 4 and i >= 256:
                base |= 0xFFFF_0000_0000_0000  # canonical upper half
            if level == 1 or (level in (2, 3) and e & 0x80):
                pa = e & mask & ~((1 << shift) - 1)
                if pa <= target < pa + (1 << shift):
                    try:
                        out.add(mem.translate(base + (target - pa) + 4096, cr3)[0] >> 12)
                    except Exception:
                        pass  # the next virtual page is not mapped: the store faulted there
            elif (e & mask) < mem.size:
                walk(e & mask, level - 1, base)

    try:
        walk(cr3 & mask, 4, 0)
    except Exception:
        pass
    return out


def _native_counter(uclib):
    """A new C block counter bound to this Unicorn library, or None without the native extension."""
    if not block_counter_available():
        return None
    from . import fastloop

    return fastloop.extension().BlockCounter(ctypes.cast(uclib.uc_emu_stop, ctypes.c_void_p).value)


def block_counter_available() -> bool:
    from . import fastloop

    mod = fastloop.extension()
    return mod is not None and hasattr(mod, "BlockCounter")


def resolve_budget(unit: str | None, budget: int | None) -> tuple[str, int]:
    """The burst budget of a new run: in blocks where the native block counter is available, else in
    instructions (Unicorn's own counter); ``budget`` None is that unit's default."""
    if unit is None:
        unit = "blocks" if block_counter_available() else "instructions"
    return unit, BUDGET_DEFAULTS[unit] if budget is None else budget


_COUNTER_OFFSET: list = []


def _counter_offset() -> int | None:
    """Where Unicorn keeps the number of instructions started by the current ``uc_emu_start`` (its
    instruction-budget counter), found once per process by running known NOP sequences in a scratch
    engine and checked twice; None if this Unicorn build does not show it (then a block hook counts).

    Why: counting with a Python hook costs a callback per translation block — most of a burst's time."""
    if _COUNTER_OFFSET:
        return _COUNTER_OFFSET[0]
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc

    snapshots = []
    for n, budget in ((37, 1000), (53, 1000), (200, 100)):
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map(0x1000, 0x1000)
        uc.mem_write(0x1000, b"\x90" * n + b"\xf4")
        uc.ctl_exits_enabled(True)
        uc.ctl_set_exits([0x1000 + n])
        uc.emu_start(0x1000, 0, 0, budget)
        snapshots.append(ctypes.string_at(uc._uch.value, 4096))
    found = None
    for off in range(0, 4096 - 16, 8):
        vals = [struct.unpack_from("<QQ", snap, off) for snap in snapshots]
        if vals == [(37, 1000), (53, 1000), (101, 100)]:
            found = off
            break
    _COUNTER_OFFSET.append(found)
    return found


class Fallback:
    """The per-machine fallback: a sweep of the kernel, one engine per vCPU, statistics."""

    def __init__(self, machine, budget: int = DEFAULT_BUDGET, unit: str = "blocks") -> None:
        load_engines()
        self.machine = machine
        self.budget = budget
        if unit not in BUDGET_UNITS:
            raise TracevisorError(f"unknown fallback budget unit {unit!r} (known: {', '.join(BUDGET_UNITS)})")
        self.budget_unit = unit
        img = machine.image
        bias = img.load_address if img.pie else 0
        self.scan = codescan.scan_kernel(img.path, img.sha256, bias)
        self.atomics = atomics_needed(machine)
        self.exits = self.scan.exit_set(self.atomics)
        self.dis = Disassembler()
        self._engines: dict[int, _Engine] = {}
        self.cpuid_0d: dict[int, tuple[int, int]] = {}
        for e in machine.cpuid:
            if e.function == 0xD and e.index >= 2:
                self.cpuid_0d[e.index] = (e.eax, e.ebx)
        self.stats = {"bursts": 0, "instructions": 0, "blocks": 0, "xgetbv": 0, "xsave": 0, "xrstor": 0, "nm": 0,
                      "exceptions": 0, "pages_written": 0, "transfer_ns": 0, "burst_ns": 0, "setup_ns": 0}

    # the one entry point from the run loop ----------------------------------------------------
    def handle(self, v) -> dict:
        """Make progress for vCPU ``v`` stopped at an instruction KVM could not emulate.

        Returns the trace event (kind + fields) describing what was done; raises FallbackStop when the
        instruction cannot be executed here."""
        vc = v.vcpu
        eng = self._engines.get(v.cpu)
        if eng is None:
            t = time.perf_counter_ns()
            eng = self._engines[v.cpu] = _Engine(self, self.machine.memory)
            self.stats["setup_ns"] += time.perf_counter_ns() - t
        t0 = time.perf_counter_ns()
        vc_regs = eng.regs
        if vc.sync_regs:  # KVM stored the registers in kvm_run at this exit: no KVM_GET_REGS
            ctypes.memmove(ctypes.addressof(vc_regs), ctypes.addressof(vc.run) + SYNC_REGS_OFFSET,
                           ctypes.sizeof(vc_regs))
        else:
            r = vc.get_regs()
            ctypes.memmove(ctypes.addressof(vc_regs), ctypes.addressof(r), ctypes.sizeof(vc_regs))
        s = vc.get_sregs()
        ctypes.memmove(ctypes.addressof(eng.sregs), ctypes.addressof(s), ctypes.sizeof(s))
        rip = vc_regs.rip
        code = self._code(rip, s.cr3)
        insn = self.dis.one(code, rip)
        mnem = insn.mnemonic if insn is not None else "(undecodable)"
        if mnem == "xgetbv":
            return self._xgetbv(v, eng, insn)
        if mnem in ("xsave", "xsave64", "xsaveopt", "xsaveopt64", "xrstor", "xrstor64"):
            return self._xsave(v, eng, insn)
        if mnem.startswith(("xsavec", "xsaves", "xrstors")):
            raise FallbackStop(f"the instruction fallback does not implement {mnem}",
                               instruction_hint(f"{mnem} {insn.op_str}"))
        why = codescan.classify(mnem, insn.op_str) if insn is not None else None
        if why == "avx":
            raise FallbackStop(f"AVX instruction {mnem} {insn.op_str} at {rip:#x}: neither this host's KVM "
                               "nor the fallback emulator can execute it",
                               "the guest saw AVX in CPUID because this host does not honour CPUID masks "
                               "for leaves 1 and 7 (docs/compatibility.md)")
        f = vc.get_fpu()
        ctypes.memmove(ctypes.addressof(eng.fpu), ctypes.addressof(f), ctypes.sizeof(f))
        eng.load()
        mem = self.machine.memory
        if mem.host_dirty is not None and not eng.tracking:
            eng.track_writes()
        t1 = time.perf_counter_ns()
        stop, count = eng.run(rip, self.budget)
        t2 = time.perf_counter_ns()
        if eng.tracking and mem.host_dirty is not None:
            self._note_written(eng.written(), s.cr3)
        x87 = eng.store()
        end = eng.regs.rip
        fields = {"start": rip, "end": end, "count": count, "stop": stop, "insn": mnem}
        if stop.startswith("error:"):
            raise FallbackStop(f"the fallback emulator failed at {rip:#x} ({mnem}): {stop[6:]}",
                               instruction_hint(f"{mnem} {insn.op_str if insn else ''}"))
        vc.set_regs(eng.regs)
        vc.set_fpu(eng.fpu)
        del x87
        new_fs = eng.sregs.fs.base
        new_gs = eng.sregs.gs.base
        if new_fs != s.fs.base or new_gs != s.gs.base:
            vc.set_sregs(eng.sregs)
        if count == 0:
            if stop == "fault":
                injected = self._inject(v, eng, eng.vector, code, end)
                if eng.vector == 7:
                    return {"kind": "nm", "rip": rip, "insn": mnem}
                return {"kind": "exception", "rip": rip, "insn": mnem, **injected}
            elif stop == "mmio":
                raise FallbackStop(f"{mnem} at {rip:#x} accesses {eng.bad_access:#x}, outside guest RAM, "
                                   "and KVM cannot emulate it", instruction_hint(mnem))
            else:
                raise FallbackStop(f"KVM could not emulate {mnem} {insn.op_str if insn else ''} at {rip:#x} "
                                   "and the fallback must leave it to KVM",
                                   instruction_hint(f"{mnem} {insn.op_str if insn else ''}"))
        elif stop == "fault":
            fields["vector"] = eng.vector
        t3 = time.perf_counter_ns()
        st = self.stats
        st["bursts"] += 1
        st["instructions"] += count
        st["blocks"] += eng.blocks
        st["transfer_ns"] += (t1 - t0) + (t3 - t2)
        st["burst_ns"] += t2 - t1
        return {"kind": "burst", **fields}

    # helpers -----------------------------------------------------------------------------------
    def _note_written(self, written: tuple[list[int], list[int], bool], cr3: int) -> None:
        """The guest-physical pages a burst stored to join the host's writes (memory hashes, checkpoints
        and schedule digests take them from there).  A store across a page boundary also wrote the page
        behind the next virtual page, found through the page tables (rare: none in rusty_demo)."""
        pages, crossings, overflow = written
        mem = self.machine.memory
        npages = mem.size >> 12
        dirty = mem.host_dirty
        dirty.update(p for p in pages if p < npages)  # (beyond RAM: the burst stopped before it)
        if overflow:  # too many to follow: every page may have changed
            dirty.update(range(npages))
        elif crossings:
            for p in {a >> 12 for a in crossings}:
                dirty.update(q for q in _next_pages(mem, p, cr3) if q < npages)
        self.stats["pages_written"] += len(pages)

    def _code(self, rip: int, cr3: int) -> bytes:
        return self.read_virtual(rip, 15, cr3)

    def read_virtual(self, va: int, size: int, cr3: int) -> bytes:
        """Up to ``size`` bytes of guest memory at virtual ``va`` (fewer where the mapping ends)."""
        mem = self.machine.memory
        out = b""
        while len(out) < size:
            try:
                gpa, room = mem.translate(va, cr3)
                n = min(room, size - len(out), mem.size - gpa)
                if n <= 0:
                    break
                out += mem.read(gpa, n)
                va += n
            except Exception:
                break
        return out

    def _inject(self, v, eng: _Engine, vector: int, code: bytes, rip: int) -> dict:
        """Deliver the exception the burst's first instruction raised, as the CPU would."""
        vc = v.vcpu
        fields: dict = {"vector": vector}
        error_code = 0
        if vector == 14:
            cr2 = eng.uc.reg_read(eng.X.UC_X86_REG_CR2)
            insn = self.dis.one(code, rip)
            error_code = self._pf_error_code(cr2, eng.sregs.cr3, insn)
            s = vc.get_sregs()
            s.cr2 = cr2
            vc.set_sregs(s)
            fields["cr2"] = cr2
        elif vector == 6:
            insn = self.dis.one(code, rip)
            if insn is not None:  # a valid instruction the emulator lacks, not a real #UD
                raise FallbackStop(f"{insn.mnemonic} {insn.op_str} at {rip:#x} is not implemented by the "
                                   "fallback emulator (it raised #UD)",
                                   instruction_hint(f"{insn.mnemonic} {insn.op_str}"))
        if vector not in _FAULTS:
            raise FallbackStop(f"the fallback emulator raised vector {vector} at {rip:#x}",
                               instruction_hint(self.dis.mnemonic(code, rip)))
        fields.update(self._inject_raw(v, vector, error_code))
        if vector == 7:
            self.stats["nm"] += 1
        return fields

    def _pf_error_code(self, cr2: int, cr3: int, insn) -> int:
        """#PF error code: P from the page walk, W from the instruction's memory operand access (the
        guest runs at CPL 0, so U/S = 0; instruction fetches set I/D)."""
        present = 1
        try:
            self.machine.memory.translate(cr2, cr3)
        except Exception:
            present = 0
        write = 0
        if insn is not None:
            try:
                import capstone.x86 as cx

                for op in insn.operands:
                    if op.type == cx.X86_OP_MEM and op.access & 2:  # CS_AC_WRITE
                        write = 1
            except Exception:
                write = 0
        return present | (write << 1)

    def _advance(self, v, eng: _Engine, insn) -> None:
        eng.regs.rip = (eng.regs.rip + insn.size) & 0xFFFF_FFFF_FFFF_FFFF
        v.vcpu.set_regs(eng.regs)

    def _xgetbv(self, v, eng: _Engine, insn) -> dict:
        ecx = eng.regs.rcx & 0xFFFF_FFFF
        xcrs = v.vcpu.get_xcrs()
        if ecx == 0:
            value = xcrs.get(0, 1)
        elif ecx == 1:
            value = xcrs.get(0, 1)  # XINUSE ⊆ XCR0: reporting every enabled component as in use is allowed
        else:
            return {"kind": "xgetbv", "rip": eng.regs.rip, "xcr": ecx,
                    **self._inject(v, eng, 13, b"", eng.regs.rip)}
        eng.regs.rax = value & 0xFFFF_FFFF
        eng.regs.rdx = value >> 32
        rip = eng.regs.rip
        self._advance(v, eng, insn)
        self.stats["xgetbv"] += 1
        return {"kind": "xgetbv", "rip": rip, "xcr": ecx, "value": value}

    def _operand_address(self, eng: _Engine, insn) -> int:
        import capstone.x86 as cx

        for op in insn.operands:
            if op.type == cx.X86_OP_MEM:
                m = op.mem
                addr = m.disp
                names = {}
                for r in (m.base, m.index):
                    if r:
                        names[r] = self._reg_value(eng, insn.reg_name(r))
                if m.base:
                    addr += names[m.base]
                if m.index:
                    addr += names[m.index] * m.scale
                if m.segment:
                    seg = insn.reg_name(m.segment)
                    if seg == "fs":
                        addr += eng.sregs.fs.base
                    elif seg == "gs":
                        addr += eng.sregs.gs.base
                return addr & 0xFFFF_FFFF_FFFF_FFFF
        raise TracevisorError(f"{insn.mnemonic} without a memory operand")

    @staticmethod
    def _reg_value(eng: _Engine, name: str) -> int:
        r = eng.regs
        if name == "rip":
            return r.rip  # capstone gives rip-relative displacements relative to the next instruction
        if hasattr(r, name):
            return getattr(r, name)
        # 32-bit address-size registers (e.g. eax): the low half
        full = {"e" + n[1:]: n for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")}
        if name in full:
            return getattr(r, full[name]) & 0xFFFF_FFFF
        if name.endswith("d") and hasattr(r, name[:-1]):
            return getattr(r, name[:-1]) & 0xFFFF_FFFF
        raise TracevisorError(f"unexpected address register {name}")

    def _xsave(self, v, eng: _Engine, insn) -> dict:
        vc = v.vcpu
        rip = eng.regs.rip
        mnem = insn.mnemonic
        save = mnem.startswith("xsave")
        addr = self._operand_address(eng, insn)
        if insn.op_str and "rip" in insn.op_str:
            addr += insn.size  # rip-relative: relative to the next instruction
        xcr0 = vc.get_xcrs().get(0, 1)
        rfbm = xcr0 & ((eng.regs.rdx & 0xFFFF_FFFF) << 32 | (eng.regs.rax & 0xFFFF_FFFF))
        kind = "xsave" if save else "xrstor"
        fields = {"kind": kind, "rip": rip, "addr": addr, "rfbm": rfbm}
        if addr % 64:
            fields.update(self._inject(v, eng, 13, b"", rip))
            return fields
        size = xstate.area_size(self.cpuid_0d, rfbm)
        mem = self.machine.memory
        cr3 = eng.sregs.cr3
        try:
            ranges = mem.virt_ranges(addr, size, cr3, what="XSAVE area")
        except Exception:
            # the first page that does not translate: #PF there
            va = addr
            while va < addr + size:
                try:
                    mem.translate(va, cr3)
                except Exception:
                    break
                va = (va | 0xFFF) + 1
            s = vc.get_sregs()
            s.cr2 = max(va, addr)
            vc.set_sregs(s)
            fields["cr2"] = s.cr2
            fields.update(self._inject_raw(v, 14, 0 | (2 if save else 0)))
            return fields
        area = b"".join(mem.read(g, n) for g, n in ranges)
        xs = vc.get_xsave()
        image = bytes(xs.region)
        try:
            if save:
                mxcsr = vc.get_fpu().mxcsr
                new = xstate.xsave(image, area, rfbm, mxcsr, self.cpuid_0d)
                pos = 0
                for g, n in ranges:
                    mem.write(g, new[pos:pos + n], "XSAVE area")
                    pos += n
                self.stats["xsave"] += 1
            else:
                new_image = xstate.xrstor(image, area, rfbm, self.cpuid_0d)
                ctypes.memmove(ctypes.addressof(xs.region), new_image, len(new_image))
                vc.set_xsave(xs)
                self.stats["xrstor"] += 1
        except xstate.XstateFault as e:
            fields["error"] = str(e)
            fields.update(self._inject(v, eng, 13, b"", rip))
            return fields
        self._advance(v, eng, insn)
        return fields

    def _inject_raw(self, v, vector: int, error_code: int) -> dict:
        """Make ``vector`` pending in the vCPU (KVM_SET_VCPU_EVENTS), with ``error_code`` when the vector
        has one; the trace fields that say so."""
        vc = v.vcpu
        ev = vc.get_vcpu_events()
        raw = bytearray(bytes(ev.raw))
        has_ec = vector in _HAS_ERROR_CODE
        struct.pack_into("<BBBBI", raw, 0, 1, vector, 1 if has_ec else 0, 0, error_code)
        struct.pack_into("<I", raw, 20, 0)  # flags: change nothing else
        ctypes.memmove(ctypes.addressof(ev), bytes(raw), len(raw))
        vc.set_vcpu_events(ev)
        self.stats["exceptions"] += 1
        return {"vector": vector, "error_code": error_code} if has_ec else {"vector": vector}


def atomics_needed(machine) -> bool:
    """Must bursts stop at locked instructions?  Only when several vCPUs run at once: with one vCPU, or
    exact mode's one-at-a-time vCPUs, nothing can observe a locked instruction half done."""
    cfg = machine.config
    if cfg.fallback_atomics is not None:  # a replay: as recorded
        return cfg.fallback_atomics
    return cfg.cpus > 1 and not cfg.exact


def header_config(machine) -> dict:
    """The header's ``fallback`` map: mode and budget, plus the engines and the exit set when installed
    (the sweep is cached per kernel, so only the first recording of a kernel pays for it)."""
    cfg = machine.config
    out: dict = {"mode": cfg.fallback, "budget": cfg.fallback_budget, "budget_unit": cfg.fallback_budget_unit}
    if cfg.fallback == "off":
        return out
    try:
        load_engines()
        img = machine.image
        scan = codescan.scan_kernel(img.path, img.sha256, img.load_address if img.pie else 0)
        v = versions()
        atomics = atomics_needed(machine)
        out.update({"engine": "unicorn", "unicorn": v["unicorn"], "capstone": v["capstone"],
                    "exit_set": scan.digest(atomics), "exits": len(scan.exit_set(atomics)),
                    "atomics_in_kvm": atomics, "scan_version": codescan.SCAN_VERSION})
    except TracevisorError as e:
        out["unavailable"] = str(e)
    return out


def step(machine, v) -> bool:
    """The run loop's hook for KVM_EXIT_INTERNAL_ERROR / emulation failure: True if the fallback made
    progress (re-enter KVM), False if it is off (the caller reports the fault as before).

    Raises the machine's VmStop with a report naming the instruction when the fallback cannot go on."""
    if machine.config.fallback == "off":
        return False
    fb = machine.fallback
    if fb is None:
        try:
            fb = machine.fallback = Fallback(machine, machine.config.fallback_budget,
                                             machine.config.fallback_budget_unit)
        except TracevisorError as e:
            machine.fallback_error = str(e)
            return False
    try:
        ev = fb.handle(v)
    except FallbackStop as e:
        machine.fallback_error = str(e)
        machine.fallback_hint = e.hint
        return False
    sink = machine.sink
    if sink is not None:
        kind = ev.pop("kind")
        sink.event(kind, v.cpu, machine.clock.now(), **ev)
    return True


def fault_hints(machine, v, reporter) -> list[str]:
    """Hints for an emulation-failure report: the instruction by name, and why the fallback did not run."""
    hints = []
    if machine is not None and machine.fallback_hint:
        hints.append(machine.fallback_hint)
    else:
        try:
            regs = v.vcpu.get_regs()
            cr3 = v.vcpu.get_sregs().cr3
            raw = bytes.fromhex(reporter.code_bytes(regs.rip, cr3).replace(" ", ""))
            try:
                import capstone

                md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
                text = next((f"{m} {o}".strip() for _a, _s, m, o in md.disasm_lite(raw, regs.rip, 1)),
                            "an undecodable instruction")
            except ImportError:
                text = "the instruction at rip (install capstone to see its name)"
        except Exception:
            text = "the instruction at rip"
        hints.append(instruction_hint(text))
    if machine is None:
        return hints
    if machine.fallback_error:
        hints.append(f"instruction fallback: {machine.fallback_error}")
    elif machine.config.fallback == "off":
        hints.append("the instruction fallback is off (--fallback off)")
    return hints
