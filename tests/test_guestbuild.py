"""The guest SDK and example guests build into images the hypervisor can load (no KVM needed).

Checks the ELF properties uhyve 0.2.1 relies on (class, machine, entry, the Hermit note in the
first PT_NOTE, BSS inside a PT_LOAD, RELATIVE-only relocations for the PIE), that no x87/SSE
instruction slips into a guest, that the objdump scanner really rejects one, and the SDK's printf
and string functions (compiled for the host and called through ctypes).
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection

from tracevisor import guestbuild
from tracevisor.errors import TracevisorError

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is needed to build guests")

HERMIT_EXAMPLES = [n for n in guestbuild.EXAMPLES if n != "plain"]
EXEC_EXAMPLES = [n for n in guestbuild.EXAMPLES if n != "hello-pie"]
R_X86_64_RELATIVE = 8
PIE_LOAD = 0x400000


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return guestbuild.build(outdir=tmp_path_factory.mktemp("guests"))


def _elf(path: Path):
    f = open(path, "rb")
    return f, ELFFile(f)


def _first_note_segment(elf: ELFFile):
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            return seg
    return None


# -- the example set ------------------------------------------------------------------


def test_examples_list() -> None:
    assert set(guestbuild.EXAMPLES) == {"hello", "args", "files", "compute", "exitcode", "smp", "hello-pie", "plain",
                                       "netecho"}


def test_build_all_examples(built: dict[str, Path]) -> None:
    assert list(built) == list(guestbuild.EXAMPLES)
    for name, path in built.items():
        assert path.is_file() and path.name == name
        assert path.read_bytes()[:4] == b"\x7fELF"


def test_source_dir_is_the_checkout() -> None:
    src = guestbuild.source_dir()
    assert (src / "sdk" / "tvguest.h").is_file()
    assert (src / "examples" / "hello.c").is_file()


# -- ELF properties ---------------------------------------------------------------------


@pytest.mark.parametrize("name", guestbuild.EXAMPLES)
def test_elf_header_and_entry(built: dict[str, Path], name: str) -> None:
    f, elf = _elf(built[name])
    with f:
        assert elf.elfclass == 64 and elf.little_endian
        assert elf["e_machine"] == "EM_X86_64"
        assert elf["e_type"] == ("ET_DYN" if name == "hello-pie" else "ET_EXEC")
        entry = elf["e_entry"]
        assert entry == elf.get_section_by_name(".symtab").get_symbol_by_name("_start")[0]["st_value"]
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        # the entry point lies in an executable PT_LOAD
        assert any(s["p_vaddr"] <= entry < s["p_vaddr"] + s["p_filesz"] and s["p_flags"] & P_FLAGS.PF_X
                   for s in loads)


@pytest.mark.parametrize("name", guestbuild.EXAMPLES)
def test_load_segments(built: dict[str, Path], name: str) -> None:
    f, elf = _elf(built[name])
    with f:
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert len(loads) == 2
        base = PIE_LOAD if name == "hello-pie" else 0
        first = loads[0]["p_vaddr"]
        assert first == (0 if name == "hello-pie" else 0x400000)  # load address 0x400000 either way
        prev_end = 0
        for seg in loads:
            assert seg["p_vaddr"] % 4096 == seg["p_offset"] % 4096
            assert seg["p_memsz"] >= seg["p_filesz"]
            assert seg["p_vaddr"] >= prev_end  # ascending, no overlap
            prev_end = seg["p_vaddr"] + seg["p_memsz"]
        # whole image inside the identity-mapped first GiB and well inside 16 MiB of RAM
        assert base + prev_end < 16 << 20
        # .bss lives at the end of the RW PT_LOAD, zero-filled by the loader
        data = loads[1]
        assert data["p_flags"] & P_FLAGS.PF_W and not data["p_flags"] & P_FLAGS.PF_X
        bss = elf.get_section_by_name(".bss")
        assert bss is not None and bss["sh_type"] == "SHT_NOBITS" and bss["sh_size"] > 0
        assert data["p_memsz"] > data["p_filesz"]
        assert data["p_vaddr"] + data["p_filesz"] <= bss["sh_addr"]
        assert bss["sh_addr"] + bss["sh_size"] <= data["p_vaddr"] + data["p_memsz"]
        assert not (loads[0]["p_flags"] & P_FLAGS.PF_W)


@pytest.mark.parametrize("name", HERMIT_EXAMPLES)
def test_first_pt_note_is_hermit_entry_version_2(built: dict[str, Path], name: str) -> None:
    f, elf = _elf(built[name])
    with f:
        seg = _first_note_segment(elf)
        assert seg is not None
        notes = list(seg.iter_notes())
        assert len(notes) == 1
        note = notes[0]
        assert note["n_name"] == "HERMIT" and note["n_namesz"] == 7
        assert note["n_type"] == 0x5A00 and note["n_descsz"] == 1
        desc = note["n_desc"]
        assert (desc[0] if isinstance(desc, (bytes, bytearray)) else ord(desc[0])) == 2
        # one standard 4-aligned record: 12-byte header + name padded to 8 + descriptor padded to 4
        assert seg["p_filesz"] == 24 and seg["p_align"] == 4
        sec = elf.get_section_by_name(".note.hermit.entry-version")
        assert sec is not None and sec["sh_offset"] == seg["p_offset"]
        raw = built[name].read_bytes()[seg["p_offset"]:seg["p_offset"] + 24]
        assert raw == (b"\x07\0\0\0" b"\x01\0\0\0" b"\x00\x5a\0\0" b"HERMIT\0\0" b"\x02\0\0\0")
        # the note is also covered by the first (text) PT_LOAD
        text = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD")
        assert text["p_offset"] <= seg["p_offset"] and seg["p_offset"] + 24 <= text["p_offset"] + text["p_filesz"]
    assert guestbuild.hermit_entry_version(built[name]) == 2


def test_plain_has_no_note(built: dict[str, Path]) -> None:
    f, elf = _elf(built["plain"])
    with f:
        assert _first_note_segment(elf) is None
        assert elf.get_section_by_name(".note.hermit.entry-version") is None
        assert elf["e_type"] == "ET_EXEC"
    assert guestbuild.hermit_entry_version(built["plain"]) is None


def test_pie_relocations_are_relative_only(built: dict[str, Path]) -> None:
    path = built["hello-pie"]
    f, elf = _elf(path)
    with f:
        assert any(s["p_type"] == "PT_DYNAMIC" for s in elf.iter_segments())
        assert not any(s["p_type"] == "PT_INTERP" for s in elf.iter_segments())
        dyn = next(s for s in elf.iter_sections() if isinstance(s, DynamicSection))
        tags = {t.entry.d_tag: t.entry.d_val for t in dyn.iter_tags()}
        assert "DT_NEEDED" not in tags
        assert "DT_REL" not in tags and tags.get("DT_RELCOUNT", 0) == 0
        assert tags["DT_RELAENT"] == 24
        count = tags["DT_RELASZ"] // 24
        assert count >= 1
        # uhyve 0.2.1 walks DT_RELACOUNT entries, others DT_RELASZ bytes: both must agree
        assert tags["DT_RELACOUNT"] == count
        relocs = []
        for sec in elf.iter_sections():
            if isinstance(sec, RelocationSection):
                relocs += list(sec.iter_relocations())
        assert len(relocs) == count
        assert all(r["r_info_type"] == R_X86_64_RELATIVE for r in relocs)
        # the relocation of `msg` points at the message text
        msg = elf.get_section_by_name(".symtab").get_symbol_by_name("msg")[0]["st_value"]
        target = next(r["r_addend"] for r in relocs if r["r_offset"] == msg)
        rodata = elf.get_section_by_name(".rodata")
        off = target - rodata["sh_addr"]
        assert rodata.data()[off:off + 42] == b"Hello from a relocated tracevisor kernel!\0"
    out = subprocess.run(["readelf", "-r", "-d", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    types = re.findall(r"^\s*[0-9a-f]+\s+[0-9a-f]+\s+(R_X86_64_\w+)", out, re.M)
    assert types and set(types) == {"R_X86_64_RELATIVE"}
    assert "NEEDED" not in out


# -- no x87/SSE ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", guestbuild.EXAMPLES)
def test_no_fpu_instructions(built: dict[str, Path], name: str) -> None:
    assert guestbuild.scan_fpu(built[name]) == []
    listing = subprocess.run(["objdump", "-d", "-w", str(built[name])], capture_output=True, text=True,
                             check=True).stdout
    assert not re.search(r"%[xyz]mm\d|%st\b|%st\(|\bf(ld|st|xsave|xrstor|ninit)|mxcsr|\bint3\b", listing)


def _host_gcc(src: Path, out: Path, *flags: str) -> None:
    subprocess.run(["gcc", "-O2", "-ffreestanding", "-nostdlib", "-static", "-no-pie", "-fno-pic",
                    "-fcf-protection=none", "-fno-asynchronous-unwind-tables", "-Wl,--build-id=none",
                    "-Wl,-e,_start", *flags, str(src), "-o", str(out)], check=True, capture_output=True)


def test_scanner_rejects_sse_without_general_regs_only(tmp_path: Path) -> None:
    src = tmp_path / "sse.c"
    src.write_text(
        "void _start(void) {\n"
        "    __asm__ volatile(\"pxor %%xmm0, %%xmm0\" ::: \"xmm0\");\n"
        "    for (;;) __asm__ volatile(\"hlt\");\n"
        "}\n"
    )
    img = tmp_path / "sse"
    _host_gcc(src, img)  # deliberately WITHOUT -mgeneral-regs-only
    found = guestbuild.scan_fpu(img)
    assert found and "pxor" in found[0] and "%xmm0" in found[0]
    with pytest.raises(guestbuild.GuestBuildError) as err:
        guestbuild.check_no_fpu(img)
    assert isinstance(err.value, TracevisorError)
    assert "x87/SSE" in err.value.summary and "pxor" in err.value.detail


def test_scanner_rejects_compiler_float_code(tmp_path: Path) -> None:
    src = tmp_path / "flt.c"
    src.write_text(
        "volatile double d = 1.5; volatile long r;\n"
        "void _start(void) { r = (long)(d * 3.0); for (;;) __asm__ volatile(\"hlt\"); }\n"
    )
    img = tmp_path / "flt"
    _host_gcc(src, img)
    assert guestbuild.scan_fpu(img)


def test_build_program_rejects_inline_sse_and_x87(tmp_path: Path) -> None:
    for name, insn in (("sse", "movq %%rax, %%xmm1"), ("x87", "fldz; fstp %%st(0)"), ("mx", "stmxcsr (%%rsp)")):
        src = tmp_path / f"{name}.c"
        src.write_text(
            '#include "tvguest.h"\n'
            "int main(int argc, char **argv, char **envp)\n"
            "{ (void)argc; (void)argv; (void)envp;\n"
            f'  __asm__ volatile("{insn}" ::: "memory"); return 0; }}\n'
        )
        with pytest.raises(guestbuild.GuestBuildError, match="x87/SSE"):
            guestbuild.build_program(src, tmp_path / "out")
        assert not (tmp_path / "out" / name).exists()  # nothing half-built left behind


def test_build_program_without_check_keeps_image(tmp_path: Path) -> None:
    src = tmp_path / "trap.c"
    src.write_text('#include "tvguest.h"\nint main(int c, char **a, char **e)\n'
                   '{ (void)c; (void)a; (void)e; __asm__ volatile("int3"); return 0; }\n')
    with pytest.raises(guestbuild.GuestBuildError, match="int3"):
        guestbuild.build_program(src, tmp_path)
    out = guestbuild.build_program(src, tmp_path, check=False)
    assert out == tmp_path / "trap" and out.is_file()


# -- build helper behaviour ---------------------------------------------------------------


def test_build_program_against_sdk(tmp_path: Path) -> None:
    src = tmp_path / "prog.c"
    src.write_text('#include "tvguest.h"\n'
                   "void ap_main(unsigned cpu) { (void)cpu; }\n"
                   "int main(int argc, char **argv, char **envp)\n"
                   '{ (void)argv; (void)envp; printf("%d %lu\\n", argc, tv_num_cpus()); return 3; }\n')
    out = guestbuild.build_program(src, tmp_path / "o")
    assert out == tmp_path / "o" / "prog"
    assert guestbuild.hermit_entry_version(out) == 2
    pie = guestbuild.build_program(src, tmp_path / "p", variant="pie")
    with open(pie, "rb") as f:
        assert ELFFile(f)["e_type"] == "ET_DYN"


def test_build_program_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEVISOR_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "c.c"
    src.write_text('#include "tvguest.h"\nint main(int c, char **a, char **e) { (void)a; (void)e; return c; }\n')
    first = guestbuild.build_program(src)
    assert first.is_relative_to(tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    assert guestbuild.build_program(src) == first and first.stat().st_mtime_ns == mtime
    src.write_text(src.read_text() + "/* changed */\n")
    assert guestbuild.build_program(src) != first


def test_compile_error_is_reported(tmp_path: Path) -> None:
    src = tmp_path / "broken.c"
    src.write_text('#include "tvguest.h"\nint main(void) { return undefined_thing; }\n')
    with pytest.raises(guestbuild.GuestBuildError) as err:
        guestbuild.build_program(src, tmp_path)
    exc = err.value
    assert isinstance(exc, TracevisorError)
    assert "\n" not in exc.summary and "broken.c" in exc.summary
    assert "undefined_thing" in exc.detail
    assert str(exc).splitlines()[0] == exc.summary


def test_missing_compiler(tmp_path: Path) -> None:
    with pytest.raises(TracevisorError, match="not found"):
        guestbuild.build(["hello"], tmp_path, cc="no-such-compiler-tv")


def test_unknown_example() -> None:
    with pytest.raises(TracevisorError, match="unknown example"):
        guestbuild.build(["nope"])
    with pytest.raises(TracevisorError, match="unknown example"):
        guestbuild.example("nope")


def test_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEVISOR_CACHE_DIR", str(tmp_path / "cache"))
    first = guestbuild.build(["hello", "plain"])
    assert first["hello"].parent.parent == tmp_path / "cache" / "guests"
    mtimes = {n: p.stat().st_mtime_ns for n, p in first.items()}
    again = guestbuild.build(["plain", "hello"])
    assert again == {"plain": first["plain"], "hello": first["hello"]}
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == mtimes
    # other flags -> another cache directory
    other = guestbuild.build(["hello"], extra_cflags=["-DTV_TEST_FLAG=1"])
    assert other["hello"].parent != first["hello"].parent


def test_example_prefers_packaged_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRACEVISOR_CACHE_DIR", str(tmp_path / "cache"))
    packaged = guestbuild.prebuilt_dir() / "hello"
    path = guestbuild.example("hello")
    if packaged.is_file():
        assert path == packaged
    else:
        assert path.is_relative_to(tmp_path / "cache") and path.is_file()
        assert guestbuild.example("hello") == path


def test_builds_are_reproducible(built: dict[str, Path], tmp_path: Path) -> None:
    again = guestbuild.build(["hello", "hello-pie"], tmp_path)
    for name, path in again.items():
        assert path.read_bytes() == built[name].read_bytes()


def test_command_line(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(guestbuild.__file__).resolve().parents[1]))
    proc = subprocess.run([sys.executable, "-m", "tracevisor.guestbuild", "--out", str(tmp_path), "hello", "plain"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(tmp_path / "hello"), str(tmp_path / "plain")]
    bad = subprocess.run([sys.executable, "-m", "tracevisor.guestbuild", "--out", str(tmp_path), "nope"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and bad.stderr.startswith("error: unknown example")


# -- documentation and reference models -----------------------------------------------------


def test_readme_documents_every_example() -> None:
    readme = (guestbuild.source_dir() / "README.md").read_text()
    for name in guestbuild.EXAMPLES:
        assert f"### {name}\n" in readme
    for line in ("Hello from tracevisor!", "Hello from a relocated tracevisor kernel!", "plain ELF",
                 "smp: cpus=2 cpu1 result=50005000", "smp: needs 2 vCPUs", "files: OK"):
        assert line in readme


def test_compute_checksum_reference() -> None:
    readme = (guestbuild.source_dir() / "README.md").read_text()
    for n in (0, 1, 64, 130, 1000):
        line = f"compute: N={n} checksum={guestbuild.compute_checksum(n):016x}"
        assert line in readme
    assert guestbuild.compute_checksum(1000) == 0x4E483CFFA90BFC2E


def test_smp_expected_sum() -> None:
    src = (guestbuild.source_dir() / "examples" / "smp.c").read_text()
    limit = int(re.search(r"#define SMP_LIMIT (\d+)ULL", src).group(1))
    assert limit * (limit + 1) // 2 == 50005000


# -- the SDK's printf and string functions, compiled for the host ----------------------------

_STUB = r"""
#include "tvguest.h"
static char captured[8192];
static size_t captured_len;
static int last_fd = -1;
static int writes;
int64_t hc_write(int fd, const void *buf, uint64_t len)
{
    const char *p = buf;
    for (uint64_t i = 0; i < len && captured_len < sizeof(captured); i++)
        captured[captured_len++] = p[i];
    last_fd = fd;
    writes++;
    return (int64_t)len;
}
size_t stub_take(char *out, size_t cap, int *fd, int *nwrites)
{
    size_t n = captured_len < cap ? captured_len : cap;
    memcpy(out, captured, n);
    *fd = last_fd;
    *nwrites = writes;
    captured_len = 0;
    writes = 0;
    return n;
}
"""


@pytest.fixture(scope="module")
def sdk_host_lib(tmp_path_factory: pytest.TempPathFactory) -> ctypes.CDLL:
    tmp = tmp_path_factory.mktemp("sdkhost")
    (tmp / "stub.c").write_text(_STUB)
    sdk = guestbuild.source_dir() / "sdk"
    lib = tmp / "libtvsdk.so"
    subprocess.run(["gcc", *guestbuild.CFLAGS, "-fPIC", "-shared", "-Wl,-Bsymbolic", "-I", str(sdk),
                    str(sdk / "printf.c"), str(sdk / "string.c"), str(tmp / "stub.c"), "-o", str(lib)],
                   check=True, capture_output=True)
    return ctypes.CDLL(str(lib))


def _snprintf(lib: ctypes.CDLL, fmt: str, *args: object, size: int = 256) -> tuple[str, int]:
    buf = ctypes.create_string_buffer(size)
    n = lib.snprintf(buf, ctypes.c_size_t(size), fmt.encode(), *args)
    return buf.value.decode(), n


I, L, U, UL, LL = ctypes.c_int, ctypes.c_long, ctypes.c_uint, ctypes.c_ulong, ctypes.c_longlong

PRINTF_CASES = [
    ("%d", (I(0),), "0"),
    ("%d", (I(-42),), "-42"),
    ("%i|%5d|%-5d|%05d", (I(7), I(-12), I(3), I(-4)), "7|  -12|3    |-0004"),
    ("%u", (U(4294967295),), "4294967295"),
    ("%x %X %#x", (U(0xBEEF), U(0xBEEF), U(255)), "beef BEEF 0xff"),
    ("%08x|%-8x|%8X", (U(0xAB), U(0xAB), U(0xAB)), "000000ab|ab      |      AB"),
    ("%ld %lu", (L(-9223372036854775807 - 1), UL(18446744073709551615)), "-9223372036854775808 18446744073709551615"),
    ("%lld %llx", (LL(-1), ctypes.c_ulonglong(0x123456789ABCDEF0)), "-1 123456789abcdef0"),
    ("%zu %zd", (ctypes.c_size_t(123456789012), ctypes.c_ssize_t(-5)), "123456789012 -5"),
    ("%016lx", (UL(0x4E483CFFA90BFC2E),), "4e483cffa90bfc2e"),
    ("%p %p", (ctypes.c_void_p(0x400000), ctypes.c_void_p(None)), "0x400000 0x0"),
    ("%s|%10s|%-6s|%.3s", (b"abc", b"right", b"left", b"truncate"), "abc|     right|left  |tru"),
    ("%s", (None,), "(null)"),
    ("%c%c%3c", (I(ord("o")), I(ord("k")), I(ord("!"))), "ok  !"),
    ("100%% %d%%", (I(5),), "100% 5%"),
    ("%.5d|%+d|% d", (I(42), I(3), I(3)), "00042|+3| 3"),
    ("%hhd %hu", (I(300), I(70000)), "44 4464"),
    ("%*d|%-*d|", (I(4), I(1), I(3), I(2)), "   1|2  |"),
    ("%.*s", (I(2), b"xyz"), "xy"),
]


@pytest.mark.parametrize("fmt,args,expected", PRINTF_CASES)
def test_sdk_snprintf(sdk_host_lib: ctypes.CDLL, fmt: str, args: tuple, expected: str) -> None:
    text, n = _snprintf(sdk_host_lib, fmt, *args)
    assert text == expected
    assert n == len(expected)


def test_sdk_snprintf_truncates(sdk_host_lib: ctypes.CDLL) -> None:
    assert _snprintf(sdk_host_lib, "%s-%d", b"abcdef", I(12345), size=5) == ("abcd", 12)
    assert _snprintf(sdk_host_lib, "%d", I(7), size=1) == ("", 1)
    assert sdk_host_lib.snprintf(None, ctypes.c_size_t(0), b"%d", I(1234)) == 4


def _take(lib: ctypes.CDLL) -> tuple[bytes, int, int]:
    buf = ctypes.create_string_buffer(8192)
    fd, writes = ctypes.c_int(), ctypes.c_int()
    n = lib.stub_take(buf, ctypes.c_size_t(8192), ctypes.byref(fd), ctypes.byref(writes))
    return buf.raw[:n], fd.value, writes.value


def test_sdk_stdout_is_line_buffered(sdk_host_lib: ctypes.CDLL) -> None:
    lib = sdk_host_lib
    _take(lib)
    assert lib.printf(b"partial %d", I(1)) == 9
    assert _take(lib) == (b"", -1, 0)  # nothing written before the newline
    lib.printf(b" done\nnext")
    assert _take(lib) == (b"partial 1 done\n", 1, 1)  # one WRITE per line
    lib.fflush_stdout()
    assert _take(lib) == (b"next", 1, 1)
    lib.puts(b"line")
    assert _take(lib) == (b"line\n", 1, 1)
    lib.printf(b"%s\n", b"x" * 3000)  # longer than the 1 KiB buffer: flushed as it fills
    data, fd, writes = _take(lib)
    assert data == b"x" * 3000 + b"\n" and fd == 1 and writes == 3


def test_sdk_eprintf_goes_to_fd2(sdk_host_lib: ctypes.CDLL) -> None:
    _take(sdk_host_lib)
    sdk_host_lib.eprintf(b"smp: needs %d vCPUs\n", I(2))
    assert _take(sdk_host_lib) == (b"smp: needs 2 vCPUs\n", 2, 1)


def test_sdk_strings(sdk_host_lib: ctypes.CDLL) -> None:
    lib = sdk_host_lib
    lib.atoi.restype = ctypes.c_int
    lib.strtol.restype = ctypes.c_long
    lib.strtoul.restype = ctypes.c_ulong
    for text, value in ((b"42", 42), (b"  -17xyz", -17), (b"+8", 8), (b"", 0), (b"abc", 0),
                        (b"99999999999", 2147483647), (b"-99999999999", -2147483648)):
        assert lib.atoi(text) == value, text
    end = ctypes.c_char_p()
    assert lib.strtol(b"0x1F rest", ctypes.byref(end), I(0)) == 31 and end.value == b" rest"
    assert lib.strtol(b"0755", None, I(0)) == 0o755
    assert lib.strtol(b"-9223372036854775808", None, I(10)) == -(2**63)
    assert lib.strtol(b"99999999999999999999", None, I(10)) == 2**63 - 1
    assert lib.strtoul(b"ffffffffffffffff", None, I(16)) == 2**64 - 1
    lib.strlen.restype = ctypes.c_size_t
    assert lib.strlen(b"tracevisor") == 10
    assert lib.strcmp(b"abc", b"abd") < 0 < lib.strcmp(b"b", b"a") and lib.strcmp(b"x", b"x") == 0
    assert lib.strncmp(b"abcX", b"abcY", ctypes.c_size_t(3)) == 0
    buf = ctypes.create_string_buffer(b"0123456789", 16)
    lib.memmove(ctypes.byref(buf, 2), buf, ctypes.c_size_t(6))
    assert buf.value == b"0101234589"
    lib.memmove(buf, ctypes.byref(buf, 2), ctypes.c_size_t(6))
    assert buf.value == b"0123454589"
    lib.memset(buf, I(ord("z")), ctypes.c_size_t(3))
    assert buf.value.startswith(b"zzz3")
    assert lib.memcmp(b"ab\x00c", b"ab\x00d", ctypes.c_size_t(4)) < 0
