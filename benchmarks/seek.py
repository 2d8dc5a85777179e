"""Checkpoint + seek cost in a `compute` replay: seek backwards 1 000 and 100 000 exits.

    python benchmarks/seek.py [--n 200000] [--every 5000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--every", type=int, default=5000, help="exits between checkpoints")
    a = ap.parse_args()
    from tracevisor import guestbuild, replay, session
    from tracevisor.trace import open_trace

    tmp = Path(tempfile.mkdtemp(prefix="tv-seek-"))
    kernel = guestbuild.build(["compute"], outdir=tmp)["compute"]
    trace = tmp / "compute.tvt"
    stop = session.record(kernel, trace, args=[str(a.n)])
    assert stop.code == 0, stop.message
    seqs = [e["seq"] for e in open_trace(trace).events(kinds=["exit"])]
    end = len(seqs) - 10
    if end < 2:
        print(f"the recording has {len(seqs)} exits: too few to seek in (use a larger --n)", file=sys.stderr)
        return 2
    with replay.Replayer(trace, checkpoint_every=a.every) as r:
        t = time.perf_counter()
        r.run_to(seqs[end])
        fwd = time.perf_counter() - t
        print(f"replay to exit {end} with a checkpoint every {a.every} exits: {fwd:.2f} s, "
              f"{len(r.store.checkpoints)} checkpoints, {r.store.nbytes / 2**20:.1f} MiB of pages")
        for back in (1_000, 100_000):
            if back > end:
                print(f"seek back {back:>7} exits: skipped (the recording has {len(seqs)} exits; use a larger --n)")
                continue
            r.seek(seqs[end])
            t = time.perf_counter()
            r.seek(seqs[end - back])
            dt = time.perf_counter() - t
            assert r.position == seqs[end - back]
            print(f"seek back {back:>7} exits: {dt:.3f} s")
        t = time.perf_counter()
        r.step_back()
        print(f"step_back (one exit): {time.perf_counter() - t:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
