"""traces/regenerate.py still reproduces the committed sample traces: recording the example guests again
gives, event for event, the same traces (timing aside) — so the samples describe what tracevisor does now,
and the analysis tests that use them test the real thing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import analysis

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


@pytest.mark.parametrize("name", SAMPLES)
def test_a_fresh_recording_equals_the_committed_sample(regenerated, name):
    fresh = regenerated / f"{name}.tvt"
    assert fresh.stat().st_size < 1 << 20
    d = analysis.diff(REPO / "traces" / f"{name}.tvt", fresh)
    assert d.identical, d.format()
