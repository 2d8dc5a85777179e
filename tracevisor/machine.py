"""The VM's lifecycle: create the VM and its vCPUs, boot, run one thread per vCPU, supervise, stop.

:class:`Machine` owns the KVM objects, guest memory, the port table, the PCI bus and the devices, and the
process-level control around the run: the vCPU threads, signals (Ctrl-C, SIGTERM, the vCPU kick), the
watchdog, ``--timeout``, pause and resume.  What happens at each exit is not here: the run loop and the
exit handlers are :mod:`tracevisor.runloop`; assembling a machine with its HostIO and trace sink for a
run, a recording, a replay or a debugger is :mod:`tracevisor.session`.
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from . import arch_x86_64 as arch
from . import fastloop, hypercalls, signals
from .clock import Clock
from .devices.base import Device, DeviceContext
from .devices.pci import CONFIG_ADDRESS, CONFIG_DATA, PciBus
from .errors import GuestError, TracevisorError
from .kvm import uapi as U
from .kvm.system import Kvm, Vcpu
from .loader import KernelImage
from .memory import GuestMemory
from .reports import Reporter
from .runloop import ExitDispatcher, GuestExit, Ports, VcpuRunner, VcpuState, VmStop
from .status import ExitStatus, StopInfo, StopReason

__all__ = ["Machine", "VmConfig", "StopInfo", "StopReason", "ExitStatus", "VcpuState", "VmStop", "GuestExit",
           "parse_size"]

MIB = 1 << 20
MIN_MEMORY = 16 * MIB
MAX_MEMORY = 0xD000_0000  # uhyve's slot 0 ends at 3.25 GiB; tracevisor keeps guests below it
DEFAULT_MEMORY = 64 * MIB
MAX_CPUS = 64
AP_STAGGER_S = 0.05  # uhyve starts vCPU n after n × 50 ms
WATCHDOG_PERIOD_S = 1.0
KICK_SIGNAL = signal.SIGRTMIN

# Process exit statuses, as names of the one table (tracevisor.status.ExitStatus)
STATUS_ERROR = int(ExitStatus.ERROR)
STATUS_USAGE = int(ExitStatus.USAGE)
STATUS_GUEST_FAULT = int(ExitStatus.GUEST_FAULT)
STATUS_DIVERGED = int(ExitStatus.DIVERGED)
STATUS_TIMEOUT = int(ExitStatus.TIMEOUT)
STATUS_INTERRUPTED = int(ExitStatus.INTERRUPTED)
STATUS_TERMINATED = int(ExitStatus.TERMINATED)


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
    # -- exact mode (record's default; docs/determinism.md) --
    exact: bool = False  # patch RDTSC/RDTSCP/RDRAND/RDSEED sites and answer them from the HostIO; one vCPU at a time
    nd_sites: dict | None = None  # replay: the recorded site table (header "exact") instead of a new sweep
    schedule: list | None = None  # replay of an exact multi-vCPU trace: the recorded `sched` events
    coalesce_console: bool = False  # UART OUTs go to KVM's coalesced-I/O ring instead of exiting one by one
    fallback: str = "auto"  # instruction fallback (tracevisor/fallback.py): auto | on | off
    fallback_budget: int = 10_000  # translation blocks (or instructions: fallback_budget_unit) per burst at most
    fallback_budget_unit: str = "blocks"  # or "instructions" (older recordings; hosts without the extension)
    fallback_atomics: bool | None = None  # bursts stop at locked instructions; None: only when vCPUs run at once
    spin_hang_s: float = 5.0  # a running vCPU with IF=0 and no exit between watchdog probes this long: a hang
    irq: str = "kernel"  # "kernel": KVM's irqchip (and PIT); "user": exact mode's models on virtual time
    irq_tsc_khz: int | None = None  # replay: the recorded TSC rate for TSC-deadline conversions

    def validate(self) -> None:
        if not MIN_MEMORY <= self.memory <= MAX_MEMORY:
            raise TracevisorError(
                f"guest memory {_size_text(self.memory)} is out of range: use {MIN_MEMORY // MIB} MiB "
                f"to {MAX_MEMORY // MIB} MiB")
        if self.memory % 4096:
            raise TracevisorError("guest memory must be a multiple of 4 KiB")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise TracevisorError(f"vCPU count {self.cpus} is out of range (1–{MAX_CPUS})")
        if self.coalesce_console and self.cpus != 1:
            raise TracevisorError("--coalesce-console needs a single vCPU: KVM's coalesced-I/O ring does not "
                                  "say which vCPU wrote a byte")
        if self.irq not in ("kernel", "user"):
            raise TracevisorError(f"unknown interrupt model {self.irq!r:.40} (kernel or user)")


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
        self.clock = Clock()
        self.hostio = None
        self.sink = None  # the trace sink of this boot (TraceWriter, replay Checker, or None)
        self.runner: VcpuRunner | None = None
        self.stop_info: StopInfo | None = None
        self.booted = False
        self._stop_lock = threading.Lock()
        self._stopping = threading.Event()
        self.stop_conditions: list[Callable[[], StopInfo | None]] = []  # polled by the main thread
        # Memory hashes for replay verdicts (set by tracevisor.memhash.attach; see ExitDispatcher)
        self.mem_check: Callable | None = None
        self.mem_every = 0
        self.mem_at_hypercalls = False
        self.caps = {
            "sync_regs": self.kvm.check_extension(U.KVM_CAP_SYNC_REGS),
            "irqchip": self.kvm.check_extension(U.KVM_CAP_IRQCHIP),
            "immediate_exit": self.kvm.check_extension(U.KVM_CAP_IMMEDIATE_EXIT),
        }
        self._setup_vm()
        self.ring_offset = 0  # byte offset of KVM's coalesced-I/O ring in each kvm_run mapping (0: not used)
        if config.coalesce_console:
            self._setup_ring()
        # The native run loop (tracevisor/fastloop.py), or None for the pure-Python loop.
        self.native = fastloop.load()
        # Optional: exits a vCPU may run before Python must see one (periodic work on an exact schedule).
        self.exit_budget: Callable[[VcpuState], int] | None = None
        self.reporter = Reporter(self.memory, lambda msg: self.log(msg))
        self.pci = PciBus()
        self.ports = Ports()
        self._setup_ports()
        self.devices: dict[str, Device] = {self.pci.name: self.pci}
        self.device_context = DeviceContext(self.memory, self.ports, self.pci, lambda msg: self.log(msg))
        self.fallback = None  # tracevisor/fallback.Fallback, created at the first emulation failure
        self.fallback_error: str | None = None
        self.fallback_hint: str | None = None
        self.ndi = None  # ndinsn.Patcher in exact mode
        #: guest-virtual addresses where a debugger planted an int3 (gdb's int3 backend): the instruction
        #: fallback must not run those; they stop as the debugger expects
        self.debugger_code: dict[int, int] = {}
        self.sched = None  # sched.Scheduler: exact mode with several vCPUs runs one at a time
        self.kick_signal = KICK_SIGNAL
        self.started_at = time.monotonic()
        if config.exact:
            self._setup_exact()
        if self.irq is not None:
            self.irq.register_ports(self.ports)

    def add_device(self, make: Callable[[DeviceContext], Device]) -> Device:
        """Attach a device built by ``make(context)`` (before boot); its state joins checkpoints."""
        dev = make(self.device_context)
        if dev.name in self.devices:
            raise TracevisorError(f"the VM already has a device named {dev.name!r}")
        self.devices[dev.name] = dev
        return dev

    # -- creation ----------------------------------------------------------------------------------
    def _setup_vm(self) -> None:
        vm, cfg = self.vm, self.config
        vm.set_tss_addr(0xFFFB_D000)
        vm.set_memory_region(0, 0, cfg.memory, self.memory.host_address)
        self.irqchip = False
        self.irq = None  # interrupts.Interrupts: the user-space interrupt path (exact mode)
        if cfg.irq == "user":
            self._setup_user_irq()
        elif self.caps["irqchip"]:
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
        if self.irq is not None:
            self.irq.tsc_khz = cfg.irq_tsc_khz if cfg.irq_tsc_khz is not None else self.tsc_khz

    def _setup_user_irq(self) -> None:
        """No in-kernel irqchip: the LAPIC page exits as MMIO, x2APIC MSRs and IA32_TSC_DEADLINE exit as MSR
        accesses, HLT exits; tracevisor.interrupts answers them on virtual time."""
        from . import apic
        from .interrupts import Interrupts

        vm = self.vm
        msr_exits = self.kvm.check_extension(U.KVM_CAP_X86_USER_SPACE_MSR) and vm.enable_cap(
            U.KVM_CAP_X86_USER_SPACE_MSR, U.KVM_MSR_EXIT_REASON_INVAL | U.KVM_MSR_EXIT_REASON_FILTER)
        self.caps["user_space_msr"] = bool(msr_exits)
        self.caps["msr_filter"] = False
        if msr_exits and self.kvm.check_extension(U.KVM_CAP_X86_MSR_FILTER):
            try:
                vm.deny_msrs([(apic.MSR_TSC_DEADLINE, 1)])
                self.caps["msr_filter"] = True
            except TracevisorError:
                pass
        self.irq = Interrupts(self.config.cpus, pit=self.config.pit, log=lambda msg: self.log(msg))

    def _setup_ring(self) -> None:
        """Register the UART port as a coalesced PIO zone: its OUTs complete in the kernel and queue in a ring
        that the vCPU loop drains before each exit it handles (and at stop)."""
        page = self.kvm.check_extension(U.KVM_CAP_COALESCED_MMIO)
        if page <= 0 or not self.kvm.check_extension(U.KVM_CAP_COALESCED_PIO):
            raise TracevisorError("this host's KVM has no coalesced port I/O (KVM_CAP_COALESCED_PIO); "
                                  "run without --coalesce-console")
        if (page + 1) * 4096 > len(self.vcpus[0].vcpu.run_mmap):
            raise TracevisorError("the coalesced-I/O ring is not inside the vCPU mapping; "
                                  "run without --coalesce-console")
        self.vm.register_coalesced_pio(arch.UART_PORT, 1)
        self.ring_offset = page * 4096

    def _cr3_getter(self, vcpu: Vcpu) -> Callable[[], int]:
        return lambda: vcpu.get_sregs().cr3

    def _setup_ports(self) -> None:
        pci = self.pci
        self.ports.register((CONFIG_ADDRESS,), lambda v, port, size, value: pci.write_address(size, value),
                            lambda v, port, size: pci.read_address(size))
        self.ports.register(range(CONFIG_DATA, CONFIG_DATA + 4),
                            lambda v, port, size, value: pci.write_data(port, size, value),
                            lambda v, port, size: pci.read_data(port, size))

    # -- exact mode: nondeterministic instructions (ndinsn.py) and the vCPU schedule (sched.py) ----------
    def _setup_exact(self) -> None:
        from . import ndinsn

        if self.config.nd_sites is not None:
            try:
                self.ndi = ndinsn.Patcher.from_header(self.config.nd_sites)
            except (TypeError, ValueError) as e:
                raise TracevisorError(f"the recorded table of nondeterministic-instruction sites is malformed: "
                                      f"{e}") from None
        else:
            self.ndi = ndinsn.Patcher(ndinsn.scan_image(self.image).sites)
        self.ports.register(ndinsn.NDI_PORTS, out_handler=self._nd_exit)
        if self.config.cpus > 1 or self.irq is not None:  # (timer points need the kick machinery too)
            from .sched import Scheduler

            self.sched = Scheduler(self, self.config.schedule)

    def _nd_exit(self, v: VcpuState, port: int, size: int, value: int) -> None:
        """A patched RDTSC/RDTSCP/RDRAND/RDSEED: emulate it with a HostIO value, registers via sync regs."""
        from . import ndinsn

        regs = list(ndinsn.REGS.unpack_from(v.vcpu.run_mmap, ndinsn.SYNC_REGS_OFFSET))
        site = self.ndi.at(port, regs[ndinsn.RIP])
        if site is None:
            self.runner.dispatcher.unknown_out(v, port, size, value, regs[ndinsn.RIP])
        self.nd_apply(v, site, regs)

    def nd_apply(self, v: VcpuState, site, regs: list[int]) -> None:
        """Emulate ``site`` on vCPU ``v`` whose registers are ``regs`` and hand them back to KVM."""
        from . import ndinsn

        ndinsn.emulate(site, regs, self.hostio, v.cpu,
                       lambda: v.vcpu.get_msrs([ndinsn.IA32_TSC_AUX]).get(ndinsn.IA32_TSC_AUX, 0))
        if self.irq is not None and site.kind in ("rdtsc", "rdtscp"):
            self.irq.tsc_seen(v.cpu, regs[ndinsn.RDX] << 32 | regs[ndinsn.RAX])
        ndinsn.REGS.pack_into(v.vcpu.run_mmap, ndinsn.SYNC_REGS_OFFSET, *regs)
        v.vcpu.run.kvm_dirty_regs |= U.KVM_SYNC_X86_REGS
        v.pending_regs = regs
        self.ndi.answered += 1

    def _nd_debug(self, v: VcpuState, e) -> bool:
        """A debug exit at a site covered by a debug register (not a patch): emulate it there."""
        from . import ndinsn

        pc = (e.debug or {}).get("pc")
        site = self.ndi.by_addr.get(pc)
        if site is None or site.how != "debugreg" or pc != e.rip:
            return False
        if self.sink is not None:  # the breakpoint stands for the exit a patch would have made
            self.sink.exit(v.cpu, self.clock.now(), U.KVM_EXIT_DEBUG, e.rip, 0, 0, 0, 0, e.digest)
        self.nd_apply(v, site, list(ndinsn.REGS.unpack_from(v.vcpu.run_mmap, ndinsn.SYNC_REGS_OFFSET)))
        return True

    def exact_notes(self) -> list[str]:
        """What an exact recording could not cover (printed by the recorder, stored with the stop)."""
        if self.ndi is None:
            return []
        notes = [f"{s.kind} at {s.addr:#x} could not be patched safely nor given a debug register: its "
                 "values are not recorded" for s in self.ndi.uncovered]
        if self.booted:
            notes += self.ndi.check_intact(self.memory)
        return notes

    def describe(self) -> dict:
        """Facts for a trace header."""
        return {
            "memory": self.config.memory, "cpus": self.config.cpus,
            "cpuid": arch.cpuid_rows(self.cpuid),
            "irqchip": self.irqchip, "tsc_khz": self.tsc_khz,
            "interrupts": self.irq.header() if self.irq is not None else {"model": "kernel"},
            "caps": self.caps,
        }

    # -- boot --------------------------------------------------------------------------------------
    def _boot(self) -> None:
        img, cfg, mem = self.image, self.config, self.memory
        arch.write_boot_structures(mem)
        img.place(mem)
        if self.ndi is not None:
            self.ndi.apply(mem)
        boot_time = self.hostio.boot_time_ns(0)
        freq = self.hostio.cpu_freq_khz(0)
        info = arch.BootInfo(
            ram_size=cfg.memory, serial_port=arch.serial_port_for(img.entry_version, cfg.verbose),
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
            if self.ndi is not None and self.ndi.debug_sites:
                vc.set_guest_debug(U.KVM_GUESTDBG_ENABLE | U.KVM_GUESTDBG_USE_HW_BP, self.ndi.debug_registers())
            v.uart_batch = self.hostio.uart_batch_sink(v.cpu)
            v.uart_room = getattr(self.hostio, "uart_room", None)
            if self.ring_offset:
                v.console_out = self.hostio.console_output(v.cpu, "uart")

    # -- running -----------------------------------------------------------------------------------
    def run(self, hostio, sink=None, clock: Clock | None = None) -> StopInfo:
        """Boot and run until the guest exits or is stopped; returns why it stopped."""
        try:
            self.boot(hostio, sink, clock)
        except GuestError as e:  # cannot happen with a validated image, but never a traceback
            return StopInfo.of(StopReason.ERROR, f"boot failed: {e}")
        return self._execute()

    def boot(self, hostio, sink=None, clock: Clock | None = None) -> None:
        """Lay out memory and vCPU state without running (a debugger attaches here, then resume()).

        ``sink`` receives every exit and event (a TraceWriter, a replay Checker, or None); ``clock`` is the
        trace clock they are stamped with (a recording starts it with the trace writer)."""
        self.hostio = hostio
        self.sink = sink
        if clock is not None:
            self.clock = clock
        self.device_context.bind(hostio, sink, self.clock)
        self._boot()
        dispatcher = ExitDispatcher(self.ports, sink, self.clock, self.reporter)
        if self.ndi is not None and self.ndi.debug_sites:
            dispatcher.debug_hook = self._nd_debug
        dispatcher.mem_check, dispatcher.mem_every = self.mem_check, self.mem_every
        dispatcher.mem_at_hypercalls = self.mem_at_hypercalls
        if self.mem_check is not None:  # the memory every later hash starts from
            self.mem_check(self.vcpus[0], "boot")
        dispatcher.fallback_state = self
        if self.config.fallback != "off":
            dispatcher.emulation_fallback = self._fallback_step
        if self.irq is not None:
            from . import apic

            self.irq.bind(sink, self.clock)
            dispatcher.mmio_regions.append((apic.BASE_GPA, apic.PAGE, self.irq.mmio))
            dispatcher.msr_handler = self.irq.msr
            dispatcher.hlt_parks = True
        # with a schedule, the scheduler decides when an AP first runs (uhyve's stagger, recorded)
        self.runner = VcpuRunner(dispatcher, self._stopping, self.stop, self.pause_requested,
                                 0.0 if self.sched is not None else self.config.stagger_s, sched=self.sched,
                                 native_loop=self._native_loop(), ring_offset=self.ring_offset,
                                 exit_budget=self.exit_budget, irq=self.irq)
        self.booted = True

    def _native_loop(self):
        """The C loop for the runner (tracevisor/fastloop.py), or None for the pure-Python loop."""
        ext = self.native
        if ext is None:
            return None
        return lambda runner, v: fastloop.vcpu_loop(runner, v, ext)

    def resume(self) -> StopInfo:
        """Run a booted VM that has not started yet, or continue one that stopped with reason "paused"."""
        if not self.booted:
            raise TracevisorError("the VM has not been booted")
        if self.stop_info is not None:
            if not self.stop_info.is_paused:
                raise TracevisorError(f"the VM has stopped ({self.stop_info.reason}); it cannot continue")
            self.stop_info = None
            self._stopping.clear()
            for v in self.vcpus:
                v.stop_request = None
        return self._execute()

    def pause_requested(self) -> bool:
        """Is the VM's current stop a pause (resume() continues it)?"""
        info = self.stop_info
        return info is not None and info.is_paused

    def request_pause(self, v: VcpuState, message: str = "paused") -> None:
        """Pause the VM after the exit being handled (call from v's own thread, e.g. a replay callback)."""
        v.stop_request = (StopReason.PAUSED, message)
        v.vcpu.run.immediate_exit = 1

    def mark_paused(self, message: str) -> None:
        """The VM's state was replaced while it was stopped (a checkpoint restore): it is now paused there
        and resume() continues from the restored state."""
        self.stop_info = StopInfo.paused(message)

    def _execute(self) -> StopInfo:
        main = threading.current_thread() is threading.main_thread()
        old_handlers = {}
        own_signals = False
        if main:
            old_handlers[KICK_SIGNAL] = signal.signal(KICK_SIGNAL, lambda *a: None)
            if not signals.deferring():  # a library caller: defer SIGINT/SIGTERM for this run only
                old_handlers.update(signals.defer())
                own_signals = True
        elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise TracevisorError("the first Machine.run must happen on the main thread "
                                  "(it installs the vCPU kick signal handler)")
        try:
            self.started_at = time.monotonic()
            if self.sched is not None:
                self.sched.start()
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
                if own_signals:
                    signals.clear()
            try:
                self.hostio.flush()
            except Exception:
                pass
        assert self.stop_info is not None
        return self.stop_info

    def _vcpu_thread(self, v: VcpuState) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # the main thread takes them
        self.runner.run_thread(v)

    def _supervise(self) -> None:
        """Main thread: wait for the end; enforce --timeout; detect vCPUs parked forever; Ctrl-C."""
        deadline = time.monotonic() + self.config.timeout if self.config.timeout else None
        next_probe = time.monotonic() + WATCHDOG_PERIOD_S
        while True:
            if self._stopping.wait(0.05 if deadline or self.config.cpus > 1 else 0.2):
                return
            sig = signals.pending()
            if sig is not None:  # the handler only noted it (tracevisor.signals): stop the VM here
                self.stop(_signal_stop(sig))
                return
            try:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    self.stop(StopInfo.of(StopReason.TIMEOUT,
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
            except KeyboardInterrupt:  # SIGINT while a caller's handler was in force (e.g. the debugger)
                self.stop(_signal_stop(signal.SIGINT))
                return

    def _fallback_step(self, v: VcpuState) -> bool:
        from . import fallback

        if self.debugger_code and v.vcpu.run.s.regs.regs.rip in self.debugger_code:
            return False  # a debugger's breakpoint, not guest code the host could not emulate
        return fallback.step(self, v)

    def _watchdog(self) -> None:
        live = [v for v in self.vcpus if v.running]
        limit = self.config.spin_hang_s
        for v in live:
            if limit and v.spin_since is not None and time.monotonic() - v.spin_since >= limit:
                v.stop_request = (StopReason.HANG, f"vCPU {v.cpu} has run with interrupts disabled and "
                                  f"without an exit for {time.monotonic() - v.spin_since:.0f} s (last seen at rip {v.spin_rip:#x}): "
                                  "nothing can interrupt it; VM stopped (--spin-hang SECONDS sets this limit, "
                                  "0 turns the check off)")
                self._kick(v)
                return
        if live and all(v.parked for v in live):
            # The report needs the vCPU's registers, which only its own thread can read while it is
            # inside KVM_RUN: ask it to stop with the report.
            live[0].stop_request = (StopReason.HANG, "every vCPU is halted with interrupts disabled (hlt "
                                    "after cli) or held after an INIT waiting for a SIPI: the guest can never "
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
        if not info.is_paused and self.hostio is not None:
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

    # -- reports -----------------------------------------------------------------------------------
    def registers(self, v: VcpuState) -> dict:
        """Registers of a stopped vCPU as a dict (reports, replay callbacks)."""
        return self.reporter.registers(v)

    def close(self) -> None:
        try:
            self.vm.close()
        finally:
            self.memory.close()
            if self._own_kvm:
                self.kvm.close()


def _signal_stop(sig: int) -> StopInfo:
    reason = signals.REASON.get(sig, StopReason.INTERRUPTED)
    why = "(SIGTERM)" if reason == StopReason.TERMINATED else "(Ctrl-C)"
    return StopInfo.of(reason, f"{reason} {why}; VM stopped")


def _size_text(n: int) -> str:
    """A byte count as a person would write it: 1 KiB, 512 MiB, 3.5 GiB, 100 bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):g} {unit}"
    return f"{n} bytes"


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

