"""Boot-to-exit time of the `hello` guest inside the hypervisor (VM creation → guest EXIT), and of the
whole `tracevisor run` process, best of N.

    python benchmarks/boot_time.py [--repeat 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    from tracevisor import guestbuild, session

    kernel = str(guestbuild.example("hello"))
    inproc, phases = [], []
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        cfg = session.SessionConfig(kernel=kernel, quiet=True)
        image = session.load(cfg)
        t1 = time.perf_counter()
        s = session.build_run(cfg, image)
        t2 = time.perf_counter()
        info = s.run()
        t3 = time.perf_counter()
        s.close()
        assert info.code == 0
        inproc.append(t3 - t0)
        phases.append((t1 - t0, t2 - t1, t3 - t2))
    best = min(range(len(inproc)), key=inproc.__getitem__)
    load, create, run = phases[best]
    proc = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tracevisor", "run", kernel], check=True, stdout=subprocess.DEVNULL)
        proc.append(time.perf_counter() - t)
    print(f"hello, best of {a.repeat}:")
    print(f"  hypervisor time, load ELF → guest EXIT: {min(inproc) * 1e3:6.1f} ms "
          f"(load {load * 1e3:.1f} ms, create VM {create * 1e3:.1f} ms, boot+run {run * 1e3:.1f} ms)")
    print(f"  whole `tracevisor run` process:         {min(proc) * 1e3:6.1f} ms (includes Python start-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
