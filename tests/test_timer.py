"""Timer interrupts at reproducible points (exact mode's user-space LAPIC and PIT on virtual time).

The models are tested without KVM; the KVM tests record guests whose hidden state — how many ticks
arrived and what the interrupted loop had counted at each one — depends on exactly where every interrupt
landed, then replay each recording ten times and compare that state, read from guest memory.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import EXIT_DATA, build_asm, guest_symbols, record_exact, replay_memory
from tracevisor import apic as A
from tracevisor.interrupts import EXIT_NS, Interrupts
from tracevisor.pit import Pic, Pit

REPLAYS = 10
kvm = pytest.mark.kvm


# -- the models, without KVM -------------------------------------------------------------------------------
def test_lapic_periodic_timer_counts_on_virtual_time():
    lap = A.Lapic(0)
    lap.write(A.SVR, 0x1FF, 0)
    lap.write(A.TIMER_DIV, 0x1, 0)  # divide by 4
    lap.write(A.LVT_TIMER, 0x20030, 0)  # periodic, vector 0x30
    lap.write(A.TIMER_INIT, 1000, 100)
    assert lap.deadline == 100 + 4000
    assert lap.read(A.TIMER_CUR, 1100) == 750
    assert not lap.expire(4099) and lap.pending() is None
    assert lap.expire(4100) and lap.pending() == 0x30
    assert lap.deadline == 8100
    lap.ack(0x30)
    assert lap.pending() is None and lap.read(A.ISR0 + 0x10, 0) == 1 << 16  # vector 0x30 in service
    assert lap.expire(20000)  # three periods missed: one interrupt, re-armed after now
    assert lap.deadline == 20100 and lap.pending() is None  # 0x30 is still in service: PPR blocks it
    lap.write(A.EOI, 0, 0)
    assert lap.pending() == 0x30


def test_lapic_one_shot_masking_and_priority():
    lap = A.Lapic(3)
    assert lap.read(A.ID, 0) == 3 << 24 and lap.read(A.VER, 0) == A.VERSION
    lap.write(A.LVT_TIMER, 0x31, 0)
    assert lap.regs[A.LVT_TIMER] & A.MASKED  # the APIC is software-disabled: LVTs stay masked
    lap.write(A.SVR, 0x100, 0)
    lap.write(A.TIMER_DIV, 0xB, 0)  # divide by 1
    lap.write(A.LVT_TIMER, 0x10031, 0)  # one-shot, masked
    lap.write(A.TIMER_INIT, 50, 0)
    assert lap.expire(50) and lap.pending() is None and lap.deadline is None and lap.read(A.TIMER_CUR, 60) == 0
    lap.write(A.LVT_TIMER, 0x31, 0)
    lap.write(A.TIMER_INIT, 50, 100)
    lap.write(A.TPR, 0x30, 100)
    assert lap.expire(150) and lap.pending() is None  # vector 0x31 is not above TPR class 3
    lap.write(A.TPR, 0x20, 150)
    assert lap.pending() == 0x31
    lap.accept(0x80)
    assert lap.pending() == 0x80


def test_lapic_icr_and_tsc_deadline():
    lap = A.Lapic(0)
    lap.write(A.ICR_HI, 2 << 24, 0)
    assert lap.write(A.ICR_LO, 0x4041, 0) == A.Ipi(0x41, 0, 2, 0)
    lap.x2apic = True
    assert lap.write_icr64(5 << 32 | 0x0004_0042) == A.Ipi(0x42, 0, 5, 1)
    lap.write(A.SVR, 0x1FF, 0)
    lap.write(A.LVT_TIMER, 0x40033, 0)  # TSC-deadline mode
    # the last TSC answer was 10_000 at virtual time 500; at 2 GHz a deadline 4000 cycles later is 2 µs later
    lap.set_tsc_deadline(14_000, 600, (500, 10_000, 2_000_000))
    assert lap.deadline == 2500
    assert lap.expire(2500) and lap.pending() == 0x33 and lap.tsc_deadline == 0


def test_controller_virtual_time_and_ipis():
    irq = Interrupts(2)

    class V:  # what the controller needs of a vCPU here
        def __init__(self, cpu):
            self.cpu = cpu
            self.vcpu = SimpleNamespace(run=SimpleNamespace(if_flag=1))

    irq.mmio(V(0), A.BASE_GPA + A.SVR, True, (0x1FF).to_bytes(4, "little"))
    irq.mmio(V(0), A.BASE_GPA + A.LVT_TIMER, True, (0x20040).to_bytes(4, "little"))
    irq.mmio(V(0), A.BASE_GPA + A.TIMER_DIV, True, (0xB).to_bytes(4, "little"))
    irq.mmio(V(0), A.BASE_GPA + A.TIMER_INIT, True, (3 * EXIT_NS).to_bytes(4, "little"))
    assert irq.next_due == 3 * EXIT_NS
    for _ in range(2):
        irq.after_exit(V(0), 2)
    assert int.from_bytes(irq.mmio(V(0), A.BASE_GPA + A.TIMER_CUR, False, bytes(4)), "little") == EXIT_NS
    irq.after_exit(V(0), 2)
    irq.expire()
    assert irq.lapics[0].pending() == 0x40
    # x2APIC: an IPI from vCPU 0 to APIC ID 1 wakes the halted vCPU 1
    irq.after_exit(V(1), 5)
    assert not irq.runnable(1)
    assert irq.msr(V(0), True, 0x830, 1 << 32 | 0x51) == 0
    assert irq.runnable(1) and irq.pending(1) == (0x51, "lapic")
    assert irq.msr(V(0), False, 0xC000_0080, 0) is None  # not ours: #GP


def test_pit_and_pic():
    pit, pic = Pit(), Pic()
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFE)):
        pic.write(port == 0x20, value)
    assert pic.base == 0x20 and pic.imr == 0xFE
    pit.write(0x43, 0x34, 0)  # channel 0, lo/hi, mode 2
    pit.write(0x40, 1193 & 0xFF, 0)
    pit.write(0x40, 1193 >> 8, 0)
    assert pit.deadline == 999_848  # 1193 ticks of 1.193182 MHz, rounded up
    pit.write(0x43, 0x00, 500_000)  # latch
    lo, hi = pit.read(0x40, 600_000), pit.read(0x40, 600_000)
    assert abs((hi << 8 | lo) - 1193 // 2) <= 1
    assert pit.expire(1_000_000)
    pic.raise_irq(0)
    assert pic.pending() == 0x20
    pic.ack(0x20)
    pic.raise_irq(0)
    assert pic.pending() is None  # IRQ 0 in service
    pic.write(True, 0x20)  # non-specific EOI
    assert pic.pending() == 0x20
    assert pit.deadline == 1_999_695  # the second period, counted from the load (no drift)


# -- guests ----------------------------------------------------------------------------------------------------
# The prologue maps the LAPIC page (the boot page tables map only the first GiB) and installs an interrupt
# gate for VECTOR at `isr`.
PROLOGUE = """
  lea apic_pd(%rip), %rax
  or $3, %rax
  mov $0x11000, %rdi
  mov %rax, 24(%rdi)
  mov $0xFEE0009B, %eax
  lea apic_pd(%rip), %rdi
  mov %rax, 503*8(%rdi)
  mov %cr3, %rax
  mov %rax, %cr3
  lea isr(%rip), %rax
  lea idt(%rip), %rdi
  mov %ax, VECTOR*16(%rdi)
  movw $0x08, VECTOR*16+2(%rdi)
  movw $0x8E00, VECTOR*16+4(%rdi)
  shr $16, %rax
  mov %ax, VECTOR*16+6(%rdi)
  shr $16, %rax
  mov %eax, VECTOR*16+8(%rdi)
  lidt idtr(%rip)
"""
EXIT = """
  cli
  mov ticks(%rip), %eax
  mov %eax, exitblk(%rip)
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
"""
# the ISR's common part: log the interrupted loop's counter, count the tick
ISR_LOG = """
isr:
  push %rax
  push %rcx
  push %rdx
  push %rdi
  mov ticks(%rip), %eax
  and $63, %eax
  lea log(%rip), %rdi
  mov %r12, (%rdi,%rax,8)
  incl ticks(%rip)
"""
ISR_END = """
  pop %rdi
  pop %rdx
  pop %rcx
  pop %rax
  iretq
"""
DATA = """
.balign 4096
apic_pd: .fill 512, 8, 0
idt: .fill 512, 8, 0
idtr: .word 4095
  .quad idt
.balign 8
ticks: .quad 0
sum: .quad 0
log: .fill 64, 8, 0
""" + EXIT_DATA.format(code=0)

XAPIC_START = """
  mov $0xFEE00000, %edi
  movl $0x1FF, 0xF0(%rdi)
  movl $0xB, 0x3E0(%rdi)
  movl $0x20030, 0x320(%rdi)
  movl $50000, 0x380(%rdi)
  sti
"""
XAPIC_EOI = """
  mov $0xFEE00000, %edi
  mov 0x390(%rdi), %eax
  add %rax, sum(%rip)
  movl $0, 0xB0(%rdi)
"""
# a loop without exits: only a timer kick can interrupt it
BUSY = """
  xor %r12, %r12
1:
  inc %r12
  cmpq $30, ticks(%rip)
  jb 1b
"""
# halting between ticks (virtual time jumps to each deadline), with a stretch of work after each wake-up
HALTING = """
  xor %r12, %r12
1:
  hlt
  mov $300, %ecx
2:
  inc %r12
  dec %ecx
  jnz 2b
  cmpq $30, ticks(%rip)
  jb 1b
"""
# x2APIC through MSRs, one-shot re-armed from the ISR, the main loop making UART exits now and then
X2APIC_START = """
  mov $0x1b, %ecx
  rdmsr
  or $0xc00, %eax
  wrmsr
  xor %edx, %edx
  mov $0x80f, %ecx
  mov $0x1ff, %eax
  wrmsr
  mov $0x83e, %ecx
  mov $0xb, %eax
  wrmsr
  mov $0x832, %ecx
  mov $0x30, %eax
  wrmsr
  mov $0x838, %ecx
  mov $70000, %eax
  wrmsr
  sti
"""
X2APIC_EOI = """
  mov $0x838, %ecx
  mov $70000, %eax
  xor %edx, %edx
  wrmsr
  mov $0x80b, %ecx
  xor %eax, %eax
  wrmsr
"""
MIXED = """
  xor %r12, %r12
  mov $0x800, %dx
1:
  inc %r12
  test $0xfff, %r12
  jnz 2f
  mov $0x2e, %al
  outb %al, %dx
2:
  cmpq $30, ticks(%rip)
  jb 1b
"""
# --pit: the 8259 pair remapped to 0x20/0x28 (only IRQ 0 unmasked), PIT channel 0 in mode 2 at ~1 kHz; the
# main loop latches and reads the PIT count every 4096 iterations (port exits whose values depend on time)
PIT_START = """
  mov $0x11, %al
  out %al, $0x20
  out %al, $0xA0
  mov $0x20, %al
  out %al, $0x21
  mov $0x28, %al
  out %al, $0xA1
  mov $0x04, %al
  out %al, $0x21
  mov $0x02, %al
  out %al, $0xA1
  mov $0x01, %al
  out %al, $0x21
  out %al, $0xA1
  mov $0xFE, %al
  out %al, $0x21
  mov $0xFF, %al
  out %al, $0xA1
  mov $0x34, %al
  out %al, $0x43
  mov $0xA9, %al
  out %al, $0x40
  mov $0x04, %al
  out %al, $0x40
  sti
"""
PIT_EOI = """
  mov $0x20, %al
  out %al, $0x20
"""
PIT_LOOP = """
  xor %r12, %r12
1:
  inc %r12
  test $0xfff, %r12
  jnz 2f
  xor %eax, %eax
  out %al, $0x43
  in $0x40, %al
  mov %al, %cl
  in $0x40, %al
  mov %al, %ch
  movzx %cx, %rcx
  add %rcx, sum(%rip)
2:
  cmpq $30, ticks(%rip)
  jb 1b
"""
# TSC-deadline mode: each tick re-arms 100 000 TSC cycles after a (recorded) RDTSC
TSC_START = """
  mov $0xFEE00000, %edi
  movl $0x1FF, 0xF0(%rdi)
  movl $0x40030, 0x320(%rdi)
  call arm
  sti
"""
TSC_EOI = """
  call arm
  mov $0xFEE00000, %edi
  movl $0, 0xB0(%rdi)
"""
TSC_ARM = """
arm:
  rdtsc
  add $100000, %eax
  adc $0, %edx
  mov $0x6e0, %ecx
  wrmsr
  ret
"""

GUESTS = {
    "xapic-busy": (0x30, XAPIC_START + BUSY, XAPIC_EOI, {}),
    "xapic-hlt": (0x30, XAPIC_START + HALTING, XAPIC_EOI, {}),
    "x2apic-mixed": (0x30, X2APIC_START + MIXED, X2APIC_EOI, {}),
    "pit": (0x20, PIT_START + PIT_LOOP, PIT_EOI, {"pit": True}),
    "tsc-deadline": (0x30, TSC_START + BUSY, TSC_EOI, {}),
}


def build_timer_guest(tmp_path, name: str):
    vector, main, eoi, opts = GUESTS[name]
    body = PROLOGUE.replace("VECTOR", str(vector)) + main + EXIT + ISR_LOG + eoi + ISR_END + \
        (TSC_ARM if name == "tsc-deadline" else "")
    return build_asm(tmp_path, name.replace("-", "_"), body, DATA), opts


def record_timer_guest(tmp_path, name: str) -> tuple:
    """Build timer guest ``name`` and record it exactly: (trace, the regions holding its hidden state — the
    tick count and the loop count logged at each tick —, the stop info, that state, the interrupt statistics)."""
    guest, opts = build_timer_guest(tmp_path, name)
    sym = guest_symbols(guest)
    regions = [(sym["ticks"], 16), (sym["log"], 64 * 8)]
    trace = tmp_path / f"{name}.tvt"
    info, header, state, irq = record_exact(guest, trace, regions=regions, **opts)
    assert info.reason == "exit", info.message
    assert header["interrupts"]["model"] == "user" and header["interrupts"]["pit"] == bool(opts.get("pit"))
    return trace, regions, info, state, irq


@kvm
@pytest.mark.parametrize("name", list(GUESTS))
def test_timer_guest_replays_exactly(tmp_path, name):
    trace, regions, info, state, irq = record_timer_guest(tmp_path, name)
    ticks = int.from_bytes(state[0][:8], "little")
    assert ticks >= 30 and info.code == ticks  # (a tick may land between the last check and the cli)
    assert irq["injected"] >= 30
    logged = [int.from_bytes(state[1][i:i + 8], "little") for i in range(0, 64 * 8, 8)]
    assert len(set(logged[:30])) > 1  # the interrupted loop was at different counts at different ticks
    for _ in range(REPLAYS):
        res, replayed, _points = replay_memory(trace, regions)
        assert res.verified, res.message
        assert replayed == state  # every tick landed at the same loop count, with the same timer reads


@kvm
@pytest.mark.parametrize("name", ["x2apic-mixed", "xapic-busy"])
def test_points_found_at_a_seek_kick_still_take_their_interrupt(tmp_path, monkeypatch, name):
    """The replay kicks a vCPU that takes long to reach a sought point and looks at where it stopped; a
    point found that way (not at a breakpoint hit) must still get its interrupt at the next entry, as in
    the recording.  A tiny quantum makes such kicks frequent (under load they happen anyway)."""
    from tracevisor import sched

    trace, regions, _info, state, _irq = record_timer_guest(tmp_path, name)
    monkeypatch.setattr(sched, "QUANTUM_S", 0.0002)
    for _ in range(5):
        res, replayed, _points = replay_memory(trace, regions)
        assert res.verified, res.message
        assert replayed == state


@kvm
def test_timer_points_are_recorded_with_registers(tmp_path):
    """A busy loop without exits is cut by timer kicks: each is a `sched` event with RIP and digest."""
    from tracevisor.sched import load_schedule

    guest, _ = build_timer_guest(tmp_path, "xapic-busy")
    trace = tmp_path / "busy.tvt"
    info, _, _, _ = record_exact(guest, trace)
    assert info.reason == "exit"
    points = [e for e in load_schedule(str(trace)) if e["why"] == "timer"]
    assert points and all(e["next"] == e["cpu"] for e in points)
    assert any(e.get("rip") is not None and isinstance(e.get("digest"), int) for e in points)


@kvm
def test_wait_on_memory_replays(tmp_path):
    """A loop that repeats its registers while waiting for the ISR to change memory: every timer point in
    it has the same RIP and digest, and the replay's first match is as good as any (the loop writes
    nothing)."""
    body = PROLOGUE.replace("VECTOR", "48") + XAPIC_START + """
1:
  cmpq $5, ticks(%rip)
  jb 1b
""" + EXIT + ISR_LOG + XAPIC_EOI + ISR_END
    guest = build_asm(tmp_path, "waitmem", body, DATA)
    trace = tmp_path / "wait.tvt"
    info, _, _, _ = record_exact(guest, trace)
    assert info.reason == "exit" and info.code >= 5
    from tracevisor.sched import load_schedule

    recorded = sum(e["why"] == "timer" for e in load_schedule(str(trace)))
    res, _, points = replay_memory(trace, [])
    assert res.verified, res.message
    assert points == recorded


@kvm
def test_halt_without_a_timer_is_a_hang_report(tmp_path):
    guest = build_asm(tmp_path, "sleeper", "  sti\n  hlt\n" + EXIT, DATA)
    info, _, _, _ = record_exact(guest, tmp_path / "sleep.tvt")
    assert info.reason == "hang" and "no timer armed" in info.message
