"""virtio-net, legacy interface (virtio 0.9.5), on PCI 00:00.0 with its registers in I/O BAR0.

What the guest sees (docs/network.md has the full description and how it differs from uhyve 0.2.1):

* PCI function 00:00.0, vendor 0x1AF4, device 0x1000 (transitional virtio-net), class 0x020000,
  subsystem 0x1AF4:0x0001, BAR0 an **I/O** BAR of 32 bytes at 0xC000 (bit 0 set; sizing works; the guest may
  move it), no interrupt pin.  I/O decoding starts enabled, as firmware would leave it.
* Registers at BAR0 + offset: host features (+0, u32: MAC and STATUS), guest features (+4, u32), queue PFN
  (+8, u32, the legacy page frame number = address / 4096), queue size (+12, u16, 256), queue select (+14,
  u16), queue notify (+16, u16), device status (+18, u8), ISR (+19, u8, read clears), MAC (+20..+25),
  link status (+26, u16, 1 = up).
* Two queues of 256 entries: 0 = RX, 1 = TX; every buffer starts with the 10-byte virtio-net header.
* No interrupts: the guest polls.  Received frames are delivered only at guest-initiated accesses — a
  read of ISR or a notify of the RX queue — so a recording and its replay deliver them at the same exit.
  The RX queue's used ring carries VRING_USED_F_NO_NOTIFY: the driver need not notify after re-posting
  RX buffers, the device looks at them at each of those accesses.

Frames go out and come in through the session's HostIO (``net_tx``/``net_rx``, the device context's
``hostio``), never a socket: the live
HostIO talks to the TAP/UDP backend, the recording one logs what came in, the replaying one answers from
the trace.  A malformed ring sets DEVICE_NEEDS_RESET and stops the VM with a :class:`GuestError` that
names the problem (tracevisor/devices/virtqueue.py validates every guest-controlled value).
"""

from __future__ import annotations

import struct
import threading

from ..errors import GuestError
from .base import Device, DeviceContext
from .pci import PciFunction
from .virtqueue import QueueError, VirtQueue

VENDOR_ID = 0x1AF4
DEVICE_ID = 0x1000
SUBSYSTEM_ID = 0x0001  # virtio device type 1 = network
CLASS_CODE = 0x020000  # network controller, Ethernet
PCI_LOCATION = (0, 0, 0)  # bus, device, function (where uhyve 0.2.1 put it)

IO_BASE = 0xC000
IO_SIZE = 32  # the 28 register bytes, rounded up to a power of two

# register offsets in BAR0
REG_HOST_FEATURES = 0
REG_GUEST_FEATURES = 4
REG_QUEUE_PFN = 8
REG_QUEUE_NUM = 12
REG_QUEUE_SEL = 14
REG_QUEUE_NOTIFY = 16
REG_STATUS = 18
REG_ISR = 19
REG_MAC = 20
REG_NET_STATUS = 26
REG_END = 28
REG_NAMES = {REG_HOST_FEATURES: "host features", REG_GUEST_FEATURES: "guest features", REG_QUEUE_PFN: "queue PFN",
             REG_QUEUE_NUM: "queue size", REG_QUEUE_SEL: "queue select", REG_QUEUE_NOTIFY: "queue notify",
             REG_STATUS: "device status", REG_ISR: "ISR", REG_MAC: "MAC", REG_NET_STATUS: "link status"}

# feature bits
F_MAC = 1 << 5
F_STATUS = 1 << 16
HOST_FEATURES = F_MAC | F_STATUS

# device status bits
S_ACKNOWLEDGE = 1
S_DRIVER = 2
S_DRIVER_OK = 4
S_FEATURES_OK = 8
S_NEEDS_RESET = 0x40
S_FAILED = 0x80

ISR_QUEUE = 1
NET_S_LINK_UP = 1

QUEUE_SIZE = 256
RX, TX = 0, 1
NET_HDR = 10  # struct virtio_net_hdr without MRG_RXBUF
MAX_FRAME = 65535
RX_BURST = 32  # frames delivered at one access, at most

DEFAULT_MAC = bytes.fromhex("525400123456")

_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


class VirtioNetPci(PciFunction):
    """The device's PCI configuration space (type-0 header, 256 bytes)."""

    COMMAND_WRITABLE = 0x0407  # I/O space, memory space, bus master, INTx disable

    def __init__(self, device: VirtioNet) -> None:
        self.device = device
        c = bytearray(256)
        struct.pack_into("<HH", c, 0x00, VENDOR_ID, DEVICE_ID)
        struct.pack_into("<H", c, 0x04, 0x0001)  # command: I/O decoding on, as firmware leaves it
        struct.pack_into("<I", c, 0x08, CLASS_CODE << 8)  # revision 0
        struct.pack_into("<HH", c, 0x2C, VENDOR_ID, SUBSYSTEM_ID)
        c[0x3C] = 0xFF  # interrupt line: none assigned
        self.space = c
        self.bar0 = IO_BASE | 1

    @property
    def command(self) -> int:
        return struct.unpack_from("<H", self.space, 0x04)[0]

    @property
    def io_base(self) -> int | None:
        """The port BAR0 decodes at, or None (I/O decoding off, or an address outside the 64 KiB port space,
        e.g. the all-ones sizing pattern)."""
        base = self.bar0 & ~(IO_SIZE - 1)
        if not self.command & 1 or base + IO_SIZE > 0x10000:
            return None
        return base

    def config_read(self, offset: int, size: int) -> int:
        if offset + size > 256:
            return _MASK.get(size, 0xFFFF_FFFF)
        struct.pack_into("<I", self.space, 0x10, self.bar0)
        return int.from_bytes(self.space[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        value &= _MASK.get(size, 0xFFFF_FFFF)
        if offset == 0x04 and size in (2, 4):
            struct.pack_into("<H", self.space, 0x04, value & self.COMMAND_WRITABLE)
        elif offset == 0x04 and size == 1:
            self.space[0x04] = value & self.COMMAND_WRITABLE & 0xFF
        elif offset == 0x05 and size == 1:
            self.space[0x05] = value & (self.COMMAND_WRITABLE >> 8)
        elif offset == 0x10 and size == 4:
            # An I/O BAR: bit 0 reads 1, bit 1 reserved, bits 2-4 are below the 32-byte size and read 0.
            self.bar0 = (value & ~(IO_SIZE - 1) & 0xFFFF_FFFF) | 1
            self.device.bar_moved()
        elif offset == 0x3C and size == 1:
            self.space[0x3C] = value
        # everything else is read-only (unimplemented BARs 1-5 read 0, so sizing them yields 0)


class VirtioNet(Device):
    """The device: register block, the two queues, and the trace of what it did."""

    name = "net"

    def __init__(self, ctx: DeviceContext, mac: bytes = DEFAULT_MAC, link_up: bool = True) -> None:
        self.ctx = ctx
        self.mac = bytes(mac)
        self.link_up = link_up
        self.pci = VirtioNetPci(self)
        self.queues = [VirtQueue(ctx.memory, RX, QUEUE_SIZE, "RX queue"),
                       VirtQueue(ctx.memory, TX, QUEUE_SIZE, "TX queue")]
        self._ports: set[int] = set()
        self._noted: set[str] = set()
        self._lock = threading.Lock()  # several vCPUs may touch the registers at once
        self.stats = {"rx": 0, "tx": 0, "rx_dropped": 0, "tx_dropped": 0}
        self.reset()
        ctx.register_pci(*PCI_LOCATION, self.pci)
        self.bar_moved()

    # -- state ------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.status = 0
        self.guest_features = 0
        self.queue_sel = 0
        self.isr = 0
        self.broken = False
        self.polls = 0  # RX delivery points so far (the guest's ISR reads and RX notifies while DRIVER_OK)
        for q in self.queues:
            q.reset()

    def save(self) -> dict:
        """Device state for a checkpoint (guest RAM holds the rings themselves)."""
        return {"status": self.status, "guest_features": self.guest_features, "queue_sel": self.queue_sel,
                "isr": self.isr, "broken": self.broken, "polls": self.polls, "bar0": self.pci.bar0,
                "config": bytes(self.pci.space), "queues": [q.save() for q in self.queues],
                "stats": dict(self.stats)}

    def restore(self, st: dict) -> None:
        self.status, self.guest_features = st["status"], st["guest_features"]
        self.queue_sel, self.isr, self.broken, self.polls = st["queue_sel"], st["isr"], st["broken"], st["polls"]
        self.pci.space[:] = st["config"]
        self.pci.bar0 = st["bar0"]
        for q, qs in zip(self.queues, st["queues"]):
            q.load(qs)
        self.stats = dict(st["stats"])
        self.bar_moved()

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & S_DRIVER_OK) and not self.broken

    def bar_moved(self) -> None:
        """Make sure the ports BAR0 now decodes at reach this device."""
        base = self.pci.io_base
        if base is None:
            return
        new = [p for p in range(base, base + IO_SIZE) if p not in self._ports]
        if new:
            self.ctx.register_ports(new, self.io_write, self.io_read)
            self._ports.update(new)

    def _note(self, key: str, message: str) -> None:
        if key not in self._noted:
            self._noted.add(key)
            self.ctx.log(f"virtio-net: {message}")

    # -- register access ----------------------------------------------------------------------------
    def _offset(self, port: int) -> int | None:
        base = self.pci.io_base
        if base is None or not base <= port < base + IO_SIZE:
            return None
        return port - base

    def _registers(self) -> bytes:
        q = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        return struct.pack("<IIIHHHBB6sH", HOST_FEATURES, self.guest_features, q.pfn if q else 0,
                           QUEUE_SIZE if q else 0, self.queue_sel, 0, self.status, self.isr, self.mac,
                           NET_S_LINK_UP if self.link_up else 0) + b"\xff" * (IO_SIZE - REG_END)

    def io_read(self, v, port: int, size: int) -> int:
        off = self._offset(port)
        if off is None:
            self._note(f"r{port}", f"read of port {port:#x} while BAR0 does not decode there; answered all-ones")
            return _MASK.get(size, 0xFFFF_FFFF)
        with self._lock:
            try:
                if off <= REG_ISR < off + size:
                    self._rx_poll(v, "isr")  # delivery point: the answer includes what was just delivered
                    value = int.from_bytes(self._registers()[off:off + size], "little")
                    self.isr = 0
                    return value
                return int.from_bytes(self._registers()[off:off + size], "little")
            except GuestError as e:
                self._fail(v, e)
                raise

    def io_write(self, v, port: int, size: int, value: int) -> None:
        off = self._offset(port)
        if off is None:
            self._note(f"w{port}", f"write to port {port:#x} while BAR0 does not decode there; ignored")
            return
        with self._lock:
            try:
                self._write(v, off, size, value)
            except GuestError as e:
                self._fail(v, e)
                raise

    def _write(self, v, off: int, size: int, value: int) -> None:
        if off == REG_STATUS and size == 1:
            self._set_status(v, value)
        elif self.broken:
            self._note("broken", "the device needs a reset (status 0) after an error; access ignored")
        elif off == REG_GUEST_FEATURES and size == 4:
            if not self.status & S_DRIVER or self.status & S_DRIVER_OK:
                self._note("feat-late", "guest features written outside the DRIVER..DRIVER_OK window; ignored")
                return
            if value & ~HOST_FEATURES:
                self._note("feat-extra", f"guest asked for features {value & ~HOST_FEATURES:#x} that the device "
                                         "does not offer; they are not enabled")
            self.guest_features = value & HOST_FEATURES
            self.ctx.event("virtio", v.cpu, op="features", features=self.guest_features, requested=value)
        elif off == REG_QUEUE_PFN and size == 4:
            if self.queue_sel >= len(self.queues):
                self._note("pfn-sel", f"queue PFN written for queue {self.queue_sel}, which does not exist; ignored")
                return
            q = self.queues[self.queue_sel]
            q.set_pfn(value)
            if q.index == RX and q.ready:
                q.set_no_notify(True)
            self.ctx.event("virtio", v.cpu, op="queue", queue=q.index, pfn=value, addr=q.desc_addr, size=q.size)
        elif off == REG_QUEUE_SEL and size == 2:
            self.queue_sel = value
        elif off == REG_QUEUE_NOTIFY and size == 2:
            if not self.driver_ok:
                self._note("notify-early", "queue notified before DRIVER_OK; ignored")
            elif value == TX:
                self._tx(v)
            elif value == RX:
                self._rx_poll(v, "notify")
            else:
                self._note(f"notify{value}", f"notify of queue {value}, which does not exist; ignored")
        else:
            name = REG_NAMES.get(off, f"offset {off}")
            self._note(f"w{off}/{size}", f"guest wrote {size} byte(s) {value:#x} to {name} (+{off}), which is "
                                         "read-only or not a register of that width; ignored")

    def _set_status(self, v, value: int) -> None:
        old = self.status
        if value == 0:
            self.reset()
            self.ctx.event("virtio", v.cpu, op="reset", status=0, old=old)
            return
        if self.broken:
            self._note("broken", "the device needs a reset (status 0) after an error; status write ignored")
            return
        self.status = value & 0xFF
        self.ctx.event("virtio", v.cpu, op="status", status=self.status, old=old)

    def _fail(self, v, err: GuestError) -> None:
        """A malformed ring: the device stops (DEVICE_NEEDS_RESET) and the error stops the VM."""
        self.status |= S_NEEDS_RESET
        self.broken = True
        try:
            self.ctx.event("virtio", v.cpu, op="error", status=self.status, message=str(err))
        except Exception:  # a replay that diverges here reports the divergence, not this
            pass

    # -- data path ------------------------------------------------------------------------------------
    def _tx(self, v) -> None:
        q = self.queues[TX]
        if not q.ready:
            return
        hostio = self.ctx.hostio
        sent = 0
        while sent < QUEUE_SIZE:
            chain = q.pop()
            if chain is None:
                break
            if chain.writable:
                raise QueueError(f"virtio-net TX queue: chain from head {chain.head} has device-writable "
                                 f"descriptor {chain.writable[0].index}; TX buffers are device-readable")
            data = q.read_chain(chain)
            frame = data[NET_HDR:]
            dropped = None
            if len(data) < NET_HDR:
                dropped = f"shorter than the {NET_HDR}-byte virtio-net header"
            elif len(frame) > MAX_FRAME:
                dropped = f"frame of {len(frame)} bytes is larger than {MAX_FRAME}"
            elif len(frame) < 14:
                dropped = "frame shorter than an Ethernet header"
            else:
                hostio.net_tx(v.cpu, frame)
            used = q.push(chain, 0)
            sent += 1
            self.ctx.event("virtio", v.cpu, op="chain", queue=TX, head=chain.head, slot=chain.avail_slot,
                        descs=[d.as_list() for d in chain.descs], len=len(data), used_idx=used, data=data)
            fields = {"dropped": dropped} if dropped else {}
            self.ctx.event("net", v.cpu, dir="tx", frame=frame, len=len(frame), queue=TX, head=chain.head, **fields)
            self.stats["tx_dropped" if dropped else "tx"] += 1
        if sent:
            self.isr |= ISR_QUEUE

    def _rx_poll(self, v, via: str) -> None:
        q = self.queues[RX]
        if not self.driver_ok or not q.ready:
            return
        self.polls += 1
        poll = self.polls
        hostio = self.ctx.hostio
        delivered = 0
        for _ in range(RX_BURST):
            chain = q.peek()
            if chain is None:
                break  # no buffer: frames wait in the backend (the TAP's queue) until the guest posts more
            if chain.readable:
                raise QueueError(f"virtio-net RX queue: chain from head {chain.head} has device-readable "
                                 f"descriptor {chain.readable[0].index}; RX buffers are device-writable")
            frame = hostio.net_rx(v.cpu, poll)
            if frame is None:
                break
            frame = bytes(frame)
            if NET_HDR + len(frame) > chain.write_len:
                self.ctx.event("net", v.cpu, dir="rx", frame=frame, len=len(frame), queue=RX, head=chain.head,
                            poll=poll, via=via, dropped=f"the buffer ({chain.write_len} bytes) is smaller than "
                                                        f"header + frame ({NET_HDR + len(frame)})")
                self.stats["rx_dropped"] += 1
                continue
            q.pop()
            data = bytes(NET_HDR) + frame
            n = q.write_chain(chain, data)
            used = q.push(chain, n)
            delivered += 1
            self.ctx.event("virtio", v.cpu, op="chain", queue=RX, head=chain.head, slot=chain.avail_slot,
                        descs=[d.as_list() for d in chain.descs], len=n, used_idx=used, data=data)
            self.ctx.event("net", v.cpu, dir="rx", frame=frame, len=len(frame), queue=RX, head=chain.head,
                        poll=poll, via=via)
            self.stats["rx"] += 1
        if delivered:
            self.isr |= ISR_QUEUE
