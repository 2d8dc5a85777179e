"""Helpers shared by the tests (imported as ``from helpers import …``)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys


def run_cli(*args: str, cwd=None, env=None, timeout=120, input=None) -> subprocess.CompletedProcess:
    """Run `python -m tracevisor ARGS…` and capture bytes output."""
    full_env = dict(os.environ)
    full_env.pop("TRACEVISOR_KVM_DEVICE", None)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "tracevisor", *args], cwd=cwd, env=full_env,
                          capture_output=True, timeout=timeout, input=input)


def build_asm(tmp_path, name: str, body: str, data: str = ""):
    """Assemble a tiny freestanding guest (plain static ELF at 0x400000) from AT&T assembly."""
    from pathlib import Path

    src = Path(tmp_path) / f"{name}.S"
    src.write_text(".globl _start\n.text\n_start:\n" + body + "\n.data\n" + data + "\n")
    out = Path(tmp_path) / name
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x400000", "-Wl,--build-id=none",
                    "-o", str(out), str(src)], check=True, capture_output=True)
    return out


EXIT_ASM = """
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
"""
EXIT_DATA = "exitblk: .long {code}\n"


def reset_child_signals() -> None:
    """In a test's child: default SIGINT/SIGTERM, whatever the test runner inherited (a background job or
    nohup starts with SIGINT ignored, and the child would inherit that)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def spawn_cli(*args: str, sigint: str = "default", **popen):
    """Start `python -m tracevisor ARGS…` for a test that signals it; the child is killed (and reaped)
    when the block ends, so a failing test never leaves a VM spinning.  ``sigint="ignore"`` starts the
    child with SIGINT ignored, as a shell's background job is."""
    import signal

    def setup() -> None:
        reset_child_signals()
        if sigint == "ignore":
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    env = dict(os.environ)
    env.pop("TRACEVISOR_KVM_DEVICE", None)
    env.update(popen.pop("env", None) or {})
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.PIPE)
    p = subprocess.Popen([sys.executable, "-m", "tracevisor", *args], env=env, preexec_fn=setup, **popen)
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        try:
            p.communicate(timeout=30)
        except (subprocess.TimeoutExpired, ValueError):
            pass


def guest_symbols(path) -> dict[str, int]:
    """The symbol table of a guest ELF: name → address (where the tests read the guest's hidden state)."""
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab")
        return {s.name: s["st_value"] for s in sym.iter_symbols()}


def record_exact(kernel, out, *, regions=(), **opts) -> tuple:
    """Record like `tracevisor record` (exact unless ``exact=False``) in this process; returns (stop info,
    header, the guest memory ``regions`` [(gpa, len)] after the run, the machine's interrupt-model state)."""
    from tracevisor import session

    opts.setdefault("exact", True)
    config = session.SessionConfig(kernel=str(kernel), quiet=True, **opts)
    with session.build_record(config, str(out)) as s:
        info = s.run()
        irq = s.machine.irq.state() if s.machine.irq is not None else None
        return info, s.writer.header, [s.machine.memory.read(a, n) for a, n in regions], irq


def replay_memory(path, regions) -> tuple:
    """Replay ``path`` in this process; returns (the ReplayResult, the guest memory ``regions`` after it,
    the number of timer points the replay went through, or None without a scheduler)."""
    from tracevisor.replay import Replayer

    with Replayer(path) as r:
        res = r.run()
        sched = r.machine.sched
        return res, [r.machine.memory.read(a, n) for a, n in regions], sched.timer_points if sched else None
