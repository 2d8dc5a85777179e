"""The command line: help for every subcommand, argument order, examples."""

from __future__ import annotations

import pytest

from helpers import run_cli
from tracevisor.cli import _hoist_record_options


@pytest.mark.parametrize("cmd,words", [
    ("run", ["--memory", "--cpus", "--mount", "--env", "--no-host-env", "--timeout", "--gdb", "HERMIT_MEMORY_SIZE"]),
    ("record", ["--output", "--compress", "--max-trace-size", "--quiet", "--mount"]),
    ("replay", ["--kernel", "--force", "--report", "--until", "--gdb", "--checkpoint-every"]),
    ("info", ["TRACE"]), ("dump", ["--kind", "--limit", "--cpu"]), ("examples", ["name"]),
])
def test_help_explains_each_option(cmd, words):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0
    text = r.stdout.decode()
    for w in words:
        assert w in text, (cmd, w)


def test_top_level_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and b"record" in r.stdout and b"replay" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith(b"tracevisor ")
    r = run_cli()
    assert r.returncode == 2


def test_record_options_after_kernel_are_hoisted_but_guest_args_kept():
    assert _hoist_record_options(["record", "-m", "64M", "k", "-o", "x.tvt", "--compress", "zstd", "a", "-o"]) == \
        ["record", "-m", "64M", "-o", "x.tvt", "--compress", "zstd", "k", "a", "-o"]
    assert _hoist_record_options(["record", "k", "a", "-o", "x"]) == ["record", "k", "a", "-o", "x"]
    assert _hoist_record_options(["run", "k", "-o", "x"]) == ["run", "k", "-o", "x"]


def test_examples_lists_and_locates(guests):
    r = run_cli("examples")
    names = r.stdout.decode().split()
    assert {"hello", "files", "compute", "smp"} <= set(names)
    r = run_cli("examples", "hello")
    assert r.returncode == 0 and r.stdout.strip().endswith(b"hello")
    r = run_cli("examples", "nope")
    assert r.returncode == 1 and b"no example named" in r.stderr
