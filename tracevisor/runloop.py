"""The vCPU run loop: KVM_RUN → decode the exit once → dispatch → trace.

Two pieces, split so that exit handling can be tested without KVM:

* :class:`ExitDispatcher` — a pure function of a decoded :class:`Exit` (plus the port table, the trace
  sink, the clock and the HostIO behind the port handlers).  Its handler table maps each KVM exit
  reason to one method; unit tests feed it synthetic exits (``tests/test_runloop.py``).
* :class:`VcpuRunner` — the loop around ``KVM_RUN`` on one vCPU's thread.  The per-exit path stays lean
  (docs/architecture.md): one ``struct.unpack_from`` over the shared ``kvm_run`` page yields the exit
  reason, the port-I/O fields, RIP (KVM_CAP_SYNC_REGS, no ioctl) and the I/O data word; a single port
  access is served inline with local lookups (the same steps :meth:`ExitDispatcher.io` takes for
  ``count == 1``); every other exit is decoded into an :class:`Exit` and dispatched.

A trace sink is anything with ``exit(cpu, t_ns, reason, rip, port, direction, size, value, digest)`` and
``event(kind, cpu, t_ns, **fields)`` — the TraceWriter when recording, the divergence checker when
replaying, None for a plain run.  ``digest`` is the exit's register digest: zlib's CRC-32 of the 144-byte
general-register block KVM_CAP_SYNC_REGS put in ``kvm_run`` (docs/trace-format.md), taken before the exit
is handled (handling never writes that block; an IN's answer reaches rax only at the next KVM_RUN).
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import hypercalls
from .clock import Clock
from .errors import Divergence, GuestError, TracevisorError
from .kvm import uapi as U
from .reports import Reporter
from .status import ExitStatus, StopInfo, StopReason

_MASK = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF)
_BYTES = [bytes([i]) for i in range(256)]
_PACK_IN = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I")}
# The coalesced-I/O ring (--coalesce-console): u32 first, u32 last, then entries of
# {u64 phys_addr (the port), u32 len, u32 pio, u8 data[8]}.
_RING_HEAD = struct.Struct("<II")
_RING_ENTRY = struct.Struct("<QII8s")
_RING_MAX = (4096 - _RING_HEAD.size) // _RING_ENTRY.size
RING_EVENT_MAX = 65536  # coalesced console bytes per console event, at most (a split that depends on the bytes)

# One unpack over kvm_run: exit_reason @8, io {direction, size, port, count, data_offset} @32,
# s.regs.rip @432 (KVM_CAP_SYNC_REGS), and the first I/O data word at the usual data_offset 4096.
IO_DATA_OFFSET = 4096
_EXIT = struct.Struct("<I20xBBHIQ384xQ%dxI" % (IO_DATA_OFFSET - 440))
_REGS = struct.Struct("<18Q")  # struct kvm_regs in kvm_run (KVM_CAP_SYNC_REGS)
_SYNC_REGS_OFFSET = 304
_libc_ioctl = ctypes.CDLL(None, use_errno=True).ioctl  # KVM_RUN only: its number fits a C int
SYNC_REGS_OFFSET, SYNC_REGS_SIZE = 304, 144  # struct kvm_regs inside kvm_run (s.regs): the digest covers it


def regs_digest(mm) -> int:
    """The register digest of the exit now in the ``kvm_run`` mapping ``mm`` (off the hot path)."""
    if mm is None or len(mm) < SYNC_REGS_OFFSET + SYNC_REGS_SIZE:
        return 0
    return zlib.crc32(mm[SYNC_REGS_OFFSET:SYNC_REGS_OFFSET + SYNC_REGS_SIZE])

PortOut = Callable[["VcpuState", int, int, int], None]  # (v, port, size, value)
PortIn = Callable[["VcpuState", int, int], int]  # (v, port, size) -> value


class GuestExit(Exception):
    """The guest called EXIT (raised by the hypercall port handler, ends the vCPU's loop)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class VmStop(Exception):
    """An exit handler stops the VM with this report."""

    def __init__(self, info: StopInfo) -> None:
        super().__init__(info.message)
        self.info = info


class VcpuState:
    """Per-vCPU run-loop state (owned by that vCPU's thread)."""

    def __init__(self, cpu: int, vcpu, ctx: hypercalls.Context) -> None:
        self.cpu = cpu
        self.vcpu = vcpu
        self.ctx = ctx
        self.thread: threading.Thread | None = None
        self.exits = 0
        self.parked = False  # halted with interrupts disabled (seen by the watchdog)
        self.stop_request: tuple[StopReason, str] | None = None  # (reason, message) asked by the main thread
        self.uart = None  # console sink for UART bytes (HostIO.console_sink), set at boot
        self.uart_batch = None  # the same for a native-loop batch: sink(data, t_ns) (HostIO.uart_batch_sink)
        self.uart_room = None  # cpu -> bytes the pending UART console event takes before it is cut, or None
        self.console_out = None  # --coalesce-console: shows UART bytes without logging them (set at boot)
        self.ring_buf = bytearray()  # coalesced UART bytes since the last exit handled in user space
        self.ring_t = 0  # trace time of the first of them
        self.started = False  # has entered the guest at least once
        self.finished = False  # stopped for good (not paused)
        self.running = False
        self.pending_regs: list[int] | None = None  # registers handed to KVM through sync regs (exact mode)
        self.eintr = False  # the next entry is not after an exit of the recording (EINTR, a replay's seek hit)
        self.mem_countdown = 0  # exits until the next periodic memory hash (ExitDispatcher.mem_every)
        self.spin_since: float | None = None  # monotonic time of the first probe that saw IF=0 (watchdog)
        self.spin_rip = 0
        self.irq_queued = False  # an interrupt was injected (KVM_INTERRUPT) and KVM has not entered since


class Ports:
    """The I/O port table: port → handler, one dict per direction (the run loop looks ports up here)."""

    def __init__(self) -> None:
        self.out: dict[int, PortOut] = {}
        self.inp: dict[int, PortIn] = {}

    def register(self, ports: Iterable[int], out_handler: PortOut | None = None,
                 in_handler: PortIn | None = None) -> None:
        """out_handler(v, port, size, value), in_handler(v, port, size) -> value."""
        for p in ports:
            if out_handler:
                self.out[p] = out_handler
            if in_handler:
                self.inp[p] = in_handler


@dataclass(slots=True)
class Exit:
    """One decoded VM exit.  Only the fields of its ``reason`` are meaningful.

    ``buf`` is where the exit's data lives and where answers go: the ``kvm_run`` mapping under KVM, any
    writable buffer in tests.  Port I/O data is at ``buf[data_offset:]``; MMIO data is ``mmio_data``
    (8 writable bytes)."""

    reason: int
    rip: int = 0
    # KVM_EXIT_IO
    direction: int = 0
    size: int = 0
    port: int = 0
    count: int = 0
    data_offset: int = 0
    buf: object = None
    # KVM_EXIT_MMIO
    addr: int = 0
    length: int = 0
    is_write: bool = False
    mmio_data: object = None
    # KVM_EXIT_HLT: the guest's interrupt flag
    if_flag: int = 1
    # KVM_EXIT_INTERNAL_ERROR
    suberror: int = 0
    internal_data: tuple[int, ...] = ()
    # every exit: the register digest (0 when the exit did not come from KVM)
    digest: int = 0
    # KVM_EXIT_FAIL_ENTRY
    hardware_reason: int = 0
    # KVM_EXIT_SYSTEM_EVENT
    event_type: int = 0
    # KVM_EXIT_DEBUG
    debug: dict | None = None
    # KVM_EXIT_X86_RDMSR / KVM_EXIT_X86_WRMSR: the kvm_run.msr view (index, data; answers go there)
    msr: object = None


def decode(run, mm, reason: int, rip: int) -> Exit:
    """The exit in ``run`` (a ctypes kvm_run over the mapping ``mm``) as an :class:`Exit`."""
    e = _decode(run, mm, reason, rip)
    e.digest = regs_digest(mm)
    return e


def _decode(run, mm, reason: int, rip: int) -> Exit:
    if reason == U.KVM_EXIT_IO:
        io = run.exit.io
        return Exit(reason, rip, io.direction, io.size, io.port, io.count, io.data_offset, mm)
    if reason == U.KVM_EXIT_MMIO:
        m = run.exit.mmio
        return Exit(reason, rip, addr=m.phys_addr, length=m.len, is_write=bool(m.is_write), mmio_data=m.data)
    if reason == U.KVM_EXIT_HLT:
        return Exit(reason, rip, if_flag=run.if_flag)
    if reason == U.KVM_EXIT_INTERNAL_ERROR:
        ie = run.exit.internal
        return Exit(reason, rip, suberror=ie.suberror,
                    internal_data=tuple(ie.data[i] for i in range(min(ie.ndata, 16))))
    if reason == U.KVM_EXIT_FAIL_ENTRY:
        return Exit(reason, rip, hardware_reason=run.exit.fail_entry.hardware_entry_failure_reason)
    if reason == U.KVM_EXIT_SYSTEM_EVENT:
        return Exit(reason, rip, event_type=run.exit.system_event.type)
    if reason == U.KVM_EXIT_X86_RDMSR or reason == U.KVM_EXIT_X86_WRMSR:
        return Exit(reason, rip, msr=run.exit.msr)
    if reason == U.KVM_EXIT_DEBUG:
        d = run.exit.debug
        return Exit(reason, rip, debug={"pc": d.pc, "rip": rip, "dr6": d.dr6, "dr7": d.dr7,
                                        "exception": d.exception})
    return Exit(reason, rip)


class ExitDispatcher:
    """Serves decoded exits: port I/O through the port table (hypercalls, UART, PCI, devices), MMIO
    outside RAM, HLT, and the exits that stop the VM with a report.

    Handlers raise :class:`VmStop` (stop with this report), :class:`GuestExit` (the guest's EXIT) or
    :class:`~tracevisor.errors.GuestError` (the guest asked for something impossible).  To handle a new
    exit reason, add a method and a row in :attr:`handlers`."""

    def __init__(self, ports: Ports, sink, clock: Clock, reporter: Reporter) -> None:
        self.ports = ports
        self.sink = sink
        self.clock = clock
        self.reporter = reporter
        self.log = reporter.log
        #: Memory hashes for replay verdicts (tracevisor.memhash.attach): mem_check(v, at) after every
        #: hypercall when mem_at_hypercalls, and every mem_every exits of a vCPU (the run loop counts)
        self.mem_check: Callable[[VcpuState, str], None] | None = None
        self.mem_every = 0
        self.mem_at_hypercalls = False
        #: instruction fallback (set by the Machine): fn(v) → True when it made progress at an emulation
        #: failure; fallback_state: the Machine, whose fallback error/hint the fault report names
        self.emulation_fallback: Callable[[VcpuState], bool] | None = None
        self.fallback_state = None
        ports.register(hypercalls.TABLE, out_handler=self.hypercall)
        ports.register((hypercalls.UART_PORT,), out_handler=self.uart)
        #: debug exits the VM itself uses (exact mode's debug-register sites): hook(v, exit) → True if served
        self.debug_hook: Callable[[VcpuState, Exit], bool] | None = None
        #: MMIO served by a model (exact mode's LAPIC page): (base, size, handler(v, addr, write, data) → bytes)
        self.mmio_regions: list[tuple[int, int, Callable[[VcpuState, int, bool, bytes], bytes]]] = []
        #: MSR accesses KVM hands to user space: handler(v, write, index, value) → value read, None for #GP
        self.msr_handler: Callable[[VcpuState, bool, int, int], int | None] | None = None
        #: HLT with interrupts off parks the vCPU instead of stopping the VM (exact mode without an in-kernel
        #: irqchip, where every HLT exits: the VM hangs only when no vCPU can run, tracevisor.interrupts)
        self.hlt_parks = False
        #: exit reason → handler(v, exit); the exit row is traced before the handler runs (port I/O
        #: traces each access itself; debug exits belong to the debugger and are not traced)
        self.handlers: dict[int, Callable[[VcpuState, Exit], None]] = {
            U.KVM_EXIT_HLT: self.hlt,
            U.KVM_EXIT_MMIO: self.mmio,
            U.KVM_EXIT_SHUTDOWN: self.shutdown,
            U.KVM_EXIT_FAIL_ENTRY: self.fail_entry,
            U.KVM_EXIT_INTERNAL_ERROR: self.internal_error,
            U.KVM_EXIT_SYSTEM_EVENT: self.system_event,
            U.KVM_EXIT_INTR: self.ignore,
            U.KVM_EXIT_IRQ_WINDOW_OPEN: self.ignore,
            U.KVM_EXIT_X86_RDMSR: self.msr,
            U.KVM_EXIT_X86_WRMSR: self.msr,
        }

    def dispatch(self, v: VcpuState, e: Exit) -> None:
        """Serve one exit (the run loop calls this for everything but a single port access)."""
        if e.reason == U.KVM_EXIT_IO:
            self.io(v, e)
            return
        if e.reason == U.KVM_EXIT_DEBUG:
            self.debug(v, e)
            return
        if self.sink is not None:
            self.sink.exit(v.cpu, self.clock.now(), e.reason, e.rip, 0, 0, 0, 0, e.digest)
        handler = self.handlers.get(e.reason)
        if handler is None:
            self.unexpected(v, e)
        else:
            handler(v, e)

    # -- port I/O ------------------------------------------------------------------------------------
    def io(self, v: VcpuState, e: Exit) -> None:
        """Port I/O, including ``rep outs``/``rep ins`` (count > 1): each element is one access, served
        and traced in order.  An IN answer is written into the exit's data area."""
        mm, size, count, port, rip = e.buf, e.size, e.count, e.port, e.rip
        if size not in (1, 2, 4) or count < 1 or e.data_offset + size * count > len(mm):
            raise VmStop(self.reporter.fault(v, StopReason.GUEST_ERROR, f"malformed I/O exit (port {port:#x}, "
                                             f"size {size}, count {count})"))
        fmt = _PACK_IN[size]
        sink = self.sink
        for i in range(count):
            off = e.data_offset + i * size
            if e.direction:
                value = fmt.unpack_from(mm, off)[0]
                if sink is not None:
                    sink.exit(v.cpu, self.clock.now(), U.KVM_EXIT_IO, rip, port, 1, size, value, e.digest)
                handler = self.ports.out.get(port)
                if handler is None:
                    self.unknown_out(v, port, size, value, rip)
                else:
                    handler(v, port, size, value)
            else:
                handler = self.ports.inp.get(port)
                value = handler(v, port, size) if handler else self.unknown_in(v, port, size, rip)
                value &= _MASK[size]
                fmt.pack_into(mm, off, value)
                if sink is not None:
                    sink.exit(v.cpu, self.clock.now(), U.KVM_EXIT_IO, rip, port, 0, size, value, e.digest)

    def unknown_out(self, v: VcpuState, port: int, size: int, value: int, rip: int) -> None:
        raise VmStop(self.reporter.fault(
            v, StopReason.GUEST_ERROR,
            f"guest wrote to unknown I/O port {port:#x} (size {size}, value {value:#x}) at rip {rip:#x}"))

    def unknown_in(self, v: VcpuState, port: int, size: int, rip: int) -> int:
        if self.reporter.first_note("port", port):
            self.log(f"vCPU {v.cpu} read unknown I/O port {port:#x} (size {size}) at rip {rip:#x}; "
                     "answered all-ones")
        return 0xFFFF_FFFF

    def hypercall(self, v: VcpuState, port: int, size: int, value: int) -> None:
        """A hypercall port: serve the call (hypercalls.dispatch) and trace it as one event."""
        sink = self.sink
        now = self.clock.now
        t = now() if sink is not None else 0
        v.ctx.reset()
        try:
            call = hypercalls.dispatch(port, value, v.ctx)
        except GuestError as e:
            if sink is not None:
                sink.event("hypercall", v.cpu, t, call=hypercalls.PORT_NAMES[port], port=port, addr=value,
                           error=str(e), t_end=now())
            raise
        if sink is not None:
            fields = {"call": call.name, "port": port, "addr": value, "block": call.block,
                      "args": hypercalls.describe_args(call), "ret": call.outcome.ret, "t_end": now()}
            if call.out is not None:
                fields["out"] = call.out
            if call.outcome.payload is not None:
                fields["payload"] = call.outcome.payload
            sink.event("hypercall", v.cpu, t, **fields)
        if self.mem_at_hypercalls:  # memory as the call left it (READ data, write-backs), even for EXIT
            self.mem_check(v, "hypercall")
        if call.outcome.exit_code is not None:
            raise GuestExit(call.outcome.exit_code)

    @staticmethod
    def uart(v: VcpuState, port: int, size: int, value: int) -> None:
        v.uart(_BYTES[value] if size == 1 else value.to_bytes(size, "little"))

    # -- other exits -----------------------------------------------------------------------------------
    def debug(self, v: VcpuState, e: Exit) -> None:
        """A single-step or hardware-breakpoint exit: pause the VM; the debugger decides what is next."""
        if self.debug_hook is not None and self.debug_hook(v, e):
            return
        d = e.debug or {}
        raise VmStop(StopInfo.paused(f"debug stop at {d.get('pc', e.rip):#x}", cpu=v.cpu, report={"debug": d}))

    def hlt(self, v: VcpuState, e: Exit) -> None:
        if not e.if_flag and self.hlt_parks:  # user-space interrupts: the scheduler leaves it parked
            v.parked = True
            return
        if not e.if_flag:
            raise VmStop(self.reporter.fault(v, StopReason.HANG, f"vCPU {v.cpu} halted with interrupts disabled "
                                             "(hlt after cli): it can never continue"))
        # uhyve re-enters the guest

    def mmio(self, v: VcpuState, e: Exit) -> None:
        """An access outside guest RAM: reads see all-ones, writes are dropped (both noted once)."""
        addr, write = e.addr, e.is_write
        length = min(e.length, 8)
        buf = e.mmio_data
        for base, size, handler in self.mmio_regions:
            if base <= addr < base + size:
                data = handler(v, addr, write, bytes(buf[:length]))
                if not write:
                    for i in range(length):
                        buf[i] = data[i]
                if self.sink is not None:
                    self.sink.event("mmio", v.cpu, self.clock.now(), addr=addr, len=length, data=bytes(data[:length]),
                                    write=write)
                return
        if not write:
            for i in range(length):
                buf[i] = 0xFF
        data = bytes(buf[:length])
        if self.sink is not None:
            self.sink.event("mmio", v.cpu, self.clock.now(), addr=addr, len=length, data=data, write=write)
        if self.reporter.first_note("mmio", addr):
            self.log(f"vCPU {v.cpu} {'wrote' if write else 'read'} {length} bytes at {addr:#x}, "
                     f"outside guest RAM (rip {e.rip:#x}); " + ("ignored" if write else "answered all-ones"))

    def msr(self, v: VcpuState, e: Exit) -> None:
        """An MSR access KVM could not serve (exact mode: x2APIC registers, the TSC deadline): the model
        answers it, or the guest gets the #GP KVM would have given it."""
        m = e.msr
        write = e.reason == U.KVM_EXIT_X86_WRMSR
        index, value = m.index, m.data if write else 0
        got = self.msr_handler(v, write, index, value) if self.msr_handler is not None else None
        m.error = 1 if got is None else 0
        if not write and got is not None:
            m.data = value = got
        if self.sink is not None:
            self.sink.event("msr", v.cpu, self.clock.now(), index=index, data=value, write=write, gp=got is None)
        if got is None and self.reporter.first_note("msr", index):
            self.log(f"vCPU {v.cpu} {'wrote' if write else 'read'} MSR {index:#x} (rip {e.rip:#x}), which nothing "
                     "emulates; the guest gets #GP")

    def shutdown(self, v: VcpuState, e: Exit) -> None:
        raise VmStop(self.reporter.fault(v, StopReason.FAULT,
                                         f"guest triple fault on vCPU {v.cpu} (KVM_EXIT_SHUTDOWN)",
                                         hints=["a triple fault resets a real CPU; under uhyve 0.2.1 it "
                                                "looked like a clean exit (status 0)"]))

    def fail_entry(self, v: VcpuState, e: Exit) -> None:
        raise VmStop(self.reporter.fault(
            v, StopReason.FAULT, f"KVM could not enter the guest on vCPU {v.cpu} (KVM_EXIT_FAIL_ENTRY, "
            f"hardware reason {e.hardware_reason:#x})", extra={"hardware_entry_failure_reason": e.hardware_reason}))

    def internal_error(self, v: VcpuState, e: Exit) -> None:
        sub = e.suberror
        # -- instruction fallback hook (tracevisor/fallback.py): what KVM's emulator cannot execute --
        if sub == 1 and self.emulation_fallback is not None and self.emulation_fallback(v):
            return
        what = U.INTERNAL_ERROR_SUBERRORS.get(sub, "unknown")
        hints = []
        if sub == 1 and not self.reporter.rip_outside_ram(v):
            from .fallback import fault_hints

            hints.extend(fault_hints(self.fallback_state, v, self.reporter))
        elif sub == 1:
            hints.append("rip points outside guest RAM: the guest jumped to an address with no memory "
                         "(a bad function pointer or return address?)")
        raise VmStop(self.reporter.fault(
            v, StopReason.FAULT, f"KVM internal error on vCPU {v.cpu}: suberror {sub} ({what})",
            extra={"suberror": sub, "data": list(e.internal_data)}, hints=hints))

    def system_event(self, v: VcpuState, e: Exit) -> None:
        raise VmStop(self.reporter.fault(v, StopReason.FAULT, f"guest requested a system event (type "
                                         f"{e.event_type}: shutdown/reset/crash) on vCPU {v.cpu}"))

    @staticmethod
    def ignore(v: VcpuState, e: Exit) -> None:
        """Nothing to do: KVM returned for its own reasons (a signal, an interrupt window)."""

    def unexpected(self, v: VcpuState, e: Exit) -> None:
        name = U.exit_reason_name(e.reason)
        raise VmStop(self.reporter.fault(v, StopReason.FAULT,
                                         f"unexpected KVM exit {name} ({e.reason}) on vCPU {v.cpu}"))


class VcpuRunner:
    """Runs vCPUs: one call of :meth:`run_thread` per vCPU thread, until the VM stops or pauses.

    ``stopping`` is set by the VM when every vCPU must leave ``KVM_RUN``; ``stop(info)`` reports why this
    vCPU stopped (the first report wins); ``paused()`` tells whether the VM's stop is a pause.
    ``native_loop(runner, v)``, when given, replaces the pure-Python loop (tracevisor/fastloop.py); it
    decodes the exits it hands back with :attr:`decode`."""

    decode = staticmethod(decode)

    def __init__(self, dispatcher: ExitDispatcher, stopping: threading.Event,
                 stop: Callable[[StopInfo], None], paused: Callable[[], bool], stagger_s: float,
                 sched=None, native_loop: Callable[[VcpuRunner, VcpuState], None] | None = None,
                 ring_offset: int = 0, exit_budget: Callable[[VcpuState], int] | None = None, irq=None) -> None:
        self.sched = sched  # exact mode, several vCPUs: the token and schedule (tracevisor/sched.py)
        self.irq = irq  # exact mode: user-space interrupt controllers on virtual time (tracevisor/interrupts.py)
        self.dispatcher = dispatcher
        self.stopping = stopping
        self.stop = stop
        self.paused = paused
        self.stagger_s = stagger_s
        self.native_loop = native_loop  # the C loop (tracevisor/fastloop.py), or None
        self.ring_offset = ring_offset  # --coalesce-console: the ring's offset in the kvm_run mapping
        self.exit_budget = exit_budget  # v -> exits before Python must see one (0: no limit), or None

    def run_thread(self, v: VcpuState) -> None:
        """The body of a vCPU thread: start (APs staggered as uhyve does), loop, report how it ended."""
        sink = self.dispatcher.sink
        clock = self.dispatcher.clock
        reporter = self.dispatcher.reporter
        announce = False
        if not v.started:
            if v.cpu and self.stopping.wait(v.cpu * self.stagger_s):
                return
            v.started = True
            announce = sink is not None
        v.running = True
        reason = StopReason.STOPPED
        try:
            if announce:  # inside the try: under replay this is checked and may diverge
                sink.event("vcpu", v.cpu, clock.now(), state="start")
            self.loop(v)
        except GuestExit as e:
            reason = StopReason.EXIT
            self.stop(StopInfo.guest_exit(e.code, cpu=v.cpu))
        except GuestError as e:
            reason = StopReason.GUEST_ERROR
            self.stop(reporter.fault(v, StopReason.GUEST_ERROR, f"guest error on vCPU {v.cpu}: {e}"))
        except VmStop as e:
            reason = e.info.reason
            self.stop(e.info)
        except Divergence as e:
            reason = StopReason.DIVERGED
            info = reporter.fault(v, StopReason.DIVERGED, f"replay diverged on vCPU {v.cpu}: {e}", extra=e.details)
            info.status = int(ExitStatus.DIVERGED)
            self.stop(info)
        except TracevisorError as e:
            reason = StopReason.ERROR
            self.stop(StopInfo.of(StopReason.ERROR, str(e), cpu=v.cpu))
        except Exception as e:  # a bug in tracevisor: stop cleanly, keep the details
            reason = StopReason.ERROR
            self.stop(StopInfo.of(StopReason.ERROR, f"internal error on vCPU {v.cpu}: {type(e).__name__}: {e}",
                                  cpu=v.cpu, report={"traceback": traceback.format_exc()}))
        finally:
            v.running = False
            if self.ring_offset and not self.paused():
                try:  # the coalesced console bytes still queued belong before the vCPU's stop
                    self.ring_drain(v)
                    self.ring_flush(v)
                except Exception:  # a replay that diverged or stopped: the stop is already known
                    pass
            if not self.paused() and not v.finished:
                v.finished = True
                if sink is not None:
                    try:
                        sink.event("vcpu", v.cpu, clock.now(), state="stop", reason=str(reason))
                    except Exception:  # e.g. a replay that already diverged: the stop is already known
                        pass

    def loop(self, v: VcpuState) -> None:
        """The hot loop.  Everything per exit is a local lookup."""
        # The C loop (tracevisor/fastloop.py); below, the pure-Python one, which also serves exact mode's
        # serialized vCPUs: their schedule acts before and after every exit, UART exits included.
        if self.native_loop is not None and self.sched is None and self.irq is None:
            return self.native_loop(self, v)
        mm = v.vcpu.run_mmap
        if len(mm) < _EXIT.size:
            raise TracevisorError(f"the kvm_run mapping ({len(mm)} bytes) has no I/O data page")
        regs = memoryview(mm)[SYNC_REGS_OFFSET:SYNC_REGS_OFFSET + SYNC_REGS_SIZE]
        try:
            self._exits(v, regs)
        finally:
            regs.release()  # the view pins the kvm_run mapping; the vCPU may be closed after the loop

    def _exits(self, v: VcpuState, regs: memoryview) -> None:
        fd = v.vcpu.fd
        mm = v.vcpu.run_mmap
        run = v.vcpu.run
        # ctypes' plain foreign call is ~0.8 µs cheaper per exit than fcntl.ioctl (which first tries
        # the buffer protocol on its argument); it releases the GIL like fcntl does.
        kvm_run = _libc_ioctl
        get_errno = ctypes.get_errno
        KVM_RUN = U.KVM_RUN
        unpack = _EXIT.unpack_from
        d = self.dispatcher
        out_ports = d.ports.out
        in_ports = d.ports.inp
        trace_exit = d.sink.exit if d.sink is not None else None
        dispatch = d.dispatch
        crc32 = zlib.crc32
        every = d.mem_every
        periodic = d.mem_check if every else None
        countdown = v.mem_countdown or every
        monotonic_ns = time.monotonic_ns
        t0 = d.clock.t0
        cpu = v.cpu
        mask = _MASK
        pack_in = _PACK_IN
        sched = self.sched
        ring = bool(self.ring_offset)
        uart_port = hypercalls.UART_PORT
        irq = self.irq
        while True:
            if sched is not None and not sched.wait_turn(v):
                return
            if irq is not None:
                hang = irq.enter(v)
                if hang is not None:
                    raise VmStop(d.reporter.fault(v, StopReason.HANG, hang))
            if kvm_run(fd, KVM_RUN, 0) < 0:
                err = get_errno()
                if err == errno.EINTR or err == errno.EAGAIN:
                    v.eintr = True
                    if self.interrupted(v):
                        return
                    continue
                self.kvm_run_failed(v, err)
            if irq is not None:
                v.irq_queued = False
                v.eintr = False
            reason, direction, size, port, count, data_offset, rip, data = unpack(mm, 8)
            v.spin_since = None  # an exit: not a spin without exits (the watchdog's probe starts it again)
            if ring:  # --coalesce-console: the queued UART bytes come before this exit
                self.ring_drain(v)
                if reason == 2 and direction and port == uart_port and count == 1:  # the ring was full
                    self.ring_collect(v, (data & mask[size]).to_bytes(4, "little")[:size], d.clock.now())
                    continue
                self.ring_flush(v)
            if reason == 2 and count == 1 and data_offset == IO_DATA_OFFSET:  # single port I/O, inline
                if direction:  # OUT
                    value = data & mask[size]
                    if trace_exit is not None:
                        trace_exit(cpu, monotonic_ns() - t0, 2, rip, port, 1, size, value, crc32(regs))
                    handler = out_ports.get(port)
                    if handler is None:
                        d.unknown_out(v, port, size, value, rip)
                    else:
                        handler(v, port, size, value)
                else:  # IN
                    dig = crc32(regs) if trace_exit is not None else 0
                    handler = in_ports.get(port)
                    value = handler(v, port, size) if handler else d.unknown_in(v, port, size, rip)
                    value &= mask[size]
                    pack_in[size].pack_into(mm, data_offset, value)
                    if trace_exit is not None:  # the digest of the registers before the answer reaches rax
                        trace_exit(cpu, monotonic_ns() - t0, 2, rip, port, 0, size, value, dig)
            elif reason == 4 and sched is not None and sched.on_debug(v, run.exit.debug.pc):
                continue  # the replay's schedule seeking a recorded kick point: not a guest exit
            elif reason == 17 and sched is not None and sched.seeking is not None and sched.on_unemulated(v, rip):
                continue  # the sought point is an instruction KVM cannot emulate: reached, not a guest exit
            else:
                dispatch(v, decode(run, mm, reason, rip))
            if irq is not None:
                irq.after_exit(v, reason)
            if sched is not None:
                sched.after_exit(v, reason)
            if periodic is not None:
                countdown -= 1
                if not countdown:
                    countdown = every
                    periodic(v, "every")
                v.mem_countdown = countdown

    # -- shared by the pure-Python and the native loop -----------------------------------------------
    def interrupted(self, v: VcpuState) -> bool:
        """KVM_RUN returned EINTR/EAGAIN (a kick, a signal, immediate_exit): True when the vCPU must stop;
        raises VmStop for a pause or a stop request; otherwise the loop re-enters the guest."""
        if self.stopping.is_set():
            return True
        run = v.vcpu.run
        run.immediate_exit = 0
        if v.pending_regs is not None and run.kvm_dirty_regs & U.KVM_SYNC_X86_REGS:
            # KVM returned before entering the guest and stored its older registers over ours
            _REGS.pack_into(v.vcpu.run_mmap, _SYNC_REGS_OFFSET, *v.pending_regs)
        if self.sched is not None:
            self.sched.on_interrupted(v)
        if v.stop_request is not None:
            reason_, message = v.stop_request
            if reason_ == StopReason.PAUSED:
                raise VmStop(StopInfo.paused(message, cpu=v.cpu))
            raise VmStop(self.dispatcher.reporter.fault(v, reason_, message))
        self.probe(v)
        return False

    def kvm_run_failed(self, v: VcpuState, err: int) -> None:
        raise VmStop(self.dispatcher.reporter.fault(v, StopReason.ERROR,
                                                    f"KVM_RUN failed on vCPU {v.cpu}: {os.strerror(err)}"))

    # -- coalesced console (--coalesce-console) -------------------------------------------------------
    def ring_drain(self, v: VcpuState) -> None:
        """Take the UART bytes KVM queued in the coalesced ring (in the order the guest wrote them)."""
        mm = v.vcpu.run_mmap
        base = self.ring_offset
        first, last = _RING_HEAD.unpack_from(mm, base)
        if first == last:
            return
        out = bytearray()
        while first != last and first < _RING_MAX:
            addr, length, pio, data = _RING_ENTRY.unpack_from(mm, base + 8 + first * _RING_ENTRY.size)
            if pio and addr == hypercalls.UART_PORT and length <= 8:
                out += data[:length]
            first = (first + 1) % _RING_MAX
        struct.pack_into("<I", mm, base, first)
        if out:
            self.ring_collect(v, bytes(out), self.dispatcher.clock.now())

    def ring_collect(self, v: VcpuState, data: bytes, t: int) -> None:
        """Coalesced UART bytes: shown at once, logged as console events before the next exit handled in user
        space (in pieces of RING_EVENT_MAX bytes, a split that depends only on the bytes)."""
        v.console_out(data)
        buf = v.ring_buf
        if not buf:
            v.ring_t = t
        buf += data
        while len(buf) >= RING_EVENT_MAX:
            piece = bytes(buf[:RING_EVENT_MAX])
            del buf[:RING_EVENT_MAX]
            self._ring_event(v, piece, v.ring_t)
            v.ring_t = t

    def ring_flush(self, v: VcpuState) -> None:
        """Log the coalesced UART bytes gathered since the last exit (called before handling an exit)."""
        if v.ring_buf:
            data = bytes(v.ring_buf)
            v.ring_buf.clear()
            self._ring_event(v, data, v.ring_t)

    def _ring_event(self, v: VcpuState, data: bytes, t: int) -> None:
        sink = self.dispatcher.sink
        if sink is not None:
            sink.event("console", v.cpu, t, stream="uart", data=data, coalesced=True)

    @staticmethod
    def probe(v: VcpuState) -> None:
        """After a watchdog kick: is this vCPU parked for good — halted with interrupts off, or held in
        wait-for-SIPI after an INIT (only another vCPU's SIPI could wake it)?"""
        try:
            state = v.vcpu.get_mp_state()
            if state == U.KVM_MP_STATE_HALTED:
                v.parked = not (v.vcpu.get_regs().rflags & 0x200)
                v.spin_since = None
            else:
                v.parked = state == U.KVM_MP_STATE_INIT_RECEIVED
                # running with interrupts off: note since when (the watchdog reports a long spin)
                regs = v.vcpu.get_regs()
                if regs.rflags & 0x200 or state != U.KVM_MP_STATE_RUNNABLE:
                    v.spin_since = None
                elif v.spin_since is None:
                    v.spin_since = time.monotonic()
                v.spin_rip = regs.rip
        except TracevisorError:
            v.parked = False
