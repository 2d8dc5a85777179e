"""The one definition of the tracevisor trace format (``.tvt``).

Everything a writer or reader needs to agree on lives here: the magic, the format version, the frame
layout, the exit-row layout, the exit reason names, and the fields of the header, the footer and every
rich event kind.  ``docs/trace-format.md`` contains tables generated from this module
(``python -m tracevisor.trace.gendoc`` prints or updates them) and a test checks that they match, so the prose
specification and the code cannot drift apart.

Why a fixed binary row for exits and msgpack maps for everything else: exits are by far the most frequent
record (one per KVM exit) and must be cheap to write and loadable as columns with one ``numpy.frombuffer``;
everything else is rare, varied and benefits from self-describing, extensible maps.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..hypercalls import TABLE as _HYPERCALLS
from ..hypercalls import UART_PORT as _UART_PORT
from ..kvm import uapi as U
from ..kvm.uapi import EXIT_REASON_NAMES, exit_reason_name

# --------------------------------------------------------------------------------------------------
# File layout
# --------------------------------------------------------------------------------------------------

#: First 8 bytes of every trace file (PNG-style: a non-ASCII byte, the name, CR LF, ^Z, LF).
MAGIC = b"\x89TVT\r\n\x1a\n"

#: Format version written by this tracevisor: (major, minor).  2.0 appends the register digest to every
#: exit row (31 bytes instead of 27) and adds the ``mem`` event kind and the footer's ``final`` state.
FORMAT_VERSION = (2, 0)
#: The newest major version this tracevisor reads (any minor of it).
READS_MAJOR = 2
#: Every major version this tracevisor reads: 1.x traces (27-byte rows, no digests) stay readable.
READS_MAJORS = (1, 2)

#: Frame header: type (u8), flags (u8), reserved (u16, 0), payload length (u32), CRC32 of the payload (u32).
FRAME_HEADER = struct.Struct("<BBHII")
FRAME_HEADER_SIZE = FRAME_HEADER.size  # 12

FRAME_HEADER_TYPE = ord("H")  # header: exactly one, the first frame
FRAME_CHUNK_TYPE = ord("C")  # chunk of events
FRAME_FOOTER_TYPE = ord("F")  # footer: last frame, optional (absent when the recorder was killed)

#: Frame flag bit 0: the payload is a zstd frame (with its content size) holding the msgpack payload.
FLAG_ZSTD = 0x01
#: Flag bits a 1.x reader understands; a frame with any other bit set cannot be decoded (skip it).
KNOWN_FLAGS = FLAG_ZSTD

#: Trailer after the footer frame: u64 LE offset of the footer frame, then TRAILER_MAGIC.
TRAILER = struct.Struct("<Q8s")
TRAILER_SIZE = TRAILER.size  # 16
TRAILER_MAGIC = b"TVTFOOT\n"

#: Upper bound of a frame payload, stored or decompressed (the length field is a u32).
MAX_PAYLOAD = 0xFFFF_FFFF

# --------------------------------------------------------------------------------------------------
# Exit rows
# --------------------------------------------------------------------------------------------------

#: One exit = one 31-byte little-endian row, no padding (format 2.x).  The last field, ``digest``, is the
#: register digest: zlib's CRC-32 of the 144-byte ``struct kvm_regs`` (rax … r15, rip, rflags) that
#: KVM_CAP_SYNC_REGS put in the ``kvm_run`` page at this exit, before tracevisor handled the exit.
EXIT_ROW = struct.Struct("<QQIHHBBBI")
EXIT_ROW_SIZE = EXIT_ROW.size  # 31
#: The exit row of format 1.x traces: the same fields without ``digest``.
EXIT_ROW_V1 = struct.Struct("<QQIHHBBB")
EXIT_ROW_SIZE_V1 = EXIT_ROW_V1.size  # 27
#: Field names of an exit row, in row order.
EXIT_FIELDS = ("t_ns", "rip", "value", "port", "vcpu", "reason", "dir", "size", "digest")
#: ``numpy.dtype(EXIT_DTYPE_FIELDS)`` describes one row; use it with ``numpy.frombuffer(chunk.exits, ...)``.
EXIT_DTYPE_FIELDS = [
    ("t_ns", "<u8"),
    ("rip", "<u8"),
    ("value", "<u4"),
    ("port", "<u2"),
    ("vcpu", "<u2"),
    ("reason", "u1"),
    ("dir", "u1"),
    ("size", "u1"),
    ("digest", "<u4"),
]
#: The numpy description of a format 1.x row (no digest).
EXIT_DTYPE_FIELDS_V1 = EXIT_DTYPE_FIELDS[:-1]
#: Byte offset and width of each field inside a row (for strided, numpy-free column extraction).
EXIT_FIELD_LAYOUT = {
    "t_ns": (0, 8),
    "rip": (8, 8),
    "value": (16, 4),
    "port": (20, 2),
    "vcpu": (22, 2),
    "reason": (24, 1),
    "dir": (25, 1),
    "size": (26, 1),
    "digest": (27, 4),
}

#: Byte offset of the general registers (``struct kvm_regs``, 18 u64: rax rbx rcx rdx rsi rdi rsp rbp
#: r8 … r15 rip rflags) inside the ``kvm_run`` page with KVM_CAP_SYNC_REGS (x86-64), and their size.
SYNC_REGS_OFFSET = 304
SYNC_REGS_SIZE = 144
#: Names of the 18 u64 in that block, in order (what a register digest covers).
DIGEST_REGS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
               "r13", "r14", "r15", "rip", "rflags")


def exit_row_size(major: int) -> int:
    """Bytes per exit row in a trace of format ``major``.x."""
    return EXIT_ROW_SIZE_V1 if major < 2 else EXIT_ROW_SIZE


def exit_row_struct(major: int) -> struct.Struct:
    """The exit row layout of format ``major``.x."""
    return EXIT_ROW_V1 if major < 2 else EXIT_ROW

#: ``dir`` values (KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT).
DIR_IN = 0
DIR_OUT = 1

#: The KVM exit reasons the format documents (x86): number → name.  Names come from the one table of
#: linux/kvm.h names in tracevisor/kvm/uapi.py; rows may carry any other number (see :func:`reason_name`).
EXIT_REASONS: dict[int, str] = {n: EXIT_REASON_NAMES[n] for n in (
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16, 17, 24, 26, 29, 30, 33, 37, 39)}
EXIT_IO = U.KVM_EXIT_IO
EXIT_DEBUG = U.KVM_EXIT_DEBUG
EXIT_HLT = U.KVM_EXIT_HLT
EXIT_MMIO = U.KVM_EXIT_MMIO
EXIT_SHUTDOWN = U.KVM_EXIT_SHUTDOWN
EXIT_FAIL_ENTRY = U.KVM_EXIT_FAIL_ENTRY
EXIT_INTR = U.KVM_EXIT_INTR
EXIT_INTERNAL_ERROR = U.KVM_EXIT_INTERNAL_ERROR
EXIT_SYSTEM_EVENT = U.KVM_EXIT_SYSTEM_EVENT

#: Name of a KVM exit reason number (``REASON_<n>`` when linux/kvm.h has none).
reason_name = exit_reason_name


# --------------------------------------------------------------------------------------------------
# Hypercalls (port-I/O, uhyve ABI)
# --------------------------------------------------------------------------------------------------

#: Hypercall name -> port, from the hypercall table (tracevisor/hypercalls.py).
HYPERCALL_PORTS: dict[str, int] = {h.name: h.port for h in _HYPERCALLS.values()}
#: Keys of a hypercall event's ``args`` map: the argument block's decoded fields, by their ABI names, from
#: the same table (the result field of a block, ``ret``, is not repeated here: it is the event's top-level
#: ``ret``).
HYPERCALL_ARGS: dict[str, tuple[str, ...]] = {
    h.name: tuple(name for name, _off, _fmt in h.layout.fields if name != "ret") if h.layout else ()
    for h in _HYPERCALLS.values()}
#: The console port: its bytes are ``console`` events (stream "uart"), never ``hypercall`` events.
UART_PORT = _UART_PORT

# --------------------------------------------------------------------------------------------------
# Field specifications (header, footer, rich events)
# --------------------------------------------------------------------------------------------------

#: msgpack types used in the tables.  ``int`` is a msgpack integer (any width, signed or unsigned).
TYPES = ("int", "str", "bin", "bool", "map", "list", "any", "int|nil", "map|nil", "str|nil")


@dataclass(frozen=True)
class Field:
    name: str
    type: str
    doc: str


@dataclass(frozen=True)
class Kind:
    name: str
    doc: str
    required: tuple[Field, ...] = ()
    optional: tuple[Field, ...] = ()
    reserved: bool = False  # name reserved for a later minor version; no fields defined yet
    #: required fields that may be absent when the event carries an ``error`` field
    optional_on_error: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[Field, ...]:
        return self.required + self.optional


#: Fields every rich event carries.
COMMON_FIELDS: tuple[Field, ...] = (
    Field("k", "str", "kind (one of the kinds below; readers skip kinds they do not know)"),
    Field("seq", "int", "sequence number of the event: global, dense, increasing over all events of the run"),
    Field("cpu", "int", "vCPU index"),
    Field("t", "int", "ns since the trace start, monotonic clock (same clock as exit `t_ns`)"),
)
COMMON_KEYS = frozenset(f.name for f in COMMON_FIELDS)

KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "hypercall",
            "One port-I/O hypercall, recorded after the host handled it. In seq order it follows its exit row "
            "and the `hostio` events the host made for it. A hypercall the hypervisor refused (bad block "
            "address, pointer outside guest RAM, ...) has `error` and may lack `block`, `args` and `ret`.",
            required=(
                Field("call", "str", "hypercall name: " + ", ".join(HYPERCALL_PORTS)),
                Field("port", "int", "I/O port the guest wrote"),
                Field("addr", "int", "guest-physical address of the argument block"),
                Field("block", "bin", "the argument block as the guest wrote it"),
                Field("args", "map", "decoded block fields by ABI name, e.g. `{\"fd\": 1, \"buf\": 4198400, \"len\": 6}`"),
                Field("ret", "int|nil", "result, or nil when the call has none"),
                Field("t_end", "int", "ns when the host finished; host latency = `t_end - t`"),
            ),
            optional=(
                Field("out", "bin", "the block after the host wrote back; omitted when unchanged"),
                Field("payload", "bin", "bytes the guest passed to the host (write data, a file name, ...)"),
                Field("error", "str", "why the hypervisor refused the call (the run then stops)"),
            ),
            optional_on_error=("block", "args", "ret"),
        ),
        Kind(
            "hostio",
            "One request the guest-facing code made to the host, and the answer. Replay answers every host "
            "request from these, in order per cpu.",
            required=(
                Field("op", "str", "request: open, read, write, lseek, close, unlink, cmdline, boot_time, cpu_freq, "
                                       "net_rx (args `[poll]`, `data` the frame; only delivery points that got a frame are recorded), "
                                       "rdtsc (a patched RDTSC/RDTSCP: `ret` the 64-bit TSC), rdrand / rdseed (args "
                                       "`[bits]`, `ret` the value), ..."),
                Field("args", "list", "request arguments"),
                Field("ret", "any", "the answer (usually an int)"),
            ),
            optional=(Field("data", "bin", "bytes the host gave the guest (read data, a received frame, ...)"),
                      Field("error", "str", "the host's errno name (e.g. `ENOSPC`) when the host operation on an "
                                            "open file failed or wrote only part; `ret` is what the guest got")),
        ),
        Kind(
            "console",
            "Console output. Bytes may be coalesced (e.g. per line); `t` is the time of the first byte.",
            required=(
                Field("stream", "str", "\"uart\", \"stdout\" or \"stderr\""),
                Field("data", "bin", "the bytes"),
            ),
            optional=(
                Field("coalesced", "bool", "true: UART bytes KVM queued in its coalesced-I/O ring (`record "
                                           "--coalesce-console`), all those written since the previous exit row "
                                           "of this cpu; such bytes have no exit rows, so no RIP or time of "
                                           "their own, and replay compares them"),
            ),
        ),
        Kind(
            "mmio",
            "The data of an MMIO access; follows its MMIO exit row.",
            required=(
                Field("addr", "int", "guest-physical address"),
                Field("len", "int", "access width in bytes"),
                Field("data", "bin", "bytes written by the guest, or returned to it"),
                Field("write", "bool", "true for a guest write"),
            ),
        ),
        Kind(
            "vcpu",
            "A vCPU started or stopped.",
            required=(Field("state", "str", "\"start\" or \"stop\""),),
            optional=(Field("reason", "str", "why it stopped"),),
        ),
        Kind(
            "sched",
            "Exact multi-vCPU recordings: the vCPU `cpu` gave the run token to `next` (only one vCPU runs at a "
            "time). Replay follows these in seq order (docs/determinism.md).",
            required=(
                Field("n", "int", "exits `cpu` made in the slice that ends here"),
                Field("next", "int", "the vCPU that runs next"),
                Field("why", "str", "\"slice\" (exit budget), \"hlt\" (a HLT exit), \"kick\" (preempted "
                                    "between exits), \"timer\" (a timer of `cpu` falls due here: virtual time "
                                    "jumps to its deadline; `next` is `cpu`) or \"irq\" (an interrupt that waited "
                                    "for interrupts to be enabled is offered here; `next` is `cpu`)"),
            ),
            optional=(
                Field("rip", "int", "kick, timer, irq: RIP where the vCPU was stopped"),
                Field("digest", "int", "kick, timer, irq: CRC-32 of the 144-byte struct kvm_regs at that point"),
                Field("mdigest", "int", "CRC-32 over (page number, contents) of the guest pages written since the "
                                        "previous `sched` event, in page order (KVM's dirty log and the host's "
                                        "writes); the replay compares it here, and at a kick point it tells a "
                                        "loop's passes with equal registers apart"),
            ),
        ),
        Kind(
            "irq",
            "Exact mode's user-space interrupt path: an interrupt injected into `cpu` before it re-entered the "
            "guest (docs/determinism.md). Follows the exit it was injected after; replay compares it.",
            required=(
                Field("vector", "int", "the vector injected (KVM_INTERRUPT)"),
                Field("src", "str", "\"lapic\" (timer, IPI) or \"pic\" (the PIT's IRQ 0 with --pit)"),
                Field("n", "int", "exits `cpu` had made when it was injected"),
                Field("vt", "int", "virtual time, ns (advances per exit, jumps at HLT and timer points)"),
            ),
        ),
        Kind(
            "msr",
            "An MSR access KVM handed to user space (exact mode: x2APIC registers, IA32_TSC_DEADLINE); follows "
            "its exit row.",
            required=(
                Field("index", "int", "MSR number"),
                Field("data", "int", "the value written, or returned to the guest"),
                Field("write", "bool", "true for WRMSR"),
                Field("gp", "bool", "true when nothing emulates it and the guest got #GP"),
            ),
        ),
        Kind(
            "stop",
            "The end of the run (normally the last event).",
            required=(
                Field("code", "int|nil", "guest exit code, nil when there is none"),
                Field("reason", "str", "\"exit\", \"fault\", \"interrupted\", \"timeout\", \"error\", ..."),
            ),
            optional=(
                Field("status", "int", "exit status of the tracevisor process"),
                Field("message", "str", "one-line description of the stop"),
                Field("report", "map", "stop report: registers, instruction bytes, hints, ..."),
            ),
        ),
        Kind(
            "mem",
            "A hash of all guest memory (format 2.0), taken after the exit row it follows was handled: at "
            "boot (before the first instruction), after every hypercall, every `mem_every` exits of a vCPU "
            "(header `memhash`); single-vCPU runs only (the hash at the stop is the footer's `final`). Replay "
            "computes the same hash at the same point and compares.",
            required=(
                Field("hash", "int", "u64 memory hash: the sum mod 2^64 of splitmix64((page << 32) | crc32(page)) "
                                     "over all 4 KiB guest pages"),
                Field("at", "str", "`boot`, `hypercall` or `every`"),
            ),
            optional=(
                Field("pages", "bin", "the pages whose CRC-32 changed since the previous `mem` event of the run, as "
                                      "little-endian u32 pairs (page number, crc32 of the page); absent at `boot` (the "
                                      "boot image follows from the kernel and the header)"),
            ),
        ),
        Kind(
            "virtio",
            "What the virtio-net device did (format 1.1; docs/network.md). `op` says what: `chain` — one "
            "descriptor chain the device took from a queue and returned to the used ring; `status`, `reset`, "
            "`features`, `queue` — the driver configured the device; `error` — the device found a malformed "
            "ring, set DEVICE_NEEDS_RESET and stopped the VM. Events of an OUT access (a notify) follow its "
            "exit row; events of an IN access (an ISR read, which delivers received frames) precede it.",
            required=(Field("op", "str", "`chain`, `status`, `reset`, `features`, `queue` or `error`"),),
            optional=(
                Field("queue", "int", "queue index: 0 = RX, 1 = TX (`chain`, `queue`)"),
                Field("head", "int", "descriptor index at the head of the chain (`chain`)"),
                Field("slot", "int", "free-running available-ring index the chain was taken at, mod 2^16 (`chain`)"),
                Field("descs", "list", "the chain's descriptors in order, each `[index, addr, len, flags, next]` "
                                       "(flags: 1 NEXT, 2 WRITE) (`chain`)"),
                Field("len", "int", "bytes the device read from the chain (TX) or wrote into it (RX) (`chain`)"),
                Field("used_idx", "int", "the used ring's index after the chain was returned (`chain`)"),
                Field("data", "bin", "those bytes: the 10-byte virtio-net header, then the frame (`chain`)"),
                Field("status", "int", "device status after the access (`status`, `reset`, `error`)"),
                Field("old", "int", "device status before it (`status`, `reset`)"),
                Field("features", "int", "feature bits now enabled (`features`)"),
                Field("requested", "int", "feature bits the driver wrote (`features`)"),
                Field("pfn", "int", "page frame number the driver wrote; 0 disables the queue (`queue`)"),
                Field("addr", "int", "guest-physical address of the descriptor table (`queue`)"),
                Field("size", "int", "queue size in entries (`queue`)"),
                Field("message", "str", "what is malformed (`error`; also the VM's stop message)"),
            ),
        ),
        Kind(
            "burst",
            "One instruction-fallback burst (docs/fallback.md): KVM could not emulate the "
            "instruction at `start`, and the fallback emulator ran from there until an instruction KVM must "
            "see, the budget, or a fault. Deterministic: replay compares `start`, `end`, `count` and `stop`.",
            required=(
                Field("start", "int", "guest-virtual RIP of the first instruction"),
                Field("end", "int", "RIP after the burst (the next instruction KVM runs)"),
                Field("count", "int", "instructions the burst executed"),
                Field("stop", "str", "why it ended: \"exit\" (an instruction KVM must run), \"budget\", "
                                     "\"fault\" (an exception at `end`, left to KVM) or \"mmio\" (an access "
                                     "outside guest RAM, left to KVM)"),
                Field("insn", "str", "mnemonic of the first instruction"),
            ),
            optional=(Field("vector", "int", "exception vector when `stop` is \"fault\""),),
        ),
        Kind(
            "nm",
            "The fallback raised #NM (device not available) in the guest: the first SSE/x87 instruction after "
            "a task switch with CR0.TS set (lazy FPU). Format 2.0.",
            required=(Field("rip", "int", "RIP of the instruction"), Field("insn", "str", "its mnemonic")),
        ),
        Kind(
            "exception",
            "The fallback delivered another exception raised by the first instruction of a burst "
            "(#PF, #GP, #UD ...), as the CPU would. Format 2.0.",
            required=(Field("rip", "int", "RIP of the instruction"), Field("vector", "int", "exception vector"),
                      Field("insn", "str", "its mnemonic")),
            optional=(Field("error_code", "int", "the error code pushed"),
                      Field("cr2", "int", "faulting address of a #PF")),
        ),
        Kind(
            "xgetbv",
            "The fallback executed XGETBV (KVM's emulator cannot). Format 2.0.",
            required=(Field("rip", "int", "RIP of the instruction"), Field("xcr", "int", "ECX: which XCR")),
            optional=(Field("value", "int", "the value returned in EDX:EAX"),
                      Field("vector", "int", "exception raised instead (#GP for an unknown XCR)"),
                      Field("error_code", "int", "its error code")),
        ),
        Kind(
            "xsave",
            "The fallback executed XSAVE/XSAVEOPT into guest memory from KVM's XSAVE state. Format 2.0.",
            required=(Field("rip", "int", "RIP of the instruction"), Field("addr", "int", "save area (virtual)"),
                      Field("rfbm", "int", "requested-feature bitmap XCR0 & EDX:EAX")),
            optional=(Field("vector", "int", "exception raised instead (#GP misaligned, #PF)"),
                      Field("error_code", "int", "its error code"), Field("cr2", "int", "#PF address"),
                      Field("error", "str", "why the CPU would fault")),
        ),
        Kind(
            "xrstor",
            "The fallback executed XRSTOR from guest memory into KVM's XSAVE state. Format 2.0.",
            required=(Field("rip", "int", "RIP of the instruction"), Field("addr", "int", "save area (virtual)"),
                      Field("rfbm", "int", "requested-feature bitmap XCR0 & EDX:EAX")),
            optional=(Field("vector", "int", "exception raised instead (#GP, #PF)"),
                      Field("error_code", "int", "its error code"), Field("cr2", "int", "#PF address"),
                      Field("error", "str", "why the CPU faulted")),
        ),
        Kind(
            "net",
            "One Ethernet frame the guest sent or received (format 1.1), without the virtio-net header. A "
            "`tx` frame follows the `virtio` chain event it came from; an `rx` frame follows the `hostio` "
            "`net_rx` event that brought it in and the `virtio` chain it was written to, and was delivered "
            "at the exit row that follows it (`via` `isr`) or precedes it (`via` `notify`) on the same cpu.",
            required=(
                Field("dir", "str", "\"rx\" (to the guest) or \"tx\" (from the guest)"),
                Field("frame", "bin", "the Ethernet frame (destination MAC first)"),
                Field("len", "int", "frame length in bytes"),
            ),
            optional=(
                Field("queue", "int", "virtqueue index (0 RX, 1 TX)"),
                Field("head", "int", "head descriptor of the chain that carried it"),
                Field("poll", "int", "rx: the device's delivery-point counter (1, 2, ...; the `hostio` `net_rx` "
                                     "argument)"),
                Field("via", "str", "rx: the access that delivered it: \"isr\" (ISR read) or \"notify\" "
                                    "(RX queue notify)"),
                Field("dropped", "str", "why the frame was not delivered/sent (buffer too small, runt, ...); "
                                        "absent when it was"),
            ),
        ),
    )
}

#: Kind name used for exit rows when a reader materialises them as maps; never stored as a rich event.
EXIT_KIND = "exit"

#: Header fields.  The writer adds ``format`` (and the ``writer-filled`` ones when absent); the recorder
#: fills the rest.  Readers need only ``format``; every other field may be missing in a damaged or
#: hand-made trace.
HEADER_FIELDS: tuple[Field, ...] = (
    Field("format", "list", "[major, minor] format version; written by the writer"),
    Field("tracevisor", "str", "tracevisor version that wrote the trace (writer fills it when absent)"),
    Field("created", "str", "wall-clock start, ISO 8601 UTC, e.g. `2025-03-01T12:00:00.123456Z` (writer fills it when absent)"),
    Field("created_ns", "int", "the same instant as ns since the Unix epoch (writer fills it when absent)"),
    Field("compression", "str|nil", "\"zstd\" when the writer compressed chunks, else nil (writer fills it)"),
    Field("kernel", "map", "`{path: str or bin, sha256: str (hex), size: int, entry_version: int|nil, pie: bool}` of the "
                           "guest image (entry_version: the Hermit note's boot-info version, nil for a plain ELF)"),
    Field("memory", "int", "guest RAM in bytes"),
    Field("cpus", "int", "number of vCPUs"),
    Field("argv", "list", "guest arguments (argv[0] first): str, or bin where the bytes are not UTF-8"),
    Field("env", "list", "guest environment entries \"K=V\": str, or bin where the bytes are not UTF-8"),
    Field("mounts", "list", "list of maps describing host directories visible to the guest"),
    Field("cpuid", "list", "CPUID entries given to the guest: [function, index, flags, eax, ebx, ecx, edx]"),
    Field("host", "map", "`{uname: str, kvm_api: int, python: str, tsc_khz: int, irqchip: bool, caps: map}` "
                         "(caps: the KVM capabilities the run used, e.g. sync_regs, irqchip, immediate_exit)"),
    Field("determinism", "map", "`{notes: str or list of str, ...}`: what may differ when the run is replayed"),
    Field("interrupts", "map", "`{model: \"kernel\"}` (KVM's irqchip) or, in exact mode, `{model: \"user\", exit_ns: int, "
                               "pit: bool, tsc_khz: int}`: the user-space LAPIC/PIT on virtual time; absent in older "
                               "traces (KVM's irqchip)"),
    Field("options", "map", "free-form recorder options"),
    Field("digests", "bool", "true when the exit rows carry register digests (format 2.x recorder); replay "
                             "compares them only then"),
    Field("memhash", "map", "`{every: int, hypercalls: bool}`: a `mem` event every `every` exits of the vCPU (0: "
                            "none) and after every hypercall; absent when the trace has no `mem` events"),
    Field("fallback", "map", "instruction fallback configuration: `{mode: str, budget: int, budget_unit: str}` "
                             "(budget_unit \"blocks\": translation blocks per burst; absent in older "
                             "recordings, whose budget counts instructions) plus, when the engines are installed, `{engine, unicorn, capstone, exit_set, exits, "
                             "scan_version}` (exit_set: hash of the sweep's exit addresses); replay uses the same"),
    Field("guest_cpuid", "map", "what a guest on this host really sees in CPUID: "
                                "`{leaf1_ecx, leaf1_edx, leaf7_ebx, leaf7_ecx, leaf7_edx, rdrand, rdseed, "
                                "xsave, avx, avx2, avx512f, honoured: bool}` from the probe guest"),
)

FOOTER_FIELDS: tuple[Field, ...] = (
    Field("events", "int", "number of events in the file (exits and rich events)"),
    Field("exits", "int", "number of exit rows in the file"),
    Field("chunks", "list", "one `[file_offset_of_frame, seq0, n]` per chunk frame, in file order"),
    Field("by_reason", "map", "exit reason number (int key) -> number of exit rows"),
    Field("stop", "map|nil", "a copy of the last `stop` event, or nil"),
    Field("wall_ns", "int", "wall time from opening to closing the writer, ns"),
    Field("bytes", "int", "file size before the footer frame (= the footer frame's offset)"),
    Field("dropped", "int", "events not stored because the size limit was reached (0 normally)"),
    Field("final", "map|nil", "the guest state at the stop (format 2.0): `{mem: int}`, the memory hash (as in a "
                              "`mem` event) with every vCPU stopped; nil when unknown"),
)

CHUNK_FIELDS: tuple[Field, ...] = (
    Field("seq0", "int", "seq of the first event of the chunk"),
    Field("n", "int", "number of events in the chunk: seqs `seq0 .. seq0+n-1`"),
    Field("exits", "bin", "exit rows, 31 bytes each (27 in format 1.x); their seqs are the chunk's seqs not used by "
                          "`events`, ascending"),
    Field("events", "list", "rich events (maps), ascending `seq`"),
)

# --------------------------------------------------------------------------------------------------
# Validation (used by the writer when validating, and by tests)
# --------------------------------------------------------------------------------------------------


def _type_ok(value: Any, typ: str) -> bool:
    if typ == "any":
        return True
    for alt in typ.split("|"):
        if alt == "nil" and value is None:
            return True
        if alt == "int" and isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < (1 << 64):
            return True
        if alt == "str" and isinstance(value, str):
            return True
        if alt == "bin" and isinstance(value, (bytes, bytearray, memoryview)):
            return True
        if alt == "bool" and isinstance(value, bool):
            return True
        if alt == "map" and isinstance(value, Mapping):
            return True
        if alt == "list" and isinstance(value, (list, tuple)):
            return True
    return False


def validate_event(ev: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the problem when ``ev`` is not a valid rich event of a known kind."""
    kind = ev.get("k")
    if not isinstance(kind, str):
        raise ValueError(f"event has no kind: {ev!r:.200}")
    if kind == EXIT_KIND:
        raise ValueError("exits are recorded with TraceWriter.exit(), not as rich events")
    spec = KINDS.get(kind)
    if spec is None:
        raise ValueError(f"unknown event kind {kind!r} (define it in tracevisor/trace/schema.py)")
    if spec.reserved:
        raise ValueError(f"event kind {kind!r} is reserved and has no fields defined yet")
    for f in COMMON_FIELDS:
        if f.name not in ev:
            raise ValueError(f"{kind} event lacks {f.name!r}")
        if not _type_ok(ev[f.name], f.type):
            raise ValueError(f"{kind} event field {f.name!r} should be {f.type}, got {ev[f.name]!r:.80}")
    relaxed = spec.optional_on_error if "error" in ev else ()
    for f in spec.required:
        if f.name not in ev and f.name not in relaxed:
            raise ValueError(f"{kind} event lacks required field {f.name!r}")
    known = {f.name: f for f in spec.fields}
    for key, value in ev.items():
        if key in COMMON_KEYS:
            continue
        f = known.get(key)
        if f is None:
            raise ValueError(f"{kind} event has unknown field {key!r} (add it to schema.py)")
        if not _type_ok(value, f.type):
            raise ValueError(f"{kind} event field {key!r} should be {f.type}, got {value!r:.80}")


def validate_exit(vcpu: int, t_ns: int, reason: int, rip: int, port: int, direction: int, size: int, value: int,
                  digest: int = 0) -> None:
    """Raise ``ValueError`` when an exit's fields do not fit its row."""
    for name, v, bits in (
        ("digest", digest, 32),
        ("vcpu", vcpu, 16),
        ("t_ns", t_ns, 64),
        ("reason", reason, 8),
        ("rip", rip, 64),
        ("port", port, 16),
        ("direction", direction, 8),
        ("size", size, 8),
        ("value", value, 32),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < (1 << bits):
            raise ValueError(f"exit field {name}={v!r} does not fit an unsigned {bits}-bit field")
    if direction not in (DIR_IN, DIR_OUT):
        raise ValueError(f"exit direction {direction} is neither 0 (in) nor 1 (out)")


def host_text(value: bytes | str) -> str | bytes:
    """A host string (path, argument, environment entry) as the trace stores it: ``str`` when its bytes are
    UTF-8, else the bytes themselves (msgpack bin).  A ``str`` from the OS may carry surrogate escapes (a
    non-UTF-8 file name); those go back to their original bytes first.  Nothing is lost or refused."""
    raw = os.fsencode(value) if isinstance(value, str) else bytes(value)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def host_str(value: Any) -> str:
    """The inverse for use on the host: a stored ``str`` or bin as a ``str`` for ``open``/``os.*`` (bytes
    that are not UTF-8 become surrogate escapes, which the OS turns back into the same bytes)."""
    if isinstance(value, (bytes, bytearray)):
        return os.fsdecode(bytes(value))
    return str(value)


def validate_header(header: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` when a known header field has the wrong type (unknown keys are allowed)."""
    if not isinstance(header, Mapping):
        raise ValueError("trace header must be a map")
    for f in HEADER_FIELDS:
        if f.name in header and not _type_ok(header[f.name], f.type):
            raise ValueError(f"header field {f.name!r} should be {f.type}, got {header[f.name]!r:.80}")


# --------------------------------------------------------------------------------------------------
# Documentation tables (docs/trace-format.md embeds this output between markers; a test compares)
# --------------------------------------------------------------------------------------------------

DOC_BEGIN = "<!-- generated from tracevisor/trace/schema.py: begin -->"
DOC_END = "<!-- generated from tracevisor/trace/schema.py: end -->"


def _table(fields: tuple[Field, ...], required: bool | None = None) -> list[str]:
    rows = ["| field | type | meaning |", "|---|---|---|"] if required is None else [
        "| field | type | required | meaning |",
        "|---|---|---|---|",
    ]
    for f in fields:
        typ = f.type.replace("|", " or ")  # a bare "|" would split the markdown cell
        if required is None:
            rows.append(f"| `{f.name}` | {typ} | {f.doc} |")
        else:
            rows.append(f"| `{f.name}` | {typ} | {'yes' if required else 'no'} | {f.doc} |")
    return rows


def markdown_tables() -> str:
    """The reference tables of docs/trace-format.md, generated from the definitions above."""
    out: list[str] = [DOC_BEGIN, "", "### Header fields", ""]
    out += _table(HEADER_FIELDS)
    out += ["", "### Chunk payload", ""]
    out += _table(CHUNK_FIELDS)
    out += ["", f"### Exit row ({EXIT_ROW_SIZE} bytes, little-endian, `{EXIT_ROW.format}`; format 1.x: the first "
            f"{EXIT_ROW_SIZE_V1})", "", "| offset | field | type |", "|---|---|---|"]
    for name, _np_type in EXIT_DTYPE_FIELDS:
        off, width = EXIT_FIELD_LAYOUT[name]
        out.append(f"| {off} | `{name}` | u{width * 8} |")
    out += ["", "### Exit reasons", "", "| reason | name |", "|---|---|"]
    out += [f"| {num} | {name} |" for num, name in sorted(EXIT_REASONS.items())]
    out += ["", "### Fields common to every rich event", ""]
    out += _table(COMMON_FIELDS)
    for kind in KINDS.values():
        out += ["", f"### Event kind `{kind.name}`", "", kind.doc, ""]
        if kind.reserved:
            out.append("No fields are defined yet; readers skip it.")
            continue
        out += _table(kind.required, True)[:]
        out += _table(kind.optional, False)[2:]
    out += ["", "### Hypercall `args` keys", "", "| call | port | `args` keys |", "|---|---|---|"]
    for name, port in HYPERCALL_PORTS.items():
        keys = ", ".join(f"`{k}`" for k in HYPERCALL_ARGS[name]) or "(none)"
        out.append(f"| {name} | 0x{port:x} | {keys} |")
    out += ["", "### Footer fields", ""]
    out += _table(FOOTER_FIELDS)
    out += ["", DOC_END]
    return "\n".join(out) + "\n"


def update_doc(path: str) -> bool:
    """Replace the generated block of the markdown file at ``path``; True if it changed."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(DOC_BEGIN)
    end = text.index(DOC_END) + len(DOC_END)
    new = text[:start] + markdown_tables().rstrip("\n") + text[end:]
    if new != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(new)
    return new != text
