"""What replay verdicts cost: register digests per exit, memory hashes, trace bytes — measured in ONE run.

    python benchmarks/verdict_cost.py [--n 100000] [--repeat 3]

* digest: zlib.crc32 over the 144-byte register block of a kvm_run-sized buffer, through a memoryview
  made once (what the run loop does), per call;
* record per exit, side by side: this checkout against the previous format (the tree of git revision
  ``--base``, default ``main``, extracted to a temporary directory; skipped when it already writes
  digests), on a guest doing N single-byte UART OUTs: (T(N) − T(N0)) / (exits(N) − exits(N0)), best of
  --repeat, wall and CPU (user+sys of the child);
* replay per exit (this checkout), the same way;
* a memory hash (dirty log + rehash of the dirty pages) after k written pages, in µs;
* trace bytes per exit, raw and with --compress zstd.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from asmguest import build_asm  # noqa: E402  (benchmarks/asmguest.py)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

UART_LOOP = """
  mov ${n}, %ecx
  mov $0x800, %dx
1: mov %ecx, %eax
  outb %al, %dx
  dec %ecx
  jnz 1b
"""


def build(tmp: Path, n: int) -> Path:
    return Path(build_asm(tmp, f"loop{n}", UART_LOOP.format(n=n)))


def timed(cmd: list[str], pythonpath: Path) -> tuple[float, float]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, cwd=pythonpath)  # (-m puts the cwd first on sys.path)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.decode()[-400:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def per_exit(fn, n: int, n0: int, repeat: int) -> tuple[float, float]:
    best = None
    for _ in range(repeat):
        w1, c1 = fn(n)
        w0, c0 = fn(n0)
        cur = ((w1 - w0) / (n - n0), (c1 - c0) / (n - n0))
        best = cur if best is None or cur[0] < best[0] else best
    return best


def digest_cost(calls: int = 1_000_000) -> float:
    buf = bytearray(8192)
    view = memoryview(buf)[304:448]
    crc32 = zlib.crc32
    t = time.perf_counter()
    for _ in range(calls):
        crc32(view)
    loop = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(calls):
        pass
    empty = time.perf_counter() - t
    return (loop - empty) / calls


def memhash_cost(pages_list=(1, 16, 256)) -> dict[int, float]:
    sys.path.insert(0, str(ROOT))
    from tracevisor.loader import load_kernel
    from tracevisor.machine import Machine, VmConfig
    from tracevisor.memhash import MemoryHasher

    with tempfile.TemporaryDirectory() as d:
        k = build(Path(d), 10)
        m = Machine(VmConfig(kernel=str(k)), load_kernel(str(k), 64 << 20))
        try:
            h = MemoryHasher(m)
            t = time.perf_counter()
            h.start()
            out = {0: time.perf_counter() - t}
            for n in pages_list:
                for p in range(n):
                    m.memory.write((1024 + p) << 12, os.urandom(8))
                t = time.perf_counter()
                h.update()
                out[n] = time.perf_counter() - t
        finally:
            m.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--base", default="main", help="git revision of the comparison record (default main)")
    ns = ap.parse_args()
    n, n0 = ns.n, max(1000, ns.n // 20)
    print(f"digest (crc32 of 144 bytes via a memoryview): {digest_cost() * 1e6:.3f} µs per exit")
    for k, t in memhash_cost().items():
        what = "full scan of 64 MiB at boot" if k == 0 else f"{k} dirty pages"
        print(f"memory hash, {what}: {t * 1e6:.0f} µs")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        kernels = {m: build(tmp, m) for m in (n, n0)}
        base = tmp / "base"
        base.mkdir()
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", ns.base], capture_output=True)
        old_ok = tar.returncode == 0 and subprocess.run(["tar", "-x", "-C", str(base)], input=tar.stdout).returncode == 0
        if old_ok:
            probe = subprocess.run([sys.executable, "-c", "from tracevisor.trace.schema import FORMAT_VERSION as F;"
                                    "print(F[0])"], env=dict(os.environ, PYTHONPATH=str(base)), capture_output=True,
                                   cwd=base)
            old_ok = probe.stdout.strip() == b"1"

        def rec(tree: Path, compress: str = "none"):
            def go(m: int):
                return timed([sys.executable, "-m", "tracevisor", "record", "-q", "--compress", compress, "-o",
                              str(tmp / f"t{m}.tvt"), str(kernels[m])], tree)
            return go

        def rep(m: int):
            return timed([sys.executable, "-m", "tracevisor", "replay", "-q", str(tmp / f"t{m}.tvt")], ROOT)

        rows = []
        if old_ok:
            rows.append((f"record, format 1 ({ns.base})", per_exit(rec(base), n, n0, ns.repeat)))
        rows.append(("record, format 2 (digests + memory hashes)", per_exit(rec(ROOT), n, n0, ns.repeat)))
        raw = (tmp / f"t{n}.tvt").stat().st_size / (n + 2)
        rows.append(("replay, format 2 (digests + memory hashes)", per_exit(rep, n, n0, ns.repeat)))
        for label, (w, c) in rows:
            print(f"{label:<48} {w * 1e6:6.2f} µs/exit wall, {c * 1e6:6.2f} µs/exit CPU")
        if old_ok:
            print(f"record ratio format 2 / format 1: {rows[1][1][0] / rows[0][1][0]:.3f} (wall), "
                  f"{rows[1][1][1] / rows[0][1][1]:.3f} (CPU)")
        rec(ROOT, "zstd")(n)
        z = (tmp / f"t{n}.tvt").stat().st_size / (n + 2)
        print(f"trace bytes per exit: {raw:.2f} raw, {z:.2f} zstd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
