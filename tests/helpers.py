"""Helpers shared by the tests (imported as ``from helpers import …``)."""

from __future__ import annotations

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
