"""TraceReader: reads ``.tvt`` files lazily, one chunk at a time, and survives damage.

Only a bad magic, an unsupported version or an unreadable header raise (:class:`TraceError`).  Damage after
the header — a torn tail left by a killed recorder, a chunk whose CRC does not match, a malformed payload —
becomes a one-line entry in :attr:`TraceReader.warnings` and the reader carries on with what it can read.
"""

from __future__ import annotations

import os
import stat
import sys
import zlib
from array import array
from collections.abc import Iterable, Iterator
from typing import Any

import msgpack

from tracevisor.errors import TraceError

from .frames import decompress, zstd_available
from .schema import (
    EXIT_FIELD_LAYOUT,
    EXIT_KIND,
    EXIT_ROW,
    EXIT_ROW_SIZE,
    FRAME_CHUNK_TYPE,
    FRAME_FOOTER_TYPE,
    FRAME_HEADER,
    FRAME_HEADER_SIZE,
    FRAME_HEADER_TYPE,
    KNOWN_FLAGS,
    MAGIC,
    READS_MAJOR,
    READS_MAJORS,
    TRAILER,
    TRAILER_MAGIC,
    TRAILER_SIZE,
    exit_row_struct,
)

_V1_LAYOUT = {k: v for k, v in EXIT_FIELD_LAYOUT.items() if k != "digest"}
_TYPECODES = {array(c).itemsize: c for c in "QLIHB"[::-1]}  # width -> typecode (smallest name wins)
_BIG_ENDIAN = sys.byteorder == "big"


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


_FOOTER_COUNTS = ("events", "exits", "bytes", "dropped", "wall_ns")


class _Damaged(Exception):
    """A chunk cannot be used; the message completes 'chunk i at offset X ...'."""


class ChunkRef:
    """An entry of :attr:`TraceReader.chunk_index`: where a chunk frame is and, once known, its seq range."""

    __slots__ = ("index", "offset", "seq0", "n")

    def __init__(self, index: int, offset: int, seq0: int | None = None, n: int | None = None) -> None:
        self.index = index
        self.offset = offset
        self.seq0 = seq0
        self.n = n

    def __repr__(self) -> str:
        return f"ChunkRef(index={self.index}, offset={self.offset}, seq0={self.seq0}, n={self.n})"


class Chunk:
    """One decoded chunk: events ``seq0 .. seq0+n-1``; exit rows in :attr:`exits`, rich events in
    :attr:`events` (dicts, ascending seq).  The exits' seqs are the chunk's seqs not used by a rich event."""

    __slots__ = ("index", "offset", "seq0", "n", "exits", "events", "row")

    def __init__(self, index: int, offset: int, seq0: int, n: int, exits: bytes, events: list[dict],
                 row: Any = EXIT_ROW) -> None:
        self.index = index
        self.offset = offset
        self.seq0 = seq0
        self.n = n
        self.exits = exits
        self.events = events
        self.row = row  # the exit row layout (schema.EXIT_ROW, or EXIT_ROW_V1 in a format 1.x trace)

    def __repr__(self) -> str:
        return f"Chunk(index={self.index}, seq0={self.seq0}, n={self.n}, exits={self.n_exits}, events={len(self.events)})"

    @property
    def n_exits(self) -> int:
        return len(self.exits) // self.row.size

    @property
    def has_digests(self) -> bool:
        """Do the exit rows carry register digests (format 2.x)?"""
        return self.row.size == EXIT_ROW_SIZE

    def exit_seqs(self) -> array:
        """Seqs of the exit rows, in row order (``array('Q')``)."""
        out = array("Q")
        s = self.seq0
        for ev in self.events:
            es = ev["seq"]
            if es > s:
                out.extend(range(s, es))
            s = es + 1
        end = self.seq0 + self.n
        if end > s:
            out.extend(range(s, end))
        return out

    def exit_rows(self) -> Iterator[tuple[int, ...]]:
        """Exit rows as tuples ``(t_ns, rip, value, port, vcpu, reason, dir, size, digest)``
        (schema.EXIT_FIELDS; format 1.x rows lack ``digest``)."""
        return self.row.iter_unpack(self.exits)

    def exit_columns(self) -> dict[str, array]:
        """Exit rows as columns: ``{field: array.array}`` for every field of schema.EXIT_FIELDS.

        Built with strided byte slicing, no per-row Python work.  (With numpy, prefer
        ``numpy.frombuffer(chunk.exits, dtype=schema.EXIT_DTYPE_FIELDS)``.)  Format 1.x chunks have no
        ``digest`` column."""
        ex = self.exits
        rs = self.row.size
        m = len(ex) // rs
        cols: dict[str, array] = {}
        for name, (off, width) in (EXIT_FIELD_LAYOUT if self.has_digests else _V1_LAYOUT).items():
            if width == 1:
                raw: bytes | bytearray = ex[off::rs]
            else:
                raw = bytearray(m * width)
                for j in range(width):
                    raw[j::width] = ex[off + j :: rs]
            col = array(_TYPECODES[width])
            col.frombytes(raw)
            if _BIG_ENDIAN and width > 1:
                col.byteswap()
            cols[name] = col
        return cols

    def iter_events(
        self,
        kinds: frozenset[str] | set[str] | None = None,
        vcpu: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> Iterator[dict]:
        """Events of this chunk in seq order, exits as ``{"k": "exit", ...}`` maps (see TraceReader.events)."""
        want_exits = kinds is None or EXIT_KIND in kinds
        lo = self.seq0 if start is None else max(start, self.seq0)
        hi = self.seq0 + self.n if stop is None else min(stop, self.seq0 + self.n)
        if lo >= hi:
            return
        mv = memoryview(self.exits)
        s = self.seq0  # next seq not yet accounted for
        row = 0  # row index of seq s if s is an exit
        for ev in self.events:
            es = ev["seq"]
            if es > s:
                if want_exits:
                    yield from _exit_dicts(mv, self.row, row, s, es, lo, hi, vcpu)
                row += es - s
            s = es + 1
            if es >= hi:
                return
            if es >= lo and (kinds is None or ev["k"] in kinds) and (vcpu is None or ev.get("cpu") == vcpu):
                yield ev
        end = self.seq0 + self.n
        if want_exits and end > s:
            yield from _exit_dicts(mv, self.row, row, s, end, lo, hi, vcpu)


def _exit_dicts(mv: memoryview, layout: Any, row: int, s: int, e: int, lo: int, hi: int, vcpu: int | None
                ) -> Iterator[dict]:
    """Exit maps for the exit seqs [s, e) whose first row is ``row``, clipped to [lo, hi).  ``digest`` is None
    in a format 1.x trace."""
    if s < lo:
        row += lo - s
        s = lo
    if e > hi:
        e = hi
    if s >= e:
        return
    rs = layout.size
    rows = layout.iter_unpack(mv[row * rs : (row + e - s) * rs])
    if rs != EXIT_ROW_SIZE:
        rows = ((*r, None) for r in rows)
    for seq, (t, rip, value, port, cpu, reason, d, size, digest) in zip(range(s, e), rows):
        if vcpu is None or cpu == vcpu:
            yield {"k": "exit", "seq": seq, "cpu": cpu, "t": t, "reason": reason, "rip": rip, "port": port,
                   "dir": d, "size": size, "value": value, "digest": digest}


def _open_regular(path: str):
    """Open a trace for reading without blocking: O_NONBLOCK so that a FIFO does not wait for a writer, and
    only a regular file is accepted (the reader seeks; a FIFO, device or socket would hang or mislead)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TraceError(f"cannot open trace {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise TraceError(f"cannot open trace {path}: it is a directory")
        if not stat.S_ISREG(mode):
            raise TraceError(f"cannot open trace {path}: not a regular file (a FIFO, device or socket)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class TraceReader:
    """An open trace.  See :func:`open_trace`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file = _open_regular(self.path)
        self.size = os.fstat(self._file.fileno()).st_size
        self._fd = self._file.fileno()
        self.warnings: list[str] = []
        self.header: dict = {}
        self.footer: dict | None = None
        self.complete = False
        self.chunk_index: list[ChunkRef] = []
        self._warned: set[int] = set()
        self._data_end = self.size  # chunk frames lie before this offset
        self.row = EXIT_ROW  # the exit row layout of this trace's format
        self._index_warned = False
        #: Where the first break of the seq sequence is, once found: ``(chunk index, expected seq0)``.
        self.discontinuity: tuple[int, int] | None = None
        try:
            self._open()
        except BaseException:
            self._file.close()
            raise

    # ------------------------------------------------------------------------------------------------
    # opening
    # ------------------------------------------------------------------------------------------------

    def _read(self, n: int, offset: int) -> bytes:
        return os.pread(self._fd, n, offset)

    def _open(self) -> None:
        path = self.path
        magic = self._read(len(MAGIC), 0)
        if magic != MAGIC:
            if not magic:
                raise TraceError(f"{path} is not a tracevisor trace (empty file)")
            if MAGIC.startswith(magic):
                raise TraceError(f"{path} is not a tracevisor trace (only {len(magic)} bytes)")
            raise TraceError(f"{path} is not a tracevisor trace")
        self.header, data_start = self._read_header()
        self._data_start = data_start
        if not self._read_footer(data_start):
            self._scan(data_start)
        dropped = self.footer.get("dropped") if self.footer else None
        if _is_count(dropped) and dropped:
            self.warnings.append(f"the recorder reached its size limit: {dropped} events were not stored")

    def _read_header(self) -> tuple[dict, int]:
        path = self.path
        pos = len(MAGIC)
        raw = self._read(FRAME_HEADER_SIZE, pos)
        if len(raw) < FRAME_HEADER_SIZE:
            raise TraceError(f"{path}: trace header is truncated (the recorder stopped before writing it)")
        ftype, flags, _reserved, length, crc = FRAME_HEADER.unpack(raw)
        if ftype != FRAME_HEADER_TYPE:
            raise TraceError(f"{path}: trace header is corrupt (the first frame is not a header)")
        if pos + FRAME_HEADER_SIZE + length > self.size:
            raise TraceError(f"{path}: trace header is truncated (the recorder stopped before writing it)")
        payload = self._read(length, pos + FRAME_HEADER_SIZE)
        if zlib.crc32(payload) != crc:
            raise TraceError(f"{path}: trace header is corrupt (CRC mismatch)")
        try:
            header = _unpack(decompress(payload, flags))
        except TraceError:
            raise
        except Exception:
            header = None
        if not isinstance(header, dict):
            raise TraceError(f"{path}: trace header is corrupt (not a msgpack map)")
        fmt = header.get("format")
        if not (
            isinstance(fmt, list)
            and len(fmt) >= 2
            and all(type(x) is int and x >= 0 for x in fmt[:2])
        ):
            raise TraceError(f"{path}: trace header is corrupt (no format version)")
        major, minor = fmt[0], fmt[1]
        readable = " and ".join(f"{m}.x" for m in READS_MAJORS)
        if major > READS_MAJOR:
            raise TraceError(
                f"trace format version {major}.{minor} is newer than this tracevisor "
                f"(reads {readable}); upgrade tracevisor"
            )
        if major not in READS_MAJORS:
            raise TraceError(f"trace format version {major}.{minor} is not readable by this tracevisor (reads {readable})")
        self.row = exit_row_struct(major)
        self.format = (major, minor)
        if header.get("compression") == "zstd" and not zstd_available():
            raise TraceError(f"{path} is zstd-compressed; install zstandard: pip install 'tracevisor[zstd]'")
        return header, pos + FRAME_HEADER_SIZE + length

    def _read_footer(self, data_start: int) -> bool:
        """Fast path: find the footer through the trailer.  False when there is none (or it is unusable)."""
        size = self.size
        if size < data_start + FRAME_HEADER_SIZE + TRAILER_SIZE:
            return False
        offset, tmagic = TRAILER.unpack(self._read(TRAILER_SIZE, size - TRAILER_SIZE))
        if tmagic != TRAILER_MAGIC:
            return False
        footer = None
        if data_start <= offset <= size - TRAILER_SIZE - FRAME_HEADER_SIZE:
            ftype, flags, reserved, length, crc = FRAME_HEADER.unpack(self._read(FRAME_HEADER_SIZE, offset))
            if ftype == FRAME_FOOTER_TYPE and reserved == 0 and offset + FRAME_HEADER_SIZE + length == size - TRAILER_SIZE:
                payload = self._read(length, offset + FRAME_HEADER_SIZE)
                if zlib.crc32(payload) == crc:
                    try:
                        footer = _unpack(decompress(payload, flags))
                    except Exception:
                        footer = None
        if not isinstance(footer, dict):
            self.warnings.append(f"the footer is unreadable (offset {offset}): scanned the chunks instead")
            return False
        refs = self._refs_from_footer(footer, data_start, offset)
        self.footer = self._checked_footer(footer)
        self.complete = True
        self._data_end = offset
        if refs is None:
            self.warnings.append("the footer's chunk list is damaged: scanned the chunks instead")
            self._scan(data_start, footer_known=True)
            return True
        self.chunk_index = refs
        return True

    def _checked_footer(self, footer: dict) -> dict:
        """The footer with every summary field of the wrong shape dropped (a CRC-valid footer can still hold
        anything): readers of ``footer`` get counts as ints, ``by_reason`` as {int: int}, ``stop`` as a map."""
        bad = [k for k in _FOOTER_COUNTS if k in footer and not _is_count(footer[k])]
        by_reason = footer.get("by_reason")
        if by_reason is not None and not (isinstance(by_reason, dict)
                                          and all(_is_count(k) and _is_count(v) for k, v in by_reason.items())):
            bad.append("by_reason")
        if footer.get("stop") is not None and not isinstance(footer["stop"], dict):
            bad.append("stop")
        if bad:
            for k in bad:
                del footer[k]
            self.warnings.append(f"the footer's {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} malformed: "
                                 "ignored")
        return footer

    @staticmethod
    def _refs_from_footer(footer: dict, lo: int, hi: int) -> list[ChunkRef] | None:
        chunks = footer.get("chunks")
        if not isinstance(chunks, list):
            return None
        refs = []
        prev = lo - 1
        for i, entry in enumerate(chunks):
            if not (isinstance(entry, list) and len(entry) >= 3 and all(_is_count(x) for x in entry[:3])):
                return None
            off, seq0, n = entry[:3]
            if not prev < off <= hi - FRAME_HEADER_SIZE:
                return None
            prev = off
            refs.append(ChunkRef(i, off, seq0, n))
        return refs

    def _scan(self, pos: int, footer_known: bool = False) -> None:
        """Slow path: walk the frame headers (payloads are not read) to index the chunks."""
        size = self._data_end
        refs: list[ChunkRef] = []
        problem = None
        while True:
            if pos == size:
                if not footer_known:
                    problem = "the trace has no footer (recorder killed?)"
                break
            raw = self._read(FRAME_HEADER_SIZE, pos)
            if len(raw) < FRAME_HEADER_SIZE:
                problem = f"the trace ends in a torn chunk at offset {pos} (recorder killed?)"
                break
            ftype, flags, reserved, length, crc = FRAME_HEADER.unpack(raw)
            if reserved != 0 or not 0x41 <= ftype <= 0x5A:
                problem = f"the frame header at offset {pos} is damaged; reading stopped there"
                break
            end = pos + FRAME_HEADER_SIZE + length
            if end > size:
                if ftype in (FRAME_CHUNK_TYPE, FRAME_FOOTER_TYPE):
                    what = "chunk" if ftype == FRAME_CHUNK_TYPE else "footer"
                    problem = f"the trace ends in a torn {what} at offset {pos} (recorder killed?)"
                else:
                    problem = f"the frame header at offset {pos} is damaged; reading stopped there"
                break
            if ftype == FRAME_CHUNK_TYPE:
                refs.append(ChunkRef(len(refs), pos))
            elif ftype == FRAME_FOOTER_TYPE and not footer_known:
                payload = self._read(length, pos + FRAME_HEADER_SIZE)
                footer = None
                if zlib.crc32(payload) == crc:
                    try:
                        footer = _unpack(decompress(payload, flags))
                    except Exception:
                        footer = None
                if isinstance(footer, dict):
                    self.footer = self._checked_footer(footer)
                    self.complete = True
                    self.warnings.append(f"the trace's trailer is missing or damaged (footer at offset {pos})")
                else:
                    problem = f"the footer at offset {pos} is corrupt (recorder killed while closing?)"
                break
            elif ftype == FRAME_FOOTER_TYPE:
                break
            elif ftype == FRAME_HEADER_TYPE:
                self.warnings.append(f"a second header frame at offset {pos} was ignored")
            # other frame types: added by later minor versions; skipped
            pos = end
        self.chunk_index = refs
        if problem is not None:
            self.complete = False
            n_events = self._recovered_events()
            self.warnings.append(f"{problem}: {n_events} events in {len(refs)} complete chunks recovered")

    def _recovered_events(self) -> int:
        for i in range(len(self.chunk_index) - 1, -1, -1):
            chunk = self._load(i)
            if chunk is not None:
                return chunk.seq0 + chunk.n
        return 0

    # ------------------------------------------------------------------------------------------------
    # chunks
    # ------------------------------------------------------------------------------------------------

    def _load(self, i: int) -> Chunk | None:
        ref = self.chunk_index[i]
        try:
            chunk = self._decode(ref)
        except _Damaged as e:
            if i not in self._warned:
                self._warned.add(i)
                self.warnings.append(f"chunk {i} at offset {ref.offset} {e}: {self._skipped(i)}; later chunks still read")
            return None
        if ref.seq0 is not None and (ref.seq0, ref.n) != (chunk.seq0, chunk.n):
            # The footer's index is a claim about the file, checked here, never trusted over the chunk itself.
            if not self._index_warned:
                self._index_warned = True
                self.warnings.append(
                    f"the footer's chunk index does not match the file: chunk {i} at offset {ref.offset} holds "
                    f"seqs {chunk.seq0}..{chunk.seq0 + chunk.n - 1}, the index says {ref.seq0}..{ref.seq0 + (ref.n or 0) - 1}"
                    " (chunks moved or edited?)")
        ref.seq0, ref.n = chunk.seq0, chunk.n
        return chunk

    def _skipped(self, i: int) -> str:
        ref = self.chunk_index[i]
        if ref.n is not None:
            return f"skipped {ref.n} events"
        start = 0
        if i > 0:
            prev = self.chunk_index[i - 1]
            if prev.seq0 is None or prev.n is None:
                return "skipped its events"
            start = prev.seq0 + prev.n
        if i + 1 < len(self.chunk_index):
            nxt = self._seq0_of(i + 1)
            if nxt is not None and nxt >= start:
                return f"skipped {nxt - start} events"
        return "skipped its events"

    def _frame_payload(self, ref: ChunkRef) -> tuple[int, bytes, int]:
        raw = self._read(FRAME_HEADER_SIZE, ref.offset)
        if len(raw) < FRAME_HEADER_SIZE:
            raise _Damaged("is truncated")
        ftype, flags, reserved, length, crc = FRAME_HEADER.unpack(raw)
        if ftype != FRAME_CHUNK_TYPE or reserved != 0 or ref.offset + FRAME_HEADER_SIZE + length > self._data_end:
            raise _Damaged("has a damaged frame header")
        payload = self._read(length, ref.offset + FRAME_HEADER_SIZE)
        if len(payload) != length:
            raise _Damaged("is truncated")
        return flags, payload, crc

    def _decode(self, ref: ChunkRef) -> Chunk:
        flags, payload, crc = self._frame_payload(ref)
        if zlib.crc32(payload) != crc:
            raise _Damaged("is corrupt (CRC mismatch)")
        if flags & ~KNOWN_FLAGS:
            raise _Damaged(f"uses unknown frame flags 0x{flags:02x} (written by a newer tracevisor?)")
        try:
            obj = _unpack(decompress(payload, flags))
        except TraceError:
            raise _Damaged("is zstd-compressed but zstandard is not installed") from None
        except Exception as e:
            raise _Damaged(f"is malformed ({type(e).__name__})") from None
        if type(obj) is not dict:
            raise _Damaged("is malformed (payload is not a map)")
        seq0 = obj.get("seq0")
        n = obj.get("n")
        exits = obj.get("exits", b"")
        events = obj.get("events", [])
        if not (_is_count(seq0) and _is_count(n)):
            raise _Damaged("is malformed (no seq0/n)")
        rs = self.row.size
        if type(exits) is not bytes or len(exits) % rs:
            raise _Damaged(f"is malformed (exit rows are not a multiple of {rs} bytes)")
        if type(events) is not list:
            raise _Damaged("is malformed (events is not a list)")
        prev = seq0 - 1
        end = seq0 + n
        for ev in events:
            if type(ev) is not dict:
                raise _Damaged("is malformed (an event is not a map)")
            s = ev.get("seq")
            if type(s) is not int or not prev < s < end or type(ev.get("k")) is not str:
                raise _Damaged("is malformed (event seqs out of order or range)")
            prev = s
        if len(exits) // rs != n - len(events):
            raise _Damaged(f"is malformed ({len(exits) // rs} exit rows for {n - len(events)} exit seqs)")
        return Chunk(ref.index, ref.offset, seq0, n, exits, events, self.row)

    def _seq0_of(self, i: int) -> int | None:
        """seq0 of chunk i, from the index or by peeking at the start of its payload (not CRC-checked)."""
        ref = self.chunk_index[i]
        if ref.seq0 is not None:
            return ref.seq0
        try:
            flags, payload, _crc = self._frame_payload(ref)
            data = decompress(payload, flags) if flags else payload[:64]
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            unpacker.feed(data[:64])
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                value = unpacker.unpack()
                if key == "seq0":
                    return value if _is_count(value) else None
                if key not in ("n",):
                    return None
        except Exception:
            return None
        return None

    def chunks(self, strict: bool = False, first: int = 0) -> Iterator[Chunk]:
        """Decoded chunks in file order, one at a time, each continuing the seqs of the one before.

        Damaged chunks are skipped with a warning.  A chunk that does not start where the previous one ended
        is a warning too: one that goes back (a repeat, or chunks out of order) is skipped, one that leaves a
        gap is still read.  ``strict=True`` (replay) stops instead at the first damaged or discontinuous
        chunk: nothing after a break in the recording can be checked against it."""
        expected: int | None = None
        for i in range(first, len(self.chunk_index)):
            chunk = self._load(i)
            if chunk is None:
                if strict:
                    self._note_break(i, expected if expected is not None else self._expected_at(i))
                    return
                expected = None  # already reported as damaged; what follows may start anywhere
                continue
            if expected is None and i == 0:
                expected = 0
            if expected is not None and chunk.seq0 != expected:
                what = (f"leaves a gap (events {expected}..{chunk.seq0 - 1} are missing)" if chunk.seq0 > expected
                        else f"repeats or goes back to seq {chunk.seq0} (chunks out of order?)")
                self._note_break(i, expected)
                if i not in self._warned:
                    self._warned.add(i)
                    self.warnings.append(f"chunk {i} at offset {chunk.offset} starts at seq {chunk.seq0}, expected "
                                         f"{expected}: it {what}" + ("; reading stopped there" if strict else
                                         "; skipped" if chunk.seq0 < expected else ""))
                if strict:
                    return
                if chunk.seq0 < expected:
                    continue
            expected = chunk.seq0 + chunk.n
            yield chunk

    def _expected_at(self, i: int) -> int:
        if i == 0:
            return 0
        prev = self.chunk_index[i - 1]
        return prev.seq0 + prev.n if prev.seq0 is not None and prev.n is not None else 0

    def _note_break(self, i: int, expected: int) -> None:
        if self.discontinuity is None:
            self.discontinuity = (i, expected)

    def verify(self) -> int:
        """Read every chunk once in strict order; returns the number of events before the first break
        (damage, gap, repeat or reorder), which :attr:`discontinuity` then describes.  Warnings are added to
        :attr:`warnings` as usual."""
        end = 0
        for chunk in self.chunks(strict=True):
            end = chunk.seq0 + chunk.n
        return end

    def chunk(self, i: int) -> Chunk | None:
        """Chunk ``i`` of :attr:`chunk_index` (negative indexes count from the end); None if damaged."""
        if i < 0:
            i += len(self.chunk_index)
        if not 0 <= i < len(self.chunk_index):
            raise IndexError(f"chunk {i} out of range (the trace has {len(self.chunk_index)})")
        return self._load(i)

    def _first_chunk_for(self, seq: int) -> int:
        """Index of the chunk that holds ``seq`` (or the first after it); 0 when unknown."""
        lo, hi = 0, len(self.chunk_index)
        while lo < hi:  # last chunk with seq0 <= seq
            mid = (lo + hi) // 2
            s0 = self._seq0_of(mid)
            if s0 is None:
                return 0
            if s0 <= seq:
                lo = mid + 1
            else:
                hi = mid
        return max(lo - 1, 0)

    # ------------------------------------------------------------------------------------------------
    # events
    # ------------------------------------------------------------------------------------------------

    def events(
        self,
        kinds: Iterable[str] | str | None = None,
        vcpu: int | None = None,
        start: int | None = None,
        stop: int | None = None,
    ) -> Iterator[dict]:
        """All events in seq order, lazily.  Exits are materialised as maps
        ``{"k": "exit", "seq", "cpu", "t", "reason", "rip", "port", "dir", "size", "value"}``.

        ``kinds``: only these kinds (``"exit"`` selects exit rows); ``vcpu``: only this vCPU;
        ``start``/``stop``: only seqs in ``[start, stop)``."""
        if isinstance(kinds, str):
            kinds = frozenset((kinds,))
        elif kinds is not None:
            kinds = frozenset(kinds)
        first = 0 if start is None else self._first_chunk_for(start)
        for chunk in self.chunks(first=first):
            if stop is not None and chunk.seq0 >= stop:
                return
            yield from chunk.iter_events(kinds, vcpu, start, stop)

    def __iter__(self) -> Iterator[dict]:
        return self.events()

    @property
    def n_events(self) -> int | None:
        """Total events according to the footer (None without a footer)."""
        return self.footer.get("events") if self.footer else None

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TraceReader({self.path!r}, chunks={len(self.chunk_index)}, complete={self.complete})"


def open_trace(path: str | os.PathLike) -> TraceReader:
    """Open a trace for reading.  Raises TraceError only when the file is not a trace, has a format version
    this tracevisor cannot read, or its header is unreadable; other damage is reported in ``.warnings``."""
    return TraceReader(path)
