"""How fast ``analysis.load`` turns a trace's exit rows into the ``exits`` DataFrame.

    python benchmarks/analysis_load.py [--exits N] [--cpus C] [--every K] [--compress zstd] [--keep FILE] [--json]

Writes a trace of N exits (default 5,000,000) with the real TraceWriter — C vCPUs round-robin, a
hypercall/hostio/console group after every K-th exit (default 100, i.e. ~3 % rich events, like a guest that
writes a line now and then) — then times ``analysis.load(path)`` (reading, CRC checks, decoding, building the
frame including durations) and the ``exits`` frame alone, and reports exits per second.  The target is
>= 5 M exits/s.
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

from tracevisor.trace import TraceWriter  # noqa: E402


def write_trace(path: str, n: int, cpus: int = 1, every: int = 100, compress: str | None = None) -> dict:
    w = TraceWriter(path, {"argv": ["bench"], "cpus": cpus}, compress=compress)
    ex, ev = w.exit, w.event
    block = bytes(20)
    line = b"bench line\n"
    t0 = time.perf_counter()
    t = 0
    for i in range(n):
        cpu = i % cpus
        t += 700
        if every and i % every == every - 1:
            ex(cpu, t, 2, 0x40070C, 0x400, 1, 4, 0x414ED0)
            ev("console", cpu, t + 100, stream="stdout", data=line)
            ev("hostio", cpu, t + 150, op="write", args=[1, len(line)], ret=len(line))
            ev("hypercall", cpu, t + 50, call="write", port=0x400, addr=0x414ED0, block=block,
               args={"fd": 1, "buf": 0x4C5C80, "len": len(line)}, ret=len(line), payload=line, t_end=t + 200)
            t += 300
        else:
            ex(cpu, t, 2, 0x4001AC, 0x800, 1, 1, 0x2E)
    summary = w.close({"k": "stop", "code": 0, "reason": "exit"})
    return {"write_s": time.perf_counter() - t0, "events": summary.get("events"), "file_bytes": os.path.getsize(path)}


def bench_load(path: str, repeat: int = 3) -> dict:
    from tracevisor import analysis
    from tracevisor.analysis.frames import load

    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        tr = load(path)
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    n = len(tr.exits)
    t0 = time.perf_counter()
    _ = tr.hypercalls  # builds the frame
    rich_s = time.perf_counter() - t0
    assert analysis.load is load
    return {"exits": n, "load_s": best, "exits_per_s": n / best, "hypercalls": len(tr.hypercalls),
            "hypercalls_frame_s": rich_s, "exits_frame_mib": tr.exits.memory_usage(deep=False).sum() / 2**20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=5_000_000)
    ap.add_argument("--cpus", type=int, default=1)
    ap.add_argument("--every", type=int, default=100, help="a write hypercall group after every K-th exit (0: none)")
    ap.add_argument("--compress", choices=["none", "zstd"], default="none")
    ap.add_argument("--keep", metavar="FILE", help="write the trace here and keep it (reused if it exists)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ns = ap.parse_args()
    tmp = None
    if ns.keep:
        path = ns.keep
    else:
        tmp = tempfile.TemporaryDirectory()
        path = os.path.join(tmp.name, "bench.tvt")
    result: dict = {"exits_requested": ns.exits, "cpus": ns.cpus, "every": ns.every, "compress": ns.compress}
    if not (ns.keep and os.path.exists(path)):
        result["write"] = write_trace(path, ns.exits, ns.cpus, ns.every, None if ns.compress == "none" else ns.compress)
    result["load"] = bench_load(path, ns.repeat)
    if ns.json:
        print(json.dumps(result, indent=2))
    else:
        ld = result["load"]
        if "write" in result:
            w = result["write"]
            print(f"wrote {w['events']} events ({w['file_bytes'] / 2**20:.1f} MiB) in {w['write_s']:.1f} s")
        print(f"analysis.load: {ld['exits']} exits in {ld['load_s']:.3f} s = {ld['exits_per_s'] / 1e6:.2f} M exits/s "
              f"(best of {ns.repeat}); exits frame {ld['exits_frame_mib']:.0f} MiB; hypercalls frame "
              f"({ld['hypercalls']} rows) {ld['hypercalls_frame_s']:.2f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
