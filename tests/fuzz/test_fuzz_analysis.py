"""Fuzz (d): analysis on CRC-valid traces whose rich events carry values no recorder writes (wrong types,
out-of-range integers, impossible vCPUs and times).  Loading, every frame, stats, diff, the Perfetto events,
the Parquet round trip and the plots never raise; misfits become missing or clipped values, and events with an
impossible vCPU or time are left out with one warning."""

from __future__ import annotations

from pathlib import Path

import pytest
from fuzzsettings import budget
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("pandas")

from tracevisor import analysis  # noqa: E402
from tracevisor.analysis import plots  # noqa: E402
from tracevisor.errors import TracevisorError  # noqa: E402
from tracevisor.trace import TraceWriter, open_trace  # noqa: E402

TRACES = Path(__file__).resolve().parents[2] / "traces"
BASES = ["hello", "files", "netecho", "smp", "args"]

JUNK = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=8), st.binary(max_size=64),
    st.sampled_from([-1, 0, 1, 2**16, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63), 2**64 - 1]),
    st.lists(st.integers(-5, 5), max_size=5), st.dictionaries(st.text(max_size=3), st.integers(-3, 3), max_size=3),
    st.lists(st.lists(st.binary(max_size=4), max_size=2), max_size=3),
)


@pytest.fixture(scope="module")
def bases():
    out = {}
    for name in BASES:
        r = open_trace(TRACES / f"{name}.tvt")
        out[name] = ({k: v for k, v in r.header.items() if k != "format"}, list(r.events()))
    return out


@budget(30)
@given(data=st.data())
def test_analysis_of_crafted_events(bases, tmp_path_factory, data):
    name = data.draw(st.sampled_from(BASES))
    header, events = bases[name]
    path = tmp_path_factory.getbasetemp() / "fuzz-analysis.tvt"
    w = TraceWriter(path, header)
    for ev in events:
        ev = dict(ev)
        kind, cpu, t = ev.pop("k"), ev.pop("cpu"), ev.pop("t")
        ev.pop("seq")
        if kind == "exit":
            w.exit(cpu, t, ev["reason"], ev["rip"], ev["port"], ev["dir"], ev["size"], ev["value"])
            continue
        if ev and data.draw(st.integers(0, 9)) < 3:
            ev[data.draw(st.sampled_from(sorted(ev)))] = data.draw(JUNK)
        if data.draw(st.integers(0, 29)) == 0:
            cpu = data.draw(st.sampled_from([1, 7, 2**16, 2**20]))
        if data.draw(st.integers(0, 29)) == 0:
            t = data.draw(st.sampled_from([0, 2**63 - 1, 2**63, 2**64 - 1]))
        w.event(kind, cpu, t, **ev)
    w.close()
    try:
        tr = analysis.load(path)
    except TracevisorError:
        return
    assert all("\n" not in x for x in tr.warnings)
    for frame in ("hypercalls", "files", "console", "virtio", "packets"):
        assert list(getattr(tr, frame).columns) == analysis.columns.columns(frame)
    analysis.stats(tr).format()
    analysis.stats(tr, by="vcpu").to_json()
    analysis.export.perfetto_events(tr)
    analysis.diff(tr, TRACES / f"{name}.tvt").format()
    out = tmp_path_factory.getbasetemp() / "fuzz-analysis-pq"
    analysis.to_parquet(tr, out)
    back = analysis.read_parquet(out)
    assert len(back.hypercalls) == len(tr.hypercalls)
    for plot in (plots.exit_rate, plots.hypercall_latency, plots.io_bytes, plots.vcpu_activity):
        plot(tr)
