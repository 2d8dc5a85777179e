"""pandas, pyarrow, matplotlib (and numpy) belong to the [analysis] extra: only analysis/ imports them, and
run/record/replay/info/dump work in an interpreter where importing them fails."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEAVY = {"pandas", "pyarrow", "matplotlib", "numpy", "duckdb", "dask"}

# Runs tracevisor.cli.main(argv) with the heavy packages unimportable, then reports its status and which of
# them ended up in sys.modules.
BLOCKED = r"""
import importlib.abc, json, sys
HEAVY = set(json.loads(sys.argv[1]))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HEAVY:
            raise ImportError(f"No module named {name!r} (blocked)", name=name)
        return None
if sys.argv[2] == "block":
    sys.meta_path.insert(0, Block())
from tracevisor.cli import main
try:
    status = main(sys.argv[3:])
except SystemExit as e:
    status = e.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
print("\n" + json.dumps({"status": status, "loaded": loaded}), file=sys.stderr)
"""


def run_blocked(*argv: str, block: bool = True, cwd=None) -> tuple[dict, subprocess.CompletedProcess]:
    env = {k: v for k, v in os.environ.items() if k != "TRACEVISOR_KVM_DEVICE"}
    p = subprocess.run([sys.executable, "-c", BLOCKED, json.dumps(sorted(HEAVY)), "block" if block else "allow",
                        *argv], capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    last = p.stderr.strip().splitlines()[-1]
    return json.loads(last), p


def test_only_analysis_imports_the_heavy_packages():
    offenders = []
    for pkg in ("tracevisor", "replay"):
        for path in (REPO / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    names = [node.module]
                for n in names:
                    if n.split(".")[0] in HEAVY:
                        offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {n}")
    assert not offenders, offenders


def test_pyproject_keeps_them_out_of_the_base_install():
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = {d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]}
    assert not base & HEAVY, base
    for extra in ("analysis", "scale", "test"):
        assert {"pandas", "pyarrow", "matplotlib"} <= {d.split(">")[0].split("[")[0].lower()
                                                     for d in project["optional-dependencies"][extra]}


def test_analysis_commands_without_the_extra_say_what_to_install():
    trace = str(REPO / "traces" / "hello.tvt")
    for argv, status in ((["stats", trace], 1), (["diff", trace, trace], 2),  # diff: 1 would mean "different"
                         (["export", trace, "--format", "parquet", "-o", "/nonexistent/x"], 1)):
        res, p = run_blocked(*argv)
        assert res["status"] == status, (argv, p.stderr)
        assert "pip install 'tracevisor[analysis]'" in p.stderr, p.stderr
        assert "Traceback" not in p.stderr
    # the pcap export and the trace tools do not need the extra
    for argv in (["info", trace], ["dump", trace], ["export", trace, "--format", "pcap", "-o", os.devnull]):
        res, p = run_blocked(*argv)
        assert res == {"status": 0, "loaded": []}, (argv, p.stderr)


@pytest.mark.kvm
def test_run_record_replay_without_the_extra(guests, tmp_path):
    hello = str(guests["hello"])
    res, p = run_blocked("run", hello)
    assert res == {"status": 0, "loaded": []}, p.stderr
    assert "Hello from tracevisor!" in p.stdout
    trace = str(tmp_path / "hello.tvt")
    res, p = run_blocked("record", "-q", hello, "-o", trace)
    assert res == {"status": 0, "loaded": []}, p.stderr
    res, p = run_blocked("replay", trace)
    assert res == {"status": 0, "loaded": []}, p.stderr
    assert "Hello from tracevisor!" in p.stdout


@pytest.mark.kvm
def test_plain_commands_do_not_load_pandas_even_when_installed(guests, tmp_path):
    pytest.importorskip("pandas")
    trace = str(tmp_path / "hello.tvt")
    res, p = run_blocked("record", "-q", str(guests["hello"]), "-o", trace, block=False)
    assert res == {"status": 0, "loaded": []}, p.stderr
    res, p = run_blocked("replay", "-q", trace, block=False)
    assert res == {"status": 0, "loaded": []}, p.stderr
    res, p = run_blocked("stats", trace, block=False)  # and the analysis commands do
    assert res["status"] == 0 and "pandas" in res["loaded"], p.stderr
