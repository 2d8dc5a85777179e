"""SIGINT/SIGTERM: handlers only note the signal; the footer is always written; no traceback, ever."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from helpers import build_asm, spawn_cli
from tracevisor.trace import open_trace

pytestmark = pytest.mark.kvm


def _wait_for(pred, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    pytest.fail("the child never got there")


def _partials(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".partial"))


@pytest.mark.parametrize("burst", [2, 40])
def test_repeated_sigterm_to_the_group_keeps_the_footer(tmp_path, guests, burst):
    """timeout(1) signals the process and its group; more signals may land while the VM shuts down
    (joining vCPU threads, writing the footer): none of them may cut the recording short."""
    for attempt in range(3):
        out = tmp_path / f"t{attempt}.tvt"
        with spawn_cli("record", "-q", "-o", str(out), str(guests["compute"]), "1000000",
                       start_new_session=True) as p:
            _wait_for(lambda name=out.name: any(n.startswith(name) for n in os.listdir(tmp_path)))
            time.sleep(0.3 + 0.2 * attempt)
            for i in range(burst):
                os.killpg(p.pid, signal.SIGTERM)
                if i % 2:
                    time.sleep(0.002 * attempt)
            _, err = p.communicate(timeout=60)
        assert p.returncode == 143 and b"Traceback" not in err, err
        assert err.count(b"terminated (SIGTERM)") == 1, err
        r = open_trace(out)
        assert r.complete and r.footer["stop"]["reason"] == "terminated", r.warnings
        assert r.footer["events"] == len(list(r.events()))
    assert _partials(tmp_path) == []


def test_sigint_stops_a_child_started_with_sigint_ignored(tmp_path):
    """nohup and a shell's background jobs start programs with SIGINT ignored; Ctrl-C must still work."""
    k = build_asm(tmp_path, "spin", "1: jmp 1b\n")
    with spawn_cli("run", str(k), sigint="ignore") as p:
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    assert p.returncode == 130 and b"interrupted" in err and b"Traceback" not in err, err


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_early_signal_leaves_no_half_file_and_no_traceback(tmp_path, guests, sig, status):
    """A signal at any moment of start-up: no traceback, and either no trace at all or a complete one."""
    for i, delay in enumerate((0.0, 0.03, 0.06, 0.1, 0.2, 0.35, 0.5)):
        out = tmp_path / f"e{i}.tvt"
        with spawn_cli("record", "-q", "-o", str(out), str(guests["compute"]), "200000") as p:
            time.sleep(delay)
            p.send_signal(sig)
            _, err = p.communicate(timeout=60)
        if delay >= 0.05:  # (earlier, the Python interpreter itself is still starting: its own business)
            assert b"Traceback" not in err, (delay, err)
            assert p.returncode == status, (delay, p.returncode, err)
        if out.exists():
            r = open_trace(out)
            assert r.complete and r.warnings == [], (delay, r.warnings)
        assert _partials(tmp_path) == [], delay


def test_non_vm_commands_still_stop_on_ctrl_c(tmp_path, guests):
    """Only commands running a VM defer signals; `dump` of a long trace stops at once on Ctrl-C."""
    out = tmp_path / "long.tvt"
    with spawn_cli("record", "-q", "-o", str(out), str(guests["compute"]), "30000") as p:
        p.communicate(timeout=120)
    with spawn_cli("dump", str(out), stdout=subprocess.PIPE) as p:  # nobody reads: dump waits on the pipe
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    assert p.returncode == 130 and b"Traceback" not in err, err
