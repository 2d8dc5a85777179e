"""TraceWriter: records a run into a ``.tvt`` file (format: docs/trace-format.md).

Design, because the writer sits on the run loop's hot path:

* :meth:`TraceWriter.exit` packs one fixed 31-byte row into a preallocated ``bytearray`` with a bound
  ``struct.Struct.pack_into`` and bumps two integers: no allocation, no encoding, no I/O.
* Rich events (:meth:`TraceWriter.event`) are kept as Python dicts; they are rare compared to exits.
* When a chunk is full, the caller's thread only copies the row buffer and hands (rows, events) to a
  background thread, which msgpack-encodes, optionally compresses, CRCs and ``os.write``s the frame.  The run
  loop spends most of its time in the ``KVM_RUN`` ioctl with the GIL released, so encoding and I/O overlap
  the guest's execution.
* The header frame is written at open and chunk frames are appended whole (the writer thread writes all
  the chunks waiting for it with one ``writev``), so a recorder killed at any moment leaves a file readable
  up to its last complete chunk.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import stat
import threading
import time
import weakref
from datetime import UTC, datetime
from typing import Any

import msgpack

from tracevisor.errors import TraceError, TracevisorError

from . import schema
from .frames import frame_header, zstd
from .schema import (
    EXIT_ROW,
    EXIT_ROW_SIZE,
    FLAG_ZSTD,
    FORMAT_VERSION,
    FRAME_CHUNK_TYPE,
    FRAME_FOOTER_TYPE,
    FRAME_HEADER_TYPE,
    MAGIC,
    TRAILER,
    TRAILER_MAGIC,
)

_ROW = EXIT_ROW_SIZE
_BIN_TYPES = (bytearray, memoryview)
_BATCH_MAX = 16  # chunks written with one system call, at most
_QUEUE_DEPTH = 64  # chunks waiting for the background thread before exit()/event() block (bounds memory)
_EVENT_OVERHEAD = 32  # estimated encoded bytes of a rich event besides its fields
_FIELD_OVERHEAD = 12  # estimated encoded bytes of a non-binary field
_CHUNK_OVERHEAD = 64  # frame header plus the chunk map's keys and lengths, rounded up


def _write_all(fd: int, parts: list[bytes]) -> None:
    """Write ``parts`` with as few syscalls as possible (one, normally)."""
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done == total:
        return
    rest = memoryview(b"".join(parts))[done:]
    while rest:
        n = os.write(fd, rest)
        rest = rest[n:]


def _count_reasons(column: bytes, counts: dict[int, int]) -> None:
    """Add the byte values of ``column`` (the reason bytes of a chunk's rows) to ``counts``.

    One C-speed pass per distinct reason (chunks usually hold one or two), instead of a per-row loop."""
    while column:
        reason = column[0]
        n = column.count(reason)
        counts[reason] = counts.get(reason, 0) + n
        if n == len(column):
            return
        column = column.translate(None, bytes((reason,)))


def _encode_fallback(obj: Any) -> Any:
    """msgpack ``default`` on the writer thread: an odd value in an event must not lose the whole chunk.

    Integers-like objects (numpy scalars, IntEnum subclasses msgpack refused) become ints, sets become
    lists, anything else its ``repr``.  (With ``validate`` on, such values are refused up front instead.)"""
    if hasattr(obj, "__index__"):
        return obj.__index__()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


def _close_at_exit(ref: weakref.ref[TraceWriter]) -> None:
    writer = ref()
    if writer is not None:
        try:
            writer.close()
        except TracevisorError:
            pass


def partial_name(path: str, pid: int | None = None) -> str:
    """Where a recording to ``path`` is written until it is closed: ``PATH.PID.partial`` (next to it, so the
    final rename stays on one file system)."""
    return f"{path}.{os.getpid() if pid is None else pid}.partial"


def _create(path: str) -> tuple[int, str | None]:
    """Open the file the writer writes: (fd, partial path), or (fd, None) when ``path`` is written directly.

    A trace is written to :func:`partial_name` and renamed to ``path`` when it is closed, so that readers never
    see a trace without its footer under the final name, two recorders to one path cannot mix their frames,
    and a killed recorder leaves a readable ``.partial`` file that says what it is.  An existing ``path`` that
    is not a regular file (``/dev/null``, a FIFO) is written directly: it cannot be replaced by a rename."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise TraceError(f"cannot create trace {path}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise TraceError(f"cannot create trace {path}: it is a directory")
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            return os.open(path, flags | os.O_TRUNC), None
        except OSError as e:
            raise TraceError(f"cannot create trace {path}: {e.strerror}") from None
    base = partial_name(path)
    for n in range(1000):
        tmp = base if n == 0 else f"{base[:-len('.partial')]}-{n}.partial"
        try:
            return os.open(tmp, flags | os.O_EXCL, 0o644), tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise TraceError(f"cannot create trace {path}: {e.strerror}") from None
    raise TraceError(f"cannot create trace {path}: too many {base} files exist")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _utc_iso(ns: int) -> str:
    dt = datetime.fromtimestamp(ns / 1e9, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z"


class TraceWriter:
    """Writes one trace file.  Use as a context manager or call :meth:`close`.

    ``header`` is the recorder's header map (docs/trace-format.md lists the fields); the writer adds
    ``format`` and fills ``tracevisor``, ``created``, ``created_ns`` and ``compression``.  ``compress`` is
    None or ``"zstd"``.  A chunk is cut after ``chunk_events`` events, or when its exit rows plus the
    estimated size of its rich events reach ``chunk_bytes``.  ``max_bytes`` bounds the header and chunk
    frames: once the next chunk would pass it, :attr:`full` becomes True and later events are dropped (except
    ``stop`` events, which are always stored).  ``threadsafe=True`` serialises :meth:`exit`/:meth:`event`
    with a lock (several vCPU threads).  ``validate`` checks every event against :mod:`schema` (slow; for
    tests and debugging; defaults to the environment variable ``TRACEVISOR_VALIDATE=1``).

    Field values handed to :meth:`event` are encoded later by the background thread: ``bytearray`` and
    ``memoryview`` values are copied at once, other mutable values (dicts, lists) must not be changed
    afterwards.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        header: dict,
        *,
        compress: str | None = None,
        chunk_events: int = 4096,
        chunk_bytes: int = 64 * 1024,
        max_bytes: int | None = None,
        threadsafe: bool = False,
        validate: bool | None = None,
    ) -> None:
        if compress not in (None, "zstd"):
            raise TracevisorError(f"unknown trace compression {compress!r} (use zstd or none)")
        if chunk_events < 1 or chunk_bytes < _ROW:
            raise TracevisorError(f"trace chunks need chunk_events >= 1 and chunk_bytes >= {_ROW}")
        if validate is None:
            validate = os.environ.get("TRACEVISOR_VALIDATE") == "1"
        self.path = os.fspath(path)
        self._cctx = zstd().ZstdCompressor(level=3, write_content_size=True) if compress == "zstd" else None
        self.compress = compress
        self.chunk_events = chunk_events
        self.chunk_bytes = chunk_bytes
        self.max_bytes = max_bytes
        self._validate = validate

        hdr = {"format": list(FORMAT_VERSION)}
        hdr.update(header)
        hdr["format"] = list(FORMAT_VERSION)
        created_ns = time.time_ns()
        if "tracevisor" not in hdr:
            from tracevisor import __version__

            hdr["tracevisor"] = __version__
        hdr.setdefault("created_ns", created_ns)
        hdr.setdefault("created", _utc_iso(hdr["created_ns"] if isinstance(hdr["created_ns"], int) else created_ns))
        hdr["compression"] = compress
        if validate:
            try:
                schema.validate_header(hdr)
            except ValueError as e:
                raise TracevisorError(f"invalid trace header: {e}") from None
        try:
            hdr_payload = msgpack.packb(hdr, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise TracevisorError(f"trace header cannot be encoded: {e}") from None
        self.header = hdr

        self._fd, self.partial_path = _create(self.path)
        try:
            _write_all(self._fd, [MAGIC, frame_header(FRAME_HEADER_TYPE, 0, hdr_payload), hdr_payload])
        except OSError as e:
            os.close(self._fd)
            if self.partial_path is not None:
                _unlink_quietly(self.partial_path)
            raise TraceError(f"cannot write trace {self.path}: {e.strerror}") from None
        self.t0_ns = time.monotonic_ns()

        # --- caller-side state (hot path) -------------------------------------------------------------
        # With max_bytes, the caller cuts chunks so that their estimated frames fit what is left of the
        # limit: the limit is kept to within an estimate, not to within a whole chunk.
        self._budget = None if max_bytes is None else max_bytes - (len(MAGIC) + schema.FRAME_HEADER_SIZE
                                                                   + len(hdr_payload))
        self._spent = False  # the caller's estimate says the limit is reached
        self._cap = chunk_bytes  # byte capacity of the chunk being filled (rows + estimated events)
        self._limit_rows = min(chunk_events, -(-chunk_bytes // _ROW))
        self._buf = bytearray((self._limit_rows + 1) * _ROW)
        self._mv = memoryview(self._buf)
        self._pack_into = EXIT_ROW.pack_into
        self._off = 0  # byte offset of the next exit row
        self._seq = 0  # next seq
        self._seq0 = 0  # seq of the chunk being filled
        self._events: list[dict] = []
        self._ev_bytes = 0  # estimated encoded size of self._events
        self._lim = self._full_limit()  # flush once self._off reaches this
        self._n_exits = 0  # exits handed to the background thread (incl. dropped ones)
        self._dropped_caller = 0
        self._last_stop: dict | None = None
        self._closed = False
        self._summary: dict | None = None
        #: The guest state at the stop for the footer (``{"mem": hash, "regs": [digest, ...]}``); the recorder
        #: sets it before :meth:`close`.
        self.final: dict | None = None

        # --- background writer state ------------------------------------------------------------------
        self._full = False
        self._error: BaseException | None = None
        self._file_off = len(MAGIC) + schema.FRAME_HEADER_SIZE + len(hdr_payload)
        self._w_next_seq = 0  # seq0 of the next chunk written to the file
        self._w_events = 0
        self._w_exits = 0
        self._w_dropped = 0
        self._w_by_reason: dict[int, int] = {}
        self._w_chunks: list[list[int]] = []
        self._parts: list[bytes] = []  # encoded frames of the batch being written
        self._queue: queue.Queue = queue.Queue(maxsize=_QUEUE_DEPTH)
        self._packer = msgpack.Packer(use_bin_type=True, default=_encode_fallback)
        self._shut = False  # set once close() has taken the last chunk
        self._thread = threading.Thread(target=self._background, name="tracevisor-trace-writer", daemon=True)
        self._thread.start()
        # A writer that is never closed still gets its footer at normal interpreter exit.
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

        # --- method selection (no per-call flag tests) --------------------------------------------------
        self._lock = threading.Lock() if threadsafe else None
        if self._lock is not None:
            self._acquire = self._lock.acquire
            self._release = self._lock.release
        if validate:
            self.exit = self._exit_validated
            self.event = self._event_validated
        elif threadsafe:
            self.exit = self._exit_locked
            self.event = self._event_locked

    # ------------------------------------------------------------------------------------------------
    # hot path
    # ------------------------------------------------------------------------------------------------

    def exit(self, vcpu: int, t_ns: int, reason: int, rip: int, port: int = 0, direction: int = 0,
             size: int = 0, value: int = 0, digest: int = 0) -> int:
        """Record one VM exit; returns its seq.  ``t_ns`` is ns since :attr:`t0_ns` (see :meth:`now`);
        ``digest`` is the register digest (schema.EXIT_ROW)."""
        off = self._off
        self._pack_into(self._buf, off, t_ns, rip, value, port, vcpu, reason, direction, size, digest)
        seq = self._seq
        self._seq = seq + 1
        off += _ROW
        self._off = off
        if off >= self._lim:
            self._flush()
        return seq

    def event(self, kind: str, vcpu: int, t_ns: int, **fields: Any) -> int:
        """Record one rich event of ``kind`` (see schema.KINDS) with its fields; returns its seq."""
        seq = self._seq
        if (self._full or self._spent) and kind != "stop":
            self._seq = seq + 1
            self._dropped_caller += 1
            return seq
        ev = {"k": kind, "seq": seq, "cpu": vcpu, "t": t_ns}
        ev.update(fields)
        if len(ev) != 4 + len(fields):
            raise ValueError(f"{kind} event fields must not be named k, seq, cpu or t")
        # Estimated encoded size: binary fields count in full, anything else as a small constant.
        est = _EVENT_OVERHEAD + _FIELD_OVERHEAD * len(fields)
        buffers = False
        for v in fields.values():
            if type(v) is bytes:
                est += len(v)
            elif type(v) in _BIN_TYPES:
                est += len(v) if type(v) is bytearray else v.nbytes
                buffers = True
        if buffers:  # encoded later, on the writer thread: copy buffers the caller may reuse
            for key, value in fields.items():
                if type(value) in _BIN_TYPES:
                    ev[key] = bytes(value)
        if (est >= self.chunk_bytes or (self._budget is not None and self._off + self._ev_bytes + est > self._cap)) \
                and (self._events or self._off):
            # An event as big as a whole chunk gets a chunk of its own: two huge ones (a 2 GiB WRITE's console
            # event and its hypercall) together could exceed the 4 GiB frame limit.  Under max_bytes, an event
            # that would overflow what is left of the limit goes to a chunk of its own, so that the events
            # before it are stored.
            self._flush()
        events = self._events
        events.append(ev)
        self._seq = seq + 1
        if kind == "stop":
            self._last_stop = ev
        eb = self._ev_bytes + est
        self._ev_bytes = eb
        lim = (self.chunk_events - len(events)) * _ROW
        if self._cap - eb < lim:
            lim = self._cap - eb
        self._lim = lim
        if self._off >= lim:
            self._flush()
        return seq

    def native_window(self) -> tuple[bytearray, int, int] | None:
        """For a native run loop that appends exit rows in place: (the chunk buffer, byte offset of the next
        row, offset at which the chunk is full), or None when rows must go through :meth:`exit` (several
        vCPU threads, validation).  Rows written there count once :meth:`native_commit` is called."""
        if self._lock is not None or self._validate:
            return None
        return self._buf, self._off, self._lim

    def native_commit(self, off: int) -> None:
        """Account for the rows appended in place up to byte offset ``off`` (they take the next seqs), and
        hand the chunk over when it is full, as :meth:`exit` does."""
        n, rest = divmod(off - self._off, _ROW)
        if n < 0 or rest:
            raise ValueError(f"native rows end at {off}, not on a row boundary after {self._off}")
        self._seq += n
        self._off = off
        if off >= self._lim:
            self._flush()

    def now(self) -> int:
        """ns since the trace start (the clock of ``t_ns``)."""
        return time.monotonic_ns() - self.t0_ns

    # variants chosen at init -------------------------------------------------------------------------

    def _exit_locked(self, vcpu, t_ns, reason, rip, port=0, direction=0, size=0, value=0, digest=0):
        self._acquire()  # (acquire/release: cheaper than a with-statement on this path)
        try:
            off = self._off
            self._pack_into(self._buf, off, t_ns, rip, value, port, vcpu, reason, direction, size, digest)
            seq = self._seq
            self._seq = seq + 1
            off += _ROW
            self._off = off
            if off >= self._lim:
                self._flush()
            return seq
        finally:
            self._release()

    def _event_locked(self, kind, vcpu, t_ns, **fields):
        self._acquire()
        try:
            return TraceWriter.event(self, kind, vcpu, t_ns, **fields)
        finally:
            self._release()

    def _exit_validated(self, vcpu, t_ns, reason, rip, port=0, direction=0, size=0, value=0, digest=0):
        schema.validate_exit(vcpu, t_ns, reason, rip, port, direction, size, value, digest)
        if self._lock is not None:
            return self._exit_locked(vcpu, t_ns, reason, rip, port, direction, size, value, digest)
        return TraceWriter.exit(self, vcpu, t_ns, reason, rip, port, direction, size, value, digest)

    def _event_validated(self, kind, vcpu, t_ns, **fields):
        ev = {"k": kind, "seq": 0, "cpu": vcpu, "t": t_ns}
        ev.update(fields)
        if len(ev) != 4 + len(fields):
            raise ValueError(f"{kind} event fields must not be named k, seq, cpu or t")
        schema.validate_event(ev)
        try:
            msgpack.packb(ev, use_bin_type=True)  # fail here, in the caller, not in the background thread
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"{kind} event cannot be encoded: {e}") from None
        if self._lock is not None:
            return self._event_locked(kind, vcpu, t_ns, **fields)
        return TraceWriter.event(self, kind, vcpu, t_ns, **fields)

    # ------------------------------------------------------------------------------------------------
    # chunk hand-off
    # ------------------------------------------------------------------------------------------------

    def _full_limit(self) -> int:
        """Where to cut the next chunk (byte offset in the row buffer); sets :attr:`_cap`."""
        cap = self.chunk_bytes
        if self._budget is not None and not self._spent:
            room = self._budget - _CHUNK_OVERHEAD
            if room < _ROW:  # not even one more exit fits: the limit is reached
                self._spent = True
            else:
                cap = min(cap, room)
        self._cap = cap
        return min(self.chunk_events * _ROW, cap, self._limit_rows * _ROW)

    def _flush(self) -> None:
        """Hand the chunk being filled to the background thread and start a new one."""
        seq0 = self._seq0
        n = self._seq - seq0
        off = self._off
        events = self._events
        ev_bytes = self._ev_bytes
        self._off = 0
        self._seq0 = self._seq
        self._events = []
        self._ev_bytes = 0
        spent = self._spent
        if self._budget is not None and n and not spent:
            self._budget -= _CHUNK_OVERHEAD + off + ev_bytes
        self._lim = self._full_limit()
        if self._error is not None:
            self._raise_error()
        if n == 0:
            return
        if self._shut:  # a vCPU thread still recording after close(): nothing more goes to the file
            self._dropped_caller += n
            return
        self._n_exits += off // _ROW
        if self._full or spent:
            # Everything is dropped except stop events (the background thread renumbers those).
            # (event() already counted the events it refused; they are not in ``events``.)
            stops = [ev for ev in events if ev["k"] == "stop"]
            self._dropped_caller += off // _ROW + len(events) - len(stops)
            if stops:
                self._queue.put((None, len(stops), b"", stops))
            return
        self._queue.put((seq0, n, bytes(self._mv[:off]), events))

    def _raise_error(self) -> None:
        e = self._error
        msg = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        kept = f" (the chunks written so far are in {self.partial_path})" if self.partial_path else ""
        raise TraceError(f"cannot write trace {self.path}: {msg}{kept}")

    # ------------------------------------------------------------------------------------------------
    # background thread
    # ------------------------------------------------------------------------------------------------

    def _background(self) -> None:
        q = self._queue
        while True:
            # Take every chunk that is waiting and write them with one system call: fewer GIL hand-overs
            # when the run loop is busy in Python, the same result otherwise.
            batch = [q.get()]
            while len(batch) < _BATCH_MAX:
                try:
                    batch.append(q.get_nowait())
                except queue.Empty:
                    break
            done = False
            synced: list[threading.Event] = []
            for item in batch:
                if item is None:
                    done = True
                    break
                if isinstance(item, threading.Event):  # drain(): set once what came before is written
                    synced.append(item)
                    continue
                if self._error is None:
                    try:
                        self._write_chunk(*item)
                    except BaseException as e:  # reported to the caller at its next flush or at close()
                        self._error = e
            parts, self._parts = self._parts, []
            if parts and self._error is None:
                try:
                    _write_all(self._fd, parts)
                except BaseException as e:
                    self._error = e
            for ev in synced:
                ev.set()
            if done:
                return

    def _encode(self, seq0: int, n: int, exits: bytes, events: list) -> tuple[int, bytes]:
        payload = self._packer.pack({"seq0": seq0, "n": n, "exits": exits, "events": events})
        flags = 0
        if self._cctx is not None:
            packed = self._cctx.compress(payload)
            if len(packed) < len(payload):
                payload, flags = packed, FLAG_ZSTD
        return flags, payload

    def _write_chunk(self, seq0: int | None, n: int, exits: bytes, events: list) -> None:
        if seq0 is not None and not self._full:
            flags, payload = self._encode(seq0, n, exits, events)
            size = schema.FRAME_HEADER_SIZE + len(payload)
            if self.max_bytes is None or self._file_off + size <= self.max_bytes:
                self._store(seq0, n, flags, payload, exits)
                return
            self._full = True
        # Full: keep only stop events, renumbered to follow the last stored event.
        stops = [ev for ev in events if ev["k"] == "stop"]
        self._w_dropped += n - len(stops)
        if not stops:
            return
        seq0 = self._w_next_seq
        for i, ev in enumerate(stops):
            ev["seq"] = seq0 + i
        flags, payload = self._encode(seq0, len(stops), b"", stops)
        self._store(seq0, len(stops), flags, payload, b"")

    def _store(self, seq0: int, n: int, flags: int, payload: bytes, exits: bytes) -> None:
        self._parts += (frame_header(FRAME_CHUNK_TYPE, flags, payload), payload)
        self._w_chunks.append([self._file_off, seq0, n])
        self._file_off += schema.FRAME_HEADER_SIZE + len(payload)
        n_exits = len(exits) // _ROW
        self._w_events += n
        self._w_exits += n_exits
        self._w_next_seq = seq0 + n
        if n_exits:
            _count_reasons(exits[24::_ROW], self._w_by_reason)

    # ------------------------------------------------------------------------------------------------
    # state and closing
    # ------------------------------------------------------------------------------------------------

    @property
    def full(self) -> bool:
        """True once ``max_bytes`` was reached; the caller should stop the run (close() still works)."""
        return self._full or self._spent

    def drain(self) -> None:
        """Hand over the chunk being filled and wait until the background thread has written (or, past
        ``max_bytes``, dropped) everything recorded so far: afterwards :attr:`full` and ``stats["dropped"]``
        are final for what was recorded up to now (the recorder decides its stop reason from them)."""
        if self._closed or self._shut:
            return
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            self._flush()
            done = threading.Event()
            self._queue.put(done)
        finally:
            if lock is not None:
                lock.release()
        done.wait()
        if self._error is not None:
            self._raise_error()

    @property
    def stats(self) -> dict:
        """Counters so far.  ``events``/``exits`` count what was recorded (including events still buffered and
        ones later dropped); ``by_reason``, ``bytes`` and ``chunks`` count what is already in the file."""
        return {
            "events": self._seq,
            "exits": self._n_exits + self._off // _ROW,
            "by_reason": dict(self._w_by_reason),
            "bytes": self._file_off,
            "chunks": len(self._w_chunks),
            "dropped": self._dropped_caller + self._w_dropped,
        }

    def close(self, stop: dict | None = None) -> dict:
        """Record ``stop`` (the fields of a ``stop`` event: code, reason, report; optional cpu, t) if given,
        flush, write the footer and the trailer, close the file.  Returns the footer's totals plus
        ``dropped`` and the final file size in ``bytes``.  Idempotent."""
        if self._closed:
            return dict(self._summary or {})
        lock = self._lock
        if lock is not None:
            lock.acquire()
        try:
            if self._closed:
                return dict(self._summary or {})
            self._closed = True
            atexit.unregister(self._atexit)
            try:
                if stop is not None:
                    fields = dict(stop)
                    cpu = fields.pop("cpu", None) or 0
                    t = fields.pop("t", None)
                    fields.pop("k", None)
                    fields.pop("seq", None)
                    if self._validate:
                        schema.validate_event({"k": "stop", "seq": 0, "cpu": cpu, "t": t or 0, **fields})
                    TraceWriter.event(self, "stop", cpu, self.now() if t is None else t, **fields)
                self._flush_final()
                summary = self._write_footer()
            finally:
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            self._publish()
            return summary
        finally:
            if lock is not None:
                lock.release()

    def _flush_final(self) -> None:
        try:
            if self._error is None:
                self._flush()
        finally:
            self._shut = True
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            self._raise_error()

    def _publish(self) -> None:
        """Rename the finished partial file to the trace's path (atomic: the path holds either the old
        file or the whole new trace)."""
        if self.partial_path is None:
            return
        try:
            os.replace(self.partial_path, self.path)
        except OSError as e:
            raise TraceError(f"cannot rename the finished trace {self.partial_path} to {self.path}: "
                             f"{e.strerror}") from None
        self.partial_path = None

    def _write_footer(self) -> dict:
        footer = {
            "events": self._w_events,
            "exits": self._w_exits,
            "chunks": self._w_chunks,
            "by_reason": dict(sorted(self._w_by_reason.items())),
            "stop": self._last_stop,
            "wall_ns": time.monotonic_ns() - self.t0_ns,
            "bytes": self._file_off,
            "dropped": self._dropped_caller + self._w_dropped,
            "final": self.final,
        }
        payload = msgpack.packb(footer, use_bin_type=True)
        offset = self._file_off
        try:
            _write_all(
                self._fd,
                [frame_header(FRAME_FOOTER_TYPE, 0, payload), payload, TRAILER.pack(offset, TRAILER_MAGIC)],
            )
        except OSError as e:
            raise TraceError(f"cannot write trace {self.path}: {e.strerror}") from None
        self._file_off = offset + schema.FRAME_HEADER_SIZE + len(payload) + schema.TRAILER_SIZE
        summary = {k: v for k, v in footer.items() if k not in ("chunks",)}
        summary["chunks"] = len(self._w_chunks)
        summary["bytes"] = self._file_off
        self._summary = summary
        return dict(summary)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

