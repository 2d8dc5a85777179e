"""analysis.load_many / to_duckdb / to_dask over a directory of 60 traces.

The traces are written with the real TraceWriter in the shape of a `compute N` recording (CMDSIZE, CMDVAL,
N UART exits, a WRITE, EXIT with a code), each with a different N and exit code, so every per-trace number is
known in advance.
"""

from __future__ import annotations

import os

import pytest

from tracevisor import analysis
from tracevisor.trace import TraceWriter

N_TRACES = 60


def write_compute_like(path, n: int, code: int) -> None:
    w = TraceWriter(path, {"argv": ["compute", str(n)], "cpus": 1, "memory": 64 << 20,
                           "kernel": {"path": "compute", "sha256": "0" * 64, "size": 1}})
    t = 1000
    w.event("vcpu", 0, t, state="start")
    for call, port in (("cmdsize", 0x740), ("cmdval", 0x780)):
        t += 1000
        w.exit(0, t, 2, 0x400400, port, 1, 4, 0x9000)
        w.event("hostio", 0, t + 50, op="cmdline", args=[], ret=[[b"compute", str(n).encode()], []])
        w.event("hypercall", 0, t + 10, call=call, port=port, addr=0x9000, block=b"", args={}, ret=0, t_end=t + 90)
    for _i in range(n):
        t += 700
        w.exit(0, t, 2, 0x4001AC, 0x800, 1, 1, 0x2E)
    line = f"compute: N={n}\n".encode()
    t += 1000
    w.exit(0, t, 2, 0x40070C, 0x400, 1, 4, 0x9100)
    w.event("console", 0, t + 30, stream="stdout", data=line)
    w.event("hostio", 0, t + 40, op="write", args=[1, len(line)], ret=len(line))
    w.event("hypercall", 0, t + 10, call="write", port=0x400, addr=0x9100, block=b"",
            args={"fd": 1, "buf": 0x404000, "len": len(line)}, ret=len(line), payload=line, t_end=t + 60)
    t += 1000
    w.exit(0, t, 2, 0x4008C3, 0x540, 1, 4, 0x9200)
    w.event("hypercall", 0, t + 10, call="exit", port=0x540, addr=0x9200, block=b"", args={"arg": code}, ret=None,
            t_end=t + 20)
    w.event("vcpu", 0, t + 100, state="stop", reason="exit")
    w.close({"code": code, "reason": "exit", "t": t + 200})


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    d = tmp_path_factory.mktemp("many")
    expected = {}
    for i in range(N_TRACES):
        n, code = 50 + 7 * i, i % 5
        write_compute_like(d / f"run{i:03d}.tvt", n, code)
        expected[f"run{i:03d}"] = (n + 4, n, code)  # exits, UART exits, exit code
    return d, expected


def test_load_many_combines_a_frame_with_a_trace_column(many):
    d, expected = many
    ex = analysis.load_many(str(d / "*.tvt"))
    assert list(ex.columns) == ["trace", *analysis.columns.columns("exits")]
    assert str(ex["trace"].dtype) == "category" and len(ex["trace"].cat.categories) == N_TRACES
    assert str(ex["reason"].dtype) == "category"
    counts = ex.groupby("trace", observed=True).size().to_dict()
    assert counts == {name: e[0] for name, e in expected.items()}
    uart = ex[ex["port"] == 0x800].groupby("trace", observed=True).size().to_dict()
    assert uart == {name: e[1] for name, e in expected.items()}
    hc = analysis.load_many(d, frame="hypercalls")  # a directory works as well as a glob
    assert (hc.groupby("trace", observed=True).size() == 4).all()
    exits = hc[hc["call"] == "exit"]
    assert dict(zip(exits["trace"].astype(str), exits["args"].map(lambda a: a["arg"]))) == \
        {name: e[2] for name, e in expected.items()}
    meta = analysis.load_many(d, frame="meta")
    assert len(meta) == N_TRACES and dict(zip(meta["trace"].astype(str), meta["exit_code"])) == \
        {name: e[2] for name, e in expected.items()}
    assert (meta["complete"]).all()
    with pytest.raises(FileNotFoundError):
        analysis.load_many(str(d / "*.nothing"))


def test_to_duckdb_queries_parquet_exports_of_every_trace(many, tmp_path):
    pytest.importorskip("duckdb")
    d, expected = many
    con = analysis.to_duckdb(str(d / "*.tvt"), cache_dir=tmp_path / "cache")
    rows = con.sql("SELECT trace, count(*) AS n, count(*) FILTER (WHERE port = 2048) AS uart FROM exits "
                   "GROUP BY trace ORDER BY trace").fetchall()
    assert {t: (n, u) for t, n, u in rows} == {name: e[:2] for name, e in expected.items()}
    total = con.execute("SELECT sum(bytes_out) FROM hypercalls WHERE call = 'write'").fetchone()[0]
    assert total == sum(len(f"compute: N={e[1]}\n") for e in expected.values())
    assert con.execute("SELECT count(DISTINCT trace) FROM console").fetchone()[0] == N_TRACES
    # the exports are cached: a second call converts nothing and sees the same data
    exports = sorted((tmp_path / "cache").iterdir())
    assert len(exports) == N_TRACES
    mtimes = [p.joinpath("exits.parquet").stat().st_mtime_ns for p in exports]
    con2 = analysis.to_duckdb(str(d / "*.tvt"), cache_dir=tmp_path / "cache")
    assert [p.joinpath("exits.parquet").stat().st_mtime_ns for p in sorted((tmp_path / "cache").iterdir())] == mtimes
    assert con2.execute("SELECT count(*) FROM exits").fetchone()[0] == sum(e[0] for e in expected.values())


def test_the_cache_keeps_one_export_per_trace(tmp_path):
    src = tmp_path / "runs"
    src.mkdir()
    write_compute_like(src / "a.tvt", 10, 0)
    cache = tmp_path / "cache"
    first = dict(analysis.many.parquet_exports(str(src / "*.tvt"), cache))
    assert first["a"] and len(list(cache.iterdir())) == 1
    write_compute_like(src / "a.tvt", 20, 1)  # the trace changes: exported again, the old export goes
    os.utime(src / "a.tvt", ns=(1, 1))
    second = dict(analysis.many.parquet_exports(str(src / "*.tvt"), cache))
    assert second["a"] != first["a"] and [p.name for p in cache.iterdir()] == [os.path.basename(second["a"])]
    assert len(analysis.load_many(str(src / "*.tvt"))) == 24


def test_to_dask_reads_the_same_exports(many, tmp_path):
    pytest.importorskip("dask.dataframe")
    d, expected = many
    ddf = analysis.to_dask(str(d / "*.tvt"), cache_dir=tmp_path / "cache")
    assert ddf.npartitions >= N_TRACES
    counts = ddf.groupby("trace").size().compute()
    assert {str(k): int(v) for k, v in counts.items()} == {name: e[0] for name, e in expected.items()}
    hc = analysis.to_dask(str(d / "*.tvt"), frame="hypercalls", cache_dir=tmp_path / "cache")
    assert int(hc["latency_ns"].sum().compute()) == N_TRACES * (80 + 80 + 50 + 10)
