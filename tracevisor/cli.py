"""The ``tracevisor`` command: the composition root for every subcommand.

Host/configuration problems end with one ``tracevisor: error: …`` line and status 1; guest problems end
with a stop report and status 3; the guest's own exit code is the status of a normal run.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from . import __version__
from .errors import TracevisorError
from .status import ExitStatus, StopReason

GUEST_ARGS_HELP = "arguments passed to the guest (its argv[1:]); everything after KERNEL goes here"


def _env_default(name: str, fallback: str) -> str:
    return os.environ.get(name, fallback)


def apply_env_defaults(ns: argparse.Namespace) -> None:
    """Fill -m/-c from HERMIT_MEMORY_SIZE/HERMIT_CPU_COUNT when not given (uhyve's variables).  Done after
    parsing, not while the parser is built: a bad value is one error line naming the variable, and never
    breaks `--help` or other subcommands."""
    from .machine import parse_size

    if ns.memory is None:
        text = _env_default("HERMIT_MEMORY_SIZE", "64M")
        try:
            parse_size(text)
        except TracevisorError as e:
            raise TracevisorError(f"HERMIT_MEMORY_SIZE={text!r}: {e}") from None
        ns.memory = text
    if ns.cpus is None:
        text = _env_default("HERMIT_CPU_COUNT", "1")
        try:
            ns.cpus = int(text.strip(), 10)
        except ValueError:
            raise TracevisorError(f"HERMIT_CPU_COUNT={text!r} is not a number of vCPUs") from None


def add_vm_options(p: argparse.ArgumentParser, record: bool = False) -> None:
    """The options of `run` (shared by `record`), mirroring uhyve 0.2.1."""
    p.add_argument("-v", "--verbose", action="store_true",
                   help="give the kernel the serial port 0x800 for its log (as uhyve -v) and print "
                        "tracevisor's own notes (refused file requests, unknown ports) to stderr")
    p.add_argument("-m", "--memory", default=None, metavar="SIZE",
                   help="guest RAM, e.g. 64M, 256MiB, 1G (binary units; 16M to 3328M; default 64M; "
                        "env HERMIT_MEMORY_SIZE)")
    p.add_argument("-c", "--cpus", type=int, default=None,
                   metavar="N", help="number of vCPUs, one host thread each (default 1; env HERMIT_CPU_COUNT)")
    p.add_argument("--mount", action="append", default=[], metavar="HOSTDIR[:GUESTDIR][:ro]",
                   help="make a host directory visible to the guest at GUESTDIR (default /, so relative "
                        "guest paths resolve inside it); repeatable; ':ro' refuses writes. Without a "
                        "mount the guest sees no host file. Paths cannot escape with '..' or symlinks")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE|KEY",
                   help="add an environment variable for the guest; a bare KEY copies the host's value "
                        "(repeatable)")
    if record:
        p.add_argument("--host-env", action="store_true",
                       help="pass the host's whole environment to the guest, as `run` and uhyve do. By "
                            "default `record` passes none: the guest's environment is stored in the trace, "
                            "and traces get shared (tokens and keys live in environments)")
        p.add_argument("--no-host-env", action="store_true", help=argparse.SUPPRESS)  # the default
    else:
        p.add_argument("--no-host-env", action="store_true",
                       help="do not pass the host's environment to the guest (uhyve passes all of it)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="stop the VM after this many seconds (exit status 124)")
    p.add_argument("--pit", action="store_true", help="create KVM's in-kernel PIT (as uhyve --pit)")
    p.add_argument("--coalesce-console", action="store_true",
                   help="let KVM queue the guest's UART output (port 0x800) in its coalesced-I/O ring instead of "
                        "exiting for each byte: ~6x cheaper per byte; the trace then has no exit row (RIP, time) "
                        "per byte, only the console bytes between two exits (docs/trace-format.md); one vCPU")
    p.add_argument("--fallback", choices=("auto", "on", "off"), default="auto",
                   help="instruction fallback for what this host's KVM cannot emulate (XGETBV, XSAVE/XRSTOR, "
                        "SSE/x87 on nested or paravirtualised KVM): auto (default) starts it at the first "
                        "such instruction, on also requires unicorn and capstone up front, off reports the "
                        "instruction and stops (docs/fallback.md)")
    p.add_argument("--spin-hang", type=float, default=5.0, metavar="SECONDS",
                   help="report a hang (status 3, with its RIP) when a running vCPU keeps interrupts disabled "
                        "and makes no exit for this long (default 5; 0 = never); guests that compute longer "
                        "with interrupts off and no I/O need a larger value")
    p.add_argument("--fallback-budget", type=int, default=None, metavar="N",
                   help="at most N translation blocks (straight-line runs of guest code) per fallback burst "
                        "(default 10000, under 1 ms of emulation; where the native extension is unavailable, "
                        "N instructions, default 100000): bounds how long an interrupt waits; part of the "
                        "trace, so a replay uses the recorded value")
    p.add_argument("--net", default=None, metavar="SPEC",
                   help="give the guest a virtio-net NIC (legacy, PCI 00:00.0, I/O BAR 0xC000; polled, no "
                        "interrupts) attached to tap:IFNAME (an existing Linux TAP device; tap:IFNAME,create makes a "
                        "temporary one, as root) or "
                        "udp:[HOST:]PORT[,peer=HOST:PORT] (one Ethernet frame per UDP datagram, as QEMU's "
                        "-netdev dgram); add ,mac=52:54:00:12:34:56 to choose the MAC (docs/network.md)")
    p.add_argument("kernel", metavar="KERNEL", help="the unikernel: a Hermit kernel or a static x86-64 ELF")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help=GUEST_ARGS_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracevisor",
        description="A uhyve-compatible hypervisor for Hermit unikernels on Linux KVM that records "
                    "every VM exit, hypercall and host response to a trace and replays it.",
        epilog="Run 'tracevisor COMMAND --help' for the options of a command.")
    parser.add_argument("--version", action="version", version=f"tracevisor {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("run", help="boot and run a kernel (like `uhyve KERNEL`)",
                       description="Boot KERNEL on KVM as uhyve 0.2.1 would and serve its hypercalls. "
                                   "The exit status is the guest's exit code.")
    p.add_argument("-s", "--gdb", "--gdb-port", dest="gdb", metavar="[HOST:]PORT",
                   default=os.environ.get("HERMIT_GDB_PORT") or None,
                   help="boot, then wait for gdb on HOST:PORT (default host 127.0.0.1) before the first "
                        "guest instruction: gdb -ex 'target remote HOST:PORT' KERNEL. Needs -c 1. "
                        "(uhyve's -s/--gdb-port; env HERMIT_GDB_PORT; docs/time-travel.md)")
    add_vm_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("record", help="run a kernel and record a trace (-o FILE)",
                       description="Run KERNEL like `tracevisor run` and write a msgpack trace of every VM "
                                   "exit, hypercall, host response and console output "
                                   "(docs/trace-format.md). Options -o/--compress/--max-trace-size may "
                                   "also follow KERNEL directly: tracevisor record KERNEL -o run.tvt ARGS…")
    p.add_argument("-o", "--output", default="run.tvt", metavar="FILE", help="trace file (default run.tvt)")
    p.add_argument("--compress", choices=["none", "zstd"], default="none",
                   help="compress each chunk with zstd (needs the 'zstandard' package)")
    p.add_argument("--max-trace-size", default=None, metavar="SIZE",
                   help="stop the run cleanly (footer written) once the trace reaches SIZE, e.g. 1G; the run then "
                        "ends with stop reason trace-full and status 1")
    p.add_argument("-q", "--quiet", action="store_true", help="do not echo the guest's console output")
    p.add_argument("--parallel", action="store_true",
                   help="record as fast as `run`: vCPUs run in parallel and RDTSC/RDRAND execute natively; "
                        "such a trace is not exactly replayable (docs/determinism.md). The default is an "
                        "exact recording")
    add_vm_options(p, record=True)
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("replay", help="re-execute a trace under KVM and check it against the recording",
                       description="Re-execute the recorded kernel, answering every host request from the "
                                   "trace (no host file, network or clock is touched), and stop with a report "
                                   "at the first exit whose registers, memory or I/O differ from the recording. "
                                   "Exit status: 0 verified (the whole recording re-created), 4 diverged, 5 "
                                   "re-created up to a recorded stop that was not the guest's (timeout, Ctrl-C, "
                                   "SIGTERM, trace full, recorder killed, damaged trace), 6 nothing to check, "
                                   "124 replay --timeout expired (docs/determinism.md).")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--kernel", metavar="PATH", help="the kernel to run instead of the path in the trace")
    p.add_argument("--force", action="store_true",
                   help="run a kernel whose SHA-256 differs from the recorded one")
    p.add_argument("-q", "--quiet", action="store_true", help="do not reproduce the guest's console output")
    p.add_argument("--report", metavar="FILE", help="also write the result (and any divergence) as JSON")
    p.add_argument("--until", type=int, metavar="N", help="stop after recorded event N and print the state")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--exact", dest="mode", action="store_const", const="exact",
                      help="insist that the trace is an exact recording (refused otherwise)")
    mode.add_argument("--parallel", dest="mode", action="store_const", const="parallel",
                      help="insist that the trace is a --parallel recording (refused otherwise)")
    p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                   help="give up after this many seconds (status 124, not verified): a guest that spins "
                        "without exits would otherwise replay forever")
    p.add_argument("--gdb", metavar="[HOST:]PORT",
                   help="serve gdb over the replay, with reverse execution (reverse-continue, reverse-stepi, "
                        "reverse-step/next): gdb -ex 'target remote HOST:PORT' KERNEL (docs/time-travel.md)")
    p.add_argument("--checkpoint-every", type=int, default=2000, metavar="EXITS",
                   help="with --gdb: exits between checkpoints (default 2000); smaller = faster reverse "
                        "steps, more memory")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("info", help="print a trace's header and totals",
                       description="Print the header (kernel, machine, command line, host) and the totals "
                                   "(events, exits by reason, stop) of a trace.")
    p.add_argument("trace", metavar="TRACE")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("dump", help="print a trace's events, one per line (hypercalls strace-like)",
                       description="Print events in order: exits as '#seq cpuN +time IO out port=…', "
                                   "hypercalls like strace: open(\"data.txt\", O_RDONLY) = 3.")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--kind", action="append", default=None,
                   choices=["exit", "hypercall", "hostio", "console", "mmio", "vcpu", "stop", "virtio", "net",
                            "burst", "nm", "exception", "xgetbv", "xsave", "xrstor"],
                   help="only events of this kind (repeatable)")
    p.add_argument("--cpu", type=int, default=None, help="only events of this vCPU")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="print at most N events")
    p.add_argument("--start", type=int, default=None, metavar="SEQ", help="first sequence number")
    p.set_defaults(func=cmd_dump)

    p = sub.add_parser("export", help="export a trace to a standard format (pcap, perfetto, parquet, csv)",
                       description="Write a trace in a format other tools read. pcap: every network frame "
                                   "the guest sent or received (tshark/Wireshark). perfetto: Chrome trace-event "
                                   "JSON, one track per vCPU (ui.perfetto.dev). parquet, csv: a directory with "
                                   "one file per analysis frame (docs/analysis.md).")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--format", choices=["pcap", "perfetto", "parquet", "csv"], default=None,
                   help="output format (default pcap)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="output file, or directory for parquet/csv (default: TRACE with the format's suffix: "
                        ".pcap, .perfetto.json, -parquet/, -csv/)")
    p.add_argument("--direction", choices=["rx", "tx"], help="pcap: only received or only sent frames")
    p.add_argument("--exits", choices=["auto", "instant", "counter", "none"], default=None,
                   help="perfetto: exits as instant events, as per-vCPU exit-rate counters, or not at all "
                        "(auto: instants up to 200000 exits)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("stats", help="exit and hypercall statistics of a trace (like perf kvm stat report)",
                       description="Per exit reason, per I/O port and per hypercall: count, share, total/min/max/"
                                   "mean/p99 time and bytes moved. Exit time is the time until the vCPU's next "
                                   "exit; hypercall time is the host latency (docs/analysis.md).")
    p.add_argument("trace", metavar="TRACE")
    p.add_argument("--by", choices=["vcpu"], help="one table per vCPU")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("diff", help="compare two traces of the same kernel; status 0 if identical, 1 if not",
                       description="Align two traces per vCPU, event by event (timing ignored), and print the "
                                   "first difference field by field, then the differences in hypercall counts, "
                                   "bytes and exits. Exit status: 0 no difference, 1 different, 2 trouble.")
    p.add_argument("a", metavar="TRACE_A")
    p.add_argument("b", metavar="TRACE_B")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing; only the exit status tells")
    p.add_argument("--ignore", action="append", metavar="FIELD", help="also ignore this event field (repeatable)")
    p.add_argument("--ignore-host", action="store_true",
                   help="ignore answers that are facts of the recording host (its TSC frequency), to compare "
                        "runs recorded on different machines")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("examples", help="list the bundled example guests, or print one's path",
                       description="The example guests ship with tracevisor (built with gcc on first use "
                                   "if they were not prebuilt). Try: tracevisor run \"$(tracevisor examples hello)\"")
    p.add_argument("name", nargs="?", help="print the path of this example (building it if needed)")
    p.set_defaults(func=cmd_examples)
    parser.set_defaults(commands=sub.choices)  # name -> subparser, for errors in the subcommand's own words
    return parser


def session_config(ns: argparse.Namespace):
    """The options of `run`/`record` → a SessionConfig (tracevisor.session); bad values are TracevisorErrors."""
    from .machine import parse_size
    from .session import SessionConfig

    apply_env_defaults(ns)
    return SessionConfig(kernel=ns.kernel, args=list(ns.args), memory=parse_size(ns.memory), cpus=ns.cpus,
                         mounts=list(ns.mount), env=list(ns.env), host_env=_passes_host_env(ns),
                         verbose=ns.verbose, pit=ns.pit, timeout=ns.timeout, net=getattr(ns, "net", None),
                         quiet=getattr(ns, "quiet", False), coalesce_console=ns.coalesce_console,
                         fallback=getattr(ns, "fallback", "auto"),
                         fallback_budget=getattr(ns, "fallback_budget", None),
                         spin_hang_s=getattr(ns, "spin_hang", 5.0))


def _passes_host_env(ns: argparse.Namespace) -> bool:
    """`run` passes the host environment unless --no-host-env (as uhyve); `record` only with --host-env."""
    if ns.no_host_env:
        return False
    return bool(getattr(ns, "host_env", True))


def finish(info, verbose_log=None) -> int:
    """Print the stop report (if any) and return the process status."""
    text = info.format()
    if text:
        print(text, file=sys.stderr, flush=True)
        tb = info.report.get("traceback")
        if tb:
            print(tb, file=sys.stderr)
    return info.status


def cmd_run(ns: argparse.Namespace) -> int:
    from . import session

    config = session_config(ns)
    if ns.gdb is not None:
        from .debugtarget import parse_gdb_address

        parse_gdb_address(ns.gdb)
        s = session.build_debug(config)
    else:
        s = session.build_run(config)
    with s:
        info = s.serve_gdb(ns.gdb) if ns.gdb is not None else s.run()
        for line in s.refusal_notes(ns.verbose):
            print(f"tracevisor: {line}", file=sys.stderr)
        return finish(info)


class _MissingValue(Exception):
    """An option of `record` after KERNEL without its value (reported as argparse would)."""


def _hoist_record_options(argv: list[str]) -> list[str]:
    """Let `record KERNEL -o FILE ARGS…` work: options of `record` right after KERNEL move before it."""
    if not argv or argv[0] != "record":
        return argv
    takes_value = {"-m", "--memory", "-c", "--cpus", "--mount", "--env", "--timeout", "-o", "--output",
                   "--compress", "--max-trace-size", "--net", "--fallback", "--fallback-budget",
                   "--spin-hang"}
    movable = {"-o", "--output", "--compress", "--max-trace-size"}
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "--":
            return argv
        if a.startswith("-"):
            i += 2 if (a in takes_value) else 1
            continue
        break  # argv[i] is KERNEL
    k = i
    if k >= len(argv):
        return argv
    head, kernel, rest = argv[:k], argv[k], argv[k + 1:]
    hoisted: list[str] = []
    while rest:
        a = rest[0]
        name = a.split("=", 1)[0]
        if name not in movable:
            break
        if "=" in a:
            hoisted.append(rest.pop(0))
        elif len(rest) < 2:  # `record KERNEL -o`: its value is missing (KERNEL must not become it)
            raise _MissingValue(name)
        else:
            hoisted += [rest.pop(0), rest.pop(0)]
    return head + hoisted + [kernel] + rest


def _check_trace_output(output: str, kernel: str) -> None:
    """Refuse an output that would destroy the kernel being recorded (``record -o K K``)."""
    try:
        same = os.path.samefile(output, kernel)
    except OSError:  # either does not exist (yet): nothing to destroy
        return
    if same:
        raise TracevisorError(f"-o {output} is the kernel itself; choose another trace file")


def cmd_record(ns: argparse.Namespace) -> int:
    import time

    from . import session
    from .kvm.uapi import exit_reason_name
    from .machine import parse_size

    max_bytes = parse_size(ns.max_trace_size) if ns.max_trace_size else None
    _check_trace_output(ns.output, ns.kernel)
    config = session_config(ns)
    config.exact = not ns.parallel
    if not (ns.host_env or ns.no_host_env or ns.env) and os.environb:  # said once, unless a choice was made
        print("tracevisor: note: record passes no host environment to the guest (it would be stored in the "
              "trace); use --env NAME for variables the guest needs, --host-env for all", file=sys.stderr)
    started = time.monotonic()
    with session.build_record(config, ns.output, compress=None if ns.compress == "none" else ns.compress,
                              max_bytes=max_bytes, max_bytes_text=ns.max_trace_size) as s:
        for note in s.machine.exact_notes():
            print(f"tracevisor: warning: {note}", file=sys.stderr)
        info = s.run()
        for line in s.refusal_notes(ns.verbose):
            print(f"tracevisor: {line}", file=sys.stderr)
        for note in s.machine.exact_notes():
            if "overwrote" in note:
                print(f"tracevisor: warning: {note}", file=sys.stderr)
        summary = s.summary or {}
        status = finish(info)
    wall = time.monotonic() - started
    exits = summary.get("exits", 0)
    by_reason = ", ".join(f"{exit_reason_name(int(r))} {n}" for r, n in
                          sorted(summary.get("by_reason", {}).items(), key=lambda kv: -kv[1]))
    size = os.path.getsize(ns.output)
    per_exit = f", {size / exits:.1f} B/exit" if exits else ""
    print(f"tracevisor: recorded {summary.get('events', 0)} events ({exits} exits: {by_reason or 'none'}) "
          f"to {ns.output}: {size} bytes{per_exit}, {wall:.2f} s", file=sys.stderr)
    return status


def cmd_replay(ns: argparse.Namespace) -> int:
    import json

    from tracevisor.replay import Replayer

    if ns.gdb is not None:
        return _replay_gdb(ns)
    if ns.report:
        _check_writable(ns.report, "--report")
    with Replayer(ns.trace, kernel=ns.kernel, force=ns.force, quiet=ns.quiet, mode=ns.mode,
                  timeout=ns.timeout) as r:
        for w in r.warnings:
            print(f"tracevisor: warning: {w}", file=sys.stderr)
        result = r.run_to(ns.until) if ns.until is not None else r.run()
        if result.reason == StopReason.PAUSED and result.stop is not None:
            regs = r.registers(result.stop.cpu or 0)
            result.report = {"cpu": result.stop.cpu, "regs": regs}
            print(f"tracevisor: {result.message}; vCPU {result.stop.cpu or 0} rip={regs['rip']:#x} "
                  f"rsp={regs['rsp']:#x}", file=sys.stderr)
        elif result.reason == StopReason.DIVERGED and result.stop is not None:
            if result.stop.reason == StopReason.DIVERGED:
                text = result.stop.format()
                if text:
                    print(text, file=sys.stderr)
            _print_divergence(result)
            if result.message != result.stop.message:
                print(f"tracevisor: {result.message}", file=sys.stderr)
        else:
            print(f"tracevisor: {result.message}", file=sys.stderr)
        if len(result.vcpus) > 1:
            for cpu, v in sorted(result.vcpus.items()):
                print(f"tracevisor:   vCPU {cpu}: {v.get('verdict')} ({v['matched']} events matched, "
                      f"{v['left']} left)", file=sys.stderr)
        if ns.report:
            try:
                with open(ns.report, "w") as f:
                    json.dump(result.as_dict(), f, indent=2, default=_json_default)
            except OSError as e:
                raise TracevisorError(f"cannot write --report {ns.report}: {e.strerror or e}") from None
        return result.status


def _check_writable(path: str, option: str) -> None:
    """Refuse, before any work, an output file whose directory is missing or not writable (a replay must not
    run to the end and then fail to save its result)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise TracevisorError(f"{option} {path}: is a directory")
    if not os.path.isdir(parent):
        raise TracevisorError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise TracevisorError(f"{option} {path}: directory {parent} is not writable")


def _replay_gdb(ns: argparse.Namespace) -> int:
    from tracevisor.replay import Replayer
    from tracevisor.replay.debugtarget import ReplayTarget

    from .debugtarget import parse_gdb_address, serve_gdb

    parse_gdb_address(ns.gdb)
    if ns.checkpoint_every < 1:
        raise TracevisorError("--checkpoint-every must be at least 1")
    with Replayer(ns.trace, kernel=ns.kernel, force=ns.force, quiet=ns.quiet, mode=ns.mode,
                  checkpoint_every=ns.checkpoint_every) as r:
        if r.config.cpus != 1:
            raise TracevisorError(f"replay --gdb debugs single-vCPU traces (this one has {r.config.cpus})")
        info = serve_gdb(lambda: ReplayTarget(r), ns.gdb)
        return finish(info)


def _json_default(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    return str(v)


def _print_divergence(result) -> None:
    rep = result.report
    held = rep.get("unverified_output")
    if held:
        text = bytes(held).decode("utf-8", "backslashreplace")
        print(f"  guest output at the divergence, NOT verified (not printed as guest output): {text!r}",
              file=sys.stderr)
    for p in rep.get("pages") or []:
        line = f"  page {p['gpa']:#x}: crc recorded {p['recorded_crc']:#010x}, replay {p['replay_crc']:#010x}"
        for r in p.get("changed") or []:
            line += f"; replay changed {r['gpa']:#x}: {r['before']} -> {r['replay']}"
        print(line, file=sys.stderr)
    if not rep or "expected" not in rep:
        if rep.get("leftover"):
            print(f"  recorded but not replayed: {rep['leftover']}", file=sys.stderr)
        return
    print(f"  at recorded event #{rep.get('seq')}", file=sys.stderr)
    exp, act = rep.get("expected") or {}, rep.get("actual") or {}
    for k in sorted(set(exp) | set(act)):
        if k in ("seq", "t", "k", "cpu") or exp.get(k) == act.get(k):
            continue
        print(f"    {k:>8}: recorded {exp.get(k)!r}", file=sys.stderr)
        print(f"    {'':>8}  replay   {act.get(k)!r}", file=sys.stderr)
    last = rep.get("last_matching") or []
    if last:
        print("  last matching events:", file=sys.stderr)
        for ev in last:
            print(f"    {ev}", file=sys.stderr)


def _open_trace(path: str):
    from .trace import open_trace

    reader = open_trace(path)
    return reader


def _print_warnings(reader) -> None:
    for w in reader.warnings:
        print(f"tracevisor: warning: {w}", file=sys.stderr)


def cmd_info(ns: argparse.Namespace) -> int:
    from .trace.dump import info_text

    reader = _open_trace(ns.trace)
    print(info_text(reader))
    for _ in reader.chunks():  # check every chunk's CRC so damage is reported, not just the footer's word
        pass
    _print_warnings(reader)
    return 0


def cmd_dump(ns: argparse.Namespace) -> int:
    from .trace.dump import format_event

    reader = _open_trace(ns.trace)
    n = 0
    for ev in reader.events(kinds=ns.kind, vcpu=ns.cpu, start=ns.start):
        if ns.limit is not None and n >= ns.limit:
            break
        print(format_event(ev))
        n += 1
    _print_warnings(reader)
    return 0


def _analysis_cli():
    """analysis.cli, or a one-line error when the [analysis] extra (pandas, ...) is not installed."""
    try:
        from tracevisor.analysis import cli
    except ImportError as e:
        raise TracevisorError(f"this command needs the analysis extra ({e.name or e} is missing): "
                              "pip install 'tracevisor[analysis]'") from None
    return cli


def cmd_stats(ns: argparse.Namespace) -> int:
    return _analysis_cli().stats_main(ns)


def cmd_diff(ns: argparse.Namespace) -> int:
    try:
        cli = _analysis_cli()
    except TracevisorError as e:  # diff(1)'s convention: 1 means "different", trouble is 2
        print(f"tracevisor: error: {e}", file=sys.stderr)
        return 2
    return cli.diff_main(ns)


def cmd_export(ns: argparse.Namespace) -> int:
    chosen = ns.format is not None
    ns.format = ns.format or "pcap"
    if ns.exits is not None and ns.format != "perfetto":
        raise TracevisorError("--exits applies to --format perfetto only")
    if ns.format != "pcap":
        if ns.direction:
            raise TracevisorError("--direction applies to --format pcap only")
        return _analysis_cli().export_main(ns)
    from .pcap import write_pcap

    reader = _open_trace(ns.trace)  # a clear one-line error for a file that is not a trace
    try:
        frames = next(iter(reader.events(kinds=["net"])), None) is not None
    finally:
        reader.close()
    if not frames and not chosen:  # the default format, for a trace that has nothing for it
        raise TracevisorError(f"{ns.trace} has no network frames (the guest had no --net), so a pcap would "
                              "be empty: choose --format perfetto, parquet or csv (or --format pcap anyway)")
    out = ns.output or os.path.splitext(ns.trace)[0] + "." + ns.format
    try:
        n = write_pcap(ns.trace, out, direction=ns.direction)
    except OSError as e:
        raise TracevisorError(f"cannot write {out}: {e.strerror}") from None
    print(f"tracevisor: wrote {n} frames to {out}", file=sys.stderr)
    return 0


def cmd_examples(ns: argparse.Namespace) -> int:
    from . import guestbuild

    if ns.name:
        if ns.name not in guestbuild.EXAMPLES:
            raise TracevisorError(f"no example named {ns.name!r}; choose from {', '.join(guestbuild.EXAMPLES)}")
        print(guestbuild.example(ns.name))
        return 0
    for name in guestbuild.EXAMPLES:
        print(name)
    return 0


def _runs_a_vm(ns: argparse.Namespace) -> bool:
    """Does this command run a VM whose end must be recorded properly (not under an interactive debugger)?"""
    return ns.command in ("run", "record", "replay") and getattr(ns, "gdb", None) is None


def main(argv: list[str] | None = None) -> int:
    from . import signals

    on_main = threading.current_thread() is threading.main_thread()
    previous = signals.defer() if on_main else {}  # until the command is known (see tracevisor.signals)
    try:
        return _main(argv, on_main)
    finally:
        if on_main:
            signals.restore(previous)  # an in-process caller gets its handlers back


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """parse_args, with the errors of a subcommand reported by that subcommand (its usage line, not the
    top-level one) and a missing option value after `record KERNEL` named as such."""
    commands = parser.get_default("commands") or {}
    try:
        argv = _hoist_record_options(argv)
    except _MissingValue as e:
        commands["record"].error(f"argument {e}: expected one argument")
    ns, extras = parser.parse_known_args(argv)
    if extras:
        (commands.get(getattr(ns, "command", None)) or parser).error(f"unrecognized arguments: {' '.join(extras)}")
    return ns


def _main(argv: list[str] | None, on_main: bool) -> int:
    from . import signals

    try:
        parser = build_parser()
        ns = _parse(parser, list(sys.argv[1:] if argv is None else argv))
        if on_main:
            signals.check()
            if not _runs_a_vm(ns):
                signals.interactive()
    except signals.Interrupted as e:
        print(f"tracevisor: {e}", file=sys.stderr)
        return e.status
    if not getattr(ns, "func", None):
        parser.print_help()
        return 2
    try:
        return ns.func(ns)
    except signals.Interrupted as e:
        print(f"tracevisor: {e}", file=sys.stderr)
        return e.status
    except TracevisorError as e:
        print(f"tracevisor: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("tracevisor: interrupted", file=sys.stderr)
        return int(ExitStatus.INTERRUPTED)
    except BrokenPipeError:
        try:
            sys.stdout = None  # type: ignore[assignment]
        except Exception:
            pass
        return 0

if __name__ == "__main__":
    sys.exit(main())
