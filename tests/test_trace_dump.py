"""Human-readable trace output: strace-like hypercalls, one line per event, the info summary."""

from __future__ import annotations

from tracevisor.trace import TraceWriter, open_trace
from tracevisor.trace.dump import format_event, info_text, open_flags, quote


def hc(call, args, ret, **extra):
    return {"k": "hypercall", "seq": 7, "cpu": 0, "t": 12_345_000, "call": call, "port": 0x400, "addr": 0x9000,
            "block": b"", "args": args, "ret": ret, **extra}


def body(ev):
    return format_event(ev).split(" ", 3)[3]


def test_strace_like_hypercalls():
    assert body(hc("open", {"name": 0x5000, "flags": 0o1102, "mode": 0o644}, 3, payload=b"data.txt\0")) == \
        'open("data.txt", O_CREAT|O_RDWR|O_TRUNC, 0644) = 3'
    assert body(hc("write", {"fd": 1, "buf": 0x401000, "len": 6}, 6, payload=b"Hello\n")) == \
        'write(1, "Hello\\n", 6) = 6'
    assert body(hc("read", {"fd": 3, "buf": 0x402000, "len": 4096}, 3)) == "read(3, 0x402000, 4096) = 3"
    assert body(hc("lseek", {"fd": 3, "offset": 0, "whence": 0}, 0)) == "lseek(3, 0, SEEK_SET) = 0"
    assert body(hc("close", {"fd": 3}, 0)) == "close(3) = 0"
    assert body(hc("unlink", {"name": 0x5000}, -1, payload=b"gone.txt")) == 'unlink("gone.txt") = -1'
    assert body(hc("exit", {"arg": 0}, None)) == "exit(0)"
    assert body(hc("cmdsize", {"argc": 2, "envc": 1}, None)) == "cmdsize(argc=2, envc=1) = ?"
    # with the block the host wrote: what the guest got, not its zeroed fields
    import struct

    out = bytearray(1032)
    struct.pack_into("<iii", out, 0, 2, 6, 3)
    struct.pack_into("<ii", out, 516, 1, 8)
    assert body(hc("cmdsize", {"argc": 0, "envc": 0}, 2, out=bytes(out))) == \
        "cmdsize({argc=2, argsz=[6, 3], envc=1, envsz=[8]}) = 2"
    assert body(hc("cmdval", {"argv": 0x4C3840, "envp": 0x4C3000}, 0)) == "cmdval(argv=0x4c3840, envp=0x4c3000) = 0"
    assert body(hc("write", {"fd": 1, "buf": 1, "len": 6}, 6, payload=b"Hello\n", t_end=12_357_300)) == \
        'write(1, "Hello\\n", 6) = 6 <12.3us>'


def test_exit_lines():
    ev = {"k": "exit", "seq": 1234, "cpu": 0, "t": 12_345_000, "reason": 2, "rip": 0x401234, "port": 0x800,
          "dir": 1, "size": 1, "value": 0x2E}
    assert format_event(ev) == "#1234 cpu0 +12.345ms IO out port=0x800 size=1 value=0x2e rip=0x401234"
    ev = {"k": "exit", "seq": 5, "cpu": 1, "t": 1_000, "reason": 8, "rip": 0x401000, "port": 0, "dir": 0,
          "size": 0, "value": 0}
    assert format_event(ev) == "#5 cpu1 +0.001ms SHUTDOWN rip=0x401000"


def test_other_kinds_are_readable():
    base = {"seq": 1, "cpu": 0, "t": 0}
    assert body({**base, "k": "console", "stream": "uart", "data": b"Hi\r\n"}) == 'console uart "Hi\\r\\n"'
    assert body({**base, "k": "hostio", "op": "read", "args": [3, 4096], "ret": 3, "data": b"abc"}) == \
        'hostio read(3, 4096) = 3 data="abc"'
    assert body({**base, "k": "mmio", "addr": 0xFEE00000, "len": 4, "data": b"\x01\x00\x00\x00",
                 "write": True}) == "mmio write 0xfee00000 len=4 data=01000000"
    assert body({**base, "k": "vcpu", "state": "stop", "reason": "exit"}) == "vcpu stop (exit)"
    assert body({**base, "k": "stop", "code": 3, "reason": "exit"}) == "stop reason=exit code=3"
    assert body({**base, "k": "net", "frame": b"\xff" * 40}) == \
        "net ? 40 B: ethertype 0xffff ff:ff:ff:ff:ff:ff > ff:ff:ff:ff:ff:ff"
    # missing fields never raise
    assert format_event({"k": "hypercall"})
    assert format_event({})


def test_helpers():
    assert quote(b"a" * 40) == '"' + "a" * 32 + '"...'
    assert quote(b'\x00"\\\x7f') == '"\\0\\"\\\\\\x7f"'
    assert open_flags(0) == "O_RDONLY"
    assert open_flags(0o101) == "O_CREAT|O_WRONLY"
    assert open_flags(0o2000 | 1 | 0o10000000) == "O_APPEND|O_WRONLY|0x200000"


def test_info_text(tmp_path):
    path = tmp_path / "run.tvt"
    header = {"kernel": {"path": "/g/hello", "sha256": "0123456789abcdef" * 4, "size": 999},
              "memory": 64 << 20, "cpus": 1, "argv": ["/g/hello", "x"], "env": ["A=1"],
              "host": {"uname": "Linux", "kvm_api": 12, "python": "3.11"},
              "determinism": {"notes": ["TSC not recorded"]}}
    with TraceWriter(path, header, chunk_events=50) as w:
        for i in range(300):
            w.exit(0, i, 2, i, 0x800, 1, 1, 0)
        w.exit(0, 400, 5, 1)
        w.event("stop", 0, 401, code=0, reason="exit")
    text = info_text(open_trace(path))
    assert "/g/hello (999 bytes, sha256 0123456789abcdef...)" in text
    assert "64 MiB RAM, 1 vCPU(s)" in text
    assert "302 (301 exits, 1 other)" in text
    assert "IO               300" in text and "HLT              1" in text
    assert "stop         reason=exit code=0" in text
    assert "warnings" not in text
    # without footer: totals computed from the chunks, warning listed
    data = path.read_bytes()
    cut = tmp_path / "cut.tvt"
    cut.write_bytes(data[: len(data) - 40])
    text = info_text(open_trace(cut))
    assert "incomplete" in text and "warnings:" in text and "recorder killed?" in text


def test_network_events_read_like_tcpdump():
    import net_frames as nf

    base = {"seq": 1, "cpu": 0, "t": 0, "k": "net"}
    arp = nf.arp_request()
    assert body({**base, "dir": "rx", "len": len(arp), "frame": arp, "queue": 0, "head": 3, "via": "isr"}) == \
        f"net rx {len(arp)} B: ARP who-has 10.0.0.2 tell 10.0.0.1 (queue 0 head 3 via isr)"
    ping = nf.icmp_echo(1)
    assert body({**base, "dir": "rx", "frame": ping}) == f"net rx {len(ping)} B: 10.0.0.1 > 10.0.0.2 ICMP echo request"
    dgram = nf.udp(40000, 7, b"hello")
    assert body({**base, "dir": "tx", "frame": dgram, "dropped": "queue full"}) == \
        f"net tx {len(dgram)} B: 10.0.0.1:40000 > 10.0.0.2:7 UDP 5 bytes DROPPED ('queue full')"
    assert body({**base, "dir": "rx", "frame": b"\x01\x02"}) == "net rx 2 B: short frame (2 bytes)"
    chain = {"seq": 2, "cpu": 0, "t": 0, "k": "virtio", "op": "chain", "queue": 1, "head": 0,
             "descs": [[0, 0x4C9000, 10, 1, 1], [1, 0x4CA000, 60, 0, 0]], "len": 70, "used_idx": 1}
    assert body(chain) == "virtio chain queue 1 head 0: [0] 0x4c9000+10 ro, [1] 0x4ca000+60 ro; used len=70 idx=1"
    chain = {**chain, "queue": 0, "descs": [[5, 0x4D1000, 2048, 2, 0]]}
    assert body(chain) == "virtio chain queue 0 head 0: [5] 0x4d1000+2048 wo; used len=70 idx=1"
    assert body({**chain, "descs": "junk", "len": None})  # hostile fields never raise
