"""Header fields of network frames (Ethernet, ARP, IPv4/IPv6, UDP/TCP/ICMP) and one-line summaries of them.

Standard library only: the packets DataFrame (analysis) and ``tracevisor dump`` both use it.  A frame is
untrusted guest or peer data: every field is read only when the frame is long enough to hold it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from .errors import TracevisorError


def format_mac(mac: bytes) -> str:
    return ":".join(f"{x:02x}" for x in mac)


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or with dashes) → 6 bytes; a unicast address only."""
    parts = text.replace("-", ":").split(":")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        mac = b""
    if len(mac) != 6 or any(len(p) != 2 for p in parts):
        raise TracevisorError(f"bad MAC address {text!r}: use six hex bytes, e.g. 52:54:00:12:34:56")
    if mac[0] & 1:
        raise TracevisorError(f"MAC address {text} is a multicast address; the low bit of the first byte "
                              "must be 0")
    return mac


def parse_frame(frame: bytes) -> dict:
    """Ethernet/ARP/IPv4/IPv6/UDP/TCP/ICMP header fields of one frame (missing ones absent)."""
    out: dict[str, Any] = {"protocol": "other"}
    n = len(frame)
    if n < 14:
        return out
    out["eth_dst"], out["eth_src"] = format_mac(frame[0:6]), format_mac(frame[6:12])
    etype = int.from_bytes(frame[12:14], "big")
    off = 14
    if etype == 0x8100 and n >= 18:
        etype = int.from_bytes(frame[16:18], "big")
        off = 18
    out["ethertype"] = etype
    if etype == 0x0806 and n >= off + 28:
        out["protocol"] = "ARP"
        out["ip_src"] = str(ipaddress.IPv4Address(frame[off + 14:off + 18]))
        out["ip_dst"] = str(ipaddress.IPv4Address(frame[off + 24:off + 28]))
        return out
    if etype == 0x0800 and n >= off + 20:
        ihl = (frame[off] & 15) * 4
        proto = frame[off + 9]
        out.update(protocol="IPv4", ip_proto=proto, ttl=frame[off + 8],
                   ip_src=str(ipaddress.IPv4Address(frame[off + 12:off + 16])),
                   ip_dst=str(ipaddress.IPv4Address(frame[off + 16:off + 20])))
        l4 = off + max(ihl, 20)
    elif etype == 0x86DD and n >= off + 40:
        proto = frame[off + 6]
        out.update(protocol="IPv6", ip_proto=proto, ttl=frame[off + 7],
                   ip_src=str(ipaddress.IPv6Address(frame[off + 8:off + 24])),
                   ip_dst=str(ipaddress.IPv6Address(frame[off + 24:off + 40])))
        l4 = off + 40
    else:
        return out
    if proto in (6, 17) and n >= l4 + 4:
        out["protocol"] = "UDP" if proto == 17 else "TCP"
        out["src_port"] = int.from_bytes(frame[l4:l4 + 2], "big")
        out["dst_port"] = int.from_bytes(frame[l4 + 2:l4 + 4], "big")
        if proto == 17 and n >= l4 + 6:
            out["udp_length"] = int.from_bytes(frame[l4 + 4:l4 + 6], "big")
    elif proto in (1, 58) and n >= l4 + 1:
        out["protocol"] = "ICMP" if proto == 1 else "ICMPv6"
        out["icmp_type"] = frame[l4]
    return out


_ICMP_TYPES = {0: "echo reply", 3: "unreachable", 8: "echo request", 11: "time exceeded"}
_ICMP6_TYPES = {128: "echo request", 129: "echo reply", 133: "router solicitation", 135: "neighbor solicitation",
                136: "neighbor advertisement"}


def summary(frame: bytes) -> str:
    """One line about a frame, tcpdump-like: ``ARP who-has 10.0.0.2 tell 10.0.0.1``,
    ``10.0.0.1 > 10.0.0.2 ICMP echo request``, ``10.0.0.1:40000 > 10.0.0.2:7 UDP 18 bytes``."""
    f = parse_frame(frame)
    proto = f["protocol"]
    if "ethertype" not in f:
        return f"short frame ({len(frame)} bytes)"
    if proto == "ARP":
        off = 18 if frame[12:14] == b"\x81\x00" else 14
        op = int.from_bytes(frame[off + 6:off + 8], "big")
        if op == 1:
            return f"ARP who-has {f['ip_dst']} tell {f['ip_src']}"
        if op == 2:
            return f"ARP reply {f['ip_src']} is-at {format_mac(frame[off + 8:off + 14])}"
        return f"ARP op {op} {f['ip_src']} > {f['ip_dst']}"
    if "ip_src" not in f:
        return f"ethertype 0x{f['ethertype']:04x} {f['eth_src']} > {f['eth_dst']}"
    src, dst = f["ip_src"], f["ip_dst"]
    if proto in ("UDP", "TCP"):
        text = f"{src}:{f['src_port']} > {dst}:{f['dst_port']} {proto}"
        if proto == "UDP" and "udp_length" in f:
            return f"{text} {max(f['udp_length'] - 8, 0)} bytes"
        return text
    if proto in ("ICMP", "ICMPv6"):
        names = _ICMP_TYPES if proto == "ICMP" else _ICMP6_TYPES
        t = f["icmp_type"]
        return f"{src} > {dst} {proto} {names.get(t, f'type {t}')}"
    return f"{src} > {dst} {f['protocol']} proto {f.get('ip_proto')}"
