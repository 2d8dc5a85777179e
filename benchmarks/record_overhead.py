"""Exit cost of `run`, `record` and `replay` against a C reference loop, measured in ONE run.

    python benchmarks/record_overhead.py [--n 200000] [--repeat 3]
    python benchmarks/record_overhead.py --against OTHER_CHECKOUT [--n 100000] [--repeat 5]

Two guests: `uart-loop`, a few instructions of assembly doing N single-byte OUTs to the UART port and
nothing else (the pure exit cost, directly comparable with the C loop), and the `compute` example (each
of its N UART exits also runs an integer hash step in the guest; guest instructions are slow on nested
KVM, so its figures include that guest work).  Each configuration runs with N and with a small N0;
per-exit cost = (T(N) − T(N0)) / (exits(N) − exits(N0)), which removes process start-up and boot.  The
best of --repeat runs is kept (these machines are noisy).  The C reference is a raw-KVM program
(benchmarks/c_reference_loop.c) doing the same kind of exit, built here with gcc.

``--against DIR`` compares this checkout with another one (e.g. an older commit unpacked with
``git archive``) side by side: the uart-loop's run, record and replay per-exit cost of both, the two trees
alternating measurement by measurement so that machine load hits both alike, in wall time and in CPU time
(user + sys of the tracevisor process, which includes the vCPU thread's time in the guest), with ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from asmguest import build_asm  # noqa: E402  (benchmarks/asmguest.py)

HERE = Path(__file__).resolve().parent


def exits_for(n: int) -> int:
    return n + n // 64 + (1 if n % 64 else 0) + 4  # UART bytes + cmdsize, cmdval, write, exit


UART_LOOP = """
  mov ${n}, %ecx
  mov $0x800, %dx
  mov $'.', %al
1: outb %al, %dx
  dec %ecx
  jnz 1b
"""


def build_uart_loop(tmp: Path, n: int) -> str:
    return build_asm(tmp, f"uart{n}", UART_LOOP.format(n=n))


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def timed_cpu(cmd: list[str], env: dict) -> tuple[float, float]:
    """(wall, user + sys CPU) seconds of one child process."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wall = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def against(a: argparse.Namespace) -> int:
    """Side by side: this checkout vs ``a.against``, interleaved, wall and CPU per exit."""
    trees = {"before": os.path.abspath(a.against), "after": str(HERE.parent)}
    tmp = Path(tempfile.mkdtemp(prefix="tv-bench-"))
    loop = {n: build_uart_loop(tmp, n) for n in (a.n, a.n0)}
    d = a.n - a.n0
    best = {(label, tree): [float("inf"), float("inf")] for label in ("run", "record", "replay") for tree in trees}
    for _ in range(a.repeat):
        for label in ("run", "record", "replay"):
            for tree, path in trees.items():
                env = dict(os.environ, PYTHONPATH=path)
                cost = []
                for n in (a.n, a.n0):
                    trace = str(tmp / f"{tree}{n}.tvt")
                    cmd = [sys.executable, "-m", "tracevisor"] + {
                        "run": ["run", loop[n]], "record": ["record", "-q", "-o", trace, loop[n]],
                        "replay": ["replay", "-q", trace]}[label]
                    cost.append(timed_cpu(cmd, env))
                b = best[(label, tree)]
                b[0] = min(b[0], (cost[0][0] - cost[1][0]) / d)
                b[1] = min(b[1], (cost[0][1] - cost[1][1]) / d)
    print(f"uart-loop N={a.n}, N0={a.n0}, best of {a.repeat}, trees alternating; µs per exit")
    print(f"  before = {trees['before']}\n  after  = {trees['after']}")
    print(f"{'':<8}{'wall before':>12}{'after':>8}{'ratio':>7}   {'CPU before':>11}{'after':>8}{'ratio':>7}")
    for label in ("run", "record", "replay"):
        (wb, cb), (wa, ca) = best[(label, "before")], best[(label, "after")]
        print(f"{label:<8}{wb * 1e6:>12.2f}{wa * 1e6:>8.2f}{wa / wb:>7.2f}   {cb * 1e6:>11.2f}{ca * 1e6:>8.2f}"
              f"{ca / cb:>7.2f}")
    for tree in trees:
        (wr, cr), (wc, cc), (wp, cp) = (best[(label, tree)] for label in ("run", "record", "replay"))
        print(f"{tree:<7} record/run {wc / wr:4.2f} wall, {cc / cr:4.2f} CPU; replay/record {wp / wc:4.2f} wall, "
              f"{cp / cc:4.2f} CPU")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--n0", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--against", metavar="DIR", help="compare with the tracevisor checkout in DIR, side by side")
    a = ap.parse_args()
    if a.against:
        return against(a)

    from tracevisor import guestbuild

    tmp = Path(tempfile.mkdtemp(prefix="tv-bench-"))
    kernel = str(guestbuild.build(["compute"], outdir=tmp)["compute"])
    cref = tmp / "c_reference_loop"
    subprocess.run(["gcc", "-O2", "-o", str(cref), str(HERE / "c_reference_loop.c")], check=True)
    tv = [sys.executable, "-m", "tracevisor"]
    d_exits = exits_for(a.n) - exits_for(a.n0)

    def per_exit(make_cmd, d=d_exits) -> float:
        best = float("inf")
        for _ in range(a.repeat):
            t_n = timed(make_cmd(a.n))
            t_0 = timed(make_cmd(a.n0))
            best = min(best, (t_n - t_0) / d)
        return best * 1e6

    loop = {n: build_uart_loop(tmp, n) for n in (a.n, a.n0)}
    d_loop = a.n - a.n0
    c_best = float("inf")
    for _ in range(a.repeat):
        out = subprocess.run([str(cref), str(a.n)], check=True, capture_output=True, text=True).stdout
        c_best = min(c_best, float(out.split("us_per_exit=")[1].split()[0]))
    size = lambda p: os.path.getsize(tmp / p)  # noqa: E731

    print(f"N={a.n}, N0={a.n0}, best of {a.repeat} runs; µs per exit")
    print(f"{'':<14}{'uart-loop':>10}{'compute':>10}")
    rows = {}
    for label, make in (
        ("run", lambda g, k: lambda n: tv + ["run", k(n)] + g(n)),
        ("record", lambda g, k: lambda n: tv + ["record", "-q", "-o", str(tmp / f"{Path(k(n)).name}{n}.tvt"), k(n)] + g(n)),
        ("record zstd", lambda g, k: lambda n: tv + ["record", "-q", "--compress", "zstd", "-o",
                                                     str(tmp / f"z{Path(k(n)).name}{n}.tvt"), k(n)] + g(n)),
        ("replay", lambda g, k: lambda n: tv + ["replay", "-q", str(tmp / f"{Path(k(n)).name}{n}.tvt")]),
    ):
        u = per_exit(make(lambda n: [], lambda n: loop[n]), d_loop)
        c = per_exit(make(lambda n: [str(n)], lambda n: kernel))
        rows[label] = (u, c)
        print(f"{label:<14}{u:>10.2f}{c:>10.2f}")
    print(f"{'C reference':<14}{c_best:>10.2f}{'':>10}")
    (ru, rc), (cu, cc), (pu, pc) = rows["run"], rows["record"], rows["replay"]
    print(f"record / run       {cu / ru:5.2f}× uart-loop, {cc / rc:5.2f}× compute   (target ≤ 1.10)")
    print(f"record / C loop    {cu / c_best:5.2f}× uart-loop                 (target ≤ 1.30)")
    print(f"run / C loop       {ru / c_best:5.2f}× uart-loop")
    print(f"replay / record    {pu / cu:5.2f}× uart-loop, {pc / cc:5.2f}× compute   (target ≤ 1.00)")
    bpe = (size(f"compute{a.n}.tvt") - size(f"compute{a.n0}.tvt")) / d_exits
    bpe_z = (size(f"zcompute{a.n}.tvt") - size(f"zcompute{a.n0}.tvt")) / d_exits
    print(f"trace bytes/exit   {bpe:5.1f} B plain, {bpe_z:5.2f} B zstd (compute)   (target ≤ 32)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
