"""Boot-to-exit of the prebuilt Hermit kernels through the instruction fallback: wall and CPU time,
fallback count, bursts, instructions, mean register-transfer and burst time per burst.

    PYTHONPATH=. python benchmarks/hermit_boot.py [--atomics] [hello_world rusty_demo ...]

``--atomics`` runs each kernel twice side by side: bursts that run through locked instructions (the
default with one vCPU) and bursts that stop at each one for KVM (what several parallel vCPUs need), and
prints the ratios of wall and CPU time.

Each kernel gets five environment entries: Hermit 0.6.x hello_world faults with fewer than three
(docs/compatibility.md), and a fixed environment keeps runs comparable.  A run is bounded by TIMEOUT_S.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from tracevisor import session

HERE = os.path.dirname(os.path.abspath(__file__))
KERNELS = os.path.join(os.path.dirname(HERE), "guests", "hermit")
ENV = [f"BENCH_{i}=value{i}" for i in range(5)]
TIMEOUT_S = 300.0


def bench(name: str, cpus: int = 1, atomics_in_kvm: bool | None = None, unit: str = "blocks") -> tuple[float, float]:
    from tracevisor.fallback import BUDGET_DEFAULTS

    budget = BUDGET_DEFAULTS[unit]
    cfg = session.SessionConfig(kernel=os.path.join(KERNELS, name), cpus=cpus, quiet=True, env=ENV,
                                timeout=TIMEOUT_S, fallback_atomics=atomics_in_kvm, fallback_budget=budget,
                                fallback_budget_unit=unit)
    s = session.build_run(cfg)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    info = s.run()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    fb = s.machine.fallback
    st = fb.stats if fb else {}
    s.close()
    b = st.get("bursts", 0) or 1
    how = {None: "", True: " [atomics in KVM]", False: " [atomics in bursts]"}[atomics_in_kvm]
    how += f" [budget {budget} {unit}]"
    blocks = st.get("blocks", 0)
    per_block = f" ({st.get('instructions', 0) / blocks:.1f}/block)" if blocks else ""
    print(f"{name} -c {cpus}{how}: status {info.status} ({info.reason}), wall {wall:.2f} s, cpu {cpu:.2f} s, "
          f"bursts {st.get('bursts', 0)}, instructions {st.get('instructions', 0)}{per_block}, "
          f"xgetbv/xsave/xrstor/#NM {st.get('xgetbv', 0)}/{st.get('xsave', 0)}/{st.get('xrstor', 0)}/"
          f"{st.get('nm', 0)}, transfer {st.get('transfer_ns', 0) / b / 1e3:.0f} µs/burst, "
          f"burst {st.get('burst_ns', 0) / b / 1e3:.0f} µs/burst, engine set-up {st.get('setup_ns', 0) / 1e6:.0f} ms",
          flush=True)
    return wall, cpu


if __name__ == "__main__":
    args = sys.argv[1:]
    compare = "--atomics" in args
    names = [a for a in args if not a.startswith("--")] or ["hello_world", "rusty_demo"]
    for n in names:
        if "--units" in args:
            w_i, c_i = bench(n, unit="instructions")
            w_b, c_b = bench(n, unit="blocks")
            print(f"{n}: block budget (native block counter) / instruction budget (Unicorn's counter): "
                  f"wall {w_b / w_i:.2f}×, cpu {c_b / c_i:.2f}×")
            continue
        if not compare:
            bench(n)
            continue
        w_kvm, c_kvm = bench(n, atomics_in_kvm=True)
        w_uc, c_uc = bench(n, atomics_in_kvm=False)
        print(f"{n}: atomics in bursts / atomics in KVM: wall {w_uc / w_kvm:.2f}×, cpu {c_uc / c_kvm:.2f}×")
