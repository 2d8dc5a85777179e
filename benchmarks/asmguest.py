"""The benchmarks' tiny guests: a loop body in AT&T assembly, linked as a plain static ELF at 0x400000 that
ends with the EXIT hypercall (status 0).  Each benchmark script runs from this folder, so
``from asmguest import build_asm`` finds this module."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: Appended to every body: EXIT (port 0x540) with the argument block ``exitblk`` (status 0).
EXIT_TAIL = """
  lea exitblk(%rip), %rax
  mov $0x540, %dx
  outl %eax, %dx
.data
exitblk: .long 0
"""


def build_asm(tmp: Path, name: str, body: str, data: str = "") -> str:
    """Assemble ``body`` (the code after ``_start:``), :data:`EXIT_TAIL` and ``data`` (more of the .data
    section) into ``tmp/name``; its path."""
    src = tmp / f"{name}.S"
    src.write_text(".globl _start\n.text\n_start:\n" + body + EXIT_TAIL + data + "\n")
    out = tmp / name
    subprocess.run(["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,-Ttext=0x400000", "-Wl,--build-id=none",
                    "-o", str(out), str(src)], check=True, capture_output=True)
    return str(out)
