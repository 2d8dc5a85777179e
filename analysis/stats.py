"""``analysis.stats(trace)``: per exit reason and per hypercall counts and times (``tracevisor stats``).

Exit time is the exit's ``duration_ns`` (until the next exit on the same vCPU); hypercall time is the host
latency ``t_end - t``.  Percentages are of the whole trace, or of the vCPU with ``by="vcpu"``.  p99 is the
99th percentile with linear interpolation (``numpy.percentile``'s default).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pandas as pd

from tracevisor.trace.schema import HYPERCALL_PORTS, UART_PORT

from .frames import Trace, as_trace

_TIME_COLUMNS = ("total_ns", "min_ns", "max_ns", "mean_ns", "p99_ns")


def _summarize(df: pd.DataFrame, key: str, time_col: str, by_vcpu: bool, extra: dict[str, str] | None = None
               ) -> pd.DataFrame:
    """One row per (vcpu,) key: count, pct, time_pct and the time columns, plus sums of ``extra`` columns."""
    keys = (["vcpu"] if by_vcpu else []) + [key]
    cols = ["count", "pct", "time_pct", *_TIME_COLUMNS, *(extra or {})]
    if df.empty:
        out = pd.DataFrame({c: pd.Series(dtype="float64" if c in ("pct", "time_pct", "mean_ns", "p99_ns")
                                         else "int64") for c in keys + cols})
        out[key] = out[key].astype("string")
        return out[keys + cols]
    g = df.groupby(keys, observed=True, sort=True)[time_col]
    out = pd.DataFrame({
        "count": g.size(),
        "total_ns": g.sum(),
        "min_ns": g.min(),
        "max_ns": g.max(),
        "mean_ns": g.mean(),
        "p99_ns": g.quantile(0.99),
    })
    for name, src in (extra or {}).items():
        out[name] = df.groupby(keys, observed=True, sort=True)[src].sum()
    out = out.reset_index()
    if by_vcpu:
        tot_n = out.groupby("vcpu")["count"].transform("sum")
        tot_t = out.groupby("vcpu")["total_ns"].transform("sum")
    else:
        tot_n = out["count"].sum()
        tot_t = out["total_ns"].sum()
    out["pct"] = 100.0 * out["count"] / tot_n
    out["time_pct"] = np.where(tot_t > 0, 100.0 * out["total_ns"] / np.where(tot_t > 0, tot_t, 1), 0.0)
    out[key] = out[key].astype(str).astype("string")
    for c in ("count", "total_ns", "min_ns", "max_ns", *(extra or {})):
        out[c] = out[c].astype("int64")
    out = out.sort_values((["vcpu"] if by_vcpu else []) + ["count", key], ascending=[True] * by_vcpu + [False, True],
                          kind="stable").reset_index(drop=True)
    return out[keys + cols]


class Stats:
    """Per exit reason (``exits``) and per hypercall (``hypercalls``) tables, plus ``totals``.

    ``exits`` columns: [vcpu,] reason, count, pct, time_pct, total_ns, min_ns, max_ns, mean_ns, p99_ns.
    ``hypercalls``: [vcpu,] call, the same, bytes_in, bytes_out, bytes (in + out), bytes_per_call.
    ``ports``: [vcpu,] ioport (e.g. ``"0x800 out (uart)"``) for the port I/O exits, with the exit columns.
    ``fallback``: [vcpu,] kind, count, pct, instructions, mean_instructions, stops (docs/fallback.md)."""

    def __init__(self, trace: Trace, by: str | None = None) -> None:
        if by not in (None, "vcpu"):
            raise ValueError(f"stats by {by!r}: only by='vcpu' is supported")
        self.by = by
        self.path = trace.path
        by_vcpu = by == "vcpu"
        ex = trace.exits
        self.exits = _summarize(ex, "reason", "duration_ns", by_vcpu)
        io = ex[ex["reason_code"] == 2]
        io = pd.DataFrame({"vcpu": io["vcpu"], "ioport": _ioport_names(io), "duration_ns": io["duration_ns"]})
        self.ports = _summarize(io, "ioport", "duration_ns", by_vcpu)
        hc = trace.hypercalls
        self.hypercalls = _summarize(hc, "call", "latency_ns", by_vcpu, {"bytes_in": "bytes_in", "bytes_out": "bytes_out"})
        self.hypercalls["bytes"] = self.hypercalls["bytes_in"] + self.hypercalls["bytes_out"]
        self.hypercalls["bytes_per_call"] = (self.hypercalls["bytes"] / self.hypercalls["count"].where(
            self.hypercalls["count"] > 0)).astype("float64")
        self.fallback = _fallback_table(trace.fallback, by_vcpu)
        span = 0
        if len(ex):
            span = int(ex["t_ns"].max() - ex["t_ns"].min())
        self.totals = {
            "exits": int(len(ex)),
            "exit_time_ns": int(ex["duration_ns"].sum()) if len(ex) else 0,
            "hypercalls": int(len(hc)),
            "hypercall_time_ns": int(hc["latency_ns"].sum()) if len(hc) else 0,
            "bytes_in": int(hc["bytes_in"].sum()) if len(hc) else 0,
            "bytes_out": int(hc["bytes_out"].sum()) if len(hc) else 0,
            "vcpus": sorted(int(v) for v in pd.unique(ex["vcpu"])) if len(ex) else [],
            "exit_span_ns": span,
            "fallback": int(self.fallback["count"].sum()),
        }

    # -- output ------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def rows(df: pd.DataFrame) -> list[dict]:
            out = []
            for rec in df.to_dict(orient="records"):
                out.append({k: _plain(v) for k, v in rec.items()})
            return out

        return {"trace": self.path, "by": self.by, "totals": self.totals, "exits": rows(self.exits),
                "ports": rows(self.ports), "hypercalls": rows(self.hypercalls), "fallback": rows(self.fallback)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def format(self) -> str:
        """A text report in the manner of ``perf kvm stat report``."""
        lines: list[str] = []
        name = os.path.basename(self.path)
        groups = [(None, self.exits, self.ports, self.hypercalls, self.fallback)]
        if self.by == "vcpu":
            vcpus = sorted(set(self.exits["vcpu"].tolist()) | set(self.hypercalls["vcpu"].tolist()))
            groups = [(v, self.exits[self.exits["vcpu"] == v], self.ports[self.ports["vcpu"] == v],
                       self.hypercalls[self.hypercalls["vcpu"] == v], self.fallback[self.fallback["vcpu"] == v])
                      for v in vcpus]
        for v, ex, io, hc, fb in groups:
            who = "all vCPUs" if v is None else f"vCPU {v}"
            lines.append(f"Analyze events for {name}, {who}:")
            lines.append("")
            lines += _table(ex, "VM-EXIT", "reason")
            n, t = int(ex["count"].sum()), int(ex["total_ns"].sum())
            lines.append(f"Total Samples:{n}, Total exit time:{fmt_ns(t)}.")
            lines.append("")
            if len(io):
                lines += _table(io, "IO-PORT", "ioport")
            lines += _table(hc, "HYPERCALL", "call", with_bytes=True)
            n, t = int(hc["count"].sum()), int(hc["total_ns"].sum())
            b_in, b_out = int(hc["bytes_in"].sum()), int(hc["bytes_out"].sum())
            lines.append(f"Total Hypercalls:{n}, Total host time:{fmt_ns(t)}, bytes in {b_in}, out {b_out}.")
            lines.append("")
            if len(fb):
                lines += _fallback_lines(fb)
        return "\n".join(lines).rstrip("\n") + "\n"

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"<analysis.Stats {os.path.basename(self.path)}: {self.totals['exits']} exits, " \
               f"{self.totals['hypercalls']} hypercalls>"


_FALLBACK_COLUMNS = ("count", "pct", "instructions", "mean_instructions", "stops")


def _fallback_table(fb: pd.DataFrame, by_vcpu: bool) -> pd.DataFrame:
    """One row per fallback kind (burst, nm, exception, xgetbv, xsave, xrstor): count, pct, and for bursts the
    instructions executed (total, mean per burst) and the stop reasons ("exit 12, budget 1")."""
    keys = (["vcpu"] if by_vcpu else []) + ["kind"]
    rows = []
    groups = fb.groupby(keys, observed=True, sort=True) if len(fb) else []
    for key, df in groups:
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(keys, key, strict=True))
        row["count"] = len(df)
        bursts = row["kind"] == "burst"
        n = df["count"].dropna()
        row["instructions"] = int(n.sum()) if bursts else None
        row["mean_instructions"] = float(n.mean()) if bursts and len(n) else float("nan")
        stops = df["stop"].dropna().astype(str).value_counts(sort=False) if bursts else pd.Series(dtype="int64")
        order = sorted(stops.items(), key=lambda kv: (-kv[1], kv[0]))
        row["stops"] = ", ".join(f"{k} {v}" for k, v in order) if bursts else None
        rows.append(row)
    out = pd.DataFrame(rows, columns=keys + list(_FALLBACK_COLUMNS))
    tot = out.groupby("vcpu")["count"].transform("sum") if by_vcpu else out["count"].sum()
    out["pct"] = (100.0 * out["count"] / tot).astype("float64") if len(out) else pd.Series(dtype="float64")
    out["count"] = out["count"].astype("int64")
    out["instructions"] = out["instructions"].astype("Int64")
    out["mean_instructions"] = out["mean_instructions"].astype("float64")
    out["kind"] = out["kind"].astype(str).astype("string")
    out["stops"] = out["stops"].astype("string")
    if by_vcpu:
        out["vcpu"] = out["vcpu"].astype("int64")
    out = out.sort_values(keys[:-1] + ["count", "kind"], ascending=[True] * by_vcpu + [False, True],
                          kind="stable").reset_index(drop=True)
    return out[keys + list(_FALLBACK_COLUMNS)]


def _fallback_lines(fb: pd.DataFrame) -> list[str]:
    """The FALLBACK table of the text report."""
    head = ["FALLBACK", "Samples", "Samples%", "Instructions", "Insns/burst", "Stops"]
    rows = []
    for r in fb.itertuples(index=False):
        bursts = r.kind == "burst"
        rows.append([str(r.kind), str(r.count), f"{r.pct:.2f}%", str(r.instructions) if bursts else "-",
                     f"{r.mean_instructions:.1f}" if bursts and r.mean_instructions == r.mean_instructions else "-",
                     str(r.stops) if bursts and r.stops is not pd.NA else "-"])
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head))]
    widths[0] = max(widths[0], 16)
    out = ["  ".join(h.rjust(w) if i < 5 else h for i, (h, w) in enumerate(zip(head, widths))), ""]
    out += ["  ".join(c.rjust(w) if i < 5 else c for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    out.append("")
    n, insns = int(fb["count"].sum()), int(fb["instructions"].fillna(0).sum())
    out.append(f"Total Fallbacks:{n}, instructions in bursts {insns}.")
    out.append("")
    return out


def _ioport_names(io: pd.DataFrame) -> pd.Series:
    """``0x400 out (write)``-style names of port I/O exits (the hypercall name when the port is one)."""
    names = {port: call for call, port in HYPERCALL_PORTS.items()} | {UART_PORT: "uart"}
    key = io["port"].astype(np.int64) * 2 + io["dir"].astype(np.int64)
    labels = {}
    for k in pd.unique(key):
        port, d = divmod(int(k), 2)
        label = f"{port:#x} {'out' if d else 'in'}"
        if port in names and d:
            label += f" ({names[port]})"
        labels[k] = label
    return pd.Categorical.from_codes(np.searchsorted(np.array(sorted(labels)), key.to_numpy()),
                                     categories=[labels[k] for k in sorted(labels)]) if labels else \
        pd.Categorical([])


def _plain(v: Any) -> Any:
    if v is pd.NA or v is None:
        return None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return None if f != f else round(f, 3)
    return v


def fmt_ns(ns: float) -> str:
    """A duration with a readable unit: 812ns, 12.4us, 3.21ms, 1.50s."""
    if ns != ns:
        return "-"
    a = abs(ns)
    if a < 1_000:
        return f"{ns:.0f}ns"
    if a < 1_000_000:
        return f"{ns / 1e3:.2f}us"
    if a < 1_000_000_000:
        return f"{ns / 1e6:.2f}ms"
    return f"{ns / 1e9:.2f}s"


def _table(df: pd.DataFrame, title: str, key: str, with_bytes: bool = False) -> list[str]:
    head = [title, "Samples", "Samples%", "Time%", "Total", "Min", "Max", "Avg", "p99"]
    if with_bytes:
        head += ["Bytes in", "Bytes out", "Bytes/call"]
    rows = []
    for r in df.itertuples(index=False):
        row = [str(getattr(r, key)), str(r.count), f"{r.pct:.2f}%", f"{r.time_pct:.2f}%", fmt_ns(r.total_ns),
               fmt_ns(r.min_ns), fmt_ns(r.max_ns), fmt_ns(r.mean_ns), fmt_ns(r.p99_ns)]
        if with_bytes:
            row += [str(r.bytes_in), str(r.bytes_out), "-" if r.bytes_per_call != r.bytes_per_call
                    else f"{r.bytes_per_call:.1f}"]
        rows.append(row)
    if not rows:
        return [f"{title:>16}  (none)"]
    widths = [max(len(head[i]), *(len(row[i]) for row in rows)) for i in range(len(head))]
    widths[0] = max(widths[0], 16)
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths)), ""]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    out.append("")
    return out


def stats(trace: Trace | str | os.PathLike, by: str | None = None) -> Stats:
    """Statistics of a trace (a path or a loaded :class:`analysis.Trace`); ``by="vcpu"`` splits per vCPU."""
    return Stats(as_trace(trace), by=by)
