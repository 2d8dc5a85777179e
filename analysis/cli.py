"""The ``tracevisor stats``, ``export --format perfetto|parquet|csv`` and ``diff`` commands.

``tracevisor.cli`` parses the options and calls these lazily, so the rest of the CLI never imports pandas.
Problems are raised as TracevisorError (one line, status 1); ``diff`` returns 2 for them, as diff(1) does.
"""

from __future__ import annotations

import os
import sys

from tracevisor.errors import TracevisorError


def _warn(tr) -> None:
    for w in tr.warnings:
        print(f"tracevisor: warning: {w}", file=sys.stderr)


def _load(path: str):
    from .frames import load

    if not os.path.exists(path):
        raise TracevisorError(f"cannot open trace {path}: No such file or directory")
    return load(path)


def stats_main(ns) -> int:
    from .stats import Stats

    tr = _load(ns.trace)
    _warn(tr)
    st = Stats(tr, by=ns.by)
    sys.stdout.write(st.to_json() + "\n" if ns.json else st.format())
    return 0


def _default_output(trace: str, fmt: str) -> str:
    stem = os.path.splitext(trace)[0]
    return {"perfetto": stem + ".perfetto.json", "parquet": stem + "-parquet", "csv": stem + "-csv"}[fmt]


def export_main(ns) -> int:
    from . import export

    tr = _load(ns.trace)
    _warn(tr)
    out = ns.output or _default_output(ns.trace, ns.format)
    try:
        if ns.format == "perfetto":
            mode = export.exit_mode(getattr(ns, "exits", None) or "auto", len(tr.exits))
            export.to_perfetto(tr, out, exits=mode)
            exits = {"instant": f"{len(tr.exits)} exits as instant events",
                     "counter": f"{len(tr.exits)} exits as per-vCPU exit-rate counters",
                     "none": "no exits"}[mode]
            what = f"{len(tr.hypercalls)} hypercalls as slices and {exits} in Chrome trace-event JSON " \
                   "(open in ui.perfetto.dev)"
        elif ns.format == "parquet":
            export.to_parquet(tr, out)
            what = "one Parquet file per frame and meta.json"
        elif ns.format == "csv":
            export.to_csv(tr, out)
            what = "one CSV file per frame and meta.json"
        else:  # pragma: no cover - argparse restricts the choices
            raise TracevisorError(f"unknown export format {ns.format!r}")
    except OSError as e:
        raise TracevisorError(f"cannot write {out}: {e.strerror or e}") from None
    print(f"tracevisor: wrote {what} to {out}", file=sys.stderr)
    return 0


def diff_main(ns) -> int:
    """0: no difference, 1: different, 2: trouble (a file is not a readable trace)."""
    from .diff import diff

    try:
        a, b = _load(ns.a), _load(ns.b)
    except TracevisorError as e:
        print(f"tracevisor: error: {e}", file=sys.stderr)
        return 2
    _warn(a)
    _warn(b)
    d = diff(a, b, ignore=tuple(ns.ignore or ()), ignore_host=getattr(ns, "ignore_host", False))
    if ns.json:
        import json

        sys.stdout.write(json.dumps(d.to_dict(), indent=2) + "\n")
    elif not ns.quiet:
        sys.stdout.write(d.format())
    return 0 if d.identical else 1
