"""Memory the instruction fallback writes is memory the replay compares.

Unicorn's bursts store to guest RAM through the host mapping, which KVM's dirty-page log does not see; the
memory hashes of a recording (and checkpoints, and the exact schedule's digests) are kept up to date from
that log.  A guest that fills pages with SSE stores — which run in a burst on hosts whose KVM cannot emulate
them, natively elsewhere — must leave a recorded memory hash equal to a hash of all of RAM computed from
scratch at every check, and its replay must verify."""

from __future__ import annotations

import zlib

import pytest

from helpers import EXIT_ASM, EXIT_DATA, build_asm, guest_symbols

pytestmark = pytest.mark.kvm

SSE_FILL = """
  mov %cr4, %rax
  or $0x600, %rax
  mov %rax, %cr4
  mov %cr0, %rax
  and $~0xc, %rax
  or $0x2, %rax
  mov %rax, %cr0
  mov $0x5a5a5a5a5a5a5a5a, %rax
  movq %rax, %xmm0
  punpcklqdq %xmm0, %xmm0
  lea buf(%rip), %rdi
  mov $768, %ecx
1:
  movups %xmm0, (%rdi)
  add $16, %rdi
  dec %ecx
  jnz 1b
""" + EXIT_ASM
SSE_DATA = ".balign 4096\nbuf: .space 12288\n"


def _full_hash(machine) -> int:
    from tracevisor.memhash import mix

    mv = machine.memory._mv
    pages = machine.memory.size >> 12
    return sum(mix(p, zlib.crc32(mv[p << 12:(p + 1) << 12])) for p in range(pages)) & ((1 << 64) - 1)


def test_pages_written_by_fallback_bursts_are_in_the_memory_hashes(tmp_path):
    from tracevisor import session
    from tracevisor.replay import Replayer

    guest = build_asm(tmp_path, "ssefill", SSE_FILL, EXIT_DATA.format(code=0) + SSE_DATA)
    out = tmp_path / "ssefill.tvt"
    checks = []
    with session.build_record(session.SessionConfig(kernel=str(guest), quiet=True), str(out)) as s:
        m = s.machine
        recorded_check = m.mem_check

        def check(v, at: str) -> None:
            recorded_check(v, at)
            if at != "boot":
                checks.append((s.hasher.total, _full_hash(m)))

        m.mem_check = check
        info = s.run()
        assert info.reason == "exit" and info.status == 0, info.message
        assert m.memory.read(guest_symbols(guest)["buf"], 12288) == b"\x5a" * 12288
        bursts = m.fallback.stats["bursts"] if m.fallback is not None else 0
    assert checks and all(kept == full for kept, full in checks), checks
    with Replayer(str(out)) as r:
        res = r.run()
    assert res.verified, res.message
    if bursts:  # (on a host whose KVM runs SSE natively there are none)
        assert res.checks.get("final_memory") == "identical"
