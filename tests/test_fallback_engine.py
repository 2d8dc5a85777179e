"""The fallback's burst engine on its own: Unicorn over a real mmap'd "guest RAM" with identity-mapped page
tables, code whose instruction counts are known by construction.

A burst's budget counts translation blocks (the native block counter in tracevisor/_fastloop.c, or the same
rule in a Python block hook when the extension is unavailable); its instruction count must be exact: equal to
the count worked out by hand, to Unicorn's own per-instruction counter (the budget of older recordings), and
identical between the two block-counting paths — also when a burst stops inside a block (a fault, an access
outside RAM).  Runs on any host: no KVM involved."""

from __future__ import annotations

import struct
import types

import pytest

pytest.importorskip("unicorn")
pytest.importorskip("capstone")

from tracevisor import fallback, fastloop  # noqa: E402
from tracevisor.memory import GuestMemory  # noqa: E402

RAM = 4 << 20
CODE = 0x10000
OUTSIDE = 0x400010  # mapped by the page tables, beyond RAM: what MMIO looks like to a burst

# mov ecx, 1000; xor eax, eax
# loop: add rax, 3; addsd xmm0, xmm1; test al, 1; jz skip; add rbx, 1
# skip: dec ecx; jnz loop; hlt
LOOP = bytes.fromhex("b9e8030000" "31c0" "4883c003" "f20f58c1" "a801" "7404" "4883c301" "ffc9" "75ec" "f4")
LOOP_INSNS = 2 + 500 * 7 + 500 * 6  # rax = 3k: odd k takes the extra add
# mov ecx, 5; xor edx, edx; mov eax, 1; div ecx; nop; nop; xor ecx, ecx; div ecx (#DE); hlt
DIVIDE = bytes.fromhex("b905000000" "31d2" "b801000000" "f7f1" "90" "90" "31c9" "f7f1" "f4")
# mov rbx, OUTSIDE; nop; mov rax, [rbx]; hlt
LOAD = b"\x48\xbb" + struct.pack("<Q", OUTSIDE) + bytes.fromhex("90" "488b03" "f4")


class _Fallback:
    """What an engine asks of its Fallback — the exit set, the budget unit, a disassembler, virtual reads —
    with the real Fallback's methods for reading guest memory and noting the pages a burst wrote."""

    read_virtual = fallback.Fallback.read_virtual
    _note_written = fallback.Fallback._note_written

    def __init__(self, memory: GuestMemory, exits: list[int], unit: str) -> None:
        self.machine = types.SimpleNamespace(memory=memory)
        self.exits = exits
        self.budget_unit = unit
        self.dis = fallback.Disassembler()
        self.stats = {"pages_written": 0}


def _engine(code: bytes, unit: str, native: bool, monkeypatch) -> fallback._Engine:
    mem = GuestMemory(RAM)
    # PML4 at 0x1000 → PDPT at 0x2000 → PD at 0x3000: identity-mapped 2 MiB pages, but 0x600000-0x7fffff
    # through a page table at 0x4000 (filled by the tests that use it)
    mem.write_u64(0x1000, 0x2000 | 3)
    mem.write_u64(0x2000, 0x3000 | 3)
    for i in range(3):
        mem.write_u64(0x3000 + 8 * i, (i << 21) | 0x83)
    mem.write_u64(0x3000 + 8 * 3, 0x4000 | 3)
    mem.write(CODE, code)
    if not native:
        monkeypatch.setattr(fallback, "_native_counter", lambda uclib: None)
    eng = fallback._Engine(_Fallback(mem, [CODE + len(code) - 1], unit), mem)
    if unit == "blocks":
        assert (eng.native is not None) == native
    s = eng.sregs
    s.cr0, s.cr3, s.cr4, s.efer = 0x80050033, 0x1000, 0x6A0, 0xD00
    eng.fpu.fcw, eng.fpu.mxcsr = 0x37F, 0x1F80
    eng.regs.rip, eng.regs.rflags, eng.regs.rsp = CODE, 2, 0x8000
    eng.load()
    return eng


def _bursts(eng: fallback._Engine, budget: int) -> list[tuple[str, int, int, int]]:
    """Bursts from CODE until one stops for another reason than the budget: (stop, end, count, blocks)."""
    out = []
    rip = CODE
    while True:
        stop, count = eng.run(rip, budget)
        eng.store()
        rip = eng.regs.rip
        out.append((stop, rip, count, eng.blocks))
        if stop != "budget" or len(out) > 10_000:
            return out


def _paths() -> list:
    params = [pytest.param(False, id="python-hook")]
    mod = fastloop.load()
    if mod is not None and hasattr(mod, "BlockCounter"):
        params.insert(0, pytest.param(True, id="native"))
    return params


@pytest.mark.parametrize("native", _paths())
def test_a_burst_counts_every_instruction_it_ran(native, monkeypatch):
    eng = _engine(LOOP, "blocks", native, monkeypatch)
    (stop, end, count, blocks), = _bursts(eng, 1_000_000)
    assert (stop, end, count) == ("exit", CODE + len(LOOP) - 1, LOOP_INSNS)
    assert 2000 <= blocks < LOOP_INSNS  # one or more blocks per iteration, several instructions each
    again = _engine(LOOP, "instructions", False, monkeypatch)  # Unicorn's own per-instruction counter
    assert _bursts(again, 1_000_000)[-1][:3] == ("exit", end, LOOP_INSNS)


@pytest.mark.parametrize("native", _paths())
def test_the_budget_stops_before_a_block_and_the_next_burst_goes_on_there(native, monkeypatch):
    eng = _engine(LOOP, "blocks", native, monkeypatch)
    bursts = _bursts(eng, 7)
    assert len(bursts) > 100 and bursts[-1][0] == "exit"
    assert all(b[3] == 7 for b in bursts[:-1])  # at most the budget; the stopping block ran in the next burst
    assert sum(b[2] for b in bursts) == LOOP_INSNS
    assert eng.regs.rbx == 500 and eng.regs.rax == 3000


def test_both_block_counting_paths_end_bursts_at_the_same_places(monkeypatch):
    if len(_paths()) < 2:
        pytest.skip("the native extension is not available here")
    native = _bursts(_engine(LOOP, "blocks", True, monkeypatch), 13)
    python = _bursts(_engine(LOOP, "blocks", False, monkeypatch), 13)
    assert native == python


@pytest.mark.parametrize("native", _paths())
def test_a_fault_inside_a_block_counts_the_instructions_before_it(native, monkeypatch):
    eng = _engine(DIVIDE, "blocks", native, monkeypatch)
    eng.regs.rdx = 0
    (stop, end, count, _b), = _bursts(eng, 1000)
    # the second div divides by ecx = 0 (xor ecx, ecx): #DE at its address, after seven instructions
    assert (stop, eng.vector, end, count) == ("fault", 0, CODE + 18, 7)


@pytest.mark.parametrize("native", _paths())
def test_an_access_outside_ram_stops_before_the_instruction(native, monkeypatch):
    eng = _engine(LOAD, "blocks", native, monkeypatch)
    (stop, end, count, _b), = _bursts(eng, 1000)
    assert (stop, end, count, eng.bad_access) == ("mmio", CODE + 11, 2, OUTSIDE)


def _store(value: int, address: int) -> bytes:
    """mov rax, value; mov rbx, address; mov [rbx], rax; hlt"""
    return b"\x48\xb8" + struct.pack("<Q", value) + b"\x48\xbb" + struct.pack("<Q", address) + bytes.fromhex("488903f4")


@pytest.mark.parametrize("native", _paths())
def test_bursts_note_the_physical_pages_they_store_to(native, monkeypatch):
    """Unicorn writes guest RAM through the host mapping, which KVM's dirty log does not see: memory hashes,
    checkpoints and schedule digests learn the pages from the fallback (guest-physical, after the walk)."""
    eng = _engine(_store(0x1122334455667788, 0x600008), "blocks", native, monkeypatch)
    mem = eng.fb.machine.memory
    mem.write_u64(0x4000, 0x100000 | 3)  # virtual 0x600000 → physical 0x100000
    eng.track_writes()
    assert _bursts(eng, 100)[-1][0] == "exit"
    assert mem.read_u64(0x100008) == 0x1122334455667788
    assert eng.written() == ([0x100], [], False)
    mem.host_dirty = set()
    eng.fb._note_written(eng.written(), eng.sregs.cr3)
    assert mem.host_dirty == {0x100}


@pytest.mark.parametrize("native", _paths())
def test_a_store_across_pages_finds_the_second_page_through_the_page_tables(native, monkeypatch):
    eng = _engine(_store(0x1122334455667788, 0x600FFC), "blocks", native, monkeypatch)
    mem = eng.fb.machine.memory
    mem.write_u64(0x4000, 0x100000 | 3)  # virtual 0x600000 → physical 0x100000
    mem.write_u64(0x4008, 0x300000 | 3)  # virtual 0x601000 → physical 0x300000 (not the next page)
    eng.track_writes()
    assert _bursts(eng, 100)[-1][0] == "exit"
    assert (mem.read(0x100FFC, 4), mem.read(0x300000, 4)) == (bytes.fromhex("88776655"), bytes.fromhex("44332211"))
    pages, crossings, overflow = eng.written()
    assert crossings == [0x100FFC] and not overflow
    mem.host_dirty = set()
    eng.fb._note_written((pages, crossings, overflow), eng.sregs.cr3)
    assert 0x300 in mem.host_dirty and 0x100 in mem.host_dirty


def test_new_runs_count_blocks_only_where_the_block_counter_is(monkeypatch):
    """Without the native extension a block budget would cost a Python callback per block: new runs then
    count instructions with Unicorn's own counter (the trace header says which; replays follow it)."""
    from tracevisor import session

    cfg = session.SessionConfig(kernel="k")
    monkeypatch.setattr(fallback, "block_counter_available", lambda: False)
    vm = cfg.vm_config()
    assert (vm.fallback_budget_unit, vm.fallback_budget) == ("instructions", 100_000)
    monkeypatch.setattr(fallback, "block_counter_available", lambda: True)
    vm = cfg.vm_config()
    assert (vm.fallback_budget_unit, vm.fallback_budget) == ("blocks", 10_000)
    cfg.fallback_budget = 77  # an explicit budget is in the unit in use
    assert cfg.vm_config().fallback_budget == 77
