"""Human-readable views of a trace: a summary (:func:`info_text`) and one line per event (:func:`format_event`).

Hypercalls print like strace (``write(1, "Hello\\n", 6) = 6``), exits as
``#1234 cpu0 +12.345ms IO out port=0x800 size=1 value=0x2e rip=0x401234``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from .. import netparse
from .reader import TraceReader
from .schema import DIR_OUT, EXIT_IO, reason_name

_MAX_STR = 32  # bytes shown of a buffer before "..."

_OPEN_FLAGS = {
    0o100: "O_CREAT",
    0o200: "O_EXCL",
    0o400: "O_NOCTTY",
    0o1000: "O_TRUNC",
    0o2000: "O_APPEND",
    0o4000: "O_NONBLOCK",
    0o200000: "O_DIRECTORY",
    0o400000: "O_NOFOLLOW",
    0o2000000: "O_CLOEXEC",
}
_ACCMODE = {0: "O_RDONLY", 1: "O_WRONLY", 2: "O_RDWR", 3: "O_ACCMODE"}
_ADDRESS_KEYS = frozenset(("buf", "name", "argv", "envp", "addr"))  # guest addresses: shown in hex
_WHENCE = {0: "SEEK_SET", 1: "SEEK_CUR", 2: "SEEK_END"}
_ESCAPES = {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t", 0x22: '\\"', 0x5C: "\\\\", 0x00: "\\0"}


def quote(data: bytes | bytearray | memoryview, limit: int = _MAX_STR) -> str:
    """strace-style C string: printable ASCII as is, escapes otherwise; ``"..."...`` when cut at ``limit``."""
    data = bytes(data)
    out = []
    for b in data[:limit]:
        esc = _ESCAPES.get(b)
        if esc is not None:
            out.append(esc)
        elif 0x20 <= b < 0x7F:
            out.append(chr(b))
        else:
            out.append(f"\\x{b:02x}")
    return '"' + "".join(out) + '"' + ("..." if len(data) > limit else "")


def open_flags(flags: int) -> str:
    """``O_CREAT|O_RDWR|O_TRUNC``-style rendering of open(2) flags (names sorted)."""
    names = [_ACCMODE[flags & 3]] if flags & 3 or not flags & ~3 else []
    rest = flags & ~3
    for bit, name in _OPEN_FLAGS.items():
        if rest & bit:
            names.append(name)
            rest &= ~bit
    names.sort()
    if rest:
        names.append(f"0x{rest:x}")
    return "|".join(names) if names else "O_RDONLY"


def _value(v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return quote(v)
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "nil"}[v]
    if isinstance(v, int):
        return str(v)
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{k}={_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        if len(v) > 8:
            return "[" + ", ".join(_value(x) for x in v[:8]) + f", ...{len(v) - 8} more]"
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return repr(v)


def _hex(v: Any) -> str:
    return f"0x{v:x}" if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else _value(v)


def _name(ev: Mapping[str, Any], args: Mapping[str, Any]) -> str:
    payload = ev.get("payload")
    if isinstance(payload, (bytes, bytearray)):
        return quote(bytes(payload).split(b"\0", 1)[0], 256)
    return _hex(args.get("name"))


def _hypercall(ev: Mapping[str, Any]) -> str:
    call = ev.get("call", "?")
    args = ev.get("args")
    if not isinstance(args, Mapping):
        args = {}
    ret = ev.get("ret")
    g = args.get
    if call == "write":
        payload = ev.get("payload")
        buf = quote(payload) if isinstance(payload, (bytes, bytearray)) else _hex(g("buf"))
        text = f"write({_value(g('fd'))}, {buf}, {_value(g('len'))})"
    elif call == "read":
        text = f"read({_value(g('fd'))}, {_hex(g('buf'))}, {_value(g('len'))})"
    elif call == "open":
        flags = g("flags")
        mode = g("mode")
        fl = open_flags(flags) if isinstance(flags, int) else _value(flags)
        md = f"0{mode:03o}" if isinstance(mode, int) and mode >= 0 else _value(mode)
        text = f"open({_name(ev, args)}, {fl}, {md})"
    elif call == "close":
        text = f"close({_value(g('fd'))})"
    elif call == "lseek":
        whence = g("whence")
        text = f"lseek({_value(g('fd'))}, {_value(g('offset'))}, {_WHENCE.get(whence, _value(whence))})"
    elif call == "unlink":
        text = f"unlink({_name(ev, args)})"
    elif call == "exit":
        code = g("arg", g("code", ret))
        return f"exit({_value(code)})" + _latency(ev)
    elif call == "uart":
        return f"uart({_hex(g('value'))})" + _latency(ev)
    elif call == "cmdsize" and isinstance(ev.get("out"), (bytes, bytearray)):
        text = f"cmdsize({_cmdsize_answer(bytes(ev['out']))})"
    else:
        text = f"{call}(" + ", ".join(
            f"{k}={_hex(v) if k in _ADDRESS_KEYS else _value(v)}" for k, v in args.items()) + ")"
    return f"{text} = {'?' if ret is None else _value(ret)}" + _latency(ev)


def _cmdsize_answer(out: bytes) -> str:
    """What the host wrote into the CMDSIZE block (the guest's fields before the call are zeros): the
    counts and the sizes of the strings, NUL included."""
    import struct

    def counted(off: int) -> tuple[int, list[int]] | None:
        if len(out) < off + 4:
            return None
        n = struct.unpack_from("<i", out, off)[0]
        k = max(0, min(n, 128, (len(out) - off - 4) // 4))
        return n, list(struct.unpack_from(f"<{k}i", out, off + 4))

    parts = []
    for name, off in (("arg", 0), ("env", 516)):
        got = counted(off)
        if got is not None:
            sizes = got[1][:8]
            more = ", ..." if len(got[1]) > 8 else ""
            parts.append(f"{name}c={got[0]}, {name}sz=[{', '.join(map(str, sizes))}{more}]")
    return "{" + ", ".join(parts) + "}"


def _latency(ev: Mapping[str, Any]) -> str:
    t, t_end = ev.get("t"), ev.get("t_end")
    if isinstance(t, int) and isinstance(t_end, int) and t_end >= t:
        return f" <{(t_end - t) / 1000:.1f}us>"
    return ""


def _exit(ev: Mapping[str, Any]) -> str:
    reason = ev.get("reason", 0)
    rip = ev.get("rip", 0)
    if reason == EXIT_IO:
        d = "out" if ev.get("dir") == DIR_OUT else "in"
        return (f"IO {d} port=0x{ev.get('port', 0):x} size={ev.get('size', 0)} value=0x{ev.get('value', 0):x} "
                f"rip=0x{rip:x}")
    text = f"{reason_name(reason)} rip=0x{rip:x}"
    if ev.get("port"):
        text += f" port=0x{ev['port']:x}"
    if ev.get("value"):
        text += f" value=0x{ev['value']:x}"
    return text


def _net(ev: Mapping[str, Any]) -> str:
    """``net rx 42 B: ARP who-has 10.0.0.2 tell 10.0.0.1 (queue 0 head 0 via isr)``."""
    frame = ev.get("frame")
    frame = bytes(frame) if isinstance(frame, (bytes, bytearray)) else b""
    length = ev.get("len") if type(ev.get("len")) is int else len(frame)
    where = [f"{key} {ev[key]}" for key in ("queue", "head", "via") if isinstance(ev.get(key), (int, str))]
    text = f"net {ev.get('dir', '?')} {length} B: {netparse.summary(frame)}"
    if ev.get("dropped"):
        text += f" DROPPED ({_value(ev['dropped'])})"
    return text + (f" ({' '.join(where)})" if where else "")


def _chain(ev: Mapping[str, Any]) -> str:
    """``virtio chain queue 1 head 0: [0] 0x4c9000+70 ro; used len=70 idx=1``: each descriptor as
    address+length, ``wo`` when the device writes it (VIRTQ_DESC_F_WRITE), else ``ro``."""
    descs = ev.get("descs") if isinstance(ev.get("descs"), list) else []
    shown = []
    for d in descs[:8]:
        if isinstance(d, (list, tuple)) and len(d) >= 4 and all(type(x) is int for x in d[:4]):
            shown.append(f"[{d[0]}] 0x{d[1]:x}+{d[2]} {'wo' if d[3] & 2 else 'ro'}")
    if len(descs) > 8:
        shown.append(f"... {len(descs)} descriptors")
    text = f"virtio chain queue {_value(ev.get('queue'))} head {_value(ev.get('head'))}: " + ", ".join(shown)
    return text + f"; used len={_value(ev.get('len'))} idx={_value(ev.get('used_idx'))}"


def _body(ev: Mapping[str, Any]) -> str:
    k = ev.get("k")
    if k == "exit":
        return _exit(ev)
    if k == "hypercall":
        return _hypercall(ev)
    if k == "hostio":
        args = ev.get("args")
        args = args if isinstance(args, (list, tuple)) else [] if args is None else [args]
        text = f"hostio {ev.get('op', '?')}(" + ", ".join(_value(a) for a in args) + f") = {_value(ev.get('ret'))}"
        if isinstance(ev.get("error"), str):  # the host operation failed or was partial (strace's errno)
            text += f" {ev['error']}"
        if "data" in ev:
            text += f" data={_value(ev['data'])}"
        return text
    if k == "console":
        return f"console {ev.get('stream', '?')} {_value(ev.get('data', b''))}"
    if k == "mmio":
        rw = "write" if ev.get("write") else "read"
        data = ev.get("data", b"")
        shown = bytes(data).hex() if isinstance(data, (bytes, bytearray)) else _value(data)
        return f"mmio {rw} {_hex(ev.get('addr'))} len={_value(ev.get('len'))} data={shown}"
    if k == "vcpu":
        return f"vcpu {ev.get('state', '?')}" + (f" ({ev['reason']})" if ev.get("reason") else "")
    if k == "net":
        return _net(ev)
    if k == "virtio" and ev.get("op") == "chain":
        return _chain(ev)
    if k == "stop":
        text = f"stop reason={ev.get('reason', '?')} code={_value(ev.get('code'))}"
        report = ev.get("report")
        if isinstance(report, Mapping) and report.get("message"):
            text += f": {report['message']}"
        return text
    rest = {key: v for key, v in ev.items() if key not in ("k", "seq", "cpu", "t")}
    return f"{k} " + " ".join(f"{key}={_value(v)}" for key, v in rest.items())


def format_event(ev: Mapping[str, Any]) -> str:
    """One line for one event (exit map or rich event): ``#seq cpuN +t.ttt ms <what happened>``."""
    t = ev.get("t")
    when = f"+{t / 1e6:.3f}ms" if isinstance(t, int) else "+?"
    return f"#{ev.get('seq', '?')} cpu{ev.get('cpu', '?')} {when} {_body(ev)}"


def _totals(reader: TraceReader) -> dict:
    """Totals from the footer, or by reading every chunk when there is none."""
    f = reader.footer
    if f is not None and isinstance(f.get("by_reason"), Mapping):
        return {
            "events": f.get("events"),
            "exits": f.get("exits"),
            "by_reason": dict(f["by_reason"]),
            "stop": f.get("stop"),
            "wall_ns": f.get("wall_ns"),
            "chunks": len(reader.chunk_index),
        }
    events = exits = 0
    by_reason: Counter = Counter()
    stop = None
    for chunk in reader.chunks():
        events += chunk.n
        exits += chunk.n_exits
        by_reason.update(chunk.exits[24::chunk.row.size])
        for ev in chunk.events:
            if ev.get("k") == "stop":
                stop = ev
    return {"events": events, "exits": exits, "by_reason": dict(by_reason), "stop": stop, "wall_ns": None,
            "chunks": len(reader.chunk_index)}


def _shown(v: object) -> str:
    """A header string for a terminal: bytes that are not UTF-8 (stored as bin) with backslash escapes."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "backslashreplace")
    return str(v)


def info_text(reader: TraceReader) -> str:
    """A multi-line summary: header fields, totals, exits by reason, warnings."""
    h = reader.header
    lines: list[str] = []

    def row(label: str, value: Any) -> None:
        lines.append(f"{label:<12} {value}")

    fmt = h.get("format", ["?", "?"])
    row("trace", f"{reader.path} ({'complete' if reader.complete else 'incomplete: no footer'})")
    row("format", f"{fmt[0]}.{fmt[1]}, written by tracevisor {h.get('tracevisor', '?')}")
    if h.get("created"):
        row("created", h["created"])
    kernel = h.get("kernel")
    if isinstance(kernel, Mapping):
        sha = str(kernel.get("sha256", ""))
        row("kernel", f"{_shown(kernel.get('path', '?'))} ({kernel.get('size', '?')} bytes, sha256 {sha[:16]}...)")
    if "memory" in h or "cpus" in h:
        mem = h.get("memory")
        mem_text = f"{mem // (1 << 20)} MiB" if isinstance(mem, int) else "?"
        row("machine", f"{mem_text} RAM, {h.get('cpus', '?')} vCPU(s)")
    for key in ("argv",):
        if key in h:
            row(key, " ".join(map(_shown, h[key])) if isinstance(h[key], list) else _shown(h[key]))
    if isinstance(h.get("env"), list):
        row("env", f"{len(h['env'])} entries")
    if isinstance(h.get("mounts"), list) and h["mounts"]:
        row("mounts", _value(h["mounts"]))
    if isinstance(h.get("cpuid"), list):
        row("cpuid", f"{len(h['cpuid'])} entries")
    if isinstance(h.get("guest_cpuid"), Mapping):
        from ..cpuprobe import describe

        row("guest cpuid", describe(h["guest_cpuid"]))
    host = h.get("host")
    if isinstance(host, Mapping):
        row("host", f"{host.get('uname', '?')}; KVM API {host.get('kvm_api', '?')}; Python {host.get('python', '?')}")
    det = h.get("determinism")
    if isinstance(det, Mapping) and det.get("notes"):
        notes = det["notes"]
        for note in notes if isinstance(notes, list) else [notes]:
            row("determinism", note)
    if h.get("compression"):
        row("compression", h["compression"])
    if isinstance(h.get("options"), Mapping) and h["options"]:
        row("options", _value(h["options"]))
    if isinstance(h.get("fallback"), Mapping) and h["fallback"]:
        row("fallback", _value(h["fallback"]))

    tot = _totals(reader)
    events, exits = tot["events"], tot["exits"]
    other = events - exits if isinstance(events, int) and isinstance(exits, int) else "?"
    row("events", f"{events} ({exits} exits, {other} other) in {tot['chunks']} chunks, {reader.size} bytes")
    if isinstance(exits, int) and exits:
        row("bytes/exit", f"{reader.size / exits:.1f} (whole file)")
    if isinstance(tot["wall_ns"], int):
        row("wall time", f"{tot['wall_ns'] / 1e9:.3f} s")
    stop = tot["stop"]
    if isinstance(stop, Mapping):
        row("stop", _body(stop)[5:])
    if tot["by_reason"]:
        lines.append("exits by reason:")
        for reason, count in sorted(tot["by_reason"].items(), key=lambda kv: (-kv[1], kv[0])):
            name = reason_name(reason) if isinstance(reason, int) else str(reason)
            lines.append(f"  {name:<16} {count}")
    if reader.warnings:
        lines.append("warnings:")
        lines.extend(f"  {w}" for w in reader.warnings)
    return "\n".join(lines) + "\n"
