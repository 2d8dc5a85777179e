"""Many traces at once.

* :func:`load_many` — one frame (``exits`` by default) of every matching trace, concatenated in memory with a
  leading ``trace`` column (the file name without ``.tvt``);
* :func:`to_duckdb` — a DuckDB connection with one view per frame over Parquet exports of every trace
  (``[scale]`` extra): SQL over more traces than fit in memory; each trace is converted once and cached;
* :func:`to_dask` — a dask DataFrame of one frame over the same Parquet exports (``[scale]`` extra).
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
import shutil
from collections.abc import Iterable

import pandas as pd

from .columns import FRAME_NAMES, conform
from .frames import load


def _paths(pattern: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    if isinstance(pattern, (str, os.PathLike)):
        p = os.fspath(pattern)
        if os.path.isdir(p):
            p = os.path.join(p, "*.tvt")
        paths = sorted(_glob.glob(os.path.expanduser(p), recursive=True))
    else:
        paths = [os.fspath(x) for x in pattern]
    if not paths:
        raise FileNotFoundError(f"no trace matches {os.fspath(pattern) if isinstance(pattern, (str, os.PathLike)) else pattern!r}")
    return paths


def _names(paths: list[str]) -> list[str]:
    """Short unique names: the file name without .tvt, or the path relative to the common folder."""
    names = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    if len(set(names)) == len(names):
        return names
    common = os.path.commonpath([os.path.abspath(p) for p in paths]) if len(paths) > 1 else ""
    return [os.path.splitext(os.path.relpath(os.path.abspath(p), common))[0] for p in paths]


def load_many(pattern: str | os.PathLike | Iterable[str | os.PathLike], frame: str = "exits") -> pd.DataFrame:
    """``frame`` (exits, hypercalls, files, console, virtio, packets, or ``meta`` — one row per trace) of every
    trace matching ``pattern`` (a glob, a directory of ``.tvt`` files, or a list of paths), concatenated, with a
    categorical ``trace`` column first.  Column dtypes are the documented ones."""
    if frame not in FRAME_NAMES and frame != "meta":
        raise ValueError(f"frame {frame!r}: choose one of {', '.join(FRAME_NAMES)} or meta")
    paths = _paths(pattern)
    names = _names(paths)
    parts = []
    metas = []
    for name, path in zip(names, paths):
        tr = load(path)
        if frame == "meta":
            metas.append(_meta_row(name, path, tr))
            continue
        part = getattr(tr, frame).copy(deep=False)
        part.insert(0, "trace", name)
        parts.append(part)
    if frame == "meta":
        out = pd.DataFrame(metas)
        out["trace"] = pd.Categorical(out["trace"], categories=names)
        return out
    combined = pd.concat(parts, ignore_index=True)
    trace_col = pd.Categorical(combined["trace"], categories=names)
    combined = conform(combined.drop(columns=["trace"]), frame)
    combined.insert(0, "trace", trace_col)
    return combined


def _meta_row(name: str, path: str, tr) -> dict:
    h = tr.meta
    kernel = h.get("kernel") if isinstance(h.get("kernel"), dict) else {}
    stop = tr.stop or {}
    return {"trace": name, "path": path, "kernel": kernel.get("path"), "sha256": kernel.get("sha256"),
            "argv": h.get("argv"), "cpus": h.get("cpus"), "memory": h.get("memory"), "created": h.get("created"),
            "exits": len(tr.exits), "hypercalls": len(tr.hypercalls), "exit_code": stop.get("code"),
            "stop_reason": stop.get("reason"), "complete": tr.complete}


# --------------------------------------------------------------------------------------------------
# Parquet-backed scale-out
# --------------------------------------------------------------------------------------------------

def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tracevisor", "parquet")


def parquet_exports(pattern, cache_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(trace name, export directory) for every matching trace, exporting those not yet in the cache.

    A trace's export lives in ``cache_dir/<name>-<hash of its absolute path>-<hash of size and mtime>/`` and
    carries a ``trace`` column.  A changed trace is exported again and its older exports are deleted, so the
    cache holds one export per trace path.  Only one trace is in memory at a time.  A directory already
    holding ``exits.parquet`` in the match is used as it is."""
    from .export import to_parquet

    cache = os.fspath(cache_dir) if cache_dir is not None else default_cache_dir()
    if isinstance(pattern, (str, os.PathLike)) and not os.path.isdir(os.fspath(pattern)):
        matches = sorted(_glob.glob(os.path.expanduser(os.fspath(pattern)), recursive=True))
    else:
        matches = _paths(pattern)
    if not matches:
        raise FileNotFoundError(f"no trace matches {pattern!r}")
    names = _names(matches)
    out = []
    for name, path in zip(names, matches):
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "exits.parquet")):
            out.append((name, path))
            continue
        st = os.stat(path)
        where = hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:12]
        version = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:8]
        prefix = f"{os.path.basename(name)}-{where}-"
        target = os.path.join(cache, prefix + version)
        if not os.path.exists(os.path.join(target, "meta.json")):  # meta.json is written last
            tmp = target + f".tmp{os.getpid()}"
            to_parquet(path, tmp, trace_name=name)
            try:
                os.replace(tmp, target)
            except OSError:  # another process finished the same export first
                shutil.rmtree(tmp, ignore_errors=True)
            for old in _glob.glob(os.path.join(_glob.escape(cache), _glob.escape(prefix) + "*")):
                if old != target and ".tmp" not in os.path.basename(old):
                    shutil.rmtree(old, ignore_errors=True)  # an export of an older version of this trace
        out.append((name, target))
    return out


def to_duckdb(pattern, cache_dir: str | os.PathLike | None = None, connection=None):
    """A DuckDB connection with views ``exits``, ``hypercalls``, ``files``, ``console``, ``virtio``,
    ``packets`` (each with a ``trace`` column) over the Parquet exports of every matching trace::

        con = analysis.to_duckdb("runs/*.tvt")
        con.execute("SELECT trace, reason, count(*) FROM exits GROUP BY ALL").df()

    DuckDB streams the Parquet files, so the traces together may be far larger than memory."""
    try:
        import duckdb
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_duckdb needs duckdb: pip install 'tracevisor[scale]'") from e
    exports = parquet_exports(pattern, cache_dir)
    con = connection if connection is not None else duckdb.connect()
    for frame in FRAME_NAMES:
        files = [os.path.join(d, f"{frame}.parquet") for _, d in exports]
        listing = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
        con.execute(f"CREATE OR REPLACE VIEW {frame} AS SELECT * FROM read_parquet([{listing}], union_by_name=true)")
    return con


def to_dask(pattern, frame: str = "exits", cache_dir: str | os.PathLike | None = None):
    """A dask DataFrame of ``frame`` (with a ``trace`` column) over the Parquet exports of every matching
    trace; one partition per trace at least."""
    try:
        import dask.dataframe as dd
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("to_dask needs dask: pip install 'tracevisor[scale]'") from e
    if frame not in FRAME_NAMES:
        raise ValueError(f"frame {frame!r}: choose one of {', '.join(FRAME_NAMES)}")
    exports = parquet_exports(pattern, cache_dir)
    return dd.read_parquet([os.path.join(d, f"{frame}.parquet") for _, d in exports], engine="pyarrow")
