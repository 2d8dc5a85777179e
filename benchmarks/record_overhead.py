"""Exit cost of `run`, `record` and `replay` against a C reference loop, measured in ONE run.

    python benchmarks/record_overhead.py [--n 200000] [--repeat 3]

Two guests: `uart-loop`, a few instructions of assembly doing N single-byte OUTs to the UART port and
nothing else (the pure exit cost, directly comparable with the C loop), and the `compute` example (each
of its N UART exits also runs an integer hash step in the guest; guest instructions are slow on nested
KVM, so its figures include that guest work).  Each configuration runs with N and with a small N0;
per-exit cost = (T(N) − T(N0)) / (exits(N) − exits(N0)), which removes process start-up and boot.  The
best of --repeat runs is kept (these machines are noisy).  The C reference is a raw-KVM program
(benchmarks/c_reference_loop.c) doing the same kind of exit, built here with gcc.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def exits_for(n: int) -> int:
    return n + n // 64 + (1 if n % 64 else 0) + 4  # UART bytes + cmdsize, cmdval, write, exit


UART_LOOP = """
.globl _start
.text
_start:
  mov ${n}, %ecx
  mov $0x800, %dx
  mov $'.', %al
1: outb %al, %dx
  dec %ecx
  jnz 1b
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
.data
exitblk: .long 0
"""


def build_uart_loop(tmp: Path, n: int) -> str:
    src = tmp / f"uart{n}.S"
    src.write_text(UART_LOOP.format(n=n))
    out = tmp / f"uart{n}"
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x400000", "-o", str(out), str(src)],
                   check=True)
    return str(out)


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--n0", type=int, default=2_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

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
