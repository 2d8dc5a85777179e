"""Build the project's guest SDK and example guests (stdlib only).

The guests are freestanding C + assembly linked into static ELF64 images that
a uhyve-0.2.1-compatible hypervisor boots directly in long mode.  This module
is the reference build: every compiler flag lives here, in :data:`CFLAGS` and
:data:`VARIANTS`.

It is deliberately stdlib-only so that ``setup.py`` can load it by path and
prebuild the examples into the wheel before the package is importable.

Why the objdump scan: on the development hosts /dev/kvm is nested KVM, where
any x87/SSE instruction in a guest ends in a KVM internal error.  Guests are
compiled with ``-mgeneral-regs-only`` and every linked image is disassembled;
a single instruction that touches an x87/MMX/SSE/AVX register (or ``int3``)
fails the build.

Usage::

    python -m tracevisor.guestbuild [--out DIR] [--cc gcc] [NAME ...]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

try:  # normal import as part of the package
    from .errors import TracevisorError
except ImportError:  # loaded by path (setup.py) before the package is importable
    try:
        from tracevisor.errors import TracevisorError
    except ImportError:  # pragma: no cover - only when tracevisor is not on sys.path at all

        class TracevisorError(Exception):  # type: ignore[no-redef]
            """Stand-in used when this file is loaded outside the package."""


__all__ = [
    "EXAMPLES",
    "CFLAGS",
    "VARIANTS",
    "GuestBuildError",
    "source_dir",
    "cache_root",
    "build",
    "build_c",
    "build_program",
    "example",
    "check_no_fpu",
    "scan_fpu",
    "hermit_entry_version",
    "compute_checksum",
]

# Bump when the build procedure changes in a way the source hash cannot see.
BUILD_FORMAT = 1

# -- flags: the one place -------------------------------------------------------

#: Flags shared by every guest compile and link.
CFLAGS: tuple[str, ...] = (
    "-ffreestanding",
    "-nostdlib",
    "-O2",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-fno-asynchronous-unwind-tables",
    "-fno-unwind-tables",
    # keep gcc from turning the SDK's own copy/fill/strlen loops into calls to themselves
    "-fno-tree-loop-distribute-patterns",
    "-Wall",
    "-Werror",
)

#: Linker flags shared by every guest.
LDFLAGS: tuple[str, ...] = (
    "-Wl,--build-id=none",
    "-Wl,-z,max-page-size=4096",
    "-Wl,-z,noexecstack",
    "-Wl,-z,norelro",
)


@dataclass(frozen=True)
class Variant:
    """How one kind of guest image is compiled and linked."""

    name: str
    cflags: tuple[str, ...]  # added to CFLAGS for compiling
    ldflags: tuple[str, ...]  # added to LDFLAGS for linking
    ldscript: str  # file name under guests/sdk/
    sdk: bool  # link the SDK runtime (start.S, hypercalls, printf, ...)
    note: bool  # link the Hermit entry-version note


VARIANTS: dict[str, Variant] = {
    # position-dependent ET_EXEC at 0x400000, Hermit entry version 2
    "exec": Variant("exec", ("-fno-pic", "-no-pie", "-static"), ("-no-pie", "-static"), "guest.ld", True, True),
    # static PIE (ET_DYN linked at 0, R_X86_64_RELATIVE only), Hermit entry version 2
    "pie": Variant("pie", ("-fpie",), ("-static-pie",), "guest-pie.ld", True, True),
    # plain static ET_EXEC without the Hermit note and without the SDK runtime
    "plain": Variant("plain", ("-fno-pic", "-no-pie", "-static"), ("-no-pie", "-static"), "guest-plain.ld", False, False),
}

#: SDK sources (relative to guests/sdk/) linked into "sdk" variants.
SDK_SOURCES: tuple[str, ...] = ("start.S", "hypercall.c", "runtime.c", "printf.c", "string.c", "bootinfo.c")
NOTE_SOURCE = "note.S"

#: Example guests: name -> (source under guests/examples/, variant).
_EXAMPLE_TABLE: dict[str, tuple[str, str]] = {
    "hello": ("hello.c", "exec"),
    "args": ("args.c", "exec"),
    "files": ("files.c", "exec"),
    "compute": ("compute.c", "exec"),
    "exitcode": ("exitcode.c", "exec"),
    "smp": ("smp.c", "exec"),
    "hello-pie": ("hello-pie.c", "pie"),
    "plain": ("plain.c", "plain"),
    "netecho": ("netecho.c", "exec"),
}
EXAMPLES: tuple[str, ...] = tuple(_EXAMPLE_TABLE)
#: Optional SDK parts (under guests/sdk/) an example links besides SDK_SOURCES.
_EXAMPLE_SDK_EXTRAS: dict[str, tuple[str, ...]] = {"netecho": ("virtio_net.c",)}


class GuestBuildError(TracevisorError):
    """A guest could not be built.

    ``str(err)`` is the one-line :attr:`summary`, followed by the compiler's or
    objdump's output (:attr:`detail`) on indented lines when there is any.
    """

    def __init__(self, summary: str, detail: str = "") -> None:
        self.summary = summary
        self.detail = detail.rstrip()
        text = summary
        if self.detail:
            text += "\n" + "\n".join("  " + line for line in self.detail.splitlines())
        super().__init__(text)


# -- locations ----------------------------------------------------------------------


def source_dir() -> Path:
    """The ``guests/`` tree: the source checkout's, else the copy packaged as ``tracevisor/_guest_src``."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "guests"
    if (checkout / "sdk" / "tvguest.h").is_file():
        return checkout
    packaged = here / "_guest_src"
    if (packaged / "sdk" / "tvguest.h").is_file():
        return packaged
    raise GuestBuildError(f"guest sources not found (looked in {checkout} and {packaged})")


def prebuilt_dir() -> Path:
    """Where an installed package keeps its prebuilt example guests."""
    return Path(__file__).resolve().parent / "_guests"


def cache_root() -> Path:
    """Root of the build cache: $TRACEVISOR_CACHE_DIR, else $XDG_CACHE_HOME/tracevisor, else ~/.cache/tracevisor."""
    env = os.environ.get("TRACEVISOR_CACHE_DIR")
    if env:
        return Path(env) / "guests"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "tracevisor" / "guests"


def _writable_cache_root() -> Path:
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"tracevisor-{os.getuid()}" / "guests"
    try:
        fallback.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GuestBuildError(f"no writable cache directory for guest builds ({root}, {fallback}): {exc}") from None
    return fallback


# -- tools ----------------------------------------------------------------------------


def _find_tool(name: str, what: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise GuestBuildError(f"{what} '{name}' not found on PATH; it is needed to build the guests")
    return path


def _run(cmd: Sequence[str], what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, errors="replace")
    except OSError as exc:
        raise GuestBuildError(f"{what}: cannot run {cmd[0]}: {exc}") from None
    if proc.returncode != 0:
        detail = (proc.stderr + proc.stdout).strip() or f"exit status {proc.returncode}"
        raise GuestBuildError(f"{what} failed", "$ " + " ".join(cmd) + "\n" + detail)
    return proc.stdout


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, errors="replace").stdout
    except OSError:
        return cc
    return out.splitlines()[0] if out else cc


# -- the x87/SSE scan ---------------------------------------------------------------

# Operands naming an x87, MMX, SSE, AVX or AVX-512 register (AT&T syntax).
_FPU_OPERAND = re.compile(r"%(?:[xyz]mm\d+|mm[0-7]\b|st\b|st\(\d\)|k[0-7]\b)")
# Mnemonics that use FPU/vector state without naming a register.
_FPU_MNEMONIC = re.compile(
    r"^(?:f\w+"  # every x87 instruction (fld, fstp, fninit, fxsave, ...)
    r"|v?ldmxcsr|v?stmxcsr|emms|xsave\w*|xrstor\w*"
    r"|int3)$"  # not FPU, but unusable on the same hosts
)
_PREFIXES = {"rep", "repe", "repz", "repne", "repnz", "lock", "data16", "addr32", "notrack", "bnd", "rex", "rex.w",
             "cs", "ds", "es", "ss", "fs", "gs"}
_INSN_LINE = re.compile(r"^\s*([0-9a-f]+):\s*(.*)$")
_FUNC_LINE = re.compile(r"^[0-9a-f]+ <(.+)>:$")


def scan_fpu(path: Path | str, objdump: str = "objdump") -> list[str]:
    """Disassemble ``path`` and return every instruction that uses x87/SSE/AVX state (or ``int3``)."""
    path = Path(path)
    tool = _find_tool(os.environ.get("OBJDUMP", objdump), "disassembler")
    listing = _run([tool, "-d", "-w", "--no-show-raw-insn", "-M", "att", str(path)], f"objdump of {path.name}")
    found: list[str] = []
    func = "?"
    for line in listing.splitlines():
        m = _FUNC_LINE.match(line)
        if m:
            func = m.group(1)
            continue
        m = _INSN_LINE.match(line)
        if not m:
            continue
        text = m.group(2).split("#", 1)[0].strip()
        words = text.split()
        while words and words[0] in _PREFIXES:
            words.pop(0)
        if not words:
            continue
        mnemonic = words[0]
        if _FPU_MNEMONIC.match(mnemonic) or _FPU_OPERAND.search(text):
            found.append(f"{m.group(1)} <{func}>: {text}")
    return found


def check_no_fpu(path: Path | str, objdump: str = "objdump", name: str | None = None) -> None:
    """Raise :class:`GuestBuildError` if the image contains an x87/SSE/AVX instruction (or ``int3``)."""
    path = Path(path)
    bad = scan_fpu(path, objdump)
    if bad:
        shown = bad[:20] + ([f"... and {len(bad) - 20} more"] if len(bad) > 20 else [])
        raise GuestBuildError(
            f"{name or path.name}: {len(bad)} x87/SSE instruction(s) found; guests must be integer-only "
            "(nested KVM cannot run them)",
            "\n".join(shown),
        )


# -- ELF checks (stdlib; the tests use pyelftools) -----------------------------------


def hermit_entry_version(path: Path) -> int | None:
    """The entry version in the first PT_NOTE's HERMIT/0x5A00 note, or None if there is none.

    Mirrors the loader rule of uhyve 0.2.1: only the first PT_NOTE segment counts.
    """
    data = Path(path).read_bytes()
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestBuildError(f"{path}: not a little-endian ELF64 file")
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _va, _pa, p_filesz, _memsz, p_align = struct.unpack_from(
            "<IIQQQQQQ", data, phoff + i * phentsize
        )
        if p_type != 4:  # PT_NOTE
            continue
        align = max(p_align, 4)
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12 : pos + 12 + namesz]
            desc_at = pos + 12 + _align_up(namesz, align)
            if name == b"HERMIT\0" and ntype == 0x5A00 and descsz >= 1 and desc_at < end:
                return data[desc_at]
            pos = desc_at + _align_up(descsz, align)
        return None
    return None


def _align_up(v: int, a: int) -> int:
    return (v + a - 1) // a * a


# -- building ---------------------------------------------------------------------------


def _variant(name: str) -> Variant:
    try:
        return VARIANTS[name]
    except KeyError:
        raise GuestBuildError(f"unknown guest variant '{name}' (known: {', '.join(VARIANTS)})") from None


def _compile_cmd(cc: str, src: Path, obj: Path, variant: Variant, include: Path, extra: Sequence[str]) -> list[str]:
    return [cc, *CFLAGS, *variant.cflags, *extra, "-I", str(include), "-c", str(src), "-o", str(obj)]


def _link_cmd(cc: str, objs: Sequence[Path], out: Path, variant: Variant, sdk: Path, extra: Sequence[str]) -> list[str]:
    return [cc, *CFLAGS, *variant.ldflags, *LDFLAGS, *extra, "-T", str(sdk / variant.ldscript),
            "-o", str(out), *map(str, objs)]


def _sdk_sources(variant: Variant, sdk: Path) -> list[Path]:
    srcs = [sdk / s for s in SDK_SOURCES] if variant.sdk else []
    if variant.note:
        srcs.append(sdk / NOTE_SOURCE)
    return srcs


def _compile_all(jobs: list[tuple[Path, Path, Variant]], cc: str, include: Path, extra: Sequence[str]) -> None:
    """Compile (src, obj, variant) jobs in parallel; raise the first failure in job order."""

    def one(job: tuple[Path, Path, Variant]) -> GuestBuildError | None:
        src, obj, variant = job
        try:
            _run(_compile_cmd(cc, src, obj, variant, include, extra), f"compiling {src.name} ({variant.name})")
        except GuestBuildError as exc:
            return exc
        return None

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        errors = list(pool.map(one, jobs))
    for err in errors:
        if err is not None:
            raise err


def _link_and_check(objs: Sequence[Path], out: Path, variant: Variant, cc: str, sdk: Path,
                    extra: Sequence[str], check: bool) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        _run(_link_cmd(cc, objs, tmp, variant, sdk, extra), f"linking {out.name} ({variant.name})")
        if check:
            check_no_fpu(tmp, name=out.name)
            version = hermit_entry_version(tmp)
            want = 2 if variant.note else None
            if version != want:
                raise GuestBuildError(f"{out.name}: Hermit entry version is {version}, expected {want}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def build_c(sources: Iterable[Path | str], out: Path | str, *, variant: str = "exec", cc: str = "gcc",
            extra_cflags: Sequence[str] = (), check: bool = True) -> Path:
    """Compile C/assembly ``sources`` into the guest image ``out``.

    ``variant`` picks flags and linker script (see :data:`VARIANTS`); "exec" and "pie" link the SDK
    runtime and the Hermit note, so ``sources`` only needs to define ``main`` (and maybe ``ap_main``).
    With ``check`` (the default) the image is scanned for x87/SSE instructions and its Hermit note is
    verified.  Returns ``out``; raises :class:`GuestBuildError`.
    """
    var = _variant(variant)
    cc_path = _find_tool(cc, "C compiler")
    src_root = source_dir()
    sdk = src_root / "sdk"
    out = Path(out)
    srcs = [Path(s) for s in sources] + _sdk_sources(var, sdk)
    for s in srcs:
        if not s.is_file():
            raise GuestBuildError(f"guest source not found: {s}")
    with tempfile.TemporaryDirectory(prefix="tvguest-") as tmpdir:
        objs = [Path(tmpdir) / f"{i:02d}-{s.name}.o" for i, s in enumerate(srcs)]
        _compile_all([(s, o, var) for s, o in zip(srcs, objs)], cc_path, sdk, extra_cflags)
        return _link_and_check(objs, out, var, cc_path, sdk, extra_cflags, check)


def _source_hash(cc: str, extra: Sequence[str], files: Iterable[Path], root: Path) -> str:
    h = hashlib.sha256()
    h.update(f"format={BUILD_FORMAT}\0cc={cc}\0{_compiler_id(cc)}\0".encode())
    h.update("\0".join([*CFLAGS, *LDFLAGS, *extra]).encode())
    for v in VARIANTS.values():
        h.update(repr(v).encode())
    h.update(Path(__file__).read_bytes())
    for f in sorted(set(files)):
        rel = f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)
        h.update(b"\0" + rel.encode() + b"\0")
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _tree_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for sub in ("sdk", "examples"):
        d = root / sub
        if d.is_dir():
            files += [p for p in d.rglob("*") if p.is_file()]
    return files


def build(names: Iterable[str] | None = None, outdir: Path | str | None = None, cc: str = "gcc",
          extra_cflags: Sequence[str] = ()) -> dict[str, Path]:
    """Build example guests; returns ``{name: path}``.

    ``names`` defaults to all :data:`EXAMPLES`.  Without ``outdir`` the images go to a cache directory
    keyed by a hash of the sources, flags and compiler, and images already there are reused.
    Raises :class:`GuestBuildError` (a :class:`TracevisorError`) on any failure.
    """
    wanted = list(EXAMPLES if names is None else names)
    unknown = [n for n in wanted if n not in _EXAMPLE_TABLE]
    if unknown:
        raise GuestBuildError(f"unknown example guest(s): {', '.join(unknown)} (known: {', '.join(EXAMPLES)})")
    cc_path = _find_tool(cc, "C compiler")
    root = source_dir()
    sdk = root / "sdk"
    extra = tuple(extra_cflags)

    if outdir is None:
        target = _writable_cache_root() / _source_hash(cc_path, extra, _tree_files(root), root)
        cached = True
    else:
        target = Path(outdir)
        cached = False
    target.mkdir(parents=True, exist_ok=True)
    result = {n: target / n for n in wanted}
    todo = [n for n in dict.fromkeys(wanted) if not (cached and result[n].is_file())]
    if not todo:
        return result

    with tempfile.TemporaryDirectory(prefix="tvguest-") as tmpdir:
        tmp = Path(tmpdir)
        jobs: list[tuple[Path, Path, Variant]] = []
        link: dict[str, tuple[list[Path], Variant]] = {}
        sdk_objs: dict[tuple[str, Path], Path] = {}
        for name in todo:
            src_name, vname = _EXAMPLE_TABLE[name]
            var = VARIANTS[vname]
            objs = []
            for src in _sdk_sources(var, sdk) + [sdk / x for x in _EXAMPLE_SDK_EXTRAS.get(name, ())]:
                key = (vname, src)
                if key not in sdk_objs:
                    sdk_objs[key] = tmp / f"sdk-{vname}-{src.name}.o"
                    jobs.append((src, sdk_objs[key], var))
                objs.append(sdk_objs[key])
            obj = tmp / f"ex-{name}.o"
            jobs.append((root / "examples" / src_name, obj, var))
            link[name] = ([obj, *objs], var)
        for src, _obj, _var in jobs:
            if not src.is_file():
                raise GuestBuildError(f"guest source not found: {src}")
        _compile_all(jobs, cc_path, sdk, extra)

        def one(name: str) -> GuestBuildError | None:
            objs, var = link[name]
            try:
                _link_and_check(objs, result[name], var, cc_path, sdk, extra, True)
            except GuestBuildError as exc:
                return exc
            return None

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            errors = list(pool.map(one, todo))
    for err in errors:
        if err is not None:
            raise err
    return result


def build_program(c_file: Path | str, outdir: Path | str | None = None, *, variant: str = "exec",
                  cc: str = "gcc", extra_cflags: Sequence[str] = (), check: bool = True) -> Path:
    """Build a one-file guest against the SDK (e.g. a test guest under ``guests/hostile/``).

    The image is ``outdir/<stem of c_file>``; without ``outdir`` it goes to the build cache (keyed by
    the file, the SDK and the flags) and is reused while up to date.
    """
    c_file = Path(c_file)
    if not c_file.is_file():
        raise GuestBuildError(f"guest source not found: {c_file}")
    if outdir is None:
        cc_path = _find_tool(cc, "C compiler")
        root = source_dir()
        key = _source_hash(cc_path, (*extra_cflags, f"variant={variant}", f"check={check}"),
                           [*_tree_files(root), c_file.resolve()], root)
        out = _writable_cache_root() / "programs" / key / c_file.stem
        if out.is_file():
            return out
    else:
        out = Path(outdir) / c_file.stem
    return build_c([c_file], out, variant=variant, cc=cc, extra_cflags=extra_cflags, check=check)


def example(name: str) -> Path:
    """Path of the example guest ``name``: the packaged prebuilt image, else built (once) into the cache."""
    if name not in _EXAMPLE_TABLE:
        raise GuestBuildError(f"unknown example guest '{name}' (known: {', '.join(EXAMPLES)})")
    packaged = prebuilt_dir() / name
    if packaged.is_file():
        return packaged
    return build([name])[name]


# -- reference models for the examples' output ---------------------------------------


def compute_checksum(n: int) -> int:
    """The checksum the ``compute`` example prints for N = ``n`` (same arithmetic, mod 2**64)."""
    mask = (1 << 64) - 1
    x, total = 0x9E3779B97F4A7C15, 0
    for i in range(max(n, 0)):
        x ^= (x << 13) & mask
        x ^= x >> 7
        x ^= (x << 17) & mask
        total = ((total ^ x) * 0x100000001B3 + i) & mask
    return total


# -- command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracevisor.guestbuild",
                                     description="Build the tracevisor example guests and print their paths.")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"examples to build (default: all of {', '.join(EXAMPLES)})")
    parser.add_argument("--out", type=Path, help="output directory (default: the build cache)")
    parser.add_argument("--cc", default="gcc", help="C compiler (default: gcc)")
    args = parser.parse_args(argv)
    try:
        paths = build(args.names or None, args.out, cc=args.cc)
    except TracevisorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for path in paths.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
