"""Every example guest boots on real KVM and produces exactly its documented output and exit code."""

from __future__ import annotations

import pytest

from helpers import run_cli
from tracevisor import guestbuild

pytestmark = pytest.mark.kvm

FILES_OUT = """files: path=data.txt
open data.txt O_CREAT|O_RDWR|O_TRUNC 0644 = ok
write 45
write 36
lseek 0 SEEK_SET = 0
read 128 = 81
compare = ok
lseek 0 SEEK_END = 81
lseek -5 SEEK_CUR = 76
read 5 = 5 "VWXYZ"
close = 0
open data.txt O_RDONLY = ok
read 32 = 32
read 32 = 32
read 32 = 17
read 32 = 0
compare = ok
close = 0
close again = -1
read fd 77 = -1
unlink data.txt = 0
open data.txt O_RDONLY = -1
unlink data.txt = -1
files: OK
"""


def test_hello(guests):
    r = run_cli("run", str(guests["hello"]))
    assert (r.returncode, r.stdout, r.stderr) == (0, b"Hello from tracevisor!\n", b"")


def test_hello_pie_is_relocated(guests):
    r = run_cli("run", str(guests["hello-pie"]))
    assert (r.returncode, r.stdout) == (0, b"Hello from a relocated tracevisor kernel!\n")


def test_plain_elf(guests):
    r = run_cli("run", str(guests["plain"]))
    assert (r.returncode, r.stdout) == (0, b"plain ELF\n")


def test_args_and_env(guests):
    k = str(guests["args"])
    r = run_cli("run", "--no-host-env", "--env", "A=1", "--env", "B=two", k, "x", "y z", "")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode() == (f"argc=4\nargv[0]={k}\nargv[1]=x\nargv[2]=y z\nargv[3]=\n"
                                 "envc=2\nenv[0]=A=1\nenv[1]=B=two\n")


def test_host_environment_passed_like_uhyve(guests):
    r = run_cli("run", str(guests["args"]), env={"TV_MARKER": "visible"})
    assert r.returncode == 0 and b"=TV_MARKER=visible\n" in r.stdout


@pytest.mark.parametrize("code,status", [(0, 0), (3, 3), (255, 255), (300, 44), (-1, 255)])
def test_exitcode(guests, code, status):
    r = run_cli("run", str(guests["exitcode"]), str(code))
    assert (r.returncode, r.stdout) == (status, b"")


@pytest.mark.parametrize("n", [0, 1, 64, 130, 1000])
def test_compute(guests, n):
    r = run_cli("run", str(guests["compute"]), str(n))
    assert r.returncode == 0
    dots = b"".join(b"." * min(64, n - i) + b"\n" for i in range(0, n, 64))
    assert r.stdout == dots + f"compute: N={n} checksum={guestbuild.compute_checksum(n):016x}\n".encode()


def test_files_round_trip(guests, tmp_path):
    r = run_cli("run", "--mount", str(tmp_path), str(guests["files"]))
    assert (r.returncode, r.stdout.decode()) == (0, FILES_OUT), r.stderr
    assert list(tmp_path.iterdir()) == []  # unlinked again


def test_files_without_mount_sees_nothing(guests, tmp_path):
    r = run_cli("run", str(guests["files"]), cwd=tmp_path)
    assert r.returncode == 1
    assert r.stdout.endswith(b"files: FAIL at open-create\n")
    assert list(tmp_path.iterdir()) == []


def test_files_under_guest_dir(guests, tmp_path):
    r = run_cli("run", "--mount", f"{tmp_path}:/data", str(guests["files"]), "/data/x.bin")
    assert r.returncode == 0, r.stdout
    assert b"open /data/x.bin O_CREAT|O_RDWR|O_TRUNC 0644 = ok" in r.stdout


def test_files_read_only_mount(guests, tmp_path):
    r = run_cli("run", "--mount", f"{tmp_path}:/:ro", str(guests["files"]))
    assert r.returncode == 1 and r.stdout.endswith(b"FAIL at open-create\n")
    assert list(tmp_path.iterdir()) == []


def test_smp_two_vcpus(guests):
    r = run_cli("run", "-c", "2", str(guests["smp"]))
    assert (r.returncode, r.stdout) == (0, b"smp: cpus=2 cpu1 result=50005000\n"), r.stderr


def test_smp_one_vcpu(guests):
    r = run_cli("run", str(guests["smp"]))
    assert (r.returncode, r.stdout, r.stderr) == (2, b"", b"smp: needs 2 vCPUs\n")


def test_memory_option_reaches_guest(guests, tmp_path):
    # hello runs in the smallest and a large guest; a size below the minimum is a clear error
    assert run_cli("run", "-m", "16M", str(guests["hello"])).returncode == 0
    assert run_cli("run", "--memory", "1GiB", str(guests["hello"])).returncode == 0
    r = run_cli("run", "-m", "8M", str(guests["hello"]))
    assert r.returncode == 1 and r.stderr.startswith(b"tracevisor: error: guest memory 8 MiB is out of range")


def test_stdin_reaches_guest_fd0(guests):
    # fd 0 maps to the host's stdin: `files` never reads it, but `run` must not block on it either
    r = run_cli("run", str(guests["hello"]), input=b"ignored")
    assert r.returncode == 0
