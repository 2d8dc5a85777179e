"""Damaged traces: killed recorders, flipped bytes, truncation, wrong files, future versions."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import msgpack
import pytest

from tracevisor.errors import TraceError
from tracevisor.trace import TraceWriter, open_trace
from tracevisor.trace.writer import partial_name

REPO = Path(__file__).resolve().parents[1]
MAGIC = b"\x89TVT\r\n\x1a\n"


def write_exits(path, n=5000, chunk_events=500, compress=None, footer=True, events_every=0):
    w = TraceWriter(path, {"argv": ["k"]}, chunk_events=chunk_events, compress=compress)
    for i in range(n):
        w.exit(0, i * 10, 2, 0x400000 + i, 0x800, 1, 1, i & 0xFF)
        if events_every and i % events_every == 0:
            w.event("console", 0, i * 10, stream="uart", data=b"line %d\n" % i)
    if footer:
        w.close({"code": 0, "reason": "exit"})
    else:  # simulate a kill after all chunks are out: flush without footer
        w._flush()
        w._queue.put(None)
        w._thread.join()
        os.close(w._fd)
        w._closed = True
        os.replace(w.partial_path, path)  # what a killed recorder leaves, under the final name
    return path


def frame_offsets(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, length) of each frame, walked by hand."""
    out, pos = [], 8
    while pos + 12 <= len(data):
        t, _f, _r, length, _c = struct.unpack_from("<BBHII", data, pos)
        if pos + 12 + length > len(data):
            break
        out.append((pos, t, length))
        pos += 12 + length
        if t == ord("F"):
            break
    return out


def check_dense_from(events, first=0):
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(first, first + len(seqs)))


# --------------------------------------------------------------------------------------------------
# killed recorder
# --------------------------------------------------------------------------------------------------

def test_sigkill_leaves_a_readable_trace(tmp_path):
    path = tmp_path / "killed.tvt"
    code = textwrap.dedent(f"""
        import sys, time
        from tracevisor.trace import TraceWriter
        w = TraceWriter({str(path)!r}, {{"argv": ["forever"]}}, chunk_events=64)
        i = 0
        while True:
            w.exit(0, i, 2, 0x401000, 0x800, 1, 1, i & 0xFF)
            if i % 50 == 0:
                w.event("console", 0, i, stream="uart", data=b"tick\\n")
            i += 1
            if i % 64 == 0:
                time.sleep(0.0005)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    partial = Path(partial_name(str(path), proc.pid))  # the recording's name until it is closed
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size > 20 * 64 * 27:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the writer subprocess produced no chunks")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not path.exists()  # never a trace without footer under the final name
    path = partial
    r = open_trace(path)
    assert r.footer is None and not r.complete
    assert len(r.warnings) == 1
    assert "recorder killed?" in r.warnings[0]
    assert ("torn" in r.warnings[0]) or ("no footer" in r.warnings[0])
    events = list(r.events())
    assert len(events) >= 10 * 64
    check_dense_from(events)
    data = path.read_bytes()
    assert len(r.chunk_index) == sum(1 for _o, t, _ln in frame_offsets(data) if t == ord("C"))  # none lost
    assert f"{len(events)} events in {len(r.chunk_index)} complete chunks recovered" in r.warnings[0]
    assert len(events) == sum(c.n for c in r.chunks())


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_truncation_anywhere_recovers_complete_chunks(tmp_path, compress):
    full = write_exits(tmp_path / "full.tvt", n=3000, chunk_events=300, compress=compress, events_every=97)
    data = full.read_bytes()
    frames = frame_offsets(data)
    chunk_frames = [(o, ln) for o, t, ln in frames if t == ord("C")]
    ns = [n for _o, _s, n in open_trace(full).footer["chunks"]]
    footer_end = [o + 12 + ln for o, t, ln in frames if t == ord("F")][0]
    cut_points = {len(data) - 1, len(data) - 16, len(data) - 17}
    for o, ln in chunk_frames[:4] + chunk_frames[-2:]:
        cut_points |= {o, o + 5, o + 12, o + 12 + ln // 2, o + 12 + ln}
    for cut in sorted(cut_points):
        p = tmp_path / "cut.tvt"
        p.write_bytes(data[:cut])
        r = open_trace(p)
        complete_before = [o for o, ln in chunk_frames if o + 12 + ln <= cut]
        assert len(r.chunk_index) == len(complete_before), cut
        events = list(r.events())
        check_dense_from(events)
        assert len(events) == sum(ns[: len(complete_before)])
        assert len(r.warnings) == 1, (cut, r.warnings)
        if cut >= footer_end:  # only the trailer is damaged: the footer is found by scanning
            assert r.complete and "trailer" in r.warnings[0]
        else:
            assert not r.complete and "recovered" in r.warnings[0], (cut, r.warnings)


def test_missing_footer_after_clean_chunks(tmp_path):
    path = write_exits(tmp_path / "nofoot.tvt", n=2000, chunk_events=250, footer=False)
    r = open_trace(path)
    assert r.warnings == ["the trace has no footer (recorder killed?): 2000 events in 8 complete chunks recovered"]
    check_dense_from(list(r.events()))


# --------------------------------------------------------------------------------------------------
# corruption in the middle
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("footer", [True, False])
@pytest.mark.parametrize("compress", [None, "zstd"])
def test_flipped_bytes_in_a_middle_chunk(tmp_path, footer, compress):
    path = write_exits(tmp_path / "t.tvt", n=5000, chunk_events=500, footer=footer, compress=compress)
    data = bytearray(path.read_bytes())
    chunks = [(o, ln) for o, t, ln in frame_offsets(bytes(data)) if t == ord("C")]
    total = 5001 if footer else 5000  # close() adds the stop event, in a chunk of its own
    assert len(chunks) == (11 if footer else 10)
    k = 4
    o, ln = chunks[k]
    for j in range(o + 12 + ln // 3, o + 12 + ln // 3 + 4):
        data[j] ^= 0xFF
    path.write_bytes(bytes(data))
    r = open_trace(path)
    events = list(r.events())
    hits = [w for w in r.warnings if w.startswith(f"chunk {k} at offset {o} is corrupt (CRC mismatch)")]
    assert len(hits) == 1, r.warnings
    assert "skipped 500 events" in hits[0] and "later chunks still read" in hits[0]
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(0, 2000)) + list(range(2500, total))
    assert [c.index for c in r.chunks()] == [i for i in range(len(chunks)) if i != k]
    assert r.chunk(k) is None
    assert r.complete is footer


def test_damaged_frame_length_stops_the_scan(tmp_path):
    path = write_exits(tmp_path / "t.tvt", n=3000, chunk_events=500, footer=False)
    data = bytearray(path.read_bytes())
    chunks = [o for o, t, ln in frame_offsets(bytes(data)) if t == ord("C")]
    struct.pack_into("<I", data, chunks[3] + 4, 0xFFFFFF00)  # implausible length
    path.write_bytes(bytes(data))
    r = open_trace(path)
    assert len(r.chunk_index) == 3
    check_dense_from(list(r.events()))
    assert len(list(r.events())) == 1500
    assert any(f"offset {chunks[3]}" in w for w in r.warnings)


def test_damaged_frame_header_in_footer_mode(tmp_path):
    path = write_exits(tmp_path / "t.tvt", n=3000, chunk_events=500)
    data = bytearray(path.read_bytes())
    chunks = [o for o, t, ln in frame_offsets(bytes(data)) if t == ord("C")]
    data[chunks[2]] = ord("X")  # frame type
    path.write_bytes(bytes(data))
    r = open_trace(path)
    assert len(list(r.events())) == 2501
    assert any(w.startswith(f"chunk 2 at offset {chunks[2]} has a damaged frame header") for w in r.warnings)


def test_damaged_footer_falls_back_to_scanning(tmp_path):
    path = write_exits(tmp_path / "t.tvt", n=3000, chunk_events=500)
    data = bytearray(path.read_bytes())
    foot = [o for o, t, ln in frame_offsets(bytes(data)) if t == ord("F")][0]
    data[foot + 14] ^= 0x55
    path.write_bytes(bytes(data))
    r = open_trace(path)
    assert r.footer is None and not r.complete
    assert any("footer is unreadable" in w for w in r.warnings)
    assert any("footer at offset" in w and "corrupt" in w for w in r.warnings)
    assert len(list(r.events())) == 3001


def test_missing_trailer_still_finds_the_footer(tmp_path):
    path = write_exits(tmp_path / "t.tvt", n=1000, chunk_events=500)
    data = path.read_bytes()
    path.write_bytes(data[:-16])
    r = open_trace(path)
    assert r.footer is not None and r.footer["events"] == 1001
    assert any("trailer" in w for w in r.warnings)
    assert len(list(r.events())) == 1001


def _frame(ftype: bytes, payload: bytes, flags: int = 0) -> bytes:
    return struct.pack("<BBHII", ftype[0], flags, 0, len(payload), zlib.crc32(payload)) + payload


def _header(fmt=(1, 0), **extra) -> bytes:
    return _frame(b"H", msgpack.packb({"format": list(fmt), **extra}))


def _chunk(seq0, n, exits=b"", events=(), flags=0) -> bytes:
    return _frame(b"C", msgpack.packb({"seq0": seq0, "n": n, "exits": exits, "events": list(events)}), flags)


ROW = struct.Struct("<QQIHHBBB")


def test_unknown_frame_types_kinds_and_keys_are_skipped(tmp_path):
    path = tmp_path / "future.tvt"
    exits = ROW.pack(5, 0x1000, 0, 0, 0, 5, 0, 0)
    data = (MAGIC + _header((1, 7), brand_new_field={"x": 1})
            + _chunk(0, 2, exits, [{"k": "quantum", "seq": 1, "cpu": 0, "t": 6, "spin": "up"}])
            + _frame(b"I", b"\x00some future index\xff")
            + _frame(b"C", msgpack.packb({"seq0": 2, "n": 1, "exits": ROW.pack(7, 1, 2, 3, 0, 2, 1, 1),
                                          "events": [], "extra": [1, 2, 3]})))
    path.write_bytes(data)
    r = open_trace(path)
    assert r.header["format"] == [1, 7]
    evs = list(r.events())
    assert [e["k"] for e in evs] == ["exit", "quantum", "exit"]
    assert evs[1]["spin"] == "up"
    assert r.warnings == ["the trace has no footer (recorder killed?): 3 events in 2 complete chunks recovered"]


def test_unknown_flags_and_malformed_chunks_are_skipped(tmp_path):
    path = tmp_path / "odd.tvt"
    row = ROW.pack(1, 2, 3, 4, 0, 2, 1, 1)
    data = (MAGIC + _header()
            + _chunk(0, 1, row)
            + _chunk(1, 1, row, flags=0x80)  # unknown flag
            + _chunk(2, 2, row)  # 1 row for 2 exit seqs
            + _chunk(4, 1, b"", [{"k": "console", "seq": 9}])  # seq out of range
            + _frame(b"C", msgpack.packb([1, 2, 3]))  # not a map
            + _frame(b"C", b"\xc1\xc1\xc1")  # not msgpack
            + _chunk(5, 1, row))
    path.write_bytes(data)
    r = open_trace(path)
    assert [e["seq"] for e in r.events()] == [0, 5]
    text = "\n".join(r.warnings)
    assert "chunk 1 " in text and "unknown frame flags 0x80" in text
    assert "chunk 2 " in text and "1 exit rows for 2 exit seqs" in text
    assert "chunk 3 " in text and "out of order or range" in text
    assert "chunk 4 " in text and "chunk 5 " in text


# --------------------------------------------------------------------------------------------------
# files that are not readable traces
# --------------------------------------------------------------------------------------------------

def test_not_a_trace(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("hello, this is text\n")
    with pytest.raises(TraceError, match=r"notes.txt is not a tracevisor trace"):
        open_trace(p)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.tvt"
    p.write_bytes(b"")
    with pytest.raises(TraceError, match="is not a tracevisor trace"):
        open_trace(p)


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="cannot open trace"):
        open_trace(tmp_path / "nope.tvt")


def test_future_major_version(tmp_path):
    p = tmp_path / "future.tvt"
    p.write_bytes(MAGIC + _header((3, 1)) + b"whatever a 3.x trace holds")
    with pytest.raises(TraceError) as e:
        open_trace(p)
    assert str(e.value) == ("trace format version 3.1 is newer than this tracevisor (reads 1.x and 2.x); "
                            "upgrade tracevisor")


def test_header_truncated_everywhere(tmp_path):
    full = write_exits(tmp_path / "t.tvt", n=10)
    data = full.read_bytes()
    header_end = frame_offsets(data)[0][0] + 12 + frame_offsets(data)[0][2]
    for cut in range(1, header_end):
        p = tmp_path / "cut.tvt"
        p.write_bytes(data[:cut])
        with pytest.raises(TraceError) as e:
            open_trace(p)
        msg = str(e.value)
        assert "\n" not in msg
        assert ("is not a tracevisor trace" in msg) if cut < 8 else ("trace header is truncated" in msg), (cut, msg)


def test_header_corrupt(tmp_path):
    data = bytearray(write_exits(tmp_path / "t.tvt", n=10).read_bytes())
    data[8 + 12 + 3] ^= 0x01
    p = tmp_path / "bad.tvt"
    p.write_bytes(bytes(data))
    with pytest.raises(TraceError, match=r"trace header is corrupt \(CRC mismatch\)"):
        open_trace(p)
    p.write_bytes(MAGIC + _frame(b"H", msgpack.packb({"no": "format"})))
    with pytest.raises(TraceError, match="trace header is corrupt"):
        open_trace(p)
    p.write_bytes(MAGIC + _chunk(0, 0))
    with pytest.raises(TraceError, match="trace header is corrupt"):
        open_trace(p)


def test_zstd_trace_without_zstandard(tmp_path, monkeypatch):
    path = write_exits(tmp_path / "z.tvt", n=2000, compress="zstd")
    from tracevisor.trace import frames

    monkeypatch.setattr(frames, "_zstd_module", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(TraceError, match="install zstandard"):
        open_trace(path)


def test_a_fifo_or_directory_is_refused_at_once_not_waited_on(tmp_path):
    from helpers import run_cli

    fifo = tmp_path / "t.tvt"
    os.mkfifo(fifo)
    with pytest.raises(TraceError, match="not a regular file"):
        open_trace(fifo)
    with pytest.raises(TraceError, match="is a directory"):
        open_trace(tmp_path)
    for cmd in ("info", "dump", "replay", "export"):
        r = run_cli(cmd, str(fifo), timeout=60)  # it used to wait forever for a writer
        assert r.returncode == 1 and b"not a regular file" in r.stderr and b"Traceback" not in r.stderr, r.stderr
