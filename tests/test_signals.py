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


def _handlers_installed(pid: int) -> bool:
    """Has the child installed tracevisor's handlers?  Python itself does not catch SIGTERM, so the SIGTERM
    bit of the caught-signals mask says that tracevisor.signals.defer() has run."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    except OSError:
        pass
    return False


def _no_half_file(tmp_path, out) -> None:
    if out.exists():
        r = open_trace(out)
        assert r.complete and r.warnings == [], r.warnings
    assert _partials(tmp_path) == []


@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_early_signal_leaves_no_half_file_and_no_traceback(tmp_path, guests, sig, status):
    """A signal at any moment of start-up leaves either no trace at all or a complete one; once tracevisor
    runs (its handlers are in), it also ends with one line and the signal's status, never a traceback."""
    for i, delay in enumerate((0.0, 0.01, 0.03)):  # possibly before Python has started: only the file
        out = tmp_path / f"a{i}.tvt"
        with spawn_cli("record", "-q", "-o", str(out), str(guests["compute"]), "200000") as p:
            time.sleep(delay)
            p.send_signal(sig)
            p.communicate(timeout=60)
        _no_half_file(tmp_path, out)
    for i, delay in enumerate((0.0, 0.01, 0.03, 0.06, 0.1, 0.2, 0.35, 0.5)):
        out = tmp_path / f"b{i}.tvt"
        with spawn_cli("record", "-q", "-o", str(out), str(guests["compute"]), "200000") as p:
            _wait_for(lambda pid=p.pid: _handlers_installed(pid))
            time.sleep(delay)
            p.send_signal(sig)
            _, err = p.communicate(timeout=60)
        assert b"Traceback" not in err, (delay, err)
        assert p.returncode == status, (delay, p.returncode, err)
        _no_half_file(tmp_path, out)


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
