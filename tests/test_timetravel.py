"""Time travel over replays: checkpoints, seek backwards, step_back — state equals the recorded run's."""

from __future__ import annotations

import hashlib

import pytest

from tracevisor import replay, session
from tracevisor.errors import TracevisorError
from tracevisor.trace import open_trace

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def compute_trace(guests, tmp_path_factory):
    out = tmp_path_factory.mktemp("tt") / "compute.tvt"
    stop = session.record(guests["compute"], out, args=["3000"])
    assert stop.status == 0, stop.message
    return out


def exit_seqs(path):
    return [e["seq"] for e in open_trace(path).events(kinds=["exit"])]


def state(r):
    regs = r.registers()
    mem = hashlib.sha256(r.machine.memory.snapshot()).hexdigest()
    return regs, mem


def test_seek_back_matches_a_fresh_replay(compute_trace):
    seqs = exit_seqs(compute_trace)
    a, b = seqs[700], seqs[2600]
    with replay.Replayer(compute_trace, checkpoint_every=500) as fresh:
        fresh.run_to(a)
        want = state(fresh)
    with replay.Replayer(compute_trace, checkpoint_every=500) as r:
        r.run_to(b)
        assert r.position == b
        assert len(r.store.checkpoints) >= 5
        res = r.seek(a)
        assert res.reason == "paused" and r.position == a
        assert state(r) == want
        # forward again, to the end, still verified against the recording
        res = r.run()
        assert res.verified and res.code == 0


def test_step_back_one_exit_at_a_time(compute_trace):
    seqs = exit_seqs(compute_trace)
    i = 1234
    with replay.Replayer(compute_trace, checkpoint_every=400) as fresh:
        fresh.run_to(seqs[i - 1])
        want_prev = state(fresh)
    with replay.Replayer(compute_trace, checkpoint_every=400) as r:
        r.run_to(seqs[i])
        r.step_back()
        assert r.position == seqs[i - 1]
        assert state(r) == want_prev
        r.step_back()
        assert r.position == seqs[i - 2]


def test_seek_after_the_guest_exited(compute_trace):
    seqs = exit_seqs(compute_trace)
    with replay.Replayer(compute_trace, checkpoint_every=1000) as r:
        assert r.run().verified
        r.seek(seqs[10])
        assert r.position == seqs[10]
        assert r.run().verified


def test_backwards_without_checkpoints_is_a_clear_error(compute_trace):
    seqs = exit_seqs(compute_trace)
    with replay.Replayer(compute_trace) as r:
        r.run_to(seqs[50])
        with pytest.raises(TracevisorError, match="checkpoint"):
            r.seek(seqs[10])


def test_reverse_continue_and_reverse_step_in_the_replay_target(guests, tmp_path):
    from elftools.elf.elffile import ELFFile

    from tracevisor.gdbstub import BP_HARDWARE
    from tracevisor.replay.debugtarget import ReplayTarget

    mnt = tmp_path / "m"
    mnt.mkdir()
    trace = tmp_path / "files.tvt"
    assert session.record(guests["files"], trace, mounts=[str(mnt)]).status == 0
    with open(guests["files"], "rb") as f:
        sym = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()}
    with replay.Replayer(trace, checkpoint_every=20) as r:
        t = ReplayTarget(r)
        assert t.insert_breakpoint(BP_HARDWARE, sym["hc_write"], 1)

        def here():
            g = t.vcpu.get_regs()
            return r.checker.position, g.rip, g.rdi, g.rsi, g.rdx, g.rsp

        hits = []
        for _ in range(4):
            assert t.cont().reason == "breakpoint"
            hits.append(here())
        assert all(h[1] == sym["hc_write"] for h in hits) and len({h[0] for h in hits}) == 4
        assert t.reverse_continue().reason == "breakpoint" and here() == hits[2]
        assert t.reverse_continue().reason == "breakpoint" and here() == hits[1]
        exact = bytes(t.vcpu.get_regs())
        assert t.reverse_step().reason == "step"
        assert t.vcpu.get_regs().rip != sym["hc_write"]
        assert t.step().reason == "step" and bytes(t.vcpu.get_regs()) == exact
        # forward again from the past: the same breakpoint stops, then the recording's end
        assert t.cont().reason == "breakpoint" and here() == hits[2]
        for _ in range(4):
            t.reverse_continue()
        stop = t.reverse_continue()
        assert stop.replaylog == "begin"
