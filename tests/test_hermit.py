"""Real Hermit kernels (guests/hermit/, from the uhyve repository) on this host, through the instruction
fallback where KVM's emulator cannot run their instructions; plus unit tests of the XSAVE layout and of
the code sweep's classification."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys

import pytest

from tracevisor import codescan, xstate

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HERMIT = os.path.join(ROOT, "guests", "hermit")


def _tv(*args, timeout=240):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "tracevisor", *args], capture_output=True, timeout=timeout,
                          env=env, cwd=ROOT)


def _kvm_or_skip():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if os.environ.get("TRACEVISOR_REQUIRE_KVM"):
            pytest.fail("/dev/kvm is not usable")
        pytest.skip("/dev/kvm is not usable")


@pytest.mark.parametrize("verbose", [False, True])
def test_hello_world_prints_and_exits_0(verbose):
    _kvm_or_skip()
    r = _tv("run", *(["-v"] if verbose else []), os.path.join(HERMIT, "hello_world"))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"Hello, world!" in r.stdout + r.stderr


def test_hello_c_newlib_runs():
    _kvm_or_skip()
    r = _tv("run", os.path.join(HERMIT, "hello_c"))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert b"shutting down with code 0" in r.stdout + r.stderr


def test_fallback_off_names_the_instruction():
    _kvm_or_skip()
    r = _tv("run", "--fallback", "off", os.path.join(HERMIT, "hello_world"))
    assert r.returncode == 3
    err = r.stderr.decode()
    assert "suberror 1" in err and "xgetbv" in err
    assert "SSE" not in err.split("hint:", 1)[1]


@pytest.mark.parametrize("kernel", ["hello_world", "hello_c"])
def test_record_and_replay_hermit_kernel_verifies(tmp_path, kernel):
    """The recording holds the fallback's events and what the guest saw in CPUID, and every replay of it
    verifies: registers at every exit, memory at every hypercall, final memory and the exit code."""
    _kvm_or_skip()
    out = tmp_path / f"{kernel}.tvt"
    # --host-env: Hermit 0.6.x hello_world faults (#GP in strlen) with fewer than four environment entries
    # (docs/compatibility.md)
    r = _tv("record", "--host-env", os.path.join(HERMIT, kernel), "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    kinds = _tv("stats", str(out)).stdout.decode()
    assert "FALLBACK" in kinds
    if kernel == "hello_world":  # Rust std: lazy FPU (#NM), XSAVE/XRSTOR of task state, SSE bursts
        dump = _tv("dump", str(out), "--kind", "burst", "--kind", "nm", "--kind", "xsave").stdout.decode()
        assert "stop='exit'" in dump and " nm " in dump and " xsave " in dump
    info = _tv("info", str(out)).stdout.decode()
    assert "fallback" in info and "guest sees RDRAND=" in info
    for _ in range(3):  # the XSAVE header once depended on the host's in-use tracking: not any more
        rep = _tv("replay", "-q", str(out))
        text = rep.stdout.decode() + rep.stderr.decode()
        assert rep.returncode == 0, text[-2000:]
        assert "replay verified" in text and "final memory identical" in text, text[-2000:]


@pytest.mark.parametrize("unit, budget", [("blocks", 5), ("instructions", 40)])
def test_bursts_cut_by_a_small_budget_replay_verified(tmp_path, unit, budget):
    """Bursts end at the budget as often as at an instruction KVM must see, and the replay ends them at the
    same places: with the block budget of new recordings, and with the instruction budget of recordings made
    before budgets counted translation blocks (their headers say nothing of the unit: instructions)."""
    _kvm_or_skip()
    from tracevisor import session
    from tracevisor.replay import Replayer
    from tracevisor.trace import open_trace

    out = tmp_path / f"budget-{unit}.tvt"
    env = [f"E{i}=v{i}" for i in range(5)]
    cfg = session.SessionConfig(kernel=os.path.join(HERMIT, "hello_world"), env=env, quiet=True, exact=True,
                                fallback_budget=budget, fallback_budget_unit=unit)
    with session.build_record(cfg, str(out)) as s:
        assert s.run().status == 0
        fb = s.machine.fallback
        assert fb is None or (fb.stats["blocks"] > 0) == (unit == "blocks")
    header = open_trace(out).header
    assert header["fallback"]["budget_unit"] == unit
    if unit == "instructions":
        del header["fallback"]["budget_unit"]  # as the older recordings wrote it
        legacy = session.config_from_header(header)
        assert (legacy.fallback_budget, legacy.fallback_budget_unit) == (budget, "instructions")
    bursts = [e for e in open_trace(out).events() if e["k"] == "burst"]
    if bursts:  # (hosts whose KVM runs SSE natively make none)
        assert any(e["stop"] == "budget" for e in bursts)
        if unit == "instructions":
            assert max(e["count"] for e in bursts) <= budget
    for _ in range(2):
        with Replayer(str(out)) as r:
            res = r.run()
        assert res.verified, res.message


def test_spin_with_interrupts_off_is_a_hang(tmp_path):
    _kvm_or_skip()
    src = tmp_path / "spin.S"
    src.write_text(".globl _start\n_start:\n  cli\n1: jmp 1b\n")
    exe = tmp_path / "spin"
    subprocess.run(["gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x400000", "-o", str(exe), str(src)], check=True)
    r = _tv("run", "--spin-hang", "2", str(exe), timeout=60)
    assert r.returncode == 3
    assert b"interrupts disabled" in r.stderr and b"0x400001" in r.stderr


# -- unit tests, no KVM ----------------------------------------------------------------------------

CPUID_0D = {2: (256, 576)}  # AVX: 256 bytes at offset 576 (as CPUID 0xD.2 reports on x86-64 CPUs)


def _image(bv: int, fill: int) -> bytes:
    img = bytearray([fill]) * 4096
    struct.pack_into("<Q", img, 512, bv)
    img[520:576] = bytes(56)
    return bytes(img)


def test_xsave_writes_selected_components_and_header():
    img = _image(0b111, 0xAB)
    area = bytes(1024)
    out = xstate.xsave(img, area, rfbm=0b011, mxcsr=0x1F80, cpuid_0d=CPUID_0D)
    assert out[0:24] == img[0:24] and out[32:160] == img[32:160]  # x87
    assert out[160:416] == img[160:416]  # XMM
    assert struct.unpack_from("<I", out, 24)[0] == 0x1F80
    assert struct.unpack_from("<Q", out, 512)[0] == 0b011
    assert out[576:832] == bytes(256)  # AVX not requested: untouched


def _init_content(img: bytes) -> bytearray:
    """img with x87 kept, XMM and AVX in their initial configuration (all zeros)."""
    out = bytearray(img)
    out[160:416] = bytes(256)
    out[576:832] = bytes(256)
    return out


def test_xsave_skips_components_in_initial_state():
    img = _init_content(_image(0b001, 0xCD))  # SSE and AVX in their initial configuration
    area = bytearray([0xEE]) * 1024
    area[512:576] = bytes(64)
    out = xstate.xsave(bytes(img), bytes(area), rfbm=0b111, mxcsr=0x1F80, cpuid_0d=CPUID_0D)
    assert struct.unpack_from("<Q", out, 512)[0] == 0b001
    assert out[160:416] == bytes([0xEE]) * 256 and out[576:832] == bytes([0xEE]) * 256  # not written


def test_xsave_header_follows_contents_not_kvms_in_use_bits():
    # The host's in-use tracking may call SSE/AVX in use after they returned to zero, and whether it does
    # varies from run to run: the save area must come out the same either way (a replay compares it).
    content = _init_content(_image(0b001, 0x5A))
    said_in_use = bytearray(content)
    struct.pack_into("<Q", said_in_use, 512, 0b111)
    a = xstate.xsave(bytes(content), bytes(1024), rfbm=0b111, mxcsr=0x1F80, cpuid_0d=CPUID_0D)
    b = xstate.xsave(bytes(said_in_use), bytes(1024), rfbm=0b111, mxcsr=0x1F80, cpuid_0d=CPUID_0D)
    assert a == b and struct.unpack_from("<Q", a, 512)[0] == 0b001
    # a non-default MXCSR keeps SSE in use; x87 back at FCW 0x37F and zeros is initial too
    c = xstate.xsave(bytes(content), bytes(1024), rfbm=0b111, mxcsr=0x1FC0, cpuid_0d=CPUID_0D)
    assert struct.unpack_from("<Q", c, 512)[0] == 0b011
    x87_init = bytearray(content)
    x87_init[0:24] = bytes(24)
    x87_init[32:160] = bytes(128)
    struct.pack_into("<H", x87_init, 0, 0x37F)
    d = xstate.xsave(bytes(x87_init), bytes(1024), rfbm=0b111, mxcsr=0x1F80, cpuid_0d=CPUID_0D)
    assert struct.unpack_from("<Q", d, 512)[0] == 0


def test_xrstor_loads_or_initialises():
    img = _image(0b111, 0x11)
    area = bytearray(_image(0b101, 0x22)[:1024])
    struct.pack_into("<I", area, 24, 0x1F80)
    new = xstate.xrstor(img, bytes(area), rfbm=0b111, cpuid_0d=CPUID_0D)
    assert new[32:160] == bytes(area[32:160])  # x87 loaded
    assert new[160:416] == bytes(256)  # SSE bit clear in the area: initial state
    assert new[576:832] == bytes(area[576:832])  # AVX loaded
    assert struct.unpack_from("<Q", new, 512)[0] == 0b101
    assert struct.unpack_from("<I", new, 24)[0] == 0x1F80


def test_xrstor_faults_like_the_cpu():
    img = _image(0b11, 0)
    area = bytearray(1024)
    struct.pack_into("<QQ", area, 512, 0b11, 1 << 63)  # compacted form
    with pytest.raises(xstate.XstateFault):
        xstate.xrstor(img, bytes(area), 0b11, CPUID_0D)
    area = bytearray(1024)
    struct.pack_into("<I", area, 24, 0xFFFF_0000)  # MXCSR reserved bits
    with pytest.raises(xstate.XstateFault):
        xstate.xrstor(img, bytes(area), 0b11, CPUID_0D)


@pytest.mark.parametrize("code, why", [
    (b"\x0f\x01\xd0", "xsave"),  # xgetbv
    (b"\xfa", "system"),  # cli
    (b"\xe6\x80", "io"),  # out 0x80, al
    (b"\xf0\x48\x0f\xb1\x0f", "atomic"),  # lock cmpxchg [rdi], rcx
    (b"\x48\x87\x07", "atomic"),  # xchg [rdi], rax
    (b"\x0f\x31", "nondeterministic"),  # rdtsc
    (b"\x0f\x22\xd8", "system"),  # mov cr3, rax
    (b"\xc5\xf8\x77", "avx"),  # vzeroupper
    (b"\x0f\x57\xc0", None),  # xorps xmm0, xmm0: the emulator runs it
    (b"\x48\x89\xc8", None),  # mov rax, rcx
])
def test_codescan_classifies(code, why):
    scan = codescan.sweep([(0x1000, code)])
    if why is None:
        assert scan.exits == []
    else:
        assert scan.exits == [0x1000] and scan.kinds == {why: 1}


def test_codescan_keeps_atomics_apart_for_one_runner():
    code = b"\xf0\x48\x0f\xb1\x0f" + b"\xfa" + b"\x48\x87\x07"  # lock cmpxchg; cli; xchg [rdi], rax
    scan = codescan.sweep([(0x1000, code)])
    assert scan.exit_set() == [0x1000, 0x1005, 0x1006]
    assert scan.atomic == [0x1000, 0x1006]
    # one vCPU at a time: a burst runs through locked instructions, still stops at cli
    assert scan.exit_set(atomics=False) == [0x1005]
    assert scan.digest(atomics=False) != scan.digest()


# -- rusty_demo: threads, floating point (π, matrices, Laplace) through the fallback ----------------------

SLEEP_LINE = re.compile(r"Measured time for 100ms sleep: ([0-9.]+)ms")


@pytest.fixture(scope="module", params=[1, 2], ids=["c1", "c2"])
def rusty_demo(request):
    """One run of rusty_demo per vCPU count, shared by the assertions below (each run takes ~30 s here)."""
    _kvm_or_skip()
    r = _tv("run", "-c", str(request.param), os.path.join(HERMIT, "rusty_demo"), timeout=300)
    return r, (r.stdout + r.stderr).decode("utf-8", "replace")


def _sleep_check_failed(out: str) -> None:
    """rusty_demo checks that a 100 ms sleep takes at most 105 ms of wall-clock time and panics otherwise.
    The code after the wake-up runs in the instruction fallback, so on a loaded host the sleep can measure a
    few ms more: that outcome (and only that one) is an expected failure, reported with the measurement."""
    m = SLEEP_LINE.search(out)
    if m and float(m.group(1)) > 105 and "panicked" in out[m.end():]:
        pytest.xfail(f"the guest's own wall-clock check: its 100 ms sleep measured {m.group(1)} ms (> 105 ms) "
                     "on this host")


def test_rusty_demo_exits_0(rusty_demo):
    r, out = rusty_demo
    _sleep_check_failed(out)
    assert r.returncode == 0, out[-3000:]
    assert "shutting down with code 0" in out


def test_rusty_demo_prints_its_sections(rusty_demo):
    _r, out = rusty_demo
    _sleep_check_failed(out)
    for line in ("Hello, Hermit!", "Hello, world!", "Measured time for 100ms sleep", "Calculating Pi (Sequential)",
                 "Calculating Pi (Parallel)", "256x256 matrix", "Laplace iterations", "1000 iterations"):
        assert line in out, f"{line!r} missing:\n{out[-3000:]}"
    assert "panicked" not in out


@pytest.mark.parametrize("cpus", [1, 2])
def test_rusty_demo_records_and_replays_verified(tmp_path, cpus):
    """rusty_demo in exact mode — the TSC, the LAPIC timer, the fallback's bursts and, with two vCPUs, work
    stealing between them — replays verified: registers at every exit, memory (hashes with one vCPU, the
    memory each slice wrote with two), the final memory and the exit code.  Whatever the guest printed (its
    own 105 ms sleep check may fail on a loaded host), the replay must reproduce it."""
    _kvm_or_skip()
    out = tmp_path / f"rusty_c{cpus}.tvt"
    env = [a for i in range(5) for a in ("--env", f"E{i}=v{i}")]
    r = _tv("record", "-q", "-c", str(cpus), *env, os.path.join(HERMIT, "rusty_demo"), "-o", str(out), timeout=400)
    assert r.returncode in (0, 1), r.stderr.decode()[-3000:]  # 1: the guest's own check panicked
    rep = _tv("replay", "-q", str(out), timeout=400)
    text = rep.stdout.decode() + rep.stderr.decode()
    assert rep.returncode == 0, text[-3000:]
    assert "replay verified" in text and "final memory identical" in text, text[-3000:]
    if cpus == 2:
        assert "memory written in each slice compared at" in text, text[-3000:]
