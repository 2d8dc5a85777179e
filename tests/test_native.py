"""The native run loop (tracevisor/_fastloop.c) against the pure-Python loop, and the coalesced console.

The two loops must be interchangeable: the same traces apart from times (for every example guest), each
trace replayed and verified by either loop, the same divergence report at the same exit.  The pure-Python
loop runs in subprocesses with TRACEVISOR_PURE_PYTHON=1.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zlib

import pytest

from helpers import EXIT_ASM, EXIT_DATA, build_asm, run_cli
from tracevisor import fastloop
from tracevisor.trace import open_trace

PURE = {"TRACEVISOR_PURE_PYTHON": "1"}
TIMES = ("t", "t_end", "t_ns")


def native():
    module = fastloop.load()
    if module is None:
        pytest.fail(f"the native loop did not load: {fastloop.unavailable_reason()}")
    return module


def test_crc32_is_zlibs():
    """The per-exit register digest (contracts: zlib's CRC-32 over kvm_regs) is computed in C."""
    ext = native()
    rng = random.Random(7)
    for n in [0, 1, 3, 144, 1000] + [rng.randrange(0, 4096) for _ in range(40)]:
        data = rng.randbytes(n)
        assert ext.crc32(data) == zlib.crc32(data), n


def test_layout_matches_uapi():
    from tracevisor.kvm import uapi as U

    ext = native()
    assert ext.KVM_RUN == U.KVM_RUN
    assert ext.OFF_REGS == U.kvm_run.s.offset and ext.OFF_RIP == U.kvm_run.s.offset + U.kvm_regs.rip.offset
    assert ext.OFF_IO == U.kvm_run.exit.offset and ext.OFF_EXIT_REASON == U.kvm_run.exit_reason.offset
    assert ext.RING_MAX == (4096 - 8) // 24


def test_a_build_of_another_source_is_refused():
    """An in-place build left over from an older _fastloop.c (same ABI number, missing what the source now
    has) must not load: the build carries the hash of its source, and a mismatch is a stale build."""
    import types

    ext = native()
    assert ext.SOURCE_SHA == fastloop.source_sha()
    stale = types.SimpleNamespace(**{k: getattr(ext, k) for k in dir(ext) if k.isupper()})
    stale.__file__ = "stale.so"
    fastloop._check(stale)  # (the same constants: accepted)
    stale.SOURCE_SHA = "h0000000000000000"
    with pytest.raises(ImportError, match="stale or foreign"):
        fastloop._check(stale)


def strip_times(ev: dict) -> dict:
    out = {k: v for k, v in ev.items() if k not in TIMES}
    if ev["k"] == "hostio" and ev["op"] in ("boot_time", "rdtsc", "rdtscp"):
        out.pop("ret")  # clock readings
    if ev["k"] == "mem":  # guest memory holds the boot time (boot info): its hash differs from run to run
        out.pop("hash")
        out.pop("pages", None)
    return out


def comparable(path) -> tuple[dict, list[dict]]:
    """A trace's header (without creation time and host facts) and its events without their times."""
    r = open_trace(path)
    # (KVM's supported CPUID carries the APIC ID of the host CPU the recorder happened to run on)
    h = {k: v for k, v in r.header.items() if k not in ("created", "created_ns", "cpuid")}
    evs = [strip_times(e) for e in r.events()]
    for e in evs:
        if e["k"] == "stop":  # the stop report holds no time, but its message may name the wall clock
            e.pop("message", None)
    return h, evs


GUEST_RUNS = {
    "hello": ((), ()),
    "compute": (("300",), ()),
    "compute-v": (("100",), ("-v",)),  # the kernel also gets the serial port
    "files": ((), ("--mount", "{tmp}")),
    # exact mode runs several vCPUs one at a time on the pure-Python loop: --parallel puts both on the native loop
    "smp": ((), ("-c", "2", "--parallel")),
}


@pytest.mark.kvm
@pytest.mark.parametrize("name", sorted(GUEST_RUNS))
def test_native_and_pure_traces_identical(tmp_path, guests, name):
    args, opts = GUEST_RUNS[name]
    kernel = guests[name.split("-")[0]]
    traces = {}
    for loop, env in (("native", {}), ("pure", PURE)):
        box = tmp_path / f"box-{loop}"
        box.mkdir()
        out = tmp_path / f"{loop}.tvt"
        o = [x.format(tmp=box) for x in opts]
        r = run_cli("record", "--no-host-env", *o, str(kernel), "-o", str(out), *args, env=env)
        assert r.returncode == 0, r.stderr
        assert b"native run loop unavailable" not in r.stderr
        traces[loop] = (out, r.stdout)
    assert traces["native"][1] == traces["pure"][1]
    hn, en = comparable(traces["native"][0])
    hp, ep = comparable(traces["pure"][0])
    hn["mounts"] = hp["mounts"] = None  # the two boxes differ by name
    assert hn == hp
    if name == "smp":  # two vCPUs interleave differently from run to run: compare each vCPU's own events
        for cpu in (0, 1):
            mine = [{k: x for k, x in e.items() if k != "seq"} for e in en if e["cpu"] == cpu]
            other = [{k: x for k, x in e.items() if k != "seq"} for e in ep if e["cpu"] == cpu]
            assert mine == other
    else:
        assert en == ep
    assert sum(1 for e in en if e["k"] == "exit") > 0
    # Each trace replays, verified, with either loop.
    for trace, _ in traces.values():
        for env in ({}, PURE):
            r = run_cli("replay", "-q", str(trace), env=env)
            assert r.returncode == 0 and b"replay verified" in r.stderr, r.stderr


@pytest.mark.kvm
def test_uart_console_events_match_byte_by_byte_path(tmp_path, guests):
    """compute writes its lines to the UART a byte per exit: the native loop cuts console events at the same
    bytes (one per line) and stamps each with the time of its first byte, before that byte's exit row."""
    out = tmp_path / "c.tvt"
    # --parallel: exact mode's user-space interrupt model needs every exit in Python, so it runs the Python loop
    r = run_cli("record", "-q", "--parallel", str(guests["compute"]), "-o", str(out), "200")
    assert r.returncode == 0, r.stderr
    events = list(open_trace(out).events())
    uart = [e for e in events if e["k"] == "console" and e["stream"] == "uart"]
    exits = [e for e in events if e["k"] == "exit" and e["port"] == 0x800]
    assert b"".join(e["data"] for e in uart) == bytes(e["value"] for e in exits)
    assert all(e["data"].endswith(b"\n") for e in uart[:-1]) and len(uart) >= 3
    first_row = {}
    for e in events:
        if e["k"] == "exit" and e["port"] == 0x800:
            first_row.setdefault(len([u for u in uart if u["seq"] < e["seq"]]), e)
    for k, ev in enumerate(uart):
        assert ev["t"] <= first_row[k]["t"]


@pytest.mark.kvm
def test_divergence_at_uart_exit_reported_the_same(tmp_path):
    """A replay that writes another UART byte stops at that exit with the same report on either loop."""
    body = "mov $0x800, %dx\n" + "".join(f"mov ${c}, %al\noutb %al, %dx\n" for c in b"abc\n") + EXIT_ASM
    other = "mov $0x800, %dx\n" + "".join(f"mov ${c}, %al\noutb %al, %dx\n" for c in b"abX\n") + EXIT_ASM
    a = build_asm(tmp_path, "a", body, EXIT_DATA.format(code=0))
    b = build_asm(tmp_path, "b", other, EXIT_DATA.format(code=0))
    out = tmp_path / "a.tvt"
    assert run_cli("record", "-q", str(a), "-o", str(out)).returncode == 0
    reports = []
    for env in ({}, PURE):
        rep = tmp_path / f"rep{len(reports)}.json"
        r = run_cli("replay", "-q", "--kernel", str(b), "--force", "--report", str(rep), str(out), env=env)
        assert r.returncode == 4, r.stderr
        assert b"value: recorded 0x63, replay 0x58" in r.stderr
        reports.append(rep.read_text())
    import json

    na, pu = (json.loads(x) for x in reports)
    for d in (na, pu):
        d["report"].pop("regs", None)  # identical too, but rflags' RF bit may differ by path: not the point
    assert na["message"] == pu["message"] and na["report"]["expected"] == pu["report"]["expected"]
    assert na["report"]["actual"] == pu["report"]["actual"] and na["matched"] == pu["matched"]


@pytest.mark.kvm
def test_pure_python_env_is_honoured():
    code = ("import sys; from tracevisor import fastloop; from tracevisor.kvm.system import Kvm; "
            "from tracevisor.machine import Machine, VmConfig; from tracevisor.loader import load_kernel; "
            "from tracevisor import guestbuild; k = str(guestbuild.example('hello')); "
            "m = Machine(VmConfig(kernel=k), load_kernel(k, 64 << 20)); "
            "print('native' if m.native is not None else 'pure', fastloop.unavailable_reason()); m.close()")
    for env, want in ((PURE, b"pure TRACEVISOR_PURE_PYTHON=1"), ({"TRACEVISOR_PURE_PYTHON": ""}, b"native ")):
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                           env={**os.environ, **env})
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(want), r.stdout
        assert b"unavailable" not in r.stderr


@pytest.mark.kvm
def test_missing_extension_says_why_once_and_runs(tmp_path, guests):
    """No built module and no compiler: one clear line, then the pure-Python loop runs the guest."""
    env = {"CC": str(tmp_path / "no-such-cc"), "TRACEVISOR_CACHE_DIR": str(tmp_path / "cache"),
           "TRACEVISOR_PURE_PYTHON": ""}
    if os.path.exists(os.path.join(os.path.dirname(fastloop.__file__), "_fastloop.c")) and any(
            f.startswith("_fastloop") and f.endswith(".so") for f in os.listdir(os.path.dirname(fastloop.__file__))):
        pytest.skip("an installed/in-place build of the extension is importable here")
    r = run_cli("run", str(guests["compute"]), "20", env=env)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.decode().splitlines() if "native run loop unavailable" in ln]
    assert len(lines) == 1, r.stderr
    assert "no-such-cc not found" in lines[0] and "pure-Python loop" in lines[0]
    assert r.stdout.count(b".") == 20


# -- coalesced console ------------------------------------------------------------------------------------

def _uart_bytes_of(path) -> bytes:
    evs = open_trace(path).events()
    return b"".join(e["data"] for e in evs if e["k"] == "console" and e["stream"] == "uart")


@pytest.mark.kvm
@pytest.mark.parametrize("env", [{}, PURE], ids=["native", "pure"])
def test_coalesced_console_output_trace_and_replay(tmp_path, guests, env):
    normal = tmp_path / "normal.tvt"
    coal = tmp_path / "coal.tvt"
    r1 = run_cli("record", str(guests["compute"]), "-o", str(normal), "700", env=env)
    r2 = run_cli("record", "--coalesce-console", str(guests["compute"]), "-o", str(coal), "700", env=env)
    assert r1.returncode == 0 and r2.returncode == 0, r2.stderr
    assert r1.stdout == r2.stdout and r1.stdout.count(b".") == 700  # the same console output
    assert _uart_bytes_of(coal) == _uart_bytes_of(normal)
    reader = open_trace(coal)
    assert reader.header["options"]["coalesce_console"] is True
    events = list(reader.events())
    assert not [e for e in events if e["k"] == "exit" and e["port"] == 0x800]  # no row per byte
    cons = [e for e in events if e["k"] == "console" and e["stream"] == "uart"]
    assert cons and all(e.get("coalesced") is True for e in cons)
    # every coalesced console event sits right before an exit row (or the vCPU's stop) of its cpu
    for e in cons:
        nxt = next(x for x in events if x["seq"] > e["seq"])
        assert nxt["k"] in ("exit", "vcpu", "console"), nxt
    for renv in ({}, PURE):
        r = run_cli("replay", str(coal), env=renv)
        assert r.returncode == 0 and b"replay verified" in r.stderr, r.stderr
        assert r.stdout == r1.stdout


@pytest.mark.kvm
def test_coalesced_console_replay_compares_the_bytes(tmp_path):
    """The console bytes between two exits are part of the verdict: other bytes → divergence."""
    def guest(name, text):
        body = "mov $0x800, %dx\n" + "".join(f"mov ${c}, %al\noutb %al, %dx\n" for c in text) + EXIT_ASM
        return build_asm(tmp_path, name, body, EXIT_DATA.format(code=0))

    a, b = guest("a", b"hello\n"), guest("b", b"hellO\n")
    out = tmp_path / "a.tvt"
    assert run_cli("record", "-q", "--coalesce-console", str(a), "-o", str(out)).returncode == 0
    for env in ({}, PURE):
        r = run_cli("replay", "-q", "--kernel", str(b), "--force", str(out), env=env)
        assert r.returncode == 4 and b"console" in r.stderr and b"differs in data" in r.stderr, r.stderr


def test_coalesced_console_needs_one_vcpu(guests):
    r = run_cli("run", "--coalesce-console", "-c", "2", str(guests["smp"]))
    assert r.returncode == 1
    assert r.stderr.decode().strip().splitlines() == [
        "tracevisor: error: --coalesce-console needs a single vCPU: KVM's coalesced-I/O ring does not say "
        "which vCPU wrote a byte"]
