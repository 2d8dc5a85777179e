"""Trace writer and reader throughput.

    python benchmarks/trace_writer.py [--exits N] [--dir DIR] [--json]

Reports ns per TraceWriter.exit() and .event() call (the recorder's hot path; encoding and I/O happen on the
writer's background thread and are included because they share the GIL here), MB/s and bytes per exit on
disk, and read speeds: events/s through TraceReader.events(), exit rows/s through Chunk.exit_columns(),
Chunk.exit_rows() and numpy.frombuffer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tracevisor.trace import EXIT_DTYPE_FIELDS, TraceWriter, open_trace  # noqa: E402


def bench_exits(path: str, n: int, **kw) -> dict:
    w = TraceWriter(path, {"argv": ["bench"]}, **kw)
    ex = w.exit
    t0 = time.perf_counter_ns()
    for i in range(n):
        ex(0, i, 2, 0x401000, 0x800, 1, 1, 0x2E)
    t1 = time.perf_counter_ns()
    w.close()
    t2 = time.perf_counter_ns()
    size = os.path.getsize(path)
    return {"ns_per_exit": (t1 - t0) / n, "ns_per_exit_incl_close": (t2 - t0) / n,
            "bytes_per_exit": size / n, "mb_per_s": size / ((t2 - t0) / 1e9) / 1e6, "file_bytes": size}


def loop_overhead(n: int) -> float:
    t0 = time.perf_counter_ns()
    for _i in range(n):
        pass
    return (time.perf_counter_ns() - t0) / n


def bench_events(path: str, n: int, **kw) -> dict:
    w = TraceWriter(path, {"argv": ["bench"]}, **kw)
    ev = w.event
    line = b"Hello, world!\r\n"
    t0 = time.perf_counter_ns()
    for i in range(n):
        ev("console", 0, i, stream="uart", data=line)
    t1 = time.perf_counter_ns()
    block = bytes(20)
    args = {"fd": 1, "buf": 0x401000, "len": 15}
    for i in range(n):
        ev("hypercall", 0, i, call="write", port=0x400, addr=0x9000, block=block, args=args, ret=15,
           payload=line, t_end=i + 1000)
    t2 = time.perf_counter_ns()
    w.close()
    t3 = time.perf_counter_ns()
    size = os.path.getsize(path)
    return {"ns_per_console_event": (t1 - t0) / n, "ns_per_hypercall_event": (t2 - t1) / n,
            "bytes_per_event": size / (2 * n), "mb_per_s": size / ((t3 - t0) / 1e9) / 1e6}


def bench_mixed(path: str, n: int, **kw) -> dict:
    """A write-heavy guest: per hypercall an exit, a hostio, a console and a hypercall event; UART bytes."""
    w = TraceWriter(path, {"argv": ["bench"]}, **kw)
    ex, ev = w.exit, w.event
    block = bytes(20)
    args = {"fd": 1, "buf": 0x401000, "len": 6}
    t0 = time.perf_counter_ns()
    records = 0
    for i in range(n):
        if i % 20 == 0:
            ex(0, i, 2, 0x401000, 0x400, 1, 4, 0x9000)
            ev("hostio", 0, i, op="write", args=[1, 6], ret=6)
            ev("console", 0, i, stream="stdout", data=b"Hello\n")
            ev("hypercall", 0, i, call="write", port=0x400, addr=0x9000, block=block, args=args, ret=6,
               payload=b"Hello\n", t_end=i + 500)
            records += 4
        else:
            ex(0, i, 2, 0x401000, 0x800, 1, 1, 0x2E)
            records += 1
    t1 = time.perf_counter_ns()
    w.close()
    size = os.path.getsize(path)
    return {"ns_per_record": (t1 - t0) / records, "records": records, "bytes_per_record": size / records}


def bench_read(path: str) -> dict:
    r = open_trace(path)
    total_events = r.footer["events"]
    t0 = time.perf_counter_ns()
    count = 0
    for _ev in r.events():
        count += 1
    t1 = time.perf_counter_ns()
    assert count == total_events
    rows = 0
    for chunk in r.chunks():
        rows += len(chunk.exit_columns()["t_ns"])
    t2 = time.perf_counter_ns()
    for chunk in r.chunks():
        for _row in chunk.exit_rows():
            pass
    t3 = time.perf_counter_ns()
    out = {"events_per_s": count / ((t1 - t0) / 1e9), "exit_columns_rows_per_s": rows / ((t2 - t1) / 1e9),
           "exit_rows_per_s": rows / ((t3 - t2) / 1e9)}
    try:
        import numpy as np
    except ImportError:
        return out
    t4 = time.perf_counter_ns()
    arrays = [np.frombuffer(c.exits, dtype=EXIT_DTYPE_FIELDS) for c in r.chunks()]
    joined = np.concatenate(arrays)
    t5 = time.perf_counter_ns()
    assert len(joined) == rows
    out["numpy_rows_per_s"] = rows / ((t5 - t4) / 1e9)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exits", type=int, default=2_000_000)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--dir", default=None, help="where to write the trace files (default: a temporary dir)")
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    results: dict = {"python": sys.version.split()[0]}
    with tempfile.TemporaryDirectory(dir=ns.dir) as d:
        p = os.path.join(d, "bench.tvt")
        results["loop_overhead_ns"] = loop_overhead(ns.exits)
        results["exits_plain"] = bench_exits(p, ns.exits)
        results["read_plain"] = bench_read(p)
        results["exits_zstd"] = bench_exits(p, ns.exits, compress="zstd")
        results["read_zstd"] = bench_read(p)
        results["exits_threadsafe"] = bench_exits(p, ns.exits, threadsafe=True)
        results["events_plain"] = bench_events(p, ns.events)
        results["events_zstd"] = bench_events(p, ns.events, compress="zstd")
        results["mixed_plain"] = bench_mixed(p, ns.exits // 2)
        results["read_mixed"] = bench_read(p)
    if ns.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"Python {results['python']}, {ns.exits} exits, {ns.events} events per kind; "
          f"empty loop {results['loop_overhead_ns']:.0f} ns/iteration (included below)")
    for name in ("exits_plain", "exits_zstd", "exits_threadsafe"):
        r = results[name]
        print(f"  {name:<18} exit(): {r['ns_per_exit']:6.0f} ns/call  ({r['ns_per_exit_incl_close']:.0f} incl. "
              f"close)  {r['bytes_per_exit']:6.2f} B/exit on disk  {r['mb_per_s']:7.1f} MB/s")
    for name in ("events_plain", "events_zstd"):
        r = results[name]
        print(f"  {name:<18} event(): console {r['ns_per_console_event']:5.0f} ns, hypercall "
              f"{r['ns_per_hypercall_event']:5.0f} ns  {r['bytes_per_event']:6.1f} B/event  {r['mb_per_s']:6.1f} MB/s")
    r = results["mixed_plain"]
    print(f"  {'mixed_plain':<18} {r['ns_per_record']:6.0f} ns/record, {r['bytes_per_record']:.1f} B/record")
    for name in ("read_plain", "read_zstd", "read_mixed"):
        r = results[name]
        line = (f"  {name:<18} events(): {r['events_per_s'] / 1e6:5.2f} M events/s   exit_columns(): "
                f"{r['exit_columns_rows_per_s'] / 1e6:6.1f} M rows/s   exit_rows(): {r['exit_rows_per_s'] / 1e6:5.1f} M rows/s")
        if "numpy_rows_per_s" in r:
            line += f"   numpy.frombuffer: {r['numpy_rows_per_s'] / 1e6:6.1f} M rows/s"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
