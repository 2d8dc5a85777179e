"""The live debug target: a booted :class:`~tracevisor.machine.Machine` driven by the gdb stub.

The VM is booted but not started; every ``cont``/``step`` programs KVM_SET_GUEST_DEBUG (the four
debug-register slots and the single-step flag) and calls ``machine.resume()``, which blocks until the
next stop: a KVM_EXIT_DEBUG pauses the VM with DR6 in the report (bit i: slot i fired; BS: a single
step), an interrupt pauses it too, and a guest exit or fault ends it.

Software breakpoints (``Z0``) have two backends, chosen explicitly with ``sw_breakpoints``:

* ``"hw"`` (the default): a free debug-register slot, exactly like ``Z1``.  Needed on hosts whose KVM
  cannot run ``int3`` under KVM_GUESTDBG_USE_SW_BP (nested KVM ends it in KVM_EXIT_INTERNAL_ERROR,
  suberror 1), and limited to the four slots shared with ``Z1``/``Z2``/``Z4``.
* ``"int3"``: the byte 0xCC patched into guest memory, the original kept and shown to memory reads.
  For hosts where KVM can run it (docs/time-travel.md says how to tell).

Watchpoints (``Z2`` write, ``Z4`` access) also have two backends, ``watchpoints``:

* ``"hw"``: data breakpoints in the debug registers (the x86 way; up to four 1/2/4/8-byte aligned
  pieces, shared with the breakpoints).
* ``"step"``: while any watchpoint is set, ``cont`` single-steps the guest and compares the watched
  bytes after every instruction (about 4,000 instructions a second here).  Only value changes are
  seen, so only write watchpoints are offered; there is no limit on their number.
* ``"auto"`` (the default) asks :func:`probe_guest_debug` whether data breakpoints fire on this host
  (on nested KVM they do not: the write completes with no debug exit) and picks one of the two.

Only vCPU 0 is debugged; the gdb option requires a single vCPU.  Segment selectors are read-only.
"""

from __future__ import annotations

import fcntl
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

from .errors import GuestError, TracevisorError
from .gdbstub import (
    BP_HARDWARE,
    BP_SOFTWARE,
    E_FAULT,
    E_INVAL,
    REGISTERS,
    SIGABRT,
    SIGALRM,
    SIGILL,
    SIGINT,
    SIGSEGV,
    SIGSYS,
    SIGTERM,
    SIGTRAP,
    WATCH_ACCESS,
    WATCH_WRITE,
    GdbStub,
    Stop,
    TargetError,
    listen,
    pack_registers,
    unpack_registers,
)
from .kvm import uapi as U
from .status import StopInfo, StopReason

MAX_STEP_WATCH = 1 << 16  # bytes compared after every step, per watchpoint
DEFAULT_HOST = "127.0.0.1"
NUM_SLOTS = 4
DR6_BS = 1 << 14  # single-step
_DR7_RW = {BP_SOFTWARE: 0b00, BP_HARDWARE: 0b00, WATCH_WRITE: 0b01, WATCH_ACCESS: 0b11}
_DR7_LEN = {1: 0b00, 2: 0b01, 8: 0b10, 4: 0b11}
_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13",
         "r14", "r15", "rip")
_SEGMENTS = ("cs", "ss", "ds", "es", "fs", "gs")
_FAULT_SIGNALS = {StopReason.FAULT: SIGSEGV, StopReason.GUEST_ERROR: SIGSYS, StopReason.HANG: SIGABRT,
                  StopReason.INTERRUPTED: SIGINT, StopReason.TERMINATED: SIGTERM, StopReason.TIMEOUT: SIGALRM}


@dataclass
class Slot:
    """One debug register in use: (kind, addr, length) is what gdb asked for; start/size the piece."""

    kind: int
    addr: int
    length: int
    start: int
    size: int


def watch_pieces(addr: int, length: int) -> list[tuple[int, int]]:
    """Split [addr, addr+length) into naturally aligned pieces of 8, 4, 2 or 1 bytes."""
    out = []
    while length > 0:
        size = 8
        while size > 1 and (addr % size or size > length):
            size //= 2
        out.append((addr, size))
        addr += size
        length -= size
    return out


# -- x87 state in gdb's terms -----------------------------------------------------------------------

def _tag_of(raw: bytes) -> int:
    """The 2-bit x87 tag of a non-empty register: 0 valid, 1 zero, 2 special."""
    mant = int.from_bytes(raw[:8], "little")
    exp = int.from_bytes(raw[8:10], "little") & 0x7FFF
    if exp == 0x7FFF:
        return 2
    if exp == 0:
        return 1 if mant == 0 else 2
    return 0 if mant >> 63 else 2


def full_tag_word(ftwx: int, fsw: int, fpr: list[bytes]) -> int:
    """FXSAVE's abridged tag byte (1 bit per physical register) → the 16-bit tag word gdb shows."""
    top = (fsw >> 11) & 7
    word = 0
    for phys in range(8):
        if not ftwx & (1 << phys):
            tag = 3
        else:
            tag = _tag_of(fpr[(phys - top) % 8])
        word |= tag << (2 * phys)
    return word


def abridged_tag(ftag: int) -> int:
    return sum(1 << i for i in range(8) if (ftag >> (2 * i)) & 3 != 3)


_probe_cache: dict | None = None


def _probe_run(kvm, code: bytes, control: int, debugregs: list[int]):
    """Run ``code`` at address 0 of a throwaway real-mode VM under ``control``; (exit reason, debug)."""
    from .memory import GuestMemory

    vm = kvm.create_vm()
    mem = GuestMemory(0x4000)
    try:
        vm.set_tss_addr(0xFFFB_D000)
        vm.set_memory_region(0, 0, mem.size, mem.host_address)
        mem.write(0, code)
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
            seg.base, seg.selector = 0, 0
        vcpu.set_sregs(sregs)
        vcpu.set_regs(U.kvm_regs(rip=0, rflags=2, rax=0x1234))
        vcpu.set_guest_debug(control, debugregs)
        fcntl.ioctl(vcpu.fd, U.KVM_RUN, 0)
        reason = vcpu.run.exit_reason
        d = vcpu.run.exit.debug
        debug = {"dr6": d.dr6, "exception": d.exception} if reason == U.KVM_EXIT_DEBUG else None
        return reason, debug
    finally:
        vm.close()
        mem.close()


def probe_guest_debug(kvm=None) -> dict[str, bool]:
    """What KVM_SET_GUEST_DEBUG can do on this host, measured with tiny real-mode VMs (a few ms).

    ``exec_breakpoints``: a debug-register instruction breakpoint exits with KVM_EXIT_DEBUG;
    ``data_breakpoints``: a write breakpoint does (nested KVM: the write completes, no exit);
    ``int3``: ``int3`` under KVM_GUESTDBG_USE_SW_BP does (nested KVM: it does not).
    """
    global _probe_cache
    if _probe_cache is not None:
        return dict(_probe_cache)
    from .kvm.system import Kvm

    own = kvm is None
    kvm = kvm or Kvm()
    hw = U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_USE_HW_BP
    result = {}
    try:
        # nop; hlt with an instruction breakpoint on the hlt
        reason, d = _probe_run(kvm, bytes([0x90, 0xF4]), hw, [1, 0, 0, 0, 0, 0, 0, 0x1])
        result["exec_breakpoints"] = reason == U.KVM_EXIT_DEBUG and bool(d["dr6"] & 1)
        # mov [0x800], ax; hlt with a 2-byte write breakpoint on 0x800
        reason, d = _probe_run(kvm, bytes([0xA3, 0x00, 0x08, 0xF4]), hw,
                               [0x800, 0, 0, 0, 0, 0, 0, 0x1 | (0b01 << 16) | (0b01 << 18)])
        result["data_breakpoints"] = reason == U.KVM_EXIT_DEBUG and bool(d["dr6"] & 1)
        # int3; hlt
        reason, d = _probe_run(kvm, bytes([0xCC, 0xF4]),
                               U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_USE_SW_BP, [0] * 8)
        result["int3"] = reason == U.KVM_EXIT_DEBUG and d["exception"] == 3
    except (OSError, TracevisorError):
        result = {"exec_breakpoints": False, "data_breakpoints": False, "int3": False, **result}
    finally:
        if own:
            kvm.close()
    _probe_cache = dict(result)
    return result


class LiveTarget:
    """A booted Machine as a gdb stub target (see tracevisor.gdbstub for the interface).

    ``run_vm`` runs the VM until its next stop (default ``machine.resume``; a replay passes its own, which
    also takes checkpoints).  Subclasses see every stop through :meth:`resume`."""

    supports_reverse = False

    def __init__(self, machine, sw_breakpoints: str = "hw", watchpoints: str = "auto",
                 run_vm: Callable[[], StopInfo] | None = None) -> None:
        if sw_breakpoints not in ("hw", "int3"):
            raise TracevisorError(f"unknown software breakpoint backend {sw_breakpoints!r} (hw or int3)")
        if watchpoints not in ("auto", "hw", "step"):
            raise TracevisorError(f"unknown watchpoint backend {watchpoints!r} (auto, hw or step)")
        if not machine.booted:
            raise TracevisorError("the VM must be booted before a debugger attaches")
        if watchpoints == "auto":
            watchpoints = "hw" if probe_guest_debug(machine.kvm)["data_breakpoints"] else "step"
        self.watch_backend = watchpoints
        # x86 has no read-only data breakpoint (Z3); value comparison sees writes only
        self.breakpoint_kinds = (BP_SOFTWARE, BP_HARDWARE, WATCH_WRITE) + \
            ((WATCH_ACCESS,) if watchpoints == "hw" else ())
        self.step_watches: dict[tuple[int, int], bytes | None] = {}  # (addr, length) → bytes last seen
        self.machine = machine
        self.run_vm = run_vm or machine.resume
        self.state = machine.vcpus[0]
        self.vcpu = self.state.vcpu
        self.sw_backend = sw_breakpoints
        self.slots: list[Slot | None] = [None] * NUM_SLOTS
        self.int3: dict[int, int] = {}  # address → original byte (int3 backend)
        machine.debugger_code = self.int3  # the instruction fallback leaves these int3s to the debugger
        image = machine.image
        self.offsets = image.load_address if image.pie else 0
        self.final: StopInfo | None = None  # the VM has stopped for good
        self.detached = False
        self._interrupt = threading.Event()
        self._lock = threading.Lock()
        machine.stop_conditions.append(self._interrupt_requested)

    # -- registers -----------------------------------------------------------------------------
    def _values(self) -> dict:
        r = self.vcpu.get_regs()
        s = self.vcpu.get_sregs()
        f = self.vcpu.get_fpu()
        vals: dict = {n: getattr(r, n) for n in _GPRS}
        vals["eflags"] = r.rflags & 0xFFFF_FFFF
        for seg in _SEGMENTS:
            vals[seg] = getattr(s, seg).selector
        fpr = [bytes(f.fpr[i])[:10] for i in range(8)]
        for i in range(8):
            vals[f"st{i}"] = fpr[i]
        vals.update(fctrl=f.fcw, fstat=f.fsw, ftag=full_tag_word(f.ftwx, f.fsw, fpr), fiseg=0,
                    fioff=f.last_ip & 0xFFFF_FFFF, foseg=0, fooff=f.last_dp & 0xFFFF_FFFF,
                    fop=f.last_opcode, mxcsr=f.mxcsr)
        for i in range(16):
            vals[f"xmm{i}"] = bytes(f.xmm[i])
        return vals

    def read_registers(self) -> bytes:
        return pack_registers(self._values())

    def write_registers(self, data: bytes) -> None:
        """GPRs, rip, eflags and the x87/SSE state; segment selectors are read-only and ignored here."""
        v = unpack_registers(data)
        r = self.vcpu.get_regs()
        for n in _GPRS:
            setattr(r, n, v[n])
        r.rflags = (r.rflags & ~0xFFFF_FFFF) | v["eflags"]
        self.vcpu.set_regs(r)
        f = self.vcpu.get_fpu()
        for i in range(8):
            raw = v[f"st{i}"].to_bytes(10, "little") + bytes(f.fpr[i])[10:]
            for j, b in enumerate(raw):
                f.fpr[i][j] = b
        f.fcw, f.fsw = v["fctrl"] & 0xFFFF, v["fstat"] & 0xFFFF
        f.ftwx = abridged_tag(v["ftag"])
        f.last_opcode = v["fop"] & 0x7FF
        f.last_ip = (f.last_ip & ~0xFFFF_FFFF) | v["fioff"]
        f.last_dp = (f.last_dp & ~0xFFFF_FFFF) | v["fooff"]
        f.mxcsr = v["mxcsr"]
        for i in range(16):
            for j, b in enumerate(v[f"xmm{i}"].to_bytes(16, "little")):
                f.xmm[i][j] = b
        self.vcpu.set_fpu(f)

    def read_register(self, n: int) -> bytes:
        reg = REGISTERS[n]
        data = self.read_registers()
        off = sum(r.size for r in REGISTERS[:n])
        return data[off:off + reg.size]

    def write_register(self, n: int, data: bytes) -> None:
        reg = REGISTERS[n]
        if reg.name in _SEGMENTS:
            if int.from_bytes(data, "little") != self._values()[reg.name]:
                raise TargetError(E_INVAL, "segment selectors are read-only")
            return
        if reg.name in _GPRS or reg.name == "eflags":  # the common case: one KVM_GET/SET_REGS pair
            r = self.vcpu.get_regs()
            value = int.from_bytes(data, "little")
            if reg.name == "eflags":
                r.rflags = (r.rflags & ~0xFFFF_FFFF) | value
            else:
                setattr(r, reg.name, value)
            self.vcpu.set_regs(r)
            return
        block = bytearray(self.read_registers())
        off = sum(r.size for r in REGISTERS[:n])
        block[off:off + reg.size] = data
        self.write_registers(bytes(block))

    # -- memory --------------------------------------------------------------------------------
    def _cr3(self) -> int:
        return self.vcpu.get_sregs().cr3

    def read_memory(self, addr: int, n: int) -> bytes:
        try:
            data = bytearray(self.machine.memory.read_virt(addr, n, self._cr3(), what="debugger read"))
        except GuestError as e:
            raise TargetError(E_FAULT, str(e)) from None
        for a, orig in self.int3.items():  # show the guest's own bytes, not our 0xCC
            if addr <= a < addr + n:
                data[a - addr] = orig
        return bytes(data)

    def write_memory(self, addr: int, data: bytes) -> None:
        data = bytearray(data)
        for a in self.int3:
            if addr <= a < addr + len(data):
                self.int3[a] = data[a - addr]
                data[a - addr] = 0xCC
        try:
            self.machine.memory.write_virt(addr, bytes(data), self._cr3(), what="debugger write")
        except GuestError as e:
            raise TargetError(E_FAULT, str(e)) from None

    # -- breakpoints ---------------------------------------------------------------------------
    def insert_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        if kind not in self.breakpoint_kinds:
            raise TargetError(E_INVAL, f"breakpoint kind {kind} is not supported")
        if kind == BP_SOFTWARE and self.sw_backend == "int3":
            if addr not in self.int3:
                orig = self.read_memory(addr, 1)[0]
                self._poke(addr, 0xCC)
                self.int3[addr] = orig
            return True
        if kind == WATCH_WRITE and self.watch_backend == "step":
            if not 0 < length <= MAX_STEP_WATCH:
                return False
            self.step_watches.setdefault((addr, length), self._peek(addr, length))
            return True
        if any(s is not None and (s.kind, s.addr, s.length) == (kind, addr, length) for s in self.slots):
            return True  # inserting twice is allowed and changes nothing
        pieces = [(addr, 1)] if kind in (BP_SOFTWARE, BP_HARDWARE) else watch_pieces(addr, length)
        free = [i for i, s in enumerate(self.slots) if s is None]
        if not pieces or len(pieces) > len(free):
            return False
        for i, (start, size) in zip(free, pieces):
            self.slots[i] = Slot(kind, addr, length, start, size)
        return True

    def remove_breakpoint(self, kind: int, addr: int, length: int) -> bool:
        if kind == BP_SOFTWARE and self.sw_backend == "int3":
            orig = self.int3.pop(addr, None)
            if orig is not None:
                self._poke(addr, orig)
            return True
        if kind == WATCH_WRITE and self.watch_backend == "step":
            self.step_watches.pop((addr, length), None)
            return True
        for i, s in enumerate(self.slots):
            if s is not None and (s.kind, s.addr, s.length) == (kind, addr, length):
                self.slots[i] = None
        return True

    def _peek(self, addr: int, length: int) -> bytes | None:
        try:
            return self.read_memory(addr, length)
        except TargetError:
            return None  # not mapped (yet): becoming readable counts as a change

    def _poke(self, addr: int, byte: int) -> None:
        try:
            self.machine.memory.write_virt(addr, bytes([byte]), self._cr3(), what="breakpoint")
        except GuestError as e:
            raise TargetError(E_FAULT, str(e)) from None

    def _debug_registers(self, skip_exec_at: int | None) -> tuple[list[int], bool]:
        regs = [0] * 8
        dr7 = 0
        for i, s in enumerate(self.slots):
            if s is None:
                continue
            if skip_exec_at is not None and s.kind in (BP_SOFTWARE, BP_HARDWARE) and s.start == skip_exec_at:
                continue  # stepping off this breakpoint: it would fire again before the instruction runs
            regs[i] = s.start
            dr7 |= (1 << (2 * i)) | (_DR7_RW[s.kind] << (16 + 4 * i)) | (_DR7_LEN[s.size] << (18 + 4 * i))
        regs[7] = dr7
        return regs, dr7 != 0

    # -- running -------------------------------------------------------------------------------
    def cont(self) -> Stop:
        return self._go(step=False)

    def step(self) -> Stop:
        return self._go(step=True)

    def exec_slot_at(self, rip: int) -> Slot | None:
        for s in self.slots:
            if s is not None and s.kind in (BP_SOFTWARE, BP_HARDWARE) and s.start == rip:
                return s
        return None

    def _go(self, step: bool) -> Stop:
        if self.final is not None:
            return self._final_stop()
        for key in self.step_watches:  # gdb may have written memory while stopped
            self.step_watches[key] = self._peek(*key)
        rip = self.vcpu.get_regs().rip
        at_bp = self.exec_slot_at(rip) is not None or rip in self.int3
        if step or self.step_watches:
            stop = self.resume(singlestep=True, skip_at=rip)
            if step or stop.reason != "step":
                return self._watch_check(stop)
            if self.step_watches:
                return self._step_until_watch(stop)
        elif at_bp:
            stop = self.resume(singlestep=True, skip_at=rip)  # step off the breakpoint first
            if stop.reason != "step":
                return stop
        return self.resume(singlestep=False, skip_at=None)

    def _watch_check(self, stop: Stop) -> Stop:
        """After a single step: did a step-emulated watchpoint's bytes change?"""
        if stop.reason not in ("step", "breakpoint") or not self.step_watches:
            return stop
        for (addr, length), before in self.step_watches.items():
            now = self._peek(addr, length)
            if now != before:
                self.step_watches[(addr, length)] = now
                return Stop("watchpoint", SIGTRAP, watch_addr=addr, watch_kind="watch")
        return stop

    def _step_until_watch(self, stop: Stop) -> Stop:
        """``cont`` with step-emulated watchpoints: one instruction at a time until something happens."""
        while True:
            stop = self._watch_check(stop)
            if stop.reason != "step":
                return stop
            rip = self.vcpu.get_regs().rip
            slot = self.exec_slot_at(rip)
            if slot is not None or rip in self.int3:  # the next instruction carries a breakpoint
                return Stop("breakpoint", SIGTRAP, hardware=slot is not None and slot.kind == BP_HARDWARE)
            stop = self.resume(singlestep=True, skip_at=None)

    def resume(self, singlestep: bool, skip_at: int | None) -> Stop:
        """Run the guest once (one step, or until the next stop) with the breakpoints armed, except an
        execution breakpoint at ``skip_at`` (the instruction being stepped off)."""
        if self._interrupt.is_set():
            self._interrupt.clear()
            return Stop("interrupt", SIGINT)
        debugregs, hw = self._debug_registers(skip_at)
        restore = None
        if skip_at is not None and skip_at in self.int3:  # run the original instruction once
            restore = skip_at
            self._poke(skip_at, self.int3[skip_at])
        control = 0
        if hw:
            control |= U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_USE_HW_BP
        if singlestep:
            control |= U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_SINGLESTEP
        if self.int3:
            control |= U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_USE_SW_BP
        try:
            self.vcpu.set_guest_debug(control, debugregs)
            info = self.run_vm()
        finally:
            if restore is not None and restore in self.int3 and self.final is None:
                try:
                    self._poke(restore, 0xCC)
                except TargetError:
                    pass
        stop = self._translate(info, singlestep)
        self._interrupt.clear()  # any stop answers a pending interrupt
        return stop

    def _translate(self, info: StopInfo, singlestep: bool) -> Stop:
        if not info.is_paused:
            self.final = info
            return self._final_stop()
        debug = info.report.get("debug")
        if debug is None:
            return Stop("interrupt", SIGINT, message=info.message)
        dr6 = debug.get("dr6", 0)
        if debug.get("exception") == 3 and self.int3:  # int3 backend: #BP
            rip = self.vcpu.get_regs().rip
            if rip not in self.int3 and rip - 1 in self.int3:  # trap semantics: rewind onto the int3
                r = self.vcpu.get_regs()
                r.rip = rip - 1
                self.vcpu.set_regs(r)
            return Stop("breakpoint", SIGTRAP, hardware=False)
        fired = [self.slots[i] for i in range(NUM_SLOTS) if dr6 & (1 << i) and self.slots[i] is not None]
        for s in fired:
            if s.kind in (WATCH_WRITE, WATCH_ACCESS):
                return Stop("watchpoint", SIGTRAP, watch_addr=s.addr,
                            watch_kind="watch" if s.kind == WATCH_WRITE else "awatch")
        for s in fired:
            return Stop("breakpoint", SIGTRAP, hardware=s.kind == BP_HARDWARE)
        return Stop("step", SIGTRAP)

    def _final_stop(self) -> Stop:
        info = self.final
        assert info is not None
        if info.reason == StopReason.EXIT:
            return Stop("exit", code=info.code, message=info.message)
        if info.reason == StopReason.KILLED:
            return Stop("killed", 9, message=info.message)
        sig = _FAULT_SIGNALS.get(info.reason, SIGABRT)
        if info.reason == StopReason.FAULT and info.report.get("suberror") == 1:
            sig = SIGILL  # an instruction KVM could not run
        return Stop("fault", sig, message=info.message)

    def interrupt(self) -> None:
        """From another thread: stop the running guest (it pauses; the stop reads as SIGINT)."""
        self._interrupt.set()
        if self.final is None:
            self.machine.stop(StopInfo.paused("interrupted", cpu=0))

    def _interrupt_requested(self) -> StopInfo | None:
        # Polled by the machine's supervisor: catches an interrupt that raced with the start of a run.
        if self._interrupt.is_set() and not self.detached:
            return StopInfo.paused("interrupted", cpu=0)
        return None

    def _clear_debug(self) -> None:
        for addr in list(self.int3):
            self.remove_breakpoint(BP_SOFTWARE, addr, 1)
        self.slots = [None] * NUM_SLOTS
        self.step_watches.clear()
        try:
            self.vcpu.set_guest_debug(0, [0] * 8)
        except TracevisorError:
            pass

    def kill(self) -> None:
        self._clear_debug()
        if self.final is None:
            self.final = StopInfo.of(StopReason.KILLED, "killed by the debugger (gdb kill)")

    def detach(self) -> None:
        """Remove every breakpoint and stop debugging; :meth:`run_to_end` then lets the guest finish."""
        self._clear_debug()
        self._interrupt.clear()
        self.detached = True

    def run_to_end(self) -> StopInfo:
        """After detach: run the guest until it exits or stops for good."""
        while self.final is None:
            info = self.run_vm()
            if not info.is_paused:
                self.final = info
        return self.final


# -- the `run --gdb` entry point ---------------------------------------------------------------------

def parse_gdb_address(text: str) -> tuple[str, int]:
    """``PORT``, ``HOST:PORT`` or ``[V6ADDR]:PORT`` → (host, port); the host defaults to 127.0.0.1."""
    s = str(text).strip()
    host, port_s = DEFAULT_HOST, s
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or not s[close + 1:].startswith(":"):
            raise TracevisorError(f"bad gdb address {text!r}: use PORT, HOST:PORT or [V6ADDR]:PORT")
        host, port_s = s[1:close], s[close + 2:]
    elif ":" in s:
        host, port_s = s.rsplit(":", 1)
        host = host or DEFAULT_HOST
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise TracevisorError(f"bad gdb port in {text!r}: expected a number from 0 to 65535")
    return host, int(port_s)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def serve_gdb(make_target, address: str, *, say=_say) -> StopInfo:
    """Listen on ``address``, build the target (``make_target()``, after the socket is bound), wait for one
    gdb connection and serve it; shared by ``run --gdb`` (tracevisor.session.Session.serve_gdb) and
    ``replay --gdb``."""
    host, port = parse_gdb_address(address)
    try:
        server = listen(host, port)
    except OSError as e:
        raise TracevisorError(f"cannot listen for gdb on {host}:{port}: {e.strerror or e}") from None
    try:
        target = make_target()
        bound = server.getsockname()
        where = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        say(f"tracevisor: waiting for gdb on {where} (target remote {where})")
        conn, _peer = server.accept()
    finally:
        server.close()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stub = GdbStub(target, conn)
    try:
        end = stub.serve()
    except KeyboardInterrupt:
        target.kill()
        return StopInfo.of(StopReason.INTERRUPTED, "interrupted (Ctrl-C) while gdb was attached; VM stopped")
    if end.how == "detached":
        return target.run_to_end()
    if target.final is not None:  # exited, faulted or killed: that is the outcome
        return target.final
    target.kill()
    if end.how == "protocol-error":
        return StopInfo.of(StopReason.ERROR, f"gdb protocol error ({end.message}); connection dropped, "
                        "VM stopped")
    if end.how == "error":
        return StopInfo.of(StopReason.ERROR, f"gdb stub failed ({end.message}); VM stopped")
    why = end.message or "connection closed"
    return StopInfo.of(StopReason.ERROR, f"gdb disconnected without detaching ({why}); VM stopped")
