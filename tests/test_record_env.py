"""What a recording stores about the host: no environment unless asked; host bytes stored faithfully."""

from __future__ import annotations

import shutil

import pytest

from helpers import run_cli
from tracevisor.trace import open_trace

pytestmark = pytest.mark.kvm

SECRET = {"TRACEVISOR_TEST_TOKEN": "hunter2-secret"}


def test_record_stores_no_host_environment_by_default(tmp_path, guests):
    out = tmp_path / "t.tvt"
    r = run_cli("record", "-o", str(out), str(guests["args"]), env=SECRET)
    assert r.returncode == 0, r.stderr
    assert b"hunter2" not in out.read_bytes() and b"hunter2" not in r.stdout
    assert r.stderr.count(b"record passes no host environment") == 1, r.stderr
    assert open_trace(out).header["env"] == []
    # `run` keeps uhyve's behaviour
    assert b"TRACEVISOR_TEST_TOKEN=hunter2-secret" in run_cli("run", str(guests["args"]), env=SECRET).stdout


def test_record_passes_named_variables_or_all_when_asked(tmp_path, guests):
    out = tmp_path / "named.tvt"
    r = run_cli("record", "--env", "TRACEVISOR_TEST_TOKEN", "--env", "B=2", "--env", "TRACEVISOR_UNSET_X",
                "-o", str(out), str(guests["args"]), env=SECRET)
    assert r.returncode == 0, r.stderr
    assert open_trace(out).header["env"] == ["TRACEVISOR_TEST_TOKEN=hunter2-secret", "B=2"]
    assert b"TRACEVISOR_UNSET_X: not set in the host environment" in r.stderr
    assert b"record passes no host environment" not in r.stderr  # an explicit choice: no note
    out = tmp_path / "all.tvt"
    r = run_cli("record", "--host-env", "-o", str(out), str(guests["args"]), env=SECRET)
    assert r.returncode == 0 and "TRACEVISOR_TEST_TOKEN=hunter2-secret" in open_trace(out).header["env"]
    assert b"record passes no host environment" not in r.stderr


def test_non_utf8_environment_argument_and_kernel_path_are_recorded_as_bytes(tmp_path, guests):
    kernel = tmp_path / "k\udcff"  # the file name's byte 0xff, as Python spells it
    shutil.copy(guests["args"], kernel)
    out = tmp_path / "odd.tvt"
    env = {"ODD": "a\udcfeb"}  # a host variable whose value is not UTF-8
    r = run_cli("record", "--env", "ODD", "-o", str(out), str(kernel), "x\udcfd", env=env)
    assert r.returncode == 0 and b"Traceback" not in r.stderr, r.stderr
    assert b"argv[1]=x\xfd\n" in r.stdout and b"ODD=a\xfeb" in r.stdout, r.stdout
    h = open_trace(out).header
    raw_kernel = str(kernel).encode("utf-8", "surrogateescape")
    assert h["argv"] == [raw_kernel, b"x\xfd"]
    assert h["env"] == [b"ODD=a\xfeb"] and h["kernel"]["path"] == raw_kernel
    r = run_cli("replay", "-q", str(out))
    assert r.returncode == 0 and b"replay verified" in r.stderr, r.stderr
    r = run_cli("info", str(out))
    assert r.returncode == 0 and b"x\\xfd" in r.stdout
    assert run_cli("record", "--host-env", "-o", str(tmp_path / "all.tvt"), str(guests["args"]),
                   env=env).returncode == 0  # one odd host variable no longer breaks recording
