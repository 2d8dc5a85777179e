"""Exports of a loaded trace: Perfetto / Chrome trace-event JSON, Parquet and CSV (one file per frame).

    to_perfetto(trace, "run.json")       # open in ui.perfetto.dev or chrome://tracing
    to_parquet(trace, "run-parquet/")    # exits.parquet, hypercalls.parquet, ..., meta.json
    to_csv(trace, "run-csv/")            # exits.csv, ..., meta.json
    read_parquet("run-parquet/")         # the same frames back (an analysis.Trace)

Parquet and CSV hold the documented frames (analysis.columns); columns of Python objects (hypercall ``args``,
virtio ``descriptors``) are stored as JSON text and decoded again by :func:`read_parquet`/:func:`read_csv`;
packet frames are binary in Parquet and hex in CSV.  ``meta.json`` holds the header, the footer, the reader's
warnings and whether the trace was complete.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd

from .columns import BYTES_COLUMNS, FRAME_NAMES, FRAMES, JSON_COLUMNS, conform
from .frames import Trace, as_trace

#: Above this many exits, ``to_perfetto(exits="auto")`` writes per-vCPU exit-rate counters, not instants.
AUTO_INSTANT_LIMIT = 200_000


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).hex()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    if v is pd.NA:
        return None
    return v


def _meta_document(tr: Trace) -> dict:
    return {"path": tr.path, "header": _jsonable(tr.meta), "footer": _jsonable(tr.footer),
            "warnings": list(tr.warnings), "complete": bool(tr.complete)}


# --------------------------------------------------------------------------------------------------
# Perfetto / Chrome trace-event JSON
# --------------------------------------------------------------------------------------------------

def _us(ns: int | float) -> float:
    return round(float(ns) / 1000.0, 3)


def exit_mode(exits: str, n_exits: int) -> str:
    """How the Perfetto export shows ``n_exits`` exits: ``exits`` itself, with ``"auto"`` resolved."""
    if exits not in ("auto", "instant", "counter", "none"):
        raise ValueError(f"exits={exits!r}: choose auto, instant, counter or none")
    if exits == "auto":
        return "instant" if n_exits <= AUTO_INSTANT_LIMIT else "counter"
    return exits


def perfetto_events(trace: Trace | str, exits: str = "auto", counter_bins: int = 1000) -> list[dict]:
    """The trace as a list of Chrome trace events (process 1 = the VM, thread v+1 = vCPU v, thread 0 =
    the hypervisor).  Hypercalls are complete ("X") slices with their decoded arguments; each vCPU also gets a
    "running" slice from its start to its stop; exits are instant events (``exits="instant"``), per-vCPU
    exit-rate counters (``"counter"``), or left out (``"none"``); ``"auto"`` picks instants up to
    AUTO_INSTANT_LIMIT exits.  Console output, host requests and network frames are instant events."""
    tr = as_trace(trace)
    ex, hc = tr.exits, tr.hypercalls
    exits = exit_mode(exits, len(ex))
    pid = 1
    kernel = tr.meta.get("kernel") if isinstance(tr.meta.get("kernel"), dict) else {}
    kname = os.path.basename(str(kernel.get("path", ""))) or os.path.basename(tr.path)
    cpus = tr.meta.get("cpus")
    vcpus = set(range(cpus)) if type(cpus) is int and 0 < cpus <= 4096 else set()
    vcpus |= set(pd.unique(ex["vcpu"]).tolist()) | set(pd.unique(hc["vcpu"]).tolist())
    out: list[dict] = [
        {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "ts": 0, "args": {"name": f"VM {kname}"}},
        {"ph": "M", "name": "thread_name", "pid": pid, "tid": 0, "ts": 0, "args": {"name": "tracevisor"}},
        {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": 0, "ts": 0, "args": {"sort_index": -1}},
    ]
    for v in sorted(vcpus):
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": v + 1, "ts": 0, "args": {"name": f"vCPU {v}"}})
        out.append({"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": v + 1, "ts": 0,
                    "args": {"sort_index": v}})
    body: list[dict] = []

    # vCPU lifetimes (outermost slices), clamped to cover everything the vCPU did
    life: dict[int, list[int]] = {}
    for ev in tr.events("vcpu"):
        life.setdefault(ev["cpu"], []).append(ev["t"])
    for v, ts in life.items():
        t0, t1 = min(ts), max(ts)
        sel_e = ex["t_ns"][ex["vcpu"] == v]
        sel_h = hc["t_end_ns"][hc["vcpu"] == v]
        if len(sel_e):
            t0, t1 = min(t0, int(sel_e.min())), max(t1, int(sel_e.max()))
        if len(sel_h):
            t0, t1 = min(t0, int(hc["t_ns"][hc["vcpu"] == v].min())), max(t1, int(sel_h.max()))
        body.append({"ph": "X", "name": "running", "cat": "vcpu", "pid": pid, "tid": v + 1, "ts": _us(t0),
                     "dur": _us(t1 - t0), "args": {}})

    # hypercalls: complete slices
    for r in hc.itertuples(index=False):
        args = {k: _jsonable(x) for k, x in (r.args or {}).items()}
        args.update(seq=int(r.seq), ret=None if r.ret is pd.NA else int(r.ret), bytes_in=int(r.bytes_in),
                    bytes_out=int(r.bytes_out))
        if r.path is not pd.NA:
            args["path"] = r.path
        if r.error is not pd.NA:
            args["error"] = r.error
        body.append({"ph": "X", "name": str(r.call), "cat": "hypercall", "pid": pid, "tid": int(r.vcpu) + 1,
                     "ts": _us(r.t_ns), "dur": _us(max(int(r.latency_ns), 0)), "args": args})

    # exits
    if exits == "instant" and len(ex):
        names = np.where(ex["reason_code"].to_numpy() == 2,
                         np.where(ex["dir"].to_numpy() == 1, "IO out ", "IO in ").astype(object)
                         + pd.Series(ex["port"]).map(lambda p: f"{p:#x}").to_numpy(dtype=object),
                         ex["reason"].astype(str).to_numpy(dtype=object))
        for name, seq, v, t, port, value, rip, size in zip(
                names, ex["seq"].tolist(), ex["vcpu"].tolist(), ex["t_ns"].tolist(), ex["port"].tolist(),
                ex["value"].tolist(), ex["rip"].tolist(), ex["size"].tolist()):
            body.append({"ph": "i", "s": "t", "name": name, "cat": "exit", "pid": pid, "tid": v + 1, "ts": _us(t),
                         "args": {"seq": seq, "port": port, "value": value, "rip": f"{rip:#x}", "size": size}})
    elif exits == "counter" and len(ex):
        span = max(int(ex["t_ns"].max()), 1)
        edges = np.linspace(0, span, max(counter_bins, 1) + 1)
        width_s = (edges[1] - edges[0]) / 1e9
        for v in sorted(pd.unique(ex["vcpu"]).tolist()):
            sel = ex[ex["vcpu"] == v]
            per_reason = {}
            for reason, t in sel.groupby("reason", observed=True)["t_ns"]:
                per_reason[str(reason)], _ = np.histogram(t.to_numpy(), bins=edges)
            for i in range(len(edges) - 1):
                body.append({"ph": "C", "name": f"exits/s vCPU {v}", "cat": "exit", "pid": pid, "tid": v + 1,
                             "ts": _us(edges[i]),
                             "args": {k: round(float(c[i]) / width_s, 1) for k, c in per_reason.items()}})

    # console, host requests, network frames, the stop
    for r in tr.console.itertuples(index=False):
        body.append({"ph": "i", "s": "t", "name": f"console {r.stream}", "cat": "console", "pid": pid,
                     "tid": int(r.vcpu) + 1, "ts": _us(r.t_ns), "args": {"seq": int(r.seq), "text": r.text}})
    for ev in tr.events("hostio"):
        body.append({"ph": "i", "s": "t", "name": f"hostio {ev.get('op')}", "cat": "hostio", "pid": pid,
                     "tid": ev["cpu"] + 1, "ts": _us(ev["t"]),
                     "args": {"seq": ev.get("seq"), "args": _jsonable(ev.get("args")),
                              "ret": _jsonable(ev.get("ret")) if not isinstance(ev.get("ret"), (bytes, bytearray))
                              else len(ev["ret"])}})
    for r in tr.packets.itertuples(index=False):
        body.append({"ph": "i", "s": "t", "name": f"net {r.direction} {r.protocol}", "cat": "net", "pid": pid,
                     "tid": int(r.vcpu) + 1, "ts": _us(r.t_ns),
                     "args": {"seq": int(r.seq), "length": int(r.length),
                              "src": None if r.ip_src is pd.NA else r.ip_src,
                              "dst": None if r.ip_dst is pd.NA else r.ip_dst}})
    stop = tr.stop
    if stop and type(stop.get("t")) is int:
        body.append({"ph": "i", "s": "g", "name": f"stop: {stop.get('reason')}", "cat": "stop", "pid": pid, "tid": 0,
                     "ts": _us(stop["t"]), "args": {k: _jsonable(stop.get(k)) for k in ("code", "reason", "message")
                                                    if k in stop}})
    # per track in time order; a slice before the events it contains (longer first at equal ts)
    body.sort(key=lambda e: (e["tid"], e["ts"], -e.get("dur", 0)))
    return out + body


def to_perfetto(trace: Trace | str, path: str | os.PathLike, exits: str = "auto", counter_bins: int = 1000) -> str:
    """Write the trace as Chrome trace-event JSON (``{"traceEvents": [...]}``) for ui.perfetto.dev."""
    tr = as_trace(trace)
    doc = {"traceEvents": perfetto_events(tr, exits=exits, counter_bins=counter_bins), "displayTimeUnit": "ns",
           "otherData": {"tracevisor_trace": os.path.basename(tr.path),
                         "kernel": _jsonable((tr.meta.get("kernel") or {}).get("path")
                                             if isinstance(tr.meta.get("kernel"), dict) else None),
                         "argv": _jsonable(tr.meta.get("argv")), "created": _jsonable(tr.meta.get("created"))}}
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, separators=(",", ":"), ensure_ascii=False)
    return path


# --------------------------------------------------------------------------------------------------
# Parquet and CSV
# --------------------------------------------------------------------------------------------------

def _for_file(df: pd.DataFrame, name: str, csv: bool) -> pd.DataFrame:
    df = df.copy(deep=False)
    for col in JSON_COLUMNS.get(name, ()):
        df[col] = pd.array([None if v is None else json.dumps(_jsonable(v)) for v in df[col]], dtype="string")
    if csv:
        for col in BYTES_COLUMNS.get(name, ()):
            df[col] = pd.array([None if v is None else bytes(v).hex() for v in df[col]], dtype="string")
    return df


def _from_file(df: pd.DataFrame, name: str, csv: bool) -> pd.DataFrame:
    for col in JSON_COLUMNS.get(name, ()):
        if col in df.columns:
            df[col] = pd.Series([None if v is None or v is pd.NA or (isinstance(v, float) and v != v)
                                 else json.loads(v) for v in df[col]], dtype=object, index=df.index)
    for col in BYTES_COLUMNS.get(name, ()):
        if col in df.columns:
            conv = (lambda v: bytes.fromhex(v)) if csv else (lambda v: bytes(v))
            df[col] = pd.Series([None if v is None or v is pd.NA or (isinstance(v, float) and v != v) else conv(v)
                                 for v in df[col]], dtype=object, index=df.index)
    return conform(df, name)


def _write_meta(tr: Trace, outdir: str) -> str:
    path = os.path.join(outdir, "meta.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_meta_document(tr), f, indent=1)
    return path


def to_parquet(trace: Trace | str, outdir: str | os.PathLike, trace_name: str | None = None) -> list[str]:
    """One Parquet file per frame (``exits.parquet``, ``hypercalls.parquet``, ...) plus ``meta.json`` in
    ``outdir``.  With ``trace_name``, every file also gets a leading ``trace`` column holding it (for
    querying many exports together)."""
    tr = as_trace(trace)
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    written = []
    for name in FRAME_NAMES:
        df = _for_file(getattr(tr, name), name, csv=False)
        if trace_name is not None:
            df.insert(0, "trace", pd.Series([trace_name] * len(df), dtype="string"))
        path = os.path.join(outdir, f"{name}.parquet")
        df.to_parquet(path, index=False, engine="pyarrow")
        written.append(path)
    written.append(_write_meta(tr, outdir))
    return written


def to_csv(trace: Trace | str, outdir: str | os.PathLike) -> list[str]:
    """One CSV file per frame (header row, comma-separated, an empty field for a missing value) plus
    ``meta.json``."""
    tr = as_trace(trace)
    outdir = os.fspath(outdir)
    os.makedirs(outdir, exist_ok=True)
    written = []
    for name in FRAME_NAMES:
        path = os.path.join(outdir, f"{name}.csv")
        _for_file(getattr(tr, name), name, csv=True).to_csv(path, index=False)
        written.append(path)
    written.append(_write_meta(tr, outdir))
    return written


def _read_meta(indir: str) -> dict:
    path = os.path.join(indir, "meta.json")
    if not os.path.exists(path):
        return {"path": indir, "header": {}, "footer": None, "warnings": [], "complete": True}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _trace_from(indir: str, frames: dict[str, pd.DataFrame]) -> Trace:
    meta = _read_meta(indir)
    exits = frames.pop("exits")
    return Trace(meta.get("path") or indir, meta.get("header") or {}, meta.get("footer"), list(meta.get("warnings") or []),
                 bool(meta.get("complete", True)), exits, rich=None, frames=frames)


def read_parquet(indir: str | os.PathLike) -> Trace:
    """The frames written by :func:`to_parquet`, with their documented dtypes, as an :class:`analysis.Trace`
    (``events()`` is empty: rich events are not part of the export)."""
    indir = os.fspath(indir)
    frames = {}
    for name in FRAME_NAMES:
        path = os.path.join(indir, f"{name}.parquet")
        if os.path.exists(path):
            df = pd.read_parquet(path, engine="pyarrow")
            if "trace" in df.columns:
                df = df.drop(columns=["trace"])
            frames[name] = _from_file(df, name, csv=False)
        else:
            frames[name] = conform(pd.DataFrame({c.name: [] for c in FRAMES[name]}), name)
    return _trace_from(indir, frames)


def read_csv(indir: str | os.PathLike) -> Trace:
    """The frames written by :func:`to_csv`, with their documented dtypes (an :class:`analysis.Trace`)."""
    indir = os.fspath(indir)
    frames = {}
    for name in FRAME_NAMES:
        path = os.path.join(indir, f"{name}.csv")
        spec = {c.name: c.dtype for c in FRAMES[name]}
        if os.path.exists(path):
            read_as = {c: ("string" if d in ("string", "object", "category") else d) for c, d in spec.items()}
            df = pd.read_csv(path, dtype=read_as, keep_default_na=False, na_values=[""])
            frames[name] = _from_file(df, name, csv=True)
        else:
            frames[name] = conform(pd.DataFrame({c: [] for c in spec}), name)
    return _trace_from(indir, frames)
