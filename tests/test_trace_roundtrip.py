"""Trace writer → reader round trips (no KVM needed)."""

from __future__ import annotations

import os
import threading

import pytest

from tracevisor.errors import TraceError, TracevisorError
from tracevisor.trace import EXIT_DTYPE_FIELDS, FORMAT_VERSION, TraceWriter, open_trace, schema
from tracevisor.trace import writer as writer_module

HEADER = {
    "kernel": {"path": "/guests/hello", "sha256": "ab" * 32, "size": 12345},
    "memory": 64 << 20,
    "cpus": 1,
    "argv": ["/guests/hello", "--flag"],
    "env": ["A=1", "B=two"],
    "mounts": [{"host": "/tmp/x", "guest": "/data", "mode": "rw"}],
    "cpuid": [[0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69]],
    "host": {"uname": "Linux test", "kvm_api": 12, "python": "3.11.7"},
    "determinism": {"notes": ["TSC reads are not recorded"]},
    "options": {"verbose": False},
}


def exit_map(seq, cpu, t, reason, rip, port=0, d=0, size=0, value=0):
    return {"k": "exit", "seq": seq, "cpu": cpu, "t": t, "reason": reason, "rip": rip, "port": port, "dir": d,
            "size": size, "value": value, "digest": 0}


def synthetic_run(path, *, compress=None, n_exits=20_000, chunk_events=1000, chunk_bytes=64 * 1024, cpus=1):
    """Write a plausible run; return (expected events in seq order, close() summary)."""
    expected = []
    w = TraceWriter(path, HEADER, compress=compress, chunk_events=chunk_events, chunk_bytes=chunk_bytes,
                    validate=True)
    t = 0
    for i in range(n_exits):
        t += 9000
        cpu = i % cpus
        rip = 0x401000 + (i * 7) % 4096
        if i % 500 == 0:  # a write hypercall: exit, hostio, console, hypercall
            seq = w.exit(cpu, t, 2, rip, 0x400, 1, 4, 0x9000)
            expected.append(exit_map(seq, cpu, t, 2, rip, 0x400, 1, 4, 0x9000))
            ev = dict(op="write", args=[1, 6], ret=6)
            seq = w.event("hostio", cpu, t + 100, **ev)
            expected.append({"k": "hostio", "seq": seq, "cpu": cpu, "t": t + 100, **ev})
            ev = dict(stream="stdout", data=b"Hello\n")
            seq = w.event("console", cpu, t + 150, **ev)
            expected.append({"k": "console", "seq": seq, "cpu": cpu, "t": t + 150, **ev})
            ev = dict(call="write", port=0x400, addr=0x9000, block=bytes(range(20)),
                      args={"fd": 1, "buf": 4198400, "len": 6}, ret=6, payload=b"Hello\n", t_end=t + 2000)
            seq = w.event("hypercall", cpu, t, **ev)
            expected.append({"k": "hypercall", "seq": seq, "cpu": cpu, "t": t, **ev})
        elif i % 777 == 0:
            seq = w.exit(cpu, t, 6, rip)
            expected.append(exit_map(seq, cpu, t, 6, rip))
            ev = dict(addr=0xFEC00000, len=4, data=b"\x01\x02\x03\x04", write=True)
            seq = w.event("mmio", cpu, t, **ev)
            expected.append({"k": "mmio", "seq": seq, "cpu": cpu, "t": t, **ev})
        elif i % 3 == 0:
            seq = w.exit(cpu, t, 2, rip, 0xCFC, 0, 4, 0xFFFFFFFF)
            expected.append(exit_map(seq, cpu, t, 2, rip, 0xCFC, 0, 4, 0xFFFFFFFF))
        else:
            seq = w.exit(cpu, t, 2, rip, 0x800, 1, 1, i & 0xFF)
            expected.append(exit_map(seq, cpu, t, 2, rip, 0x800, 1, 1, i & 0xFF))
    seq = w.exit(0, t + 1, 5, 0x401FFF)
    expected.append(exit_map(seq, 0, t + 1, 5, 0x401FFF))
    summary = w.close({"code": 0, "reason": "exit", "t": t + 5, "report": {"message": "bye"}})
    expected.append({"k": "stop", "seq": len(expected), "cpu": 0, "t": t + 5, "code": 0, "reason": "exit",
                     "report": {"message": "bye"}})
    return expected, summary


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_round_trip_is_exact(tmp_path, compress):
    path = tmp_path / "run.tvt"
    expected, summary = synthetic_run(path, compress=compress)
    with open_trace(path) as r:
        assert r.warnings == []
        assert r.complete
        assert r.header["format"] == list(FORMAT_VERSION)
        assert r.header["compression"] == compress
        for key, value in HEADER.items():
            assert r.header[key] == value
        assert isinstance(r.header["created"], str) and r.header["created"].endswith("Z")
        assert isinstance(r.header["created_ns"], int)
        got = list(r.events())
        assert got == expected
        assert [e["seq"] for e in got] == list(range(len(got)))
        f = r.footer
        n_exits = sum(1 for e in expected if e["k"] == "exit")
        assert f["events"] == len(expected) == summary["events"]
        assert f["exits"] == n_exits == summary["exits"]
        assert f["by_reason"] == {2: n_exits - 1 - sum(1 for e in expected if e["k"] == "mmio"), 5: 1,
                                  6: sum(1 for e in expected if e["k"] == "mmio")}
        assert f["stop"] == expected[-1]
        assert f["dropped"] == 0
        assert len(f["chunks"]) == len(r.chunk_index) > 10
        with open(path, "rb") as fh:
            trailer = fh.read()[-16:]
        assert trailer[8:] == b"TVTFOOT\n"
        assert f["bytes"] == int.from_bytes(trailer[:8], "little")
        assert summary["bytes"] == os.path.getsize(path)
        # chunks are contiguous in seq
        s = 0
        for chunk in r.chunks():
            assert chunk.seq0 == s
            assert chunk.n_exits == chunk.n - len(chunk.events)
            s += chunk.n
        assert s == len(expected)


def test_compression_shrinks_and_is_flagged_per_frame(tmp_path):
    plain, packed = tmp_path / "plain.tvt", tmp_path / "zstd.tvt"
    synthetic_run(plain)
    synthetic_run(packed, compress="zstd")
    assert os.path.getsize(packed) < os.path.getsize(plain) / 2


def test_chunk_api(tmp_path):
    np = pytest.importorskip("numpy")
    path = tmp_path / "run.tvt"
    expected, _ = synthetic_run(path, n_exits=5000, chunk_events=700)
    r = open_trace(path)
    assert len(r.chunk_index) == -(-len(expected) // 700)
    by_seq = {e["seq"]: e for e in expected}
    for i in (3, 0, len(r.chunk_index) - 1, 2):
        c = r.chunk(i)
        assert c.index == i and c.seq0 == i * 700
        seqs = list(c.exit_seqs())
        assert seqs == [s for s in range(c.seq0, c.seq0 + c.n) if by_seq[s]["k"] == "exit"]
        assert len(seqs) == c.n_exits
        rows = list(c.exit_rows())
        assert [r_[0] for r_ in rows] == [by_seq[s]["t"] for s in seqs]
        cols = c.exit_columns()
        assert set(cols) == set(schema.EXIT_FIELDS)
        assert list(cols["rip"]) == [by_seq[s]["rip"] for s in seqs]
        assert list(cols["dir"]) == [by_seq[s]["dir"] for s in seqs]
        for j, name in enumerate(schema.EXIT_FIELDS):
            assert list(cols[name]) == [row[j] for row in rows]
        arr = np.frombuffer(c.exits, dtype=EXIT_DTYPE_FIELDS)
        assert arr.dtype.itemsize == 31
        assert arr["t_ns"].tolist() == list(cols["t_ns"])
        assert arr["value"].tolist() == list(cols["value"])
    assert r.chunk(-1).index == len(r.chunk_index) - 1
    with pytest.raises(IndexError):
        r.chunk(len(r.chunk_index))


def test_event_filters(tmp_path):
    path = tmp_path / "run.tvt"
    expected, _ = synthetic_run(path, n_exits=6000, chunk_events=500, cpus=2)
    r = open_trace(path)
    assert list(r.events(kinds=["hypercall"])) == [e for e in expected if e["k"] == "hypercall"]
    assert list(r.events(kinds="exit", vcpu=1)) == [e for e in expected if e["k"] == "exit" and e["cpu"] == 1]
    assert list(r.events(vcpu=0)) == [e for e in expected if e["cpu"] == 0]
    assert list(r.events(start=1234, stop=2345)) == expected[1234:2345]
    assert list(r.events(start=len(expected) - 3)) == expected[-3:]
    assert list(r.events(kinds={"console", "stop"}, start=100)) == [
        e for e in expected[100:] if e["k"] in ("console", "stop")]
    assert list(r.events(start=10, stop=10)) == []


def test_plain_exits_cost_at_most_32_bytes(tmp_path):
    assert schema.EXIT_ROW.size == schema.EXIT_ROW_SIZE == 31
    path = tmp_path / "exits.tvt"
    n = 200_000
    with TraceWriter(path, {}) as w:
        ex = w.exit
        for i in range(n):
            ex(0, i * 8000, 2, 0x401000 + (i & 0xFFF), 0x800, 1, 1, i & 0xFF)
    per_exit = os.path.getsize(path) / n
    assert per_exit <= 32, per_exit
    assert per_exit < 31.2
    r = open_trace(path)
    assert r.footer["exits"] == n and r.footer["by_reason"] == {2: n}
    assert sum(c.n_exits for c in r.chunks()) == n


def test_close_is_idempotent_and_with_works(tmp_path):
    path = tmp_path / "t.tvt"
    with TraceWriter(path, {}) as w:
        w.exit(0, 1, 2, 3)
    first = w.close()
    assert first == w.close()
    assert first["events"] == 1
    r = open_trace(path)
    assert r.complete and r.footer["events"] == 1 and r.footer["stop"] is None


def test_empty_trace(tmp_path):
    path = tmp_path / "t.tvt"
    TraceWriter(path, {}).close()
    r = open_trace(path)
    assert r.complete and r.warnings == [] and list(r.events()) == [] and r.chunk_index == []


def test_threadsafe_writer(tmp_path):
    path = tmp_path / "mt.tvt"
    w = TraceWriter(path, {"cpus": 4}, threadsafe=True, chunk_events=300)
    seqs: list[list[int]] = [[] for _ in range(4)]

    def vcpu(cpu):
        for i in range(3000):
            seqs[cpu].append(w.exit(cpu, i, 2, i, 0x800, 1, 1, cpu))
            if i % 100 == 0:
                seqs[cpu].append(w.event("console", cpu, i, stream="uart", data=b"%d" % cpu))

    threads = [threading.Thread(target=vcpu, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    all_seqs = sorted(s for per in seqs for s in per)
    assert all_seqs == list(range(len(all_seqs)))
    r = open_trace(path)
    got = list(r.events())
    assert [e["seq"] for e in got] == all_seqs
    for cpu in range(4):
        mine = [e for e in got if e["cpu"] == cpu]
        assert [e["seq"] for e in mine] == seqs[cpu]
        assert all(e["value"] == cpu for e in mine if e["k"] == "exit")


def test_max_bytes_sets_full_and_keeps_the_stop_event(tmp_path):
    path = tmp_path / "small.tvt"
    limit = 20_000
    w = TraceWriter(path, {}, chunk_events=100, max_bytes=limit)
    i = 0
    while not w.full and i < 1_000_000:
        w.exit(0, i, 2, i, 0x800, 1, 1, 0)
        i += 1
    assert w.full
    for _ in range(50):  # the caller notices late: these are dropped
        w.exit(0, i, 2, i, 0x800, 1, 1, 0)
        w.event("console", 0, i, stream="uart", data=b"x")
    summary = w.close({"code": None, "reason": "trace-full"})
    assert summary["dropped"] >= 100
    r = open_trace(path)
    assert r.complete
    assert any("size limit" in m for m in r.warnings)
    assert r.footer["bytes"] <= limit + 200  # chunks stop before the limit; only the tiny stop chunk passes
    assert r.footer["bytes"] >= limit - 300  # and the last chunk is cut to fill it (not one chunk short)
    got = list(r.events())
    assert [e["seq"] for e in got] == list(range(len(got)))
    assert got[-1]["k"] == "stop" and got[-1]["reason"] == "trace-full"
    assert r.footer["stop"] == got[-1]
    assert r.footer["events"] == len(got)
    assert r.footer["dropped"] == summary["dropped"] == i + 100 - (len(got) - 1)


def test_binary_fields_are_copied(tmp_path):
    path = tmp_path / "t.tvt"
    buf = bytearray(b"original")
    with TraceWriter(path, {}) as w:
        w.event("console", 0, 1, stream="uart", data=buf)
        w.event("console", 0, 2, stream="uart", data=memoryview(buf)[:4])
        buf[:] = b"XXXXXXXX"
    assert [e["data"] for e in open_trace(path).events()] == [b"original", b"orig"]


@pytest.mark.parametrize(
    "kind,fields,message",
    [
        ("nosuchkind", {}, "unknown event kind"),
        ("console", {"stream": "uart"}, "lacks required field 'data'"),
        ("console", {"stream": "uart", "data": "text"}, "should be bin"),
        ("console", {"stream": "uart", "data": b"", "colour": 1}, "unknown field"),
        ("virtio", {}, "lacks required field 'op'"),
        ("net", {"dir": "rx", "frame": b"", "len": 0, "colour": 1}, "unknown field"),
        ("exit", {}, "TraceWriter.exit"),
        ("hypercall", {"call": "open", "port": 0x440, "addr": 0}, "lacks required field"),
    ],
)
def test_validation_rejects_bad_events(tmp_path, kind, fields, message):
    with TraceWriter(tmp_path / "t.tvt", {}, validate=True) as w:
        with pytest.raises(ValueError, match=message):
            w.event(kind, 0, 0, **fields)


def test_validation_accepts_refused_hypercall(tmp_path):
    with TraceWriter(tmp_path / "t.tvt", {}, validate=True) as w:
        w.event("hypercall", 0, 0, call="open", port=0x440, addr=0xFFFFFFFF, error="block outside RAM", t_end=5)


def test_reserved_field_names_are_refused(tmp_path):
    with TraceWriter(tmp_path / "t.tvt", {}) as w:
        with pytest.raises(ValueError, match="must not be named"):
            w.event("console", 0, 0, stream="uart", data=b"", seq=5)


def test_validation_rejects_out_of_range_exits(tmp_path):
    with TraceWriter(tmp_path / "t.tvt", {}, validate=True) as w:
        with pytest.raises(ValueError, match="port"):
            w.exit(0, 0, 2, 0, port=70000)
        with pytest.raises(ValueError, match="direction"):
            w.exit(0, 0, 2, 0, direction=2)
        w.exit(0, 0, 2, 0)
    assert open_trace(tmp_path / "t.tvt").footer["exits"] == 1


def test_bad_compression_name(tmp_path):
    with pytest.raises(TracevisorError, match="unknown trace compression"):
        TraceWriter(tmp_path / "t.tvt", {}, compress="lz4")


def test_zstd_missing_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from tracevisor.trace import frames

    monkeypatch.setattr(frames, "_zstd_module", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(TraceError, match="zstandard"):
        TraceWriter(tmp_path / "t.tvt", {}, compress="zstd")


def test_unwritable_path(tmp_path):
    with pytest.raises(TraceError, match="cannot create trace"):
        TraceWriter(tmp_path / "no" / "such" / "dir.tvt", {})


def test_write_errors_surface_in_the_caller(tmp_path, monkeypatch):
    w = TraceWriter(tmp_path / "t.tvt", {}, chunk_events=10)

    def fail(fd, parts):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer_module, "_write_all", fail)
    with pytest.raises(TraceError, match="No space left on device"):
        for i in range(1000):
            w.exit(0, i, 2, i)
    with pytest.raises(TraceError, match="No space left"):
        w.close()
    assert w.close() == {}  # closed anyway


def test_header_encoding_error(tmp_path):
    with pytest.raises(TracevisorError, match="cannot be encoded"):
        TraceWriter(tmp_path / "t.tvt", {"options": {"x": object()}})


def test_odd_values_do_not_lose_the_chunk(tmp_path):
    import pathlib

    path = tmp_path / "t.tvt"
    with TraceWriter(path, {}) as w:
        w.exit(0, 1, 2, 3)
        w.event("hostio", 0, 2, op="open", args=[pathlib.Path("/data/x"), {3}, object()], ret=3)
        w.exit(0, 4, 2, 5)
    evs = list(open_trace(path).events())
    assert [e["k"] for e in evs] == ["exit", "hostio", "exit"]
    assert evs[1]["args"][:2] == ["/data/x", [3]] and evs[1]["args"][2].startswith("<object")


def test_recording_after_close_is_dropped_not_blocking(tmp_path):
    path = tmp_path / "t.tvt"
    w = TraceWriter(path, {}, chunk_events=10, threadsafe=True)
    w.exit(0, 1, 2, 3)
    w.close()
    for i in range(5000):  # a vCPU thread that has not noticed yet
        w.exit(0, i, 2, i)
        w.event("console", 0, i, stream="uart", data=b"x")
    assert w.stats["dropped"] >= 9990
    assert open_trace(path).footer["events"] == 1


def test_stats_while_recording(tmp_path):
    w = TraceWriter(tmp_path / "t.tvt", {}, chunk_events=100)
    for i in range(1050):
        w.exit(0, i, 2 if i % 2 else 5, i)
    w.event("console", 0, 5, stream="uart", data=b"x")
    st = w.stats
    assert st["events"] == 1051 and st["exits"] == 1050 and st["dropped"] == 0
    summary = w.close()
    assert summary["by_reason"] == {2: 525, 5: 525} and summary["chunks"] == 11
    assert w.stats["by_reason"] == {2: 525, 5: 525}


def test_an_event_as_big_as_a_chunk_gets_a_chunk_of_its_own(tmp_path):
    # a huge WRITE's console event and its hypercall (each carrying the data) must not share a frame: two of
    # 2+ GiB together would pass the 4 GiB frame limit
    path = tmp_path / "big.tvt"
    w = TraceWriter(path, {"argv": ["big"]}, chunk_bytes=1000)
    w.exit(0, 1, 2, 0x401000, 0x400, 1, 4, 0x9000)
    w.event("console", 0, 2, stream="stdout", data=b"a" * 1500)
    w.event("hostio", 0, 3, op="write", args=[1, 1500], ret=1500)
    w.event("hypercall", 0, 4, call="write", port=0x400, addr=0x9000, block=b"", args={}, ret=1500,
            payload=b"a" * 1500, t_end=5)
    w.exit(0, 6, 2, 0x401000, 0x400, 1, 4, 0x9000)
    w.close()
    r = open_trace(path)
    chunks = [(c.seq0, [e["k"] for e in c.events]) for c in r.chunks()]
    big = [kinds for _, kinds in chunks if "console" in kinds or "hypercall" in kinds]
    assert big == [["console"], ["hypercall"]], chunks
    assert [e["seq"] for e in r.events()] == [0, 1, 2, 3, 4] and r.complete and not r.warnings
