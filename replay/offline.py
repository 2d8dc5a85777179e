"""The offline walk: iterate a trace's events with derived state, no KVM needed.

    w = replay.open("run.tvt")
    for ev in w.events(kinds=["hypercall"]):
        print(ev["seq"], ev["call"], w.files)     # the open-file table at this point
    w.console_text, w.bytes_read, w.bytes_written
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from tracevisor.trace import open_trace

SEEK_SET, SEEK_CUR, SEEK_END = 0, 1, 2


@dataclass
class OpenFile:
    fd: int
    path: str
    flags: int
    offset: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    opened_seq: int = -1


@dataclass
class FileStats:
    path: str
    opens: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    unlinked: bool = False


class TraceWalk:
    """Events of a trace in order, with the guest's file table and console rebuilt as they pass."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.reader = open_trace(self.path)
        self.header = self.reader.header
        self.warnings = self.reader.warnings
        self.reset()

    def reset(self) -> None:
        self.files: dict[int, OpenFile] = {}
        self.file_stats: dict[str, FileStats] = {}
        self.console = {"uart": bytearray(), "stdout": bytearray(), "stderr": bytearray()}
        self._console_all = bytearray()
        self.position = -1
        self.exits = 0

    # -- derived state -----------------------------------------------------------------------------
    @property
    def console_text(self) -> str:
        """Everything the guest printed so far (UART and stdout/stderr, in order)."""
        return self._console_all.decode("utf-8", "replace")

    @property
    def bytes_read(self) -> dict[str, int]:
        return {p: s.bytes_read for p, s in self.file_stats.items()}

    @property
    def bytes_written(self) -> dict[str, int]:
        return {p: s.bytes_written for p, s in self.file_stats.items()}

    def _stats(self, path: str) -> FileStats:
        st = self.file_stats.get(path)
        if st is None:
            st = self.file_stats[path] = FileStats(path)
        return st

    def _apply(self, ev: dict) -> None:
        """Update the derived state with one event.  Events are data from a file: fields of the wrong type
        (a damaged or crafted trace) leave the state unchanged instead of raising."""
        kind = ev.get("k")
        seq = ev.get("seq")
        if type(seq) is int:
            self.position = seq
        if kind == "exit":
            self.exits += 1
        elif kind == "console":
            data, stream = ev.get("data"), ev.get("stream", "stdout")
            if isinstance(data, (bytes, bytearray)) and isinstance(stream, str):
                self.console.setdefault(stream, bytearray()).extend(data)
                self._console_all.extend(data)
        elif kind == "hostio":
            self._hostio(ev)

    def _hostio(self, ev: dict) -> None:
        op, args, ret = ev.get("op"), ev.get("args"), ev.get("ret")
        if type(ret) is not int or not isinstance(op, str) or not isinstance(args, (list, tuple)) or not args:
            return
        first = args[0]
        if op in ("open", "unlink"):
            if not isinstance(first, (bytes, bytearray)):
                return
            path = bytes(first).decode("utf-8", "backslashreplace")
            if op == "open" and ret >= 0:
                flags = args[1] if len(args) > 1 and type(args[1]) is int else 0
                seq = ev.get("seq")
                self.files[ret] = OpenFile(ret, path, flags, opened_seq=seq if type(seq) is int else -1)
                self._stats(path).opens += 1
            elif op == "unlink" and ret == 0:
                self._stats(path).unlinked = True
            return
        if type(first) is not int:
            return
        if op == "close" and ret == 0:
            self.files.pop(first, None)
        elif op in ("read", "write") and ret > 0:
            f = self.files.get(first)
            if f is not None:
                counter = "bytes_read" if op == "read" else "bytes_written"
                f.offset += ret
                setattr(f, counter, getattr(f, counter) + ret)
                st = self._stats(f.path)
                setattr(st, counter, getattr(st, counter) + ret)
        elif op == "lseek" and ret >= 0:
            f = self.files.get(first)
            if f is not None:
                f.offset = ret

    # -- iteration ---------------------------------------------------------------------------------
    def events(self, kinds: Iterable[str] | None = None, cpu: int | None = None, start: int | None = None,
               stop: int | None = None) -> Iterator[dict]:
        """Events in seq order (filtered by kind, vCPU and seq range [start, stop)); the derived state
        always reflects every event up to the one just yielded, filtered or not."""
        self.reset()
        want = set(kinds) if kinds else None
        for ev in self.reader.events():
            seq = ev.get("seq", -1)
            if stop is not None and seq >= stop:
                break
            self._apply(ev)
            if start is not None and seq < start:
                continue
            if want is not None and ev.get("k") not in want:
                continue
            if cpu is not None and ev.get("cpu") != cpu:
                continue
            yield ev

    def __iter__(self) -> Iterator[dict]:
        return self.events()

    def run_to_end(self) -> TraceWalk:
        for _ in self.events():
            pass
        return self

    def close(self) -> None:
        self.reader.close()

    def __enter__(self) -> TraceWalk:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: str | os.PathLike) -> TraceWalk:  # noqa: A001 - the public name of the offline API
    return TraceWalk(path)
