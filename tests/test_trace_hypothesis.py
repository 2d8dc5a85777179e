"""Property tests: random event streams round-trip; damaged files never raise past open_trace."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracevisor.errors import TraceError
from tracevisor.trace import TraceWriter, open_trace

u = lambda bits: st.integers(min_value=0, max_value=(1 << bits) - 1)  # noqa: E731

exits = st.tuples(u(16), u(64), st.sampled_from([0, 2, 4, 5, 6, 8, 9, 10, 17, 24, 255]), u(64), u(16),
                  st.sampled_from([0, 1]), st.sampled_from([0, 1, 2, 4]), u(32), u(32)).map(lambda t: ("exit", t))
small = st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
rich = st.one_of(
    st.builds(lambda cpu, t, stream, data: ("console", cpu, t, {"stream": stream, "data": data}),
              u(16), u(64), st.sampled_from(["uart", "stdout", "stderr"]), st.binary(max_size=300)),
    st.builds(lambda cpu, t, op, args, ret, data: ("hostio", cpu, t, {"op": op, "args": args, "ret": ret,
                                                                       **({"data": data} if data else {})}),
              u(16), u(64), st.sampled_from(["open", "read", "boot_time", "net_rx"]),
              st.lists(st.one_of(small, st.text(max_size=20)), max_size=4),
              st.one_of(small, st.none(), st.lists(st.lists(st.text(max_size=5), max_size=3), max_size=2)),
              st.binary(max_size=2000)),
    st.builds(lambda cpu, t, call, block, args, ret, te: ("hypercall", cpu, t, {
        "call": call, "port": 0x400, "addr": 0x9000, "block": block, "args": args, "ret": ret, "t_end": te}),
              u(16), u(64), st.sampled_from(["write", "open", "exit"]), st.binary(max_size=40),
              st.dictionaries(st.sampled_from(["fd", "buf", "len", "flags"]), small, max_size=4),
              st.one_of(small, st.none()), u(64)),
    st.builds(lambda cpu, t, addr, data, w: ("mmio", cpu, t, {"addr": addr, "len": len(data), "data": data,
                                                               "write": w}),
              u(16), u(64), u(64), st.binary(min_size=1, max_size=8), st.booleans()),
    st.builds(lambda cpu, t, s: ("vcpu", cpu, t, {"state": s}), u(16), u(64), st.sampled_from(["start", "stop"])),
)
streams = st.lists(st.one_of(exits, exits, exits, rich), max_size=400)


def _write(path, stream, compress, chunk_events, chunk_bytes):
    expected = []
    with TraceWriter(path, {"argv": ["x"]}, compress=compress, chunk_events=chunk_events,
                     chunk_bytes=chunk_bytes, validate=True) as w:
        for item in stream:
            if item[0] == "exit":
                vcpu, t, reason, rip, port, d, size, value, digest = item[1]
                seq = w.exit(vcpu, t, reason, rip, port, d, size, value, digest)
                expected.append({"k": "exit", "seq": seq, "cpu": vcpu, "t": t, "reason": reason, "rip": rip,
                                 "port": port, "dir": d, "size": size, "value": value, "digest": digest})
            else:
                kind, cpu, t, fields = item
                seq = w.event(kind, cpu, t, **fields)
                expected.append({"k": kind, "seq": seq, "cpu": cpu, "t": t, **fields})
    return expected


def _norm(v):
    """msgpack turns tuples into lists."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams, compress=st.sampled_from([None, "zstd"]), chunk_events=st.integers(1, 64),
       chunk_bytes=st.integers(31, 3000))
def test_random_streams_round_trip(stream, compress, chunk_events, chunk_bytes):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.tvt")
        expected = _write(path, stream, compress, chunk_events, chunk_bytes)
        r = open_trace(path)
        assert r.warnings == [] and r.complete
        got = list(r.events())
        assert got == _norm(expected)
        assert [e["seq"] for e in got] == list(range(len(got)))
        assert r.footer["events"] == len(expected)
        assert all(c.n <= chunk_events for c in r.chunks())
        r.close()


_BASE: dict[str | None, bytes] = {}


def _base(compress) -> bytes:
    if compress not in _BASE:
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "t.tvt")
            with TraceWriter(path, {"argv": ["x"]}, compress=compress, chunk_events=40) as w:
                for i in range(400):
                    w.exit(i % 3, i, 2, i, 0x800, 1, 1, i & 0xFF)
                    if i % 9 == 0:
                        w.event("console", 0, i, stream="uart", data=b"x" * (i % 50))
                w.close({"code": 0, "reason": "exit"})
            with open(path, "rb") as f:
                _BASE[compress] = f.read()
    return _BASE[compress]


mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 1 << 20), u(8).filter(bool)), min_size=1,
                                        max_size=6)),
    st.tuples(st.just("truncate"), st.integers(0, 1 << 20)),
    st.tuples(st.just("insert"), st.tuples(st.integers(0, 1 << 20), st.binary(min_size=1, max_size=30))),
    st.tuples(st.just("delete"), st.tuples(st.integers(0, 1 << 20), st.integers(1, 200))),
)


def _mutate(data: bytes, m) -> bytes:
    kind, arg = m
    b = bytearray(data)
    if not b:
        return bytes(arg[1]) if kind == "insert" else b""
    if kind == "flip":
        for pos, mask in arg:
            b[pos % len(b)] ^= mask
    elif kind == "truncate":
        del b[arg % (len(b) + 1):]
    elif kind == "insert":
        pos, extra = arg
        b[pos % len(b):pos % len(b)] = extra
    else:
        pos, n = arg
        del b[pos % len(b):pos % len(b) + n]
    return bytes(b)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compress=st.sampled_from([None, "zstd"]), mutations=st.lists(mutation, min_size=1, max_size=3))
def test_damaged_files_never_raise_past_open(compress, mutations):
    data = _base(compress)
    for m in mutations:
        data = _mutate(data, m)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.tvt")
        with open(path, "wb") as f:
            f.write(data)
        try:
            r = open_trace(path)
        except TraceError as e:
            assert "\n" not in str(e)
            return
        events = list(r.events())  # must not raise
        for chunk in r.chunks():
            chunk.exit_columns()
            list(chunk.exit_seqs())
        for i in range(len(r.chunk_index)):
            r.chunk(i)
        list(r.events(start=100, stop=300, kinds=["exit", "console"], vcpu=1))
        seqs = [e["seq"] for e in events]
        assert all(isinstance(w, str) and "\n" not in w for w in r.warnings)
        if r.warnings == [] and r.complete:
            assert seqs == list(range(len(seqs)))
        r.close()
