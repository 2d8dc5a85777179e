"""Exit dispatch without KVM: decoded exits fed to the ExitDispatcher, over real guest memory, a real
LiveHostIO and a list trace sink.  Port I/O, string I/O, MMIO, HLT, shutdown, internal error."""

from __future__ import annotations

import struct

import pytest

from tracevisor import hypercalls
from tracevisor.clock import Clock
from tracevisor.errors import GuestError
from tracevisor.hostio import Console, LiveHostIO
from tracevisor.kvm import uapi as U
from tracevisor.memory import GuestMemory
from tracevisor.reports import Reporter
from tracevisor.runloop import IO_DATA_OFFSET, Exit, ExitDispatcher, GuestExit, Ports, VcpuState, VmStop
from tracevisor.sandbox import Sandbox
from tracevisor.status import ExitStatus, StopReason


class ListSink:
    def __init__(self):
        self.exits, self.events, self.digests = [], [], []

    def exit(self, cpu, t, reason, rip, port=0, direction=0, size=0, value=0, digest=0):
        self.exits.append((cpu, reason, rip, port, direction, size, value))
        self.digests.append(digest)

    def event(self, kind, cpu, t, **fields):
        self.events.append((kind, cpu, fields))
        return len(self.events)


@pytest.fixture()
def world():
    mem = GuestMemory(1 << 20)
    out = []
    hostio = LiveHostIO(Sandbox([]), [b"k"], [], Console(quiet=True))
    v = VcpuState(0, None, hypercalls.Context(0, mem, hostio, lambda: 0, paging=False))
    v.uart = out.append
    logs = []
    sink = ListSink()
    ports = Ports()
    d = ExitDispatcher(ports, sink, Clock(), Reporter(mem, logs.append))
    yield d, v, sink, out, logs, mem
    mem.close()


def io_exit(direction, port, size, values, rip=0x401000):
    buf = bytearray(IO_DATA_OFFSET + 64)
    fmt = {1: "<B", 2: "<H", 4: "<I"}[size]
    for i, value in enumerate(values):
        struct.pack_into(fmt, buf, IO_DATA_OFFSET + i * size, value)
    return Exit(U.KVM_EXIT_IO, rip, direction, size, 0x800 if port is None else port, len(values) or 1,
                IO_DATA_OFFSET, buf)


def test_out_to_uart_is_traced_and_served(world):
    d, v, sink, out, _, _ = world
    d.dispatch(v, io_exit(1, 0x800, 1, [ord("A")]))
    assert out == [b"A"]
    assert sink.exits == [(0, 2, 0x401000, 0x800, 1, 1, ord("A"))]


def test_string_out_is_one_access_per_element(world):
    d, v, sink, out, _, _ = world
    d.dispatch(v, io_exit(1, 0x800, 1, list(b"hey")))
    assert b"".join(out) == b"hey"
    assert [e[6] for e in sink.exits] == list(b"hey")


def test_in_answers_into_the_data_area(world):
    d, v, sink, _, _, _ = world
    d.ports.register((0x60,), in_handler=lambda v, port, size: 0x1234)
    e = io_exit(0, 0x60, 2, [0, 0])
    d.dispatch(v, e)
    assert struct.unpack_from("<HH", e.buf, IO_DATA_OFFSET) == (0x1234, 0x1234)
    assert [x[4] for x in sink.exits] == [0, 0] and [x[6] for x in sink.exits] == [0x1234, 0x1234]


def test_unknown_in_port_reads_all_ones_and_is_noted_once(world):
    d, v, _, _, logs, _ = world
    for _ in range(3):
        e = io_exit(0, 0x1234, 1, [0])
        d.dispatch(v, e)
        assert e.buf[IO_DATA_OFFSET] == 0xFF
    assert len(logs) == 1 and "0x1234" in logs[0]


def test_unknown_out_port_stops_with_a_guest_error(world):
    d, v, _, _, _, _ = world
    with pytest.raises(VmStop) as ei:
        d.dispatch(v, io_exit(1, 0x1234, 4, [7]))
    info = ei.value.info
    assert info.reason == StopReason.GUEST_ERROR and info.status == ExitStatus.GUEST_FAULT
    assert "registers_error" in info.report  # no vCPU behind it: the report says so instead of failing


def test_malformed_string_io_stops(world):
    d, v, _, _, _, _ = world
    e = io_exit(1, 0x800, 1, [0])
    e.count = 1 << 20  # beyond the data area
    with pytest.raises(VmStop) as ei:
        d.dispatch(v, e)
    assert "malformed I/O exit" in ei.value.info.message


def test_exit_hypercall_ends_the_vcpu(world):
    d, v, sink, _, _, mem = world
    mem.write(0x1000, struct.pack("<i", 7))
    with pytest.raises(GuestExit) as ei:
        d.dispatch(v, io_exit(1, 0x540, 4, [0x1000]))
    assert ei.value.code == 7
    assert sink.events[0][0] == "hypercall" and sink.events[0][2]["call"] == "exit"


def test_hypercall_with_a_bad_block_is_a_guest_error_event(world):
    d, v, sink, _, _, _ = world
    with pytest.raises(GuestError):
        d.dispatch(v, io_exit(1, 0x400, 4, [0xFFFF_FFF0]))
    assert "error" in sink.events[0][2]


def test_mmio_read_outside_ram_answers_all_ones(world):
    d, v, sink, _, logs, _ = world
    data = bytearray(8)
    d.dispatch(v, Exit(U.KVM_EXIT_MMIO, 0x401000, addr=0xFEE0_0000, length=4, is_write=False, mmio_data=data))
    assert data[:4] == b"\xff" * 4
    assert sink.exits == [(0, U.KVM_EXIT_MMIO, 0x401000, 0, 0, 0, 0)]
    assert sink.events[0][0] == "mmio" and sink.events[0][2]["data"] == b"\xff" * 4
    d.dispatch(v, Exit(U.KVM_EXIT_MMIO, 0x401000, addr=0xFEE0_0000, length=4, is_write=True,
                       mmio_data=bytearray(b"abcd\0\0\0\0")))
    assert sink.events[1][2]["data"] == b"abcd" and sink.events[1][2]["write"] is True
    assert len(logs) == 1  # the same address is noted once


def test_hlt_with_interrupts_on_continues_and_off_is_a_hang(world):
    d, v, sink, _, _, _ = world
    d.dispatch(v, Exit(U.KVM_EXIT_HLT, 0x401000, if_flag=1))
    with pytest.raises(VmStop) as ei:
        d.dispatch(v, Exit(U.KVM_EXIT_HLT, 0x401000, if_flag=0))
    assert ei.value.info.reason == StopReason.HANG
    assert [x[1] for x in sink.exits] == [U.KVM_EXIT_HLT, U.KVM_EXIT_HLT]


def test_shutdown_is_a_fault(world):
    d, v, _, _, _, _ = world
    with pytest.raises(VmStop) as ei:
        d.dispatch(v, Exit(U.KVM_EXIT_SHUTDOWN, 0x401000))
    info = ei.value.info
    assert info.reason == StopReason.FAULT and "triple fault" in info.message and info.report["hints"]


def test_internal_error_names_the_suberror(world):
    d, v, _, _, _, _ = world
    with pytest.raises(VmStop) as ei:
        d.dispatch(v, Exit(U.KVM_EXIT_INTERNAL_ERROR, 0x401000, suberror=1, internal_data=(1, 2)))
    info = ei.value.info
    assert info.reason == StopReason.FAULT and "suberror 1 (emulation failure" in info.message
    assert info.report["suberror"] == 1 and info.report["data"] == [1, 2]


def test_unexpected_exit_reason_is_a_fault(world):
    d, v, _, _, _, _ = world
    with pytest.raises(VmStop) as ei:
        d.dispatch(v, Exit(U.KVM_EXIT_NMI, 0))
    assert "unexpected KVM exit NMI (16)" in ei.value.info.message


def test_debug_exit_pauses_without_a_trace_row(world):
    d, v, sink, _, _, _ = world
    with pytest.raises(VmStop) as ei:
        d.dispatch(v, Exit(U.KVM_EXIT_DEBUG, 0x401000, debug={"pc": 0x401000, "dr6": 1}))
    assert ei.value.info.is_paused and ei.value.info.report["debug"]["dr6"] == 1
    assert sink.exits == []


def test_a_new_exit_handler_is_one_table_row(world):
    d, v, sink, _, _, _ = world
    seen = []
    d.handlers[U.KVM_EXIT_NMI] = lambda v, e: seen.append(e.rip)
    d.dispatch(v, Exit(U.KVM_EXIT_NMI, 0x42))
    assert seen == [0x42] and sink.exits[-1][1] == U.KVM_EXIT_NMI
