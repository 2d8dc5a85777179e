"""Replay: re-execution from traces, divergence detection, the offline walk and the callbacks API."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_guests import FILES_OUT

from helpers import run_cli
from tracevisor import replay, session
from tracevisor.errors import TracevisorError
from tracevisor.trace import TraceWriter, open_trace

pytestmark = pytest.mark.kvm

CASES = {
    "hello": ({}, []),
    "hello-pie": ({}, []),
    "plain": ({}, []),
    "args": ({}, ["a", "b c"]),
    "exitcode": ({}, ["7"]),
    "compute": ({}, ["300"]),
    "smp": ({"cpus": 2}, []),
}


def record(tmp_path, guests, name, opts=None, args=(), out=None):
    """Record with the Python API; returns (trace, StopInfo)."""
    out = out or tmp_path / f"{name}.tvt"
    return out, session.record(guests[name], out, args=args, env=["K=V"], **(opts or {}))


def console_out(trace) -> bytes:
    """What the recording printed on stdout (UART and fd 1 share it)."""
    return b"".join(e["data"] for e in open_trace(trace).events(kinds=["console"]) if e["stream"] != "stderr")


def snapshot(d):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(d.iterdir())}


@pytest.mark.parametrize("name", sorted(CASES))
def test_examples_replay_cleanly_twice(tmp_path, guests, name):
    opts, args = CASES[name]
    trace, rec = record(tmp_path, guests, name, opts, args)
    assert rec.status in (0, 7), rec.message
    outs = []
    for _ in range(2):
        r = run_cli("replay", str(trace))
        assert r.returncode == 0, r.stderr  # verified: 0 whatever the guest's exit code (it is in the message)
        assert b"replay verified" in r.stderr and b"identical to the recording" in r.stderr
        assert r.stdout == console_out(trace)
        outs.append((r.stdout, r.stderr.split(b"replay verified")[1]))
    assert outs[0] == outs[1]


def test_files_replay_touches_no_host_file(tmp_path, guests):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "keep.txt").write_text("untouched")
    trace, rec = record(tmp_path, guests, "files", {"mounts": [str(mnt)]})
    assert rec.status == 0 and console_out(trace).decode() == FILES_OUT
    # the guest deleted data.txt itself; also delete everything else it could have touched
    before = snapshot(mnt)
    r = run_cli("replay", str(trace))
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == FILES_OUT
    assert snapshot(mnt) == before  # nothing created, modified or deleted
    shutil.rmtree(mnt)
    r = run_cli("replay", "--quiet", "--report", str(tmp_path / "rep.json"), str(trace))
    assert r.returncode == 0 and r.stdout == b"" and not mnt.exists()
    rep = json.loads((tmp_path / "rep.json").read_text())
    assert rep["verified"] and rep["code"] == 0 and rep["matched"] > 50


def test_tampered_kernel_refused_then_diverges_with_force(tmp_path, guests):
    trace, rec = record(tmp_path, guests, "hello")
    from elftools.elf.elffile import ELFFile

    k = tmp_path / "hello-tampered"
    raw = bytearray(guests["hello"].read_bytes())
    with open(guests["hello"], "rb") as f:
        ro = ELFFile(f).get_section_by_name(".rodata")
        off = ro["sh_offset"] + bytes(ro.data()).index(b"Hello from")
    raw[off] ^= 0x20  # "Hello" → "hello": the first WRITE payload differs
    k.write_bytes(raw)
    r = run_cli("replay", "--kernel", str(k), str(trace))
    assert r.returncode == 1 and b"differs from the recorded one" in r.stderr and b"--force" in r.stderr
    r = run_cli("replay", "--kernel", str(k), "--force", "--report", str(tmp_path / "d.json"), str(trace))
    assert r.returncode == 4, r.stderr
    err = r.stderr.decode()
    # memory is not compared with a forced other image (it differs by construction): registers and I/O are
    assert "replay diverged on vCPU 0: hypercall write" in err and "payload" in err, err
    assert "Traceback" not in err and "rip=" in err and "last matching events" in err
    rep = json.loads((tmp_path / "d.json").read_text())
    assert rep["reason"] == "diverged" and rep["report"]["expected"]["payload"] != rep["report"]["actual"]["payload"]
    assert rep["checks"]["memory"].startswith("not compared")


def rewrite(src, dst, change):
    """Copy a trace event by event through the writer, letting ``change(ev)`` edit rich events."""
    r = open_trace(src)
    stop = None
    with TraceWriter(dst, {k: v for k, v in r.header.items() if k != "format"}) as w:
        for ev in r.events():
            ev = dict(ev)
            kind, cpu, t = ev.pop("k"), ev.pop("cpu"), ev.pop("t")
            ev.pop("seq")
            if kind == "exit":
                w.exit(cpu, t, ev["reason"], ev["rip"], ev["port"], ev["dir"], ev["size"], ev["value"], ev["digest"] or 0)
            elif kind == "stop":
                stop = dict(ev, t=t, cpu=cpu)
            else:
                change(kind, ev)
                w.event(kind, cpu, t, **ev)
        w.close(stop=stop)


def test_edited_read_result_is_a_divergence(tmp_path, guests):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace, rec = record(tmp_path, guests, "files", {"mounts": [str(mnt)]})
    done = []

    def change(kind, ev):
        if kind == "hostio" and ev["op"] == "read" and ev["ret"] == 81 and not done:
            ev["data"] = b"X" + ev["data"][1:]
            done.append(1)

    edited = tmp_path / "edited.tvt"
    rewrite(trace, edited, change)
    assert done
    assert run_cli("replay", str(trace)).returncode == 0  # the copy machinery itself is faithful
    r = run_cli("replay", "-q", str(edited))
    err = r.stderr.decode()
    assert r.returncode == 4 and "Traceback" not in err
    # the guest now prints a longer "compare = …" line: its next WRITE asks the host for other bytes
    # the READ puts other bytes in guest memory: the memory hash right after that hypercall differs, before
    # the guest acts on them (it would next print a longer "compare = …" line)
    assert "replay diverged on vCPU 0" in err and "guest memory differs from the recording" in err, err
    assert "at recorded event #" in err


def test_offline_walk_rebuilds_file_table_and_console(tmp_path, guests):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace, _ = record(tmp_path, guests, "files", {"mounts": [str(mnt)]})
    w = replay.open(trace)
    seen_tables = []
    for ev in w.events(kinds=["hypercall"]):
        if ev["call"] in ("read", "write") and ev["args"]["fd"] in w.files:
            f = w.files[ev["args"]["fd"]]
            seen_tables.append((ev["call"], f.path, f.offset))
    assert seen_tables[:3] == [("write", "data.txt", 45), ("write", "data.txt", 81), ("read", "data.txt", 81)]
    assert w.files == {}  # all closed at the end
    assert w.console_text == FILES_OUT
    assert w.bytes_written == {"data.txt": 81} and w.bytes_read == {"data.txt": 81 + 5 + 81}
    assert w.file_stats["data.txt"].opens == 2 and w.file_stats["data.txt"].unlinked
    # filters
    assert all(e["k"] == "exit" and e["cpu"] == 0 for e in w.events(kinds=["exit"], cpu=0))
    assert [e["seq"] for e in w.events(start=10, stop=13)] == [10, 11, 12]


def test_callbacks_see_every_hypercall_with_registers(tmp_path, guests):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace, _ = record(tmp_path, guests, "files", {"mounts": [str(mnt)]})
    recorded = [e["seq"] for e in open_trace(trace).events(kinds=["hypercall"])]
    seen = []

    def on_hc(ev):
        regs = ev.regs
        assert regs["rip"] > 0x400000
        blk = ev.memory.read(ev["addr"], len(ev["block"]))
        if ev["call"] != "exit":
            assert len(blk) == len(ev["block"])
        seen.append((ev.seq, ev["call"]))

    with replay.Replayer(trace) as r:
        res = r.on("hypercall", on_hc).run()
    assert res.verified and [s for s, _ in seen] == recorded
    assert seen[-1][1] == "exit"


def test_run_to_pauses_for_inspection_then_continues(tmp_path, guests):
    trace, _ = record(tmp_path, guests, "hello")
    hc = [e for e in open_trace(trace).events(kinds=["hypercall"]) if e["call"] == "write"][0]
    with replay.Replayer(trace) as r:
        res = r.run_to(hc["seq"])
        # paused once the exit is handled: after the hypercall and the memory hash that follows it
        assert res.reason == "paused" and r.position == hc["seq"] + 1
        buf = hc["args"]["buf"]
        assert r.memory.read(buf, 22) == b"Hello from tracevisor!"
        assert "Hello from" in r.memory.dump(buf, 32)
        assert r.registers()["rip"] > 0
        res = r.run()
        assert res.verified and res.code == 0


def test_callback_can_stop(tmp_path, guests):
    trace, _ = record(tmp_path, guests, "compute", args=["100"])
    with replay.Replayer(trace) as r:
        n = []
        r.on("exit", lambda ev: (n.append(ev.seq), ev.stop() if len(n) == 10 else None))
        res = r.run()
    assert res.reason == "stopped" and len(n) == 10 and res.matched >= 10


def test_missing_kernel_and_bad_trace_are_clear(tmp_path, guests):
    k = tmp_path / "k"
    shutil.copy(guests["hello"], k)
    trace, _ = record(tmp_path, {"hello": k}, "hello")
    os.unlink(k)
    r = run_cli("replay", str(trace))
    assert r.returncode == 1 and b"is not there; pass --kernel" in r.stderr
    assert run_cli("replay", "--kernel", str(guests["hello"]), str(trace)).returncode == 0
    bad = tmp_path / "bad.tvt"
    bad.write_text("nope")
    r = run_cli("replay", str(bad))
    assert r.returncode == 1 and b"not a tracevisor trace" in r.stderr and b"Traceback" not in r.stderr
    with pytest.raises(TracevisorError):
        replay.Replayer(bad)


def _first(op, field, value):
    done = []

    def change(kind, ev):
        if kind == "hostio" and ev["op"] == op and not done:
            ev[field] = value
            done.append(1)
    return change


@pytest.mark.parametrize("op, field, value, message", [
    ("open", "ret", 1 << 40, "result 1099511627776 is not an integer in [-2147483648, 2147483647]"),
    ("open", "ret", "3", "result '3' is not an integer"),
    ("lseek", "ret", 1 << 63, "result 9223372036854775808 is not an integer in [-9223372036854775808"),
    ("read", "ret", 200, "200 bytes read with 81 bytes of data for a read of 128"),
    ("read", "data", "text", "data is str, not bytes"),
    ("cmdline", "ret", [["files"], []], "the command line is not two lists of byte strings"),
    ("cmdline", "ret", None, "the command line is not two lists of byte strings"),
    ("boot_time", "ret", "soon", "result 'soon' is not an integer"),
    ("cpu_freq", "ret", -5, "result -5 is not an integer in [0, 4294967295]"),
])
def test_malformed_recorded_answers_are_divergences_not_tracebacks(tmp_path, guests, op, field, value, message):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace, rec = record(tmp_path, guests, "files", {"mounts": [str(mnt)]})
    assert rec.status == 0
    crafted = tmp_path / "crafted.tvt"
    rewrite(trace, crafted, _first(op, field, value))
    r = run_cli("replay", "-q", str(crafted))
    err = r.stderr.decode()
    assert r.returncode == 4 and "Traceback" not in err and "internal error" not in err, err
    assert f"the recorded answer to {op} is malformed: {message}" in err, err


def test_a_trace_with_a_header_and_no_events_is_reported(tmp_path, guests):
    trace, _ = record(tmp_path, guests, "hello")
    header = {k: v for k, v in open_trace(trace).header.items() if k != "format"}
    empty = tmp_path / "empty.tvt"
    TraceWriter(empty, header).close()
    r = run_cli("replay", str(empty))
    err = r.stderr.decode()
    assert r.returncode == 6 and "Traceback" not in err, err
    assert "nothing to check: it holds no events" in err and err.count("\n") < 40, err


@pytest.mark.parametrize("kind, field, value, message", [
    # found by fuzzing: a malformed vCPU start event killed the vCPU thread before its error handling, and
    # the replay waited for it forever
    ("vcpu", "state", ["open"], "vcpu #3 differs in state"),
    ("hostio", "args", 3.5, "host request differs: recorded boot_time(3.5), replay asks boot_time()"),
])
def test_crafted_events_end_in_a_report_not_a_hang(tmp_path, guests, kind, field, value, message):
    trace, _ = record(tmp_path, guests, "hello")
    crafted = tmp_path / "crafted.tvt"
    done = []

    def change(k, ev):
        if k == kind and not done:
            ev[field] = value
            done.append(1)
    rewrite(trace, crafted, change)
    r = run_cli("replay", "-q", str(crafted), timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 4 and "Traceback" not in err, err
    assert message in err, err


def test_offline_walk_tolerates_crafted_events(tmp_path):
    w = TraceWriter(tmp_path / "c.tvt", {"argv": ["c"], "cpus": 1})
    w.event("hostio", 0, 1, op="open", args=[b"a.txt", 0, 0], ret=3)
    w.event("hostio", 0, 2, op="read", args=[[3], 10], ret=5)  # an fd that is a list
    w.event("hostio", 0, 3, op=["read"], args=[3, 10], ret=5)  # an op that is a list
    w.event("hostio", 0, 4, op="open", args=[7, 0, 0], ret=4)  # a path that is an int
    w.event("hostio", 0, 5, op="write", args=[3, 4], ret=True)  # a bool result
    w.event("console", 0, 6, stream={"a": 1}, data=b"x")
    w.event("console", 0, 7, stream="stdout", data=[1, 2])
    w.event("hostio", 0, 8, op="read", args=[3, 10], ret=5)
    w.close()
    walk = replay.open(tmp_path / "c.tvt").run_to_end()
    assert walk.bytes_read == {"a.txt": 5} and walk.bytes_written == {"a.txt": 0}
    assert walk.console_text == "" and list(walk.files) == [3]


def test_report_to_a_missing_directory_is_refused_before_the_replay(tmp_path):
    sample = Path(__file__).resolve().parents[1] / "traces" / "hello.tvt"
    r = run_cli("replay", "--report", str(tmp_path / "missing" / "r.json"), str(sample))
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err and "verified" not in err, err
    assert err.count("\n") == 1 and "does not exist" in err and "--report" in err, err
