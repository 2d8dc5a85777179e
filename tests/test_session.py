"""Sessions: header ↔ config both ways, the Python record/run API, and replaying what it recorded."""

from __future__ import annotations

import pytest

from tracevisor import replay, session
from tracevisor.errors import TracevisorError
from tracevisor.machine import AP_STAGGER_S
from tracevisor.session import SessionConfig, config_from_header, record
from tracevisor.status import StopReason
from tracevisor.trace import open_trace


def test_config_defaults_and_validation():
    c = SessionConfig(kernel="k", memory="128M", net="none")
    assert c.memory == 128 << 20 and c.net is None and c.stagger_s == AP_STAGGER_S and not c.host_env
    with pytest.raises(TracevisorError, match="out of range"):
        SessionConfig(kernel="k", cpus=0).validate()
    with pytest.raises(TracevisorError, match="positive number of seconds"):
        SessionConfig(kernel="k", timeout=float("nan")).validate()
    with pytest.raises(TracevisorError, match="expected KEY=VALUE"):
        SessionConfig(kernel="k", env=["=x"]).guest_env()
    assert SessionConfig(kernel="k", env=["A=1"]).guest_env() == [b"A=1"]
    with pytest.raises(TracevisorError, match="too many guest arguments"):
        SessionConfig(kernel="k", args=["a"] * 128).guest_argv()


@pytest.mark.kvm
def test_record_api_header_round_trip_and_replay(tmp_path, guests):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = tmp_path / "args.tvt"
    stop = record(guests["args"], out, args=["a", "b c"], mounts=[f"{mnt}:/data:ro"], env=["K=V"],
                  memory="32M", verbose=True)
    assert stop.reason == StopReason.EXIT and stop.code == 0 and stop.status == 0
    reader = open_trace(out)
    assert reader.complete and reader.footer["stop"]["reason"] == "exit"
    h = reader.header
    assert h["argv"] == [str(guests["args"]), "a", "b c"] and h["env"] == ["K=V"]
    back = config_from_header(h)
    assert back.kernel == str(guests["args"]) and back.args == ["a", "b c"] and back.memory == 32 << 20
    assert back.cpus == 1 and back.verbose and back.env == ["K=V"] and back.mounts == [f"{mnt}:/data:ro"]
    assert back.stagger_s == AP_STAGGER_S and back.cpuid_rows == h["cpuid"]
    # the header a config read back from a header writes is the same header (host facts aside)
    image = session.load(back)
    with session.build_run(back, image) as s:
        again = session.trace_header(back, image, s.machine, s.live.sandbox, s.live.argv, s.live.env)
    for key in ("kernel", "memory", "cpus", "argv", "env", "mounts", "cpuid", "options", "determinism"):
        assert again[key] == h[key], key
    with replay.Replayer(out) as r:
        result = r.run()
    assert result.verified and result.code == 0


@pytest.mark.kvm
def test_run_api_returns_the_guest_exit(guests):
    stop = session.run(guests["exitcode"], args=["7"], quiet=True)
    assert stop.reason == StopReason.EXIT and stop.code == 7 and stop.status == 7


@pytest.mark.kvm
def test_record_api_refuses_a_bad_mount_before_creating_a_trace(tmp_path, guests):
    out = tmp_path / "t.tvt"
    with pytest.raises(TracevisorError, match="no-such-dir"):
        record(guests["hello"], out, mounts=[str(tmp_path / "no-such-dir")])
    assert not out.exists()
