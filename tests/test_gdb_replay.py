"""The real gdb over a replay: reverse-continue and reverse-stepi land on states equal to the recorded run's."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from test_gdb import REPO, Hypervisor, _need_gdb, demo, run_gdb, symbols  # noqa: F401,F811  (demo: fixture)

from helpers import run_cli
from tracevisor import session
from tracevisor.trace import open_trace

pytestmark = pytest.mark.kvm


class ReplayHypervisor(Hypervisor):
    """`tracevisor replay --gdb 127.0.0.1:0 TRACE` as a subprocess."""

    def __init__(self, tmp_path, trace, *extra):
        self.out = tmp_path / "hv.out"
        self.err = tmp_path / "hv.err"
        env = dict(os.environ)
        env.pop("TRACEVISOR_KVM_DEVICE", None)
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "tracevisor", "replay", "--gdb", "127.0.0.1:0",
                                          "--checkpoint-every", "3", *extra, str(trace)],
                                         stdout=o, stderr=e, env=env, cwd=REPO)
        self.port = self._wait_port()


def test_reverse_continue_and_reverse_stepi_with_gdb(demo, tmp_path):  # noqa: F811
    _need_gdb()
    kernel = demo["exec"]
    trace = tmp_path / "demo.tvt"
    assert session.record(kernel, trace).status == 0
    assert b"debug me: total=14 counter=6" in b"".join(e["data"] for e in open_trace(trace).events(kinds=["console"]))
    sym = symbols(kernel)
    hv = ReplayHypervisor(tmp_path, trace)
    try:
        out = run_gdb(tmp_path, kernel, hv.port, """
break square
continue
continue
echo FWD2\\n
print x
print counter
info registers rsp
continue
echo FWD3\\n
print x
print counter
reverse-continue
echo BACK2\\n
print x
print counter
info registers rsp
reverse-stepi
echo RSTEP\\n
info registers rip
stepi
echo FWDSTEP\\n
print x
reverse-continue
echo BACK1\\n
print x
print counter
reverse-continue
echo BEGIN\\n
delete
continue
""")
        rc, stdout, stderr = hv.wait()
    finally:
        hv.kill()

    def after(tag):
        return out.split(tag, 1)[1]

    fwd2, fwd3, back2 = after("FWD2").split("FWD3")[0], after("FWD3").split("BACK2")[0], after("BACK2")
    assert "= 2" in fwd2.splitlines()[1] and "= 1" in fwd2.splitlines()[2], out  # x=2, counter=1
    assert "= 3" in fwd3.splitlines()[1] and "= 3" in fwd3.splitlines()[2], out  # x=3, counter=1+2
    b2 = back2.splitlines()
    assert "= 2" in b2[1] and "= 1" in b2[2], out  # back at the 2nd call: x=2 and counter restored to 1
    rsp_f = re.search(r"rsp +(0x[0-9a-f]+)", fwd2).group(1)
    rsp_b = re.search(r"rsp +(0x[0-9a-f]+)", back2).group(1)
    assert rsp_f == rsp_b
    bp = int(re.search(r"Breakpoint 1 at (0x[0-9a-f]+)", out).group(1), 16)
    rip_rs = int(re.search(r"RSTEP\n.*?rip +(0x[0-9a-f]+)", out, re.S).group(1), 16)
    assert sym["square"] <= rip_rs < bp, (hex(rip_rs), hex(bp), out)  # one instruction back: the prologue
    assert "= 2" in after("FWDSTEP").splitlines()[1], out  # stepping forward again: still in square(2)
    back1 = after("BACK1").splitlines()
    assert "= 1" in back1[1] and "= 0" in back1[2], out  # the first call: counter was still 0
    assert "No more reverse-execution history" in out, out
    assert "exited normally" in out, out
    assert rc == 0, stderr
    assert "Traceback" not in stderr


def test_replay_gdb_refuses_multi_vcpu(guests, tmp_path):
    trace = tmp_path / "smp.tvt"
    assert session.record(guests["smp"], trace, cpus=2).status == 0
    r = run_cli("replay", "--gdb", "127.0.0.1:0", str(trace))
    assert r.returncode == 1 and b"single-vCPU" in r.stderr and b"Traceback" not in r.stderr
