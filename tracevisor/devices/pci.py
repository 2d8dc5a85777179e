"""PCI configuration mechanism #1: the address register at 0xCF8 and the data window 0xCFC–0xCFF.

Devices register at (bus, device, function) and expose a config space; absent functions read all-ones
and ignore writes, which is how a guest's bus scan learns that nothing is there.
"""

from __future__ import annotations

from .base import Device

CONFIG_ADDRESS = 0xCF8
CONFIG_DATA = 0xCFC
_MASK = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFF_FFFF}


class PciFunction:
    """A device function: reads/writes of its config space (offsets 0–255)."""

    def config_read(self, offset: int, size: int) -> int:
        raise NotImplementedError

    def config_write(self, offset: int, size: int, value: int) -> None:
        raise NotImplementedError


class PciBus(Device):
    """The configuration mechanism's state (the address register) and the functions on the bus."""

    name = "pci"

    def __init__(self) -> None:
        self.address = 0
        self.functions: dict[tuple[int, int, int], PciFunction] = {}

    def register(self, bus: int, device: int, function: int, fn: PciFunction) -> None:
        self.functions[(bus, device, function)] = fn

    def save(self) -> dict:
        return {"address": self.address}

    def restore(self, state: dict) -> None:
        self.address = state["address"]

    def _target(self, port: int) -> tuple[PciFunction | None, int]:
        a = self.address
        if not a & 0x8000_0000:
            return None, 0
        key = ((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7)
        return self.functions.get(key), (a & 0xFC) + (port - CONFIG_DATA)

    # I/O port handlers (registered in the machine's port table)
    def read_address(self, size: int) -> int:
        return self.address & _MASK[size] if size in _MASK else 0xFFFF_FFFF

    def write_address(self, size: int, value: int) -> None:
        if size == 4:
            self.address = value & 0xFFFF_FFFF

    def read_data(self, port: int, size: int) -> int:
        fn, offset = self._target(port)
        if fn is None:
            return _MASK.get(size, 0xFFFF_FFFF)
        return fn.config_read(offset, size) & _MASK.get(size, 0xFFFF_FFFF)

    def write_data(self, port: int, size: int, value: int) -> None:
        fn, offset = self._target(port)
        if fn is not None:
            fn.config_write(offset, size, value)
