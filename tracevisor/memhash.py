"""Guest memory hashes for replay verdicts: one u64 over all of RAM, kept up to date page by page.

Why not hash RAM each time: 64 MiB of CRC-32 costs ~50 ms.  Instead a table holds the CRC-32 of every
4 KiB page, and the memory hash is a sum over the pages of a mixed (page number, page CRC) value, so
rehashing the pages written since the last hash — found with KVM's dirty-page log, shared with the
checkpoints through :class:`~tracevisor.checkpoint.DirtyTracker`, plus the host's own writes — updates
the sum in O(dirty pages).  The mix (splitmix64's finaliser) makes the sum depend on which page holds
which content, so swapping two pages changes it.

The recorder writes a ``mem`` event (docs/trace-format.md) at boot, after every hypercall and every
``every`` exits of the vCPU, carrying the hash and the (page, CRC) pairs that changed since the previous
``mem`` event; the replay computes the same at the same points and compares.  When they differ, the
changed pairs tell which pages differ, and the copies this module keeps of each page as it was at the
last matching hash show the first bytes the replay changed there.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from collections.abc import Iterable

from .checkpoint import PAGE, DirtyTracker

_M64 = (1 << 64) - 1
_PAIR = struct.Struct("<II")
ZERO_PAGE_CRC = zlib.crc32(bytes(PAGE))


def mix(page: int, crc: int) -> int:
    """splitmix64's finaliser over ``page << 32 | crc``: the term one page adds to the memory hash."""
    z = ((page << 32) | crc) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def pack_pages(pairs: Iterable[tuple[int, int]]) -> bytes:
    """(page, crc) pairs → the ``pages`` field of a ``mem`` event."""
    return b"".join(_PAIR.pack(p, c) for p, c in sorted(pairs))


def unpack_pages(data: bytes) -> list[tuple[int, int]]:
    """The ``pages`` field of a ``mem`` event → (page, crc) pairs (a malformed tail is ignored)."""
    if not isinstance(data, (bytes, bytearray)):
        return []
    return list(_PAIR.iter_unpack(bytes(data[: len(data) - len(data) % _PAIR.size])))


class MemoryHasher:
    """The memory hash of one machine.  :meth:`start` after boot (before any guest instruction), then
    :meth:`update` at each point a hash is wanted; ``keep_copies`` (replay) keeps each page as it was at
    the last :meth:`update` so a later difference can be shown byte by byte."""

    def __init__(self, machine, keep_copies: bool = False) -> None:
        self.machine = machine
        self.memory = machine.memory
        self.npages = self.memory.size // PAGE
        self.tracker: DirtyTracker = DirtyTracker.of(machine)
        self.consumer = self.tracker.subscribe()
        self.crcs = array("I", [ZERO_PAGE_CRC]) * self.npages
        zero_term = [mix(p, ZERO_PAGE_CRC) for p in range(self.npages)]
        self.total = sum(zero_term) & _M64
        self.keep_copies = keep_copies
        self.copies: dict[int, bytes] = {}
        self._prev: dict[int, bytes | None] = {}  # pages' copies before the latest update
        self.hashes = 0  # number of updates (for the benchmark)
        self.pages_hashed = 0

    def _rehash(self, pages: Iterable[int]) -> list[tuple[int, int]]:
        mv = self.memory._mv  # the one read-only scan of RAM outside GuestMemory's accessors, for speed
        crcs = self.crcs
        total = self.total
        changed = []
        keep = self.keep_copies
        copies = self.copies
        prev: dict[int, bytes | None] = {}
        crc32 = zlib.crc32
        n = 0
        for p in pages:
            n += 1
            data = mv[p << 12:(p + 1) << 12]
            c = crc32(data)
            old = crcs[p]
            if keep:
                prev[p] = copies.get(p)
                copies[p] = bytes(data)
            if c != old:
                total = (total - mix(p, old) + mix(p, c)) & _M64
                crcs[p] = c
                changed.append((p, c))
        self.total = total
        self.pages_hashed += n
        self._prev = prev
        return changed

    def start(self) -> tuple[int, list[tuple[int, int]]]:
        """Hash all of RAM once (boot): the hash and the pages that are not all zeros."""
        self.tracker.take(self.consumer)  # everything before now is covered by the full scan
        changed = self._rehash(range(self.npages))
        if self.keep_copies:  # zero pages need no copy: a missing copy means "all zeros"
            self.copies = {p: d for p, d in self.copies.items() if self.crcs[p] != ZERO_PAGE_CRC}
            self._prev = {}
        self.hashes += 1
        return self.total, changed

    def update(self) -> tuple[int, list[tuple[int, int]]]:
        """The memory hash now, and the (page, crc) pairs that changed since the last update."""
        dirty = self.tracker.take(self.consumer)
        self.hashes += 1
        changed = self._rehash(sorted(dirty))
        return self.total, changed

    def resync(self, pages: Iterable[int]) -> None:
        """Pages rewritten behind the dirty log's back (a checkpoint restore): rehash them now."""
        self._rehash(sorted(set(pages)))

    def differing(self, recorded: dict[int, int], limit: int = 8) -> list[dict]:
        """Pages whose CRC differs from ``recorded`` (page → crc; absent = all zeros), each with the byte
        runs the replay changed there since the last matching hash (``changed``, at most 4).  The recording
        holds only CRCs, so the bytes that differ are among
        those runs or among bytes the recording changed and the replay did not."""
        out = []
        crcs = self.crcs
        for p in range(self.npages):
            want = recorded.get(p, ZERO_PAGE_CRC)
            if crcs[p] == want:
                continue
            entry: dict = {"page": p, "gpa": p << 12, "recorded_crc": want, "replay_crc": crcs[p]}
            if self.keep_copies:
                before = self._prev[p] if p in self._prev else self.copies.get(p)
                runs = changed_runs(before if before is not None else bytes(PAGE), self.memory.page(p), p << 12)
                if runs:
                    entry["changed"] = runs
            out.append(entry)
            if len(out) >= limit:
                break
        return out


def changed_runs(before: bytes, now: bytes, base: int, limit: int = 4) -> list[dict]:
    """Runs of bytes that differ between two copies of a page: {gpa, before, replay} (hex, ≤ 16 bytes
    each), at most ``limit`` runs."""
    runs: list[dict] = []
    n = min(len(before), len(now))
    i = 0
    while i < n and len(runs) < limit:
        if before[i] == now[i]:
            i += 1
            continue
        j = i
        while j < n and j - i < 16 and before[j] != now[j]:
            j += 1
        runs.append({"gpa": base + i, "before": before[i:j].hex(), "replay": now[i:j].hex()})
        i = j
    return runs


#: Exits of a vCPU between two periodic memory hashes (recorded in the header as ``memhash.every``).
DEFAULT_EVERY = 1000


def attach(machine, every: int = DEFAULT_EVERY, hypercalls: bool = True, keep_copies: bool = False) -> MemoryHasher:
    """Hash guest memory at boot, after every hypercall (``hypercalls``) and every ``every`` exits of the
    vCPU, writing a ``mem`` event to the machine's trace sink each time (the recorder's writer, or the
    replay's checker, which compares).  Single-vCPU machines only: with several vCPUs running, no point
    between two exits of one vCPU is a consistent state of memory."""
    if machine.config.cpus != 1:
        raise ValueError("memory hashes between exits need a single vCPU")
    hasher = MemoryHasher(machine, keep_copies)

    def check(v, at: str) -> None:
        if at == "boot":  # the boot image follows from the kernel and the header: its pages need no listing
            machine.sink.event("mem", v.cpu, machine.clock.now(), hash=hasher.start()[0], at=at)
            return
        h, pages = hasher.update()
        machine.sink.event("mem", v.cpu, machine.clock.now(), hash=h, at=at, pages=pack_pages(pages))

    machine.mem_check = check
    machine.mem_every = every
    machine.mem_at_hypercalls = hypercalls
    return hasher
