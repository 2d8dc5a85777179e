"""Exact recording: RDTSC/RDTSCP/RDRAND/RDSEED sites found before boot, patched, recorded and replayed.

The KVM tests record guests whose control flow and memory depend on the TSC and on random numbers, then
replay each recording ten times and compare the guest's hidden state (memory no exit ever showed) with
the recording's.
"""

from __future__ import annotations

import pytest

from helpers import EXIT_DATA, build_asm, guest_symbols, run_cli
from tracevisor import ndinsn

REPLAYS = 10
kvm = pytest.mark.kvm


# -- the site finder and the emulation, without KVM ------------------------------------------------------
@pytest.mark.parametrize("raw,want", [
    ("0f31", ("rdtsc", -1, 64)),
    ("0f01f9", ("rdtscp", -1, 64)),
    ("480fc7f0", ("rdrand", 0, 64)),       # rdrand rax
    ("0fc7f1", ("rdrand", 1, 32)),         # rdrand ecx
    ("66410fc7f1", ("rdrand", 9, 16)),     # rdrand r9w
    ("490fc7fa", ("rdseed", 10, 64)),      # rdseed r10
    ("f30fc7f8", None),                    # rdpid: not ours
    ("0fc738", None),                      # cmpxchg8b-family memory form: not ours
])
def test_decode(raw, want):
    assert ndinsn.decode(bytes.fromhex(raw)) == want


def test_find_sites_trusts_only_a_consistent_sweep():
    # rdtsc; nop; rdrand eax; then undecodable bytes, then an rdtsc right after them (the sweep is
    # resynchronising: not trusted with a patch) and one far enough behind (trusted again)
    code = bytes.fromhex("0f31" "90" "0fc7f0") + b"\xff\xff" + bytes.fromhex("0f31") + b"\x90" * 70 + \
        bytes.fromhex("0f01f9")
    scan = ndinsn.find_sites([(0x1000, code)], debug_slots=1)
    got = [(s.addr - 0x1000, s.kind, s.how) for s in scan.sites]
    assert got == [(0, "rdtsc", "patch"), (3, "rdrand", "patch"), (8, "rdtsc", "debugreg"),
                   (80, "rdtscp", "patch")]
    ports = [s.port for s in scan.sites if s.how == "patch"]
    assert all(a != b for a, b in zip(ports, ports[1:]))  # consecutive sites never share a port
    assert ndinsn.find_sites([(0x1000, code)], debug_slots=0).sites[2].how == "uncovered"


def test_patch_keeps_the_length():
    for raw in ("0f31", "0f01f9", "66410fc7f1", "480fc7f0"):
        kind, reg, bits = ndinsn.decode(bytes.fromhex(raw))
        s = ndinsn.Site(0x2000, len(raw) // 2, kind, reg, bits, bytes.fromhex(raw), "patch", 0xE6)
        p = s.patch_bytes()
        assert len(p) == s.length and p[-2:] == b"\xe7\xe6" and set(p[:-2]) <= {0x3E}


class _Answers:
    def rdtsc(self, cpu):
        return 0x1122_3344_5566_7788

    def rdrand(self, cpu, bits, seed):
        return (1 << bits) - 2


def test_emulate_follows_the_instruction_semantics():
    regs = [0xFFFF_FFFF_FFFF_FFFF] * 16 + [0x3000, 0x8D5 | 0x202]
    ndinsn.emulate(ndinsn.Site(0x3000, 3, "rdtscp", -1, 64, b"", "patch"), regs, _Answers(), 0, lambda: 7)
    assert (regs[0], regs[3], regs[2], regs[16]) == (0x5566_7788, 0x1122_3344, 7, 0x3003)
    regs = [0xFFFF_FFFF_FFFF_FFFF] * 16 + [0x3000, 0x8D5 | 0x202]
    ndinsn.emulate(ndinsn.Site(0x3000, 5, "rdrand", 9, 16, b"", "patch"), regs, _Answers(), 0)
    assert regs[9] == 0xFFFF_FFFF_FFFF_FFFE and regs[17] == 0x203  # upper bits kept; CF=1, others clear
    ndinsn.emulate(ndinsn.Site(0x3000, 3, "rdrand", 1, 32, b"", "patch"), regs, _Answers(), 0)
    assert regs[2] == 0xFFFF_FFFE  # rcx: a 32-bit destination is zero-extended


# -- real guests ------------------------------------------------------------------------------------------
# Loops until 20 M TSC cycles have passed: the iteration count, the TSC values kept in memory and the sum
# of random numbers all differ from run to run unless every value is replayed.
ND_LOOP = """
  xor %r12, %r12
  xor %r13, %r13
  rdtsc
  shl $32, %rdx
  or %rax, %rdx
  mov %rdx, %r14
1:
  rdtsc
  shl $32, %rdx
  or %rax, %rdx
  mov %rdx, %rbx
  sub %r14, %rbx
  lea tscs(%rip), %rdi
  mov %r12, %rsi
  and $255, %rsi
  mov %rdx, (%rdi,%rsi,8)
  rdrand %rax
  add %rax, %r13
  rdrand %ecx
  add %rcx, %r13
  rdrand %r9w
  add %r9, %r13
  rdseed %r10
  xor %r10, %r13
  rdtscp
  add %rcx, %r13
  inc %r12
  cmp $20000000, %rbx
  jb 1b
  mov %r12, state(%rip)
  mov %r13, state+8(%rip)
  mov %r12, %rax
  and $0x7f, %rax
  mov %eax, exitblk(%rip)
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
"""
STATE_DATA = ".balign 8\nstate: .quad 0, 0\ntscs: .fill 256, 8, 0\n"

# A pure RDTSC spin (no other exit in the loop) whose length is decided by the TSC; one rdtsc sits right
# behind undecodable bytes, so the sweep does not trust it with a patch: a debug register covers it.
TSC_SPIN = """
  rdtsc
  mov %eax, %r14d
  xor %r12, %r12
  jmp 1f
  .byte 0xff, 0xff
1:
  rdtsc
  inc %r12
  sub %r14d, %eax
  cmp $5000000, %eax
  jb 1b
  mov %r12, state(%rip)
  mov %r12, %rax
  and $0x7f, %rax
  mov %eax, exitblk(%rip)
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
"""


def record_inprocess(kernel, out, *, exact=True, cpus=1, regions=()) -> tuple:
    """Record like `tracevisor record` and return (stop info, header, the guest memory regions
    [(gpa, len)] read after the run, what the recorder reported) — the memory is the hidden state the
    replays must reproduce."""
    from tracevisor import session

    config = session.SessionConfig(kernel=str(kernel), cpus=cpus, exact=exact, quiet=True)
    with session.build_record(config, str(out)) as s:
        info = s.run()
        return info, s.writer.header, [s.machine.memory.read(a, n) for a, n in regions], s.machine.exact_notes()


def replay_state(path, regions) -> tuple:
    from tracevisor.replay import Replayer

    with Replayer(path) as r:
        res = r.run()
        return res, [r.machine.memory.read(a, n) for a, n in regions]


@pytest.fixture(scope="module")
def nd_guest(tmp_path_factory):
    d = tmp_path_factory.mktemp("nd")
    return build_asm(d, "ndloop", ND_LOOP, EXIT_DATA.format(code=0) + STATE_DATA)


@kvm
def test_rdtsc_rdrand_loop_replays_exactly(nd_guest, tmp_path):
    sym = guest_symbols(nd_guest)
    regions = [(sym["state"], 16), (sym["tscs"], 256 * 8)]
    trace = tmp_path / "nd.tvt"
    info, header, state, notes = record_inprocess(nd_guest, trace, regions=regions)
    assert info.reason == "exit" and notes == []
    assert header["mode"] == "exact"
    kinds = sorted({row[2] for row in header["exact"]["sites"]})
    assert kinds == ["rdrand", "rdseed", "rdtsc", "rdtscp"]
    iterations = int.from_bytes(state[0][:8], "little")
    assert iterations > 1 and info.code == iterations & 0x7F
    for _ in range(REPLAYS):
        res, replayed = replay_state(trace, regions)
        assert res.verified, res.message
        assert replayed == state  # the TSC values and random sums the guest kept, byte for byte


@pytest.fixture(scope="module")
def spin_guest(tmp_path_factory):
    d = tmp_path_factory.mktemp("spin")
    return build_asm(d, "tscspin", TSC_SPIN, EXIT_DATA.format(code=0) + STATE_DATA)


@kvm
def test_debug_register_covers_an_untrusted_site(spin_guest, tmp_path):
    sym = guest_symbols(spin_guest)
    regions = [(sym["state"], 8)]
    trace = tmp_path / "spin.tvt"
    info, header, state, notes = record_inprocess(spin_guest, trace, regions=regions)
    assert info.reason == "exit", info.message
    hows = [row[6] for row in header["exact"]["sites"]]
    assert hows == ["patch", "debugreg"]
    assert int.from_bytes(state[0], "little") > 1
    for _ in range(REPLAYS):
        res, replayed = replay_state(trace, regions)
        assert res.verified, res.message
        assert replayed == state


@kvm
def test_replay_refuses_a_mode_mismatch(nd_guest, tmp_path):
    exact = tmp_path / "exact.tvt"
    p = run_cli("record", "-q", "-o", str(exact), str(nd_guest))
    assert p.returncode < 128 and exact.exists(), p.stderr
    p = run_cli("replay", "--parallel", str(exact))
    assert p.returncode == 1
    err = p.stderr.decode().strip().splitlines()
    assert len(err) == 1 and "exact recording" in err[0] and "Traceback" not in p.stderr.decode()
    par = tmp_path / "par.tvt"
    p = run_cli("record", "--parallel", "-q", "-o", str(par), str(nd_guest))
    assert par.exists(), p.stderr
    p = run_cli("replay", "--exact", str(par))
    assert p.returncode == 1 and len(p.stderr.decode().strip().splitlines()) == 1
    p = run_cli("replay", "-q", str(exact))
    assert p.returncode not in (1, 4) and b"replay verified" in p.stderr, p.stderr


@kvm
def test_rewritten_code_is_reported(tmp_path):
    # the guest overwrites its own (patched) rdtsc with two nops before exiting
    body = """
  jmp 2f
1:
  rdtsc
  ret
2:
  call 1b
  lea 1b(%rip), %rdi
  movw $0x9090, (%rdi)
""" + EXIT_ASM_0
    g = build_asm(tmp_path, "selfmod", body, EXIT_DATA.format(code=0))
    info, header, _, notes = record_inprocess(g, tmp_path / "sm.tvt")
    assert info.reason == "exit"
    assert len(notes) == 1 and "overwrote the patched rdtsc" in notes[0]


EXIT_ASM_0 = """
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
"""


# -- several vCPUs: one at a time, the schedule recorded ----------------------------------------------------
# Both vCPUs (vCPU 0 waits for vCPU 1 to be up) increment a shared counter without a lock (load, add,
# store) and log who wrote which value; vCPU 0 then spins until vCPU 1 says it is done.  Neither loop makes an exit: the vCPUs are switched by
# kicks between arbitrary instructions, and lost updates depend on exactly where.
RACE = """
  test %rsi, %rsi
  jz 0f
  movl $1, ready(%rip)
0:
  cmpl $1, ready(%rip)
  jne 0b
  mov $12000, %ecx
  lea log(%rip), %rdi
1:
  mov counter(%rip), %rax
  mov %rax, %rbx
  and $1023, %rbx
  add $1, %rax
  mov %sil, (%rdi,%rbx)
  mov %rax, counter(%rip)
  dec %ecx
  jnz 1b
  test %rsi, %rsi
  jnz 3f
2:
  cmpl $1, done(%rip)
  jne 2b
  mov counter(%rip), %rax
  and $0x7f, %rax
  mov %eax, exitblk(%rip)
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
3:
  movl $1, done(%rip)
4:
  cli
  hlt
  jmp 4b
"""
RACE_DATA = ".balign 8\ncounter: .quad 0\ndone: .long 0\nready: .long 0\nlog: .fill 1024, 1, 0\n"

# vCPU 1 prints a line per iteration on the UART until vCPU 0, after some work of its own, tells it to stop;
# the number of lines depends on where the switches fell.
def _stopper(value: str, loops: int) -> str:
    """vCPU 0's part of the two-vCPU guests below: work ``loops`` iterations, set ``stop``, wait for vCPU 1's
    ``acked``, then exit with ``value`` & 0x7f (the hidden state the replays must reproduce)."""
    return f"""
  mov ${loops}, %ecx
1:
  dec %ecx
  jnz 1b
  movl $1, stop(%rip)
2:
  cmpl $1, acked(%rip)
  jne 2b
  mov {value}(%rip), %rax
  and $0x7f, %rax
  mov %eax, exitblk(%rip)""" + EXIT_ASM_0


PRINTER = """
  test %rsi, %rsi
  jnz 3f
0:
  cmpq $0, lines(%rip)
  je 0b""" + _stopper("lines", 15000) + """3:
  mov $0x800, %dx
4:
  mov $0x78, %al
  outb %al, %dx
  mov $0x0a, %al
  outb %al, %dx
  incq lines(%rip)
  cmpl $1, stop(%rip)
  jne 4b
  movl $1, acked(%rip)
5:
  cli
  hlt
  jmp 5b
"""
PRINTER_DATA = ".balign 8\nlines: .quad 0\nstop: .long 0\nacked: .long 0\n"


@pytest.mark.parametrize("name,body,data,names", [
    ("race", RACE, RACE_DATA, [("counter", 8), ("log", 1024)]),
    ("printer", PRINTER, PRINTER_DATA, [("lines", 8)]),
])
@kvm
def test_two_vcpus_replay_their_schedule(tmp_path, name, body, data, names):
    g = build_asm(tmp_path, name, body, EXIT_DATA.format(code=0) + data)
    sym = guest_symbols(g)
    regions = [(sym[n], size) for n, size in names]
    trace = tmp_path / f"{name}.tvt"
    info, header, state, notes = record_inprocess(g, trace, cpus=2, regions=regions)
    assert info.reason == "exit", info.message
    from tracevisor.sched import load_schedule

    sched = load_schedule(str(trace))
    assert any(e["why"] == "kick" for e in sched)  # switched between instructions, not only at exits
    for _ in range(REPLAYS):
        res, replayed = replay_state(trace, regions)
        assert res.verified, res.message
        assert replayed == state


# vCPU 1 counts in memory in a loop whose registers are the same on every pass (the flags are reset by the
# xor); vCPU 0 works for a while, then stops it.  Neither makes an exit, so every switch is a kick, and a kick
# point inside vCPU 1's loop has the same RIP and registers on every pass: only the memory written since the
# previous switch (the counter's page) tells the passes apart.
SAME_REGS = """
  test %rsi, %rsi
  jnz 3f""" + _stopper("counter", 100000) + """3:
same_inc:
  incq counter(%rip)
same_flags:
  xor %eax, %eax
  nop
  nop
  nop
  nop
  nop
  nop
  cmpl $1, stop(%rip)
  jne 3b
same_end:
  movl $1, acked(%rip)
4:
  cli
  hlt
  jmp 4b
"""
SAME_REGS_DATA = ".balign 8\ncounter: .quad 0\nstop: .long 0\nacked: .long 0\n"


@kvm
def test_kick_points_in_a_loop_with_repeating_registers_are_told_apart_by_memory(tmp_path):
    g = build_asm(tmp_path, "sameregs", SAME_REGS, EXIT_DATA.format(code=0) + SAME_REGS_DATA)
    sym = guest_symbols(g)
    regions = [(sym["counter"], 8)]
    from tracevisor.sched import load_schedule

    def repeating(e: dict) -> bool:
        # a vCPU 1 kick inside its loop, anywhere but right after the increment (whose flags carry the
        # counter's parity, sign and zero: there the registers do not repeat)
        return (e["cpu"] == 1 and e["why"] == "kick" and sym["same_inc"] <= e["rip"] < sym["same_end"]
                and e["rip"] != sym["same_flags"])

    # Where a kick lands is up to host timing; record until one lands where the registers repeat.
    for attempt in range(6):
        trace = tmp_path / f"sameregs{attempt}.tvt"
        info, header, state, notes = record_inprocess(g, trace, cpus=2, regions=regions)
        assert info.reason == "exit", info.message
        sched = load_schedule(str(trace))
        if any(repeating(e) for e in sched):
            break
    else:
        raise AssertionError(f"no kick of vCPU 1 landed in its loop where the registers repeat: {sched}")
    assert all("mdigest" in e for e in sched)
    skipped = 0
    for _ in range(3):  # (each replay steps over ~10 000 register-only hits: seconds)
        res, replayed = replay_state(trace, regions)
        assert res.verified, res.message
        assert replayed == state  # the counter: as many passes as in the recording, not the first match's
        points = res.checks["points"]
        assert points["memory_digests_compared"] == len(sched)
        skipped += points["register_only_matches_skipped"]
    # that kick point's registers recur at every earlier pass of the loop: those hits were skipped
    assert skipped > 0
