"""Fallback events in the analysis: the ``fallback`` frame and the FALLBACK table of ``tracevisor stats``,
on a real recording of the Hermit hello_world kernel (its SSE code runs in fallback bursts on hosts whose
KVM cannot emulate it; on other hosts the frame may be empty and the table absent)."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from helpers import run_cli
from tracevisor import analysis
from tracevisor.analysis.columns import FRAMES, columns
from tracevisor.trace import open_trace

HERMIT = os.path.join(os.path.dirname(__file__), "..", "guests", "hermit")
KINDS = ("burst", "nm", "exception", "xgetbv", "xsave", "xrstor")
pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def hello_trace(tmp_path_factory):
    """hello_world recorded once (five environment entries: Hermit 0.6 faults with fewer than three)."""
    out = tmp_path_factory.mktemp("fbstats") / "hello.tvt"
    envs = [a for i in range(5) for a in ("--env", f"K{i}=v{i}")]
    p = run_cli("record", *envs, "-o", str(out), os.path.join(HERMIT, "hello_world"), timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    return out


def test_frame_equals_the_fallback_events(hello_trace):
    tr = analysis.load(hello_trace)
    fb = tr.fallback
    assert list(fb.columns) == columns("fallback")
    assert str(fb["kind"].dtype) == "category" and str(fb["count"].dtype) == "Int64"
    events = [ev for ev in open_trace(hello_trace).events() if ev["k"] in KINDS]
    assert fb["seq"].tolist() == [ev["seq"] for ev in events]
    assert fb["kind"].astype(str).tolist() == [ev["k"] for ev in events]
    for row, ev in zip(fb.itertuples(index=False), events, strict=True):
        assert row.rip == (ev["start"] if ev["k"] == "burst" else ev["rip"])
        if ev["k"] == "burst":
            assert (row.count, row.end, row.stop, row.insn) == (ev["count"], ev["end"], ev["stop"], ev["insn"])
        else:
            assert row.count is pd.NA
    if tr.header["fallback"].get("engine"):  # the fallback ran: XGETBV at boot, SSE bursts later
        assert (fb["kind"] == "xgetbv").sum() >= 1 and (fb["kind"] == "burst").sum() >= 1
    assert {c.name for c in FRAMES["fallback"]} == set(fb.columns)


def test_stats_fallback_table(hello_trace):
    tr = analysis.load(hello_trace)
    fb = tr.fallback
    st = analysis.stats(tr)
    table = {r["kind"]: r for r in st.to_dict()["fallback"]}
    for kind in KINDS:
        n = int((fb["kind"] == kind).sum())
        assert table.get(kind, {"count": 0})["count"] == n
    assert st.totals["fallback"] == len(fb)
    bursts = fb[fb["kind"] == "burst"]
    if len(bursts):
        row = table["burst"]
        assert row["instructions"] == int(bursts["count"].sum())
        assert row["mean_instructions"] == pytest.approx(bursts["count"].mean(), abs=1e-3)
        stops = bursts["stop"].astype(str).value_counts()
        assert row["stops"] == ", ".join(f"{k} {v}" for k, v in sorted(stops.items(), key=lambda kv: (-kv[1], kv[0])))
    p = run_cli("stats", str(hello_trace))
    assert p.returncode == 0, p.stderr.decode()
    text = p.stdout.decode()
    if len(fb):
        assert "FALLBACK" in text and f"Total Fallbacks:{len(fb)}," in text
        line = next(ln for ln in text.splitlines() if ln.strip().startswith("burst"))
        assert str(int(bursts["count"].sum())) in line
    js = json.loads(run_cli("stats", "--json", str(hello_trace)).stdout)
    assert js["fallback"] == st.to_dict()["fallback"]


def test_stats_without_fallback_events_has_no_table(tmp_path, guests):
    out = tmp_path / "hello.tvt"
    assert run_cli("record", "-o", str(out), str(guests["hello"])).returncode == 0
    st = analysis.stats(out)
    assert st.totals["fallback"] == 0 and len(st.fallback) == 0
    assert "FALLBACK" not in st.format()
