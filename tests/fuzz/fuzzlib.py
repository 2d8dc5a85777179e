"""Shared machinery of the fuzz tests: input generators and the invariants they check.

Two targets, each a function of a *chooser* (the source of every random decision), so that the same
generator runs under hypothesis (``HypothesisChooser``: shrinking, a fixed seed in CI) and in the plain
loop harness ``loop.py`` (``RandomChooser``: ~10-20 k inputs/s per core, for million-input runs):

* :class:`DispatchWorld` — ``hypercalls.dispatch`` with random ports and argument blocks against a real
  :class:`GuestMemory` (identity page tables written by ``write_boot_structures``) and a sandboxed
  :class:`LiveHostIO` over a temporary mount, optionally recorded through :class:`RecordingHostIO`.
  Only :class:`GuestError` may escape; every host fd the sandbox opened must lie inside the mount;
  nothing outside the mount may change.
* :class:`QueueWorld` — the legacy split virtqueue parser (``devices/virtqueue.py``) over rings full of
  hostile descriptors: only GuestError may escape; every chain it hands out lies inside RAM.
* :func:`trace_case` — a damaged trace file: bit flips, truncation at or near every frame boundary,
  garbage after the magic or the header, frames with valid CRCs around malformed msgpack, shuffled
  frames.  ``open_trace`` may raise only :class:`TraceError`; reading a trace that opened must not raise.
"""

from __future__ import annotations

import hashlib
import os
import random
import stat
import struct
import zlib

import msgpack

from tracevisor import arch_x86_64 as arch
from tracevisor import hypercalls as H
from tracevisor.errors import GuestError, TraceError
from tracevisor.hostio import Console, LiveHostIO, RecordingHostIO
from tracevisor.memory import GuestMemory
from tracevisor.sandbox import Sandbox, parse_mount
from tracevisor.trace import TraceWriter, open_trace
from tracevisor.trace import schema as S

MIB = 1 << 20
RAM = 16 * MIB  # the smallest RAM tracevisor allows: most ranges are "beyond RAM" quickly
STR_AREA = 0x20_0000  # guest-physical scratch areas the generator fills
ARRAY_AREA = 0x30_0000
PT_AREA = 0x40_0000


# ----------------------------------------------------------------------------------------------------
# choosers
# ----------------------------------------------------------------------------------------------------

class RandomChooser:
    """Decisions from a seeded ``random.Random`` (the loop harness)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def bytes(self, lo: int, hi: int) -> bytes:
        return self.rng.randbytes(self.rng.randint(lo, hi))

    def bool(self) -> bool:
        return self.rng.random() < 0.5


class HypothesisChooser:
    """Decisions drawn from hypothesis' ``st.data()`` (shrinkable)."""

    def __init__(self, data) -> None:
        from hypothesis import strategies as st

        self._st = st
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self._st.integers(lo, hi))

    def choice(self, seq):
        return self.data.draw(self._st.sampled_from(seq))

    def bytes(self, lo: int, hi: int) -> bytes:
        return self.data.draw(self._st.binary(min_size=lo, max_size=hi))

    def bool(self) -> bool:
        return self.data.draw(self._st.booleans())


# ----------------------------------------------------------------------------------------------------
# host-side world for dispatch
# ----------------------------------------------------------------------------------------------------

def snapshot(root: str, skip: tuple[str, ...]) -> dict:
    """Every path under ``root`` except the ``skip`` subtrees: type, size, mtime, content hash, link."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        dirnames[:] = [d for d in dirnames if os.path.normpath(os.path.join(rel, d)) not in skip]
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            entry = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
            if stat.S_ISLNK(st.st_mode):
                entry += (os.readlink(p),)
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    entry += (hashlib.sha256(f.read()).hexdigest(),)
            out[os.path.normpath(os.path.join(rel, name))] = entry
    return out


def plant_tree(root: str) -> tuple[str, str]:
    """A mount with escape hatches planted in it, and canaries outside.  Returns (mount, ro mount)."""
    mnt = os.path.join(root, "mnt")
    ro = os.path.join(root, "ro")
    out = os.path.join(root, "outside")
    for d in (mnt, ro, out, os.path.join(mnt, "sub")):
        os.makedirs(d, exist_ok=True)
    for path, text in ((os.path.join(out, "canary"), "outside canary\n"),
                       (os.path.join(root, "canary"), "root canary\n"),
                       (os.path.join(ro, "ro.txt"), "read-only\n")):
        with open(path, "w") as f:
            f.write(text)
    refresh_mount(root)
    return mnt, ro


def refresh_mount(root: str) -> None:
    """(Re)create what a fuzz input may have removed or replaced inside the mount."""
    mnt = os.path.join(root, "mnt")
    os.makedirs(os.path.join(mnt, "sub"), exist_ok=True)
    links = {"link-out": "../outside/canary", "abs-link": os.path.join(root, "outside", "canary"),
             "dirlink": "../outside", "up2": "..", "sub/uplink": "../..", "link-in": "file.txt"}
    for name, target in links.items():
        p = os.path.join(mnt, name)
        if not os.path.islink(p):
            if os.path.lexists(p):
                _remove(p)
            os.symlink(target, p)
    p = os.path.join(mnt, "fifo")
    if not os.path.lexists(p):
        os.mkfifo(p)
    for name, text in (("file.txt", "0123456789abcdef\n"), ("sub/deep.txt", "deep\n")):
        p = os.path.join(mnt, name)
        if not os.path.isfile(p) or os.path.islink(p):
            if os.path.lexists(p):
                _remove(p)
            with open(p, "w") as f:
                f.write(text)


def _remove(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        for dirpath, dirnames, filenames in os.walk(p, topdown=False):
            for n in filenames:
                os.unlink(os.path.join(dirpath, n))
            for n in dirnames:
                q = os.path.join(dirpath, n)
                os.unlink(q) if os.path.islink(q) else os.rmdir(q)
        os.rmdir(p)
    else:
        os.unlink(p)


PATHS = [
    b"file.txt", b"sub/deep.txt", b"new.txt", b"sub/new.txt", b"link-in", b"/file.txt", b"./file.txt",
    b"sub/../file.txt", b"sub", b".", b"/", b"", b"fifo", b"ro/ro.txt", b"ro/new.txt", b"ro",
    b"../canary", b"../outside/canary", b"/../canary", b"../../etc/passwd", b"..", b"sub/../../canary",
    b"link-out", b"abs-link", b"dirlink", b"dirlink/canary", b"dirlink/new.txt", b"up2/canary",
    b"up2/outside/canary", b"sub/uplink/canary", b"/proc/self/root/etc/passwd", b"/dev/zero",
    b"/proc/self/fd/0", b"\xff\xfe", b"a\xc3(b", b"x" * 300, b"y/" * 100, b"//..//..//canary",
]

GOOD_PATHS = [b"file.txt", b"sub/deep.txt", b"new.txt", b"sub/new.txt", b"ro/ro.txt", b"link-in", b"/file.txt"]

OPEN_FLAGS = [0, os.O_WRONLY, os.O_RDWR, os.O_CREAT | os.O_WRONLY, os.O_CREAT | os.O_EXCL | os.O_RDWR,
              os.O_TRUNC | os.O_WRONLY, os.O_APPEND | os.O_WRONLY, os.O_CREAT | os.O_TRUNC | os.O_RDWR,
              os.O_DIRECTORY, os.O_PATH, os.O_TMPFILE | os.O_RDWR, os.O_NOFOLLOW, os.O_SYNC | os.O_RDWR,
              -1, 0x7FFFFFFF, -0x80000000]

I32 = [0, 1, 2, 3, 4, 5, 6, 7, 8, 77, 511, 512, 513, -1, -2, 0x7FFFFFFF, -0x80000000]
I64 = [0, 1, -1, 4096, (1 << 63) - 1, -(1 << 63), 1 << 40, -(1 << 40), RAM]


def _u64_values(ram: int) -> list[int]:
    return [0, 1, 8, 0x1000, 0x9000, 0x10000, 0x10FF8, 0x12000, STR_AREA, ARRAY_AREA, PT_AREA, ram - 1,
            ram - 2, ram - 8, ram - 16, ram - 4096, ram, ram + 1, ram + 4096, 0x2000_0000, 1 << 30,
            (1 << 30) + 8, 1 << 32, 1 << 47, (1 << 47) - 1, 0xFFFF_8000_0000_0000, 0xFFFF_FFFF_FFFF_F000,
            0xFFFF_FFFF_FFFF_FFF8, (1 << 64) - 1, 1 << 63]


def _lengths(ram: int) -> list[int]:
    return [0, 1, 2, 7, 16, 4095, 4096, 4097, 1 << 21, ram - 1, ram, ram + 1, 1 << 40, 1 << 63,
            (1 << 64) - 1, (1 << 64) - 16]


def _pick_u64(ch, ram: int) -> int:
    k = ch.int(0, 9)
    if k < 6:
        return ch.choice(_u64_values(ram))
    if k < 8:
        return (ch.choice(_u64_values(ram)) + ch.int(-64, 64)) % (1 << 64)
    return ch.int(0, (1 << 64) - 1)


def _pick_len(ch, ram: int) -> int:
    return ch.choice(_lengths(ram)) if ch.int(0, 3) else ch.int(0, 1 << 16)


def _pick_i32(ch, extra=()) -> int:
    k = ch.int(0, 5)
    if k < 4:
        return ch.choice(I32 + list(extra))
    return ch.int(-(1 << 31), (1 << 31) - 1)


class DispatchWorld:
    """Guest memory + sandboxed host I/O over a temporary mount under ``root``."""

    def __init__(self, root: str, *, record: bool = False, ram: int = RAM, max_files: int = 64) -> None:
        self.root = root
        self.ram = ram
        self.mnt, self.ro = plant_tree(root)
        self.real_mounts = [os.path.realpath(self.mnt) + os.sep, os.path.realpath(self.ro) + os.sep]
        self.mem = GuestMemory(ram)
        arch.write_boot_structures(self.mem)
        sandbox = Sandbox([parse_mount(self.mnt), parse_mount(f"{self.ro}:/ro:ro")])
        self.live = LiveHostIO(sandbox, [b"/k/hostile", b"arg1", b"x" * 200], [b"A=1", b"HOME=/nowhere"],
                               Console(quiet=True), max_files=max_files)
        self.writer = None
        self.trace_path = os.path.join(root, "traces", "fuzz.tvt")
        if record:
            os.makedirs(os.path.dirname(self.trace_path), exist_ok=True)
            self.writer = TraceWriter(self.trace_path, {"argv": ["fuzz"]}, chunk_events=64)
            self.hostio = RecordingHostIO(self.live, self.writer, lambda: 0)
        else:
            self.hostio = self.live
        self.base_fds = _fd_count()
        self.outside = snapshot(root, skip=("mnt", "traces"))
        self.calls = 0
        self.guest_errors = 0

    # -- one input ---------------------------------------------------------------------------------
    def case(self, ch) -> None:
        """Build one hostile request from ``ch`` and dispatch it; raise AssertionError on a violation."""
        mem, ram = self.mem, self.ram
        arch.write_boot_structures(mem)  # undo page-table damage of the previous input
        ports = sorted(H.TABLE)
        port = ch.choice(ports) if ch.int(0, 15) else ch.int(0, 0xFFFF)
        hc = H.TABLE.get(port)
        # a path in the string area, sometimes without its NUL, sometimes with RAM's end full of text
        k = ch.int(0, 15)
        path = (ch.choice(GOOD_PATHS) if k < 8 else ch.choice(PATHS) if k < 15
                else ch.bytes(0, 64).replace(b"\0", b""))
        if path.startswith(b"x" * 10) and ch.int(0, 3) == 0:
            path = b"x" * ch.int(4090, 5000)  # around the 4096-byte name limit
        mem.write(STR_AREA, path + (b"\0" if ch.int(0, 9) else b"A" * 64))
        if ch.int(0, 7) == 0:
            mem.fill(ram - 8192, 8192, ord("Z"))
        else:
            mem.fill(ram - 8192, 8192, 0)
        # pointer arrays for CMDVAL
        arr = bytearray()
        for _ in range(ch.int(0, 8)):
            p = ch.choice([STR_AREA + 0x1000, STR_AREA + 0x2000, ram - 4, ram - 1, ram, ARRAY_AREA,
                           0x10000, 0x9000, _pick_u64(ch, ram)])
            arr += struct.pack("<Q", p)
        mem.write(ARRAY_AREA, bytes(arr) + bytes(8))
        # page-table damage for the virtual buffers
        cr3 = arch.PML4_ADDR
        k = ch.int(0, 9)
        if k == 0:
            cr3 = ch.choice([0, PT_AREA, ram, ram - 4096, 1 << 40, (1 << 64) - 4096])
            mem.write(PT_AREA, ch.bytes(0, 64))
        elif k == 1:
            slot = ch.int(0, 511)
            table = ch.choice([arch.PML4_ADDR, arch.PDPT_ADDR, arch.PD_ADDR])
            mem.write_u64(table + 8 * slot, _pick_u64(ch, ram))
        paging = ch.int(0, 9) != 0
        # the block
        if hc is not None and hc.layout is not None:
            size = hc.layout.size
            block = bytearray(ch.bytes(size, size) if ch.int(0, 5) == 0 else bytes(size))
            for name, off, fmt in hc.layout.fields:
                sane = ch.int(0, 2) != 0  # two thirds of the fields hold plausible values
                if name == "name":
                    v = (STR_AREA if ch.int(0, 4) else ch.choice([STR_AREA + 1, ARRAY_AREA])) if sane \
                        else _pick_u64(ch, ram)
                elif name in ("argv", "envp"):
                    v = (ARRAY_AREA if ch.int(0, 4) else ch.choice([STR_AREA, 0])) if sane else _pick_u64(ch, ram)
                elif name == "buf":
                    v = ch.choice([0x5_0000 + ch.int(0, 0x10000), STR_AREA, 0x40_1000]) if sane \
                        else _pick_u64(ch, ram)
                elif name == "len":
                    v = ch.int(0, 8192) if sane else _pick_len(ch, ram)
                elif name == "flags":
                    v = ch.choice(OPEN_FLAGS[:8] if sane else OPEN_FLAGS)
                elif name == "whence":
                    v = ch.int(0, 2) if sane else _pick_i32(ch)
                elif name == "offset":
                    v = ch.int(-16, 64) if sane else ch.choice(I64) if ch.bool() else ch.int(-(1 << 63), (1 << 63) - 1)
                elif name == "fd":  # guest fds are handed out lowest-first from 3: 3..18 are mostly open
                    v = ch.int(0, 18) if sane else _pick_i32(ch)
                elif fmt == "i":
                    v = _pick_i32(ch)
                else:
                    v = ch.int(-(1 << 63), (1 << 63) - 1) if fmt == "q" else _pick_u64(ch, ram)
                struct.pack_into("<" + fmt, block, off, v)
        else:
            block = bytearray(ch.bytes(0, 32))
        k = ch.int(0, 9)
        if k < 7:  # a plausible place
            addr = ch.choice([0x8000, 0x9000, 0x5_0000 + ch.int(0, 0xFFFF), ram - len(block)])
        elif k == 7:  # on top of the page tables or the scratch areas it points into
            addr = ch.choice([0x10000, 0x11000 + 8 * ch.int(0, 511), 0x12000, STR_AREA, ARRAY_AREA])
        else:
            addr = ch.choice([ram - 1, ram, ram - max(len(block), 1) + 1, 0xFFFF_FFFF, _pick_u64(ch, ram)])
        if 0 <= addr and addr + len(block) <= ram:
            mem.write(addr, bytes(block))
        ctx = H.Context(ch.int(0, 3), mem, self.hostio, cr3=lambda: cr3, paging=paging)
        self.calls += 1
        try:
            call = H.dispatch(port, addr, ctx)
        except GuestError as e:
            self.guest_errors += 1
            assert str(e) and "\n" not in str(e), repr(e)
            if self.writer is not None:  # what the run loop records for a refused request
                self.writer.event("hypercall", ctx.cpu, 0, call=H.PORT_NAMES.get(port, "?"), port=port,
                                  addr=addr, error=str(e), t_end=0)
            return
        if self.writer is not None:
            fields = {"call": call.name, "port": port, "addr": addr, "block": call.block,
                      "args": H.describe_args(call), "ret": call.outcome.ret, "t_end": 0}
            if call.out is not None:
                fields["out"] = call.out
            if call.outcome.payload is not None:
                fields["payload"] = call.outcome.payload
            self.writer.event("hypercall", ctx.cpu, 0, **fields)
        if call.name == "open" and call.outcome.ret >= 0:
            self.check_fd(call.outcome.ret)

    # -- invariants --------------------------------------------------------------------------------
    def check_fd(self, guest_fd: int) -> None:
        f = self.live.files[guest_fd]
        real = os.path.realpath(f"/proc/self/fd/{f.host_fd}")
        st = os.fstat(f.host_fd)
        assert any((real + os.sep).startswith(m) for m in self.real_mounts), (guest_fd, real)
        assert stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode), (guest_fd, real, st.st_mode)

    def check_host(self) -> None:
        """Nothing outside the mount changed, no host fd leaked past the guest's table."""
        now = snapshot(self.root, skip=("mnt", "traces"))
        assert now == self.outside, _diff(self.outside, now)
        assert _fd_count() <= self.base_fds + len(self.live.files) + 2, (_fd_count(), self.base_fds,
                                                                         len(self.live.files))

    def recycle(self) -> None:
        """Close every guest file (as a guest would) and restore the mount's planted entries."""
        for fd in list(self.live.files):
            self.hostio.close(0, fd)
        refresh_mount(self.root)

    def maintain(self, i: int, every: int = 200) -> None:
        """Between inputs: check the host and restore the mount every ``every`` inputs; close the guest's
        files when its table is nearly full (so that fds 3.. stay mostly open for the next inputs)."""
        if i % every == 0:
            self.check_host()
            refresh_mount(self.root)
        if len(self.live.files) > 48:
            self.recycle()

    def close(self) -> None:
        self.hostio.close_all()
        self.mem.close()
        if self.writer is not None:
            self.writer.close({"reason": "exit", "code": 0})
            r = open_trace(self.trace_path)
            assert r.complete and not r.warnings, r.warnings
            n = sum(1 for _ in r.events())
            assert n == r.n_events, (n, r.n_events)
            r.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _diff(a: dict, b: dict) -> str:
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            lines.append(f"{k}: {a.get(k)} -> {b.get(k)}")
    return "host files outside the mount changed:\n" + "\n".join(lines[:20])


# ----------------------------------------------------------------------------------------------------
# traces
# ----------------------------------------------------------------------------------------------------

def base_trace(path: str, compress: str | None, seed: int = 7) -> bytes:
    """A small realistic trace: exits, hypercalls with blocks and payloads, console, hostio, a stop."""
    rng = random.Random(seed)
    with TraceWriter(path, {"argv": ["k", "a"], "env": ["A=1"], "memory": RAM, "cpus": 2},
                     compress=compress, chunk_events=rng.choice([7, 16, 40])) as w:
        for i in range(300):
            cpu = i % 2
            w.exit(cpu, i * 10, 2, 0x400000 + i, 0x800, 1, 1, i & 0xFF)
            if i % 11 == 0:
                w.event("hypercall", cpu, i * 10 + 1, call="open", port=0x440, addr=0x9000 + i,
                        block=rng.randbytes(20), args={"name": 0x20000, "flags": 0, "mode": 0o666}, ret=-1,
                        t_end=i * 10 + 2, payload=b"../canary")
            if i % 17 == 0:
                w.event("console", cpu, i * 10 + 3, stream="uart", data=b"." * (i % 40))
            if i % 23 == 0:
                w.event("hostio", cpu, i * 10 + 4, op="read", args=[3, 16], ret=5, data=b"hello")
            if i % 97 == 0:
                w.event("hypercall", cpu, i * 10 + 5, call="write", port=0x400, addr=0x4000000,
                        error="WRITE argument block [0x4000000, 0x4000014) lies outside guest RAM", t_end=0)
        w.close({"reason": "guest-error", "status": 3, "code": None, "message": "bad block", "report": {}})
    with open(path, "rb") as f:
        return f.read()


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """(offset, type, total length) of every well-formed frame after the magic, plus the trailer."""
    out = []
    pos = len(S.MAGIC)
    while pos + S.FRAME_HEADER_SIZE <= len(data):
        ftype, _flags, _res, length, _crc = S.FRAME_HEADER.unpack_from(data, pos)
        end = pos + S.FRAME_HEADER_SIZE + length
        if end > len(data):
            break
        out.append((pos, ftype, end - pos))
        pos = end
        if ftype == S.FRAME_FOOTER_TYPE:
            break
    return out


def boundaries(data: bytes) -> list[int]:
    """Every frame boundary and the offsets around it (and inside each frame header)."""
    cuts = {0, len(S.MAGIC) - 1, len(data)}
    for off, _t, n in frames(data):
        for d in (-1, 0, 1, 4, 8, S.FRAME_HEADER_SIZE - 1, S.FRAME_HEADER_SIZE, S.FRAME_HEADER_SIZE + 1):
            cuts.add(off + d)
        cuts.add(off + n - 1)
    cuts.update((len(data) - S.TRAILER_SIZE, len(data) - 8, len(data) - 1))
    return sorted(c for c in cuts if 0 <= c <= len(data))


def _frame(ftype: int, payload: bytes, flags: int = 0) -> bytes:
    return S.FRAME_HEADER.pack(ftype, flags, 0, len(payload), zlib.crc32(payload)) + payload


_ANY = [0, 1, -1, (1 << 64) - 1, -(1 << 63), "x", b"\xff", None, True, 1.5, [], {}, [1, 2, 3], {"seq": 0}]


def _junk_value(ch, depth: int = 0):
    k = ch.int(0, 9)
    if k < 5 or depth > 2:
        return ch.choice(_ANY)
    if k < 7:
        return [_junk_value(ch, depth + 1) for _ in range(ch.int(0, 3))]
    return {ch.choice(["k", "seq", "cpu", "t", "data", "args", 1, b"k"]): _junk_value(ch, depth + 1)
            for _ in range(ch.int(0, 3))}


def _pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, strict_types=False, default=str)


def _junk_chunk(ch) -> bytes:
    """A chunk payload that passes the CRC but not necessarily the decoder's checks."""
    n = ch.choice([0, 1, 2, 5, 40, 2**32, -1, "5"])
    seq0 = ch.choice([0, 1, 300, 2**63, -1, None])
    rows = ch.int(0, 6)
    obj = {"seq0": seq0, "n": n,
           "exits": ch.choice([ch.bytes(0, 31 * rows + 2), bytes(31 * rows), "exits", None]),
           "events": [{"k": ch.choice(["console", "exit", "stop", 5, ""]),
                       "seq": ch.choice([0, 1, 2, 3, -1, 2**64 - 1, "1"]),
                       "cpu": ch.choice([0, 1, -1, None, "0", (1 << 64) - 1]),
                       "t": ch.choice([0, -5, None, 1.5]),
                       **({"data": ch.bytes(0, 8)} if ch.bool() else {})}
                      for _ in range(ch.int(0, 4))]}
    if ch.int(0, 3) == 0:
        obj = _junk_value(ch)
    return _pack(obj)


def trace_case(ch, bases: dict) -> bytes:
    """One damaged trace built from the base traces."""
    compress = ch.choice(sorted(bases, key=str))
    data = bytearray(bases[compress])
    fr = frames(bytes(data))
    kind = ch.int(0, 9)
    if kind == 0:  # truncation at or near a frame boundary
        data = data[:ch.choice(boundaries(bytes(data)))]
    elif kind == 1:  # garbage after the magic, or after the header frame
        keep = len(S.MAGIC) if ch.bool() else fr[0][0] + fr[0][2]
        data = data[:keep] + ch.bytes(0, 600)
    elif kind == 2:  # a valid-CRC chunk with a malformed payload, spliced in or replacing one
        junk = _frame(S.FRAME_CHUNK_TYPE, _junk_chunk(ch), ch.choice([0, 0, 1, 2, 0x80]))
        off, _t, n = ch.choice(fr[1:-1] or fr)
        data = data[:off] + junk + (data[off + n:] if ch.bool() else data[off:])
    elif kind == 3:  # a valid-CRC footer / header with junk inside
        ftype = ch.choice([S.FRAME_FOOTER_TYPE, S.FRAME_HEADER_TYPE])
        k = ch.int(0, 2)
        if k == 0:
            obj = _junk_value(ch)
        elif ftype == S.FRAME_FOOTER_TYPE or k == 1:
            obj = {"events": ch.choice([0, -1, "x", 2**64 - 1]), "chunks": _junk_value(ch),
                   "exits": ch.choice([0, 5, -3, "x", None]), "dropped": _junk_value(ch),
                   "by_reason": ch.choice([{}, {2: 5}, {2: "x"}, {"io": 1, 2: 3}, {2: None}, {b"2": 1}, []]),
                   "stop": _junk_value(ch), "wall_ns": ch.choice([0, -1, 1.5, "x", None, 2**64 - 1]),
                   "format": ch.choice([[1, 0], [1], [0, 0], [2, 0], ["1", 0], None, [1, -1]]),
                   "compression": ch.choice([None, "zstd", "lz4", 5])}
        else:  # a header whose format is fine and whose other fields are junk
            obj = {"format": [1, ch.choice([0, 1, 99])], "compression": ch.choice([None, "zstd", 7, "lz4"])}
            for key in ("kernel", "memory", "cpus", "argv", "env", "mounts", "cpuid", "host", "determinism",
                        "options", "created", "tracevisor"):
                if ch.bool():
                    obj[key] = _junk_value(ch)
        payload = _pack(obj)
        junk = _frame(ftype, payload)
        if ftype == S.FRAME_HEADER_TYPE:
            data = data[:len(S.MAGIC)] + junk + data[fr[0][0] + fr[0][2]:]
        else:
            last = fr[-1]
            data = data[:last[0]] + junk + S.TRAILER.pack(last[0], S.TRAILER_MAGIC)
    elif kind == 4:  # the trailer points somewhere else
        data = data[:-S.TRAILER_SIZE] + S.TRAILER.pack(_pick_u64(ch, len(data)) % (1 << 64), S.TRAILER_MAGIC)
    elif kind == 5:  # frames shuffled / duplicated
        body = [bytes(data[o:o + n]) for o, _t, n in fr[1:]]
        if body:
            i, j = ch.int(0, len(body) - 1), ch.int(0, len(body) - 1)
            if ch.bool():
                body[i], body[j] = body[j], body[i]
            else:
                body.insert(i, body[j])
        head = bytes(data[:fr[0][0] + fr[0][2]])
        data = bytearray(head + b"".join(body) + bytes(data[fr[-1][0] + fr[-1][2]:]))
    elif kind == 6:  # a frame header field rewritten
        off, _t, _n = ch.choice(fr)
        field = ch.int(0, 4)
        vals = list(S.FRAME_HEADER.unpack_from(data, off))
        vals[field] = ch.choice([0, 1, 0xFF, 0xFFFF, 0xFFFF_FFFF, 12, len(data)]) & (
            (0xFF, 0xFF, 0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)[field])
        S.FRAME_HEADER.pack_into(data, off, *vals)
    else:  # bit flips anywhere
        for _ in range(ch.int(1, 8)):
            pos = ch.int(0, len(data) - 1)
            data[pos] ^= 1 << ch.int(0, 7)
    return bytes(data)


def check_trace_file(path: str) -> str:
    """Open and read a possibly damaged trace completely; returns "refused" or "read".  Any exception other
    than TraceError from open_trace propagates (the caller reports it)."""
    from tracevisor.trace.dump import format_event, info_text

    try:
        r = open_trace(path)
    except TraceError as e:
        assert "\n" not in str(e), str(e)
        return "refused"
    try:
        events = list(r.events())
        for ev in events[:200]:
            format_event(ev)
        info_text(r)
        for chunk in r.chunks():
            chunk.exit_columns()
            chunk.exit_seqs()
        for i in range(len(r.chunk_index)):
            r.chunk(i)
        list(r.events(kinds=["exit", "hypercall"], vcpu=1, start=5, stop=200))
        list(r.events(start=10**6))
        _ = r.n_events
        assert all(isinstance(w, str) and "\n" not in w for w in r.warnings), r.warnings
    finally:
        r.close()
    return "read"


# ----------------------------------------------------------------------------------------------------
# the virtio queue parser
# ----------------------------------------------------------------------------------------------------

class QueueWorld:
    """A legacy split virtqueue (device side) over guest memory the generator fills with hostile rings."""

    def __init__(self, ram: int = RAM) -> None:
        self.ram = ram
        self.mem = GuestMemory(ram)
        self.chains = 0
        self.guest_errors = 0

    def case(self, ch) -> None:
        """Lay out a ring from ``ch``, then drive the queue as the device does: only GuestError may escape,
        and every chain handed out lies inside RAM."""
        from tracevisor.devices.virtqueue import DESC_SIZE, VirtQueue, ring_bytes

        mem, ram = self.mem, self.ram
        size = ch.choice([1, 2, 4, 8, 16, 1, 2, 4, 256])
        q = VirtQueue(mem, 0, size=size, max_chain_bytes=ch.choice([1 << 17, 1 << 17, 4096, 64]))
        k = ch.int(0, 9)
        if k < 7:
            pfn = ch.choice([1, 0x100, 0x2FF])
        elif k == 7:
            pfn = (ram - ring_bytes(size)) // 4096 + ch.int(-1, 2)
        else:
            pfn = ch.choice([0, ram // 4096, (1 << 32) - 1, 1 << 20])
        base = pfn * 4096
        try:
            q.set_pfn(pfn)
        except GuestError:
            self.guest_errors += 1
            return
        if not q.ready:
            assert q.pop() is None
            return
        hostile = ch.int(0, 3) == 0  # a quarter of the rings are junk, the rest mostly well formed
        table = bytearray(DESC_SIZE * size)
        for i in range(size):
            if hostile and ch.int(0, 2) == 0:
                addr, length = _pick_u64(ch, ram), ch.int(0, 0xFFFF_FFFF)
                flags, nxt = ch.int(0, 0xFFFF), ch.int(0, 0xFFFF)
            elif hostile:
                addr = ch.choice([0x50000 + 64 * i, ram - 16, ram - 1, 0, q.desc_addr, ram])
                length = ch.choice([0, 1, 10, 64, 1514, 4096, 1 << 17, 0xFFFF_FFFF])
                flags = ch.choice([0, 1, 2, 3, 4, 5, 7])
                nxt = ch.choice([(i + 1) % size, i, 0, size, 0xFFFF])
            else:  # chains of one or two descriptors, readable before writable
                addr, length = 0x50000 + 2048 * i, ch.choice([0, 1, 12, 64, 1514])
                first = i % 2 == 0 and i + 1 < size and ch.bool()
                flags = (1 if first else 0) | (2 if (not first and ch.bool()) else 0)
                nxt = i + 1 if first else 0
            struct.pack_into("<QIHH", table, DESC_SIZE * i, addr, length, flags, nxt)
        mem.write(base, bytes(table))
        avail = q.avail_addr
        mem.write_u16(avail, ch.int(0, 1))
        mem.write_u16(avail + 2, ch.choice([0, 1, size, size + 1, 0xFFFF, ch.int(0, 0xFFFF)]) if hostile
                      else ch.int(0, size))
        ring = [ch.choice([s_, 0, size - 1, size, 0xFFFF]) if hostile else 2 * (s_ % max(size // 2, 1))
                for s_ in range(size)]
        mem.write(avail + 4, struct.pack(f"<{size}H", *ring))
        for _ in range(ch.int(1, 2 * size + 2)):
            try:
                chain = q.pop()
            except GuestError:
                self.guest_errors += 1
                return
            if chain is None:
                return
            self.chains += 1
            for d in chain.descs:
                assert 0 <= d.addr and d.addr + d.len <= ram, d
            data = q.read_chain(chain)
            assert len(data) == chain.read_len <= q.max_chain_bytes, (len(data), chain.read_len)
            n = q.write_chain(chain, b"\xa5" * ch.int(0, 2000))  # contents do not matter, the length does
            assert 0 <= n <= chain.write_len, (n, chain.write_len)
            q.push(chain, n)
            if ch.int(0, 5) == 0:  # the driver moves its index on meanwhile
                mem.write_u16(avail + 2, ch.int(0, 0xFFFF))

    def close(self) -> None:
        self.mem.close()
