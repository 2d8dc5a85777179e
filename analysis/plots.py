"""Plots of a trace (matplotlib figures on their own Agg canvas: neither pyplot nor the backend is touched,
so they work headless and in notebooks alike).

Each function takes a loaded :class:`analysis.Trace` or a path, returns a ``matplotlib.figure.Figure`` and,
with ``save="file.png"``, also writes it as PNG::

    from tracevisor.analysis import plots
    fig = plots.exit_rate(trace, save="exit-rate.png")
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .frames import Trace, as_trace

__all__ = ["exit_rate", "hypercall_latency", "io_bytes", "vcpu_activity", "all_plots"]


def _figure(width: float = 8.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Figure, save: str | os.PathLike | None) -> Figure:
    if save is not None:
        fig.savefig(os.fspath(save), format="png", dpi=100)
    return fig


def _time_unit(span_ns: int) -> tuple[float, str]:
    if span_ns >= 5e9:
        return 1e9, "s"
    if span_ns >= 5e6:
        return 1e6, "ms"
    return 1e3, "µs"


def _bins(span_ns: int, bins: int) -> np.ndarray:
    return np.linspace(0, max(span_ns, 1), bins + 1)


def _span(trace: Trace) -> int:
    return max(trace.end_ns, 1)


def exit_rate(trace: Trace | str, bins: int = 100, by_reason: bool = True, save=None) -> Figure:
    """Exits per second over time (stacked by exit reason, or one line)."""
    tr = as_trace(trace)
    ex = tr.exits
    span = _span(tr)
    div, unit = _time_unit(span)
    edges = _bins(span, bins)
    width_s = (edges[1] - edges[0]) / 1e9
    fig = _figure()
    ax = fig.add_subplot()
    mids = (edges[:-1] + edges[1:]) / 2 / div
    if len(ex) and by_reason:
        stacks, labels = [], []
        for reason, t in ex.groupby("reason", observed=True)["t_ns"]:
            counts, _ = np.histogram(t.to_numpy(), bins=edges)
            stacks.append(counts / width_s)
            labels.append(str(reason))
        ax.stackplot(mids, *stacks, labels=labels, step="mid")
        ax.legend(loc="upper right", fontsize="small")
    else:
        counts, _ = np.histogram(ex["t_ns"].to_numpy(), bins=edges)
        ax.plot(mids, counts / width_s, drawstyle="steps-mid")
    ax.set_xlabel(f"time since start ({unit})")
    ax.set_ylabel("exits / s")
    ax.set_title(f"VM exit rate — {os.path.basename(tr.path)} ({len(ex)} exits)")
    ax.set_xlim(0, span / div)
    return _finish(fig, save)


def hypercall_latency(trace: Trace | str, bins: int = 40, save=None) -> Figure:
    """Histogram of host latency (t_end - t) per hypercall, log-spaced bins in µs."""
    tr = as_trace(trace)
    hc = tr.hypercalls
    fig = _figure()
    ax = fig.add_subplot()
    if len(hc):
        lat_us = hc["latency_ns"].to_numpy() / 1e3
        lo = max(lat_us[lat_us > 0].min() if (lat_us > 0).any() else 0.1, 0.01)
        hi = max(lat_us.max(), lo * 10)
        edges = np.geomspace(lo / 1.5, hi * 1.5, bins + 1)
        data, labels = [], []
        for call, lat in hc.groupby("call", observed=True)["latency_ns"]:
            data.append(np.clip(lat.to_numpy() / 1e3, edges[0], edges[-1]))
            labels.append(f"{call} ({len(lat)})")
        ax.hist(data, bins=edges, stacked=True, label=labels)
        ax.set_xscale("log")
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no hypercalls", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("host latency (µs)")
    ax.set_ylabel("hypercalls")
    ax.set_title(f"Hypercall latency — {os.path.basename(tr.path)}")
    return _finish(fig, save)


def io_bytes(trace: Trace | str, save=None) -> Figure:
    """Cumulative bytes over time: guest→host (writes, file names), host→guest (reads, command line),
    console output, and network frames sent/received."""
    tr = as_trace(trace)
    span = _span(tr)
    div, unit = _time_unit(span)
    fig = _figure()
    ax = fig.add_subplot()
    hc = tr.hypercalls
    series = [
        ("guest → host (hypercalls)", hc["t_end_ns"], hc["bytes_out"]),
        ("host → guest (hypercalls)", hc["t_end_ns"], hc["bytes_in"]),
        ("console", tr.console["t_ns"], tr.console["nbytes"]),
    ]
    pk = tr.packets
    for d in ("tx", "rx"):
        sel = pk[pk["direction"] == d]
        series.append((f"network {d}", sel["t_ns"], sel["length"]))
    drawn = 0
    for label, t, n in series:
        if len(t) == 0 or int(n.sum()) == 0:
            continue
        order = np.argsort(t.to_numpy(), kind="stable")
        ts = np.concatenate([[0], t.to_numpy()[order], [span]]) / div
        cum = np.cumsum(np.concatenate([[0], n.to_numpy()[order]]))
        cum = np.concatenate([cum, cum[-1:]])
        ax.step(ts, cum, where="post", label=f"{label}: {int(cum[-1])} B")
        drawn += 1
    if drawn:
        ax.legend(loc="upper left", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no I/O", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(f"time since start ({unit})")
    ax.set_ylabel("bytes (cumulative)")
    ax.set_title(f"I/O over time — {os.path.basename(tr.path)}")
    ax.set_xlim(0, span / div)
    return _finish(fig, save)


def vcpu_activity(trace: Trace | str, bins: int = 200, save=None) -> Figure:
    """Per vCPU: a heat strip of exits per time bin, with hypercalls marked on top."""
    tr = as_trace(trace)
    ex, hc = tr.exits, tr.hypercalls
    cpus = tr.meta.get("cpus")
    declared = range(cpus) if type(cpus) is int and 0 < cpus <= 256 else range(0)
    vcpus = sorted(set(pd.unique(ex["vcpu"]).tolist()) | set(pd.unique(hc["vcpu"]).tolist()) | set(declared))
    if not vcpus:
        vcpus = [0]
    span = _span(tr)
    div, unit = _time_unit(span)
    edges = _bins(span, bins)
    grid = np.zeros((len(vcpus), bins))
    for i, v in enumerate(vcpus):
        grid[i], _ = np.histogram(ex.loc[ex["vcpu"] == v, "t_ns"].to_numpy(), bins=edges)
    fig = _figure(8.0, 1.2 + 0.6 * len(vcpus))
    ax = fig.add_subplot()
    im = ax.imshow(np.log1p(grid), aspect="auto", interpolation="nearest", cmap="viridis",
                   extent=(0, span / div, len(vcpus) - 0.5, -0.5))
    life: dict[int, list[int]] = {}
    for ev in tr.events("vcpu"):
        life.setdefault(ev["cpu"], []).append(ev["t"])
    for i, v in enumerate(vcpus):
        if life.get(v):  # the vCPU's life, from its start to its stop event
            ax.plot([min(life[v]) / div, max(life[v]) / div], [i + 0.3, i + 0.3], color="tab:orange", lw=2,
                    label="running" if i == 0 else None)
        t = hc.loc[hc["vcpu"] == v, "t_ns"].to_numpy() / div
        ax.plot(t, np.full(len(t), i), "|", color="white", markersize=12, label="hypercall" if i == 0 else None)
    ax.set_xlim(0, span / div)
    ax.set_yticks(range(len(vcpus)), [f"vCPU {v}" for v in vcpus])
    ax.set_xlabel(f"time since start ({unit})")
    ax.set_title(f"vCPU activity (log exits per bin; | hypercall; orange: running) — {os.path.basename(tr.path)}",
                 fontsize="medium")
    fig.colorbar(im, ax=ax, label="log(1 + exits)")
    return _finish(fig, save)


def all_plots(trace: Trace | str, outdir: str | os.PathLike) -> list[str]:
    """Write the four plots as PNG files into ``outdir``; returns their paths."""
    tr = as_trace(trace)
    os.makedirs(outdir, exist_ok=True)
    out = []
    for name, fn in (("exit-rate", exit_rate), ("hypercall-latency", hypercall_latency), ("io-bytes", io_bytes),
                     ("vcpu-activity", vcpu_activity)):
        path = os.path.join(os.fspath(outdir), f"{name}.png")
        fn(tr, save=path)
        out.append(path)
    return out
