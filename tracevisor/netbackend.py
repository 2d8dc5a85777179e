"""Network backends: where the frames of the guest's virtio-net device go and come from.

``--net SPEC`` names one:

* ``tap:IFNAME`` — an existing Linux TAP device (``/dev/net/tun``, IFF_TAP | IFF_NO_PI, non-blocking), e.g. a
  persistent one from ``ip tuntap add IFNAME mode tap``; a name that does not exist is an error (a typo must
  not quietly create a new, unconfigured device).  ``tap:IFNAME,create`` lets the kernel create it when
  missing (it disappears with the process; needs CAP_NET_ADMIN).
* ``udp:[HOST:]PORT[,peer=HOST:PORT]`` — every Ethernet frame is one UDP datagram, the encapsulation of
  QEMU's ``-netdev dgram``/``-netdev socket,udp=``.  tracevisor listens on HOST:PORT (default 127.0.0.1) and
  sends to the peer, or, without ``peer=``, to whoever sent the last datagram.  In-process, unprivileged,
  and any program can be the other end: a test that crafts frames, another tracevisor, a QEMU VM.

Both take ``,mac=52:54:00:12:34:56`` (the guest's MAC; that is the default).

A backend is only used by the live HostIO (hostio.LiveHostIO.net_rx/net_tx); the device never sees it, and
a replay never opens one: received frames come from the trace.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass, field

from .errors import TracevisorError
from .netparse import format_mac, parse_mac

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
MAX_FRAME = 65535 + 14

SPEC_HELP = ("tap:IFNAME[,create] or udp:[HOST:]PORT[,peer=HOST:PORT], optionally followed by "
             ",mac=XX:XX:XX:XX:XX:XX; 'none' for no network device")


@dataclass(frozen=True)
class NetSpec:
    kind: str  # "tap" | "udp"
    target: str  # the interface name, or HOST:PORT to listen on
    mac: bytes
    options: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.kind}:{self.target} (guest MAC {format_mac(self.mac)})"


def _host_port(text: str, what: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = default_host, text
    try:
        p = int(port)
    except ValueError:
        p = -1
    if not 0 <= p <= 65535:
        raise TracevisorError(f"bad {what} {text!r}: expected [HOST:]PORT with PORT 0-65535")
    return host or default_host, p


def parse_net_spec(spec: str) -> NetSpec:
    """``--net SPEC`` → :class:`NetSpec`; a bad spec is a :class:`TracevisorError` naming what is wrong."""
    from .devices.virtio_net import DEFAULT_MAC

    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("tap", "udp"):
        raise TracevisorError(f"bad --net {spec!r}: use {SPEC_HELP}")
    target, *opts = rest.split(",")
    mac = DEFAULT_MAC
    options: dict[str, str] = {}
    for o in opts:
        if o == "create" and kind == "tap":
            options["create"] = "yes"
            continue
        key, eq, value = o.partition("=")
        if not eq or key not in ("mac", "peer") or (key == "peer" and kind != "udp"):
            raise TracevisorError(f"bad --net option {o!r} in {spec!r}: use {SPEC_HELP}")
        if key == "mac":
            mac = parse_mac(value)
        else:
            _host_port(value, "peer address")
            options[key] = value
    if kind == "tap":
        if not target or len(target.encode()) >= IFNAMSIZ or "/" in target or target in (".", ".."):
            raise TracevisorError(f"bad TAP interface name {target!r}: 1-{IFNAMSIZ - 1} bytes, no '/'")
    else:
        _host_port(target, "UDP listen address")
    return NetSpec(kind, target, mac, options)


class NetBackend:
    """One network attachment: non-blocking ``recv`` of one frame, ``send`` of one frame."""

    def recv(self) -> bytes | None:
        """The next frame for the guest, or None when none is waiting (never blocks)."""
        raise NotImplementedError

    def send(self, frame: bytes) -> None:
        """Send one frame from the guest (best effort: a full queue or no peer drops it)."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    stats: dict


class TapBackend(NetBackend):
    def __init__(self, name: str, create: bool = False) -> None:
        self.name = name
        self.stats = {"rx": 0, "tx": 0, "tx_errors": 0}
        if not create and not interface_exists(name):
            raise TracevisorError(f"no network interface {name!r} here: create the TAP first (ip tuntap add "
                                  f"{name} mode tap), or use --net tap:{name},create to let tracevisor create a "
                                  "temporary one")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TracevisorError(f"cannot open /dev/net/tun for TAP {name}: {e.strerror} (is the tun module "
                                  "loaded, and is tracevisor allowed to use it?)") from None
        ifr = struct.pack(f"{IFNAMSIZ}sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as e:
            os.close(fd)
            hint = {errno.EPERM: "creating or attaching a TAP needs CAP_NET_ADMIN, or a persistent TAP owned by "
                                 "this user (ip tuntap add NAME mode tap user $USER)",
                    errno.EBUSY: "another process holds it, or it is a TUN (not TAP) device or was created "
                                 "with other flags",
                    errno.EINVAL: "it exists but is not a TAP device with IFF_NO_PI"}.get(e.errno, "")
            raise TracevisorError(f"cannot attach TAP device {name}: {e.strerror}" +
                                  (f" — {hint}" if hint else "")) from None
        self.fd = fd

    def recv(self) -> bytes | None:
        try:
            frame = os.read(self.fd, MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno == errno.EIO:  # interface down: nothing to read
                return None
            raise
        if not frame:
            return None
        self.stats["rx"] += 1
        return frame

    def send(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
            self.stats["tx"] += 1
        except OSError:  # interface down, queue full, frame refused: a real NIC drops it too
            self.stats["tx_errors"] += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class UdpBackend(NetBackend):
    def __init__(self, listen: str, peer: str | None = None) -> None:
        host, port = _host_port(listen, "UDP listen address")
        self.stats = {"rx": 0, "tx": 0, "tx_errors": 0, "tx_no_peer": 0}
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise TracevisorError(f"cannot listen on UDP {host}:{port} for the guest's network: "
                                  f"{e.strerror}") from None
        self.sock.setblocking(False)
        self.address = self.sock.getsockname()
        self.peer = _host_port(peer, "peer address") if peer else None
        self.fixed_peer = peer is not None

    def recv(self) -> bytes | None:
        try:
            frame, sender = self.sock.recvfrom(MAX_FRAME)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:  # e.g. ECONNREFUSED left over from an earlier send to a closed peer
            return None
        if self.fixed_peer and sender != self.peer:
            return None
        if not self.fixed_peer:
            self.peer = sender
        if not frame:
            return None
        self.stats["rx"] += 1
        return frame

    def send(self, frame: bytes) -> None:
        if self.peer is None:
            self.stats["tx_no_peer"] += 1
            return
        try:
            self.sock.sendto(frame, self.peer)
            self.stats["tx"] += 1
        except OSError:
            self.stats["tx_errors"] += 1

    def close(self) -> None:
        self.sock.close()


def interface_exists(name: str) -> bool:
    """Is there a network interface of this name in this process's network namespace?"""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def open_backend(spec: NetSpec | str) -> NetBackend:
    """Open the backend a spec names (live runs and recordings only; a replay never calls this)."""
    if isinstance(spec, str):
        spec = parse_net_spec(spec)
    if spec.kind == "tap":
        return TapBackend(spec.target, create=spec.options.get("create") == "yes")
    return UdpBackend(spec.target, spec.options.get("peer"))
