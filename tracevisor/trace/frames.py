"""Frame encoding shared by the writer and the reader (layout defined in :mod:`tracevisor.trace.schema`)."""

from __future__ import annotations

import zlib

from tracevisor.errors import TraceError

from .schema import FLAG_ZSTD, FRAME_HEADER, MAX_PAYLOAD

_zstd_module = None


def zstd():
    """The ``zstandard`` module, or a TraceError saying how to install it."""
    global _zstd_module
    if _zstd_module is None:
        try:
            import zstandard
        except ImportError:
            raise TraceError(
                "zstd trace compression needs the zstandard package: pip install 'tracevisor[zstd]'"
            ) from None
        _zstd_module = zstandard
    return _zstd_module


def zstd_available() -> bool:
    try:
        zstd()
    except TraceError:
        return False
    return True


def frame_header(ftype: int, flags: int, payload: bytes) -> bytes:
    """The 12-byte header of a frame holding ``payload`` (as stored)."""
    if len(payload) > MAX_PAYLOAD:
        raise TraceError(f"trace frame payload of {len(payload)} bytes exceeds the 4 GiB frame limit")
    return FRAME_HEADER.pack(ftype, flags, 0, len(payload), zlib.crc32(payload))


def decompress(payload: bytes, flags: int) -> bytes:
    """Undo the payload's compression according to ``flags``; raises ValueError on bad data."""
    if not flags & FLAG_ZSTD:
        return payload
    z = zstd()
    size = z.frame_content_size(payload)
    if size < 0 or size > MAX_PAYLOAD:
        raise ValueError("zstd frame has no valid content size")
    return z.ZstdDecompressor().decompress(payload)
