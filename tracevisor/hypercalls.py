"""The uhyve 0.2.1 hypercalls: one table, port → (name, argument-block layout, handler).

A guest makes a hypercall with a 32-bit ``OUT`` whose data is the guest-physical address of a packed
argument block.  :func:`dispatch` reads the block through GuestMemory (checked), decodes it once, calls
the handler — a pure function of (decoded args, memory, HostIO) — writes the results back into the
block and returns a :class:`Outcome` that the run loop traces.  A bad pointer or length raises
GuestError, which stops the VM with a report.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import GuestError

MAX_ARGS = 128  # CMDSIZE holds 128 argument and 128 environment sizes
MAX_PATH = 4096


@dataclass(frozen=True)
class Layout:
    """A packed little-endian argument block."""

    fields: tuple[tuple[str, int, str], ...]  # (name, offset, struct format)
    size: int

    def unpack(self, block: bytes) -> dict[str, int]:
        return {name: struct.unpack_from("<" + fmt, block, off)[0] for name, off, fmt in self.fields}

    def offset(self, name: str) -> tuple[int, str]:
        for n, off, fmt in self.fields:
            if n == name:
                return off, fmt
        raise KeyError(name)


SYS_WRITE = Layout((("fd", 0, "i"), ("buf", 4, "Q"), ("len", 12, "Q")), 20)
SYS_OPEN = Layout((("name", 0, "Q"), ("flags", 8, "i"), ("mode", 12, "i"), ("ret", 16, "i")), 20)
SYS_CLOSE = Layout((("fd", 0, "i"), ("ret", 4, "i")), 8)
SYS_READ = Layout((("fd", 0, "i"), ("buf", 4, "Q"), ("len", 12, "Q"), ("ret", 20, "q")), 28)
SYS_EXIT = Layout((("arg", 0, "i"),), 4)
SYS_LSEEK = Layout((("fd", 0, "i"), ("offset", 4, "q"), ("whence", 12, "i")), 16)
SYS_UNLINK = Layout((("name", 0, "Q"), ("ret", 8, "i")), 12)
SYS_CMDSIZE = Layout((("argc", 0, "i"), ("envc", 516, "i")), 1032)  # + argsz[128] @4, envsz[128] @520
SYS_CMDVAL = Layout((("argv", 0, "Q"), ("envp", 8, "Q")), 16)


@dataclass
class Outcome:
    """What one hypercall did, for the run loop and the trace."""

    ret: int | None = None
    payload: bytes | None = None  # bytes the guest handed to the host (write data, a path)
    exit_code: int | None = None  # EXIT: the VM ends with this code
    writes: list[tuple[int, bytes]] = field(default_factory=list)  # block write-backs (offset, bytes)


class Context:
    """What a handler may use: the vCPU id, guest memory, the HostIO, and the vCPU's CR3 (lazily)."""

    __slots__ = ("cpu", "memory", "hostio", "_cr3", "_cr3_value", "paging")

    def __init__(self, cpu: int, memory, hostio, cr3: Callable[[], int], paging: bool = True) -> None:
        self.cpu = cpu
        self.memory = memory
        self.hostio = hostio
        self._cr3 = cr3
        self._cr3_value: int | None = None
        self.paging = paging

    @property
    def cr3(self) -> int:
        if self._cr3_value is None:
            self._cr3_value = self._cr3()
        return self._cr3_value

    def reset(self) -> None:
        self._cr3_value = None


def _ret(layout: Layout, name: str, value: int) -> tuple[int, bytes]:
    off, fmt = layout.offset(name)
    return off, struct.pack("<" + fmt, value)


def _write(ctx: Context, a: dict) -> Outcome:
    data = ctx.memory.read_virt(a["buf"], a["len"], ctx.cr3, ctx.paging, "WRITE buffer")
    ret = ctx.hostio.write(ctx.cpu, a["fd"], data)
    return Outcome(ret=ret, payload=data)  # uhyve 0.2.1 writes nothing back


def _read(ctx: Context, a: dict) -> Outcome:
    # Validate the whole destination before asking the host for anything (no unbounded allocation).
    ranges = ctx.memory.virt_ranges(a["buf"], a["len"], ctx.cr3, ctx.paging, "READ buffer")
    ret, data = ctx.hostio.read(ctx.cpu, a["fd"], a["len"])
    if ret > 0:
        data = data[:a["len"]]
        pos = 0
        for gpa, n in ranges:
            if pos >= len(data):
                break
            ctx.memory.write(gpa, data[pos:pos + n])
            pos += n
    return Outcome(ret=ret, writes=[_ret(SYS_READ, "ret", ret)])


def _open(ctx: Context, a: dict) -> Outcome:
    path = ctx.memory.read_cstr(a["name"], MAX_PATH, "OPEN file name")
    ret = ctx.hostio.open(ctx.cpu, path, a["flags"], a["mode"])
    return Outcome(ret=ret, payload=path, writes=[_ret(SYS_OPEN, "ret", ret)])


def _close(ctx: Context, a: dict) -> Outcome:
    ret = ctx.hostio.close(ctx.cpu, a["fd"])
    return Outcome(ret=ret, writes=[_ret(SYS_CLOSE, "ret", ret)])


def _lseek(ctx: Context, a: dict) -> Outcome:
    ret = ctx.hostio.lseek(ctx.cpu, a["fd"], a["offset"], a["whence"])
    return Outcome(ret=ret, writes=[_ret(SYS_LSEEK, "offset", ret)])


def _unlink(ctx: Context, a: dict) -> Outcome:
    path = ctx.memory.read_cstr(a["name"], MAX_PATH, "UNLINK file name")
    ret = ctx.hostio.unlink(ctx.cpu, path)
    return Outcome(ret=ret, payload=path, writes=[_ret(SYS_UNLINK, "ret", ret)])


def _exit(ctx: Context, a: dict) -> Outcome:
    return Outcome(exit_code=a["arg"])


def _cmdline(ctx: Context) -> tuple[list[bytes], list[bytes]]:
    argv, env = ctx.hostio.cmdline(ctx.cpu)
    return argv[:MAX_ARGS], env[:MAX_ARGS]


def _cmdsize(ctx: Context, a: dict) -> Outcome:
    argv, env = _cmdline(ctx)
    block = bytearray(1032)
    struct.pack_into("<i", block, 0, len(argv))
    for i, s in enumerate(argv):
        struct.pack_into("<i", block, 4 + 4 * i, len(s) + 1)
    struct.pack_into("<i", block, 516, len(env))
    for i, s in enumerate(env):
        struct.pack_into("<i", block, 520 + 4 * i, len(s) + 1)
    # Entries beyond argc/envc are left untouched, as uhyve does.
    writes = [(0, bytes(block[0:4 + 4 * len(argv)])), (516, bytes(block[516:520 + 4 * len(env)]))]
    return Outcome(ret=len(argv), writes=writes)


def _cmdval(ctx: Context, a: dict) -> Outcome:
    argv, env = _cmdline(ctx)
    mem = ctx.memory
    for array, strings, what in ((a["argv"], argv, "argument"), (a["envp"], env, "environment entry")):
        if not strings:
            continue
        mem.check(array, 8 * len(strings), f"CMDVAL {what} pointer array")
        for i, s in enumerate(strings):
            ptr = mem.read_u64(array + 8 * i)
            mem.write(ptr, s + b"\0", f"CMDVAL {what} {i} buffer")
    return Outcome(ret=0)


@dataclass(frozen=True)
class Hypercall:
    port: int
    name: str
    layout: Layout | None
    handler: Callable[[Context, dict], Outcome] | None


# The one table.  UART (0x800) is a console port rather than a block call; the run loop serves it
# directly (one byte per exit) and the trace keeps its bytes as console events.
TABLE: dict[int, Hypercall] = {h.port: h for h in (
    Hypercall(0x400, "write", SYS_WRITE, _write),
    Hypercall(0x440, "open", SYS_OPEN, _open),
    Hypercall(0x480, "close", SYS_CLOSE, _close),
    Hypercall(0x500, "read", SYS_READ, _read),
    Hypercall(0x540, "exit", SYS_EXIT, _exit),
    Hypercall(0x580, "lseek", SYS_LSEEK, _lseek),
    Hypercall(0x640, "netwrite", None, None),
    Hypercall(0x680, "netread", None, None),
    Hypercall(0x700, "netstat", None, None),
    Hypercall(0x740, "cmdsize", SYS_CMDSIZE, _cmdsize),
    Hypercall(0x780, "cmdval", SYS_CMDVAL, _cmdval),
    Hypercall(0x840, "unlink", SYS_UNLINK, _unlink),
)}
UART_PORT = 0x800
PORT_NAMES = {h.port: h.name for h in TABLE.values()} | {UART_PORT: "uart"}


@dataclass
class Call:
    """A decoded hypercall with its outcome: everything the trace keeps about it."""

    name: str
    port: int
    addr: int
    block: bytes
    args: dict
    outcome: Outcome
    out: bytes | None = None


def dispatch(port: int, addr: int, ctx: Context) -> Call:
    """Serve the hypercall at ``port`` whose block is at guest-physical ``addr``."""
    hc = TABLE.get(port)
    if hc is None:  # the run loop routes only table ports here; anyone else gets the guest's error too
        raise GuestError(f"no hypercall at I/O port {port:#x}", port=port)
    if hc.layout is None:
        # NETWRITE/NETREAD/NETSTAT: the old shared-memory network is gone (uhyve 0.2.1 too); answered
        # as no-ops so old kernels do not stop.  The virtio-net device is the network.
        return Call(hc.name, port, addr, b"", {}, Outcome())
    block = ctx.memory.read(addr, hc.layout.size, f"{hc.name.upper()} argument block")
    args = hc.layout.unpack(block)
    outcome = hc.handler(ctx, args)
    out = None
    if outcome.writes:
        buf = bytearray(block)
        for off, data in outcome.writes:
            ctx.memory.write(addr + off, data)
            buf[off:off + len(data)] = data
        out = bytes(buf) if buf != block else None
    return Call(hc.name, port, addr, block, args, outcome, out)


def describe_args(call: Call) -> dict:
    """The decoded fields for the trace (a plain dict of ints), without the always -1 'ret' pre-fill."""
    return {k: v for k, v in call.args.items() if k != "ret"}

