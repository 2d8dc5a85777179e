"""The documented columns of every frame ``analysis.load`` builds: name, dtype and meaning.

This table is the single definition used by the loader, the Parquet/CSV readers (which restore dtypes with
:func:`conform`) and the documentation (docs/analysis.md lists the same columns).  Times are integers in
nanoseconds since the trace start (``pd.to_timedelta(df.t_ns, unit="ns")`` turns them into timedeltas).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd

from tracevisor.trace.schema import EXIT_REASONS, HYPERCALL_PORTS


class Column(NamedTuple):
    name: str
    dtype: str
    doc: str


#: Categories of the categorical columns (fixed, so frames of different traces concatenate as categoricals;
#: values outside the list are appended, sorted).
REASON_CATEGORIES: tuple[str, ...] = tuple(EXIT_REASONS[k] for k in sorted(EXIT_REASONS))
CALL_CATEGORIES: tuple[str, ...] = tuple(HYPERCALL_PORTS)
STREAM_CATEGORIES: tuple[str, ...] = ("uart", "stdout", "stderr")
VIRTIO_OP_CATEGORIES: tuple[str, ...] = ("chain", "status", "reset", "features", "queue", "error")
DIRECTION_CATEGORIES: tuple[str, ...] = ("rx", "tx")
PROTOCOL_CATEGORIES: tuple[str, ...] = ("ARP", "IPv4", "ICMP", "UDP", "TCP", "IPv6", "ICMPv6", "other")
FALLBACK_KIND_CATEGORIES: tuple[str, ...] = ("burst", "nm", "exception", "xgetbv", "xsave", "xrstor")
BURST_STOP_CATEGORIES: tuple[str, ...] = ("exit", "budget", "fault", "mmio")

CATEGORIES: dict[tuple[str, str], tuple[str, ...]] = {
    ("exits", "reason"): REASON_CATEGORIES,
    ("hypercalls", "call"): CALL_CATEGORIES,
    ("console", "stream"): STREAM_CATEGORIES,
    ("virtio", "op"): VIRTIO_OP_CATEGORIES,
    ("packets", "direction"): DIRECTION_CATEGORIES,
    ("packets", "protocol"): PROTOCOL_CATEGORIES,
    ("fallback", "kind"): FALLBACK_KIND_CATEGORIES,
    ("fallback", "stop"): BURST_STOP_CATEGORIES,
}

_C = Column

FRAMES: dict[str, tuple[Column, ...]] = {
    "exits": (
        _C("seq", "int64", "global sequence number of the exit (the trace's event order)"),
        _C("vcpu", "uint16", "vCPU index"),
        _C("t_ns", "int64", "ns since the trace start when the exit happened"),
        _C("reason", "category", "KVM exit reason name: IO, HLT, MMIO, SHUTDOWN, ... (REASON_<n> when unknown)"),
        _C("reason_code", "uint8", "the KVM_EXIT_* number"),
        _C("port", "uint16", "port I/O: the port; else 0"),
        _C("dir", "uint8", "port I/O direction: 0 in, 1 out; else 0"),
        _C("size", "uint8", "port I/O access width in bytes (1, 2, 4); else 0"),
        _C("value", "uint32", "port I/O data (OUT: written by the guest; IN: returned to it); else 0"),
        _C("rip", "uint64", "guest instruction pointer at the exit"),
        _C("digest", "Int64", "register digest: CRC-32 of rax … r15, rip, rflags at the exit (format 2.x); NA in "
                               "format 1.x traces"),
        _C("duration_ns", "int64", "ns until the next exit on the same vCPU; for a vCPU's last exit, until the "
                                   "last event of that vCPU (its stop); never negative"),
    ),
    "hypercalls": (
        _C("seq", "int64", "sequence number of the hypercall event (after its exit row and hostio events)"),
        _C("vcpu", "uint16", "vCPU index"),
        _C("t_ns", "int64", "ns since the trace start when the host began handling the call"),
        _C("t_end_ns", "int64", "ns when the host finished"),
        _C("latency_ns", "int64", "host latency: t_end_ns - t_ns"),
        _C("call", "category", "hypercall name: " + ", ".join(HYPERCALL_PORTS)),
        _C("port", "uint16", "I/O port the guest wrote"),
        _C("addr", "uint64", "guest-physical address of the argument block"),
        _C("args", "object", "decoded block fields (dict by ABI name, e.g. {'fd': 1, 'buf': 4198400, 'len': 6}); "
                             "JSON text in Parquet/CSV exports"),
        _C("fd", "Int64", "the fd argument (read, write, close, lseek); else NA"),
        _C("len", "Int64", "the len argument (read, write); else NA"),
        _C("path", "string", "file name the guest passed (open, unlink); else NA"),
        _C("ret", "Int64", "result; NA when the call has none (exit) or was refused"),
        _C("bytes_in", "int64", "bytes the host put into the guest for this call (read data, command line strings)"),
        _C("bytes_out", "int64", "bytes the guest handed to the host (write data, a file name)"),
        _C("error", "string", "why the hypervisor refused the call (the run then stopped); else NA"),
    ),
    "files": (
        _C("path", "string", "file name the guest opened"),
        _C("fd", "int64", "fd the host returned"),
        _C("flags", "Int64", "open flags (O_CREAT|O_RDWR|... as the guest passed them)"),
        _C("mode", "Int64", "open mode"),
        _C("vcpu", "uint16", "vCPU that opened it"),
        _C("opened_seq", "int64", "seq of the open hypercall"),
        _C("opened_t_ns", "int64", "ns when it was opened"),
        _C("closed_seq", "Int64", "seq of the successful close; NA if the guest never closed it"),
        _C("closed_t_ns", "Int64", "ns when it was closed; NA if never"),
        _C("reads", "int64", "read calls on this open file (failed ones included)"),
        _C("writes", "int64", "write calls on this open file"),
        _C("seeks", "int64", "lseek calls on this open file"),
        _C("bytes_read", "int64", "bytes the host returned to reads"),
        _C("bytes_written", "int64", "bytes the host accepted from writes"),
    ),
    "console": (
        _C("seq", "int64", "sequence number of the console event"),
        _C("t_ns", "int64", "ns of the first byte"),
        _C("vcpu", "uint16", "vCPU that produced the output"),
        _C("stream", "category", "uart, stdout or stderr"),
        _C("text", "string", "the bytes decoded as UTF-8 (undecodable bytes as \\xNN escapes)"),
        _C("nbytes", "int64", "number of bytes"),
    ),
    "virtio": (
        _C("seq", "int64", "sequence number of the virtio event"),
        _C("t_ns", "int64", "ns since the trace start"),
        _C("vcpu", "uint16", "vCPU whose access made the device act"),
        _C("op", "category", "chain (a descriptor chain used), status, reset, features, queue, error"),
        _C("queue", "Int64", "queue index: 0 RX, 1 TX (chain, queue)"),
        _C("head", "Int64", "descriptor index at the head of the chain"),
        _C("slot", "Int64", "available-ring index the chain was taken at (mod 2^16)"),
        _C("descriptors", "object", "list of [index, addr, len, flags, next] per descriptor (JSON text in exports)"),
        _C("n_descriptors", "Int64", "number of descriptors in the chain"),
        _C("length", "Int64", "bytes the device read from (TX) or wrote into (RX) the chain"),
        _C("used_idx", "Int64", "used ring index after the chain was returned"),
        _C("status", "Int64", "device status after the access (status, reset, error)"),
        _C("message", "string", "what is malformed (error)"),
    ),
    "packets": (
        _C("seq", "int64", "sequence number of the net event"),
        _C("t_ns", "int64", "ns since the trace start"),
        _C("vcpu", "uint16", "vCPU whose access moved the frame"),
        _C("direction", "category", "rx (to the guest) or tx (from the guest)"),
        _C("length", "int64", "frame length in bytes (Ethernet header included, no virtio-net header)"),
        _C("protocol", "category", "ARP, IPv4, ICMP, UDP, TCP, IPv6, ICMPv6 or other"),
        _C("eth_dst", "string", "destination MAC, aa:bb:cc:dd:ee:ff"),
        _C("eth_src", "string", "source MAC"),
        _C("ethertype", "Int64", "EtherType (after one 802.1Q tag, if any)"),
        _C("ip_src", "string", "IPv4/IPv6 source address; ARP: sender protocol address"),
        _C("ip_dst", "string", "IPv4/IPv6 destination address; ARP: target protocol address"),
        _C("ip_proto", "Int64", "IPv4 protocol / IPv6 next header"),
        _C("ttl", "Int64", "IPv4 TTL / IPv6 hop limit"),
        _C("src_port", "Int64", "UDP/TCP source port"),
        _C("dst_port", "Int64", "UDP/TCP destination port"),
        _C("udp_length", "Int64", "UDP length field (header + payload)"),
        _C("icmp_type", "Int64", "ICMP/ICMPv6 type"),
        _C("queue", "Int64", "virtqueue index (0 RX, 1 TX)"),
        _C("head", "Int64", "head descriptor of the chain that carried it"),
        _C("via", "string", "rx: isr or notify (the access that delivered it)"),
        _C("dropped", "string", "why the frame was not delivered/sent; NA when it was"),
        _C("frame", "object", "the raw Ethernet frame (bytes; hex text in CSV)"),
    ),
    "fallback": (
        _C("seq", "int64", "sequence number of the fallback event (right after the INTERNAL_ERROR exit it "
                           "answered)"),
        _C("t_ns", "int64", "ns since the trace start when the fallback finished"),
        _C("vcpu", "uint16", "vCPU index"),
        _C("kind", "category", "burst, nm, exception, xgetbv, xsave or xrstor (docs/fallback.md)"),
        _C("rip", "uint64", "guest-virtual RIP of the instruction KVM could not run (burst: its `start`)"),
        _C("insn", "string", "mnemonic of that instruction (burst, nm, exception); else NA"),
        _C("count", "Int64", "burst: instructions the emulator executed; else NA"),
        _C("end", "Int64", "burst: RIP after the burst; else NA"),
        _C("stop", "category", "burst: why it ended (exit, budget, fault, mmio); else NA"),
        _C("vector", "Int64", "exception vector (exception; a burst stopped by a fault; an XGETBV/XSAVE/XRSTOR "
                              "that faulted); else NA"),
        _C("error_code", "Int64", "the exception's error code, when it has one; else NA"),
        _C("cr2", "Int64", "faulting address of a #PF; else NA"),
        _C("xcr", "Int64", "xgetbv: ECX, the XCR read; else NA"),
        _C("value", "Int64", "xgetbv: the value returned in EDX:EAX; else NA"),
        _C("addr", "Int64", "xsave/xrstor: the save area (virtual); else NA"),
        _C("rfbm", "Int64", "xsave/xrstor: the requested-feature bitmap; else NA"),
        _C("error", "string", "xsave/xrstor: why the CPU would fault; else NA"),
    ),
}

#: Frames in the order they are exported.
FRAME_NAMES: tuple[str, ...] = tuple(FRAMES)
#: Columns holding Python objects (dicts, lists), stored as JSON text in Parquet and CSV files.
JSON_COLUMNS: dict[str, tuple[str, ...]] = {"hypercalls": ("args",), "virtio": ("descriptors",)}
#: Columns holding bytes (kept as binary in Parquet, hex text in CSV).
BYTES_COLUMNS: dict[str, tuple[str, ...]] = {"packets": ("frame",)}


def columns(frame: str) -> list[str]:
    return [c.name for c in FRAMES[frame]]


def dtypes(frame: str) -> dict[str, str]:
    return {c.name: c.dtype for c in FRAMES[frame]}


def categorical(frame: str, column: str, values) -> pd.Categorical:
    """``values`` as a categorical with the documented categories (unknown values appended, sorted)."""
    base = CATEGORIES.get((frame, column), ())
    if isinstance(values, pd.Categorical):
        present = [c for c in values.categories[np.unique(values.codes[values.codes >= 0])]]
    else:
        present = pd.unique(pd.Series(values, dtype=object).dropna())
    extra = sorted({str(v) for v in present} - set(base))
    cats = list(base) + extra
    if isinstance(values, pd.Categorical):
        return values.set_categories(cats)
    return pd.Categorical(values, categories=cats)


def empty_frame(frame: str) -> pd.DataFrame:
    """A frame with the documented columns and dtypes and no rows."""
    return conform(pd.DataFrame({c.name: [] for c in FRAMES[frame]}), frame)


def conform(df: pd.DataFrame, frame: str) -> pd.DataFrame:
    """``df`` with exactly the documented columns, in order, each cast to its documented dtype.

    Extra columns (e.g. ``trace`` added by ``load_many``) are kept in front."""
    spec = FRAMES[frame]
    extra = [c for c in df.columns if c not in {s.name for s in spec}]
    out = {}
    for name in extra:
        out[name] = df[name]
    n = len(df)
    for col in spec:
        s = df[col.name] if col.name in df.columns else pd.Series([None] * n, index=df.index, dtype=object)
        out[col.name] = _cast(s, frame, col)
    result = pd.DataFrame(out, index=pd.RangeIndex(n))
    return result


_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1


def _int64_or_none(v):
    if isinstance(v, np.integer):
        v = int(v)
    elif isinstance(v, float) and v.is_integer():  # pandas made a column of ints and None float64
        v = int(v)
    return v if type(v) is int and _I64_MIN <= v <= _I64_MAX else None


def _cast(s: pd.Series, frame: str, col: Column) -> pd.Series:
    dt = col.dtype
    if dt == "category":
        values = s.array if isinstance(s.dtype, pd.CategoricalDtype) else s.to_numpy(dtype=object)
        if isinstance(values, pd.Categorical):
            return pd.Series(categorical(frame, col.name, values), name=col.name).reset_index(drop=True)
        values = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in values]
        return pd.Series(categorical(frame, col.name, values), name=col.name)
    if dt == "object":
        return pd.Series(s.to_numpy(dtype=object), dtype=object, name=col.name)
    if dt == "string":
        return pd.Series(s.to_numpy(dtype=object), dtype=object, name=col.name).astype("string")
    if dt == "Int64":
        if s.dtype in (np.int64, np.int32, np.int16, np.int8, np.uint8, np.uint16, np.uint32) \
                or isinstance(s.dtype, pd.Int64Dtype):
            return pd.Series(s.to_numpy(), name=col.name).astype("Int64")
        # Python values from events (or uint64/float columns pandas inferred from them): anything that is
        # not an int64 becomes <NA>
        return pd.Series(pd.array([_int64_or_none(v) for v in s.to_numpy(dtype=object)], dtype="Int64"),
                         name=col.name)
    if dt == "bool":
        return pd.Series(s.to_numpy(), name=col.name).astype(bool)
    arr = s.to_numpy()
    info = np.iinfo(dt)
    fits = arr.dtype.kind not in "iu" or not arr.size or (info.min <= int(arr.min()) and int(arr.max()) <= info.max)
    try:
        if not fits:  # numpy would wrap these around silently
            raise OverflowError
        return pd.Series(np.asarray(arr, dtype=dt), name=col.name)
    except (OverflowError, ValueError, TypeError):
        # Only a crafted or damaged trace gets here: a value that does not fit the column is clipped to its
        # range (a non-number becomes 0), so the frame still loads.
        return pd.Series(np.array([min(max(int(v), info.min), info.max) if isinstance(v, (int, np.integer))
                                   else 0 for v in s.to_numpy(dtype=object)], dtype=dt), name=col.name)
