"""Host operations that fail under the guest (disk full, file size limit) are reported and recorded."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from helpers import EXIT_ASM, EXIT_DATA, build_asm
from tracevisor.trace import open_trace

pytestmark = pytest.mark.kvm

# open("out.bin", O_CREAT|O_WRONLY|O_TRUNC, 0644), then 100 WRITEs of 4096 bytes, then exit(0)
WRITER = """
  lea openblk(%rip), %rax
  mov $0x440, %dx
  outl %eax, %dx
  mov openret(%rip), %ecx
  mov %ecx, writeblk(%rip)
  mov $100, %r12
1:
  movq $4096, writelen(%rip)
  lea writeblk(%rip), %rax
  mov $0x400, %dx
  outl %eax, %dx
  dec %r12
  jnz 1b
""" + EXIT_ASM
DATA = """
openblk: .quad name
  .long 0x241, 0644
openret: .long 0
writeblk: .long 0
  .quad buf
writelen: .quad 4096
name: .asciz "out.bin"
buf: .fill 4096, 1, 0x41
""" + EXIT_DATA.format(code=0)


def _tracevisor(*args, preexec_fn=None, cwd=None):
    env = dict(os.environ)
    env.pop("TRACEVISOR_KVM_DEVICE", None)
    return subprocess.run([sys.executable, "-m", "tracevisor", *args], capture_output=True, text=True,
                          timeout=120, env=env, preexec_fn=preexec_fn, cwd=cwd)


def test_a_partial_write_returns_what_was_written_and_is_reported(tmp_path):
    k = build_asm(tmp_path, "writer", WRITER, DATA)
    box = tmp_path / "box"
    box.mkdir()

    def limit() -> None:  # the host refuses to grow a file past 6000 bytes (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))

    r = _tracevisor("run", "--mount", str(box), str(k), preexec_fn=limit)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (box / "out.bin").stat().st_size == 6000
    lines = r.stderr.splitlines()
    first = [ln for ln in lines if "WRITE of guest fd 3" in ln]
    assert len(first) == 1, r.stderr  # once per fd
    assert "after 1904 of 4096 bytes" in first[0] and "the guest got 1904" in first[0], first
    # 100 × 4096 asked, 6000 written
    assert any("99 host operations on guest fd 3" in ln and "403600 bytes not written" in ln for ln in lines), \
        r.stderr


def test_disk_full_is_reported_and_counted_in_the_trace(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    k = build_asm(tmp_path, "writer", WRITER, DATA)
    box = tmp_path / "box"
    box.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tvfull", str(box)]).returncode:
        pytest.skip("cannot mount a tmpfs")
    try:
        out = tmp_path / "full.tvt"
        r = _tracevisor("record", "-q", "-o", str(out), "--mount", str(box), str(k))
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.count("WRITE of guest fd 3") == 1 and "No space left on device" in r.stderr, r.stderr
        writes = [e for e in open_trace(out).events(kinds=["hostio"]) if e["op"] == "write"]
        failed = [e for e in writes if e.get("error")]
        assert len(writes) == 100 and failed and all(e["error"] == "ENOSPC" for e in failed)
        assert all(e["ret"] == -1 for e in failed)
        lost = sum(e["args"][1] for e in failed)
        assert f"{len(failed)} host operations on guest fd 3" in r.stderr and f"{lost} bytes not written" in r.stderr
        r = _tracevisor("dump", str(out), "--kind", "hostio")
        assert "= -1 ENOSPC" in r.stdout
    finally:
        subprocess.run(["umount", str(box)])
