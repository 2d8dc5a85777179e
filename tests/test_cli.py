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


@pytest.mark.parametrize("text, size", [("64M", 64 << 20), ("64MiB", 64 << 20), ("1.5G", 3 << 29),
                                        ("0x1e00000", 0x1E00000), ("0x1b", 0x1B), ("67108864", 64 << 20),
                                        ("6.4e7", 64_000_000)])
def test_sizes(text, size):
    from tracevisor.machine import parse_size

    assert parse_size(text) == size


@pytest.mark.parametrize("argv, message", [
    (["-m", "0"], b"bad size '0': must be positive"),
    (["--memory=-64M"], b"bad size '-64M': must be positive"),
    (["-m", "nanM"], b"bad size 'nanM'"),
    (["--timeout", "nan"], b"--timeout nan: must be a positive number of seconds"),
    (["--timeout", "inf"], b"--timeout inf: must be a positive number of seconds"),
    (["--timeout", "-1"], b"--timeout -1.0: must be a positive number of seconds"),
])
def test_bad_numbers_are_refused_in_one_line(tmp_path, argv, message):
    r = run_cli("run", *argv, str(tmp_path / "no-such-kernel"))
    assert r.returncode == 1 and r.stderr.startswith(b"tracevisor: error: ") and message in r.stderr, r.stderr
    assert r.stderr.count(b"\n") == 1


def test_max_trace_size_must_be_positive(tmp_path):
    r = run_cli("record", "--max-trace-size", "0", "-o", str(tmp_path / "t.tvt"), str(tmp_path / "no-such-kernel"))
    assert r.returncode == 1 and b"bad size '0': must be positive" in r.stderr, r.stderr
    assert not (tmp_path / "t.tvt").exists()


@pytest.mark.parametrize("var,value", [("HERMIT_CPU_COUNT", "abc"), ("HERMIT_MEMORY_SIZE", "lots")])
def test_a_bad_hermit_variable_is_one_error_line_not_a_broken_parser(var, value):
    env = {var: value}
    for args in (["--help"], ["run", "--help"], ["info", "--help"], ["examples"]):
        r = run_cli(*args, env=env)
        assert r.returncode == 0 and b"Traceback" not in r.stderr, (args, r.stderr)
    for cmd in ("run", "record"):
        r = run_cli(cmd, "no-such-kernel", env=env)
        assert r.returncode == 1 and b"Traceback" not in r.stderr, r.stderr
        assert r.stderr.decode().count("\n") == 1 and f"{var}={value!r}".encode() in r.stderr, r.stderr
    r = run_cli("run", "-c", "1", "-m", "64M", "no-such-kernel", env=env)  # explicit options win
    assert var.encode() not in r.stderr and b"no-such-kernel" in r.stderr


def test_messages_a_new_user_meets(tmp_path):
    """Each mistake gets one line that names it (or the subcommand's own usage), never another's words."""
    r = run_cli("run", "-m", "1K", "no-such-kernel")
    assert r.returncode == 1 and b"guest memory 1 KiB is out of range" in r.stderr, r.stderr
    r = run_cli("run", "")
    assert r.returncode == 1 and b"no kernel given" in r.stderr and b"directory" not in r.stderr, r.stderr
    r = run_cli("record", "some-kernel", "-o")
    err = r.stderr.decode()
    assert r.returncode == 2 and "tracevisor record: error: argument -o: expected one argument" in err, err
    assert "KERNEL, ARGS" not in err
    r = run_cli("run", "--bogus", "some-kernel")
    err = r.stderr.decode()
    assert r.returncode == 2 and err.startswith("usage: tracevisor run ") and "unrecognized arguments: --bogus" in err
    r = run_cli("replay", "--bogus", "t.tvt")
    assert r.returncode == 2 and r.stderr.startswith(b"usage: tracevisor replay "), r.stderr


def test_export_without_format_of_a_trace_without_frames_says_so(tmp_path):
    from pathlib import Path

    sample = Path(__file__).resolve().parents[1] / "traces" / "hello.tvt"
    out = tmp_path / "h.pcap"
    r = run_cli("export", str(sample), "-o", str(out))
    assert r.returncode == 1 and b"no network frames" in r.stderr and not out.exists(), r.stderr
    r = run_cli("export", str(sample), "--format", "pcap", "-o", str(out))  # asked for explicitly: written
    assert r.returncode == 0 and b"wrote 0 frames" in r.stderr and out.exists()
    net = Path(__file__).resolve().parents[1] / "traces" / "netecho.tvt"
    r = run_cli("export", str(net), "-o", str(tmp_path / "n.pcap"))
    assert r.returncode == 0 and b"wrote 8 frames" in r.stderr, r.stderr
