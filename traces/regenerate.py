#!/usr/bin/env python3
"""Regenerate the sample traces in this directory by recording the example guests with the real CLI.

    python traces/regenerate.py [--out DIR] [NAME ...]      # needs /dev/kvm and gcc

Every sample is recorded with ``python -m tracevisor record -q --no-host-env`` (the host's environment never
reaches a trace; the guests that want variables get them with ``--env``).  The kernels are copied into a
neutral staging directory (``$TMPDIR/tracevisor-samples``) and run from there by their bare file name, so
``argv[0]`` is e.g. ``hello`` and the header's kernel path names no user directory.  Each trace is checked
afterwards: status as expected, complete, no reader warning, smaller than 1 MiB.  traces/README.md describes
what each one holds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MAX_BYTES = 1 << 20

#: name -> (example guest, record options, guest arguments, expected exit status)
SAMPLES: dict[str, tuple[str, list[str], list[str], int]] = {
    "hello": ("hello", [], [], 0),
    "hello-zstd": ("hello", ["--compress", "zstd"], [], 0),
    "files": ("files", ["--mount", "mnt"], [], 0),
    "compute": ("compute", [], ["1000"], 0),
    "compute-100": ("compute", [], ["100"], 0),
    "args": ("args", ["--env", "A=1", "--env", "B=two"], ["x", "y z", ""], 0),
    "exitcode": ("exitcode", [], ["3"], 3),
    "smp": ("smp", ["-c", "2"], [], 0),
    "netecho": ("netecho", [], ["10.0.0.2", "4"], 0),  # --net added below; 4 packets, then it exits
}


def cli(*args: str, cwd: Path | None = None, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return subprocess.run([sys.executable, "-m", "tracevisor", *args], cwd=cwd, env=env, capture_output=True, **kw)


def example(name: str) -> Path:
    r = cli("examples", name, check=True)
    return Path(r.stdout.decode().strip())


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def record_netecho(stage: Path, out: Path, opts: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """netecho on the UDP backend; this script is the peer: one ARP request, one ping, two UDP datagrams."""
    sys.path.insert(0, str(REPO / "tests"))
    import net_frames as nf  # the tests' frame builders (stdlib only)

    port = free_udp_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "tracevisor", "record", "--no-host-env", "-o", str(out),
                             "--net", f"udp:127.0.0.1:{port}", *opts, "netecho", *args], cwd=stage, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(10)
    try:
        line = b""
        deadline = time.monotonic() + 30
        while b"netecho: ready" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
        for frame in (nf.arp_request(), nf.icmp_echo(1), nf.udp(40000, 7, b"hello, tracevisor\n"),
                      nf.udp(40000, 7, b"quit")):
            peer.sendto(frame, ("127.0.0.1", port))
            peer.recvfrom(65535)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        peer.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, line + stdout, stderr)


def check(path: Path, status: int, expected: int) -> list[str]:
    sys.path.insert(0, str(REPO))
    from tracevisor.trace import open_trace

    problems = []
    if status != expected:
        problems.append(f"exit status {status}, expected {expected}")
    with open_trace(path) as r:
        for _ in r.chunks():
            pass
        if not r.complete:
            problems.append("incomplete trace")
        problems += [f"reader warning: {w}" for w in r.warnings]
    size = path.stat().st_size
    if size >= MAX_BYTES:
        problems.append(f"{size} bytes (samples must stay under 1 MiB)")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description="Record the sample traces again (needs /dev/kvm).")
    ap.add_argument("names", nargs="*", metavar="NAME", help=f"samples to record (default all: {', '.join(SAMPLES)})")
    ap.add_argument("--out", default=str(HERE), help="where to write NAME.tvt (default: this directory)")
    ns = ap.parse_args()
    names = ns.names or list(SAMPLES)
    unknown = [n for n in names if n not in SAMPLES]
    if unknown:
        ap.error(f"unknown sample(s): {', '.join(unknown)}")
    out_dir = Path(ns.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.gettempdir()) / "tracevisor-samples"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "mnt").mkdir(parents=True)
    failed = 0
    try:
        for name in names:
            guest, opts, args, expected = SAMPLES[name]
            if not (stage / guest).exists():
                shutil.copy2(example(guest), stage / guest)
            out = out_dir / f"{name}.tvt"
            tmp = out.with_suffix(".tvt.tmp")
            if guest == "netecho":
                r = record_netecho(stage, tmp, opts, args)
            else:
                r = cli("record", "-q", "--no-host-env", "-o", str(tmp), *opts, guest, *args, cwd=stage, timeout=120)
            problems = check(tmp, r.returncode, expected)
            if problems:
                failed += 1
                print(f"{name}: FAILED: {'; '.join(problems)}\n{r.stderr.decode(errors='replace')}", file=sys.stderr)
                tmp.unlink(missing_ok=True)
                continue
            os.replace(tmp, out)
            print(f"{name}: {out} ({out.stat().st_size} bytes)")
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
