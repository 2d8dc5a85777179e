"""analysis on traces recorded now, from the example guests under KVM: the frames count what the guests did,
`tracevisor stats` agrees with the frames, and `tracevisor diff` finds two recordings of the same run equal
and two runs with different arguments different at the command line."""

from __future__ import annotations

import json

import pytest
from test_guests import FILES_OUT

from helpers import run_cli
from tracevisor import analysis, session

pytestmark = pytest.mark.kvm


def record(tmp_path, guests, name, *args, mounts=(), out=None):
    out = out or tmp_path / f"{name}.tvt"
    stop = session.record(guests[name], out, args=args, mounts=mounts)
    assert stop.status == 0, stop.message
    return out, stop


def test_files_guest_frames(tmp_path, guests):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    path, _ = record(tmp_path, guests, "files", mounts=[str(mnt)])
    tr = analysis.load(path)
    assert tr.complete and not tr.warnings
    f = tr.files
    assert list(f.path) == ["data.txt", "data.txt"]  # the third open fails: the file was unlinked
    first, second = f.iloc[0], f.iloc[1]
    # 45 + 36 bytes written; read 81 back, then the last 5; three seeks
    assert (first.bytes_written, first.writes, first.bytes_read, first.reads, first.seeks) == (81, 2, 86, 2, 3)
    # reopened read-only: 32 + 32 + 17 + 0
    assert (second.bytes_written, second.bytes_read, second.reads, second.seeks) == (0, 81, 4, 0)
    assert first.closed_seq < second.opened_seq
    hc = tr.hypercalls
    counts = hc.groupby("call", observed=True).size().to_dict()
    assert {k: counts[k] for k in ("open", "close", "lseek", "unlink", "read")} == \
        {"open": 3, "close": 3, "lseek": 3, "unlink": 2, "read": 7}
    assert len(tr.exits) == len(hc)  # every exit of this guest is a hypercall
    # what the guest printed is the console frame, and the bytes of its stdout writes
    assert tr.console_text == FILES_OUT
    stdout_writes = hc[(hc.call == "write") & (hc.fd == 1)]
    assert int(stdout_writes.bytes_out.sum()) == len(FILES_OUT.encode())


def test_stats_agree_with_the_frames(tmp_path, guests):
    n = 700
    path, r = record(tmp_path, guests, "compute", str(n))
    tr = analysis.load(path)
    uart = tr.exits[tr.exits.port == 0x800]
    assert len(uart) == n + n // 64 + (n % 64 != 0)  # a '.' per round, a '\n' per 64 and a last one
    assert set(uart.value) == {ord("."), ord("\n")}
    st = analysis.stats(tr)
    assert st.totals["exits"] == len(tr.exits) == int(st.exits["count"].sum())
    assert st.totals["exit_time_ns"] == int(tr.exits.duration_ns.sum())
    p = run_cli("stats", "--json", str(path))
    assert p.returncode == 0, p.stderr
    js = json.loads(p.stdout)
    assert js["totals"] == st.totals
    io = {row["ioport"]: row["count"] for row in js["ports"]}
    assert io["0x800 out (uart)"] == len(uart)
    table = run_cli("stats", str(path)).stdout.decode()
    assert f"Total Samples:{len(tr.exits)}," in table


def test_diff_of_two_recordings(tmp_path, guests):
    a, _ = record(tmp_path, guests, "compute", "300", out=tmp_path / "a.tvt")
    b, _ = record(tmp_path, guests, "compute", "300", out=tmp_path / "b.tvt")
    c, _ = record(tmp_path, guests, "compute", "301", out=tmp_path / "c.tvt")
    same = run_cli("diff", str(a), str(b))
    assert same.returncode == 0 and b"no difference" in same.stdout, same.stdout + same.stderr
    other = run_cli("diff", str(a), str(c))
    assert other.returncode == 1
    assert b"first difference at vCPU 0 event #4: a.tvt seq 5 (hostio), c.tvt seq 5 (hostio)" in other.stdout
    d = analysis.diff(a, c)
    assert not d.identical and d.first["kind_a"] == "hostio"
    changed = d.fields[d.fields.differs]
    assert list(changed.field) == ["ret"]
    assert int(d.exits.set_index("reason").loc["IO", "count_diff"]) == 1  # one more '.' for round 301
