"""Shared fixtures: KVM availability policy and the example guests built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HAVE_KVM = os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)
REQUIRE_KVM = os.environ.get("TRACEVISOR_REQUIRE_KVM") == "1"


@pytest.fixture(autouse=True)
def _kvm_policy(request):
    """Tests marked ``kvm`` skip without /dev/kvm — and fail instead when TRACEVISOR_REQUIRE_KVM=1."""
    if request.node.get_closest_marker("kvm") and not HAVE_KVM:
        if REQUIRE_KVM:
            pytest.fail("TRACEVISOR_REQUIRE_KVM=1 but /dev/kvm is missing or not accessible")
        pytest.skip("/dev/kvm not available")


@pytest.fixture(scope="session")
def guests(tmp_path_factory) -> dict[str, Path]:
    """Every example guest, freshly built with gcc into a temporary directory."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the example guests")
    from tracevisor import guestbuild

    out = tmp_path_factory.mktemp("guests")
    return guestbuild.build(outdir=out)
