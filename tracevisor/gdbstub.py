"""A GDB remote serial protocol (RSP) server that knows nothing about KVM.

:class:`GdbStub` speaks the protocol on one connected socket and drives a *target*, a small duck-typed
interface implemented by the live VM (:mod:`tracevisor.debugtarget`) and by a replay.  The target's
methods (all called from the stub's thread, except :meth:`interrupt`):

``read_registers() -> bytes``            all registers in the ``g`` layout of :data:`REGISTERS`
``write_registers(data)``                 the same layout (segment selectors may be ignored)
``read_register(n) -> bytes`` / ``write_register(n, data)``
``read_memory(addr, n) -> bytes`` / ``write_memory(addr, data)``   guest-virtual addresses
``insert_breakpoint(kind, addr, length) -> bool`` / ``remove_breakpoint(...)``  kind 0–4 as in ``Z``;
                                           False means "no room" (reply ``E28``)
``cont() -> Stop`` / ``step() -> Stop``   block until the guest stops again
``interrupt()``                            called from the socket reader thread while cont/step runs
``kill()`` / ``detach()``
``supports_reverse`` (and then ``reverse_step()`` / ``reverse_continue()``), ``offsets`` (load bias)
``breakpoint_kinds`` (optional): the ``Z`` kinds the target implements; others get an empty reply.

A target reports an unreadable address or a refused request by raising :class:`TargetError`, which
becomes an ``Enn`` reply.  Anything else that goes wrong ends the session without a traceback:
:meth:`GdbStub.serve` returns a :class:`SessionEnd` saying why.

Register layout and packet formats follow the GDB manual ("Remote Serial Protocol", "Target
Descriptions", "i386 Features").
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

# GDB's own signal numbers (gdb/signals.def), which the protocol uses whatever the host is.
SIGINT = 2
SIGILL = 4
SIGTRAP = 5
SIGABRT = 6
SIGKILL = 9
SIGSEGV = 11
SIGSYS = 12
SIGALRM = 14
SIGTERM = 15

# Z packet kinds
BP_SOFTWARE, BP_HARDWARE, WATCH_WRITE, WATCH_READ, WATCH_ACCESS = range(5)

# errno values used in Enn replies
E_INVAL = 22
E_FAULT = 14
E_NOSPC = 28

PACKET_SIZE = 0x4000  # what qSupported announces: the largest packet gdb may send us
MAX_PACKET = 2 * PACKET_SIZE + 64  # anything longer is not gdb talking
MAX_JUNK = 1 << 16  # bytes outside packets before the peer counts as not speaking the protocol
MAX_NAKS = 5  # consecutive checksum failures before giving up
THREAD_ID = 1  # the one thread (vCPU 0)


class TargetError(Exception):
    """A request the target refuses: becomes the reply ``E<errno>``."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(message or f"error {errno}")
        self.errno = errno


class ProtocolError(Exception):
    """The peer broke the packet framing; the connection is dropped."""


@dataclass
class Stop:
    """Why the target stopped, as the stub reports it to gdb."""

    reason: str  # breakpoint | watchpoint | step | interrupt | exit | fault | killed
    signal: int = SIGTRAP
    code: int | None = None  # the guest's exit code (reason "exit")
    watch_addr: int | None = None  # the watched address gdb asked for (reason "watchpoint")
    watch_kind: str = "watch"  # watch (write) | rwatch (read) | awatch (access)
    hardware: bool = False  # breakpoint: inserted with Z1 (True) or Z0 (False)
    replaylog: str | None = None  # "begin"/"end": a replay reached an end of its history
    message: str = ""

    @property
    def alive(self) -> bool:
        """Can the guest still run after this stop?"""
        return self.reason not in ("exit", "fault", "killed")


@dataclass
class SessionEnd:
    """How a debugging session ended."""

    # detached | killed | closed (gdb left after the guest ended) | disconnected | protocol-error | error
    how: str
    message: str = ""


# -- the x86-64 register set ------------------------------------------------------------------------

@dataclass(frozen=True)
class Register:
    name: str
    bits: int
    type: str
    feature: str  # "core" | "sse"
    group: str | None = None

    @property
    def size(self) -> int:
        return self.bits // 8


def _x86_64_registers() -> tuple[Register, ...]:
    regs = [Register(n, 64, "int64", "core") for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi")]
    regs += [Register("rbp", 64, "data_ptr", "core"), Register("rsp", 64, "data_ptr", "core")]
    regs += [Register(f"r{i}", 64, "int64", "core") for i in range(8, 16)]
    regs += [Register("rip", 64, "code_ptr", "core"), Register("eflags", 32, "i386_eflags", "core")]
    regs += [Register(s, 32, "int32", "core") for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    regs += [Register(f"st{i}", 80, "i387_ext", "core") for i in range(8)]
    regs += [Register(n, 32, "int", "core", "float")
             for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
    regs += [Register(f"xmm{i}", 128, "vec128", "sse") for i in range(16)]
    regs.append(Register("mxcsr", 32, "i386_mxcsr", "sse", "vector"))
    return tuple(regs)


#: Registers in gdb's numbering, which is also the order and size of the ``g`` packet.
REGISTERS: tuple[Register, ...] = _x86_64_registers()
REGISTER_NUMBER = {r.name: i for i, r in enumerate(REGISTERS)}
REGISTER_OFFSET: tuple[int, ...] = tuple(sum(r.size for r in REGISTERS[:i]) for i in range(len(REGISTERS)))
G_SIZE = sum(r.size for r in REGISTERS)  # 536 bytes

_EFLAGS_BITS = [("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9),
                ("DF", 10), ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19),
                ("VIP", 20), ("ID", 21)]
_MXCSR_BITS = [("IE", 0), ("DE", 1), ("ZE", 2), ("OE", 3), ("UE", 4), ("PE", 5), ("DAZ", 6), ("IM", 7),
               ("DM", 8), ("ZM", 9), ("OM", 10), ("UM", 11), ("PM", 12), ("FZ", 15)]
_VECTORS = [("v8bf16", "bfloat16", 8), ("v8h", "ieee_half", 8), ("v4f", "ieee_single", 4),
            ("v2d", "ieee_double", 2), ("v16i8", "int8", 16), ("v8i16", "int16", 8),
            ("v4i32", "int32", 4), ("v2i64", "int64", 2)]
_VEC128_FIELDS = [("v8_bfloat16", "v8bf16"), ("v8_half", "v8h"), ("v4_float", "v4f"),
                  ("v2_double", "v2d"), ("v16_int8", "v16i8"), ("v8_int16", "v8i16"),
                  ("v4_int32", "v4i32"), ("v2_int64", "v2i64"), ("uint128", "uint128")]


def _flags(name: str, bits: list[tuple[str, int]]) -> list[str]:
    out = [f'  <flags id="{name}" size="4">']
    out += [f'    <field name="{n}" start="{b}" end="{b}"/>' for n, b in bits]
    out.append("  </flags>")
    return out


def _regs_xml(feature: str) -> list[str]:
    out = []
    for i, r in enumerate(REGISTERS):
        if r.feature != feature:
            continue
        group = f' group="{r.group}"' if r.group else ""
        out.append(f'  <reg name="{r.name}" bitsize="{r.bits}" type="{r.type}" regnum="{i}"{group}/>')
    return out


def target_xml() -> str:
    """The x86-64 target description gdb reads with ``qXfer:features:read:target.xml``."""
    lines = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "<architecture>i386:x86-64</architecture>", '<feature name="org.gnu.gdb.i386.core">']
    lines += _flags("i386_eflags", _EFLAGS_BITS)
    lines += _regs_xml("core")
    lines += ["</feature>", '<feature name="org.gnu.gdb.i386.sse">']
    lines += [f'  <vector id="{vid}" type="{t}" count="{n}"/>' for vid, t, n in _VECTORS]
    lines.append('  <union id="vec128">')
    lines += [f'    <field name="{n}" type="{t}"/>' for n, t in _VEC128_FIELDS]
    lines.append("  </union>")
    lines += _flags("i386_mxcsr", _MXCSR_BITS)
    lines += _regs_xml("sse")
    lines += ["</feature>", "</target>", ""]
    return "\n".join(lines)


TARGET_XML = target_xml().encode()


def pack_registers(values: dict[str, int | bytes]) -> bytes:
    """{name: int or raw bytes} → the ``g`` layout (missing registers read as zero)."""
    out = bytearray()
    for r in REGISTERS:
        v = values.get(r.name, 0)
        out += v.ljust(r.size, b"\0")[:r.size] if isinstance(v, (bytes, bytearray)) else \
            (v & ((1 << r.bits) - 1)).to_bytes(r.size, "little")
    return bytes(out)


def unpack_registers(data: bytes) -> dict[str, int]:
    """The ``g`` layout → {name: int} (st0–7 and xmm0–15 as ints too, little-endian)."""
    if len(data) != G_SIZE:
        raise TargetError(E_INVAL, f"register block of {len(data)} bytes, expected {G_SIZE}")
    return {r.name: int.from_bytes(data[off:off + r.size], "little")
            for r, off in zip(REGISTERS, REGISTER_OFFSET)}


# -- packet helpers ---------------------------------------------------------------------------------

def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    return b"$" + payload + b"#%02x" % checksum(payload)


def escape_binary(data: bytes) -> bytes:
    """Binary data in a packet: ``# $ } *`` become ``}`` followed by the byte XOR 0x20."""
    out = bytearray()
    for b in data:
        if b in (0x23, 0x24, 0x7D, 0x2A):
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape_binary(data: bytes) -> bytes:
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("binary data ends with an escape byte")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def _hex_int(text: bytes) -> int:
    """A hex number as gdb sends it; '-1' is allowed (thread ids)."""
    s = text.decode("ascii")
    if s == "-1":
        return -1
    if not s or any(c not in "0123456789abcdefABCDEF" for c in s):
        raise ValueError(f"bad hex number {s!r}")
    return int(s, 16)


def _thread_id(text: bytes) -> int:
    """``1``, ``-1``, ``0``, or the multiprocess form ``pPID.TID``."""
    if text.startswith(b"p"):
        text = text.split(b".", 1)[1] if b"." in text else b"-1"
    return _hex_int(text)


def _addr_len(text: bytes) -> tuple[int, int]:
    a, n = text.split(b",", 1)
    return _hex_int(a), _hex_int(n)


class _BadArguments(Exception):
    """A known packet with arguments that do not parse: reply E22 and carry on."""


# -- the server -------------------------------------------------------------------------------------

class GdbStub:
    """Serve one gdb connection on ``sock`` for ``target``; :meth:`serve` returns a :class:`SessionEnd`."""

    def __init__(self, target, sock: socket.socket, log=None) -> None:
        self.target = target
        self.sock = sock
        self.log = log or (lambda msg: None)
        self.ack = True
        self.last_stop: Stop | None = None
        self._last_sent = b""
        self._buf = bytearray()
        self._cv = threading.Condition()
        self._eof = False
        self._eof_reason = ""
        self._running = False
        self._naks = 0
        self._junk = 0
        self._end: SessionEnd | None = None
        self._reader: threading.Thread | None = None

    # -- I/O -----------------------------------------------------------------------------------
    def _read_loop(self) -> None:
        """Reader thread: buffers bytes; a 0x03 while the guest runs interrupts it at once."""
        why = ""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    why = "gdb closed the connection"
                    break
                interrupt = False
                with self._cv:
                    if self._running and b"\x03" in data:
                        data = data.replace(b"\x03", b"")
                        interrupt = True
                    self._buf += data
                    overflow = len(self._buf) > MAX_PACKET + MAX_JUNK
                    self._cv.notify_all()
                if interrupt:
                    self._interrupt_target()
                if overflow:
                    why = "gdb sent more than a packet's worth of bytes without a complete packet"
                    break
        except OSError as e:
            why = f"connection error: {e.strerror or e}"
        finally:
            with self._cv:
                self._eof = True
                self._eof_reason = why
                running = self._running
                self._cv.notify_all()
            if running:  # the guest runs with nobody listening: stop it so the session can end
                self._interrupt_target()

    def _interrupt_target(self) -> None:
        try:
            self.target.interrupt()
        except Exception as e:  # never let the reader thread die with a traceback
            self.log(f"interrupt failed: {e}")

    def _send(self, payload: bytes) -> None:
        self._last_sent = frame(payload)
        self.sock.sendall(self._last_sent)

    def _next_packet(self) -> bytes | None:
        """The next packet's payload (checksum verified, acknowledged), or None at end of input."""
        while True:
            with self._cv:
                while True:
                    item = self._parse_buffer()
                    if item is not None:
                        break
                    if self._eof:
                        return None
                    self._cv.wait()
            kind, payload = item
            if kind == "packet":
                self._naks = 0
                if self.ack:
                    self.sock.sendall(b"+")
                return payload
            if kind == "nak":  # gdb asks for our last packet again
                if self._last_sent:
                    self.sock.sendall(self._last_sent)
            elif kind == "bad-checksum":
                self._naks += 1
                if not self.ack:
                    raise ProtocolError("packet with a bad checksum in no-ack mode")
                if self._naks > MAX_NAKS:
                    raise ProtocolError(f"{self._naks} packets in a row with bad checksums")
                self.sock.sendall(b"-")

    def _parse_buffer(self):
        """One item from the front of the buffer (caller holds the lock), or None if incomplete."""
        buf = self._buf
        start = buf.find(b"$")
        junk = buf if start < 0 else buf[:start]
        if junk:
            if b"-" in junk and self.ack:
                cut = junk.index(b"-") + 1
                del buf[:cut]
                return ("nak", b"")
            # '+' acks and stray 0x03s are ignored, as is noise, up to a point
            self._junk += len(junk) - junk.count(b"+") - junk.count(b"\x03")
            if self._junk > MAX_JUNK:
                raise ProtocolError("the peer sends bytes that are not gdb packets")
            if start < 0:
                buf.clear()
                return None
            del buf[:start]
            start = 0
        if start < 0:
            return None
        end = buf.find(b"#", 1)
        if end < 0:
            if len(buf) > MAX_PACKET:
                raise ProtocolError(f"packet longer than {MAX_PACKET} bytes")
            return None
        if end > MAX_PACKET:
            raise ProtocolError(f"packet longer than {MAX_PACKET} bytes")
        if len(buf) < end + 3:
            return None
        payload = bytes(buf[1:end])
        digits = bytes(buf[end + 1:end + 3])
        del buf[:end + 3]
        try:
            want = int(digits.decode("ascii"), 16)
            if len(digits.strip()) != 2 or digits.startswith((b"-", b"+")):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError(f"packet checksum {digits!r} is not two hex digits") from None
        if checksum(payload) != want:
            return ("bad-checksum", payload)
        self._junk = 0
        return ("packet", payload)

    # -- main loop -----------------------------------------------------------------------------
    def serve(self) -> SessionEnd:
        """Answer packets until gdb detaches, kills, or leaves; never raises for protocol problems."""
        self._reader = threading.Thread(target=self._read_loop, name="gdb-reader", daemon=True)
        self._reader.start()
        try:
            while self._end is None:
                packet = self._next_packet()
                if packet is None:
                    with self._cv:
                        why = self._eof_reason
                    if why.startswith("gdb sent"):
                        self._end = SessionEnd("protocol-error", why)
                    elif self.last_stop is not None and not self.last_stop.alive:
                        self._end = SessionEnd("closed", why)
                    else:
                        self._end = SessionEnd("disconnected", why)
                    break
                try:
                    reply = self._dispatch(packet)
                except _BadArguments as e:
                    self.log(f"bad packet {packet[:40]!r}: {e}")
                    reply = b"E%02d" % E_INVAL
                except TargetError as e:
                    reply = b"E%02d" % (e.errno % 100)
                if reply is not None:
                    self._send(reply)
        except ProtocolError as e:
            self._end = SessionEnd("protocol-error", str(e))
        except OSError as e:
            self._end = SessionEnd("disconnected", f"connection error: {e.strerror or e}")
        except Exception as e:  # a bug here or in the target: end the session, keep one line
            self._end = SessionEnd("error", f"{type(e).__name__}: {e}")
        finally:
            if self._end is not None and self._end.how in ("detached", "killed"):
                self._linger()
            self._close()
        return self._end

    def _linger(self, timeout: float = 1.0) -> None:
        """After the last reply: let gdb acknowledge it (or hang up) before the socket closes."""
        with self._cv:
            self._cv.wait_for(lambda: self._eof or (self.ack and b"+" in self._buf), timeout)

    def _close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.sock.close()
        except OSError:
            pass
        if self._reader is not None:
            self._reader.join(2.0)

    # -- packets -------------------------------------------------------------------------------
    def _dispatch(self, pkt: bytes) -> bytes | None:
        if not pkt:
            return b""
        c = pkt[:1]
        body = pkt[1:]
        try:
            if c == b"q" or c == b"Q":
                return self._query(pkt)
            if c == b"v":
                return self._v_packet(pkt)
            if c == b"?":
                return self._stop_reply(self.last_stop or Stop("step", SIGTRAP))
            if c == b"g":
                return self.target.read_registers().hex().encode()
            if c == b"G":
                data = bytes.fromhex(body.decode("ascii"))
                if len(data) != G_SIZE:
                    return b"E%02d" % E_INVAL
                self.target.write_registers(data)
                return b"OK"
            if c == b"p":
                n = _hex_int(body)
                if not 0 <= n < len(REGISTERS):
                    return b"E%02d" % E_INVAL
                return self.target.read_register(n).hex().encode()
            if c == b"P":
                num, _, val = body.partition(b"=")
                n = _hex_int(num)
                data = bytes.fromhex(val.decode("ascii"))
                if not 0 <= n < len(REGISTERS) or len(data) != REGISTERS[n].size:
                    return b"E%02d" % E_INVAL
                self.target.write_register(n, data)
                return b"OK"
            if c == b"m":
                addr, n = _addr_len(body)
                return self._read_memory(addr, n)
            if c == b"M":
                head, _, val = body.partition(b":")
                addr, n = _addr_len(head)
                data = bytes.fromhex(val.decode("ascii"))
                if len(data) != n:
                    return b"E%02d" % E_INVAL
                if n:
                    self.target.write_memory(addr, data)
                return b"OK"
            if c == b"X":
                head, sep, raw = body.partition(b":")
                addr, n = _addr_len(head)
                data = unescape_binary(raw)
                if not sep or len(data) != n:
                    return b"E%02d" % E_INVAL
                if n:
                    self.target.write_memory(addr, data)
                return b"OK"
            if c in (b"c", b"s", b"C", b"S"):
                return self._resume_packet(c, body)
            if c == b"Z" or c == b"z":
                return self._breakpoint(c == b"Z", body)
            if c == b"H":
                if len(body) < 2 or body[:1] not in (b"g", b"c"):
                    return b"E%02d" % E_INVAL
                return b"OK" if _thread_id(body[1:]) in (-1, 0, THREAD_ID) else b"E%02d" % E_INVAL
            if c == b"T":
                return b"OK" if _thread_id(body) == THREAD_ID else b"E01"
            if c == b"D":
                self.target.detach()
                self._send(b"OK")
                self._end = SessionEnd("detached", "gdb detached")
                return None
            if c == b"k":
                self._kill()
                return None  # gdb does not wait for a reply to 'k'
            if c == b"b" and body in (b"s", b"c"):
                if not getattr(self.target, "supports_reverse", False):
                    return b""
                return self._run(self.target.reverse_step if body == b"s" else self.target.reverse_continue)
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise _BadArguments(str(e)) from None
        return b""  # unknown packet: "not supported"

    def _query(self, pkt: bytes) -> bytes:
        name, _, args = pkt.partition(b":")
        if name == b"qSupported":
            feats = [b"PacketSize=%x" % PACKET_SIZE, b"qXfer:features:read+", b"swbreak+", b"hwbreak+",
                     b"vContSupported+", b"QStartNoAckMode+"]
            if getattr(self.target, "supports_reverse", False):
                feats += [b"ReverseStep+", b"ReverseContinue+"]
            return b";".join(feats)
        if name == b"QStartNoAckMode":
            self._send(b"OK")
            self.ack = False
            return None  # type: ignore[return-value]
        if name == b"qXfer" and args.startswith(b"features:read:"):
            annex, _, span = args[len(b"features:read:"):].rpartition(b":")
            offset, length = _addr_len(span)
            if annex != b"target.xml":
                return b"E00"
            chunk = TARGET_XML[offset:offset + length]
            more = offset + length < len(TARGET_XML)
            return (b"m" if more else b"l") + escape_binary(chunk)
        if pkt == b"qC":
            return b"QC%x" % THREAD_ID
        if name == b"qAttached":
            return b"1"
        if pkt == b"qfThreadInfo":
            return b"m%x" % THREAD_ID
        if pkt == b"qsThreadInfo":
            return b"l"
        if pkt.startswith(b"qThreadExtraInfo,"):
            return b"vCPU 0".hex().encode()
        if pkt == b"qOffsets":
            bias = int(getattr(self.target, "offsets", 0) or 0)
            return b"Text=%x;Data=%x;Bss=%x" % (bias, bias, bias)
        if pkt.startswith(b"qSymbol"):
            return b"OK"
        return b""

    def _v_packet(self, pkt: bytes) -> bytes | None:
        if pkt == b"vCont?":
            return b"vCont;c;C;s;S"
        if pkt.startswith(b"vCont;"):
            action = None
            for item in pkt[len(b"vCont;"):].split(b";"):
                act, _, tid = item.partition(b":")
                if not act:
                    raise ValueError("empty vCont action")
                if tid and _thread_id(tid) not in (-1, 0, THREAD_ID):
                    continue
                action = act
                break
            if action is None:
                return b"E%02d" % E_INVAL
            if action[:1] in (b"c", b"C"):
                return self._run(self.target.cont)
            if action[:1] in (b"s", b"S"):
                return self._run(self.target.step)
            return b"E%02d" % E_INVAL
        if pkt.startswith(b"vKill"):
            self._kill()
            self._send(b"OK")
            self._end = SessionEnd("killed", "gdb killed the guest")
            return None
        return b""

    def _kill(self) -> None:
        self.target.kill()
        self.last_stop = Stop("killed", SIGKILL, message="killed by the debugger")
        self._end = SessionEnd("killed", "gdb killed the guest")

    def _resume_packet(self, c: bytes, body: bytes) -> bytes:
        if c in (b"C", b"S"):  # the guest has no signals to deliver: the signal is dropped
            _sig, _, body = body.partition(b";")
        if body:
            self.target.write_register(REGISTER_NUMBER["rip"], _hex_int(body).to_bytes(8, "little"))
        return self._run(self.target.cont if c in (b"c", b"C") else self.target.step)

    def _run(self, how) -> bytes:
        if self.last_stop is not None and not self.last_stop.alive:
            return self._stop_reply(self.last_stop)
        with self._cv:
            if self._eof:
                raise OSError("connection closed")
            self._running = True
        try:
            stop = how()
        finally:
            with self._cv:
                self._running = False
        self.last_stop = stop
        return self._stop_reply(stop)

    def _stop_reply(self, stop: Stop) -> bytes:
        if stop.reason == "exit":
            return b"W%02x" % ((stop.code or 0) & 0xFF)
        if not stop.alive:
            return b"X%02x" % (stop.signal & 0xFF)
        parts = [b"T%02xthread:%x;" % (stop.signal & 0xFF, THREAD_ID)]
        if stop.reason == "breakpoint":
            parts.append(b"hwbreak:;" if stop.hardware else b"swbreak:;")
        elif stop.reason == "watchpoint" and stop.watch_addr is not None:
            parts.append(b"%s:%x;" % (stop.watch_kind.encode(), stop.watch_addr))
        if stop.replaylog:
            parts.append(b"replaylog:%s;" % stop.replaylog.encode())
        return b"".join(parts)

    def _read_memory(self, addr: int, n: int) -> bytes:
        """Read what can be read: a short reply for a range that runs into unmapped memory."""
        if n == 0:
            return b""
        try:
            return self.target.read_memory(addr, n).hex().encode()
        except TargetError:
            pass
        out = bytearray()
        pos = addr
        end = addr + n
        while pos < end:
            k = min(end, (pos | 0xFFF) + 1) - pos
            try:
                out += self.target.read_memory(pos, k)
            except TargetError:
                break
            pos += k
        return out.hex().encode() if out else b"E%02d" % E_FAULT

    def _breakpoint(self, insert: bool, body: bytes) -> bytes:
        kind_s, addr_s, length_s = body.split(b",")[:3]
        kind = _hex_int(kind_s)
        addr = _hex_int(addr_s)
        length = _hex_int(length_s.split(b";")[0])  # conditions/commands after ';' are not evaluated here
        if kind not in getattr(self.target, "breakpoint_kinds", (0, 1, 2, 3, 4)):
            return b""
        if insert:
            ok = self.target.insert_breakpoint(kind, addr, length)
        else:
            ok = self.target.remove_breakpoint(kind, addr, length)
        return b"OK" if ok else b"E%02d" % E_NOSPC


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0: any free port); raises OSError."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = infos[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(1)
    except OSError:
        s.close()
        raise
    return s
