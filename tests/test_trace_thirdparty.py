"""A reader written from docs/trace-format.md alone — plain msgpack, struct and zlib, no tracevisor.trace
import — must see exactly what the writer wrote.  The writer side uses tracevisor; the decoding side below
must not."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest

MAGIC = b"\x89TVT\r\n\x1a\n"
FRAME = struct.Struct("<BBHII")  # type, flags, reserved, length, crc32
ROW = struct.Struct("<QQIHHBBBI")  # t_ns, rip, value, port, vcpu, reason, dir, size, digest (format 2.x)
TRAILER = struct.Struct("<Q8s")


class ThirdPartyReader:
    """Decodes a .tvt file following the specification's rules."""

    def __init__(self, data: bytes) -> None:
        assert data[:8] == MAGIC, "not a tracevisor trace"
        self.data = data
        ftype, flags, reserved, length, crc = FRAME.unpack_from(data, 8)
        assert ftype == ord("H") and flags == 0 and reserved == 0
        payload = data[20 : 20 + length]
        assert zlib.crc32(payload) == crc
        self.header = msgpack.unpackb(payload, raw=False)
        assert self.header["format"][0] == 2
        self.data_start = 20 + length
        self.footer = self._footer()

    def _payload(self, pos: int) -> tuple[int, bytes, int]:
        ftype, flags, reserved, length, crc = FRAME.unpack_from(self.data, pos)
        assert reserved == 0
        payload = self.data[pos + 12 : pos + 12 + length]
        assert len(payload) == length and zlib.crc32(payload) == crc
        if flags & 1:
            import zstandard  # the only optional dependency a reader needs

            payload = zstandard.ZstdDecompressor().decompress(payload)
        assert flags & ~1 == 0
        return ftype, payload, pos + 12 + length

    def _footer(self):
        offset, magic = TRAILER.unpack_from(self.data, len(self.data) - 16)
        if magic != b"TVTFOOT\n":
            return None
        ftype, payload, end = self._payload(offset)
        assert ftype == ord("F") and end == len(self.data) - 16
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)  # by_reason has int keys

    def chunk_offsets_by_scanning(self) -> list[int]:
        out, pos = [], self.data_start
        while pos < len(self.data):
            ftype, _flags, _r, length, _crc = FRAME.unpack_from(self.data, pos)
            if ftype == ord("F"):
                break
            if ftype == ord("C"):
                out.append(pos)
            pos += 12 + length
        return out

    def events(self):
        offsets = self.chunk_offsets_by_scanning()
        if self.footer is not None:
            assert [c[0] for c in self.footer["chunks"]] == offsets
        for off in offsets:
            ftype, payload, _ = self._payload(off)
            chunk = msgpack.unpackb(payload, raw=False, strict_map_key=False)
            seq0, n, rows, rich = chunk["seq0"], chunk["n"], chunk["exits"], chunk["events"]
            assert isinstance(rows, bytes) and len(rows) == 31 * (n - len(rich))
            used = {ev["seq"] for ev in rich}
            exit_seqs = [s for s in range(seq0, seq0 + n) if s not in used]  # ascending
            merged = {}
            for s, row in zip(exit_seqs, ROW.iter_unpack(rows)):
                t, rip, value, port, cpu, reason, d, size, digest = row
                merged[s] = {"k": "exit", "seq": s, "cpu": cpu, "t": t, "reason": reason, "rip": rip,
                             "port": port, "dir": d, "size": size, "value": value, "digest": digest}
            for ev in rich:
                merged[ev["seq"]] = ev
            for s in range(seq0, seq0 + n):
                yield merged[s]


@pytest.mark.parametrize("compress", [None, "zstd"])
def test_third_party_reader_sees_the_same_events(tmp_path, compress):
    from tracevisor.trace import TraceWriter, open_trace  # writer side and comparison only

    path = tmp_path / "run.tvt"
    with TraceWriter(path, {"argv": ["k", "x"], "cpus": 2}, compress=compress, chunk_events=333) as w:
        for i in range(5000):
            w.exit(i % 2, i * 100, 2, 0x401000 + i, 0x500, 1, 4, 0x9000)
            if i % 40 == 0:
                w.event("hostio", i % 2, i * 100 + 5, op="read", args=[3, 4096], ret=3, data=b"abc")
                w.event("hypercall", i % 2, i * 100, call="read", port=0x500, addr=0x9000, block=bytes(28),
                        out=bytes(20) + (3).to_bytes(8, "little"), args={"fd": 3, "buf": 0x402000, "len": 4096},
                        ret=3, t_end=i * 100 + 50)
        w.exit(0, 10**9, 8, 0xFFFF)
        summary = w.close({"code": None, "reason": "fault", "report": {"message": "triple fault"}})

    data = path.read_bytes()
    tp = ThirdPartyReader(data)
    assert tp.header["argv"] == ["k", "x"]
    ours = list(tp.events())
    theirs = list(open_trace(path).events())
    assert ours == theirs
    assert [e["seq"] for e in ours] == list(range(summary["events"]))
    assert tp.footer["events"] == len(ours)
    assert tp.footer["exits"] == sum(1 for e in ours if e["k"] == "exit")
    assert tp.footer["by_reason"] == {2: 5000, 8: 1}
    assert tp.footer["stop"]["reason"] == "fault"
    assert tp.footer["bytes"] == TRAILER.unpack_from(data, len(data) - 16)[0]


def test_the_minimal_reader_in_the_documentation_works(tmp_path):
    """Section 8 of docs/trace-format.md is runnable code; run it against a real trace."""
    from pathlib import Path

    from tracevisor.trace import TraceWriter, open_trace

    doc = (Path(__file__).resolve().parents[1] / "docs" / "trace-format.md").read_text()
    start = doc.index("## 8.")
    code = doc[doc.index("```python", start) + len("```python") : doc.index("```", doc.index("```python", start) + 9)]
    namespace: dict = {}
    exec(compile(code, "trace-format.md", "exec"), namespace)

    path = tmp_path / "run.tvt"
    with TraceWriter(path, {}, compress="zstd", chunk_events=100) as w:
        for i in range(1000):
            w.exit(0, i, 2, i, 0x800, 1, 1, 65)
            if i % 7 == 0:
                w.event("console", 0, i, stream="uart", data=b"A")
    assert list(namespace["read_trace"](str(path))) == list(open_trace(path).events())
