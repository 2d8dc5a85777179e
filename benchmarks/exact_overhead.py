"""Exact record vs `record --parallel` vs `run`, and replay vs record, measured side by side in ONE run.

    python benchmarks/exact_overhead.py [--repeat 3] [--hermit] [--only NAME ...]

Guests:

* ``compute`` — the bundled example (UART exits plus integer work; no RDTSC in its loop);
* ``tsc-loop`` — N iterations of RDTSC + RDRAND with nothing else (every one a recorded exit in exact
  mode; the per-instruction cost is (T(exact) − T(parallel)) / (2·N));
* ``smp-race`` — two vCPUs incrementing a shared counter without locks (the exact recording runs one
  vCPU at a time and switches by kicks);
* ``lapic-busy``, ``lapic-hlt``, ``pit`` — the timer guests of tests/test_timer.py (30 ticks of a 50 µs
  xAPIC periodic timer cut into a loop without exits, or between HLTs; 30 PIT ticks with ``--pit``): the
  exact recording takes them from the user-space LAPIC/PIT on virtual time, ``run`` and
  ``record --parallel`` from KVM's;
* with ``--hermit``: ``rusty-c1`` and ``rusty-c2`` — the Hermit project's rusty_demo (guests/hermit) with
  one and two vCPUs: the TSC, the LAPIC timer, the instruction fallback's bursts and work stealing.

Each configuration is a fresh ``python -m tracevisor`` process; wall time and the CPU time (user+sys) of
the child are reported, best of --repeat.
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

ROOT = Path(__file__).resolve().parents[1]

TSC_LOOP = """
  mov ${n}, %ecx
1: rdtsc
  rdrand %rax
  dec %ecx
  jnz 1b
"""




def timed(args: list[str]) -> tuple[float, float, int]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "tracevisor", *args], env=env, capture_output=True, timeout=600)
    wall = time.monotonic() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, p.returncode


def best(args: list[str], repeat: int) -> tuple[float, float, int]:
    runs = [timed(args) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs), runs[-1][2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--n", type=int, default=5000, help="tsc-loop iterations")
    ap.add_argument("--hermit", action="store_true", help="also rusty_demo with 1 and 2 vCPUs (minutes)")
    ap.add_argument("--only", nargs="*", default=None, help="only these guests")
    ns = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_exact import RACE, RACE_DATA  # the racing guest of the tests
    from test_timer import build_timer_guest  # the timer guests of the tests

    from tracevisor.guestbuild import example

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        race = build_asm(tmp, "race", RACE, RACE_DATA)
        guests = {
            "compute": ([str(example("compute")), "20000"], 1),
            "tsc-loop": ([build_asm(tmp, "tsc", TSC_LOOP.replace("{n}", str(ns.n)))], 1),
            "smp-race": ([race], 2),
        }
        for name, guest in (("lapic-busy", "xapic-busy"), ("lapic-hlt", "xapic-hlt"), ("pit", "pit")):
            path, opts = build_timer_guest(tmp, guest)
            guests[name] = ((["--pit"] if opts.get("pit") else []) + [str(path)], 1)
        if ns.hermit:
            env = [a for i in range(5) for a in ("--env", f"E{i}=v{i}")]  # Hermit 0.6.x needs ≥4 entries
            rusty = str(ROOT / "guests" / "hermit" / "rusty_demo")
            guests["rusty-c1"] = ([*env, rusty], 1)
            guests["rusty-c2"] = ([*env, rusty], 2)
        if ns.only:
            guests = {k: v for k, v in guests.items() if k in ns.only}
        print(f"{'guest':<10} {'mode':<18} {'wall s':>8} {'cpu s':>8} {'× run':>7} {'× parallel':>10}")
        for name, (kargs, cpus) in guests.items():
            trace_e, trace_p = str(tmp / f"{name}-e.tvt"), str(tmp / f"{name}-p.tvt")
            c = ["-c", str(cpus)]
            rows = {
                "run": best(["run", *c, *kargs], ns.repeat),
                "record --parallel": best(["record", "-q", "--parallel", "-o", trace_p, *c, *kargs], ns.repeat),
                "record (exact)": best(["record", "-q", "-o", trace_e, *c, *kargs], ns.repeat),
                "replay (exact)": best(["replay", "-q", trace_e], ns.repeat),
            }
            for mode, (wall, cpu, rc) in rows.items():
                print(f"{name:<10} {mode:<18} {wall:8.3f} {cpu:8.3f} {wall / rows['run'][0]:7.2f} "
                      f"{wall / rows['record --parallel'][0]:10.2f}" + (f"  (status {rc})" if rc not in (0,) and
                                                                          name == "compute" else ""))
            if name == "tsc-loop":
                per = (rows["record (exact)"][0] - rows["record --parallel"][0]) / (2 * ns.n)
                print(f"{'':<10} cost per recorded RDTSC/RDRAND: {per * 1e6:.1f} µs wall")
            print(f"{'':<10} replay / exact record: wall {rows['replay (exact)'][0] / rows['record (exact)'][0]:.2f}, "
                  f"cpu {rows['replay (exact)'][1] / rows['record (exact)'][1]:.2f}; exact / parallel record: "
                  f"cpu {rows['record (exact)'][1] / rows['record --parallel'][1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
