"""The gdb remote stub: protocol units over a socketpair (no KVM), the live target in-process, and the
real ``gdb`` driving ``tracevisor run --gdb`` end to end."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from helpers import reset_child_signals
from tracevisor import gdbstub as G

REPO = Path(__file__).resolve().parents[1]

DEMO_SOURCE = r"""
/* gdbdemo: a guest to debug.  argv[1] == "spin": loop forever incrementing counter. */
#include "tvguest.h"

volatile long counter;
const char greeting[] = "debug me";

__attribute__((noinline)) long square(long x)
{
    counter += x;
    return x * x;
}

int main(int argc, char **argv, char **envp)
{
    long total = 0;
    (void)envp;
    if (argc > 1 && strcmp(argv[1], "spin") == 0)
        for (;;)
            counter++;
    for (long i = 1; i <= 3; i++)
        total += square(i);
    printf("%s: total=%ld counter=%ld\n", greeting, total, counter);
    return total == 14 ? 0 : 1;
}
"""


# == protocol units with a fake target ===============================================================

class FakeTarget:
    """Registers and memory in Python; cont() blocks until interrupt() when told to."""

    supports_reverse = False
    offsets = 0

    def __init__(self):
        self.regs = bytearray(G.G_SIZE)
        self.mem = {0x1000 + i: i & 0xFF for i in range(0x1000)}  # one readable page at 0x1000
        self.breakpoints: list[tuple] = []
        self.room = 4
        self.next_stop = G.Stop("breakpoint", G.SIGTRAP, hardware=True)
        self.block = False
        self.interrupted = threading.Event()
        self.running = threading.Event()
        self.calls: list[str] = []

    def read_registers(self):
        return bytes(self.regs)

    def write_registers(self, data):
        self.regs[:] = data

    def read_register(self, n):
        off = G.REGISTER_OFFSET[n]
        return bytes(self.regs[off:off + G.REGISTERS[n].size])

    def write_register(self, n, data):
        off = G.REGISTER_OFFSET[n]
        self.regs[off:off + len(data)] = data

    def read_memory(self, addr, n):
        if any(a not in self.mem for a in range(addr, addr + n)):
            raise G.TargetError(G.E_FAULT)
        return bytes(self.mem[a] for a in range(addr, addr + n))

    def write_memory(self, addr, data):
        self.read_memory(addr, len(data))
        for i, b in enumerate(data):
            self.mem[addr + i] = b

    def insert_breakpoint(self, kind, addr, length):
        if len(self.breakpoints) >= self.room:
            return False
        self.breakpoints.append((kind, addr, length))
        return True

    def remove_breakpoint(self, kind, addr, length):
        if (kind, addr, length) in self.breakpoints:
            self.breakpoints.remove((kind, addr, length))
        return True

    def _run(self, what):
        self.calls.append(what)
        if self.block:
            self.running.set()
            if not self.interrupted.wait(20):
                raise AssertionError("never interrupted")
            return G.Stop("interrupt", G.SIGINT)
        return self.next_stop

    def cont(self):
        return self._run("cont")

    def step(self):
        return self._run("step")

    def interrupt(self):
        self.interrupted.set()

    def kill(self):
        self.calls.append("kill")

    def detach(self):
        self.calls.append("detach")


class ReverseFake(FakeTarget):
    supports_reverse = True

    def reverse_step(self):
        self.calls.append("reverse_step")
        return G.Stop("step", G.SIGTRAP)

    def reverse_continue(self):
        self.calls.append("reverse_continue")
        return G.Stop("step", G.SIGTRAP, replaylog="begin")


class Client:
    """A minimal RSP client (acks on unless no_ack())."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.settimeout(20)
        self.buf = b""
        self.ack = True

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise EOFError
        self.buf += data

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def send(self, payload: bytes):
        self.sock.sendall(G.frame(payload))

    def read_ack(self) -> bytes:
        while not self.buf:
            self._fill()
        c, self.buf = self.buf[:1], self.buf[1:]
        return c

    def read_packet(self) -> bytes:
        while True:
            while b"$" not in self.buf or b"#" not in self.buf[self.buf.index(b"$"):] or \
                    len(self.buf) < self.buf.index(b"#", self.buf.index(b"$")) + 3:
                self._fill()
            start = self.buf.index(b"$")
            end = self.buf.index(b"#", start)
            payload = self.buf[start + 1:end]
            assert int(self.buf[end + 1:end + 3], 16) == G.checksum(payload)
            self.buf = self.buf[end + 3:]
            if self.ack:
                self.sock.sendall(b"+")
            return payload

    def ask(self, payload: bytes) -> bytes:
        self.send(payload)
        if self.ack:
            assert self.read_ack() == b"+"
        return self.read_packet()

    def no_ack(self):
        assert self.ask(b"QStartNoAckMode") == b"OK"
        self.ack = False


@pytest.fixture
def stub_pair():
    """(client, target, result dict, thread) with a stub serving in a thread."""
    made = []

    def make(target=None):
        a, b = socket.socketpair()
        target = target or FakeTarget()
        stub = G.GdbStub(target, b)
        result = {}
        th = threading.Thread(target=lambda: result.setdefault("end", stub.serve()), daemon=True)
        th.start()
        made.append((a, th))
        return Client(a), target, result, th

    yield make
    for a, th in made:
        try:
            a.close()
        except OSError:
            pass
        th.join(5)


def test_register_layout_matches_the_target_description():
    names = [r.name for r in G.REGISTERS]
    assert names[:17] == ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11",
                          "r12", "r13", "r14", "r15", "rip"]
    assert names[17:24] == ["eflags", "cs", "ss", "ds", "es", "fs", "gs"]
    assert names[24:32] == [f"st{i}" for i in range(8)]
    assert names[32:40] == ["fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop"]
    assert names[40:57] == [f"xmm{i}" for i in range(16)] + ["mxcsr"]
    assert G.G_SIZE == 17 * 8 + 7 * 4 + 8 * 10 + 8 * 4 + 16 * 16 + 4 == 536
    root = ET.fromstring(G.TARGET_XML)
    assert root.find("architecture").text == "i386:x86-64"
    feats = {f.get("name"): f for f in root.findall("feature")}
    assert set(feats) == {"org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse"}
    xml_regs = [(r.get("name"), int(r.get("bitsize")), int(r.get("regnum"))) for f in feats.values()
                for r in f.findall("reg")]
    assert xml_regs == [(r.name, r.bits, i) for i, r in enumerate(G.REGISTERS)]
    values = {"rip": 0x401000, "eflags": 0x246, "st0": bytes(range(10)), "xmm15": 1 << 127}
    assert G.unpack_registers(G.pack_registers(values))["rip"] == 0x401000
    block = G.pack_registers(values)
    assert block[G.REGISTER_OFFSET[16]:G.REGISTER_OFFSET[16] + 8] == (0x401000).to_bytes(8, "little")


def test_framing_acks_and_nak_resend(stub_pair):
    c, t, res, th = stub_pair()
    c.send_raw(b"+")  # a stray ack before the first packet is ignored
    assert c.ask(b"qC") == b"QC1"
    # a packet with a wrong checksum is refused with '-'; the retransmission is answered
    c.send_raw(b"$qC#00")
    assert c.read_ack() == b"-"
    assert c.ask(b"qC") == b"QC1"
    # '-' from gdb: the stub sends its last packet again
    c.send_raw(b"-")
    assert c.read_packet() == b"QC1"
    assert c.ask(b"qAttached") == b"1"
    assert c.ask(b"qfThreadInfo") == b"m1" and c.ask(b"qsThreadInfo") == b"l"
    assert c.ask(b"Hg0") == b"OK" and c.ask(b"Hc-1") == b"OK" and c.ask(b"T1") == b"OK"
    assert c.ask(b"T2").startswith(b"E")
    assert c.ask(b"qOffsets") == b"Text=0;Data=0;Bss=0"
    assert c.ask(b"vMustReplyEmpty") == b""
    assert c.ask(b"qSymbol::") == b"OK"
    c.no_ack()
    c.send(b"qC")
    assert c.read_packet() == b"QC1"  # no '+' in front any more
    c.send(b"D")
    assert c.read_packet() == b"OK"
    th.join(5)
    assert res["end"].how == "detached" and t.calls == ["detach"]


def test_qsupported_and_target_xml_in_chunks(stub_pair):
    c, t, res, th = stub_pair()
    feats = c.ask(b"qSupported:multiprocess+;swbreak+;hwbreak+;xmlRegisters=i386").split(b";")
    assert b"qXfer:features:read+" in feats and b"swbreak+" in feats and b"hwbreak+" in feats
    assert b"vContSupported+" in feats and any(f.startswith(b"PacketSize=") for f in feats)
    assert not any(f.startswith(b"Reverse") for f in feats)
    xml, off = b"", 0
    while True:
        reply = c.ask(b"qXfer:features:read:target.xml:%x,%x" % (off, 100))
        data = G.unescape_binary(reply[1:])
        xml += data
        off += len(data)
        if reply[:1] == b"l":
            break
        assert reply[:1] == b"m"
    assert xml == G.TARGET_XML
    assert c.ask(b"qXfer:features:read:other.xml:0,100").startswith(b"E")
    assert c.ask(b"vCont?") == b"vCont;c;C;s;S"
    assert c.ask(b"bc") == b""  # no reverse execution on a live target


def test_reverse_packets_when_the_target_supports_them(stub_pair):
    c, t, res, th = stub_pair(ReverseFake())
    feats = c.ask(b"qSupported").split(b";")
    assert b"ReverseStep+" in feats and b"ReverseContinue+" in feats
    assert c.ask(b"bs") == b"T05thread:1;"
    assert c.ask(b"bc") == b"T05thread:1;replaylog:begin;"
    assert t.calls == ["reverse_step", "reverse_continue"]


def test_registers_memory_and_breakpoints(stub_pair):
    c, t, res, th = stub_pair()
    assert c.ask(b"g") == bytes(G.G_SIZE).hex().encode()
    assert c.ask(b"G" + b"11" * G.G_SIZE) == b"OK" and t.regs == bytearray(b"\x11" * G.G_SIZE)
    assert c.ask(b"G1122").startswith(b"E")  # wrong size
    assert c.ask(b"P10=0010400000000000") == b"OK"
    assert c.ask(b"p10") == b"0010400000000000"
    assert c.ask(b"p11") == b"11111111"  # eflags: 4 bytes
    assert c.ask(b"p99") == b"E22"
    assert c.ask(b"m1000,4") == b"00010203"
    assert c.ask(b"m1ffe,4") == b"feff"  # runs off the mapped page: the readable prefix
    assert c.ask(b"m5000,4") == b"E14"
    assert c.ask(b"M1000,2:abcd") == b"OK" and c.ask(b"m1000,2") == b"abcd"
    assert c.ask(b"M5000,1:00") == b"E14"
    # binary write with escapes: bytes # $ } * go as } + (byte ^ 0x20)
    raw = bytes([0x23, 0x24, 0x7D, 0x2A, 0x03])
    assert c.ask(b"X1010,0:") == b"OK"
    assert c.ask(b"X1010,5:" + G.escape_binary(raw)) == b"OK"
    assert c.ask(b"m1010,5") == raw.hex().encode()
    for i in range(4):
        assert c.ask(b"Z1,%x,1" % (0x2000 + i)) == b"OK"
    assert c.ask(b"Z0,3000,1") == b"E28"
    assert c.ask(b"z1,2000,1") == b"OK"
    assert c.ask(b"Z2,1000,8") == b"OK"
    assert (2, 0x1000, 8) in t.breakpoints


def test_unsupported_breakpoint_kinds_get_an_empty_reply(stub_pair):
    t = FakeTarget()
    t.breakpoint_kinds = (0, 1, 2)
    c, t, res, th = stub_pair(t)
    assert c.ask(b"Z3,1000,4") == b""
    assert c.ask(b"Z4,1000,4") == b""
    assert c.ask(b"Z0,1000,1") == b"OK"


@pytest.mark.parametrize("stop,reply", [
    (G.Stop("breakpoint", G.SIGTRAP, hardware=True), b"T05thread:1;hwbreak:;"),
    (G.Stop("breakpoint", G.SIGTRAP, hardware=False), b"T05thread:1;swbreak:;"),
    (G.Stop("watchpoint", G.SIGTRAP, watch_addr=0x404000), b"T05thread:1;watch:404000;"),
    (G.Stop("watchpoint", G.SIGTRAP, watch_addr=0x10, watch_kind="awatch"), b"T05thread:1;awatch:10;"),
    (G.Stop("step", G.SIGTRAP), b"T05thread:1;"),
    (G.Stop("exit", code=0x1FF), b"Wff"),
    (G.Stop("exit", code=0), b"W00"),
    (G.Stop("fault", G.SIGSEGV), b"X0b"),
])
def test_stop_replies(stub_pair, stop, reply):
    c, t, res, th = stub_pair()
    t.next_stop = stop
    assert c.ask(b"vCont;c:1") == reply
    assert c.ask(b"?") == reply
    if stop.alive:
        assert c.ask(b"vCont;s:1;c") == reply and t.calls == ["cont", "step"]
        assert c.ask(b"c") == reply and c.ask(b"s") == reply and c.ask(b"C05") == reply
    else:  # the guest is gone: resuming again only repeats how it ended
        assert c.ask(b"c") == reply and t.calls == ["cont"]


def test_interrupt_byte_while_running(stub_pair):
    c, t, res, th = stub_pair()
    t.block = True
    c.send(b"vCont;c")
    assert c.read_ack() == b"+"
    assert t.running.wait(10)
    c.send_raw(b"\x03")
    assert c.read_packet() == b"T02thread:1;"
    assert c.ask(b"qC") == b"QC1"  # still serving


def test_connection_dropped_while_running_stops_the_guest(stub_pair):
    c, t, res, th = stub_pair()
    t.block = True
    c.send(b"c")
    assert t.running.wait(10)
    c.sock.close()
    th.join(10)
    assert t.interrupted.is_set()
    assert res["end"].how == "disconnected"


@pytest.mark.parametrize("garbage,how", [
    (b"$" + b"A" * (G.MAX_PACKET + 10), "protocol-error"),  # no end in sight
    (b"$qC#zz", "protocol-error"),  # the checksum is not hex
    (b"\xff" * (G.MAX_JUNK + 10), "protocol-error"),  # not the protocol at all
], ids=["endless-packet", "bad-checksum-digits", "junk"])
def test_malformed_input_ends_the_session_cleanly(stub_pair, garbage, how):
    c, t, res, th = stub_pair()
    try:
        c.send_raw(garbage)
        c.sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    th.join(10)
    assert not th.is_alive()
    assert res["end"].how == how


def test_repeated_bad_checksums_end_the_session(stub_pair):
    c, t, res, th = stub_pair()
    for _ in range(G.MAX_NAKS + 1):
        c.send_raw(b"$qC#00")
    th.join(10)
    assert res["end"].how == "protocol-error"


def test_bad_arguments_get_an_error_reply_and_the_session_goes_on(stub_pair):
    c, t, res, th = stub_pair()
    for bad in (b"mzz,1", b"m1000", b"Pxx=00", b"Z1,12", b"M1000,2:abc", b"Hgzz", b"vCont;"):
        assert c.ask(bad).startswith(b"E"), bad
    assert c.ask(b"qC") == b"QC1"


def test_kill_and_vkill(stub_pair):
    c, t, res, th = stub_pair()
    assert c.ask(b"vKill;1") == b"OK"
    th.join(5)
    assert res["end"].how == "killed" and t.calls == ["kill"]
    c2, t2, res2, th2 = stub_pair()
    c2.send(b"k")
    assert c2.read_ack() == b"+"
    th2.join(5)
    assert res2["end"].how == "killed" and t2.calls == ["kill"]


def test_target_errors_never_escape(stub_pair):
    class Broken(FakeTarget):
        def read_registers(self):
            raise RuntimeError("boom")

    c, t, res, th = stub_pair(Broken())
    c.send(b"g")
    th.join(5)
    assert res["end"].how == "error" and "boom" in res["end"].message


def test_watch_pieces():
    from tracevisor.debugtarget import watch_pieces

    assert watch_pieces(0x1000, 8) == [(0x1000, 8)]
    assert watch_pieces(0x1001, 4) == [(0x1001, 1), (0x1002, 2), (0x1004, 1)]
    assert watch_pieces(0x1004, 12) == [(0x1004, 4), (0x1008, 8)]
    assert sum(n for _, n in watch_pieces(0x1003, 29)) == 29


def test_x87_tag_word_conversion():
    from tracevisor.debugtarget import abridged_tag, full_tag_word

    one = (1 << 63).to_bytes(8, "little") + (0x3FFF).to_bytes(2, "little")  # 1.0: valid
    zero = bytes(10)
    regs = [one, zero] + [zero] * 6
    # TOP = 6: st0 is physical 6, st1 physical 7; the rest empty
    fsw = 6 << 11
    word = full_tag_word(0b1100_0000, fsw, regs)
    assert word == 0x3FFF & ~(0xF << 12) | (0b01 << 14)
    assert abridged_tag(word) == 0b1100_0000
    assert full_tag_word(0, 0, regs) == 0xFFFF


def test_parse_gdb_address():
    from tracevisor.debugtarget import parse_gdb_address
    from tracevisor.errors import TracevisorError

    assert parse_gdb_address("1234") == ("127.0.0.1", 1234)
    assert parse_gdb_address("0.0.0.0:1234") == ("0.0.0.0", 1234)
    assert parse_gdb_address(":99") == ("127.0.0.1", 99)
    assert parse_gdb_address("[::1]:5") == ("::1", 5)
    for bad in ("", "x", "host:", "1:70000", "[::1]5"):
        with pytest.raises(TracevisorError):
            parse_gdb_address(bad)


# == the live target, in-process =====================================================================

@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    """The debug demo guest with DWARF, unoptimised (variables stay visible), as ET_EXEC and as PIE."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is needed to build the test guests")
    from tracevisor import guestbuild

    d = tmp_path_factory.mktemp("gdbdemo")
    src = d / "gdbdemo.c"
    src.write_text(DEMO_SOURCE)
    (d / "pie").mkdir()
    return {"exec": guestbuild.build_program(src, d, extra_cflags=("-g", "-O0")),
            "pie": guestbuild.build_program(src, d / "pie", variant="pie", extra_cflags=("-g", "-O0"))}


def symbols(path) -> dict[str, int]:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols()}


@pytest.fixture
def live(demo):
    from tracevisor import session
    from tracevisor.debugtarget import LiveTarget

    sessions = []

    def make(variant="exec", args=(), **kw):
        path = demo[variant]
        s = session.build_debug(session.SessionConfig(kernel=str(path), args=list(args), quiet=True))
        sessions.append(s)
        s.boot()
        return LiveTarget(s.machine, **kw), symbols(path)

    yield make
    for s in sessions:
        s.close()


def rip_of(target) -> int:
    return int.from_bytes(target.read_register(G.REGISTER_NUMBER["rip"]), "little")


@pytest.mark.kvm
def test_probe_reports_what_this_host_can_do():
    from tracevisor.debugtarget import probe_guest_debug

    p = probe_guest_debug()
    assert set(p) == {"exec_breakpoints", "data_breakpoints", "int3"}
    assert p["exec_breakpoints"]  # everything below relies on it


@pytest.mark.kvm
def test_live_breakpoints_step_registers_memory(live):
    t, sym = live()
    assert t.offsets == 0
    assert rip_of(t) == sym["_start"]
    assert t.insert_breakpoint(G.BP_SOFTWARE, sym["square"], 1)
    stop = t.cont()
    assert (stop.reason, stop.hardware) == ("breakpoint", False)
    assert rip_of(t) == sym["square"]
    regs = G.unpack_registers(t.read_registers())
    assert regs["rip"] == sym["square"] and regs["rdi"] == 1 and regs["cs"] == 0x8
    # continuing from a breakpoint steps off it first and stops there again on the next call
    stop = t.cont()
    assert stop.reason == "breakpoint" and G.unpack_registers(t.read_registers())["rdi"] == 2
    # a single step moves on by one instruction
    assert t.step().reason == "step" and rip_of(t) > sym["square"]
    # writing registers: rdi, then the whole block
    t.write_register(G.REGISTER_NUMBER["rdi"], (77).to_bytes(8, "little"))
    assert G.unpack_registers(t.read_registers())["rdi"] == 77
    t.write_register(G.REGISTER_NUMBER["rdi"], (2).to_bytes(8, "little"))
    block = t.read_registers()
    t.write_registers(block)
    assert t.read_registers() == block
    with pytest.raises(G.TargetError):
        t.write_register(G.REGISTER_NUMBER["cs"], (0x10).to_bytes(4, "little"))
    # memory by virtual address
    assert t.read_memory(sym["greeting"], 9) == b"debug me\0"
    with pytest.raises(G.TargetError) as e:
        t.read_memory(0x7FFF_0000_0000, 4)
    assert e.value.errno == 14
    # slots: Z0 and Z1 share four debug registers
    assert t.remove_breakpoint(G.BP_SOFTWARE, sym["square"], 1)
    for i in range(4):
        assert t.insert_breakpoint(G.BP_HARDWARE if i % 2 else G.BP_SOFTWARE, sym["main"] + i, 1)
    assert not t.insert_breakpoint(G.BP_SOFTWARE, sym["square"], 1)
    for i in range(4):
        t.remove_breakpoint(G.BP_HARDWARE if i % 2 else G.BP_SOFTWARE, sym["main"] + i, 1)
    assert t.insert_breakpoint(G.BP_HARDWARE, sym["square"], 1)
    stop = t.cont()
    assert (stop.reason, stop.hardware) == ("breakpoint", True)
    t.remove_breakpoint(G.BP_HARDWARE, sym["square"], 1)
    stop = t.cont()
    assert (stop.reason, stop.code) == ("exit", 0)
    assert t.cont().reason == "exit"  # stays ended


@pytest.mark.kvm
def test_live_watchpoint_by_stepping(live):
    t, sym = live(watchpoints="step")
    assert G.WATCH_ACCESS not in t.breakpoint_kinds  # value comparison cannot see reads
    assert t.insert_breakpoint(G.WATCH_WRITE, sym["counter"], 8)
    assert t.insert_breakpoint(G.BP_SOFTWARE, sym["square"], 1)
    assert t.cont().reason == "breakpoint"
    stop = t.cont()
    assert (stop.reason, stop.watch_addr) == ("watchpoint", sym["counter"])
    assert t.read_memory(sym["counter"], 8) == (1).to_bytes(8, "little")
    assert t.cont().reason == "breakpoint"  # the next call of square, found while stepping
    assert G.unpack_registers(t.read_registers())["rdi"] == 2


@pytest.mark.kvm
def test_live_hw_watchpoints_use_slots(live):
    from tracevisor.debugtarget import probe_guest_debug

    t, sym = live(watchpoints="hw")
    assert G.WATCH_ACCESS in t.breakpoint_kinds
    assert t.insert_breakpoint(G.WATCH_WRITE, sym["counter"] + 1, 4)  # unaligned: 3 pieces
    assert sum(s is not None for s in t.slots) == 3
    assert not t.insert_breakpoint(G.WATCH_ACCESS, sym["counter"], 16)
    assert t.insert_breakpoint(G.WATCH_ACCESS, sym["greeting"], 8)
    t.remove_breakpoint(G.WATCH_WRITE, sym["counter"] + 1, 4)
    t.remove_breakpoint(G.WATCH_ACCESS, sym["greeting"], 8)
    assert t.insert_breakpoint(G.WATCH_WRITE, sym["counter"], 8)
    stop = t.cont()
    if probe_guest_debug()["data_breakpoints"]:
        assert (stop.reason, stop.watch_addr) == ("watchpoint", sym["counter"])
    else:  # nested KVM: the data breakpoint never fires and the guest runs to its end
        assert (stop.reason, stop.code) == ("exit", 0)


@pytest.mark.kvm
def test_live_int3_backend(live):
    """int3 patching: reads show the guest's bytes; what running into it does depends on the host."""
    from tracevisor.debugtarget import probe_guest_debug

    t, sym = live(sw_breakpoints="int3")
    before = t.read_memory(sym["square"], 4)
    assert t.insert_breakpoint(G.BP_SOFTWARE, sym["square"], 1)
    assert t.read_memory(sym["square"], 4) == before
    assert t.machine.memory.read(sym["square"], 1) == b"\xcc"
    stop = t.cont()
    if probe_guest_debug()["int3"]:
        assert stop.reason == "breakpoint" and rip_of(t) == sym["square"]
    else:  # nested KVM: KVM_EXIT_INTERNAL_ERROR, suberror 1, at the int3
        assert (stop.reason, stop.signal) == ("fault", G.SIGILL)
        assert t.final.report["suberror"] == 1
        assert t.final.report["code_bytes"].startswith("cc ")
        assert t.final.report["regs"]["rip"] == sym["square"]


@pytest.mark.kvm
def test_live_interrupt_a_spinning_guest(live):
    t, sym = live(args=[b"spin"])
    timer = threading.Timer(0.5, t.interrupt)
    timer.start()
    try:
        stop = t.cont()
    finally:
        timer.cancel()
    assert (stop.reason, stop.signal) == ("interrupt", G.SIGINT)
    assert int.from_bytes(t.read_memory(sym["counter"], 8), "little") > 0
    # an interrupt that arrives before the run starts is not lost
    t.interrupt()
    assert t.cont().reason == "interrupt"
    t.kill()
    assert t.cont().reason == "killed"


@pytest.mark.kvm
def test_live_pie_offsets(live):
    t, sym = live("pie")
    assert t.offsets == 0x400000
    assert t.insert_breakpoint(G.BP_HARDWARE, 0x400000 + sym["square"], 1)
    assert t.cont().reason == "breakpoint"
    assert rip_of(t) == 0x400000 + sym["square"]


@pytest.mark.kvm
def test_live_detach_runs_to_the_end(live):
    t, sym = live()
    assert t.insert_breakpoint(G.BP_SOFTWARE, sym["square"], 1)
    assert t.cont().reason == "breakpoint"
    t.detach()
    info = t.run_to_end()
    assert (info.reason, info.code) == ("exit", 0)


# == the real gdb against `tracevisor run --gdb` =====================================================

def _need_gdb():
    if shutil.which("gdb") is None:
        if os.environ.get("TRACEVISOR_REQUIRE_KVM") == "1":
            pytest.fail("gdb is not installed (the CI script installs it)")
        pytest.skip("gdb is not installed")


class Hypervisor:
    """`tracevisor run --gdb 127.0.0.1:0 …` as a subprocess; .port is the port it listens on."""

    def __init__(self, tmp_path: Path, *args: str):
        self.out = tmp_path / "hv.out"
        self.err = tmp_path / "hv.err"
        env = dict(os.environ)
        env.pop("TRACEVISOR_KVM_DEVICE", None)
        env.pop("HERMIT_GDB_PORT", None)
        with open(self.out, "wb") as o, open(self.err, "wb") as e:
            self.proc = subprocess.Popen([sys.executable, "-m", "tracevisor", "run", "--no-host-env",
                                          "--gdb", "127.0.0.1:0", *args], stdout=o, stderr=e, env=env,
                                         cwd=REPO, preexec_fn=reset_child_signals)
        self.port = self._wait_port()

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            m = re.search(r"waiting for gdb on 127\.0\.0\.1:(\d+) \(target remote 127\.0\.0\.1:\1\)",
                          self.err.read_text(errors="replace"))
            if m:
                return int(m.group(1))
            if self.proc.poll() is not None:
                raise AssertionError(f"the hypervisor ended early: {self.err.read_text()}")
            time.sleep(0.05)
        raise AssertionError("the hypervisor never said where it waits for gdb")

    def connect(self) -> Client:
        return Client(socket.create_connection(("127.0.0.1", self.port), timeout=20))

    def wait(self, timeout=60) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout)
        return rc, self.out.read_text(errors="replace"), self.err.read_text(errors="replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def hypervisor(tmp_path):
    started = []

    def start(*args):
        hv = Hypervisor(tmp_path, *args)
        started.append(hv)
        return hv

    yield start
    for hv in started:
        hv.kill()


def run_gdb(tmp_path: Path, kernel: Path, port: int, commands: str) -> str:
    script = tmp_path / "cmds.gdb"
    script.write_text(f"set pagination off\nset confirm off\ntarget remote 127.0.0.1:{port}\n{commands}\n")
    r = subprocess.run(["gdb", "-nx", "-batch", "-x", str(script), str(kernel)], capture_output=True,
                       text=True, timeout=120)
    return r.stdout + r.stderr


@pytest.mark.kvm
def test_gdb_session_on_an_exec_guest(demo, hypervisor, tmp_path):
    _need_gdb()
    sym = symbols(demo["exec"])
    hv = hypervisor(str(demo["exec"]))
    out = run_gdb(tmp_path, demo["exec"], hv.port, """
break *square
continue
info registers rip
print $rdi
stepi
info registers rip
delete
break square
continue
print x
bt
x/s greeting
print counter
watch counter
continue
delete
continue
""")
    rc, stdout, stderr = hv.wait()
    assert f"rip            {sym['square']:#x}" in out, out
    assert "<square>" in out
    assert "$1 = 1" in out
    rips = re.findall(r"^rip +(0x[0-9a-f]+)", out, re.M)
    assert len(rips) == 2 and int(rips[1], 16) > sym["square"], out
    assert "square (x=1) at" in out and "$2 = 1" in out
    assert "in main (argc=1" in out
    assert '<greeting>:\t"debug me"' in out
    assert "Old value = 0" in out and "New value = 1" in out, out
    assert "exited normally" in out, out
    assert rc == 0, stderr
    assert "debug me: total=14 counter=6" in stdout
    assert "Traceback" not in stderr


@pytest.mark.kvm
def test_gdb_session_on_a_pie_guest(demo, hypervisor, tmp_path):
    _need_gdb()
    sym = symbols(demo["pie"])
    hv = hypervisor(str(demo["pie"]))
    out = run_gdb(tmp_path, demo["pie"], hv.port, """
break *square
continue
info registers rip
print x
x/s greeting
continue
""")
    rc, stdout, stderr = hv.wait()
    assert f"rip            {0x400000 + sym['square']:#x}" in out, out
    assert '"debug me"' in out
    # the session ends with the script: gdb detaches and the guest runs to its end
    assert rc == 0, stderr
    assert "debug me: total=14 counter=6" in stdout


@pytest.mark.kvm
def test_gdb_reports_the_exit_code(guests, hypervisor, tmp_path):
    _need_gdb()
    hv = hypervisor(str(guests["exitcode"]), "7")
    out = run_gdb(tmp_path, guests["exitcode"], hv.port, "continue")
    rc, stdout, stderr = hv.wait()
    assert "exited with code 07" in out, out
    assert rc == 7


@pytest.mark.kvm
def test_gdb_sees_a_guest_fault(hypervisor, tmp_path):
    _need_gdb()
    from helpers import build_asm

    kernel = build_asm(tmp_path, "ud", "  nop\n  ud2\n")  # #UD with no IDT: a triple fault
    hv = hypervisor(str(kernel))
    out = run_gdb(tmp_path, kernel, hv.port, "continue")
    rc, stdout, stderr = hv.wait()
    assert "Program terminated with signal SIGSEGV" in out, out
    assert rc == 3 and "triple fault" in stderr and "Traceback" not in stderr


class Terminal:
    """gdb in a pseudo-terminal, so that Ctrl-C reaches it as in a shell."""

    def __init__(self, argv):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become gdb
            os.execvp(argv[0], argv)
        self.out = b""
        self.pos = 0  # output before this was matched by an earlier expect()

    def expect(self, text: bytes, timeout=60.0) -> None:
        """Wait for ``text`` in the output not yet matched (like pexpect): output that arrived together with
        an earlier match (a stop message and the prompt in one read) counts."""
        import select

        deadline = time.monotonic() + timeout
        while (found := self.out.find(text, self.pos)) < 0:
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from gdb; got {self.out.decode(errors='replace')}")
            r, _, _ = select.select([self.fd], [], [], 0.2)
            if r:
                try:
                    self.out += os.read(self.fd, 4096)
                except OSError:
                    raise AssertionError(f"gdb went away: {self.out.decode(errors='replace')}") from None
        self.pos = found + len(text)

    def send(self, data: bytes) -> None:
        os.write(self.fd, data)

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        os.close(self.fd)


def test_terminal_expect_sees_output_that_came_with_the_previous_match():
    """A stop message and the prompt often arrive in one read: the second expect() must find the prompt in
    what was already read (it used to wait its whole timeout for output that had come)."""
    term = Terminal(["sh", "-c", "printf 'Program received signal SIGINT\\n(gdb) '; sleep 30"])
    try:
        term.expect(b"Program received signal SIGINT", timeout=20)
        started = time.monotonic()
        term.expect(b"(gdb) ", timeout=5)
        assert time.monotonic() - started < 1
        with pytest.raises(AssertionError, match="no b'SIGINT'"):
            term.expect(b"SIGINT", timeout=0.5)  # already matched: consumed, not found again
    finally:
        term.close()


@pytest.mark.kvm
def test_gdb_ctrl_c_interrupts_a_spinning_guest(demo, hypervisor):
    _need_gdb()
    hv = hypervisor(str(demo["exec"]), "spin")
    term = Terminal(["gdb", "-nx", "-q", "-ex", "set confirm off", "-ex", "set pagination off",
                     "-ex", "set style enabled off", "-ex", f"target remote 127.0.0.1:{hv.port}",
                     str(demo["exec"])])
    try:
        term.expect(b"(gdb) ")
        for _ in range(2):
            term.send(b"continue\n")
            term.expect(b"Continuing.")
            time.sleep(0.5)
            term.send(b"\x03")
            term.expect(b"Program received signal SIGINT")
            term.expect(b"(gdb) ")
            term.send(b"print counter > 0\n")
            term.expect(b"= 1")
        term.send(b"kill\n")
        term.expect(b"killed")
        term.send(b"quit\n")
    finally:
        term.close()
    rc, stdout, stderr = hv.wait()
    assert rc == 137 and "Traceback" not in stderr


@pytest.mark.kvm
def test_interrupt_and_kill_over_a_raw_socket(demo, hypervisor):
    hv = hypervisor(str(demo["exec"]), "spin")
    c = hv.connect()
    assert c.ask(b"?") == b"T05thread:1;"
    c.no_ack()
    c.send(b"vCont;c")
    time.sleep(0.5)
    c.send_raw(b"\x03")
    assert c.read_packet() == b"T02thread:1;"
    counter = symbols(demo["exec"])["counter"]
    assert int.from_bytes(bytes.fromhex(c.ask(b"m%x,8" % counter).decode()), "little") > 0
    assert c.ask(b"vKill;1") == b"OK"
    rc, stdout, stderr = hv.wait()
    assert rc == 137
    assert "killed by the debugger" in stderr and "Traceback" not in stderr


@pytest.mark.kvm
def test_detach_lets_the_guest_finish(demo, hypervisor):
    hv = hypervisor(str(demo["exec"]))
    c = hv.connect()
    assert c.ask(b"Z0,%x,1" % symbols(demo["exec"])["square"]) == b"OK"
    assert c.ask(b"c") == b"T05thread:1;swbreak:;"
    assert c.ask(b"D") == b"OK"
    rc, stdout, stderr = hv.wait()
    assert rc == 0 and "debug me: total=14 counter=6" in stdout


@pytest.mark.kvm
@pytest.mark.parametrize("garbage", [b"$" + b"A" * (G.MAX_PACKET + 100), b"$g#qq"],
                         ids=["endless-packet", "bad-checksum-digits"])
def test_malformed_packet_drops_the_connection_and_stops_the_vm(demo, hypervisor, garbage):
    hv = hypervisor(str(demo["exec"]))
    c = hv.connect()
    c.send_raw(garbage)
    rc, stdout, stderr = hv.wait()
    assert rc == 1
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("tracevisor: waiting for gdb")]
    assert len(lines) == 1 and lines[0].startswith("tracevisor: gdb protocol error"), stderr
    assert stdout == ""


@pytest.mark.kvm
def test_dropped_connection_stops_the_vm(demo, hypervisor):
    hv = hypervisor(str(demo["exec"]))
    c = hv.connect()
    assert c.ask(b"qC") == b"QC1"
    c.sock.close()
    rc, stdout, stderr = hv.wait()
    assert rc == 1
    assert "gdb disconnected without detaching" in stderr and "Traceback" not in stderr


@pytest.mark.kvm
def test_sigint_while_waiting_for_gdb(demo, hypervisor):
    hv = hypervisor(str(demo["exec"]))
    hv.proc.send_signal(signal.SIGINT)
    rc, stdout, stderr = hv.wait()
    assert rc == 130 and "Traceback" not in stderr


def test_gdb_needs_one_vcpu_and_a_good_address(tmp_path):
    from helpers import run_cli

    r = run_cli("run", "--gdb", "1234", "-c", "2", "no-such-kernel")
    assert r.returncode == 1
    assert b"use -c 1" in r.stderr and b"Traceback" not in r.stderr
    r = run_cli("run", "--gdb", "localhost:http", "no-such-kernel")
    assert r.returncode == 1 and b"bad gdb port" in r.stderr
    r = run_cli("run", "-s", "99999", "no-such-kernel")
    assert r.returncode == 1 and b"bad gdb port" in r.stderr
