"""Analysis of tracevisor traces with pandas: frames, statistics, plots, exports, diffs, many traces.

    from tracevisor import analysis
    tr = analysis.load("run.tvt")          # tr.exits, tr.hypercalls, tr.files, tr.console, tr.virtio, tr.packets, tr.meta
    print(analysis.stats(tr))              # like `tracevisor stats run.tvt`
    analysis.diff("a.tvt", "b.tvt")        # first differing event, count and byte differences
    analysis.load_many("runs/*.tvt")       # one frame of many traces, with a `trace` column
    from tracevisor.analysis import plots             # matplotlib figures (Agg)

Frames, columns and dtypes: docs/analysis.md (and analysis.columns.FRAMES).  This package is the only part
of tracevisor that imports pandas, numpy, pyarrow or matplotlib (the ``[analysis]`` extra).
"""

from .columns import FRAMES
from .diff import TraceDiff, diff
from .export import read_csv, read_parquet, to_csv, to_parquet, to_perfetto
from .frames import Trace, load
from .many import load_many, to_dask, to_duckdb
from .stats import Stats, stats

__all__ = [
    "FRAMES",
    "Stats",
    "Trace",
    "TraceDiff",
    "diff",
    "load",
    "load_many",
    "read_csv",
    "read_parquet",
    "stats",
    "to_csv",
    "to_dask",
    "to_duckdb",
    "to_parquet",
    "to_perfetto",
]
