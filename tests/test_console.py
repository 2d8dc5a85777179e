"""The guest console writes to the host's stdout/stderr — also when they are Python streams without a file
descriptor (a notebook kernel's), and never fails the VM when they go away."""

from __future__ import annotations

import io
import os
import sys

from tracevisor.hostio import Console


class NoFileno(io.StringIO):
    def fileno(self):
        raise io.UnsupportedOperation("fileno")


def test_console_falls_back_to_the_stream_when_it_has_no_fd(monkeypatch):
    out, err = NoFileno(), NoFileno()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    c = Console()
    c.write("uart", b"par")
    assert out.getvalue() == ""  # line-buffered
    c.write("stdout", b"tial\n")
    assert out.getvalue() == "partial\n"
    c.write("stdout", b"second \xff")
    assert out.getvalue() == "partial\n"
    c.write("stderr", b"oops\n")  # stderr flushes stdout first, as a terminal would show it
    assert out.getvalue() == "partial\nsecond \ufffd" and err.getvalue() == "oops\n"


def test_console_writes_to_explicit_fds_and_survives_a_closed_pipe():
    r, w = os.pipe()
    c = Console(out_fd=w, err_fd=w)
    c.write("stdout", b"line one\n")
    assert os.read(r, 100) == b"line one\n"
    os.close(r)
    c.write("stdout", b"nobody reads this\n")  # EPIPE: dropped, no exception
    os.close(w)


def test_quiet_console_writes_nothing(monkeypatch):
    out = NoFileno()
    monkeypatch.setattr(sys, "stdout", out)
    c = Console(quiet=True)
    c.write("stdout", b"hidden\n")
    c.flush()
    assert out.getvalue() == ""
