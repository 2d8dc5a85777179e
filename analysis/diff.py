"""``analysis.diff(a, b)``: align two traces of the same kernel and find where they part.

The traces are compared per vCPU, event by event in seq order (as replay compares a run with its recording):
exits by their fields (reason, rip, port, dir, size, value) and the rich events ``hypercall``, ``hostio``,
``console``, ``mmio``, ``vcpu``, ``virtio``, ``net`` and ``stop`` by every field except timing and numbering
(``t``, ``t_end``, ``seq``, ``cpu``), the wall-clock answer of ``hostio boot_time`` and the stop's register
``report`` (with ``ignore_host``, also the host's TSC frequency, ``hostio cpu_freq``).  Exits are compared as numpy columns; only rich events are compared one by one.

The first difference is the earliest (by seq in ``a``) over all vCPUs.  The summary compares hypercall counts
and bytes per call, exit counts per reason, console output and the header fields that define the run
(kernel SHA-256, argv, env, cpus, memory).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd

from tracevisor.trace.schema import reason_name

from .frames import Trace, as_trace

COMPARED_KINDS = ("hypercall", "hostio", "console", "mmio", "vcpu", "virtio", "net", "stop")
_KIND_CODE = {k: i + 1 for i, k in enumerate(COMPARED_KINDS)}  # 0 = exit
EXIT_COMPARED = ("reason_code", "rip", "port", "dir", "size", "value")
_EXIT_FIELD = {"reason_code": "reason"}  # the frame column -> the field name shown (and ignorable) in a diff
IGNORED_FIELDS = frozenset({"seq", "t", "t_end", "cpu"})
HEADER_COMPARED = ("kernel.sha256", "argv", "env", "cpus", "memory")


#: ``hostio`` answers that describe the host rather than the run: the same guest recorded on another machine
#: gets another TSC frequency.  ``diff(..., ignore_host=True)`` (``tracevisor diff --ignore-host``) skips
#: them; the boot time (wall clock) is never compared.
HOST_FACTS = frozenset({"cpu_freq"})
IGNORE_HOST = "<host>"  # the marker diff() adds to ``ignore`` for ignore_host=True


def _normalized(ev: dict, ignore: frozenset[str]) -> dict:
    d = {k: v for k, v in ev.items() if k not in ignore}
    kind = ev.get("k")
    if kind == "hostio" and (ev.get("op") == "boot_time" or (IGNORE_HOST in ignore and ev.get("op") in HOST_FACTS)):
        d.pop("ret", None)
    elif kind == "stop":
        d.pop("report", None)
    return d


def _exit_event(ex: pd.DataFrame, i: int) -> dict:
    r = ex.iloc[i]
    return {"k": "exit", "seq": int(r["seq"]), "cpu": int(r["vcpu"]), "t": int(r["t_ns"]),
            "reason": f"{int(r['reason_code'])} ({reason_name(int(r['reason_code']))})", "rip": int(r["rip"]),
            "port": int(r["port"]), "dir": int(r["dir"]), "size": int(r["size"]), "value": int(r["value"])}


class _Stream:
    """One vCPU's events of one trace: exit row indices and rich events, merged in seq order."""

    def __init__(self, tr: Trace, vcpu: int, exit_rows: np.ndarray, rich: list[dict]) -> None:
        self.tr = tr
        self.vcpu = vcpu
        self.exit_rows = exit_rows  # indices into tr.exits, seq order
        self.exit_seq = tr.exits["seq"].to_numpy()[exit_rows]
        self.rich = rich
        self.rich_seq = np.fromiter((ev["seq"] for ev in rich), dtype=np.int64, count=len(rich))
        n_e, n_r = len(exit_rows), len(rich)
        self.exit_pos = np.arange(n_e) + np.searchsorted(self.rich_seq, self.exit_seq)
        self.rich_pos = np.arange(n_r) + np.searchsorted(self.exit_seq, self.rich_seq)
        self.kinds = np.zeros(n_e + n_r, dtype=np.int8)
        self.kinds[self.rich_pos] = np.fromiter((_KIND_CODE[ev["k"]] for ev in rich), dtype=np.int8, count=n_r)

    def __len__(self) -> int:
        return len(self.kinds)

    def event_at(self, pos: int) -> dict | None:
        if pos >= len(self.kinds):
            return None
        if self.kinds[pos] == 0:
            i = int(np.searchsorted(self.exit_pos, pos))
            return _exit_event(self.tr.exits, int(self.exit_rows[i]))
        j = int(np.searchsorted(self.rich_pos, pos))
        return self.rich[j]

    def seq_at(self, pos: int) -> int | None:
        ev = self.event_at(pos)
        return None if ev is None else int(ev["seq"])


def _streams(tr: Trace) -> dict[int, _Stream]:
    ex = tr.exits
    vc = ex["vcpu"].to_numpy()
    rich_by: dict[int, list[dict]] = {}
    for ev in tr.events(COMPARED_KINDS):
        rich_by.setdefault(ev["cpu"], []).append(ev)
    out = {}
    for v in sorted(set(np.unique(vc).tolist()) | set(rich_by)):
        out[v] = _Stream(tr, v, np.flatnonzero(vc == v), rich_by.get(v, []))
    return out


def _first_difference(sa: _Stream | None, sb: _Stream | None, ignore: frozenset[str]) -> int | None:
    """Position of the first difference between two vCPU streams, or None when they are equal."""
    la = len(sa) if sa is not None else 0
    lb = len(sb) if sb is not None else 0
    m = min(la, lb)
    p = m
    if m:
        neq = np.flatnonzero(sa.kinds[:m] != sb.kinds[:m])
        if len(neq):
            p = int(neq[0])
        # exits before p correspond one to one
        ne = int(np.searchsorted(sa.exit_pos, p))
        if ne:
            ea = sa.tr.exits.iloc[sa.exit_rows[:ne]]
            eb = sb.tr.exits.iloc[sb.exit_rows[:ne]]
            bad = np.zeros(ne, dtype=bool)
            for col in EXIT_COMPARED:
                if _EXIT_FIELD.get(col, col) not in ignore:
                    bad |= ea[col].to_numpy() != eb[col].to_numpy()
            idx = np.flatnonzero(bad)
            if len(idx):
                p = min(p, int(sa.exit_pos[idx[0]]))
        nr = int(np.searchsorted(sa.rich_pos, p))
        for j in range(nr):
            if _normalized(sa.rich[j], ignore) != _normalized(sb.rich[j], ignore):
                p = min(p, int(sa.rich_pos[j]))
                break
    if p == m and la == lb:
        return None
    return p


def _fmt(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        b = bytes(v)
        text = repr(b[:48]) + (f"... ({len(b)} bytes)" if len(b) > 48 else "")
        return text
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 0x10000:
        return f"{v} ({v:#x})"
    return repr(v) if isinstance(v, str) else str(v)


def _header_value(h: dict, key: str) -> Any:
    v: Any = h
    for part in key.split("."):
        v = v.get(part) if isinstance(v, dict) else None
    return v


class TraceDiff:
    """The result of :func:`diff`.

    * ``identical`` — no event and no defining header field differs;
    * ``first`` — the first difference: ``{"vcpu", "index" (position in that vCPU's stream), "seq_a", "seq_b",
      "kind_a", "kind_b"}`` (None when identical); ``fields`` — field by field at that point (DataFrame: field,
      a, b, differs, compared);
    * ``hypercalls`` — per call: count_a, count_b, count_diff, bytes_in_a/b, bytes_out_a/b and their diffs;
    * ``exits`` — per exit reason: count_a, count_b, count_diff;
    * ``header`` — differing header fields (field, a, b); ``console_equal``."""

    def __init__(self, a: Trace, b: Trace, ignore: frozenset[str]) -> None:
        self.a, self.b = a, b
        self.name_a, self.name_b = os.path.basename(a.path), os.path.basename(b.path)
        if self.name_a == self.name_b:
            self.name_a, self.name_b = a.path, b.path
        streams_a, streams_b = _streams(a), _streams(b)
        best = None
        for v in sorted(set(streams_a) | set(streams_b)):
            sa, sb = streams_a.get(v), streams_b.get(v)
            p = _first_difference(sa, sb, ignore)
            if p is None:
                continue
            seq_a = sa.seq_at(p) if sa is not None else None
            seq_b = sb.seq_at(p) if sb is not None else None
            key = seq_a if seq_a is not None else (seq_b if seq_b is not None else 0)
            if best is None or key < best[0]:
                best = (key, v, p, sa, sb, seq_a, seq_b)
        self.first: dict | None = None
        self.fields = pd.DataFrame({"field": pd.Series(dtype="string"), "a": pd.Series(dtype=object),
                                    "b": pd.Series(dtype=object), "differs": pd.Series(dtype=bool),
                                    "compared": pd.Series(dtype=bool)})
        if best is not None:
            _, v, p, sa, sb, seq_a, seq_b = best
            ev_a = sa.event_at(p) if sa is not None else None
            ev_b = sb.event_at(p) if sb is not None else None
            self.first = {"vcpu": v, "index": p, "seq_a": seq_a, "seq_b": seq_b,
                          "kind_a": None if ev_a is None else ev_a.get("k"),
                          "kind_b": None if ev_b is None else ev_b.get("k")}
            keys = list(dict.fromkeys([*(ev_a or {}), *(ev_b or {})]))
            na, nb = (_normalized(ev_a, ignore) if ev_a else {}), (_normalized(ev_b, ignore) if ev_b else {})
            rows = []
            for k in keys:
                compared = (k in na or k in nb)
                va = ev_a.get(k) if ev_a else None
                vb = ev_b.get(k) if ev_b else None
                rows.append({"field": k, "a": va, "b": vb, "differs": compared and na.get(k) != nb.get(k),
                             "compared": compared})
            self.fields = pd.DataFrame(rows, columns=["field", "a", "b", "differs", "compared"])
            self.fields["field"] = self.fields["field"].astype("string")
        self.hypercalls = _per_call(a, b)
        self.exits = _per_reason(a, b)
        hdr = []
        for key in HEADER_COMPARED:
            va, vb = _header_value(a.meta, key), _header_value(b.meta, key)
            if va != vb:
                hdr.append({"field": key, "a": va, "b": vb})
        self.header = pd.DataFrame(hdr, columns=["field", "a", "b"])
        self.console_equal = a.console_text == b.console_text
        self.identical = self.first is None and self.header.empty

    # -- output ------------------------------------------------------------------------------------
    def format(self) -> str:
        A, B = self.name_a, self.name_b
        lines = []
        if self.identical:
            n = len(self.a.exits) + sum(1 for _ in self.a.events(COMPARED_KINDS))
            return f"{A} and {B}: no difference ({n} events compared; timing ignored)\n"
        f = self.first
        if f is not None:
            where = f"vCPU {f['vcpu']} event #{f['index']}"
            sa = "end of trace" if f["seq_a"] is None else f"seq {f['seq_a']} ({f['kind_a']})"
            sb = "end of trace" if f["seq_b"] is None else f"seq {f['seq_b']} ({f['kind_b']})"
            lines.append(f"first difference at {where}: {A} {sa}, {B} {sb}")
            if len(self.fields):
                w = max(8, *(len(str(x)) for x in self.fields["field"]))
                va = [_fmt(x) if x is not None else "-" for x in self.fields["a"]]
                wa = min(max(len(A), *(len(x) for x in va)), 60)
                lines.append(f"    {'field':<{w}}  {A:<{wa}}  {B}")
                for (r, a_text) in zip(self.fields.itertuples(index=False), va):
                    mark = "*" if r.differs else " "
                    b_text = _fmt(r.b) if r.b is not None else "-"
                    note = "" if r.compared else "   (not compared)"
                    lines.append(f"  {mark} {r.field:<{w}}  {a_text:<{wa}}  {b_text}{note}")
        if not self.header.empty:
            lines.append("header:")
            for r in self.header.itertuples(index=False):
                lines.append(f"  {r.field}: {_fmt(r.a)}  vs  {_fmt(r.b)}")
        hc = self.hypercalls
        changed = hc[(hc["count_diff"] != 0) | (hc["bytes_in_diff"] != 0) | (hc["bytes_out_diff"] != 0)]
        lines.append(f"hypercalls ({A} -> {B}):" + ("" if len(changed) else " same counts and bytes"))
        if len(changed):
            lines.append(f"  {'call':<10} {'count':>15} {'bytes in':>21} {'bytes out':>21}")
            for r in changed.itertuples(index=False):
                lines.append(f"  {r.call:<10} {r.count_a:>6} -> {r.count_b:<6} {r.bytes_in_a:>8} -> {r.bytes_in_b:<8}"
                             f" {r.bytes_out_a:>8} -> {r.bytes_out_b:<8}")
        ex = self.exits
        changed = ex[ex["count_diff"] != 0]
        lines.append(f"exits ({A} -> {B}):" + ("" if len(changed) else " same counts per reason"))
        for r in changed.itertuples(index=False):
            lines.append(f"  {r.reason:<10} {r.count_a:>8} -> {r.count_b:<8} ({r.count_diff:+d})")
        lines.append("console output: " + ("same" if self.console_equal else "differs"))
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        from .export import _jsonable

        return {
            "a": self.a.path, "b": self.b.path, "identical": self.identical, "first": self.first,
            "fields": [{"field": r.field, "a": _jsonable(r.a), "b": _jsonable(r.b), "differs": bool(r.differs),
                        "compared": bool(r.compared)} for r in self.fields.itertuples(index=False)],
            "header": [{"field": r.field, "a": _jsonable(r.a), "b": _jsonable(r.b)}
                       for r in self.header.itertuples(index=False)],
            "hypercalls": [{k: _jsonable(v) for k, v in rec.items()} for rec in self.hypercalls.to_dict("records")],
            "exits": [{k: _jsonable(v) for k, v in rec.items()} for rec in self.exits.to_dict("records")],
            "console_equal": self.console_equal,
        }

    def __bool__(self) -> bool:
        """True when the traces differ (like diff's exit status)."""
        return not self.identical

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"<analysis.TraceDiff {self.name_a} vs {self.name_b}: " \
               f"{'identical' if self.identical else 'different'}>"


def _per_call(a: Trace, b: Trace) -> pd.DataFrame:
    def agg(tr: Trace) -> pd.DataFrame:
        hc = tr.hypercalls
        g = hc.groupby(hc["call"].astype(str), observed=True)
        return pd.DataFrame({"count": g.size(), "bytes_in": g["bytes_in"].sum(), "bytes_out": g["bytes_out"].sum()})

    ga, gb = agg(a), agg(b)
    out = ga.add_suffix("_a").join(gb.add_suffix("_b"), how="outer").fillna(0).astype("int64")
    for c in ("count", "bytes_in", "bytes_out"):
        out[f"{c}_diff"] = out[f"{c}_b"] - out[f"{c}_a"]
    out = out.rename_axis("call").reset_index()
    cols = ["call", "count_a", "count_b", "count_diff", "bytes_in_a", "bytes_in_b", "bytes_in_diff", "bytes_out_a",
            "bytes_out_b", "bytes_out_diff"]
    return out[cols] if len(out) else pd.DataFrame({c: pd.Series(dtype="int64") for c in cols})


def _per_reason(a: Trace, b: Trace) -> pd.DataFrame:
    ca = a.exits["reason"].astype(str).value_counts()
    cb = b.exits["reason"].astype(str).value_counts()
    out = pd.DataFrame({"count_a": ca, "count_b": cb}).fillna(0).astype("int64")
    out["count_diff"] = out["count_b"] - out["count_a"]
    out = out.rename_axis("reason").reset_index()
    return out[["reason", "count_a", "count_b", "count_diff"]]


def diff(a: Trace | str | os.PathLike, b: Trace | str | os.PathLike, ignore: tuple[str, ...] = (),
         ignore_host: bool = False) -> TraceDiff:
    """Compare two traces (paths or loaded traces); ``ignore`` names more event fields not to compare (exit
    fields too: reason, rip, port, dir, size, value).  ``ignore_host`` also skips the answers that are facts
    of the recording host (:data:`HOST_FACTS`: the TSC frequency), to compare runs from different machines."""
    if ignore_host:
        ignore = (*ignore, IGNORE_HOST)
    ta, tb = as_trace(a), as_trace(b)
    for tr in (ta, tb):
        if not tr.has_events:
            raise ValueError(f"{tr.path}: a trace read back from an export has no events to align; "
                             "diff the .tvt files")
    return TraceDiff(ta, tb, IGNORED_FIELDS | frozenset(ignore))
