"""Network frames of a trace as a pcap file (stdlib only), for Wireshark/tshark/tcpdump.

Every ``net`` event (format 1.1) becomes one record: the Ethernet frame as the device saw it, received
(``rx``) and sent (``tx``) frames interleaved in trace order, time-stamped with the trace's start
(``created_ns`` in the header) plus the event's ``t``.  The file is classic pcap with nanosecond
timestamps (magic 0xA1B23C4D), link type 1 (Ethernet), snap length 65535.

    python -m tracevisor.pcap run.tvt run.pcap      # then: tshark -r run.pcap

Classic pcap has no direction field; :func:`frames` returns it for callers that need it.
"""

from __future__ import annotations

import os
import struct
import sys
from collections.abc import Iterator
from typing import BinaryIO

MAGIC_NS = 0xA1B23C4D
LINKTYPE_ETHERNET = 1
SNAPLEN = 65535
GLOBAL_HEADER = struct.Struct("<IHHiIII")
RECORD_HEADER = struct.Struct("<IIII")


def global_header(snaplen: int = SNAPLEN, linktype: int = LINKTYPE_ETHERNET) -> bytes:
    return GLOBAL_HEADER.pack(MAGIC_NS, 2, 4, 0, 0, snaplen, linktype)


def record(t_ns: int, frame: bytes, snaplen: int = SNAPLEN) -> bytes:
    data = bytes(frame[:snaplen])
    return RECORD_HEADER.pack(t_ns // 1_000_000_000, t_ns % 1_000_000_000, len(data), len(frame)) + data


def frames(trace: str | os.PathLike, include_dropped: bool = True) -> Iterator[tuple[int, str, bytes, dict]]:
    """``(absolute time in ns, "rx"|"tx", frame, event)`` for every ``net`` event of the trace, in order."""
    from .trace import open_trace

    reader = open_trace(trace)
    try:
        base = reader.header.get("created_ns")
        base = base if isinstance(base, int) else 0
        for ev in reader.events(kinds=["net"]):
            frame = ev.get("frame")
            if not isinstance(frame, (bytes, bytearray)):
                continue
            if ev.get("dropped") and not include_dropped:
                continue
            yield base + int(ev.get("t", 0)), str(ev.get("dir", "")), bytes(frame), ev
    finally:
        reader.close()


def write_pcap(trace: str | os.PathLike, out: str | os.PathLike | BinaryIO, *, include_dropped: bool = True,
               direction: str | None = None) -> int:
    """Write the trace's frames to ``out`` (a path or a binary file); returns the number of frames.
    ``direction`` "rx" or "tx" keeps only that direction."""
    own = not hasattr(out, "write")
    f = open(out, "wb") if own else out
    n = 0
    try:
        f.write(global_header())
        for t, d, frame, _ev in frames(trace, include_dropped):
            if direction and d != direction:
                continue
            f.write(record(t, frame))
            n += 1
    finally:
        if own:
            f.close()
    return n


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .errors import TracevisorError

    p = argparse.ArgumentParser(prog="python -m tracevisor.pcap",
                                description="Write the network frames of a trace as a pcap file.")
    p.add_argument("trace")
    p.add_argument("output")
    p.add_argument("--direction", choices=["rx", "tx"], help="only frames received (rx) or sent (tx) by the guest")
    ns = p.parse_args(argv)
    try:
        n = write_pcap(ns.trace, ns.output, direction=ns.direction)
    except (TracevisorError, OSError) as e:
        print(f"tracevisor: error: {e}", file=sys.stderr)
        return 1
    print(f"tracevisor: wrote {n} frames to {ns.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
