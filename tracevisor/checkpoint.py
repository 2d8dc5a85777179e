"""Checkpoints of a paused VM: guest memory as copy-on-write page deltas, plus every vCPU's state.

The first checkpoint holds a full copy of RAM; each later one holds only the pages written since the
previous checkpoint — by the guest (KVM's dirty-page log on the memory slot) or by the host (GuestMemory's
own record of its writes, e.g. READ data).  Restoring checkpoint *k* rewrites exactly the pages changed
since *k*, taking each page's newest version at or before *k*.  The number of checkpoints is bounded:
past ``max_checkpoints`` the oldest delta is folded into its successor, so memory stays bounded by RAM
plus the pages that really changed.

Only valid at a consistent point: between exits, with every vCPU out of KVM_RUN (a paused Machine).
Not saved: the TSC (guests read the host's; see docs/determinism.md), in-kernel PIC/IOAPIC state.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from .kvm import uapi as U

PAGE = 4096
# MSRs worth keeping across a restore (the boot set plus the syscall/TLS ones a kernel may program)
SAVED_MSRS = [U.MSR_IA32_MISC_ENABLE, U.MSR_IA32_CR_PAT, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084,
              0xC0000102, 0xC0000103]


class DirtyTracker:
    """The pages written since each consumer last asked, from KVM's dirty-page log on the memory slot and
    GuestMemory's record of host writes.  Reading KVM's log resets it, so checkpoints and memory hashes
    share one tracker per machine (:meth:`of`) instead of stealing each other's bits."""

    def __init__(self, machine) -> None:
        self.machine = machine
        mem = machine.memory
        self.npages = mem.size // PAGE
        machine.vm.set_memory_region(0, 0, mem.size, mem.host_address, flags=U.KVM_MEM_LOG_DIRTY_PAGES)
        machine.vm.get_dirty_log(0, self.npages)  # start from a clean log
        if mem.host_dirty is None:
            mem.host_dirty = set()
        self._pending: list[set[int]] = []

    @classmethod
    def of(cls, machine) -> DirtyTracker:
        """The machine's tracker, created (and dirty logging switched on) at the first call."""
        tracker = getattr(machine, "dirty_tracker", None)
        if tracker is None:
            tracker = cls(machine)
            machine.dirty_tracker = tracker
        return tracker

    def subscribe(self) -> int:
        self._pending.append(set())
        return len(self._pending) - 1

    def _collect(self) -> set[int]:
        bitmap = self.machine.vm.get_dirty_log(0, self.npages)
        mem = self.machine.memory
        pages = set(mem.host_dirty)
        mem.host_dirty.clear()
        words = array("Q", bitmap)
        for i, w in enumerate(words):
            if w:
                base = i * 64
                while w:
                    low = w & -w
                    pages.add(base + low.bit_length() - 1)
                    w ^= low
        return {p for p in pages if p < self.npages}

    def take(self, consumer: int) -> set[int]:
        """Pages written since ``consumer`` last called take()."""
        pages = self._collect()
        for i, pend in enumerate(self._pending):
            if i != consumer:
                pend |= pages
        mine = self._pending[consumer]
        self._pending[consumer] = set()
        return mine | pages

    def mark(self, pages, but: int | None = None) -> None:
        """Tell every consumer except ``but`` that ``pages`` were rewritten (e.g. by a restore)."""
        for i, pend in enumerate(self._pending):
            if i != but:
                pend |= set(pages)


@dataclass
class VcpuSnapshot:
    regs: bytes
    sregs: bytes
    fpu: bytes
    events: bytes
    lapic: bytes | None
    mp_state: int
    msrs: dict[int, int]
    started: bool
    finished: bool


@dataclass
class Checkpoint:
    position: int  # the caller's notion of where the VM is (e.g. the last replayed event's seq)
    vcpus: list[VcpuSnapshot]
    pages: dict[int, bytes]  # full RAM for the first checkpoint, else pages changed since the previous one
    extra: dict = field(default_factory=dict)  # caller state (stream positions, counters, …)
    devices: dict = field(default_factory=dict)  # each device's save(), by name: {"pci": …, "net": …}

    @property
    def nbytes(self) -> int:
        return len(self.pages) * PAGE


class CheckpointStore:
    def __init__(self, machine, max_checkpoints: int = 64) -> None:
        self.machine = machine
        self.max_checkpoints = max(2, max_checkpoints)
        self.checkpoints: list[Checkpoint] = []
        mem = machine.memory
        self.npages = mem.size // PAGE
        self.tracker = DirtyTracker.of(machine)
        self.consumer = self.tracker.subscribe()
        #: Pages rewritten by the last :meth:`restore` (other page users, e.g. memory hashes, resync them).
        self.restored_pages: set[int] = set()

    # -- dirty pages since the last checkpoint ---------------------------------------------------------
    def _dirty(self) -> set[int]:
        return self.tracker.take(self.consumer)

    def _vcpu(self, v) -> VcpuSnapshot:
        vc = v.vcpu
        try:
            lapic = bytes(vc.get_lapic()) if self.machine.irqchip else None
        except Exception:
            lapic = None
        return VcpuSnapshot(regs=bytes(vc.get_regs()), sregs=bytes(vc.get_sregs()), fpu=bytes(vc.get_fpu()),
                            events=bytes(vc.get_vcpu_events()), lapic=lapic, mp_state=vc.get_mp_state(),
                            msrs=vc.get_msrs(SAVED_MSRS), started=v.started, finished=v.finished)

    # -- API ---------------------------------------------------------------------------------------
    def take(self, position: int, extra: dict | None = None) -> Checkpoint:
        mem = self.machine.memory
        dirty = self._dirty()
        if not self.checkpoints:
            pages = {p: mem.page(p) for p in range(self.npages)}
        else:
            pages = {p: mem.page(p) for p in dirty}
        cp = Checkpoint(position, [self._vcpu(v) for v in self.machine.vcpus], pages, dict(extra or {}),
                        {name: dev.save() for name, dev in self.machine.devices.items()})
        self.checkpoints.append(cp)
        if len(self.checkpoints) > self.max_checkpoints:
            self._fold(1)
        return cp

    def _fold(self, i: int) -> None:
        """Drop checkpoint i (> 0), moving its pages into checkpoint i+1 where that has no newer copy."""
        gone = self.checkpoints.pop(i)
        if i < len(self.checkpoints):
            nxt = self.checkpoints[i]
            for p, data in gone.pages.items():
                nxt.pages.setdefault(p, data)

    def latest_at_or_before(self, position: int) -> int | None:
        best = None
        for i, cp in enumerate(self.checkpoints):
            if cp.position <= position:
                best = i
        return best

    def restore(self, index: int) -> Checkpoint:
        """Bring memory and vCPUs back to checkpoint ``index``; later checkpoints are discarded."""
        cps = self.checkpoints
        cp = cps[index]
        mem = self.machine.memory
        changed = self._dirty()
        for later in cps[index + 1:]:
            changed.update(later.pages)
        for p in changed:
            for j in range(index, -1, -1):
                data = cps[j].pages.get(p)
                if data is not None:
                    mem.put_page(p, data)
                    break
        del cps[index + 1:]
        self.tracker.mark(changed, but=self.consumer)
        self.restored_pages = changed
        for v, snap in zip(self.machine.vcpus, cp.vcpus):
            vc = v.vcpu
            vc.set_sregs(U.kvm_sregs.from_buffer_copy(snap.sregs))
            vc.set_regs(U.kvm_regs.from_buffer_copy(snap.regs))
            vc.set_fpu(U.kvm_fpu.from_buffer_copy(snap.fpu))
            if snap.msrs:
                vc.set_msrs(snap.msrs)
            vc.set_vcpu_events(U.kvm_vcpu_events.from_buffer_copy(snap.events))
            if snap.lapic is not None:
                vc.set_lapic(U.kvm_lapic_state.from_buffer_copy(snap.lapic))
            vc.set_mp_state(snap.mp_state)
            v.started, v.finished = snap.started, snap.finished
            v.stop_request = None
            v.parked = False
        for name, state in cp.devices.items():
            self.machine.devices[name].restore(state)
        return cp

    @property
    def nbytes(self) -> int:
        return sum(cp.nbytes for cp in self.checkpoints)
