"""``analysis.load(path)``: a trace as typed pandas DataFrames.

The exit rows are the bulk of a trace; they are loaded without any per-exit Python work: the reader's
chunks hand over their packed 27-byte rows, each chunk's rows are viewed with ``numpy.frombuffer``
(``schema.EXIT_DTYPE_FIELDS``) and copied field by field into preallocated columns, and their seqs come from
the chunk rule (the chunk's seqs not used by a rich event).  Rich events (hypercalls, console output, ...) are few and become the other frames on first use.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd

from tracevisor.netparse import parse_frame
from tracevisor.trace import open_trace
from tracevisor.trace.schema import EXIT_DTYPE_FIELDS, EXIT_DTYPE_FIELDS_V1, EXIT_REASONS, EXIT_ROW_SIZE_V1

from .columns import (
    FRAME_NAMES,
    REASON_CATEGORIES,
    conform,
    empty_frame,
)

_EXIT_DTYPE = np.dtype(EXIT_DTYPE_FIELDS)
_EXIT_DTYPE_V1 = np.dtype(EXIT_DTYPE_FIELDS_V1)
_NO_CALL_HOSTIO = frozenset({"boot_time", "cpu_freq", "net_rx"})  # host requests outside any hypercall


def _int(v: Any) -> int | None:
    """``v`` if it is a plain int (bools excluded), else None: rich events may hold anything."""
    return v if type(v) is int else None


def _bytes(v: Any) -> bytes:
    return bytes(v) if isinstance(v, (bytes, bytearray)) else b""


def _text(b: bytes) -> str:
    return b.decode("utf-8", "backslashreplace")


class Trace:
    """A loaded trace: ``exits``, ``hypercalls``, ``files``, ``console``, ``virtio``, ``packets``, ``fallback``
    DataFrames
    (columns and dtypes in :mod:`analysis.columns`, docs/analysis.md) and ``meta`` (the header).

    ``footer``, ``warnings`` and ``complete`` are the reader's; ``path`` the file.  Frames other than
    ``exits`` are built on first access and cached."""

    def __init__(self, path: str, meta: dict, footer: dict | None, warnings: list[str], complete: bool,
                 exits: pd.DataFrame, rich: list[dict] | None = None,
                 frames: dict[str, pd.DataFrame] | None = None) -> None:
        self.path = path
        self.meta = meta
        self.footer = footer
        self.warnings = warnings
        self.complete = complete
        self.exits = exits
        self._rich = rich if rich is not None else []
        #: False for a trace read back from a Parquet/CSV export: it has the frames but not the rich events
        #: (``events()`` is empty), so the event-by-event diff and the vCPU run slices are not available.
        self.has_events = rich is not None
        for name, df in (frames or {}).items():
            self.__dict__[name] = df  # pre-built frames (read back from an export) shadow the builders

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_reader(cls, reader) -> Trace:
        cols, rich, malformed = _read_exit_columns(reader)
        exits = _exits_frame(cols, _vcpu_ends(rich, cols["vcpu"]))
        warnings = list(reader.warnings)
        if malformed:
            warnings.append(f"{len(malformed)} event(s) with an impossible vCPU or time left out of the frames "
                            f"(first: {malformed[0][:200]})")
        return cls(reader.path, reader.header, reader.footer, warnings, reader.complete, exits, rich)

    # -- the frames --------------------------------------------------------------------------------
    @property
    def header(self) -> dict:
        return self.meta

    @cached_property
    def hypercalls(self) -> pd.DataFrame:
        return _hypercalls_frame(self._rich)

    @cached_property
    def files(self) -> pd.DataFrame:
        return _files_frame(self._rich)

    @cached_property
    def console(self) -> pd.DataFrame:
        return _console_frame(self._rich)

    @cached_property
    def virtio(self) -> pd.DataFrame:
        return _virtio_frame(self._rich)

    @cached_property
    def packets(self) -> pd.DataFrame:
        return _packets_frame(self._rich)

    @cached_property
    def fallback(self) -> pd.DataFrame:
        return _fallback_frame(self._rich)

    def frames(self) -> dict[str, pd.DataFrame]:
        """Every frame by name (exits, hypercalls, files, console, virtio, packets, fallback)."""
        return {name: getattr(self, name) for name in FRAME_NAMES}

    def events(self, kinds: Iterable[str] | str | None = None) -> Iterator[dict]:
        """The rich events (not exits) as stored, in seq order; ``kinds`` filters by kind.  Each has an int
        ``cpu`` below 2^16 and an int64 ``t`` (and ``t_end`` when present): the load left out any that did not."""
        if isinstance(kinds, str):
            kinds = {kinds}
        want = None if kinds is None else set(kinds)
        return (ev for ev in self._rich if want is None or ev.get("k") in want)

    @property
    def stop(self) -> dict | None:
        """The stop event (how the run ended), from the footer or the last ``stop`` event."""
        if self.footer and isinstance(self.footer.get("stop"), dict):
            return self.footer["stop"]
        for ev in reversed(self._rich):
            if ev.get("k") == "stop":
                return ev
        return None

    @cached_property
    def end_ns(self) -> int:
        """Time of the last thing in the trace (exit, event start or hypercall end), ns since the start."""
        end = 0
        for name, col in (("exits", "t_ns"), ("hypercalls", "t_end_ns"), ("console", "t_ns"), ("virtio", "t_ns"),
                          ("packets", "t_ns")):
            df = getattr(self, name)
            if len(df):
                end = max(end, int(df[col].max()))
        for ev in self._rich:
            end = max(end, ev["t"], ev.get("t_end", 0))
        return end

    @property
    def console_text(self) -> str:
        """All console output (every stream) in order, as text."""
        return "".join(self.console["text"].fillna(""))

    def __repr__(self) -> str:
        rich = f", {len(self._rich)} rich events" if self.has_events else ", read back from an export"
        return (f"<analysis.Trace {os.path.basename(self.path)}: {len(self.exits)} exits, {len(self.hypercalls)} "
                f"hypercalls{rich}{'' if self.complete else ', incomplete'}>")


def load(path: str | os.PathLike) -> Trace:
    """Load a trace file as frames.  Raises TraceError for a file that is not a readable trace; damage
    after the header ends up in ``.warnings`` (the frames hold what could be read)."""
    reader = open_trace(path)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the rich events are many small containers kept alive: collections would only rescan them
    try:
        return Trace.from_reader(reader)
    finally:
        if gc_was_enabled:
            gc.enable()
        reader.close()


def as_trace(trace: Trace | str | os.PathLike) -> Trace:
    return trace if isinstance(trace, Trace) else load(trace)


# --------------------------------------------------------------------------------------------------
# exits
# --------------------------------------------------------------------------------------------------

_KNOWN_CODES = sorted(EXIT_REASONS)


def _reason_categorical(codes: np.ndarray) -> pd.Categorical:
    lut = np.full(256, -1, dtype=np.int16)
    for i, code in enumerate(_KNOWN_CODES):
        lut[code] = i
    cats = list(REASON_CATEGORIES)
    if len(codes):
        present = np.flatnonzero(np.bincount(codes, minlength=256))
        for code in present:
            if lut[code] < 0:
                lut[code] = len(cats)
                cats.append(f"REASON_{code}")
    if len(cats) > len(REASON_CATEGORIES):  # unknown names sorted after the known ones, as columns.conform does
        extra = sorted(cats[len(REASON_CATEGORIES):])
        for code in range(256):
            if lut[code] >= len(REASON_CATEGORIES):
                lut[code] = len(REASON_CATEGORIES) + extra.index(f"REASON_{code}")
        cats = list(REASON_CATEGORIES) + extra
    small = lut.astype(np.int8 if len(cats) < 128 else np.int16)
    return pd.Categorical.from_codes(small[codes], categories=cats, validate=False)


def _durations(t: np.ndarray, vcpu: np.ndarray, ends: dict[int, int]) -> np.ndarray:
    """ns until the next exit of the same vCPU; a vCPU's last exit runs until the vCPU's last event."""
    n = len(t)
    if n == 0:
        return np.empty(0, dtype=np.int64)
    if int(vcpu.min()) == int(vcpu.max()):
        order = None
        ts, vs = t, vcpu
    else:
        order = np.argsort(vcpu, kind="stable")
        ts, vs = t[order], vcpu[order]
    d = np.empty(n, dtype=np.int64)
    np.subtract(ts[1:], ts[:-1], out=d[:-1])
    last = np.empty(n, dtype=bool)
    np.not_equal(vs[1:], vs[:-1], out=last[:-1])
    last[-1] = True
    idx = np.flatnonzero(last)
    end = np.array([ends.get(int(v), 0) for v in vs[idx]], dtype=np.int64)
    d[idx] = end - ts[idx]
    np.maximum(d, 0, out=d)
    if order is None:
        return d
    out = np.empty(n, dtype=np.int64)
    out[order] = d
    return out


def _vcpu_ends(rich: list[dict], vcpu: np.ndarray) -> dict[int, int]:
    """Per vCPU with exits: the time of its last rich event in seq order (``t_end`` for a hypercall)."""
    need = set(np.unique(vcpu).tolist()) if len(vcpu) else set()
    ends: dict[int, int] = {}
    for ev in reversed(rich):
        if not need:
            break
        c = ev["cpu"]
        if c in need:
            need.discard(c)
            ends[c] = max(ev["t"], ev.get("t_end", 0))
    return ends


_FIELDS = [name for name, _ in EXIT_DTYPE_FIELDS]
#: dtype of each exit column in the frame (t_ns as int64 so it subtracts and converts to timedelta).
_COLUMN_DTYPES = {"t_ns": np.int64, "rip": np.uint64, "value": np.uint32, "port": np.uint16, "vcpu": np.uint16,
                  "reason": np.uint8, "dir": np.uint8, "size": np.uint8, "digest": np.uint32, "has_digest": np.bool_}


_T_MAX = (1 << 63) - 1


def _check_plausible(ev: dict) -> None:
    """What every consumer of the rich events (frames, diff, exports, plots) relies on: ``cpu`` a vCPU index
    that fits the exit rows' uint16, ``t`` (and ``t_end`` when present) an int64 time in ns.  (Other fields
    may be of any type: the frames show what does not fit their columns as missing.)"""
    cpu = ev.get("cpu")
    if not (type(cpu) is int and 0 <= cpu < 1 << 16):
        raise ValueError(f"cpu {cpu!r:.40} is not a vCPU index")
    for key in ("t", "t_end"):
        if key == "t" or key in ev:
            t = ev.get(key)
            if not (type(t) is int and 0 <= t <= _T_MAX):
                raise ValueError(f"{key} {t!r:.40} is not a time in ns")


def _read_exit_columns(reader) -> tuple[dict[str, np.ndarray], list[dict], list[str]]:
    """One pass over the chunks: exit columns (and ``seq``) as numpy arrays, the rich events, and a note for
    each event left out because its vCPU or time is impossible.

    Each chunk's rows are viewed with ``numpy.frombuffer`` and copied field by field into preallocated columns
    (sized by the footer's exit count when it is plausible), so no per-exit Python work and no second copy of
    the whole row data is made."""
    cap = reader.footer.get("exits") if reader.footer else None
    if not (type(cap) is int and 0 <= cap <= reader.size // EXIT_ROW_SIZE_V1):
        cap = None
    cols = {f: np.empty(cap or 0, dtype=dt) for f, dt in _COLUMN_DTYPES.items()}
    cols["seq"] = np.empty(cap or 0, dtype=np.int64)
    pieces: dict[str, list[np.ndarray]] | None = None if cap is not None else {f: [] for f in cols}
    rich: list[dict] = []
    malformed: list[str] = []
    pos = 0
    for chunk in reader.chunks():
        seq0, n = chunk.seq0, chunk.n
        evs = chunk.events
        if evs:
            for ev in evs:
                try:
                    _check_plausible(ev)
                except ValueError as e:  # a crafted event: its seq stays taken, the frames skip it
                    malformed.append(f"seq {ev.get('seq')}: {e}")
                else:
                    rich.append(ev)
        if not chunk.exits:
            continue
        digests = chunk.has_digests
        rows = np.frombuffer(chunk.exits, dtype=_EXIT_DTYPE if digests else _EXIT_DTYPE_V1)
        m = len(rows)
        fields = _FIELDS if digests else _FIELDS[:-1]
        if evs:
            keep = np.ones(n, dtype=bool)
            keep[np.fromiter((ev["seq"] for ev in evs), dtype=np.int64, count=len(evs)) - seq0] = False
            seqs = np.flatnonzero(keep)
            seqs += seq0
        else:
            seqs = np.arange(seq0, seq0 + n, dtype=np.int64)
        if pieces is None and pos + m > cap:  # more rows than the footer said: collect pieces instead
            pieces = {f: [a[:pos]] for f, a in cols.items()}
        if pieces is None:
            end = pos + m
            for f in fields:
                cols[f][pos:end] = rows[f]
            if not digests:
                cols["digest"][pos:end] = 0
            cols["has_digest"][pos:end] = digests
            cols["seq"][pos:end] = seqs
        else:
            for f in fields:
                pieces[f].append(rows[f].astype(_COLUMN_DTYPES[f]))
            if not digests:
                pieces["digest"].append(np.zeros(m, dtype=np.uint32))
            pieces["has_digest"].append(np.full(m, digests, dtype=np.bool_))
            pieces["seq"].append(seqs.astype(np.int64, copy=False))
        pos += m
    if pieces is not None:
        cols = {f: (np.concatenate(p) if p else np.empty(0, dtype=cols[f].dtype)) for f, p in pieces.items()}
    elif pos < cap:  # damaged chunks were skipped
        cols = {f: a[:pos] for f, a in cols.items()}
    return cols, rich, malformed


def _exits_frame(cols: dict[str, np.ndarray], ends: dict[int, int]) -> pd.DataFrame:
    t, vcpu = cols["t_ns"], cols["vcpu"]
    return pd.DataFrame({
        "seq": cols["seq"],
        "vcpu": vcpu,
        "t_ns": t,
        "reason": _reason_categorical(cols["reason"]),
        "reason_code": cols["reason"],
        "port": cols["port"],
        "dir": cols["dir"],
        "size": cols["size"],
        "value": cols["value"],
        "rip": cols["rip"],
        "digest": pd.arrays.IntegerArray(cols["digest"].astype(np.int64), ~cols["has_digest"]),
        "duration_ns": _durations(t, vcpu, ends),
    }, copy=False)


# --------------------------------------------------------------------------------------------------
# rich-event frames
# --------------------------------------------------------------------------------------------------

def _cmdline_bytes(ret: Any) -> int:
    """Bytes of argument and environment strings (with their NULs) a cmdline answer puts in the guest."""
    total = 0
    if isinstance(ret, (list, tuple)):
        for group in ret:
            if isinstance(group, (list, tuple)):
                for s in group:
                    if isinstance(s, (bytes, bytearray, str)):
                        total += len(s) + 1
    return total


def _hypercalls_frame(rich: list[dict]) -> pd.DataFrame:
    rows: list[tuple] = []
    pending: dict[int, list[dict]] = {}
    for ev in rich:
        k = ev.get("k")
        if k == "hostio":
            op = ev.get("op")
            if not (isinstance(op, str) and op in _NO_CALL_HOSTIO):
                pending.setdefault(ev["cpu"], []).append(ev)
            continue
        if k != "hypercall":
            continue
        cpu = ev["cpu"]
        hostio = pending.pop(cpu, ())
        call = ev.get("call")
        call = call if isinstance(call, str) else None
        args = ev.get("args")
        args = dict(args) if isinstance(args, dict) else {}
        t = ev["t"]
        t_end = ev.get("t_end", t)
        payload = _bytes(ev.get("payload"))
        ret = _int(ev.get("ret"))
        bytes_in = 0
        for h in hostio:
            bytes_in += len(_bytes(h.get("data")))
            if call == "cmdval" and h.get("op") == "cmdline":
                bytes_in += _cmdline_bytes(h.get("ret"))
        path = _text(payload) if call in ("open", "unlink") and payload else None
        fd = _int(args.get("fd")) if call in ("read", "write", "close", "lseek") else None
        ln = _int(args.get("len")) if call in ("read", "write") else None
        err = ev.get("error")
        rows.append((ev.get("seq"), cpu, t, t_end, t_end - t, call, _int(ev.get("port")) or 0,
                     _int(ev.get("addr")) or 0, args, fd, ln, path, ret, bytes_in, len(payload),
                     err if isinstance(err, str) else None))
    if not rows:
        return empty_frame("hypercalls")
    names = ["seq", "vcpu", "t_ns", "t_end_ns", "latency_ns", "call", "port", "addr", "args", "fd", "len", "path",
             "ret", "bytes_in", "bytes_out", "error"]
    df = pd.DataFrame.from_records(rows, columns=names)
    df["port"] = df["port"].clip(0, 0xFFFF)
    df["addr"] = df["addr"].clip(0, None) if df["addr"].dtype != object else df["addr"]
    return conform(df, "hypercalls")


def _files_frame(rich: list[dict]) -> pd.DataFrame:
    rows: list[dict] = []
    open_files: dict[int, dict] = {}
    for ev in rich:
        if ev.get("k") != "hypercall":
            continue
        call = ev.get("call")
        args = ev.get("args") if isinstance(ev.get("args"), dict) else {}
        ret = _int(ev.get("ret"))
        if call == "open":
            if ret is None or ret < 0:
                continue
            row = {"path": _text(_bytes(ev.get("payload"))), "fd": ret, "flags": _int(args.get("flags")),
                   "mode": _int(args.get("mode")), "vcpu": ev["cpu"], "opened_seq": ev.get("seq"),
                   "opened_t_ns": ev["t"], "closed_seq": None, "closed_t_ns": None, "reads": 0, "writes": 0,
                   "seeks": 0, "bytes_read": 0, "bytes_written": 0}
            open_files[ret] = row
            rows.append(row)
            continue
        fd = _int(args.get("fd"))
        f = open_files.get(fd) if fd is not None else None
        if f is None:
            continue
        if call == "read":
            f["reads"] += 1
            if ret is not None and ret > 0:
                f["bytes_read"] += ret
        elif call == "write":
            f["writes"] += 1
            n = ret if ret is not None else len(_bytes(ev.get("payload")))
            if n > 0:
                f["bytes_written"] += n
        elif call == "lseek":
            f["seeks"] += 1
        elif call == "close" and ret == 0:
            f["closed_seq"], f["closed_t_ns"] = ev.get("seq"), ev["t"]
            del open_files[fd]
    if not rows:
        return empty_frame("files")
    return conform(pd.DataFrame.from_records(rows), "files")


def _console_frame(rich: list[dict]) -> pd.DataFrame:
    rows = []
    for ev in rich:
        if ev.get("k") != "console":
            continue
        data = _bytes(ev.get("data"))
        stream = ev.get("stream")
        rows.append((ev.get("seq"), ev["t"], ev["cpu"], stream if isinstance(stream, str) else None, _text(data),
                     len(data)))
    if not rows:
        return empty_frame("console")
    return conform(pd.DataFrame.from_records(rows, columns=["seq", "t_ns", "vcpu", "stream", "text", "nbytes"]),
                   "console")


def _virtio_frame(rich: list[dict]) -> pd.DataFrame:
    rows = []
    for ev in rich:
        if ev.get("k") != "virtio":
            continue
        descs = ev.get("descs")
        descs = [list(d) for d in descs if isinstance(d, (list, tuple))] if isinstance(descs, list) else None
        msg = ev.get("message")
        op = ev.get("op")
        rows.append({"seq": ev.get("seq"), "t_ns": ev["t"], "vcpu": ev["cpu"], "op": op if isinstance(op, str) else None,
                     "queue": _int(ev.get("queue")), "head": _int(ev.get("head")), "slot": _int(ev.get("slot")),
                     "descriptors": descs, "n_descriptors": len(descs) if descs is not None else None,
                     "length": _int(ev.get("len")), "used_idx": _int(ev.get("used_idx")),
                     "status": _int(ev.get("status")), "message": msg if isinstance(msg, str) else None})
    if not rows:
        return empty_frame("virtio")
    return conform(pd.DataFrame.from_records(rows), "virtio")


def _packets_frame(rich: list[dict]) -> pd.DataFrame:
    rows = []
    for ev in rich:
        if ev.get("k") != "net":
            continue
        frame = _bytes(ev.get("frame"))
        d, via, dropped = ev.get("dir"), ev.get("via"), ev.get("dropped")
        row = {"seq": ev.get("seq"), "t_ns": ev["t"], "vcpu": ev["cpu"], "direction": d if isinstance(d, str) else None,
               "length": _int(ev.get("len")) if _int(ev.get("len")) is not None else len(frame),
               "queue": _int(ev.get("queue")), "head": _int(ev.get("head")),
               "via": via if isinstance(via, str) else None, "dropped": dropped if isinstance(dropped, str) else None,
               "frame": frame}
        row.update(parse_frame(frame))
        rows.append(row)
    if not rows:
        return empty_frame("packets")
    return conform(pd.DataFrame.from_records(rows), "packets")


# --------------------------------------------------------------------------------------------------
# fallback (docs/fallback.md)
# --------------------------------------------------------------------------------------------------

FALLBACK_KINDS = ("burst", "nm", "exception", "xgetbv", "xsave", "xrstor")
_FALLBACK_INTS = ("count", "end", "vector", "error_code", "cr2", "xcr", "value", "addr", "rfbm")


def _fallback_frame(rich: list[dict]) -> pd.DataFrame:
    rows = []
    for ev in rich:
        kind = ev.get("k")
        if kind not in FALLBACK_KINDS:
            continue
        rip = _int(ev.get("start") if kind == "burst" else ev.get("rip"))
        row = {"seq": ev.get("seq"), "t_ns": ev["t"], "vcpu": ev["cpu"], "kind": kind,
               "rip": rip if rip is not None and 0 <= rip < 1 << 64 else 0}
        for name in ("insn", "error"):
            v = ev.get(name)
            row[name] = v if isinstance(v, str) else None
        stop = ev.get("stop") if kind == "burst" else None
        row["stop"] = stop if isinstance(stop, str) else None
        for name in _FALLBACK_INTS:
            row[name] = _int(ev.get(name))
        rows.append(row)
    if not rows:
        return empty_frame("fallback")
    return conform(pd.DataFrame.from_records(rows), "fallback")
