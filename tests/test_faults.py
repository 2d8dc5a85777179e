"""Guest faults and hangs end in one clear report and a defined status — never a traceback or a hang."""

from __future__ import annotations

import fcntl
import gc
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import EXIT_ASM, EXIT_DATA, build_asm, run_cli, spawn_cli

pytestmark = pytest.mark.kvm


def assert_clean(r, status, *fragments):
    err = r.stderr.decode()
    assert r.returncode == status, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    return err


def test_triple_fault(tmp_path):
    k = build_asm(tmp_path, "ud2", "  ud2")
    assert_clean(run_cli("run", str(k)), 3, "triple fault on vCPU 0", "code at rip: 0f 0b", "rip=")


def test_sse_instruction_is_reported(tmp_path):
    k = build_asm(tmp_path, "sse", "  pxor %xmm0, %xmm0\n" + EXIT_ASM, EXIT_DATA.format(code=0))
    r = run_cli("run", str(k))
    err = r.stderr.decode()
    assert r.returncode == 3 and "Traceback" not in err
    # nested KVM: emulation failure (suberror 1); direct KVM with CR4.OSFXSR clear: #UD → triple fault
    assert ("internal error on vCPU 0: suberror 1" in err) or ("triple fault" in err), err
    assert "code at rip: 66 0f ef c0" in err


def test_jump_outside_ram_is_reported_as_such(tmp_path):
    k = build_asm(tmp_path, "jumpout", "  mov $0x10000000, %rax\n  jmp *%rax\n")  # mapped, but past 64 MiB of RAM
    r = run_cli("run", str(k))
    err = r.stderr.decode()
    assert r.returncode == 3 and "Traceback" not in err, err
    assert "rip=0x0000000010000000" in err
    # nested KVM reports an emulation failure, direct KVM may report the fetch as MMIO or fault: either way the
    # report must not show a malformed range nor blame x87/SSE
    assert "[0x10000000, 0x4000000)" not in err and "-mgeneral-regs-only" not in err, err
    if "suberror 1" in err:
        assert "code at rip: (none: rip maps to guest-physical 0x10000000, outside guest RAM" in err
        assert "hint: rip points outside guest RAM" in err


def test_unknown_out_port_stops(tmp_path):
    k = build_asm(tmp_path, "p80", "  mov $1, %al\n  outb %al, $0x80\n" + EXIT_ASM, EXIT_DATA.format(code=0))
    assert_clean(run_cli("run", str(k)), 3, "unknown I/O port 0x80", "at rip 0x4000")


def test_unknown_in_port_reads_all_ones(tmp_path):
    k = build_asm(tmp_path, "p61", "  inb $0x61, %al\n  mov $0x800, %dx\n  outb %al, %dx\n" + EXIT_ASM,
                  EXIT_DATA.format(code=0))
    r = run_cli("run", str(k))
    assert (r.returncode, r.stdout) == (0, b"\xff")
    assert b"read unknown I/O port 0x61" in r.stderr


def test_notes_about_unknown_ports_and_mmio_are_bounded(tmp_path):
    # 100 distinct unknown IN ports, then 100 reads of distinct addresses past RAM (MMIO exits)
    body = """
  mov $0x100, %dx
1:
  inb %dx, %al
  inc %dx
  cmp $0x164, %dx
  jne 1b
  mov $0x8000000, %rbx
  mov $100, %rcx
2:
  mov (%rbx), %al
  add $0x1000, %rbx
  dec %rcx
  jnz 2b
""" + EXIT_ASM
    k = build_asm(tmp_path, "many", body, EXIT_DATA.format(code=0))
    r = run_cli("run", str(k))
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    ports = [x for x in lines if "read unknown I/O port" in x]
    mmio = [x for x in lines if "outside guest RAM" in x]
    assert len(ports) == 32 and mmio == [], lines[:3]  # the first 32 keys are all ports
    assert sum("not reporting further ones" in x for x in lines) == 1
    assert len(lines) <= 34, lines


def test_halt_with_interrupts_off_is_detected(tmp_path):
    k = build_asm(tmp_path, "hlt", "  cli\n  hlt\n")
    t = time.monotonic()
    assert_clean(run_cli("run", str(k), timeout=30), 3, "halted with interrupts disabled")
    assert time.monotonic() - t < 10


def test_timeout_stops_spinning_guest(tmp_path):
    k = build_asm(tmp_path, "spin", "1: jmp 1b\n")
    assert_clean(run_cli("run", "--timeout", "1", str(k), timeout=30), 124, "--timeout of 1 s expired")


@pytest.mark.parametrize("mode", ["run", "record"])
def test_timeout_ends_a_guest_blocked_on_a_stdout_pipe_nobody_reads(tmp_path, guests, mode):
    """compute prints a UART line per 64 rounds; with our stdout a pipe that is never read, the pipe fills and
    the vCPU's console write waits for a reader. --timeout must still end the run, not hang on that write."""
    out = ["-o", str(tmp_path / "t.tvt")] if mode == "record" else []
    env = {k: v for k, v in os.environ.items() if k != "TRACEVISOR_KVM_DEVICE"}
    # A one-page pipe is full for poll() after the first write, whatever the machine's load (a default
    # 64 KiB pipe may not fill within the 4 s on a busy host); the guest prints thousands of lines in 4 s.
    rfd, wfd = os.pipe()
    fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 4096)
    proc = subprocess.Popen([sys.executable, "-m", "tracevisor", mode, "--timeout", "4", *out,
                             str(guests["compute"]), "100000000"], stdout=wfd, stderr=subprocess.PIPE,
                            env=env)
    os.close(wfd)
    started = time.monotonic()
    try:
        status = proc.wait(timeout=30)  # nobody reads stdout until the process is gone
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("the run hung on a full stdout pipe past --timeout")
    took = time.monotonic() - started
    err = proc.stderr.read().decode()
    with os.fdopen(rfd, "rb") as r:
        got = r.read()
    assert status == 124 and "--timeout of 4 s expired" in err and "Traceback" not in err, err
    assert 0 < len(got) <= 4096 and took < 20, (len(got), took)  # output stopped at the full pipe; ended in time
    if mode == "record":
        r = run_cli("info", str(tmp_path / "t.tvt"))
        assert r.returncode == 0 and b"timeout" in r.stdout, r.stdout


@pytest.mark.parametrize("sig,status,word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_signals_stop_cleanly(tmp_path, sig, status, word):
    k = build_asm(tmp_path, "spin", "1: jmp 1b\n")
    with spawn_cli("run", str(k), stdout=subprocess.PIPE) as p:
        time.sleep(1.0)
        p.send_signal(sig)
        out, err = p.communicate(timeout=20)
    assert p.returncode == status, err
    assert word.encode() in err and b"Traceback" not in err


@pytest.mark.parametrize("addr", ["0xfffffff0", "0x3fffffc"])
def test_bad_hypercall_block(tmp_path, addr):
    k = build_asm(tmp_path, "badblk", f"  mov ${addr}, %eax\n  mov $0x440, %dx\n  outl %eax, %dx\n")
    assert_clean(run_cli("run", str(k)), 3, "OPEN argument block", "outside guest RAM")


def test_multi_vcpu_fault_while_other_runs(tmp_path):
    # vCPU 0 spins forever; vCPU 1 triple-faults: the VM must stop, not hang (uhyve #631)
    k = build_asm(tmp_path, "smpfault", "  test %rsi, %rsi\n  jnz 2f\n1: pause\n  jmp 1b\n2: ud2\n")
    t = time.monotonic()
    assert_clean(run_cli("run", "-c", "2", str(k), timeout=60), 3, "triple fault on vCPU 1")
    assert time.monotonic() - t < 20


def test_halt_after_sending_init_to_the_other_vcpu_is_a_hang(tmp_path):
    """vCPU 0 puts vCPU 1 into wait-for-SIPI (an INIT IPI through the x2APIC ICR), then halts with interrupts
    off: nothing can ever run again, so the watchdog must say so without waiting for --timeout."""
    body = """
  test %rsi, %rsi
  jnz 3f
  mov $200000, %rcx        # give vCPU 1 (started 50 ms later) time to run
1: dec %rcx
  jnz 1b
  mov $0x1b, %ecx          # IA32_APIC_BASE: enable x2APIC
  rdmsr
  or $0xc00, %eax
  wrmsr
  mov $0x830, %ecx         # x2APIC ICR: INIT, assert, to APIC ID 1
  mov $1, %edx
  mov $0x4500, %eax
  wrmsr
  cli
  hlt
3: pause
  jmp 3b
"""
    k = build_asm(tmp_path, "initcpu1", body)
    started = time.monotonic()
    r = run_cli("run", "-c", "2", "--timeout", "60", str(k), timeout=90)
    assert_clean(r, 3, "every vCPU is halted with interrupts disabled (hlt after cli) or held after an INIT")
    assert time.monotonic() - started < 30


class TestConfigErrors:
    """Host/config problems: one line on stderr, status 1, no traceback."""

    def one_line(self, r):
        err = r.stderr.decode()
        assert r.returncode == 1, err
        assert err.count("\n") == 1 and err.startswith("tracevisor: error: "), err
        return err

    def test_missing_kernel(self, tmp_path):
        assert "kernel not found" in self.one_line(run_cli("run", str(tmp_path / "nope")))

    def test_kernel_must_be_a_regular_file(self, tmp_path):
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)  # nobody writes it: opening must not block
        for path in ("/dev/zero", str(fifo)):
            err = self.one_line(run_cli("run", path, timeout=20))
            assert "is not a regular file" in err, err

    def test_not_elf(self, tmp_path):
        p = tmp_path / "k"
        p.write_text("hello")
        assert "not an ELF file" in self.one_line(run_cli("run", str(p)))

    def test_elf32(self, tmp_path):
        p = tmp_path / "k32"
        p.write_bytes(b"\x7fELF\x01\x01\x01" + bytes(60))
        assert "32-bit ELF" in self.one_line(run_cli("run", str(p)))

    def test_kernel_bigger_than_memory(self, tmp_path):
        k = build_asm(tmp_path, "big", "  hlt", ".lcomm big, 40*1024*1024")
        assert "raise --memory" in self.one_line(run_cli("run", "-m", "16M", str(k)))

    def test_no_kvm_device(self, tmp_path, guests):
        r = run_cli("run", str(guests["hello"]), env={"TRACEVISOR_KVM_DEVICE": str(tmp_path / "kvm")})
        assert "does not exist: this machine offers no KVM" in self.one_line(r)

    def test_kvm_device_not_kvm(self, tmp_path, guests):
        r = run_cli("run", str(guests["hello"]), env={"TRACEVISOR_KVM_DEVICE": "/dev/null"})
        assert "is not a KVM device" in self.one_line(r)

    def test_bad_mount(self, tmp_path, guests):
        assert "is not a directory" in self.one_line(run_cli("run", "--mount", str(tmp_path / "x"),
                                                             str(guests["hello"])))

    def test_bad_memory(self, guests):
        assert "bad size" in self.one_line(run_cli("run", "-m", "lots", str(guests["hello"])))

    def test_usage_error_status_2(self):
        r = run_cli("run")
        assert r.returncode == 2 and b"Traceback" not in r.stderr


def test_machines_release_every_host_fd(tmp_path):
    """A notebook may create many VMs: each must give back its KVM, VM and vCPU fds and its memory."""
    from tracevisor import session

    k = build_asm(tmp_path, "exit0", EXIT_ASM, EXIT_DATA.format(code=0))
    def fds() -> int:
        gc.collect()  # fds of earlier tests' garbage must not close in the middle of the count
        return len(os.listdir("/proc/self/fd"))

    assert session.run(k, quiet=True).code == 0  # one-time set-up (lazy imports, caches) before counting
    before = fds()
    for _ in range(10):
        info = session.run(k, quiet=True)
        assert info.code == 0
    assert fds() == before
