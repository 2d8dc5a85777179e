"""traces/regenerate.py still reproduces the committed sample traces: recording the example guests again
gives, event for event, the same traces (timing aside) — so the samples describe what tracevisor does now,
and the analysis tests that use them test the real thing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tracevisor import analysis

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SAMPLES = ["hello", "files", "compute-100", "args", "exitcode", "smp", "netecho"]


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("samples")
    env = dict(os.environ, TMPDIR=str(out))  # its own staging directory
    env.pop("TRACEVISOR_KVM_DEVICE", None)
    r = subprocess.run([sys.executable, str(REPO / "traces" / "regenerate.py"), "--out", str(out), *SAMPLES],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return out


#: Samples whose exits depend on timing: netecho (polls while frames arrive) and smp (vCPU 0 reads the TSC
#: until vCPU 1 reports; every read is a recorded exit, and how many there are depends on the schedule).
TIMING_DEPENDENT = {"netecho", "smp"}


@pytest.mark.parametrize("name", [s for s in SAMPLES if s not in TIMING_DEPENDENT])
def test_a_fresh_recording_equals_the_committed_sample(regenerated, name):
    fresh = regenerated / f"{name}.tvt"
    assert fresh.stat().st_size < 1 << 20
    # the samples were recorded on another machine: its TSC frequency is a host fact, not the guest's doing
    d = analysis.diff(REPO / "traces" / f"{name}.tvt", fresh, ignore_host=True)
    assert d.identical, d.format()


def test_a_fresh_netecho_recording_carries_the_same_traffic(regenerated):
    """netecho polls its device while frames arrive from the peer: how many polls see nothing before a frame
    is there depends on timing, so the exits differ from run to run. What went over the wire, the hypercalls
    and the output do not."""
    old, new = analysis.load(REPO / "traces" / "netecho.tvt"), analysis.load(regenerated / "netecho.tvt")
    def traffic(tr):
        p = tr.packets
        return list(zip(p["direction"].astype(str), p["length"], p["protocol"].astype(str), p["frame"]))
    assert traffic(old) == traffic(new)
    assert len(old.packets) == 8
    d = analysis.diff(old, new, ignore_host=True)
    assert (d.hypercalls["count_diff"] == 0).all() and (d.hypercalls["bytes_out_diff"] == 0).all()
    assert d.console_equal


def test_a_fresh_smp_recording_has_the_same_calls_and_output(regenerated):
    """smp: what the guest asked of the host and printed is the same in every recording; how often vCPU 0
    read the TSC while waiting is not (and each such read is recorded, so the exits differ)."""
    old, new = analysis.load(REPO / "traces" / "smp.tvt"), analysis.load(regenerated / "smp.tvt")
    d = analysis.diff(old, new, ignore_host=True)
    assert (d.hypercalls["count_diff"] == 0).all() and (d.hypercalls["bytes_out_diff"] == 0).all()
    assert d.console_equal
    assert old.meta["mode"] == new.meta["mode"] == "exact"
