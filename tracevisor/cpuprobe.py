"""What a guest on this host really sees in CPUID.

tracevisor hands KVM a CPUID table (``arch_x86_64.guest_cpuid``: RDRAND and RDSEED cleared, …), but some
hosts do not honour it: on nested, paravirtualised KVM (kvm-pvm) the guest's CPUID instruction returns
the host's leaves 1 and 7 whatever the table says.  The table alone is therefore not the truth a trace
should carry.  This module boots a tiny probe guest (machine code built here, no compiler and no checkout
needed) in a throwaway VM with the table, lets it execute CPUID leaf 1 and leaf 7 subleaf 0 and report
the registers through port I/O, and caches the answer per host (CPU model, kernel release, tracevisor
version, the table's hash) in the cache directory.  ``record`` stores it as the header's ``guest_cpuid``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .status import StopInfo

PROBE_PORT = 0xE8  # unused by tracevisor's own devices (hypercalls 0x400+, UART 0x800, exact mode 0xE6/0xE7)
_BASE = 0x400000
_HDR = 64 + 56  # ELF header + one program header
_EXIT_BLOCK = _BASE + 0x100  # the EXIT hypercall's argument block (code 0)

# bits of CPUID that a CPU changes by itself (they follow CR4 or an MSR), left out of the "honoured" check
_DYNAMIC = {"leaf1_ecx": 1 << 27, "leaf1_edx": 1 << 9, "leaf7_ecx": 1 << 4}
REGISTERS = ("leaf1_ecx", "leaf1_edx", "leaf7_ebx", "leaf7_ecx", "leaf7_edx")


def _probe_code() -> bytes:
    """x86-64 code: CPUID(1) → OUT ecx, edx; CPUID(7, 0) → OUT ebx, ecx, edx; then the EXIT hypercall."""
    port = struct.pack("<I", PROBE_PORT)
    mov_edx_port = b"\xba" + port
    out = b"\xef"  # out dx, eax
    code = (
        b"\xb8\x01\x00\x00\x00"  # mov eax, 1
        b"\x31\xc9"  # xor ecx, ecx
        b"\x0f\xa2"  # cpuid
        b"\x89\xce\x89\xd7"  # mov esi, ecx; mov edi, edx
        + mov_edx_port + b"\x89\xf0" + out + b"\x89\xf8" + out  # ecx, edx
        + b"\xb8\x07\x00\x00\x00\x31\xc9\x0f\xa2"  # mov eax, 7; xor ecx, ecx; cpuid
        + b"\x89\xce\x89\xd7" + mov_edx_port
        + b"\x89\xd8" + out + b"\x89\xf0" + out + b"\x89\xf8" + out  # ebx, ecx, edx
        + b"\xb8" + struct.pack("<I", _EXIT_BLOCK)  # mov eax, exit block
        + b"\xba\x40\x05\x00\x00" + out  # mov edx, 0x540; out dx, eax  (EXIT)
        + b"\xf4\xeb\xfd"  # hlt; jmp hlt
    )
    return code


def probe_elf() -> bytes:
    """The probe guest as a static x86-64 ELF: one RWX segment at 0x400000, the exit block at +0x100."""
    code = _probe_code()
    body = code.ljust(0x100 - _HDR, b"\x90") + struct.pack("<I", 0)
    size = _HDR + len(body)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"\0" * 7,
                       2, 62, 1, _BASE + _HDR, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 7, 0, _BASE, _BASE, size, size, 0x1000)
    return ehdr + phdr + body


def table_hash(rows: list[list[int]]) -> str:
    """A short hash of a CPUID table (as ``arch_x86_64.cpuid_rows`` gives it)."""
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()[:16]


def host_cpu_model() -> str:
    """The host CPU's model string from /proc/cpuinfo ("unknown" when absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def cache_key(rows: list[list[int]]) -> str:
    """The cache key: host CPU model, kernel release, tracevisor version, the table's hash."""
    parts = [host_cpu_model(), platform.release(), __version__, table_hash(rows)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def cache_dir() -> Path:
    """$TRACEVISOR_CACHE_DIR, else $XDG_CACHE_HOME/tracevisor, else ~/.cache/tracevisor."""
    env = os.environ.get("TRACEVISOR_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tracevisor"


def summarize(regs: dict[str, int], rows: list[list[int]]) -> dict:
    """The header's ``guest_cpuid`` map from the registers the guest saw and the table it was given."""
    l1c, l7b = regs["leaf1_ecx"], regs["leaf7_ebx"]
    out: dict = dict(regs)
    out.update(rdrand=bool(l1c >> 30 & 1), rdseed=bool(l7b >> 18 & 1), xsave=bool(l1c >> 26 & 1),
               avx=bool(l1c >> 28 & 1), avx2=bool(l7b >> 5 & 1), avx512f=bool(l7b >> 16 & 1))
    table = regs_from_table(rows)
    out["honoured"] = table is not None and all(
        (regs[k] & ~_DYNAMIC.get(k, 0)) == (v & ~_DYNAMIC.get(k, 0)) for k, v in table.items())
    return out


def regs_from_table(rows: list[list[int]]) -> dict[str, int] | None:
    """The five registers a CPUID table promises for leaf 1 and leaf 7 subleaf 0 (None if it lacks one)."""
    by = {(r[0], r[1] if r[0] == 7 else 0): r for r in rows}
    l1, l7 = by.get((1, 0)), by.get((7, 0))
    if l1 is None or l7 is None:
        return None
    return {"leaf1_ecx": l1[5], "leaf1_edx": l1[6], "leaf7_ebx": l7[4], "leaf7_ecx": l7[5], "leaf7_edx": l7[6]}


#: How the probe VM is booted: ``boot(kernel_path, cpuid_rows, make_device) -> StopInfo`` runs the kernel in a
#: throwaway VM with ``make_device(ctx)`` attached (tracevisor.session.boot_probe assembles it; passed in so
#: that this module does not import the session module that records its answer).
ProbeBoot = Callable[[str, list, Callable], "StopInfo"]


def run_probe(rows: list[list[int]], boot: ProbeBoot) -> dict[str, int]:
    """Boot the probe guest once with the CPUID table ``rows`` and return the five registers it reported."""
    from .devices.base import Device
    from .errors import TracevisorError

    seen: list[int] = []

    class Probe(Device):
        name = "cpuid-probe"

        def __init__(self, ctx) -> None:
            ctx.register_ports((PROBE_PORT,), out_handler=lambda v, port, size, value: seen.append(value))

    with tempfile.TemporaryDirectory(prefix="tracevisor-probe-") as d:
        path = Path(d) / "cpuid-probe"
        path.write_bytes(probe_elf())
        info = boot(str(path), rows, lambda ctx: Probe(ctx))
    if len(seen) != 5 or info.code != 0:
        raise TracevisorError(f"the CPUID probe guest did not report its registers (stopped: {info.reason}, "
                              f"{len(seen)} of 5 values)")
    return dict(zip(REGISTERS, (v & 0xFFFF_FFFF for v in seen), strict=True))


def guest_cpuid(rows: list[list[int]], boot: ProbeBoot, *, refresh: bool = False) -> dict:
    """What a guest given the CPUID table ``rows`` sees on this host: the probe's answer, cached per host."""
    path = cache_dir() / f"cpuid-{cache_key(rows)}.json"
    if not refresh:
        try:
            regs = json.loads(path.read_text())
            if sorted(regs) == sorted(REGISTERS) and all(isinstance(v, int) for v in regs.values()):
                return summarize(regs, rows)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    regs = run_probe(rows, boot)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(regs))
        os.replace(tmp, path)
    except OSError:
        pass  # no writable cache: probe again next time
    return summarize(regs, rows)


def describe(g: dict) -> str:
    """One line for `tracevisor info`."""
    bits = " ".join(f"{n.upper()}={int(bool(g.get(n)))}" for n in ("rdrand", "rdseed", "xsave", "avx", "avx2",
                                                                    "avx512f"))
    note = "CPUID table honoured by this host" if g.get("honoured") else "CPUID masks not honoured by this host"
    return f"guest sees {bits} ({note})"
