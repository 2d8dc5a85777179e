"""Legacy (virtio 0.9.5) split virtqueues, read and written only through :class:`GuestMemory`.

A queue of ``size`` entries lives in guest RAM at ``pfn * 4096`` with the legacy layout (alignment 4096):

* descriptor table: ``size`` × 16 bytes ``{u64 addr, u32 len, u16 flags, u16 next}``;
* available ring, right after it: ``u16 flags, u16 idx, u16 ring[size], u16 used_event``;
* used ring, at the next 4096 boundary: ``u16 flags, u16 idx, {u32 id, u32 len}[size], u16 avail_event``.

Everything the guest controls is validated before it is used, and every problem raises
:class:`QueueError` (a :class:`GuestError`) whose message names the queue and what is wrong:

* the ring itself must lie inside RAM (checked when the guest sets the PFN);
* ``avail.idx`` may run ahead of the last index the device consumed by at most ``size``;
* a head index, and every ``next``, must be ``< size``; a chain visits at most ``size`` descriptors, and
  visiting one twice is reported as a ``next`` cycle;
* every descriptor's ``[addr, addr+len)`` must lie inside RAM (overflow-safe), the chain's total length is
  bounded by ``max_chain_bytes``, device-readable descriptors come before device-writable ones, and
  INDIRECT descriptors (a feature the device does not offer) are refused.

The guest's memory can change while the device reads it (another vCPU): each descriptor is read once into a
:class:`Desc` and only that copy is validated and used.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..errors import GuestError
from ..memory import GuestMemory

PAGE = 4096
DESC_SIZE = 16
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")


class QueueError(GuestError):
    """A malformed virtqueue: the device stops and the VM is stopped with this message."""


@dataclass(frozen=True)
class Desc:
    index: int
    addr: int
    len: int
    flags: int
    next: int

    @property
    def writable(self) -> bool:
        return bool(self.flags & VRING_DESC_F_WRITE)

    def as_list(self) -> list[int]:
        """``[index, addr, len, flags, next]`` (how trace events store a descriptor)."""
        return [self.index, self.addr, self.len, self.flags, self.next]


@dataclass(frozen=True)
class Chain:
    """One descriptor chain taken from the available ring."""

    head: int
    avail_slot: int  # the free-running available index it was taken at (mod 2^16)
    descs: tuple[Desc, ...]

    @property
    def readable(self) -> tuple[Desc, ...]:
        return tuple(d for d in self.descs if not d.writable)

    @property
    def writable(self) -> tuple[Desc, ...]:
        return tuple(d for d in self.descs if d.writable)

    @property
    def read_len(self) -> int:
        return sum(d.len for d in self.descs if not d.writable)

    @property
    def write_len(self) -> int:
        return sum(d.len for d in self.descs if d.writable)


def ring_bytes(size: int) -> int:
    """Bytes of guest RAM a legacy queue of ``size`` entries occupies (from its PFN)."""
    used = _align(DESC_SIZE * size + 6 + 2 * size, PAGE)
    return used + 6 + 8 * size


def _align(v: int, a: int) -> int:
    return (v + a - 1) & ~(a - 1)


class VirtQueue:
    """One split virtqueue of a legacy device (device side)."""

    def __init__(self, memory: GuestMemory, index: int, size: int = 256, name: str = "",
                 max_chain_bytes: int = 1 << 17) -> None:
        if size < 1 or size > 32768 or size & (size - 1):
            raise ValueError("queue size must be a power of two in 1..32768")
        self.mem = memory
        self.index = index
        self.size = size
        self.name = name or f"queue {index}"
        self.max_chain_bytes = max_chain_bytes
        self.reset()

    def reset(self) -> None:
        self.pfn = 0
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.last_avail = 0  # free-running: the next available-ring slot the device will take
        self.used_idx = 0  # free-running: the device's copy of used.idx
        self.no_notify = False

    @property
    def ready(self) -> bool:
        return self.pfn != 0

    def _err(self, message: str, **details) -> QueueError:
        return QueueError(f"virtio-net {self.name}: {message}", queue=self.index, **details)

    # -- set-up ----------------------------------------------------------------------------------
    def set_pfn(self, pfn: int) -> None:
        """Place the queue at guest-physical ``pfn * 4096``; 0 disables it (and resets its indices)."""
        if pfn == 0:
            self.reset()
            return
        base = pfn * PAGE
        n = ring_bytes(self.size)
        if base + n > self.mem.size:
            raise self._err(f"queue PFN {pfn:#x} puts the ring at [{base:#x}, {base + n:#x}), outside guest RAM "
                            f"[0, {self.mem.size:#x})", pfn=pfn)
        self.pfn = pfn
        self.desc_addr = base
        self.avail_addr = base + DESC_SIZE * self.size
        self.used_addr = _align(self.avail_addr + 6 + 2 * self.size, PAGE)
        self.last_avail = 0
        self.used_idx = 0
        self.mem.write_u16(self.used_addr, 0)  # flags
        self.mem.write_u16(self.used_addr + 2, 0)  # idx

    def set_no_notify(self, on: bool) -> None:
        """Tell the driver (used.flags) that it need not notify this queue: the device polls it."""
        self.no_notify = on
        if self.ready:
            self.mem.write_u16(self.used_addr, VRING_USED_F_NO_NOTIFY if on else 0)

    # -- the available ring ----------------------------------------------------------------------
    def avail_idx(self) -> int:
        return self.mem.read_u16(self.avail_addr + 2, "available ring index")

    def pending(self) -> int:
        """How many chains the driver has made available and the device has not taken."""
        if not self.ready:
            return 0
        idx = self.avail_idx()
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.size:
            raise self._err(f"available index {idx} is {n} entries ahead of the last one the device took "
                            f"({self.last_avail & 0xFFFF}); a queue of {self.size} entries allows at most {self.size}",
                            avail_idx=idx, last_avail=self.last_avail & 0xFFFF)
        return n

    def peek(self) -> Chain | None:
        """The next available chain, validated, without taking it (None when there is none)."""
        if not self.pending():
            return None
        slot = self.last_avail & 0xFFFF
        head = self.mem.read_u16(self.avail_addr + 4 + 2 * (slot % self.size), "available ring entry")
        return Chain(head, slot, self._walk(head, slot))

    def pop(self) -> Chain | None:
        """Take the next available chain (None when there is none)."""
        chain = self.peek()
        if chain is not None:
            self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def _walk(self, head: int, slot: int) -> tuple[Desc, ...]:
        size = self.size
        if head >= size:
            raise self._err(f"available ring slot {slot % size} names descriptor {head}, beyond the "
                            f"{size}-entry table", head=head)
        seen: set[int] = set()
        out: list[Desc] = []
        total = 0
        i = head
        while True:
            if i in seen:
                raise self._err(f"descriptor chain from head {head} loops: 'next' of descriptor "
                                f"{out[-1].index} leads back to descriptor {i} (a next cycle)", head=head)
            if len(out) >= size:  # unreachable with the cycle check; kept as the spec's bound
                raise self._err(f"descriptor chain from head {head} is longer than the queue ({size})",
                                head=head)
            seen.add(i)
            raw = self.mem.read(self.desc_addr + DESC_SIZE * i, DESC_SIZE, "virtqueue descriptor")
            addr, length, flags, nxt = _DESC.unpack(raw)
            d = Desc(i, addr, length, flags, nxt)
            if flags & VRING_DESC_F_INDIRECT:
                raise self._err(f"descriptor {i} is INDIRECT, a feature the device does not offer", head=head)
            if addr + length > self.mem.size:
                end = addr + length
                raise self._err(f"descriptor {i} points outside guest RAM: [{addr:#x}, {end:#x}) "
                                f"(len {length}) is not inside [0, {self.mem.size:#x})"
                                + (" — the length overflows the 64-bit address" if end >= 1 << 64 else ""),
                                head=head, desc=i, addr=addr, len=length)
            total += length
            if total > self.max_chain_bytes:
                raise self._err(f"descriptor chain from head {head} holds {total} bytes by descriptor {i}, "
                                f"more than the {self.max_chain_bytes} a frame can need (length overflow)",
                                head=head, desc=i)
            if out and out[-1].writable and not d.writable:
                raise self._err(f"descriptor {i} is device-readable but follows a device-writable one "
                                f"in the chain from head {head}", head=head, desc=i)
            out.append(d)
            if not flags & VRING_DESC_F_NEXT:
                return tuple(out)
            if nxt >= size:
                raise self._err(f"descriptor {i} has next = {nxt}, beyond the {size}-entry table",
                                head=head, desc=i)
            i = nxt

    # -- data -------------------------------------------------------------------------------------
    def read_chain(self, chain: Chain) -> bytes:
        """The device-readable bytes of ``chain``, concatenated."""
        return b"".join(self.mem.read(d.addr, d.len, "virtqueue buffer") for d in chain.descs if not d.writable)

    def write_chain(self, chain: Chain, data: bytes) -> int:
        """Scatter ``data`` over the device-writable descriptors of ``chain``; returns bytes written."""
        pos = 0
        view = memoryview(data)
        for d in chain.descs:
            if not d.writable or pos >= len(data):
                continue
            n = min(d.len, len(data) - pos)
            self.mem.write(d.addr, view[pos:pos + n], "virtqueue buffer")
            pos += n
        return pos

    # -- the used ring ----------------------------------------------------------------------------
    def push(self, chain: Chain, length: int) -> int:
        """Return ``chain`` to the driver with ``length`` bytes written; returns the new used index."""
        slot = self.used_idx % self.size
        self.mem.write(self.used_addr + 4 + 8 * slot, _USED_ELEM.pack(chain.head, length), "used ring entry")
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.write_u16(self.used_addr + 2, self.used_idx)
        return self.used_idx

    # -- checkpoints -------------------------------------------------------------------------------
    def save(self) -> dict:
        return {"pfn": self.pfn, "last_avail": self.last_avail, "used_idx": self.used_idx,
                "no_notify": self.no_notify}

    def load(self, st: dict) -> None:
        self.reset()
        if st["pfn"]:
            base = st["pfn"] * PAGE
            self.pfn = st["pfn"]
            self.desc_addr = base
            self.avail_addr = base + DESC_SIZE * self.size
            self.used_addr = _align(self.avail_addr + 6 + 2 * self.size, PAGE)
        self.last_avail = st["last_avail"]
        self.used_idx = st["used_idx"]
        self.no_notify = st["no_notify"]
