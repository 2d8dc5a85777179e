"""Ethernet/ARP/IPv4/ICMP/UDP frames for the network tests (build and parse; stdlib only)."""

from __future__ import annotations

import struct

BROADCAST = b"\xff" * 6
GUEST_MAC = bytes.fromhex("525400123456")
PEER_MAC = bytes.fromhex("02aabbccddee")
PEER_IP = bytes([10, 0, 0, 1])
GUEST_IP = bytes([10, 0, 0, 2])


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp_request(target_ip=GUEST_IP, sender_mac=PEER_MAC, sender_ip=PEER_IP) -> bytes:
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, sender_mac, sender_ip, b"\0" * 6, target_ip)
    return eth(BROADCAST, sender_mac, 0x0806, arp)


def ipv4(proto: int, payload: bytes, src=PEER_IP, dst=GUEST_IP, ident=1) -> bytes:
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0x4000, 64, proto, 0, src, dst)
    hdr = hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:]
    return hdr + payload


def icmp_echo(seq: int, data: bytes = bytes(range(56)), ident=0x1234, dst_mac=GUEST_MAC) -> bytes:
    msg = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + data
    msg = msg[:2] + struct.pack("!H", checksum(msg)) + msg[4:]
    return eth(dst_mac, PEER_MAC, 0x0800, ipv4(1, msg, ident=seq))


def udp(sport: int, dport: int, payload: bytes, dst_mac=GUEST_MAC) -> bytes:
    u = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    pseudo = PEER_IP + GUEST_IP + struct.pack("!BBH", 0, 17, len(u))
    c = checksum(pseudo + u) or 0xFFFF
    u = u[:6] + struct.pack("!H", c) + u[8:]
    return eth(dst_mac, PEER_MAC, 0x0800, ipv4(17, u))


def parse(frame: bytes) -> dict:
    """The fields the tests look at; checks every checksum it meets."""
    out = {"dst": frame[:6], "src": frame[6:12], "type": struct.unpack("!H", frame[12:14])[0]}
    body = frame[14:]
    if out["type"] == 0x0806:
        htype, ptype, hl, pl, op, smac, sip, tmac, tip = struct.unpack("!HHBBH6s4s6s4s", body[:28])
        out.update(op=op, smac=smac, sip=sip, tmac=tmac, tip=tip)
    elif out["type"] == 0x0800:
        ihl = (body[0] & 15) * 4
        total = struct.unpack("!H", body[2:4])[0]
        assert checksum(body[:ihl]) == 0, "bad IPv4 header checksum"
        out.update(proto=body[9], src_ip=body[12:16], dst_ip=body[16:20], ttl=body[8])
        l4 = body[ihl:total]
        if body[9] == 1:
            assert checksum(l4) == 0, "bad ICMP checksum"
            out.update(icmp_type=l4[0], icmp_seq=struct.unpack("!H", l4[6:8])[0], icmp_data=l4[8:])
        elif body[9] == 17:
            sport, dport, length, csum = struct.unpack("!HHHH", l4[:8])
            if csum:
                assert checksum(body[12:20] + struct.pack("!BBH", 0, 17, length) + l4[:length]) == 0, \
                    "bad UDP checksum"
            out.update(sport=sport, dport=dport, payload=l4[8:length])
    return out
