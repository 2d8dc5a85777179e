"""Fuzz (b): the trace reader on damaged traces.  open_trace raises only TraceError; reading a trace that
opened (events, chunks, columns, dump lines, info) never raises."""

from __future__ import annotations

import os

import pytest
from fuzzsettings import budget
from hypothesis import given
from hypothesis import strategies as st

from fuzzlib import HypothesisChooser, base_trace, boundaries, check_trace_file, trace_case
from tracevisor.trace import schema as S


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz-trace-base")
    return {c: base_trace(str(d / f"base-{c}.tvt"), c) for c in (None, "zstd")}


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_truncation_at_every_frame_boundary(bases, compress, tmp_path):
    data = bases[compress]
    cuts = boundaries(data)
    assert len(cuts) > 30  # the base trace has many frames
    path = str(tmp_path / "cut.tvt")
    outcomes = {}
    for cut in cuts:
        with open(path, "wb") as f:
            f.write(data[:cut])
        outcomes[cut] = check_trace_file(path)
    # past the header frame every cut opens (with warnings), before it every cut is refused
    header_end = len(S.MAGIC) + S.FRAME_HEADER_SIZE + S.FRAME_HEADER.unpack_from(data, len(S.MAGIC))[3]
    assert all(v == ("read" if c >= header_end else "refused") for c, v in outcomes.items()), outcomes


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_garbage_after_magic(bases, compress, tmp_path):
    path = str(tmp_path / "g.tvt")
    for n in (0, 1, 11, 12, 13, 100, 5000):
        with open(path, "wb") as f:
            f.write(S.MAGIC + os.urandom(n))
        check_trace_file(path)


@budget(400)
@given(data=st.data())
def test_damaged_traces(bases, tmp_path_factory, data):
    path = str(tmp_path_factory.getbasetemp() / "fuzz-damaged.tvt")
    with open(path, "wb") as f:
        f.write(trace_case(HypothesisChooser(data), bases))
    check_trace_file(path)


def test_footer_with_malformed_summary_fields(bases, tmp_path):
    # found by the fuzzer: a CRC-valid footer whose by_reason counts were strings broke `tracevisor info`
    import zlib

    import msgpack

    from fuzzlib import frames
    from tracevisor.trace import open_trace
    from tracevisor.trace.dump import info_text

    data = bases[None]
    off, _t, n = frames(data)[-1]
    footer = msgpack.unpackb(data[off + S.FRAME_HEADER_SIZE:off + n], strict_map_key=False)
    footer.update({"events": "many", "exits": -1, "by_reason": {2: "x", "io": None}, "stop": 5, "wall_ns": 1.5})
    payload = msgpack.packb(footer, use_bin_type=True)
    crafted = (data[:off] + S.FRAME_HEADER.pack(S.FRAME_FOOTER_TYPE, 0, 0, len(payload), zlib.crc32(payload))
               + payload + S.TRAILER.pack(off, S.TRAILER_MAGIC))
    path = tmp_path / "f.tvt"
    path.write_bytes(crafted)
    r = open_trace(path)
    assert r.complete
    assert any("footer's events, exits, wall_ns, by_reason, stop are malformed" in w for w in r.warnings), r.warnings
    assert not {"events", "exits", "wall_ns", "by_reason", "stop"} & set(r.footer)
    assert "exits by reason:" in info_text(r)  # totals recomputed from the chunks
    assert r.n_events is None
    r.close()
