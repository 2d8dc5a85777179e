"""analysis: frames, statistics, exports, diff and plots on the committed sample traces (no KVM needed).

The sample traces in traces/ were recorded from the example guests (traces/README.md); the expected numbers
below are what those guests do (guests/README.md), not what the loader happened to produce.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import run_cli
from tracevisor import analysis
from tracevisor.analysis.columns import FRAME_NAMES, FRAMES, columns
from tracevisor.trace import TraceWriter, open_trace

REPO = Path(__file__).resolve().parents[1]
TRACES = REPO / "traces"
SAMPLES = ["hello", "hello-format1", "hello-zstd", "files", "compute", "compute-100", "args", "exitcode", "smp", "netecho"]


def sample(name: str) -> Path:
    return TRACES / f"{name}.tvt"


@pytest.fixture(scope="module")
def loaded() -> dict[str, analysis.Trace]:
    return {name: analysis.load(sample(name)) for name in SAMPLES}


# --------------------------------------------------------------------------------------------------
# the sample traces themselves (format stability)
# --------------------------------------------------------------------------------------------------

def test_every_sample_is_listed_and_small():
    on_disk = sorted(p.stem for p in TRACES.glob("*.tvt"))
    assert on_disk == sorted(SAMPLES)
    for name in SAMPLES:
        assert sample(name).stat().st_size < 1 << 20, name
        assert f"`{name}.tvt`" in (TRACES / "README.md").read_text()


@pytest.mark.parametrize("name", SAMPLES)
def test_samples_still_read_with_the_current_reader(name):
    with open_trace(sample(name)) as r:
        assert r.header["format"][0] in (1, 2)
        assert r.complete and r.footer is not None
        events = list(r.events())
        assert r.warnings == []
        assert len(events) == r.footer["events"]
        assert [e["seq"] for e in events] == list(range(len(events)))
        assert sum(1 for e in events if e["k"] == "exit") == r.footer["exits"]
        assert events[-1]["k"] == "stop"
        # no host environment or user directory in a committed trace
        assert r.header["argv"][0] == r.header["argv"][0].split("/")[-1]
        assert "/root" not in json.dumps(r.header, default=str) and "/home" not in json.dumps(r.header, default=str)


# --------------------------------------------------------------------------------------------------
# frames: columns, dtypes, contents
# --------------------------------------------------------------------------------------------------

def _dtype_ok(series: pd.Series, documented: str) -> bool:
    dt = series.dtype
    if documented == "category":
        return isinstance(dt, pd.CategoricalDtype)
    if documented == "string":
        return isinstance(dt, pd.StringDtype)
    if documented == "Int64":
        return isinstance(dt, pd.Int64Dtype)
    if documented == "object":
        return dt == np.dtype(object)
    return dt == np.dtype(documented)


@pytest.mark.parametrize("name", SAMPLES)
def test_frames_have_the_documented_columns_and_dtypes(loaded, name):
    tr = loaded[name]
    for frame in FRAME_NAMES:
        df = getattr(tr, frame)
        assert list(df.columns) == columns(frame), (name, frame)
        for col in FRAMES[frame]:
            assert _dtype_ok(df[col.name], col.dtype), (name, frame, col.name, df[col.name].dtype, col.dtype)
    assert tr.meta["format"][0] in (1, 2) and tr.meta is tr.header
    # nanosecond timestamps convert to timedeltas
    td = pd.to_timedelta(tr.exits["t_ns"], unit="ns")
    assert td.dtype.kind == "m" and (td >= pd.Timedelta(0)).all()


@pytest.mark.parametrize("name", SAMPLES)
def test_exits_equal_the_readers_exit_events(loaded, name):
    ex = loaded[name].exits
    ref = list(open_trace(sample(name)).events(kinds="exit"))
    assert ex["seq"].tolist() == [e["seq"] for e in ref]
    for col, key in (("vcpu", "cpu"), ("t_ns", "t"), ("reason_code", "reason"), ("port", "port"), ("dir", "dir"),
                     ("size", "size"), ("value", "value"), ("rip", "rip")):
        assert ex[col].tolist() == [e[key] for e in ref], col
    assert ex["reason"].astype(str).tolist() == ["IO" if e["reason"] == 2 else e["reason"] for e in ref]
    # duration: until the next exit of the same vCPU; the last one until the vCPU's last event
    for _, grp in ex.groupby("vcpu"):
        t = grp["t_ns"].to_numpy()
        assert (grp["duration_ns"].to_numpy()[:-1] == np.diff(t)).all()
        assert grp["duration_ns"].iloc[-1] >= 0


def test_files_frame_counts_what_the_files_guest_did(loaded):
    tr = loaded["files"]
    f = tr.files
    assert f["path"].tolist() == ["data.txt", "data.txt"]
    assert f["flags"].tolist() == [0o1102, 0] and f["mode"].tolist() == [0o644, 0]
    assert f["bytes_written"].tolist() == [45 + 36, 0]
    assert f["bytes_read"].tolist() == [81 + 5, 32 + 32 + 17 + 0]
    assert f["writes"].tolist() == [2, 0] and f["reads"].tolist() == [2, 4] and f["seeks"].tolist() == [3, 0]
    assert f["closed_seq"].notna().all() and (f["closed_seq"] > f["opened_seq"]).all()
    hc = tr.hypercalls
    counts = hc["call"].value_counts()
    assert {c: int(counts[c]) for c in ("write", "read", "open", "close", "lseek", "unlink", "exit")} == \
        {"write": 24 + 2, "read": 7, "open": 3, "close": 3, "lseek": 3, "unlink": 2, "exit": 1}
    on_file = hc[(hc["fd"] == f["fd"].iloc[0]) & (hc["call"] == "write")]
    assert on_file["bytes_out"].tolist() == [45, 36] and on_file["ret"].tolist() == [45, 36]
    reads = hc[hc["call"] == "read"]
    assert reads["ret"].tolist() == [81, 5, 32, 32, 17, 0, -1]  # the last: fd 77
    assert reads["bytes_in"].tolist() == [81, 5, 32, 32, 17, 0, 0]
    assert reads["len"].tolist()[:6] == [128, 5, 32, 32, 32, 32] and reads["fd"].tolist()[6] == 77
    seeks = hc[hc["call"] == "lseek"]["args"].tolist()
    assert [(a["offset"], a["whence"]) for a in seeks] == [(0, 0), (0, 2), (-5, 1)]
    assert hc[hc["call"] == "open"]["path"].tolist() == ["data.txt"] * 3
    assert hc[hc["call"] == "open"]["ret"].tolist()[2] == -1
    assert (hc["latency_ns"] == hc["t_end_ns"] - hc["t_ns"]).all() and (hc["latency_ns"] >= 0).all()
    out = tr.console
    assert set(out["stream"].astype(str)) == {"stdout"}
    text = "".join(out["text"])
    assert text.startswith("files: path=data.txt\nopen data.txt O_CREAT|O_RDWR|O_TRUNC 0644 = ok\nwrite 45\n")
    assert text.endswith("unlink data.txt = -1\nfiles: OK\n") and text.count("\n") == 24
    assert out["nbytes"].sum() == len(text.encode())
    assert hc[hc["call"] == "write"]["bytes_out"].sum() == len(text.encode()) + 81


def test_compute_frames(loaded):
    tr = loaded["compute"]
    ex = tr.exits
    assert len(ex) == 1020 and (ex["reason"] == "IO").all()
    uart = ex[ex["port"] == 0x800]
    assert len(uart) == 1016 and set(uart["value"]) == {0x2E, 0x0A} and (uart["size"] == 1).all()
    assert (uart["value"] == 0x0A).sum() == 16
    con = tr.console
    assert con[con["stream"] == "uart"]["nbytes"].sum() == 1016
    assert con[con["stream"] == "stdout"]["text"].tolist() == ["compute: N=1000 checksum=4e483cffa90bfc2e\n"]
    assert tr.stop["code"] == 0
    assert loaded["compute-100"].console_text.endswith("compute: N=100 checksum=" + _checksum(100) + "\n")


def _checksum(n: int) -> str:
    from tracevisor.guestbuild import compute_checksum

    return f"{compute_checksum(n):016x}"


def test_args_exitcode_smp_hello(loaded):
    assert loaded["args"].console_text == "argc=4\nargv[0]=args\nargv[1]=x\nargv[2]=y z\nargv[3]=\nenvc=2\n" \
                                          "env[0]=A=1\nenv[1]=B=two\n"
    cmdval = loaded["args"].hypercalls.query("call == 'cmdval'")
    assert cmdval["bytes_in"].tolist() == [sum(len(s) + 1 for s in ("args", "x", "y z", "", "A=1", "B=two"))]
    ec = loaded["exitcode"]
    assert ec.stop["code"] == 3 and ec.console.empty
    assert ec.hypercalls["call"].astype(str).tolist() == ["cmdsize", "cmdval", "exit"]
    assert ec.hypercalls["args"].iloc[-1] == {"arg": 3} and ec.hypercalls["ret"].isna().iloc[-1]
    smp = loaded["smp"]
    assert smp.meta["cpus"] == 2
    assert smp.console_text == "smp: cpus=2 cpu1 result=50005000\n"
    assert {(e["cpu"], e["state"]) for e in smp.events("vcpu")} == {(0, "start"), (0, "stop"), (1, "start"), (1, "stop")}
    hello, hz = loaded["hello"], loaded["hello-zstd"]
    assert hz.meta["compression"] == "zstd" and hello.console_text == hz.console_text == "Hello from tracevisor!\n"
    for col in ("reason_code", "port", "dir", "size", "value", "rip", "seq", "vcpu"):
        assert hello.exits[col].tolist() == hz.exits[col].tolist()


def test_packets_and_virtio_frames(loaded):
    tr = loaded["netecho"]
    pk = tr.packets
    assert pk["direction"].astype(str).tolist() == ["rx", "tx"] * 4
    assert pk["protocol"].astype(str).tolist() == ["ARP", "ARP", "ICMP", "ICMP", "UDP", "UDP", "UDP", "UDP"]
    rx = pk[pk["direction"] == "rx"]
    assert rx["length"].tolist() == [42, 98, 14 + 20 + 8 + len(b"hello, tracevisor\n"), 14 + 20 + 8 + 4]
    assert rx["ip_src"].tolist() == ["10.0.0.1"] * 4 and rx["ip_dst"].tolist() == ["10.0.0.2"] * 4
    assert rx["eth_src"].tolist() == ["02:aa:bb:cc:dd:ee"] * 4
    udp = pk[pk["protocol"] == "UDP"]
    assert udp["src_port"].tolist() == [40000, 7, 40000, 7] and udp["dst_port"].tolist() == [7, 40000, 7, 40000]
    icmp = pk[pk["protocol"] == "ICMP"]
    assert icmp["icmp_type"].tolist() == [8, 0] and icmp["ttl"].tolist() == [64, 64]
    assert (pk["length"] == pk["frame"].map(len)).all()
    vq = tr.virtio
    chains = vq[vq["op"] == "chain"]
    assert len(chains) == 8 and chains["queue"].tolist() == [0, 1] * 4
    assert (chains["n_descriptors"] == chains["descriptors"].map(len)).all()
    assert set(vq["op"].astype(str)) >= {"reset", "status", "features", "queue", "chain"}
    assert (chains["length"].to_numpy() >= pk["length"].to_numpy()).all()  # the virtio-net header + the frame


# --------------------------------------------------------------------------------------------------
# robustness: torn, odd and empty traces
# --------------------------------------------------------------------------------------------------

def test_torn_trace_loads_what_is_left(tmp_path):
    w = TraceWriter(tmp_path / "big.tvt", {"argv": ["x"]}, chunk_events=300)
    for i in range(1000):
        w.exit(i % 2, i * 10, 2, 0x400000 + i, 0x800, 1, 1, 0x2E)
        if i % 7 == 0:
            w.event("console", i % 2, i * 10 + 5, stream="uart", data=b".")
    w.close()
    data = (tmp_path / "big.tvt").read_bytes()
    torn = tmp_path / "torn.tvt"
    torn.write_bytes(data[: len(data) * 2 // 3])
    tr = analysis.load(torn)
    assert not tr.complete and tr.warnings
    ref = list(open_trace(torn).events(kinds="exit"))
    assert 0 < len(tr.exits) == len(ref) < 1000
    assert tr.exits["seq"].tolist() == [e["seq"] for e in ref]
    assert tr.exits["rip"].tolist() == [e["rip"] for e in ref]


def test_odd_rich_events_and_empty_traces_load(tmp_path):
    p = tmp_path / "odd.tvt"
    w = TraceWriter(p, {"argv": ["odd"], "cpus": 1})
    w.exit(0, 10, 2, 0x401000, 0x400, 1, 4, 0x9000)
    w.event("hypercall", 0, 11, call="write", port=0x400, addr=0x9000, block=b"", args=["not", "a", "map"],
            ret="weird", t_end=5)
    w.event("hypercall", 0, 12, call=7, port=-1, addr=None, block=b"", args={}, ret=None, t_end=20,
            error="refused")
    w.event("console", 0, 13, stream="uart", data=b"\xff\xfe ok\n")
    w.event("net", 0, 14, dir="rx", frame=b"\x01\x02", len=2)
    w.event("virtio", 0, 15, op="chain", descs="nope")
    w.exit(0, 30, 17, 0, 0, 0, 0, 0)  # KVM_EXIT_INTERNAL_ERROR
    w.exit(0, 40, 200, 0, 0, 0, 0, 0)  # a reason this tracevisor does not know
    w.close()
    tr = analysis.load(p)
    assert tr.exits["reason"].astype(str).tolist() == ["IO", "INTERNAL_ERROR", "REASON_200"]
    assert len(tr.hypercalls) == 2 and tr.hypercalls["ret"].isna().all()
    assert tr.hypercalls["error"].tolist()[1] == "refused"
    assert tr.console["text"].tolist() == ["\\xff\\xfe ok\n"]
    assert tr.packets["protocol"].astype(str).tolist() == ["other"]
    assert tr.virtio["descriptors"].tolist() == [None]
    st = analysis.stats(tr)
    assert st.totals["exits"] == 3
    empty = tmp_path / "empty.tvt"
    TraceWriter(empty, {"argv": ["e"]}).close()
    tr = analysis.load(empty)
    for frame in FRAME_NAMES:
        assert getattr(tr, frame).empty and list(getattr(tr, frame).columns) == columns(frame)
    assert analysis.stats(tr).totals["exits"] == 0
    assert "(none)" in analysis.stats(tr).format()


def test_crafted_field_values_load_as_missing_values_with_a_warning(tmp_path):
    """Values no recorder writes (found by fuzzing): the frames load, misfits become <NA> or are clipped,
    and events with an impossible vCPU or time are left out with one warning."""
    p = tmp_path / "crafted.tvt"
    w = TraceWriter(p, {"argv": ["crafted"], "cpus": 1})
    w.event("hostio", 0, 5, op=["not", "hashable"], args=[], ret=0)
    w.event("hypercall", 0, 10, call="open", port=1 << 40, addr=-5, block=b"", args={"flags": 0, "mode": 0},
            payload=b"f", ret=3, t_end=11)
    for _ in range(3):  # three reads of 2^62 bytes each: more than an int64 holds in total
        w.event("hypercall", 0, 12, call="read", port=0x500, addr=0x9000, block=b"",
                args={"fd": 3, "buf": 0, "len": 1 << 62}, ret=1 << 62, t_end=13)
    w.event("hypercall", 0, 14, call="lseek", port=0x580, addr=0x9000, block=b"", args={"fd": 3},
            ret=(1 << 64) - 1, t_end=15)
    w.event("console", 70000, 16, stream="stdout", data=b"from no vCPU\n")
    w.event("console", 0, "late", stream="stdout", data=b"at no time\n")
    w.close()
    tr = analysis.load(p)
    assert any("2 event(s) with an impossible vCPU or time left out" in x for x in tr.warnings), tr.warnings
    hc = tr.hypercalls
    assert hc["call"].astype(str).tolist() == ["open", "read", "read", "read", "lseek"]
    assert hc["port"].iloc[0] == 0xFFFF and hc["addr"].iloc[0] == 0  # clipped to the column's range
    assert pd.isna(hc["ret"].iloc[4])  # 2^64 - 1 is no int64
    f = tr.files.iloc[0]
    assert (f["path"], f["reads"], f["seeks"], f["bytes_read"]) == ("f", 3, 1, np.iinfo(np.int64).max)
    assert tr.console.empty
    st = analysis.stats(tr)
    assert st.totals["hypercalls"] == 5
    analysis.export.perfetto_events(tr)
    analysis.to_parquet(tr, tmp_path / "pq")
    r = run_cli("stats", str(p))
    assert r.returncode == 0 and b"impossible vCPU or time" in r.stderr and b"Traceback" not in r.stderr


def test_load_refuses_a_file_that_is_not_a_trace(tmp_path):
    from tracevisor.errors import TraceError

    bad = tmp_path / "x.tvt"
    bad.write_bytes(b"hello")
    with pytest.raises(TraceError):
        analysis.load(bad)
    r = run_cli("stats", str(bad))
    assert r.returncode == 1 and r.stderr.decode().strip().startswith("tracevisor: error:") \
        and len(r.stderr.splitlines()) == 1


# --------------------------------------------------------------------------------------------------
# stats
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SAMPLES)
def test_stats_totals_equal_frame_totals(loaded, name):
    tr = loaded[name]
    st = analysis.stats(tr)
    ex, hc = tr.exits, tr.hypercalls
    assert st.exits["count"].sum() == len(ex) == st.totals["exits"]
    assert st.exits["total_ns"].sum() == ex["duration_ns"].sum() == st.totals["exit_time_ns"]
    assert st.ports["count"].sum() == (ex["reason_code"] == 2).sum()
    assert st.hypercalls["count"].sum() == len(hc) == st.totals["hypercalls"]
    assert st.hypercalls["total_ns"].sum() == hc["latency_ns"].sum()
    assert st.hypercalls["bytes_in"].sum() == hc["bytes_in"].sum() == st.totals["bytes_in"]
    assert st.hypercalls["bytes_out"].sum() == hc["bytes_out"].sum() == st.totals["bytes_out"]
    for table in (st.exits, st.hypercalls, st.ports):
        if len(table):
            assert table["pct"].sum() == pytest.approx(100.0)
            assert (table["min_ns"] <= table["mean_ns"]).all() and (table["mean_ns"] <= table["max_ns"]).all()
            assert (table["p99_ns"] <= table["max_ns"]).all() and (table["p99_ns"] >= table["min_ns"]).all()
    for r in st.hypercalls.itertuples():
        sel = hc[hc["call"] == r.call]
        assert (r.count, r.total_ns, r.min_ns, r.max_ns) == (len(sel), sel["latency_ns"].sum(),
                                                             sel["latency_ns"].min(), sel["latency_ns"].max())
        assert r.p99_ns == pytest.approx(np.percentile(sel["latency_ns"], 99))
        assert r.bytes_per_call == pytest.approx((sel["bytes_in"].sum() + sel["bytes_out"].sum()) / len(sel))
    by = analysis.stats(tr, by="vcpu")
    assert by.exits["count"].sum() == len(ex) and by.hypercalls["count"].sum() == len(hc)
    for v, grp in by.exits.groupby("vcpu"):
        assert grp["pct"].sum() == pytest.approx(100.0)
        assert grp["total_ns"].sum() == ex[ex["vcpu"] == v]["duration_ns"].sum()


def test_stats_cli_table_and_json():
    r = run_cli("stats", str(sample("files")))
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    assert "VM-EXIT" in text and "HYPERCALL" in text and "IO-PORT" in text and "0x400 out (write)" in text
    line = next(ln for ln in text.splitlines() if ln.split() and ln.split()[0] == "write")
    assert line.split()[1] == "26"
    assert "Total Samples:47" in text
    r = run_cli("stats", "--json", str(sample("files")))
    doc = json.loads(r.stdout)
    ref = analysis.stats(sample("files")).to_dict()
    assert doc["totals"] == ref["totals"] and doc["hypercalls"] == ref["hypercalls"] and doc["exits"] == ref["exits"]
    assert {h["call"]: h["count"] for h in doc["hypercalls"]}["read"] == 7
    r = run_cli("stats", "--by", "vcpu", "--json", str(sample("smp")))
    doc = json.loads(r.stdout)
    assert doc["by"] == "vcpu" and all(row["vcpu"] == 0 for row in doc["exits"])
    assert "vCPU 0" in run_cli("stats", "--by", "vcpu", str(sample("smp"))).stdout.decode()


# --------------------------------------------------------------------------------------------------
# exports
# --------------------------------------------------------------------------------------------------

def check_trace_event_json(doc: dict) -> list[dict]:
    """Chrome trace-event format: the checks ui.perfetto.dev's importer relies on."""
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    events = doc["traceEvents"]
    last_ts: dict[tuple, float] = {}
    open_slices: dict[tuple, list[float]] = {}
    for ev in events:
        for key in ("ph", "ts", "pid", "tid", "name"):
            assert key in ev, (key, ev)
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int) and isinstance(ev["name"], str)
        assert ev["ph"] in ("M", "X", "i", "C"), ev
        if ev["ph"] == "M":
            continue
        track = (ev["pid"], ev["tid"])
        assert ev["ts"] >= last_ts.get(track, 0), ("timestamps go back on a track", ev)
        last_ts[track] = ev["ts"]
        stack = open_slices.setdefault(track, [])
        while stack and stack[-1] <= ev["ts"]:
            stack.pop()
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0
            end = ev["ts"] + ev["dur"]
            assert not stack or end <= stack[-1] + 1e-3, ("slices overlap without nesting", ev)
            stack.append(end)
        if ev["ph"] == "i":
            assert ev.get("s", "t") in ("t", "p", "g")
        if ev["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in ev["args"].values())
    return events


@pytest.mark.parametrize("name", ["files", "smp", "netecho", "compute"])
def test_perfetto_export_is_valid_trace_event_json(loaded, name, tmp_path):
    out = tmp_path / f"{name}.json"
    r = run_cli("export", str(sample(name)), "--format", "perfetto", "-o", str(out))
    assert r.returncode == 0, r.stderr
    events = check_trace_event_json(json.loads(out.read_text()))
    tr = loaded[name]
    slices = [e for e in events if e["ph"] == "X" and e.get("cat") == "hypercall"]
    assert len(slices) == len(tr.hypercalls)
    assert [e["name"] for e in slices] == [str(c) for c in tr.hypercalls.sort_values(["vcpu", "t_ns"])["call"]]
    assert sum(1 for e in events if e["ph"] == "i" and e.get("cat") == "exit") == len(tr.exits)
    threads = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {f"vCPU {v}" for v in range(tr.meta["cpus"])} <= threads
    if name == "files":
        w = next(e for e in slices if e["name"] == "write" and e["args"].get("fd") == 3)
        assert w["args"]["len"] == 45 and w["args"]["ret"] == 45 and w["args"]["bytes_out"] == 45
    counters = analysis.export.perfetto_events(tr, exits="counter", counter_bins=50)
    check_trace_event_json({"traceEvents": counters})
    assert sum(1 for e in counters if e["ph"] == "C") == 50 * tr.exits["vcpu"].nunique()


@pytest.mark.parametrize("name", SAMPLES)
def test_parquet_round_trips_to_the_same_frames(loaded, name, tmp_path):
    out = tmp_path / "pq"
    r = run_cli("export", str(sample(name)), "--format", "parquet", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{f}.parquet" for f in FRAME_NAMES] + ["meta.json"])
    back = analysis.read_parquet(out)
    tr = loaded[name]
    for frame in FRAME_NAMES:
        pd.testing.assert_frame_equal(getattr(back, frame), getattr(tr, frame), check_exact=True)
    assert back.meta == json.loads(json.dumps(tr.meta, default=lambda v: v.hex()))
    import pyarrow.parquet as pq

    table = pq.read_table(out / "exits.parquet")
    assert table.num_rows == len(tr.exits) and table.column_names == columns("exits")


@pytest.mark.parametrize("name", ["files", "netecho", "args"])
def test_csv_round_trips(loaded, name, tmp_path):
    out = tmp_path / "csv"
    r = run_cli("export", str(sample(name)), "--format", "csv", "-o", str(out))
    assert r.returncode == 0, r.stderr
    header = (out / "hypercalls.csv").read_text().splitlines()[0]
    assert header.split(",") == columns("hypercalls")
    back = analysis.read_csv(out)
    for frame in FRAME_NAMES:
        pd.testing.assert_frame_equal(getattr(back, frame), getattr(loaded[name], frame))


def test_export_defaults_and_errors(tmp_path):
    shutil.copy(sample("hello"), tmp_path / "h.tvt")
    for fmt, made in (("perfetto", "h.perfetto.json"), ("parquet", "h-parquet"), ("csv", "h-csv")):
        r = run_cli("export", "h.tvt", "--format", fmt, cwd=tmp_path)
        assert r.returncode == 0 and (tmp_path / made).exists(), r.stderr
    r = run_cli("export", "h.tvt", "--format", "csv", "--direction", "rx", cwd=tmp_path)
    assert r.returncode == 1 and b"--direction" in r.stderr
    for fmt in ("csv", "pcap"):  # --exits shapes the Perfetto export only
        r = run_cli("export", "h.tvt", "--format", fmt, "--exits", "none", cwd=tmp_path)
        assert r.returncode == 1 and r.stderr == b"tracevisor: error: --exits applies to --format perfetto only\n"
    for mode, said in (("none", b"no exits"), ("counter", b"4 exits as per-vCPU exit-rate counters"),
                       ("instant", b"4 exits as instant events")):
        r = run_cli("export", "h.tvt", "--format", "perfetto", "--exits", mode, "-o", f"{mode}.json", cwd=tmp_path)
        assert r.returncode == 0 and said in r.stderr, r.stderr
        phases = {e["ph"] for e in json.loads((tmp_path / f"{mode}.json").read_text())["traceEvents"]
                  if e.get("cat") == "exit"}
        assert phases == {"none": set(), "counter": {"C"}, "instant": {"i"}}[mode], (mode, phases)


def test_frames_read_back_from_an_export_say_so(loaded, tmp_path):
    analysis.to_parquet(loaded["files"], tmp_path / "p")
    back = analysis.read_parquet(tmp_path / "p")
    assert not back.has_events and loaded["files"].has_events
    assert "47 exits, 47 hypercalls, read back from an export" in repr(back)
    with pytest.raises(ValueError, match="read back from an export"):
        analysis.diff(back, loaded["files"])


# --------------------------------------------------------------------------------------------------
# diff
# --------------------------------------------------------------------------------------------------

def test_diff_of_a_trace_with_itself_and_of_two_runs_of_the_same_kernel():
    d = analysis.diff(sample("compute"), sample("compute"))
    assert d.identical and d.first is None and not d
    assert (d.hypercalls["count_diff"] == 0).all() and (d.exits["count_diff"] == 0).all()
    r = run_cli("diff", str(sample("compute")), str(sample("compute")))
    assert r.returncode == 0 and b"no difference" in r.stdout
    # hello and hello-zstd are two recordings of the same run: only timing (and the boot time) differ
    d = analysis.diff(sample("hello"), sample("hello-zstd"))
    assert d.identical, d.format()
    assert run_cli("diff", "-q", str(sample("hello")), str(sample("hello-zstd"))).returncode == 0


def test_diff_of_two_runs_with_different_args():
    d = analysis.diff(sample("compute"), sample("compute-100"))
    assert not d.identical
    assert d.first["vcpu"] == 0 and d.first["seq_a"] == d.first["seq_b"] == 5  # after the boot mem hash
    assert d.first["kind_a"] == d.first["kind_b"] == "hostio"
    differing = d.fields[d.fields["differs"]]
    assert differing["field"].tolist() == ["ret"]
    row = differing.iloc[0]
    assert row["a"][0][1:] == [b"1000"] and row["b"][0][1:] == [b"100"]
    assert d.header["field"].tolist() == ["argv"]
    io = d.exits.set_index("reason").loc["IO"]
    assert (io["count_a"], io["count_b"], io["count_diff"]) == (1020, 106, -914)
    calls = d.hypercalls.set_index("call")
    assert (calls.loc["write", "bytes_out_a"], calls.loc["write", "bytes_out_b"]) == (42, 41)
    assert calls.loc["cmdval", "bytes_in_diff"] == -1
    assert not d.console_equal
    r = run_cli("diff", str(sample("compute")), str(sample("compute-100")))
    assert r.returncode == 1
    text = r.stdout.decode()
    assert "first difference at vCPU 0 event #4" in text and "seq 5 (hostio)" in text
    assert "* ret" in text and "IO" in text and "-914" in text
    doc = json.loads(run_cli("diff", "--json", str(sample("compute")), str(sample("compute-100"))).stdout)
    assert doc["identical"] is False and doc["first"]["seq_a"] == 5
    # different kernels: the first exit already differs
    d = analysis.diff(sample("files"), sample("hello"))
    assert d.first["kind_a"] == "exit" and "kernel.sha256" in d.header["field"].tolist()


def test_diff_ignore_applies_to_exit_fields_too():
    # files and hello are different kernels: their first exits differ in RIP (and the port block address)
    d = analysis.diff(sample("files"), sample("hello"))
    assert (d.first["seq_a"], d.first["kind_a"]) == (4, "exit")  # CMDSIZE's OUT, from another RIP
    assert list(d.fields[d.fields.differs].field) == ["rip", "value"]
    d = analysis.diff(sample("files"), sample("hello"), ignore=("rip", "value"))
    assert (d.first["seq_a"], d.first["kind_a"]) == (5, "hostio")  # then the command lines differ
    assert list(d.fields[d.fields.differs].field) == ["ret"]
    r = run_cli("diff", "--ignore", "rip", "--ignore", "value", str(sample("files")), str(sample("hello")))
    assert r.returncode == 1 and b"seq 5 (hostio)" in r.stdout


def _with_cpu_freq(src: Path, dst: Path, khz: int) -> Path:
    """A copy of a sample recorded as if on a host with another TSC frequency."""
    r = open_trace(src)
    events = list(r.events())
    w = TraceWriter(dst, dict(r.header))
    for ev in events:
        if ev["k"] == "exit":
            w.exit(ev["cpu"], ev["t"], ev["reason"], ev["rip"], ev["port"], ev["dir"], ev["size"], ev["value"])
        elif ev["k"] != "stop":
            fields = {k: v for k, v in ev.items() if k not in ("k", "seq", "cpu", "t")}
            if ev["k"] == "hostio" and ev["op"] == "cpu_freq":
                fields["ret"] = khz
            w.event(ev["k"], ev["cpu"], ev["t"], **fields)
    stop = [ev for ev in events if ev["k"] == "stop"][-1]
    w.close({k: v for k, v in stop.items() if k not in ("k", "seq")})
    return dst


def test_diff_can_ignore_host_facts(tmp_path):
    """The same run recorded on two hosts differs only in the host's TSC frequency: --ignore-host."""
    here = _with_cpu_freq(sample("hello"), tmp_path / "here.tvt", 2_445_000)
    there = _with_cpu_freq(sample("hello"), tmp_path / "there.tvt", 2_599_000)
    d = analysis.diff(here, there)
    assert not d.identical and list(d.fields[d.fields.differs].field) == ["ret"]
    assert analysis.diff(here, there, ignore_host=True).identical
    assert run_cli("diff", "-q", str(here), str(there)).returncode == 1
    r = run_cli("diff", "--ignore-host", str(here), str(there))
    assert r.returncode == 0 and b"no difference" in r.stdout, r.stdout
    # ignore_host ignores only host facts: a different run still differs
    assert not analysis.diff(sample("compute"), sample("compute-100"), ignore_host=True).identical


def test_diff_trouble_is_status_2(tmp_path):
    r = run_cli("diff", str(sample("hello")), str(tmp_path / "missing.tvt"))
    assert r.returncode == 2 and b"missing.tvt" in r.stderr


# --------------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["files", "smp", "netecho", "exitcode"])
def test_plots_return_figures_and_save_png(loaded, name, tmp_path):
    from matplotlib.figure import Figure

    from tracevisor.analysis import plots

    tr = loaded[name]
    for fn in (plots.exit_rate, plots.hypercall_latency, plots.io_bytes, plots.vcpu_activity):
        out = tmp_path / f"{fn.__name__}.png"
        fig = fn(tr, save=out)
        assert isinstance(fig, Figure) and fig.axes
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    paths = plots.all_plots(sample(name), tmp_path / "all")
    assert len(paths) == 4 and all(Path(p).stat().st_size > 1000 for p in paths)
