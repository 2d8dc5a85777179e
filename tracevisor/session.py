"""Sessions: the one place that assembles a VM for a run, a recording, a replay or a debugger.

A :class:`SessionConfig` says what to run (kernel, guest arguments, machine size, mounts, environment,
options); the builders turn it into a :class:`Session` — the machine with its HostIO, its trace sink and
the trace clock, wired once, in one order:

=================  =================================  ==========================  =====================
builder            HostIO                             trace sink                  used by
=================  =================================  ==========================  =====================
:func:`build_run`  LiveHostIO (sandbox, console)      none                        ``run``, ``run --gdb``
:func:`build_record`  RecordingHostIO(LiveHostIO)      TraceWriter                 ``record``, :func:`record`
:func:`build_replay`  given (the replaying HostIO)     given (the divergence checker)  ``tracevisor.replay``
=================  =================================  ==========================  =====================

The trace header is written from the config (:func:`trace_header`) and a replay's config is read back
from it (:func:`config_from_header`): the two directions live side by side so they cannot drift.

Recording without the CLI::

    from tracevisor.session import record
    stop = record("hello", "hello.tvt", args=["world"], mounts=["/tmp/data:/data:ro"])
    assert stop.reason == "exit" and stop.code == 0
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import signals
from .clock import Clock
from .errors import TracevisorError
from .hostio import Console, HostIO, LiveHostIO, RecordingHostIO
from .loader import KernelImage, load_kernel
from .machine import AP_STAGGER_S, DEFAULT_MEMORY, Machine, VmConfig, parse_size
from .sandbox import Sandbox, parse_mount
from .status import StopInfo, StopReason

MAX_GUEST_ARGS = 127  # the CMDSIZE block has 128 argument sizes, argv[0] included
MAX_GUEST_ENV = 128


def _warn(msg: str) -> None:
    print(f"tracevisor: warning: {msg}", file=sys.stderr)


@dataclass
class SessionConfig:
    """What to run and how: everything a session needs besides the trace file.

    ``host_env`` passes the host's environment to the guest (the CLI does, as uhyve; the Python API does
    not unless asked, so a recording does not capture the caller's environment by accident)."""

    kernel: str
    args: list[str] = field(default_factory=list)
    memory: int = DEFAULT_MEMORY
    cpus: int = 1
    mounts: list[str] = field(default_factory=list)  # HOSTDIR[:GUESTDIR][:ro]
    env: list[str] = field(default_factory=list)  # KEY=VALUE, after the host's environment
    host_env: bool = False
    verbose: bool = False
    pit: bool = False
    timeout: float | None = None
    net: str | None = None  # --net SPEC
    quiet: bool = False  # do not echo the guest's console output
    hide_rdrand: bool = True
    stagger_s: float = AP_STAGGER_S
    cpuid_rows: list[list[int]] | None = None  # replay: the recorded CPUID table instead of the host's
    exact: bool = False  # exact mode: RDTSC/RDRAND sites recorded, one vCPU at a time (docs/determinism.md)
    nd_sites: dict | None = None  # replay: the recorded site table (header "exact")
    schedule: list | None = None  # replay: the recorded vCPU schedule (`sched` events)
    coalesce_console: bool = False  # UART output through KVM's coalesced-I/O ring (no exit per byte)
    fallback: str = "auto"  # instruction fallback (tracevisor/fallback.py): auto | on | off
    fallback_budget: int | None = None  # per fallback burst at most, in the unit below; None: its default
    fallback_budget_unit: str | None = None  # "blocks" or "instructions"; None: blocks where the native
    #                                          extension is available (fallback.resolve_budget)
    fallback_atomics: bool | None = None  # bursts stop at locked instructions; None: only if vCPUs run at once
    spin_hang_s: float = 5.0  # a running vCPU with interrupts off this long is reported as a hang
    irq: str | None = None  # interrupt model: "kernel" or "user"; None = "user" in exact mode, else "kernel"
    irq_tsc_khz: int | None = None  # replay: the recorded TSC rate of the user-space TSC-deadline timer

    def __post_init__(self) -> None:
        self.kernel = os.fspath(self.kernel)
        self.args = [a.decode("utf-8", "surrogateescape") if isinstance(a, bytes) else str(a) for a in self.args]
        self.mounts = [os.fspath(m) for m in self.mounts]
        self.env = list(self.env)
        if isinstance(self.memory, str):
            self.memory = parse_size(self.memory)
        if self.net == "none":
            self.net = None

    def vm_config(self) -> VmConfig:
        from .fallback import resolve_budget

        # (with the fallback off the budget is recorded, not used: no need to look for the native extension)
        unit = self.fallback_budget_unit or ("blocks" if self.fallback == "off" else None)
        unit, budget = resolve_budget(unit, self.fallback_budget)
        return VmConfig(kernel=self.kernel, args=list(self.args), memory=self.memory, cpus=self.cpus,
                        verbose=self.verbose, pit=self.pit, timeout=self.timeout, hide_rdrand=self.hide_rdrand,
                        cpuid_rows=self.cpuid_rows, stagger_s=self.stagger_s, exact=self.exact,
                        nd_sites=self.nd_sites, schedule=self.schedule, coalesce_console=self.coalesce_console,
                        fallback=self.fallback, fallback_budget=budget, fallback_budget_unit=unit,
                        fallback_atomics=self.fallback_atomics, spin_hang_s=self.spin_hang_s, irq=self.interrupt_model(),
                        irq_tsc_khz=self.irq_tsc_khz)

    def interrupt_model(self) -> str:
        """Exact recordings take interrupts from user-space models on virtual time (docs/determinism.md);
        everything else uses KVM's in-kernel irqchip."""
        if self.irq is not None:
            return self.irq
        return "user" if self.exact else "kernel"

    def validate(self) -> None:
        """Every problem of the configuration itself as one TracevisorError (kernel and mounts excepted)."""
        if self.net:
            from .netbackend import parse_net_spec

            parse_net_spec(self.net)
        self.vm_config().validate()
        if self.interrupt_model() == "user" and not self.exact:
            raise TracevisorError("the user-space interrupt model belongs to exact mode")
        if self.timeout is not None and not (0 < self.timeout < float("inf")):  # also refuses nan
            raise TracevisorError(f"--timeout {self.timeout}: must be a positive number of seconds")
        if self.fallback not in ("auto", "on", "off"):
            raise TracevisorError(f"--fallback {self.fallback}: use auto, on or off")
        if self.fallback_budget is not None and not 1 <= self.fallback_budget <= 1 << 31:
            raise TracevisorError(f"--fallback-budget {self.fallback_budget}: must be 1 to {1 << 31}")
        if self.fallback_budget_unit not in (None, "blocks", "instructions"):
            raise TracevisorError(f"fallback budget unit {self.fallback_budget_unit!r}: blocks or instructions")
        if not 0 <= self.spin_hang_s < float("inf"):
            raise TracevisorError(f"--spin-hang {self.spin_hang_s}: must be 0 (off) or a number of seconds")
        if self.fallback == "on":
            from .fallback import load_engines

            load_engines()

    def guest_argv(self) -> list[bytes]:
        argv = [os.fsencode(a) for a in [self.kernel, *self.args]]  # the bytes the host gave us
        if len(argv) > MAX_GUEST_ARGS + 1:
            raise TracevisorError(f"too many guest arguments ({len(argv) - 1}); the ABI allows {MAX_GUEST_ARGS}")
        return argv

    def guest_env(self, warn: Callable[[str], None] = _warn) -> list[bytes]:
        """The guest's environment as ``KEY=VALUE`` byte strings: the host's (with ``host_env``), then every
        ``env`` entry: ``KEY=VALUE`` sets a value, a bare ``KEY`` copies the host's.  Bytes are kept as the
        host has them (a variable that is not UTF-8 passes unchanged)."""
        env: dict[bytes, bytes] = dict(os.environb) if self.host_env else {}
        for e in self.env:
            key, eq, value = os.fsencode(e).partition(b"=")
            if not key:
                raise TracevisorError(f"bad --env {e!r}: expected KEY=VALUE or KEY")
            if not eq:
                if key not in os.environb:
                    warn(f"--env {e}: not set in the host environment; not passed")
                    continue
                value = os.environb[key]
            env[key] = value
        out = [k + b"=" + v for k, v in env.items()]
        if len(out) > MAX_GUEST_ENV:
            warn(f"the guest gets only the first {MAX_GUEST_ENV} of {len(out)} environment variables "
                 "(the CMDSIZE limit)")
            out = out[:MAX_GUEST_ENV]
        return out


# -- header ↔ config --------------------------------------------------------------------------------

def trace_header(config: SessionConfig, image: KernelImage, machine: Machine, sandbox: Sandbox,
                 argv: list[bytes], env: list[bytes]) -> dict:
    """The recorder's header (the fields docs/trace-format.md lists); :func:`config_from_header` reads
    it back."""
    from .kvm import uapi as U
    from .trace.schema import host_text

    desc = machine.describe()
    mounts = [{k: host_text(v) if k in ("host", "guest") and isinstance(v, str) else v for k, v in m.items()}
              for m in sandbox.describe()]
    header = {
        "kernel": {"path": host_text(os.path.abspath(image.path)), "sha256": image.sha256,
                   "size": image.file_size, "entry_version": image.entry_version, "pie": image.pie},
        "memory": config.memory, "cpus": config.cpus,
        "argv": [host_text(a) for a in argv],  # byte-faithful: bin where not UTF-8
        "env": [host_text(e) for e in env],
        "mounts": mounts,
        "cpuid": desc["cpuid"],
        "host": {"uname": " ".join(platform.uname()), "kvm_api": U.KVM_API_VERSION,
                 "python": platform.python_version(), "tsc_khz": desc["tsc_khz"],
                 "irqchip": desc["irqchip"], "caps": desc["caps"]},
        "mode": "exact" if config.exact else "parallel",
        "interrupts": desc["interrupts"],
        "determinism": {"rdrand_hidden": config.hide_rdrand, "rdseed_hidden": config.hide_rdrand,
                        "notes": ("RDTSC/RDTSCP/RDRAND/RDSEED sites patched and their values recorded; "
                                  "one vCPU at a time, schedule recorded; LAPIC timer" +
                                  (" and PIT" if config.pit else "") + " emulated on virtual time, interrupts "
                                  "injected at recorded points" if config.exact else
                                  "RDRAND/RDSEED hidden in CPUID; TSC reads are not recorded; vCPUs run in "
                                  "parallel") + " (docs/determinism.md)"},
        "options": {"verbose": config.verbose, "pit": config.pit, "timeout": config.timeout,
                    "stagger_s": config.stagger_s, "net": config.net,
                    "coalesce_console": config.coalesce_console, "spin_hang_s": config.spin_hang_s},
        "digests": bool(desc["caps"].get("sync_regs")),
        "fallback": _fallback_header(machine),
    }
    if machine.ndi is not None:
        header["exact"] = machine.ndi.header()
    seen = _guest_cpuid(desc["cpuid"])
    if seen is not None:
        header["guest_cpuid"] = seen
        if not config.exact and config.hide_rdrand and (seen["rdrand"] or seen["rdseed"]):
            header["determinism"]["notes"] = [
                header["determinism"]["notes"],
                "this host does not honour the CPUID table: the guest sees RDRAND/RDSEED and their values "
                "are not recorded in parallel mode"]
    return header


def _guest_cpuid(rows: list[list[int]]) -> dict | None:
    """What the guest really sees in CPUID on this host (tracevisor/cpuprobe.py; cached per host), or None
    with a warning when the probe guest cannot run."""
    if signals.pending() is not None:  # the recording will not start: no probe, no warning
        return None
    try:
        return probe_guest_cpuid(rows)
    except TracevisorError as e:
        if signals.pending() is None:
            _warn(f"guest CPUID not probed: {e}")
        return None


def probe_guest_cpuid(rows: list[list[int]], *, refresh: bool = False) -> dict:
    """What a guest given the CPUID table ``rows`` really sees on this host (the probe guest of
    tracevisor/cpuprobe.py, booted here; its answer is cached per host)."""
    from .cpuprobe import guest_cpuid

    return guest_cpuid(rows, boot_probe, refresh=refresh)


def boot_probe(kernel: str, rows: list[list[int]], make_device) -> StopInfo:
    """Run ``kernel`` in a throwaway 32 MiB VM with the CPUID table ``rows`` and a device built by
    ``make_device(ctx)`` (the CPUID probe's port)."""
    config = SessionConfig(kernel=kernel, memory=32 << 20, quiet=True, cpuid_rows=rows, timeout=30, fallback="off")
    host, machine, live = _live_machine(config, None)
    machine.add_device(make_device)
    with Session(config, host.image, machine, live, live=live) as s:
        return s.run()


def _fallback_header(machine: Machine) -> dict:
    from .fallback import header_config

    return header_config(machine)


def config_from_header(header: dict, kernel: str | None = None) -> SessionConfig:
    """The configuration a trace was recorded with (``kernel`` overrides the recorded path).  The guest
    sees the recorded CPUID table, machine size, options and command line."""
    from .trace.schema import host_str

    kinfo = header.get("kernel") or {}
    opts = header.get("options") or {}
    argv = [host_str(a) for a in header.get("argv") or []]  # bin (not UTF-8) back to the host's bytes
    mounts = [f"{host_str(m['host'])}:{host_str(m['guest'])}" + (":ro" if m.get("ro") else "")
              for m in header.get("mounts") or [] if isinstance(m, dict) and "host" in m and "guest" in m]
    determinism = header.get("determinism") or {}
    exact = header.get("mode") == "exact"
    fb = header.get("fallback") if isinstance(header.get("fallback"), dict) else {}
    interrupts = header.get("interrupts") if isinstance(header.get("interrupts"), dict) else {}
    irq = "user" if exact and interrupts.get("model") == "user" else "kernel"  # older traces: KVM's irqchip
    tsc_khz = interrupts.get("tsc_khz") if irq == "user" else None
    return SessionConfig(
        kernel=kernel or host_str(kinfo.get("path") or ""), args=argv[1:], memory=int(header["memory"]),
        cpus=int(header["cpus"]), mounts=mounts, env=[host_str(e) for e in header.get("env") or []],
        verbose=bool(opts.get("verbose")), pit=bool(opts.get("pit")), timeout=opts.get("timeout"),
        net=opts.get("net"), hide_rdrand=bool(determinism.get("rdrand_hidden", True)),
        stagger_s=float(opts.get("stagger_s", AP_STAGGER_S)), cpuid_rows=header.get("cpuid"),
        exact=exact, nd_sites=header.get("exact") if exact else None,
        coalesce_console=opts.get("coalesce_console") is True,
        fallback=str(fb.get("mode", "auto")), fallback_budget=int(fb.get("budget", 100_000)),
        # (recordings made before budgets counted translation blocks counted instructions)
        fallback_budget_unit=str(fb.get("budget_unit", "instructions")),
        # (recordings made before the rule existed always stopped bursts at locked instructions)
        fallback_atomics=bool(fb.get("atomics_in_kvm", True)) if fb.get("exit_set") else None,
        spin_hang_s=float(opts.get("spin_hang_s", 5.0)), irq=irq,
        irq_tsc_khz=int(tsc_khz) if isinstance(tsc_khz, int) else None)


# -- sessions ------------------------------------------------------------------------------------------

class Session:
    """An assembled VM: the machine, its HostIO, its trace sink and clock.  :meth:`run` boots and runs it;
    :meth:`close` releases everything (use it as a context manager)."""

    def __init__(self, config: SessionConfig, image: KernelImage, machine: Machine, hostio: HostIO,
                 sink=None, clock: Clock | None = None, live: LiveHostIO | None = None, writer=None) -> None:
        self.config = config
        self.image = image
        self.machine = machine
        self.hostio = hostio
        self.sink = sink
        self.clock = clock or machine.clock
        self.live = live  # the host side (refusal notes), when there is one
        self.writer = writer  # the TraceWriter of a recording
        self.summary: dict | None = None  # the writer's totals once the recording is closed
        self.info: StopInfo | None = None
        self.hasher = None  # the recording's MemoryHasher (single-vCPU recordings)

    def boot(self) -> None:
        """Lay out the guest without running it (a debugger attaches here; then machine.resume())."""
        self.machine.boot(self.hostio, self.sink, self.clock)

    def run(self) -> StopInfo:
        """Boot, run until the guest exits or is stopped, release the host side; returns why it stopped.
        A recording's trace is closed with the stop record."""
        try:
            info = self.machine.run(self.hostio, self.sink, self.clock)
        finally:
            self.hostio.close_all()
        return self._finish(info)

    def serve_gdb(self, address: str, **kw) -> StopInfo:
        """Boot, wait for one gdb connection before the first guest instruction and serve it
        (``run --gdb``); returns how the VM ended."""
        from .debugtarget import LiveTarget, serve_gdb

        def target():
            self.boot()
            return LiveTarget(self.machine, **kw)

        try:
            info = serve_gdb(target, address)
        finally:
            self.hostio.close_all()
        return self._finish(info)

    max_bytes_text: str | None = None  # a recording's --max-trace-size, as given

    def _finish(self, info: StopInfo) -> StopInfo:
        if self.writer is not None and self.max_bytes_text is not None:
            info = _trace_full_stop(info, self.writer, self.max_bytes_text)
        self.info = info
        if self.writer is not None and self.machine.booted:  # the state at the stop, for the replay's check
            from .memhash import MemoryHasher

            hasher = self.hasher
            self.writer.final = {"mem": hasher.update()[0] if hasher is not None
                                 else MemoryHasher(self.machine).start()[0]}
        if self.writer is not None:
            stop = info.as_dict()
            stop["report"] = {k: v for k, v in stop["report"].items() if k != "traceback"}
            if self.machine.ndi is not None:
                stop["exact"] = {"answered": self.machine.ndi.answered, "problems": self.machine.exact_notes()}
            self.summary = self.writer.close(stop=stop)
        return info

    def refusal_notes(self, verbose: bool | None = None) -> list[str]:
        """What to tell the user about refused guest file requests (see LiveHostIO.refusal_notes)."""
        if self.live is None:
            return []
        return self.live.refusal_notes(self.config.verbose if verbose is None else verbose)

    def close(self) -> None:
        try:
            if self.writer is not None and self.summary is None:
                self.summary = self.writer.close()
        finally:
            self.machine.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load(config: SessionConfig) -> KernelImage:
    """Validate the configuration and load its kernel (every problem is one TracevisorError)."""
    config.validate()
    return load_kernel(config.kernel, config.memory)


@dataclass
class _Host:
    """The host side of a live session, prepared before the VM exists (so that a bad mount or
    environment entry is reported before any KVM work)."""

    image: KernelImage
    sandbox: Sandbox
    argv: list[bytes]
    env: list[bytes]

    def hostio(self, config: SessionConfig, machine: Machine) -> LiveHostIO:
        """The live HostIO, with the network backend ``--net`` names opened (before any trace exists: a
        TAP that cannot be opened leaves no trace file behind).  On failure everything is released."""
        net = None
        try:
            if config.net:
                from .netbackend import open_backend

                net = open_backend(config.net)
            return LiveHostIO(self.sandbox, self.argv, self.env, Console(quiet=config.quiet),
                              tsc_khz=machine.tsc_khz, net=net)
        except BaseException:
            if net is not None:
                net.close()
            self.sandbox.close()
            machine.close()
            raise


def _prepare(config: SessionConfig, image: KernelImage | None) -> _Host:
    image = image or load(config)
    mounts = [parse_mount(m) for m in config.mounts]
    env = config.guest_env()
    argv = config.guest_argv()
    return _Host(image, Sandbox(mounts), argv, env)


def build_machine(config: SessionConfig, image: KernelImage,
                  log: Callable[[str], None] | None = None) -> Machine:
    """The VM for ``config`` with its devices (created, not booted).  A device's backend is the HostIO's
    business, so a replay creates the same devices without touching any network."""
    machine = Machine(config.vm_config(), image, log=log)
    try:
        if config.net:
            from .devices.virtio_net import VirtioNet
            from .netbackend import parse_net_spec

            mac = parse_net_spec(config.net).mac
            machine.add_device(lambda ctx: VirtioNet(ctx, mac=mac))
    except BaseException:
        machine.close()
        raise
    return machine


def _live_machine(config: SessionConfig, image: KernelImage | None) -> tuple[_Host, Machine, LiveHostIO]:
    """The prepared host, the machine and its live HostIO; the sandbox is closed if no machine can be built."""
    host = _prepare(config, image)
    try:
        machine = build_machine(config, host.image)
    except BaseException:
        host.sandbox.close()
        raise
    return host, machine, host.hostio(config, machine)


def build_run(config: SessionConfig, image: KernelImage | None = None) -> Session:
    """A plain run: the live host, no trace."""
    host, machine, live = _live_machine(config, image)
    return Session(config, host.image, machine, live, live=live)


def build_debug(config: SessionConfig, image: KernelImage | None = None) -> Session:
    """A run to be served to gdb (:meth:`Session.serve_gdb`): one vCPU."""
    if config.cpus != 1:
        raise TracevisorError(f"--gdb debugs a single vCPU: use -c 1 (got -c {config.cpus})")
    return build_run(config, image)


def build_record(config: SessionConfig, out: str | os.PathLike, *, compress: str | None = None,
                 max_bytes: int | None = None, max_bytes_text: str | None = None,
                 image: KernelImage | None = None) -> Session:
    """A recording to ``out``: the live host wrapped in a RecordingHostIO, every exit and event to a
    TraceWriter whose start is the session's clock.  With ``max_bytes`` the run stops cleanly (reason
    ``trace-full``) once the trace reaches that size."""
    from .trace import TraceWriter

    host, machine, live = _live_machine(config, image)
    try:
        header = trace_header(config, host.image, machine, host.sandbox, host.argv, host.env)
        signals.check()  # a deferred SIGINT/SIGTERM before the VM started: leave no trace file at all
        hasher = None
        if config.cpus == 1:  # memory hashes between exits need a memory no other vCPU is writing
            from .memhash import DEFAULT_EVERY, attach

            hasher = attach(machine, DEFAULT_EVERY)
            header["memhash"] = {"every": DEFAULT_EVERY, "hypercalls": True}
        writer = TraceWriter(out, header, compress=compress, threadsafe=config.cpus > 1, max_bytes=max_bytes)
    except BaseException:
        live.close_all()
        machine.close()
        raise
    clock = Clock(writer.t0_ns)  # one clock for exit rows, events and the stop record
    limit = max_bytes_text or str(max_bytes)
    machine.stop_conditions.append(
        lambda: StopInfo.of(StopReason.TRACE_FULL, f"the trace reached --max-trace-size ({limit}); "
                            "recording stopped") if writer.full else None)
    hostio = RecordingHostIO(live, writer, clock.now)
    session = Session(config, host.image, machine, hostio, sink=writer, clock=clock, live=live, writer=writer)
    session.hasher = hasher
    if max_bytes is not None:
        session.max_bytes_text = limit
    return session


def _trace_full_stop(info: StopInfo, writer, limit: str) -> StopInfo:
    """The stop to record and report: a guest that exited after the trace reached --max-trace-size (its
    last events did not fit) ends with reason trace-full and status 1, not as a clean exit."""
    writer.drain()  # the last chunk is written or dropped now: the count of dropped events is final
    dropped = writer.stats["dropped"]
    if not dropped or info.reason != StopReason.EXIT:
        return info
    return StopInfo.of(StopReason.TRACE_FULL,
                       f"the trace reached --max-trace-size ({limit}); recording stopped ({dropped} "
                       f"event{'s' if dropped != 1 else ''} not stored; the guest exited with code {info.code})",
                       cpu=info.cpu)


def replay_mode(header: dict, path: str, mode: str | None = None) -> str:
    """The mode a trace was recorded in ("exact" or "parallel"; traces older than exact recording ran
    vCPUs in parallel); ``mode``, when given, must be the same (one error line otherwise)."""
    recorded = header.get("mode") or "parallel"
    if recorded not in ("exact", "parallel"):
        raise TracevisorError(f"{path} was recorded in mode {str(recorded)[:40]!r}, which this tracevisor "
                              "does not know")
    if mode is not None and mode != recorded:
        raise TracevisorError(f"{path} is {'an exact' if recorded == 'exact' else 'a --parallel'} recording; "
                              f"it cannot be replayed as {'exact' if mode == 'exact' else '--parallel'}")
    if recorded == "exact" and not isinstance(header.get("exact"), dict):
        raise TracevisorError(f"{path} says it is an exact recording but has no site table")
    return recorded


def replay_kernel(header: dict, path: str, kernel: str | None = None, force: bool = False,
                  mode: str | None = None) -> tuple[SessionConfig, KernelImage]:
    """The configuration and kernel a replay of the trace at ``path`` (with this ``header``) runs:
    the recorded kernel (or ``kernel``), checked against the recorded SHA-256 unless ``force``; ``mode``
    insists on the recording mode."""
    from .errors import LoaderError

    replay_mode(header, path, mode)
    config = config_from_header(header, kernel)
    if config.exact and (config.cpus > 1 or config.irq == "user"):
        from .sched import load_schedule

        config.schedule = load_schedule(path)
    if not config.kernel:
        raise TracevisorError(f"{path} names no kernel; pass --kernel PATH")
    try:
        image = load_kernel(config.kernel, config.memory)
    except LoaderError:
        if not kernel and not os.path.exists(config.kernel):
            raise TracevisorError(f"the recorded kernel {config.kernel} is not there; pass --kernel PATH") from None
        raise
    recorded = (header.get("kernel") or {}).get("sha256")
    if image.sha256 != recorded and not force:
        raise TracevisorError(
            f"kernel {config.kernel} differs from the recorded one (sha256 {image.sha256[:16]}… vs "
            f"{str(recorded)[:16]}…); use --force to replay it anyway and let divergence "
            "detection show where it matters")
    config.timeout = None  # the replay ends where the recording does, not on the clock
    return config, image


def build_replay(config: SessionConfig, image: KernelImage, hostio: HostIO, sink,
                 log: Callable[[str], None] | None = None) -> Session:
    """A replay: the recorded machine, answered by ``hostio`` (the replaying HostIO) and checked by
    ``sink`` (the divergence checker) — both belong to :mod:`tracevisor.replay`, which builds them."""
    return Session(config, image, build_machine(config, image, log=log), hostio, sink=sink)


# -- the Python API --------------------------------------------------------------------------------

def _config(kernel, args: Iterable[str], mounts: Iterable[str], opts: dict) -> SessionConfig:
    return SessionConfig(kernel=os.fspath(kernel), args=list(args), mounts=list(mounts), **opts)


def run(kernel: str | os.PathLike, args: Iterable[str] = (), mounts: Iterable[str] = (), **opts) -> StopInfo:
    """Boot ``kernel`` with guest arguments ``args`` and run it to the end, like ``tracevisor run``.

    ``mounts`` are ``HOSTDIR[:GUESTDIR][:ro]`` specs; ``opts`` are :class:`SessionConfig` fields
    (``memory``, ``cpus``, ``env``, ``host_env``, ``timeout``, ``net``, ``quiet``, …).  Returns the
    :class:`~tracevisor.status.StopInfo` (``.reason``, ``.code``, ``.status``)."""
    config = _config(kernel, args, mounts, opts)
    with build_run(config) as s:
        return s.run()


def record(kernel: str | os.PathLike, out: str | os.PathLike, args: Iterable[str] = (),
           mounts: Iterable[str] = (), *, compress: str | None = None, max_bytes: int | None = None,
           **opts) -> StopInfo:
    """Record ``kernel`` to the trace ``out``, like ``tracevisor record``; returns the StopInfo.

    Arguments as :func:`run`; ``compress="zstd"`` compresses chunks, ``max_bytes`` stops the run once the
    trace reaches that size.  The guest's console is not echoed unless ``quiet=False``."""
    opts.setdefault("quiet", True)
    opts.setdefault("exact", True)  # as `tracevisor record`
    config = _config(kernel, args, mounts, opts)
    with build_record(config, out, compress=compress, max_bytes=max_bytes) as s:
        return s.run()
