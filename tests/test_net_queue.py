"""The virtqueue parser and the virtio-net device, driven directly against a GuestMemory (no KVM).

Hostile rings (descriptors outside RAM, overflowing lengths, `next` cycles, a runaway available index) must
end in a clear QueueError, and through the device in DEVICE_NEEDS_RESET plus an `error` event, never in a
host-side exception of another kind.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest

from tracevisor.clock import Clock
from tracevisor.devices import virtio_net as vn
from tracevisor.devices.base import DeviceContext
from tracevisor.devices.pci import CONFIG_DATA, PciBus
from tracevisor.devices.virtqueue import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    QueueError,
    VirtQueue,
    ring_bytes,
)
from tracevisor.errors import GuestError
from tracevisor.memory import GuestMemory
from tracevisor.runloop import Ports
from tracevisor.trace import TraceWriter, open_trace, schema

MIB = 1 << 20
RAM = 16 * MIB
QPFN = {0: 0x100, 1: 0x110}  # RX ring at 1 MiB, TX ring at 1 MiB + 64 KiB
BUF = 0x200000  # buffers from 2 MiB


@pytest.fixture
def mem():
    m = GuestMemory(RAM)
    yield m
    m.close()


def put_desc(mem, qbase, i, addr, length, flags=0, nxt=0):
    mem.write(qbase + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))


def avail_addr(qbase, size=256):
    return qbase + 16 * size


def make_available(mem, qbase, heads, start=0, size=256):
    a = avail_addr(qbase, size)
    for k, h in enumerate(heads):
        mem.write_u16(a + 4 + 2 * ((start + k) % size), h)
    mem.write_u16(a + 2, (start + len(heads)) & 0xFFFF)


# -- the queue parser ------------------------------------------------------------------------------------

def test_ring_layout(mem):
    assert ring_bytes(256) == 8192 + 6 + 8 * 256
    q = VirtQueue(mem, 1, 256, "TX queue")
    q.set_pfn(0x100)
    assert (q.desc_addr, q.avail_addr, q.used_addr) == (0x100000, 0x101000, 0x102000)
    q.set_pfn(0)
    assert not q.ready and q.pending() == 0


def test_pop_and_push(mem):
    q = VirtQueue(mem, 1, 256, "TX queue")
    q.set_pfn(0x100)
    base = q.desc_addr
    put_desc(mem, base, 3, BUF, 10, VRING_DESC_F_NEXT, 7)
    put_desc(mem, base, 7, BUF + 0x100, 60)
    mem.write(BUF, b"H" * 10)
    mem.write(BUF + 0x100, b"F" * 60)
    make_available(mem, base, [3])
    assert q.pending() == 1
    chain = q.pop()
    assert chain.head == 3 and [d.index for d in chain.descs] == [3, 7] and chain.read_len == 70
    assert q.read_chain(chain) == b"H" * 10 + b"F" * 60
    assert q.pop() is None
    assert q.push(chain, 0) == 1
    assert mem.read_u16(q.used_addr + 2) == 1
    assert struct.unpack("<II", mem.read(q.used_addr + 4, 8)) == (3, 0)


def test_write_chain_scatters(mem):
    q = VirtQueue(mem, 0, 256, "RX queue")
    q.set_pfn(0x100)
    put_desc(mem, q.desc_addr, 0, BUF, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1)
    put_desc(mem, q.desc_addr, 1, BUF + 0x1000, 100, VRING_DESC_F_WRITE)
    make_available(mem, q.desc_addr, [0])
    chain = q.pop()
    assert chain.write_len == 104
    assert q.write_chain(chain, b"abcdefgh") == 8
    assert mem.read(BUF, 4) == b"abcd" and mem.read(BUF + 0x1000, 4) == b"efgh"


def test_ring_outside_ram(mem):
    q = VirtQueue(mem, 0, 256, "RX queue")
    with pytest.raises(QueueError, match=r"RX queue: queue PFN 0xfff puts the ring .* outside guest RAM"):
        q.set_pfn(RAM // 4096 - 1)
    with pytest.raises(QueueError, match="outside guest RAM"):
        q.set_pfn(0xFFFF_FFFF)
    assert not q.ready


@pytest.mark.parametrize("addr,length,message", [
    (RAM, 1, "descriptor 0 points outside guest RAM"),
    (RAM - 4, 8, "descriptor 0 points outside guest RAM"),
    (0x1000, 0xFFFF_FFFF, "descriptor 0 points outside guest RAM"),
    (0xFFFF_FFFF_FFFF_F000, 0x2000, "length overflows the 64-bit address"),
])
def test_descriptor_outside_ram(mem, addr, length, message):
    q = VirtQueue(mem, 1, 256, "TX queue")
    q.set_pfn(0x100)
    put_desc(mem, q.desc_addr, 0, addr, length)
    make_available(mem, q.desc_addr, [0])
    with pytest.raises(QueueError, match=message):
        q.pop()
    assert q.last_avail == 0  # nothing was taken


def test_total_length_overflow(mem):
    q = VirtQueue(mem, 1, 256, "TX queue")
    q.set_pfn(0x100)
    for i in range(4):
        put_desc(mem, q.desc_addr, i, BUF, 60000, VRING_DESC_F_NEXT, i + 1)
    put_desc(mem, q.desc_addr, 4, BUF, 60000)
    make_available(mem, q.desc_addr, [0])
    with pytest.raises(QueueError, match=r"holds 180000 bytes by descriptor 2.*length overflow"):
        q.pop()


def test_next_cycle(mem):
    q = VirtQueue(mem, 1, 256, "TX queue")
    q.set_pfn(0x100)
    put_desc(mem, q.desc_addr, 5, BUF, 10, VRING_DESC_F_NEXT, 6)
    put_desc(mem, q.desc_addr, 6, BUF, 10, VRING_DESC_F_NEXT, 5)
    make_available(mem, q.desc_addr, [5])
    with pytest.raises(QueueError, match="descriptor 6 leads back to descriptor 5 .a next cycle"):
        q.pop()


def test_self_loop_and_long_loop_bounded(mem):
    q = VirtQueue(mem, 1, 8, "TX queue")
    q.set_pfn(0x100)
    for i in range(8):  # 0 -> 1 -> ... -> 7 -> 0
        put_desc(mem, q.desc_addr, i, BUF, 1, VRING_DESC_F_NEXT, (i + 1) % 8)
    make_available(mem, q.desc_addr, [0], size=8)
    with pytest.raises(QueueError, match="loops"):
        q.pop()


@pytest.mark.parametrize("avail_idx", [257, 0x8000, 0xFFFF])
def test_huge_avail_index(mem, avail_idx):
    q = VirtQueue(mem, 0, 256, "RX queue")
    q.set_pfn(0x100)
    mem.write_u16(q.avail_addr + 2, avail_idx)
    with pytest.raises(QueueError, match=rf"available index {avail_idx} is {avail_idx} entries ahead .* at most 256"):
        q.pending()


def test_avail_index_wraps(mem):
    q = VirtQueue(mem, 1, 256, "TX queue")
    q.set_pfn(0x100)
    q.last_avail = 0xFFFF
    put_desc(mem, q.desc_addr, 9, BUF, 20)
    make_available(mem, q.desc_addr, [9, 9], start=0xFFFF)
    assert q.pending() == 2
    assert q.pop().head == 9 and q.pop().head == 9 and q.last_avail == 1


@pytest.mark.parametrize("setup,message", [
    (lambda m, b: make_available(m, b, [256]), "names descriptor 256, beyond the 256-entry table"),
    (lambda m, b: (put_desc(m, b, 0, BUF, 4, VRING_DESC_F_NEXT, 999), make_available(m, b, [0])),
     "descriptor 0 has next = 999"),
    (lambda m, b: (put_desc(m, b, 0, BUF, 16, VRING_DESC_F_INDIRECT), make_available(m, b, [0])),
     "INDIRECT"),
    (lambda m, b: (put_desc(m, b, 0, BUF, 4, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 1),
                   put_desc(m, b, 1, BUF, 4), make_available(m, b, [0])),
     "device-readable but follows a device-writable"),
])
def test_other_malformed_chains(mem, setup, message):
    q = VirtQueue(mem, 1, 256, "TX queue")
    q.set_pfn(0x100)
    setup(mem, q.desc_addr)
    with pytest.raises(QueueError, match=message):
        q.pop()


def test_queue_error_is_a_guest_error():
    assert issubclass(QueueError, GuestError)


# -- the device, through its ports, with a stand-in machine -----------------------------------------------

class ListTrace:
    def __init__(self):
        self.events = []

    def event(self, kind, cpu, t, **fields):
        ev = {"k": kind, "seq": len(self.events), "cpu": cpu, "t": t, **fields}
        schema.validate_event(ev)
        self.events.append(ev)
        return ev["seq"]

    def kinds(self, kind, **match):
        return [e for e in self.events if e["k"] == kind and all(e.get(k) == v for k, v in match.items())]


class FakeHostIO:
    def __init__(self):
        self.rx: list[bytes] = []
        self.tx: list[bytes] = []
        self.polls: list[int] = []

    def net_rx(self, cpu, poll):
        self.polls.append(poll)
        return self.rx.pop(0) if self.rx else None

    def net_tx(self, cpu, frame):
        self.tx.append(frame)


class Bench:
    """A device's world without a VM: real guest memory, port table and PCI bus behind the real
    DeviceContext, a fake HostIO, and a trace sink."""

    def __init__(self, memory, trace=None):
        self.memory = memory
        self.pci = PciBus()
        self.ports = Ports()
        self.trace = trace
        self.hostio = FakeHostIO()
        self.logs = []
        self.ctx = DeviceContext(memory, self.ports, self.pci, self.logs.append)
        self.ctx.bind(self.hostio, trace, Clock())

    @property
    def out_ports(self):
        return self.ports.out

    @property
    def in_ports(self):
        return self.ports.inp


V = SimpleNamespace(cpu=0)


class Driver:
    """A minimal legacy driver in Python: the steps the guest SDK's driver takes."""

    def __init__(self, m: Bench, base=vn.IO_BASE):
        self.m, self.base = m, base

    def out(self, off, size, value):
        self.m.out_ports[self.base + off](V, self.base + off, size, value)

    def inp(self, off, size):
        return self.m.in_ports[self.base + off](V, self.base + off, size)

    def init(self, rx_buffers=4):
        self.out(vn.REG_STATUS, 1, 0)
        self.out(vn.REG_STATUS, 1, vn.S_ACKNOWLEDGE)
        self.out(vn.REG_STATUS, 1, vn.S_ACKNOWLEDGE | vn.S_DRIVER)
        assert self.inp(vn.REG_HOST_FEATURES, 4) == vn.F_MAC | vn.F_STATUS
        self.out(vn.REG_GUEST_FEATURES, 4, vn.F_MAC | vn.F_STATUS)
        for q in (0, 1):
            self.out(vn.REG_QUEUE_SEL, 2, q)
            assert self.inp(vn.REG_QUEUE_NUM, 2) == 256
            self.out(vn.REG_QUEUE_PFN, 4, QPFN[q])
        for i in range(rx_buffers):
            put_desc(self.m.memory, QPFN[0] * 4096, i, BUF + 0x1000 * i, 1526, VRING_DESC_F_WRITE)
        make_available(self.m.memory, QPFN[0] * 4096, list(range(rx_buffers)))
        self.out(vn.REG_STATUS, 1, vn.S_ACKNOWLEDGE | vn.S_DRIVER | vn.S_DRIVER_OK)

    def send(self, frame, slot=0, head=0):
        tx = QPFN[1] * 4096
        addr = BUF + 0x100000 + 0x1000 * head
        self.m.memory.write(addr, bytes(10) + frame)
        put_desc(self.m.memory, tx, head, addr, 10 + len(frame))
        make_available(self.m.memory, tx, [head], start=slot)
        self.out(vn.REG_QUEUE_NOTIFY, 2, 1)


@pytest.fixture
def dev(mem):
    m = Bench(mem, ListTrace())
    d = vn.VirtioNet(m.ctx)
    return m, d, Driver(m)


def cfg(bus: PciBus, dev_, fn, off, size=4, bus_no=0):
    bus.write_address(4, 0x8000_0000 | bus_no << 16 | dev_ << 11 | fn << 8 | (off & 0xFC))
    return bus.read_data(CONFIG_DATA + (off & 3), size)


def cfg_write(bus, off, value, size=4):
    bus.write_address(4, 0x8000_0000 | (off & 0xFC))
    bus.write_data(CONFIG_DATA + (off & 3), size, value)


def test_pci_config_space(dev):
    m, d, _ = dev
    bus = m.pci
    assert cfg(bus, 0, 0, 0x00) == 0x1000_1AF4
    assert cfg(bus, 0, 0, 0x08) == 0x0200_0000  # class 02, subclass 00, prog-if 00, revision 0
    assert cfg(bus, 0, 0, 0x0A, 2) == 0x0200
    assert cfg(bus, 0, 0, 0x10) == 0xC001  # an I/O BAR
    assert cfg(bus, 0, 0, 0x2C) == 0x0001_1AF4  # subsystem: virtio network
    assert cfg(bus, 0, 0, 0x3D, 1) == 0  # no interrupt pin
    assert cfg(bus, 0, 0, 0x04, 2) & 1  # I/O decoding enabled
    # absent functions read all-ones
    assert cfg(bus, 0, 1, 0x00) == 0xFFFF_FFFF
    assert cfg(bus, 0, 0, 0x00, bus_no=1) == 0xFFFF_FFFF
    assert cfg(bus, 3, 0, 0x00, 2) == 0xFFFF


def test_bar_sizing_and_moving(dev):
    m, d, drv = dev
    bus = m.pci
    cfg_write(bus, 0x10, 0xFFFF_FFFF)
    assert cfg(bus, 0, 0, 0x10) == 0xFFFF_FFE1  # 32 bytes of I/O space
    assert d.pci.io_base is None  # the all-ones pattern decodes nowhere
    cfg_write(bus, 0x14, 0xFFFF_FFFF)
    assert cfg(bus, 0, 0, 0x14) == 0  # BAR1 is not implemented
    cfg_write(bus, 0x10, 0xC001)
    assert cfg(bus, 0, 0, 0x10) == 0xC001 and d.pci.io_base == 0xC000
    assert drv.inp(vn.REG_MAC, 4) == 0x12005452
    cfg_write(bus, 0x10, 0xD000)  # the guest moves the registers
    assert d.pci.io_base == 0xD000
    assert Driver(m, 0xD000).inp(vn.REG_QUEUE_NUM, 2) == 256
    assert Driver(m, 0xD000).inp(vn.REG_HOST_FEATURES, 4) == vn.HOST_FEATURES
    assert drv.inp(vn.REG_HOST_FEATURES, 4) == 0xFFFF_FFFF  # the old window no longer decodes
    cfg_write(bus, 0x04, 0, 2)  # I/O decoding off
    assert Driver(m, 0xD000).inp(vn.REG_HOST_FEATURES, 4) == 0xFFFF_FFFF


def test_registers(dev):
    m, d, drv = dev
    assert drv.inp(vn.REG_HOST_FEATURES, 4) == (1 << 5) | (1 << 16)
    assert bytes(drv.inp(vn.REG_MAC + i, 1) for i in range(6)) == vn.DEFAULT_MAC
    assert drv.inp(vn.REG_NET_STATUS, 2) == 1
    drv.out(vn.REG_QUEUE_SEL, 2, 2)
    assert drv.inp(vn.REG_QUEUE_NUM, 2) == 0  # no queue 2
    drv.out(vn.REG_STATUS, 1, 1)
    drv.out(vn.REG_STATUS, 1, 3)
    drv.out(vn.REG_GUEST_FEATURES, 4, 0xFFFF_FFFF)
    assert drv.inp(vn.REG_GUEST_FEATURES, 4) == vn.HOST_FEATURES  # only offered bits stick
    drv.out(vn.REG_HOST_FEATURES, 4, 0)  # read-only: ignored with a note
    assert any("read-only" in line for line in m.logs)
    assert drv.inp(vn.REG_STATUS, 1) == 3
    drv.out(vn.REG_STATUS, 1, 0)
    assert drv.inp(vn.REG_STATUS, 1) == 0 and drv.inp(vn.REG_GUEST_FEATURES, 4) == 0
    ops = [e["op"] for e in m.trace.kinds("virtio")]
    assert ops == ["status", "status", "features", "reset"]


def test_tx_and_rx(dev):
    m, d, drv = dev
    drv.init()
    assert m.memory.read_u16(QPFN[0] * 4096 + 8192) == 1  # RX used.flags = NO_NOTIFY: the device polls
    frame = bytes.fromhex("ffffffffffff525400123456 0806".replace(" ", "")) + b"A" * 28
    drv.send(frame)
    assert m.hostio.tx == [frame]
    assert drv.inp(vn.REG_ISR, 1) == 1  # used buffer
    assert drv.inp(vn.REG_ISR, 1) == 0  # read clears
    chain = m.trace.kinds("virtio", op="chain", queue=1)[0]
    assert chain["descs"] == [[0, BUF + 0x100000, 10 + len(frame), 0, 0]] and chain["data"][10:] == frame
    assert m.trace.kinds("net", dir="tx")[0]["frame"] == frame

    incoming = [b"\x52\x54\x00\x12\x34\x56" + b"\x02" * 6 + b"\x08\x00" + bytes(range(50)), b"\xff" * 60]
    m.hostio.rx = list(incoming)
    assert drv.inp(vn.REG_ISR, 1) == 1  # the ISR read is the delivery point
    used = QPFN[0] * 4096 + 8192
    assert m.memory.read_u16(used + 2) == 2
    assert struct.unpack("<II", m.memory.read(used + 4, 8)) == (0, 10 + len(incoming[0]))
    assert m.memory.read(BUF, 10 + len(incoming[0])) == bytes(10) + incoming[0]
    assert m.memory.read(BUF + 0x1000 + 10, 60) == incoming[1]
    rx = m.trace.kinds("net", dir="rx")
    assert [e["frame"] for e in rx] == incoming and {e["via"] for e in rx} == {"isr"}
    assert rx[0]["poll"] == rx[1]["poll"] == m.hostio.polls[-1] == 3  # the third ISR read
    # only two buffers are left: the device takes no more frames than it has buffers for
    m.hostio.rx = [b"\x01" * 60] * 5
    drv.inp(vn.REG_ISR, 1)
    assert len(m.hostio.rx) == 3 and m.memory.read_u16(used + 2) == 4
    drv.inp(vn.REG_ISR, 1)
    assert len(m.hostio.rx) == 3  # no buffer: frames wait in the backend


def test_rx_buffer_too_small_drops_the_frame(dev):
    m, d, drv = dev
    drv.init(rx_buffers=1)
    put_desc(m.memory, QPFN[0] * 4096, 0, BUF, 40, VRING_DESC_F_WRITE)
    m.hostio.rx = [b"\x01" * 60]
    assert drv.inp(vn.REG_ISR, 1) == 0
    assert "smaller than header + frame" in m.trace.kinds("net")[-1]["dropped"]
    assert d.queues[0].last_avail == 0  # the buffer stays available


def test_nothing_happens_before_driver_ok(dev):
    m, d, drv = dev
    m.hostio.rx = [b"\x01" * 60]
    assert drv.inp(vn.REG_ISR, 1) == 0
    drv.out(vn.REG_QUEUE_NOTIFY, 2, 1)
    assert m.hostio.polls == [] and m.hostio.rx


@pytest.mark.parametrize("corrupt,message", [
    (lambda mem, tx: put_desc(mem, tx, 0, RAM + 0x1000, 64), "descriptor 0 points outside guest RAM"),
    (lambda mem, tx: put_desc(mem, tx, 0, BUF, 0xFFFF_FFF0), "outside guest RAM"),
    (lambda mem, tx: (put_desc(mem, tx, 0, BUF, 64, VRING_DESC_F_NEXT, 1),
                      put_desc(mem, tx, 1, BUF, 64, VRING_DESC_F_NEXT, 0)), "next cycle"),
    (lambda mem, tx: mem.write_u16(tx + 4096 + 2, 40000), "available index 40000"),
    (lambda mem, tx: put_desc(mem, tx, 0, BUF, 64, VRING_DESC_F_WRITE), "device-writable descriptor 0"),
])
def test_hostile_tx_ring_stops_the_device(dev, corrupt, message):
    m, d, drv = dev
    drv.init()
    tx = QPFN[1] * 4096
    put_desc(m.memory, tx, 0, BUF, 64)
    make_available(m.memory, tx, [0])
    corrupt(m.memory, tx)
    with pytest.raises(GuestError, match=message) as ei:
        drv.out(vn.REG_QUEUE_NOTIFY, 2, 1)
    assert str(ei.value).startswith("virtio-net TX queue: ")
    assert d.status & vn.S_NEEDS_RESET and drv.inp(vn.REG_STATUS, 1) & 0x40
    err = m.trace.kinds("virtio", op="error")
    assert len(err) == 1 and message.split()[0] in err[0]["message"]
    assert m.hostio.tx == []
    # the device stays stopped until the driver resets it
    drv.out(vn.REG_QUEUE_NOTIFY, 2, 1)
    assert m.hostio.tx == []
    drv.out(vn.REG_STATUS, 1, 0)
    assert drv.inp(vn.REG_STATUS, 1) == 0 and not d.broken


def test_hostile_queue_pfn(dev):
    m, d, drv = dev
    drv.out(vn.REG_STATUS, 1, 3)
    drv.out(vn.REG_QUEUE_SEL, 2, 0)
    with pytest.raises(GuestError, match="RX queue: queue PFN .* outside guest RAM"):
        drv.out(vn.REG_QUEUE_PFN, 4, 0xFFFF_FFFF)
    assert d.status & vn.S_NEEDS_RESET


def test_hostile_rx_ring_at_isr_read(dev):
    m, d, drv = dev
    drv.init()
    m.memory.write_u16(QPFN[0] * 4096 + 4096 + 2, 1000)  # RX avail idx far ahead
    with pytest.raises(GuestError, match="RX queue: available index 1000"):
        drv.inp(vn.REG_ISR, 1)


def test_error_leaves_a_readable_trace(tmp_path, mem):
    path = tmp_path / "t.tvt"
    with TraceWriter(path, {}, validate=True) as w:
        m = Bench(mem, w)
        vn.VirtioNet(m.ctx)
        drv = Driver(m)
        drv.init()
        drv.send(b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56\x08\x06" + bytes(28))
        put_desc(mem, QPFN[1] * 4096, 1, RAM - 8, 64)
        make_available(mem, QPFN[1] * 4096, [1], start=1)
        with pytest.raises(GuestError):
            drv.out(vn.REG_QUEUE_NOTIFY, 2, 1)
    evs = list(open_trace(path).events())
    kinds = [(e["k"], e.get("op", e.get("dir"))) for e in evs]
    assert ("net", "tx") in kinds and kinds[-1] == ("virtio", "error")


def test_save_and_load(dev, mem):
    m, d, drv = dev
    drv.init()
    drv.send(b"\xff" * 60)
    st = d.save()
    drv.send(b"\xee" * 60, slot=1, head=1)
    d.restore(st)
    assert d.queues[1].last_avail == 1 and d.status == 7
