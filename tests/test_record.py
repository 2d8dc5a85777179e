"""Recording real guests: the trace holds exactly what the guest did and what the host answered."""

from __future__ import annotations

import os
import signal
import struct
import time

import pytest

from helpers import run_cli, spawn_cli
from tracevisor.trace import open_trace

pytestmark = pytest.mark.kvm


def rec(tmp_path, guests, name, *args, opts=()):
    out = tmp_path / f"{name}.tvt"
    # KERNEL -o FILE ARGS… (the documented order) must work
    r = run_cli("record", "--no-host-env", *opts, str(guests[name]), "-o", str(out), *args)
    return out, r


def hypercalls(path):
    return [e for e in open_trace(path).events(kinds=["hypercall"])]


def test_hello_trace_contents(tmp_path, guests):
    out, r = rec(tmp_path, guests, "hello")
    assert r.returncode == 0 and r.stdout == b"Hello from tracevisor!\n"
    assert b"tracevisor: recorded " in r.stderr and b"B/exit" in r.stderr
    hcs = hypercalls(out)
    assert [h["call"] for h in hcs] == ["cmdsize", "cmdval", "write", "exit"]
    w = hcs[2]
    assert w["args"]["fd"] == 1 and w["args"]["len"] == 23 and w["payload"] == b"Hello from tracevisor!\n"
    assert w["ret"] == 23 and w["t_end"] >= w["t"] and len(w["block"]) == 20
    assert struct.unpack_from("<iQQ", w["block"]) == (1, w["args"]["buf"], 23)
    assert hcs[3]["args"] == {"arg": 0}
    reader = open_trace(out)
    h = reader.header
    assert h["kernel"]["sha256"] and h["memory"] == 64 << 20 and h["cpus"] == 1
    assert h["argv"] == [str(guests["hello"])] and h["env"] == [] and h["cpuid"]
    assert reader.complete and reader.footer["stop"]["code"] == 0
    ops = [e["op"] for e in reader.events(kinds=["hostio"])]
    assert ops == ["boot_time", "cpu_freq", "cmdline", "cmdline", "write"]
    cons = [e for e in reader.events(kinds=["console"])]
    assert [(c["stream"], c["data"]) for c in cons] == [("stdout", b"Hello from tracevisor!\n")]


def test_files_trace_has_written_and_read_bytes(tmp_path, guests):
    mnt = tmp_path / "m"
    mnt.mkdir()
    out, r = rec(tmp_path, guests, "files", opts=("--mount", str(mnt)))
    assert r.returncode == 0
    hcs = hypercalls(out)
    writes3 = [h["payload"] for h in hcs if h["call"] == "write" and h["args"]["fd"] == 3]
    assert writes3 == [b"The quick brown fox jumps over the lazy dog.\n", b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    opens = [(h["payload"], h["args"]["flags"], h["ret"]) for h in hcs if h["call"] == "open"]
    assert opens == [(b"data.txt", 0o1102, 3), (b"data.txt", 0, 3), (b"data.txt", 0, -1)]
    reads = [(e["args"], e["ret"], e.get("data", b"")) for e in open_trace(out).events(kinds=["hostio"])
             if e["op"] == "read"]
    content = writes3[0] + writes3[1]
    assert reads[0] == ([3, 128], 81, content)
    assert reads[1] == ([3, 5], 5, b"VWXYZ")
    assert b"".join(d for _, _, d in reads[2:]) == content and reads[-1][0][0] == 77 and reads[-1][1:] == (-1, b"")
    lseeks = [(h["args"]["offset"], h["args"]["whence"], h["ret"]) for h in hcs if h["call"] == "lseek"]
    assert lseeks == [(0, 0, 0), (0, 2, 81), (-5, 1, 76)]
    unlinks = [(h["payload"], h["ret"]) for h in hcs if h["call"] == "unlink"]
    assert unlinks == [(b"data.txt", 0), (b"data.txt", -1)]


def test_exit_count_and_dense_sequence(tmp_path, guests):
    n = 130
    out, r = rec(tmp_path, guests, "compute", str(n))
    assert r.returncode == 0
    reader = open_trace(out)
    events = list(reader.events())
    assert [e["seq"] for e in events] == list(range(len(events)))
    exits = [e for e in events if e["k"] == "exit"]
    uart = n + n // 64 + (1 if n % 64 else 0)
    assert len(exits) == uart + 4 == reader.footer["exits"]  # + cmdsize, cmdval, write, exit
    assert sum(1 for e in exits if e["port"] == 0x800) == uart
    assert all(e["reason"] == 2 and e["dir"] == 1 and e["rip"] > 0x400000 for e in exits)
    ts = [e["t"] for e in exits]
    assert ts == sorted(ts)
    text = b"".join(e["data"] for e in events if e["k"] == "console" and e["stream"] == "uart")
    assert text == bytes(e["value"] for e in exits if e["port"] == 0x800)
    # the same count the run loop itself saw
    from tracevisor import session

    seen = []

    class Sink:  # a trace sink that keeps only the exits
        def exit(self, *row):
            seen.append(row)

        def event(self, kind, cpu, t, **fields):
            return -1

    with session.build_run(session.SessionConfig(kernel=str(guests["compute"]), args=[str(n)], quiet=True)) as s:
        s.sink = Sink()
        info = s.run()
    assert info.code == 0 and len(seen) == len(exits)


def test_record_killed_leaves_readable_trace(tmp_path, guests):
    out = tmp_path / "killed.tvt"
    with spawn_cli("record", "-q", "-o", str(out), str(guests["compute"]), "1000000") as p:
        partial = tmp_path / f"killed.tvt.{p.pid}.partial"  # the recording's name until it ends
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not partial.exists() or partial.stat().st_size < 300_000):
            time.sleep(0.1)
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert not out.exists()  # the final name only ever holds a finished trace
    reader = open_trace(partial)
    assert not reader.complete and reader.footer is None
    assert any("recovered" in w or "footer" in w for w in reader.warnings), reader.warnings
    seqs = [e["seq"] for e in reader.events()]
    assert len(seqs) > 4096 and seqs == list(range(len(seqs)))


@pytest.mark.parametrize("sig,status,reason", [(signal.SIGTERM, 143, "terminated"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_signal_finishes_chunk_and_footer(tmp_path, guests, sig, status, reason):
    out = tmp_path / "term.tvt"
    with spawn_cli("record", "-q", "-o", str(out), str(guests["compute"]), "1000000") as p:
        time.sleep(2.0)
        p.send_signal(sig)
        _, err = p.communicate(timeout=30)
    assert p.returncode == status and b"Traceback" not in err
    reader = open_trace(out)
    assert reader.complete and reader.footer["stop"]["reason"] == reason
    assert reader.footer["events"] == len(list(reader.events()))


def test_corrupt_chunk_in_real_recording(tmp_path, guests):
    out, r = rec(tmp_path, guests, "compute", "20000")
    reader = open_trace(out)
    idx = reader.footer["chunks"]
    assert len(idx) >= 3
    off = idx[1][0]
    raw = bytearray(out.read_bytes())
    raw[off + 12 + 100] ^= 0xFF  # inside chunk 1's payload
    bad = tmp_path / "bad.tvt"
    bad.write_bytes(raw)
    r2 = open_trace(bad)
    seqs = [e["seq"] for e in r2.events()]
    assert any("chunk 1" in w and "corrupt" in w for w in r2.warnings), r2.warnings
    assert seqs[:idx[1][1]] == list(range(idx[1][1]))  # chunk 0 intact
    assert idx[2][1] in seqs  # later chunks still read
    c = run_cli("info", str(bad))
    assert c.returncode == 0 and b"warning" in c.stderr


def test_zstd_recording(tmp_path, guests):
    out, r = rec(tmp_path, guests, "compute", "2000", opts=("--compress", "zstd"))
    assert r.returncode == 0
    plain, _ = rec(tmp_path, {"compute2": guests["compute"]}, "compute2", "2000")
    assert os.path.getsize(out) < os.path.getsize(plain) / 2
    assert len([e for e in open_trace(out).events(kinds=["exit"])]) == len(
        [e for e in open_trace(plain).events(kinds=["exit"])])


def test_cli_reads_bad_files_clearly(tmp_path):
    p = tmp_path / "x.tvt"
    p.write_bytes(b"garbage" * 10)
    for cmd in ("info", "dump"):
        r = run_cli(cmd, str(p))
        assert r.returncode == 1 and r.stderr.decode().count("\n") == 1 and b"not a tracevisor trace" in r.stderr


def test_dump_is_strace_like(tmp_path, guests):
    out, _ = rec(tmp_path, guests, "hello")
    r = run_cli("dump", str(out), "--kind", "hypercall")
    lines = r.stdout.decode().splitlines()
    assert any('write(1, "Hello from tracevisor!\\n", 23) = 23' in ln for ln in lines), lines
    assert any("exit(0)" in ln for ln in lines)
    r = run_cli("dump", str(out), "--limit", "3")
    assert len(r.stdout.splitlines()) == 3


def test_output_that_is_the_kernel_is_refused(tmp_path, guests):
    k = tmp_path / "hello"
    k.write_bytes(guests["hello"].read_bytes())
    before = k.read_bytes()
    r = run_cli("record", "-o", str(k), str(k))
    assert r.returncode == 1 and b"is the kernel itself" in r.stderr and b"Traceback" not in r.stderr
    r = run_cli("record", str(k), "-o", str(tmp_path / "." / "hello"))  # another spelling of the same file
    assert r.returncode == 1 and b"is the kernel itself" in r.stderr
    assert k.read_bytes() == before


def test_two_recorders_to_one_output_never_mix(tmp_path, guests):
    """Each recorder writes its own partial file and renames it whole: the result is one run, consistent."""
    out = tmp_path / "same.tvt"
    with spawn_cli("record", "-q", "--no-host-env", "-o", str(out), str(guests["compute"]), "3000") as a, \
            spawn_cli("record", "-q", "--no-host-env", "-o", str(out), str(guests["compute"]), "2000") as b:
        _, ea = a.communicate(timeout=120)
        _, eb = b.communicate(timeout=120)
    assert a.returncode == 0 and b.returncode == 0, (ea, eb)
    reader = open_trace(out)
    assert reader.complete and reader.warnings == []
    n = reader.header["argv"][1]
    assert reader.footer["events"] == len(list(reader.events()))
    r = run_cli("replay", "-q", str(out))
    assert r.returncode == 0 and b"replay verified" in r.stderr, (n, r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.tvt"]  # no partial file left behind


def test_max_trace_size_crossed_by_the_last_chunk_is_trace_full(tmp_path, guests):
    """hello fits in one chunk: with a 4K limit its only chunk does not fit; the run must say so."""
    out = tmp_path / "small.tvt"
    r = run_cli("record", "-q", "--no-host-env", "--max-trace-size", "4K", "-o", str(out), str(guests["hello"]))
    err = r.stderr.decode()
    assert r.returncode == 1 and "Traceback" not in err, err
    assert "the trace reached --max-trace-size (4K)" in err and "exited with code 0" in err, err
    reader = open_trace(out)
    assert reader.complete and reader.footer["stop"]["reason"] == "trace-full"
    assert reader.footer["dropped"] > 0 and out.stat().st_size <= 4096 + 1024
    assert reader.footer["events"] > 1  # what fits is stored, not just the stop event


def test_max_trace_size_is_filled_not_checked_per_chunk(tmp_path, guests):
    out = tmp_path / "c.tvt"
    r = run_cli("record", "-q", "--no-host-env", "--max-trace-size", "64K", "-o", str(out),
                str(guests["compute"]), "100000")
    assert r.returncode == 1 and b"--max-trace-size (64K)" in r.stderr, r.stderr
    reader = open_trace(out)
    assert reader.footer["stop"]["reason"] == "trace-full"
    assert reader.footer["bytes"] <= 64 * 1024 + 2048  # only the stop event's chunk may pass the limit
    assert reader.footer["events"] > 1500  # ~27 B per exit: most of 64K holds events
