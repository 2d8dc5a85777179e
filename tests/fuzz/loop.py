"""Plain-loop fuzz harness for million-input runs (no hypothesis overhead, no shrinking).

    python tests/fuzz/loop.py dispatch -n 1000000 --seed 1
    python tests/fuzz/loop.py trace -n 1000000 --seed 1
    python tests/fuzz/loop.py virtqueue -n 1000000 --seed 1
    python tests/fuzz/loop.py dispatch --replay SEED:ITERATION     # re-run one reported input

Input i of a run is generated from ``random.Random(f"{seed}:{i}")``, so every failure is reported as
``SEED:ITERATION`` and replays alone.  Failures (any exception other than GuestError from dispatch or the
queue parser, TraceError from open_trace, any broken host invariant) are printed with their traceback and counted; the
run continues.  The exit status is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fuzzlib import DispatchWorld, QueueWorld, RandomChooser, base_trace, check_trace_file, trace_case  # noqa: E402

CHECK_EVERY = 200  # host snapshot and fd-table recycling period (dispatch)


def _rng(seed: str, i: int) -> RandomChooser:
    return RandomChooser(random.Random(f"{seed}:{i}"))


def run_dispatch(n: int, seed: str, start: int, record: bool, report) -> tuple[int, int]:
    failures = 0
    with tempfile.TemporaryDirectory(prefix="tv-fuzz-dispatch-") as root:
        world = DispatchWorld(root, record=record)
        for i in range(start, start + n):
            try:
                world.case(_rng(seed, i))
                world.maintain(i, CHECK_EVERY)
            except Exception:
                failures += 1
                report(f"FAIL dispatch {seed}:{i}\n{traceback.format_exc()}")
                world.recycle()
            if i % 50000 == 0:
                report(f"dispatch {i - start}/{n} inputs, {world.guest_errors} guest errors, {failures} failures")
        world.check_host()
        world.close()
        report(f"dispatch: {n} inputs, {world.guest_errors} GuestError, "
               f"{n - world.guest_errors} served, {failures} failures")
    return n, failures


def run_virtqueue(n: int, seed: str, start: int, report) -> tuple[int, int]:
    failures = 0
    world = QueueWorld()
    for i in range(start, start + n):
        try:
            world.case(_rng(seed, i))
        except Exception:
            failures += 1
            report(f"FAIL virtqueue {seed}:{i}\n{traceback.format_exc()}")
        if i % 50000 == 0:
            report(f"virtqueue {i - start}/{n} inputs, {world.chains} chains, {failures} failures")
    world.close()
    report(f"virtqueue: {n} inputs, {world.chains} chains served, {world.guest_errors} GuestError, "
           f"{failures} failures")
    return n, failures


def run_trace(n: int, seed: str, start: int, report) -> tuple[int, int]:
    failures = 0
    counts = {"refused": 0, "read": 0}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="tv-fuzz-trace-", dir=shm) as d:
        bases = {c: base_trace(os.path.join(d, f"base-{c}.tvt"), c) for c in (None, "zstd")}
        path = os.path.join(d, "case.tvt")
        for i in range(start, start + n):
            try:
                data = trace_case(_rng(seed, i), bases)
                with open(path, "wb") as f:
                    f.write(data)
                counts[check_trace_file(path)] += 1
            except Exception:
                failures += 1
                report(f"FAIL trace {seed}:{i}\n{traceback.format_exc()}")
            if i % 50000 == 0:
                report(f"trace {i - start}/{n} inputs, {counts}, {failures} failures")
    report(f"trace: {n} inputs, {counts['refused']} refused by open_trace (TraceError), "
           f"{counts['read']} opened and read, {failures} failures")
    return n, failures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("target", choices=["dispatch", "trace", "virtqueue"])
    ap.add_argument("-n", type=int, default=100000, help="number of inputs (default 100000)")
    ap.add_argument("--seed", default="1")
    ap.add_argument("--start", type=int, default=0, help="first iteration number")
    ap.add_argument("--record", action="store_true", help="dispatch: wrap the host I/O in RecordingHostIO")
    ap.add_argument("--replay", metavar="SEED:ITERATION", help="run this one input")
    ns = ap.parse_args(argv)
    sys.stdin = open(os.devnull)  # a READ of fd 0 must not wait for a terminal
    if ns.replay:
        ns.seed, it = ns.replay.rsplit(":", 1)
        ns.start, ns.n = int(it), 1

    def report(msg: str) -> None:
        print(msg, flush=True)

    t = time.monotonic()
    if ns.target == "dispatch":
        n, failures = run_dispatch(ns.n, ns.seed, ns.start, ns.record, report)
    elif ns.target == "virtqueue":
        n, failures = run_virtqueue(ns.n, ns.seed, ns.start, report)
    else:
        n, failures = run_trace(ns.n, ns.seed, ns.start, report)
    dt = time.monotonic() - t
    report(f"{ns.target}: {n} inputs in {dt:.0f} s ({n / dt:.0f}/s), {failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
