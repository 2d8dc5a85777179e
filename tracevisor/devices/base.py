"""The device seam: what a device may use (:class:`DeviceContext`) and what it must offer (:class:`Device`).

A device never sees the Machine.  It gets a context with guest memory (checked accesses only), port and
PCI registration, an event sink (its trace events; stamped with the session's clock, dropped on a plain
run), the log, and the host backends — the session's HostIO, through which every frame or byte from the
outside reaches it (live, recorded or replayed alike).  The sink, clock and HostIO are bound when the VM
boots; a device constructed earlier reads them at use.

Checkpoints (tracevisor/checkpoint.py) keep each device's state through :meth:`Device.save` and
:meth:`Device.restore`; guest RAM (rings, buffers) is saved separately.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..clock import Clock


class DeviceContext:
    """A device's view of the VM (one per VM, shared by its devices)."""

    def __init__(self, memory, ports, pci, log: Callable[[str], None]) -> None:
        self.memory = memory
        self._ports = ports
        self._pci = pci
        self.log = log
        self.hostio = None  # the session's HostIO: the device's backends (net_rx/net_tx, ...)
        self.sink = None
        self.clock = Clock()

    def bind(self, hostio, sink, clock: Clock) -> None:
        """At boot: the session's HostIO, trace sink and clock."""
        self.hostio = hostio
        self.sink = sink
        self.clock = clock

    def register_ports(self, ports: Iterable[int], out_handler=None, in_handler=None) -> None:
        """Serve I/O ports: out_handler(v, port, size, value), in_handler(v, port, size) -> value."""
        self._ports.register(ports, out_handler, in_handler)

    def register_pci(self, bus: int, device: int, function: int, fn) -> None:
        """Put a PCI function (its configuration space) at bus:device.function."""
        self._pci.register(bus, device, function, fn)

    @property
    def tracing(self) -> bool:
        """Is anyone listening to events (worth building them)?"""
        return self.sink is not None

    def event(self, kind: str, cpu: int, **fields) -> None:
        """Emit a trace event of ``kind`` (a kind of trace/schema.py) for ``cpu``, stamped now."""
        sink = self.sink
        if sink is not None:
            sink.event(kind, cpu, self.clock.now(), **fields)


class Device:
    """A device attached to a VM.  ``name`` keys its state in checkpoints."""

    name = "device"

    def save(self) -> dict:
        """Device state for a checkpoint (guest RAM is saved separately)."""
        return {}

    def restore(self, state: dict) -> None:
        """Bring the device back to a state :meth:`save` returned."""
