"""A guest that hands the virtio-net device malformed rings (tests/net_hostile.c), end to end under KVM.

Each attack must stop the VM with status 3 and a message naming the problem, the device must end in
DEVICE_NEEDS_RESET (a `virtio` `error` event), tracevisor must not crash, the trace must stay readable, and
its replay must reproduce the same stop.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import run_cli
from tracevisor import session

pytestmark = pytest.mark.kvm

SRC = Path(__file__).with_name("net_hostile.c")

CASES = {
    "outside": "virtio-net TX queue: descriptor 0 points outside guest RAM",
    "overflow": "virtio-net TX queue: descriptor 0 points outside guest RAM",
    "wrap": "the length overflows the 64-bit address",
    "cycle": "leads back to descriptor 0 (a next cycle)",
    "avail": "virtio-net TX queue: available index 40000 is 40000 entries ahead",
    "rx-avail": "virtio-net RX queue: available index 1000 is 1000 entries ahead",
    "pfn": "virtio-net RX queue: queue PFN 0xffffffff puts the ring",
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    from tracevisor import guestbuild

    return str(guestbuild.build_program(SRC, tmp_path_factory.mktemp("nethostile")))


@pytest.mark.parametrize("mode", list(CASES))
def test_malformed_ring_stops_the_vm(hostile, tmp_path, mode):
    trace = tmp_path / f"{mode}.tvt"
    stop = session.record(hostile, trace, args=[mode], net="udp:127.0.0.1:0")
    assert stop.status == 3, stop.message
    assert stop.message.startswith("guest error on vCPU 0: virtio-net ") and CASES[mode] in stop.message
    assert "traceback" not in stop.report

    from tracevisor.trace import open_trace

    reader = open_trace(trace)
    console = b"".join(e["data"] for e in reader.events(kinds=["console"]))
    assert f"net_hostile: {mode}\n".encode() in console
    assert reader.complete
    virtio = list(reader.events(kinds=["virtio"]))
    assert virtio[-1]["op"] == "error" and virtio[-1]["status"] & 0x40
    assert CASES[mode] in virtio[-1]["message"]
    assert reader.footer["stop"]["reason"] == "guest-error"
    assert not list(reader.events(kinds=["net"]))  # nothing was sent

    r = run_cli("replay", str(trace))
    assert r.returncode == 0, r.stderr  # the whole recording re-created, its guest-error stop included
    assert b"replay verified" in r.stderr and b"guest-error as in the recording" in r.stderr
