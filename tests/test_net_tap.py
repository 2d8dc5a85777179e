"""netecho behind a real Linux TAP device in its own network namespace (KVM + root + iproute2 + ping).

    namespace tvnNNN:  10.0.0.1/24 on TAP tvtNNN  <──frames──>  tracevisor --net tap:tvtNNN  netecho 10.0.0.2

The namespace's kernel pings the guest and talks UDP to it; the run is recorded, replayed with no TAP at all
(the replay must not open one), and its frames are exported as pcap and read back with tshark.
Without root/iproute2/ping the test fails when TRACEVISOR_REQUIRE_KVM=1 (CI) and skips otherwise.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from test_net_udp import Guest

pytestmark = pytest.mark.kvm

REQUIRE = os.environ.get("TRACEVISOR_REQUIRE_KVM") == "1"
_counter = itertools.count()


def _unavailable(why: str):
    if REQUIRE:
        pytest.fail(f"TRACEVISOR_REQUIRE_KVM=1 but the TAP test cannot run: {why}")
    pytest.skip(why)


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


@pytest.fixture
def netns():
    """A fresh namespace with a TAP device at 10.0.0.1/24: yields (namespace, tap); removed afterwards."""
    for tool in ("ip", "ping"):
        if shutil.which(tool) is None:
            _unavailable(f"'{tool}' is not installed (Debian: iproute2, iputils-ping)")
    if os.geteuid() != 0:
        _unavailable("network namespaces and TAP devices need root")
    n = next(_counter)
    ns, tap = f"tvn{os.getpid()}x{n}", f"tvt{os.getpid() % 100000}x{n}"
    r = sh("ip", "netns", "add", ns, check=False)
    if r.returncode:
        _unavailable(f"cannot create a network namespace: {r.stderr.strip()}")
    try:
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        r = sh("ip", "-n", ns, "tuntap", "add", "dev", tap, "mode", "tap", check=False)
        if r.returncode:
            _unavailable(f"cannot create a TAP device: {r.stderr.strip()}")
        sh("ip", "-n", ns, "addr", "add", "10.0.0.1/24", "dev", tap)
        sh("ip", "-n", ns, "link", "set", tap, "up")
        yield ns, tap
    finally:
        sh("ip", "netns", "del", ns, check=False)


UDP_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(5)
    payload = bytes.fromhex(sys.argv[1])
    s.sendto(payload, ("10.0.0.2", 7))
    data, addr = s.recvfrom(65535)
    print(data.hex(), addr[0], addr[1])
""")


def udp_exchange(ns: str, payload: bytes) -> tuple[bytes, str, int]:
    r = sh("ip", "netns", "exec", ns, sys.executable, "-c", UDP_CLIENT, payload.hex())
    data, host, port = r.stdout.split()
    return bytes.fromhex(data), host, int(port)


def test_ping_udp_record_replay_pcap(netns, guests, tmp_path, monkeypatch):
    ns, tap = netns
    trace = tmp_path / "tap.tvt"
    g = NsGuest(ns, ["record", "-o", str(trace), "--net", f"tap:{tap}", str(guests["netecho"]), "10.0.0.2", "100"])
    try:
        g.wait_for(b"netecho: ready")
        r = sh("ip", "netns", "exec", ns, "ping", "-c", "5", "-i", "0.2", "-W", "3", "10.0.0.2", check=False)
        assert "5 packets transmitted, 5 received" in r.stdout, r.stdout + r.stderr
        rtt = re.search(r"rtt min/avg/max/mdev = ([\d.]+)/([\d.]+)/([\d.]+)", r.stdout)
        print(f"ping RTT min/avg/max: {rtt.group(1)}/{rtt.group(2)}/{rtt.group(3)} ms")
        payload = b"tracevisor \x00\xff" + bytes(range(256)) * 4
        data, host, port = udp_exchange(ns, payload)
        assert (data, host, port) == (payload, "10.0.0.2", 7)
        assert udp_exchange(ns, b"quit")[0] == b"bye\n"
        rc, out, err = g.finish()
    finally:
        g.proc.kill()
    assert rc == 0, err
    text = out.decode()
    assert "arp: who-has 10.0.0.2 from 10.0.0.1 -> replied" in text
    assert [int(s) for s in re.findall(r"icmp: echo seq=(\d+) from 10\.0\.0\.1", text)] == [1, 2, 3, 4, 5]
    assert f"-> 7, {len(payload)} bytes -> echoed" in text and "-> 7, 4 bytes -> quit" in text

    # Replay with no network at all: a backend must not even be created.
    from tracevisor import netbackend
    from tracevisor.replay import Replayer

    def no_network(*a, **k):
        raise AssertionError("replay tried to open a network backend")

    for name in ("open_backend", "TapBackend", "UdpBackend"):
        monkeypatch.setattr(netbackend, name, no_network)
    with Replayer(trace, quiet=True) as rp:
        result = rp.run()
        assert result.verified and result.code == 0, result.message
    from helpers import run_cli

    r = run_cli("replay", str(trace))
    assert r.returncode == 0 and r.stdout == out, r.stderr

    # `tracevisor export --format pcap` → tshark
    pcap = tmp_path / "tap.pcap"
    r = run_cli("export", str(trace), "--format", "pcap", "-o", str(pcap))
    assert r.returncode == 0, r.stderr
    n = int(r.stderr.split(b"wrote ")[1].split()[0])
    assert n >= 2 + 10 + 4
    if shutil.which("tshark") is None:
        if REQUIRE:
            pytest.fail("tshark is not installed (Debian: tshark)")
        pytest.skip("tshark is not installed")
    r = sh("tshark", "-r", str(pcap), "-T", "fields", "-e", "frame.protocols", "-e", "arp.opcode",
           "-e", "icmp.type", "-e", "icmp.seq", "-e", "udp.srcport", "-e", "udp.dstport")
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    arp = [row for row in rows if row[0] == "eth:ethertype:arp"]
    assert [row[1] for row in arp] == ["1", "2"]  # one request, one reply
    icmp = [(row[2], row[3]) for row in rows if row[0].endswith(":icmp:data")]
    assert icmp == [(t, str(s)) for s in range(1, 6) for t in ("8", "0")]
    udp_rows = [row for row in rows if ":udp" in row[0]]
    assert len(udp_rows) == 4 and {row[4] for row in udp_rows[1::2]} == {"7"}


class NsGuest(Guest):
    """netecho under tracevisor, started inside the namespace (where the TAP lives)."""

    def __init__(self, ns: str, args: list[str]) -> None:
        import queue
        import threading

        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-m", "tracevisor", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.lines = queue.Queue()
        self.out = []
        threading.Thread(target=self._pump, daemon=True).start()


def test_tap_that_cannot_be_attached(guests, netns):
    ns, tap = netns
    # A TUN (not TAP) device of that name exists: attaching as TAP fails with a clear message
    sh("ip", "-n", ns, "tuntap", "add", "dev", tap + "u", "mode", "tun")
    r = sh("ip", "netns", "exec", ns, sys.executable, "-m", "tracevisor", "run", "--net", f"tap:{tap}u",
           str(guests["netecho"]), check=False)
    assert r.returncode == 1 and "cannot attach TAP device" in r.stderr, r.stderr


def test_a_missing_tap_is_an_error_unless_creation_is_asked_for(guests, netns):
    """A mistyped name must not quietly create a new, unconfigured TAP as root and run without network."""
    ns, tap = netns
    typo = tap + "z"
    r = sh("ip", "netns", "exec", ns, sys.executable, "-m", "tracevisor", "run", "--timeout", "20",
           "--net", f"tap:{typo}", str(guests["netecho"]), "10.0.0.2", "1", check=False, timeout=60)
    assert r.returncode == 1 and f"no network interface '{typo}'" in r.stderr and "Traceback" not in r.stderr, \
        r.stderr
    assert r.stderr.count("\n") == 1 and f"--net tap:{typo},create" in r.stderr
    assert typo not in sh("ip", "-n", ns, "link", "show").stdout  # nothing was created
    # asked for: the kernel creates a temporary TAP for the run (gone afterwards)
    r = sh("ip", "netns", "exec", ns, sys.executable, "-m", "tracevisor", "run", "--timeout", "3",
           "--net", f"tap:{typo},create", str(guests["netecho"]), "10.0.0.2", "1", check=False, timeout=60)
    assert "no network interface" not in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.returncode in (0, 124), r.stderr
    assert typo not in sh("ip", "-n", ns, "link", "show").stdout
