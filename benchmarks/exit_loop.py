"""CPU cost per exit of run / record / replay against a raw-KVM C loop, native and pure-Python loops, in ONE run.

    python benchmarks/exit_loop.py [--n 200000] [--n0 2000] [--rounds 3]

The guest (`uart-loop`) is a few instructions doing N one-byte OUTs to the UART port, then the exit
hypercall: the pure exit cost, the same exit as the C reference (benchmarks/c_reference_loop.c, built here
with gcc).  Every configuration runs as a whole process with N and with N0; the cost per exit is
(cpu(N) − cpu(N0)) / (N − N0), where cpu is user + system time of the whole process (start-up, boot and
Python imports cancel out).  CPU time, not wall time, so a loaded host does not blur the figures; wall time
is the second column.  The configurations are interleaved round by round, each one paired with a C-loop
measurement taken just before it (C, run, C, record, …; then the next round); a ratio is the median over the
rounds of config / its paired C loop, which keeps it meaningful when the host's speed drifts.  The pure-Python loop runs with TRACEVISOR_PURE_PYTHON=1.  With
--coalesce-console the bytes do not leave the kernel one by one: its row is the cost per UART byte.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from record_overhead import build_uart_loop  # noqa: E402  (the same guest)

PURE = {"TRACEVISOR_PURE_PYTHON": "1"}


def measure(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """(cpu seconds, wall seconds) of one whole process, its output discarded."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--n0", type=int, default=2_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated configuration names to run (C loop always)")
    a = ap.parse_args()
    if a.rounds < 3:
        ap.error("use at least 3 rounds (the median is reported)")

    from tracevisor import fastloop

    if fastloop.load() is None:
        print(f"native loop unavailable: {fastloop.unavailable_reason()}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="tv-exitloop-"))
    cref = tmp / "c_reference_loop"
    subprocess.run(["gcc", "-O2", "-o", str(cref), str(HERE / "c_reference_loop.c")], check=True)
    guest = {n: build_uart_loop(tmp, n) for n in (a.n, a.n0)}
    tv = [sys.executable, "-m", "tracevisor"]

    def trace(tag: str, n: int) -> str:
        return str(tmp / f"{tag}{n}.tvt")

    # name -> (command for N, environment); record configurations before the replays that read their traces
    configs: dict[str, tuple] = {
        "C loop": (lambda n: [str(cref), str(n)], None),
        "run": (lambda n: tv + ["run", guest[n]], None),
        "run (pure Python)": (lambda n: tv + ["run", guest[n]], PURE),
        "record": (lambda n: tv + ["record", "-q", "--parallel", "-o", trace("n", n), guest[n]], None),
        "record (pure Python)": (lambda n: tv + ["record", "-q", "--parallel", "-o", trace("p", n), guest[n]], PURE),
        "record zstd": (lambda n: tv + ["record", "-q", "--parallel", "--compress", "zstd", "-o", trace("z", n), guest[n]], None),
        "record zstd (pure Python)": (lambda n: tv + ["record", "-q", "--parallel", "--compress", "zstd", "-o", trace("zp", n),
                                                      guest[n]], PURE),
        # record's default, exact mode: its interrupt model acts at every exit, so it runs the Python loop
        "record (exact)": (lambda n: tv + ["record", "-q", "-o", trace("e", n), guest[n]], None),
        "replay": (lambda n: tv + ["replay", "-q", trace("n", n)], None),
        "replay (pure Python)": (lambda n: tv + ["replay", "-q", trace("p", n)], PURE),
        "run --coalesce-console": (lambda n: tv + ["run", "--coalesce-console", guest[n]], None),
        "record --coalesce-console": (lambda n: tv + ["record", "-q", "--parallel", "--coalesce-console", "-o", trace("c", n),
                                                      guest[n]], None),
        "replay --coalesce-console": (lambda n: tv + ["replay", "-q", trace("c", n)], None),
    }
    if a.only:
        keep = {"C loop", *(s.strip() for s in a.only.split(","))}
        unknown = keep - set(configs)
        if unknown:
            ap.error(f"unknown configuration(s): {', '.join(sorted(unknown))}")
        configs = {k: v for k, v in configs.items() if k in keep}
    per_cpu: dict[str, list[float]] = {k: [] for k in configs}
    per_wall: dict[str, list[float]] = {k: [] for k in configs}
    ratio_cpu: dict[str, list[float]] = {k: [] for k in configs}
    ratio_wall: dict[str, list[float]] = {k: [] for k in configs}
    d = a.n - a.n0

    def per_exit(make, env) -> tuple[float, float]:
        c0, w0 = measure(make(a.n0), env)
        c1, w1 = measure(make(a.n), env)
        return (c1 - c0) / d * 1e6, (w1 - w0) / d * 1e6

    c_make = configs["C loop"][0]
    for r in range(a.rounds):
        for name, (make, env) in configs.items():
            if name == "C loop":
                continue
            ccpu, cwall = per_exit(c_make, None)
            cpu, wall = per_exit(make, env)
            per_cpu["C loop"].append(ccpu)
            per_wall["C loop"].append(cwall)
            per_cpu[name].append(cpu)
            per_wall[name].append(wall)
            ratio_cpu[name].append(cpu / ccpu)
            ratio_wall[name].append(wall / cwall)
        print(f"round {r + 1}/{a.rounds} done", file=sys.stderr, flush=True)

    med = statistics.median
    print(f"uart-loop guest, N={a.n}, N0={a.n0}; median of {a.rounds} interleaved rounds; "
          "per exit (coalesced: per UART byte)")
    print(f"{'':<28}{'cpu µs':>9}{'× C':>7}{'wall µs':>10}{'× C':>7}   cpu × C per round")
    print(f"{'C loop':<28}{med(per_cpu['C loop']):>9.2f}{1:>7.2f}{med(per_wall['C loop']):>10.2f}{1:>7.2f}")
    for name in configs:
        if name == "C loop":
            continue
        rounds = " ".join(f"{x:.2f}" for x in ratio_cpu[name])
        print(f"{name:<28}{med(per_cpu[name]):>9.2f}{med(ratio_cpu[name]):>7.2f}{med(per_wall[name]):>10.2f}"
              f"{med(ratio_wall[name]):>7.2f}   {rounds}")
    print("targets (cpu × C loop): run ≤ 1.05, record ≤ 1.10, replay ≤ 1.10, coalesced console ≤ 0.25")
    return 0


if __name__ == "__main__":
    sys.exit(main())
