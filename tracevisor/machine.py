"""The virtual machine and its run loop: KVM_RUN → decode the exit once → dispatch by port → trace.

:class:`Machine` composes the pieces (KVM objects, GuestMemory, the port table, HostIO, an optional
trace sink) and runs one host thread per vCPU.  The per-exit path is kept lean (see design notes in
docs/architecture.md): one ``struct.unpack_from`` over the shared ``kvm_run`` page yields the exit
reason, the port-I/O fields, RIP (from KVM_CAP_SYNC_REGS, no ioctl) and the I/O data word; the port
table is a dict lookup; tracing is one call to ``trace.exit``.

A trace sink is anything with ``exit(cpu, t_ns, reason, rip, port, direction, size, value)`` and
``event(kind, cpu, t_ns, **fields)`` — the TraceWriter when recording, the divergence checker when
replaying.
"""

from __future__ import annotations

import ctypes
import errno
import math
import os
import signal
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from . import arch_x86_64 as arch
from . import hypercalls
from .devices.pci import CONFIG_ADDRESS, CONFIG_DATA, PciBus
from .errors import Divergence, GuestError, TracevisorError
from .kvm import uapi as U
from .kvm.system import Kvm, Vcpu
from .loader import KernelImage
from .memory import GuestMemory

MIB = 1 << 20
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 0xD000_0000  # uhyve's slot 0 ends at 3.25 GiB; tracevisor keeps guests below it
DEFAULT_MEMORY = 64 * MIB
MAX_CPUS = 64
AP_STAGGER_S = 0.05  # uhyve starts vCPU n after n × 50 ms
MAX_NOTES = 32  # distinct unknown ports/MMIO addresses reported before going quiet
WATCHDOG_PERIOD_S = 1.0
KICK_SIGNAL = signal.SIGRTMIN

# Process exit statuses (besides the guest's own exit code)
STATUS_ERROR = 1  # host/configuration error
STATUS_USAGE = 2
STATUS_GUEST_FAULT = 3  # the VM was stopped because of the guest (fault, bad request, hang)
STATUS_DIVERGED = 4  # replay diverged from the recording
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130
STATUS_TERMINATED = 143

_MASK = (0, 0xFF, 0xFFFF, 0, 0xFFFF_FFFF)
_BYTES = [bytes([i]) for i in range(256)]

# One unpack over kvm_run: exit_reason @8, io {direction, size, port, count, data_offset} @32,
# s.regs.rip @432 (KVM_CAP_SYNC_REGS), and the first I/O data word at the usual data_offset 4096.
IO_DATA_OFFSET = 4096
_EXIT = struct.Struct("<I20xBBHIQ384xQ%dxI" % (IO_DATA_OFFSET - 440))
_libc_ioctl = ctypes.CDLL(None, use_errno=True).ioctl  # KVM_RUN only: its number fits a C int
_PACK_IN = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I")}


class GuestExit(Exception):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class VmStop(Exception):
    def __init__(self, info: StopInfo) -> None:
        super().__init__(info.message)
        self.info = info


class _Terminated(Exception):
    pass


@dataclass
class StopInfo:
    """Why and how the VM stopped; ``status`` is the process exit status the CLI returns."""

    reason: str  # exit | fault | guest-error | hang | interrupted | terminated | timeout | error | stopped
    status: int
    message: str = ""
    code: int | None = None  # the guest's exit code, for reason == "exit"
    cpu: int | None = None
    report: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"reason": self.reason, "status": self.status, "code": self.code, "cpu": self.cpu,
                "message": self.message, "report": self.report}

    def format(self) -> str:
        """The human-readable stop report (empty for a normal guest exit)."""
        if self.reason == "exit":
            return ""
        lines = [f"tracevisor: {self.message}"]
        r = self.report
        if "regs" in r:
            g = r["regs"]
            names = ["rip", "rsp", "rbp", "rflags", "rax", "rbx", "rcx", "rdx", "rsi", "rdi",
                     "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"]
            for i in range(0, len(names), 4):
                lines.append("  " + "  ".join(f"{n:>6}={g[n]:#018x}" for n in names[i:i + 4] if n in g))
        if "sregs" in r:
            s = r["sregs"]
            lines.append("  " + "  ".join(f"{n}={s[n]:#x}" for n in ("cr0", "cr2", "cr3", "cr4", "efer")
                                          if n in s))
        if r.get("code_bytes"):
            lines.append(f"  code at rip: {r['code_bytes']}")
        for hint in r.get("hints", []):
            lines.append(f"  hint: {hint}")
        return "\n".join(lines)


@dataclass
class VmConfig:
    kernel: str
    args: list[str] = field(default_factory=list)
    memory: int = DEFAULT_MEMORY
    cpus: int = 1
    verbose: bool = False
    pit: bool = False
    timeout: float | None = None
    hide_rdrand: bool = True
    cpuid_rows: list[list[int]] | None = None  # replay: the recorded table instead of the host's
    stagger_s: float = AP_STAGGER_S
    net: str | None = None  # --net SPEC: a virtio-net device (its backend belongs to the HostIO)

    def validate(self) -> None:
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise TracevisorError(
                f"guest memory {self.memory / MIB:g} MiB is out of range: use {MIN_MEMORY // MIB} MiB "
                f"to {MAX_MEMORY // MIB} MiB")
        if self.memory % 4096:
            raise TracevisorError("guest memory must be a multiple of 4 KiB")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise TracevisorError(f"vCPU count {self.cpus} is out of range (1–{MAX_CPUS})")


class VcpuState:
    """Per-vCPU run-loop state (owned by that vCPU's thread)."""

    def __init__(self, cpu: int, vcpu: Vcpu, ctx: hypercalls.Context) -> None:
        self.cpu = cpu
        self.vcpu = vcpu
        self.ctx = ctx
        self.thread: threading.Thread | None = None
        self.exits = 0
        self.parked = False  # halted with interrupts disabled (seen by the watchdog)
        self.stop_request: tuple[str, str] | None = None  # (reason, message) asked by the main thread
        self.uart = None  # console sink for UART bytes (HostIO.console_sink), set at boot
        self.started = False  # has entered the guest at least once
        self.finished = False  # stopped for good (not paused)
        self.running = False


class Machine:
    """One VM: create with a config and a parsed kernel, then :meth:`run` with a HostIO."""

    def __init__(self, config: VmConfig, image: KernelImage, kvm: Kvm | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        config.validate()
        self.config = config
        self.image = image
        self.log = log or (lambda msg: print(f"tracevisor: {msg}", file=sys.stderr, flush=True))
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = self.kvm.create_vm()
        self.memory = GuestMemory(config.memory)
        self.t0 = time.monotonic_ns()
        self.hostio = None
        self.trace = None
        self.stop_info: StopInfo | None = None
        self.booted = False
        self._stop_lock = threading.Lock()
        self._stopping = threading.Event()
        self._noted: set[tuple[str, int]] = set()  # unknown IN ports / MMIO addresses already logged
        self.exit_hooks: list[Callable] = []
        self.stop_conditions: list[Callable[[], StopInfo | None]] = []  # polled by the main thread
        self.caps = {
            "sync_regs": self.kvm.check_extension(U.KVM_CAP_SYNC_REGS),
            "irqchip": self.kvm.check_extension(U.KVM_CAP_IRQCHIP),
            "immediate_exit": self.kvm.check_extension(U.KVM_CAP_IMMEDIATE_EXIT),
        }
        self._setup_vm()
        self.pci = PciBus()
        self.out_ports: dict[int, Callable] = {}
        self.in_ports: dict[int, Callable] = {}
        self._setup_ports()
        self.net = None
        if config.net:
            from .devices.virtio_net import attach

            self.net = attach(self, config.net)

    # -- creation ----------------------------------------------------------------------------------
    def _setup_vm(self) -> None:
        vm, cfg = self.vm, self.config
        vm.set_tss_addr(0xFFFB_D000)
        vm.set_memory_region(0, 0, cfg.memory, self.memory.host_address)
        self.irqchip = False
        if self.caps["irqchip"]:
            vm.create_irqchip()
            self.irqchip = True
            vm.enable_cap(U.KVM_CAP_X2APIC_API,
                          U.KVM_X2APIC_API_USE_32BIT_IDS | U.KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK)
            if cfg.pit:
                vm.create_pit2()
        if cfg.cpuid_rows is not None:
            self.cpuid = arch.cpuid_from_rows(cfg.cpuid_rows)
        else:
            self.cpuid = arch.guest_cpuid(self.kvm.supported_cpuid(), cfg.hide_rdrand)
        self.vcpus: list[VcpuState] = []
        for cpu in range(cfg.cpus):
            vcpu = vm.create_vcpu(cpu)
            vcpu.enable_sync_regs()
            ctx = hypercalls.Context(cpu, self.memory, None, self._cr3_getter(vcpu))
            self.vcpus.append(VcpuState(cpu, vcpu, ctx))
        self.tsc_khz = self.vcpus[0].vcpu.tsc_khz()

    def _cr3_getter(self, vcpu: Vcpu) -> Callable[[], int]:
        return lambda: vcpu.get_sregs().cr3

    def _setup_ports(self) -> None:
        for port in hypercalls.TABLE:
            self.out_ports[port] = self._hypercall
        self.out_ports[hypercalls.UART_PORT] = self._uart
        pci = self.pci
        self.out_ports[CONFIG_ADDRESS] = lambda v, port, size, value: pci.write_address(size, value)
        self.in_ports[CONFIG_ADDRESS] = lambda v, port, size: pci.read_address(size)
        for p in range(CONFIG_DATA, CONFIG_DATA + 4):
            self.out_ports[p] = lambda v, port, size, value: pci.write_data(port, size, value)
            self.in_ports[p] = lambda v, port, size: pci.read_data(port, size)

    def register_ports(self, ports, out_handler=None, in_handler=None) -> None:
        """Devices add their I/O ports: out_handler(v, port, size, value), in_handler(v, port, size)."""
        for p in ports:
            if out_handler:
                self.out_ports[p] = out_handler
            if in_handler:
                self.in_ports[p] = in_handler

    def now(self) -> int:
        """ns since the machine was created (the trace clock)."""
        return time.monotonic_ns() - self.t0

    def describe(self) -> dict:
        """Facts for a trace header."""
        return {
            "memory": self.config.memory, "cpus": self.config.cpus,
            "cpuid": arch.cpuid_rows(self.cpuid),
            "irqchip": self.irqchip, "tsc_khz": self.tsc_khz,
            "caps": self.caps,
        }

    # -- boot --------------------------------------------------------------------------------------
    def _boot(self) -> None:
        img, cfg, mem = self.image, self.config, self.memory
        arch.write_boot_structures(mem)
        img.place(mem)
        boot_time = self.hostio.boot_time_ns(0)
        freq = self.hostio.cpu_freq_khz(0)
        info = arch.BootInfo(
            ram_size=cfg.memory, serial_port=arch.UART_PORT if cfg.verbose else 0,
            image_start=img.load_address, image_end=img.image_end, tls=img.tls,
            num_cpus=cfg.cpus, cpu_freq_khz=freq, boot_time_ns=boot_time)
        mem.write(arch.BOOT_INFO_ADDR, info.encode(img.entry_version), "boot info")
        stack_bottom = img.boot_stack[0]
        for v in self.vcpus:
            vc = v.vcpu
            vc.set_cpuid(arch.cpuid_for_vcpu(self.cpuid, v.cpu))
            vc.set_sregs(arch.setup_sregs(vc.get_sregs()))
            vc.set_regs(arch.initial_regs(img.entry, v.cpu, stack_bottom))
            vc.set_fpu(arch.initial_fpu())
            vc.set_msrs(arch.initial_msrs())
            if self.irqchip:
                vc.set_mp_state(U.KVM_MP_STATE_RUNNABLE)
            v.ctx.hostio = self.hostio
            v.uart = self.hostio.console_sink(v.cpu, "uart")

    # -- running -----------------------------------------------------------------------------------
    def run(self, hostio, trace=None) -> StopInfo:
        """Boot and run until the guest exits or is stopped; returns why it stopped."""
        try:
            self.boot(hostio, trace)
        except GuestError as e:  # cannot happen with a validated image, but never a traceback
            return StopInfo("error", STATUS_ERROR, f"boot failed: {e}")
        return self._execute()

    def boot(self, hostio, trace=None) -> None:
        """Lay out memory and vCPU state without running (a debugger attaches here, then resume())."""
        self.hostio = hostio
        self.trace = trace
        self._boot()
        self.booted = True

    def resume(self) -> StopInfo:
        """Run a booted VM that has not started yet, or continue one that stopped with reason "paused"."""
        if not self.booted:
            raise TracevisorError("the VM has not been booted")
        if self.stop_info is not None:
            if self.stop_info.reason != "paused":
                raise TracevisorError(f"the VM has stopped ({self.stop_info.reason}); it cannot continue")
            self.stop_info = None
            self._stopping.clear()
            for v in self.vcpus:
                v.stop_request = None
        return self._execute()

    def request_pause(self, v: VcpuState, message: str = "paused") -> None:
        """Pause the VM after the exit being handled (call from v's own thread, e.g. a replay callback)."""
        v.stop_request = ("paused", message)
        v.vcpu.run.immediate_exit = 1

    def _execute(self) -> StopInfo:
        main = threading.current_thread() is threading.main_thread()
        old_handlers = {}
        if main:
            old_handlers[KICK_SIGNAL] = signal.signal(KICK_SIGNAL, lambda *a: None)
            old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise TracevisorError("the first Machine.run must happen on the main thread "
                                  "(it installs the vCPU kick signal handler)")
        try:
            for v in self.vcpus:
                if v.finished:
                    continue
                v.thread = threading.Thread(target=self._vcpu_thread, args=(v,),
                                            name=f"vcpu{v.cpu}", daemon=True)
                v.thread.start()
            self._supervise()
            self._join()
        finally:
            if main:
                for sig, h in old_handlers.items():
                    signal.signal(sig, h)
            try:
                self.hostio.flush()
            except Exception:
                pass
        assert self.stop_info is not None
        return self.stop_info

    def _on_sigterm(self, signum, frame):
        raise _Terminated()

    def _supervise(self) -> None:
        """Main thread: wait for the end; enforce --timeout; detect vCPUs parked forever; Ctrl-C."""
        deadline = time.monotonic() + self.config.timeout if self.config.timeout else None
        next_probe = time.monotonic() + WATCHDOG_PERIOD_S
        while True:
            try:
                if self._stopping.wait(0.05 if deadline or self.config.cpus > 1 else 0.2):
                    return
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self.stop(StopInfo("timeout", STATUS_TIMEOUT,
                                       f"--timeout of {self.config.timeout:g} s expired; VM stopped"))
                    return
                for cond in self.stop_conditions:
                    info = cond()
                    if info is not None:
                        self.stop(info)
                        return
                if now >= next_probe:
                    next_probe = now + WATCHDOG_PERIOD_S
                    self._watchdog()
            except KeyboardInterrupt:
                self.stop(StopInfo("interrupted", STATUS_INTERRUPTED, "interrupted (Ctrl-C); VM stopped"))
                return
            except _Terminated:
                self.stop(StopInfo("terminated", STATUS_TERMINATED, "terminated (SIGTERM); VM stopped"))
                return

    def _watchdog(self) -> None:
        live = [v for v in self.vcpus if v.running]
        if live and all(v.parked for v in live):
            # The report needs the vCPU's registers, which only its own thread can read while it is
            # inside KVM_RUN: ask it to stop with the report.
            live[0].stop_request = ("hang", "every vCPU is halted with interrupts disabled (hlt after "
                                    "cli) or held after an INIT waiting for a SIPI: the guest can never "
                                    "continue")
            self._kick(live[0])
            return
        for v in live:
            self._kick(v)

    def _kick(self, v: VcpuState) -> None:
        v.vcpu.run.immediate_exit = 1
        t = v.thread
        if t is not None and t.is_alive() and t.ident is not None:
            try:
                signal.pthread_kill(t.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def stop(self, info: StopInfo) -> None:
        """Stop the VM (first caller wins) and kick every vCPU out of KVM_RUN."""
        with self._stop_lock:
            if self.stop_info is None:
                self.stop_info = info
            self._stopping.set()
        if info.reason != "paused" and self.hostio is not None:
            cancel = getattr(self.hostio, "cancel", None)
            if cancel is not None:
                cancel()  # a vCPU waiting on the outside world (a READ of stdin) must not keep the VM alive
        for v in self.vcpus:
            if threading.current_thread() is not v.thread:
                self._kick(v)

    def _join(self) -> None:
        for v in self.vcpus:
            while v.thread is not None and v.thread.is_alive():
                v.thread.join(0.1)
                if v.thread.is_alive():
                    self._kick(v)

    def _vcpu_thread(self, v: VcpuState) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        trace = self.trace
        announce = False
        if not v.started:
            if v.cpu and self._stopping.wait(v.cpu * self.config.stagger_s):
                return
            v.started = True
            announce = trace is not None
        v.running = True
        reason = "stopped"
        try:
            if announce:  # inside the try: under replay this is checked and may diverge
                trace.event("vcpu", v.cpu, self.now(), state="start")
            self._loop(v)
        except GuestExit as e:
            reason = "exit"
            self.stop(StopInfo("exit", e.code & 0xFF, f"guest exited with code {e.code}", code=e.code,
                               cpu=v.cpu))
        except GuestError as e:
            reason = "guest-error"
            self.stop(self._fault(v, "guest-error", f"guest error on vCPU {v.cpu}: {e}"))
        except VmStop as e:
            reason = e.info.reason
            self.stop(e.info)
        except Divergence as e:
            reason = "diverged"
            info = self._fault(v, "diverged", f"replay diverged on vCPU {v.cpu}: {e}", extra=e.details)
            info.status = STATUS_DIVERGED
            self.stop(info)
        except TracevisorError as e:
            reason = "error"
            self.stop(StopInfo("error", STATUS_ERROR, str(e), cpu=v.cpu))
        except Exception as e:  # a bug in tracevisor: stop cleanly, keep the details
            reason = "error"
            self.stop(StopInfo("error", STATUS_ERROR,
                               f"internal error on vCPU {v.cpu}: {type(e).__name__}: {e}", cpu=v.cpu,
                               report={"traceback": traceback.format_exc()}))
        finally:
            v.running = False
            paused = self.stop_info is not None and self.stop_info.reason == "paused"
            if not paused and not v.finished:
                v.finished = True
                if trace is not None:
                    try:
                        trace.event("vcpu", v.cpu, self.now(), state="stop", reason=reason)
                    except Exception:  # e.g. a replay that already diverged: the stop is already known
                        pass

    def _loop(self, v: VcpuState) -> None:
        """The hot loop.  Everything per exit is a local lookup."""
        fd = v.vcpu.fd
        mm = v.vcpu.run_mmap
        run = v.vcpu.run
        # ctypes' plain foreign call is ~0.8 µs cheaper per exit than fcntl.ioctl (which first tries
        # the buffer protocol on its argument); it releases the GIL like fcntl does.
        kvm_run = _libc_ioctl
        get_errno = ctypes.get_errno
        KVM_RUN = U.KVM_RUN
        if len(mm) < _EXIT.size:
            raise TracevisorError(f"the kvm_run mapping ({len(mm)} bytes) has no I/O data page")
        unpack = _EXIT.unpack_from
        out_ports = self.out_ports
        in_ports = self.in_ports
        trace_exit = self.trace.exit if self.trace is not None else None
        hooks = self.exit_hooks
        monotonic_ns = time.monotonic_ns
        t0 = self.t0
        cpu = v.cpu
        stopping = self._stopping
        mask = _MASK
        pack_in = _PACK_IN
        while True:
            if kvm_run(fd, KVM_RUN, 0) < 0:
                err = get_errno()
                if err == errno.EINTR or err == errno.EAGAIN:
                    if stopping.is_set():
                        return
                    run.immediate_exit = 0
                    if v.stop_request is not None:
                        reason_, message = v.stop_request
                        if reason_ == "paused":
                            raise VmStop(StopInfo("paused", 0, message, cpu=cpu))
                        raise VmStop(self._fault(v, reason_, message))
                    self._probe(v)
                    continue
                raise VmStop(self._fault(v, "error", f"KVM_RUN failed on vCPU {cpu}: {os.strerror(err)}"))
            reason, direction, size, port, count, data_offset, rip, data = unpack(mm, 8)
            if reason == 2 and count == 1 and data_offset == IO_DATA_OFFSET:  # single port I/O
                if direction:  # OUT
                    value = data & mask[size]
                    if trace_exit is not None:
                        trace_exit(cpu, monotonic_ns() - t0, 2, rip, port, 1, size, value)
                    if hooks:
                        for h in hooks:
                            h(v, 2, rip, port, 1, size, value)
                    handler = out_ports.get(port)
                    if handler is None:
                        self._unknown_out(v, port, size, value, rip)
                    else:
                        handler(v, port, size, value)
                else:  # IN
                    handler = in_ports.get(port)
                    value = handler(v, port, size) if handler else self._unknown_in(v, port, size, rip)
                    value &= mask[size]
                    pack_in[size].pack_into(mm, data_offset, value)
                    if trace_exit is not None:
                        trace_exit(cpu, monotonic_ns() - t0, 2, rip, port, 0, size, value)
                    if hooks:
                        for h in hooks:
                            h(v, 2, rip, port, 0, size, value)
            elif reason == 2:
                self._string_io(v, direction, size, port, count, data_offset, rip)
            elif reason == 4:  # KVM_EXIT_DEBUG: a debugger's breakpoint or step, not guest behaviour
                self._debug_exit(v, rip)
            else:
                if trace_exit is not None:
                    trace_exit(cpu, monotonic_ns() - t0, reason, rip, 0, 0, 0, 0)
                if hooks:
                    for h in hooks:
                        h(v, reason, rip, 0, 0, 0, 0)
                self._other_exit(v, reason, rip)

    # -- exit handlers ---------------------------------------------------------------------------
    def _hypercall(self, v: VcpuState, port: int, size: int, value: int) -> None:
        trace = self.trace
        t = self.now() if trace is not None else 0
        v.ctx.reset()
        try:
            call = hypercalls.dispatch(port, value, v.ctx)
        except GuestError as e:
            if trace is not None:
                trace.event("hypercall", v.cpu, t, call=hypercalls.PORT_NAMES[port], port=port, addr=value,
                            error=str(e), t_end=self.now())
            raise
        if trace is not None:
            fields = {"call": call.name, "port": port, "addr": value, "block": call.block,
                      "args": hypercalls.describe_args(call), "ret": call.outcome.ret, "t_end": self.now()}
            if call.out is not None:
                fields["out"] = call.out
            if call.outcome.payload is not None:
                fields["payload"] = call.outcome.payload
            trace.event("hypercall", v.cpu, t, **fields)
        if call.outcome.exit_code is not None:
            raise GuestExit(call.outcome.exit_code)

    @staticmethod
    def _uart(v: VcpuState, port: int, size: int, value: int) -> None:
        v.uart(_BYTES[value] if size == 1 else value.to_bytes(size, "little"))

    def _string_io(self, v, direction, size, port, count, data_offset, rip) -> None:
        """``rep outs``/``rep ins`` (count > 1): each element is one access, served in order."""
        mm = v.vcpu.run_mmap
        if size not in (1, 2, 4) or count < 1 or data_offset + size * count > len(mm):
            raise VmStop(self._fault(v, "guest-error", f"malformed I/O exit (port {port:#x}, size {size}, "
                                     f"count {count})"))
        fmt = _PACK_IN[size]
        for i in range(count):
            off = data_offset + i * size
            if direction:
                value = fmt.unpack_from(mm, off)[0]
                if self.trace is not None:
                    self.trace.exit(v.cpu, self.now(), 2, rip, port, 1, size, value)
                handler = self.out_ports.get(port)
                if handler is None:
                    self._unknown_out(v, port, size, value, rip)
                else:
                    handler(v, port, size, value)
            else:
                handler = self.in_ports.get(port)
                value = handler(v, port, size) if handler else self._unknown_in(v, port, size, rip)
                fmt.pack_into(mm, off, value & _MASK[size])
                if self.trace is not None:
                    self.trace.exit(v.cpu, self.now(), 2, rip, port, 0, size, value & _MASK[size])

    def _unknown_out(self, v, port, size, value, rip) -> None:
        raise VmStop(self._fault(
            v, "guest-error",
            f"guest wrote to unknown I/O port {port:#x} (size {size}, value {value:#x}) at rip {rip:#x}"))

    def _unknown_in(self, v, port, size, rip) -> int:
        if self._first_note("port", port):
            self.log(f"vCPU {v.cpu} read unknown I/O port {port:#x} (size {size}) at rip {rip:#x}; "
                     "answered all-ones")
        return 0xFFFF_FFFF

    def _first_note(self, kind: str, key: int) -> bool:
        """True the first time (kind, key) is seen, for at most MAX_NOTES keys: a guest touching many ports
        or addresses gets a bounded number of lines (and of remembered keys), then one line saying so."""
        if (kind, key) in self._noted or len(self._noted) > MAX_NOTES:
            return False
        self._noted.add((kind, key))
        if len(self._noted) > MAX_NOTES:
            self.log(f"more than {MAX_NOTES} unknown I/O ports or MMIO addresses touched; "
                     "not reporting further ones")
            return False
        return True

    def _debug_exit(self, v: VcpuState, rip: int) -> None:
        """A single-step or hardware-breakpoint exit: pause the VM; the debugger decides what is next."""
        d = v.vcpu.run.exit.debug
        raise VmStop(StopInfo("paused", 0, f"debug stop at {d.pc:#x}", cpu=v.cpu,
                              report={"debug": {"pc": d.pc, "rip": rip, "dr6": d.dr6, "dr7": d.dr7,
                                                "exception": d.exception}}))

    def _other_exit(self, v: VcpuState, reason: int, rip: int) -> None:
        run = v.vcpu.run
        if reason == U.KVM_EXIT_HLT:
            if not run.if_flag:
                raise VmStop(self._fault(v, "hang", f"vCPU {v.cpu} halted with interrupts disabled "
                                         "(hlt after cli): it can never continue"))
            return  # uhyve re-enters the guest
        if reason == U.KVM_EXIT_MMIO:
            mmio = run.exit.mmio
            addr, length, write = mmio.phys_addr, mmio.len, bool(mmio.is_write)
            length = min(length, 8)
            if not write:
                for i in range(length):
                    mmio.data[i] = 0xFF
            data = bytes(mmio.data[:length])
            if self.trace is not None:
                self.trace.event("mmio", v.cpu, self.now(), addr=addr, len=length, data=data, write=write)
            if self._first_note("mmio", addr):
                self.log(f"vCPU {v.cpu} {'wrote' if write else 'read'} {length} bytes at {addr:#x}, "
                         f"outside guest RAM (rip {rip:#x}); " + ("ignored" if write else "answered all-ones"))
            return
        if reason == U.KVM_EXIT_SHUTDOWN:
            raise VmStop(self._fault(v, "fault", f"guest triple fault on vCPU {v.cpu} (KVM_EXIT_SHUTDOWN)",
                                     hints=["a triple fault resets a real CPU; under uhyve 0.2.1 it "
                                            "looked like a clean exit (status 0)"]))
        if reason == U.KVM_EXIT_FAIL_ENTRY:
            fe = run.exit.fail_entry
            raise VmStop(self._fault(
                v, "fault", f"KVM could not enter the guest on vCPU {v.cpu} (KVM_EXIT_FAIL_ENTRY, "
                f"hardware reason {fe.hardware_entry_failure_reason:#x})",
                extra={"hardware_entry_failure_reason": fe.hardware_entry_failure_reason}))
        if reason == U.KVM_EXIT_INTERNAL_ERROR:
            ie = run.exit.internal
            sub = ie.suberror
            what = U.INTERNAL_ERROR_SUBERRORS.get(sub, "unknown")
            hints = []
            if sub == 1 and not self._rip_outside_ram(v):
                hints.append("this host's KVM could not emulate the instruction at rip; nested or "
                             "paravirtualised KVM hands x87/SSE instructions to its emulator, which lacks "
                             "most of them: build guests with -mgeneral-regs-only, or run on a host with "
                             "direct KVM")
            elif sub == 1:
                hints.append("rip points outside guest RAM: the guest jumped to an address with no memory "
                             "(a bad function pointer or return address?)")
            raise VmStop(self._fault(
                v, "fault", f"KVM internal error on vCPU {v.cpu}: suberror {sub} ({what})",
                extra={"suberror": sub, "data": [ie.data[i] for i in range(min(ie.ndata, 16))]},
                hints=hints))
        if reason == U.KVM_EXIT_SYSTEM_EVENT:
            ev = run.exit.system_event
            raise VmStop(self._fault(v, "fault", f"guest requested a system event (type {ev.type}: "
                                     "shutdown/reset/crash) on vCPU " + str(v.cpu)))
        if reason in (U.KVM_EXIT_INTR, U.KVM_EXIT_IRQ_WINDOW_OPEN):
            return
        name = U.EXIT_REASON_NAMES.get(reason, str(reason))
        raise VmStop(self._fault(v, "fault", f"unexpected KVM exit {name} ({reason}) on vCPU {v.cpu}"))

    # -- reports -----------------------------------------------------------------------------------
    def _probe(self, v: VcpuState) -> None:
        """After a watchdog kick: is this vCPU parked for good — halted with interrupts off, or held in
        wait-for-SIPI after an INIT (only another vCPU's SIPI could wake it)?"""
        try:
            state = v.vcpu.get_mp_state()
            if state == U.KVM_MP_STATE_HALTED:
                v.parked = not (v.vcpu.get_regs().rflags & 0x200)
            else:
                v.parked = state == U.KVM_MP_STATE_INIT_RECEIVED
        except TracevisorError:
            v.parked = False

    def registers(self, v: VcpuState) -> dict:
        """Registers of a stopped vCPU as a dict (reports, replay callbacks)."""
        regs = v.vcpu.get_regs().as_dict()
        s = v.vcpu.get_sregs()
        sregs = {"cr0": s.cr0, "cr2": s.cr2, "cr3": s.cr3, "cr4": s.cr4, "efer": s.efer,
                 "cs": s.cs.selector, "ss": s.ss.selector}
        return {"regs": regs, "sregs": sregs}

    def code_bytes(self, rip: int, cr3: int, n: int = 16) -> str:
        try:
            gpa, room = self.memory.translate(rip, cr3)
        except GuestError as e:
            return f"(not readable: {e})"
        if gpa >= self.memory.size:
            return f"(none: rip maps to guest-physical {gpa:#x}, outside guest RAM [0, {self.memory.size:#x}))"
        n = min(n, room, self.memory.size - gpa)
        return " ".join(f"{b:02x}" for b in self.memory.read(gpa, n))

    def _rip_outside_ram(self, v: VcpuState) -> bool:
        """Does v's rip translate to a guest-physical address beyond RAM (so no instruction could be fetched)?"""
        try:
            regs = v.vcpu.get_regs()
            cr3 = v.vcpu.get_sregs().cr3
            gpa, _ = self.memory.translate(regs.rip, cr3)
        except (GuestError, TracevisorError):
            return False
        return gpa >= self.memory.size

    def _fault(self, v: VcpuState, reason: str, message: str, *, hints=None, extra=None) -> StopInfo:
        """A stop report with registers and code bytes; call only from v's own thread."""
        report: dict = {}
        try:
            report.update(self.registers(v))
            report["code_bytes"] = self.code_bytes(report["regs"]["rip"], report["sregs"]["cr3"])
        except Exception as e:  # registers may be unavailable if KVM itself failed
            report["registers_error"] = str(e)
        if hints:
            report["hints"] = hints
        if extra:
            report.update(extra)
        status = STATUS_ERROR if reason == "error" else STATUS_GUEST_FAULT
        return StopInfo(reason, status, message, cpu=v.cpu, report=report)

    def close(self) -> None:
        try:
            self.vm.close()
        finally:
            self.memory.close()
            if self._own_kvm:
                self.kvm.close()


def parse_size(text: str) -> int:
    """``64M``, ``64MiB``, ``1G``, ``1GiB``, ``512K``, ``67108864`` → bytes (M/G/K are binary units)."""
    s = text.strip().replace("_", "")
    units = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
             "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
    num = s.rstrip("bBkKmMgGiI")
    if s.lower().startswith("0x") and all(c in "0123456789abcdefABCDEF" for c in s[2:]) and len(s) > 2:
        num = s  # a hex byte count whose last digits look like a unit: 0x1b, 0xab
    unit = s[len(num):].upper()
    if not num or unit not in units:
        raise TracevisorError(f"bad size {text!r}: use e.g. 64M, 64MiB, 1G or a byte count")
    try:
        if num.lower().startswith(("0x", "0o", "0b")):
            value: float = int(num, 0)
        elif num.isdigit():
            value = int(num, 10)
        else:
            value = float(num)  # 1.5G, 6.4e7
            if not math.isfinite(value):
                raise ValueError(num)
        size = int(value * units[unit])
    except (ValueError, OverflowError):
        raise TracevisorError(f"bad size {text!r}: use e.g. 64M, 64MiB, 1G or a byte count") from None
    if size <= 0:
        raise TracevisorError(f"bad size {text!r}: must be positive")
    return size

