"""Trace files (``.tvt``): the versioned record of a run.

* :class:`TraceWriter` records exits (fixed 27-byte rows) and rich events (msgpack maps) in CRC-checked
  chunks, encoding and writing on a background thread;
* :func:`open_trace` returns a :class:`TraceReader` that iterates chunks or events lazily and survives a
  torn or corrupted file;
* :mod:`tracevisor.trace.schema` is the one definition of the format; docs/trace-format.md specifies it.
"""

from .reader import Chunk, ChunkRef, TraceReader, open_trace
from .schema import EXIT_DTYPE_FIELDS, EXIT_FIELDS, FORMAT_VERSION, MAGIC, reason_name
from .writer import TraceWriter

__all__ = [
    "Chunk",
    "ChunkRef",
    "EXIT_DTYPE_FIELDS",
    "EXIT_FIELDS",
    "FORMAT_VERSION",
    "MAGIC",
    "TraceReader",
    "TraceWriter",
    "open_trace",
    "reason_name",
]
