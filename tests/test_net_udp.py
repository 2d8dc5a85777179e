"""netecho on the virtio-net device with the in-process UDP backend (KVM, no root needed).

The test is the other host: it sends Ethernet frames as UDP datagrams (the QEMU `-netdev dgram`
encapsulation) and checks what the guest answers; then the recording is replayed with no network at all.
"""

from __future__ import annotations

import queue
import socket
import subprocess
import sys
import threading

import pytest

import net_frames as nf
from helpers import run_cli

pytestmark = pytest.mark.kvm


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Guest:
    """A tracevisor process running netecho; stdout lines arrive on a queue."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tracevisor", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.out: list[bytes] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.out.append(line)
            self.lines.put(line)

    def wait_for(self, text: bytes, timeout: float = 30) -> None:
        while True:
            try:
                line = self.lines.get(timeout=timeout)
            except queue.Empty:
                self.proc.kill()
                raise AssertionError(f"no {text!r} from the guest; stdout so far: {b''.join(self.out)!r}, "
                                     f"stderr: {self.proc.stderr.read()!r}") from None
            if text in line:
                return

    def finish(self, timeout: float = 30) -> tuple[int, bytes, bytes]:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        err = self.proc.stderr.read()
        return rc, b"".join(self.out), err


class Peer:
    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.guest = ("127.0.0.1", port)

    def xchg(self, frame: bytes) -> dict:
        self.sock.sendto(frame, self.guest)
        data, _ = self.sock.recvfrom(65535)
        return nf.parse(data)


@pytest.fixture
def netecho(guests):
    return str(guests["netecho"])


def test_udp_backend_record_and_replay(netecho, tmp_path):
    port = free_udp_port()
    trace = tmp_path / "net.tvt"
    g = Guest(["record", "-o", str(trace), "--net", f"udp:127.0.0.1:{port}", netecho, "10.0.0.2", "50"])
    peer = Peer(port)
    try:
        g.wait_for(b"netecho: ready")
        r = peer.xchg(nf.arp_request())
        assert r["type"] == 0x0806 and r["op"] == 2 and r["smac"] == nf.GUEST_MAC and r["sip"] == nf.GUEST_IP
        assert r["dst"] == nf.PEER_MAC and r["tip"] == nf.PEER_IP
        for seq in (1, 2, 3):
            r = peer.xchg(nf.icmp_echo(seq))
            assert (r["icmp_type"], r["icmp_seq"], r["icmp_data"]) == (0, seq, bytes(range(56)))
            assert r["src_ip"] == nf.GUEST_IP and r["dst_ip"] == nf.PEER_IP
        payload = bytes(range(256)) * 4 + b"end"
        r = peer.xchg(nf.udp(40000, 7, payload))
        assert (r["sport"], r["dport"], r["payload"]) == (7, 40000, payload)
        assert peer.xchg(nf.udp(40000, 7, b"quit"))["payload"] == b"bye\n"
        rc, out, err = g.finish()
    finally:
        g.proc.kill()
        peer.sock.close()
    assert rc == 0, err
    assert b"netecho: handled 6 packets (arp 1, icmp 3, udp 2), ignored 0; bye\n" in out

    from tracevisor.trace import open_trace

    evs = list(open_trace(trace).events(kinds=["net", "virtio", "hostio"]))
    net = [e for e in evs if e["k"] == "net"]
    assert [e["dir"] for e in net] == ["rx", "tx"] * 6
    assert [e["len"] for e in net if e["dir"] == "rx"] == [42, 98, 98, 98, 14 + 20 + 8 + len(payload), 46]
    assert all(e["frame"][:6] == nf.PEER_MAC for e in net if e["dir"] == "tx")
    rx_hostio = [e for e in evs if e["k"] == "hostio" and e["op"] == "net_rx"]
    assert [e["data"] for e in rx_hostio] == [e["frame"] for e in net if e["dir"] == "rx"]
    assert [e["args"][0] for e in rx_hostio] == [e["poll"] for e in net if e["dir"] == "rx"]
    chains = [e for e in evs if e["k"] == "virtio" and e["op"] == "chain"]
    assert len(chains) == 12 and all(c["data"][10:] in {e["frame"] for e in net} for c in chains)

    # callbacks see the network events as they are replayed, with the guest's memory at that point
    from tracevisor.replay import Replayer

    seen = []

    def on_net(ev):
        if ev["dir"] == "rx":  # the frame is in the guest's RX buffer now, after the 10-byte header
            chain = [c for c in chains if c["seq"] < ev.seq][-1]
            addr = chain["descs"][0][1]
            assert ev.memory.read(addr + 10, ev["len"]) == ev["frame"]
        seen.append((ev["dir"], ev["len"]))

    with Replayer(trace, quiet=True) as rp:
        rp.on("net", on_net)
        assert rp.run().verified
    assert seen == [(e["dir"], e["len"]) for e in net]

    # replay: no socket, same guest behaviour, verified
    r = run_cli("replay", str(trace))
    assert r.returncode == 0, r.stderr
    assert r.stdout == out
    assert b"replay verified" in r.stderr


def test_no_device_without_net(netecho):
    r = run_cli("run", netecho)
    assert r.returncode == 2
    assert b"netecho: no virtio-net device (1af4:1000) on PCI bus 0" in r.stderr


@pytest.mark.parametrize("spec,message", [
    ("eth0", "bad --net"),
    ("tap:", "bad TAP interface name"),
    ("tap:a-very-long-interface-name", "bad TAP interface name"),
    ("udp:notaport", "bad UDP listen address"),
    ("udp:1234,mac=01:00:00:00:00:01", "multicast"),
    ("udp:1234,mac=zz", "bad MAC address"),
    ("tap:x,peer=1.2.3.4:5", "bad --net option"),
])
def test_bad_net_specs(netecho, spec, message):
    r = run_cli("run", "--net", spec, netecho)
    assert r.returncode == 1 and message.encode() in r.stderr, r.stderr


def test_mac_option_reaches_the_guest(netecho):
    port = free_udp_port()
    g = Guest(["run", "--net", f"udp:{port},mac=02:00:00:00:00:07", netecho, "10.0.0.2", "1"])
    peer = Peer(port)
    try:
        g.wait_for(b"netecho: ready")
        r = peer.xchg(nf.arp_request())
        assert r["smac"] == bytes.fromhex("020000000007")
        rc, out, _ = g.finish()
    finally:
        g.proc.kill()
        peer.sock.close()
    assert rc == 0 and b"at 02:00:00:00:00:07" in out


def test_time_travel_over_network_traffic(netecho, tmp_path):
    """Seeking back across received and sent frames restores the device too (queues, ISR, poll count)."""
    port = free_udp_port()
    trace = tmp_path / "tt.tvt"
    g = Guest(["record", "-o", str(trace), "--net", f"udp:127.0.0.1:{port}", netecho, "10.0.0.2", "0", "7", "20"])
    peer = Peer(port)
    try:
        g.wait_for(b"netecho: ready")
        peer.xchg(nf.arp_request())
        for seq in range(1, 5):
            peer.xchg(nf.icmp_echo(seq))
        peer.xchg(nf.udp(40000, 7, b"quit"))
        rc, out, err = g.finish()
    finally:
        g.proc.kill()
        peer.sock.close()
    assert rc == 0, err

    from tracevisor.replay import Replayer
    from tracevisor.trace import open_trace

    net = [e for e in open_trace(trace).events(kinds=["net"])]
    first_rx, last_tx = net[0]["seq"], net[-3]["seq"]
    with Replayer(trace, quiet=True, checkpoint_every=40) as r:
        assert r.run_to(last_tx).reason == "paused"
        assert r.seek(first_rx - 1).reason == "paused"
        assert first_rx - 1 <= r.position < last_tx  # pauses happen between exits
        result = r.run()
        assert result.verified and result.code == 0, result.message
