"""Hypercall dispatch without KVM: synthetic OUT exits against a real GuestMemory and a fake HostIO."""

from __future__ import annotations

import struct

import pytest

from tracevisor import hypercalls as H
from tracevisor.errors import GuestError
from tracevisor.hostio import HostIO
from tracevisor.memory import GuestMemory

MB = 1 << 20


class FakeHostIO(HostIO):
    def __init__(self):
        self.calls = []
        self.files = {}
        self.argv = [b"/k/hello", b"one", b"two"]
        self.env = [b"A=1", b"HOME=/root"]

    def open(self, cpu, path, flags, mode):
        self.calls.append(("open", path, flags, mode))
        return 3 if path == b"ok.txt" else -1

    def close(self, cpu, fd):
        self.calls.append(("close", fd))
        return 0 if fd == 3 else -1

    def read(self, cpu, fd, length):
        self.calls.append(("read", fd, length))
        if fd != 3:
            return -1, b""
        data = b"0123456789"[:length]
        return len(data), data

    def write(self, cpu, fd, data):
        self.calls.append(("write", fd, bytes(data)))
        return len(data) if fd in (1, 2, 3) else -1

    def lseek(self, cpu, fd, offset, whence):
        self.calls.append(("lseek", fd, offset, whence))
        return -1 if whence > 2 else offset

    def unlink(self, cpu, path):
        self.calls.append(("unlink", path))
        return 0

    def cmdline(self, cpu):
        return self.argv, self.env


@pytest.fixture
def env():
    mem = GuestMemory(4 * MB)
    # identity page tables for the first GiB at 0x10000 (as the machine writes them)
    from tracevisor import arch_x86_64 as arch
    arch.write_boot_structures(mem)
    host = FakeHostIO()
    ctx = H.Context(0, mem, host, cr3=lambda: arch.PML4_ADDR)
    return mem, host, ctx


def test_write_reads_guest_buffer_through_page_tables(env):
    mem, host, ctx = env
    mem.write(0x20000, b"hello\n")
    mem.write(0x30000, struct.pack("<iQQ", 1, 0x20000, 6))
    call = H.dispatch(0x400, 0x30000, ctx)
    assert call.name == "write" and call.args == {"fd": 1, "buf": 0x20000, "len": 6}
    assert host.calls == [("write", 1, b"hello\n")]
    assert call.outcome.payload == b"hello\n" and call.outcome.ret == 6
    assert call.out is None  # uhyve writes nothing back for WRITE


def test_open_writes_ret_and_records_path(env):
    mem, host, ctx = env
    mem.write(0x21000, b"ok.txt\0")
    mem.write(0x30000, struct.pack("<Qiii", 0x21000, 0o102, 0o644, -1))
    call = H.dispatch(0x440, 0x30000, ctx)
    assert host.calls == [("open", b"ok.txt", 0o102, 0o644)]
    assert struct.unpack_from("<i", mem.read(0x30010, 4))[0] == 3
    assert call.outcome.payload == b"ok.txt" and call.out[16:20] == struct.pack("<i", 3)


def test_open_failure_returns_minus_one(env):
    mem, host, ctx = env
    mem.write(0x21000, b"missing\0")
    mem.write(0x30000, struct.pack("<Qiii", 0x21000, 0, 0, 0))
    H.dispatch(0x440, 0x30000, ctx)
    assert struct.unpack_from("<i", mem.read(0x30010, 4))[0] == -1


def test_read_copies_data_and_ret(env):
    mem, host, ctx = env
    mem.write(0x30000, struct.pack("<iQQq", 3, 0x22000, 4, -1))
    H.dispatch(0x500, 0x30000, ctx)
    assert mem.read(0x22000, 4) == b"0123"
    assert struct.unpack_from("<q", mem.read(0x30014, 8))[0] == 4


def test_read_bad_fd(env):
    mem, host, ctx = env
    mem.write(0x30000, struct.pack("<iQQq", 9, 0x22000, 4, 0))
    H.dispatch(0x500, 0x30000, ctx)
    assert struct.unpack_from("<q", mem.read(0x30014, 8))[0] == -1


def test_read_huge_length_is_refused_before_asking_host(env):
    mem, host, ctx = env
    mem.write(0x30000, struct.pack("<iQQq", 3, 0x22000, 1 << 40, -1))
    with pytest.raises(GuestError, match="larger than guest RAM"):
        H.dispatch(0x500, 0x30000, ctx)
    assert host.calls == []


def test_lseek_and_close_and_unlink(env):
    mem, host, ctx = env
    mem.write(0x30000, struct.pack("<iqi", 3, 42, 0))
    H.dispatch(0x580, 0x30000, ctx)
    assert struct.unpack_from("<q", mem.read(0x30004, 8))[0] == 42
    mem.write(0x30000, struct.pack("<iqi", 3, 42, 7))
    H.dispatch(0x580, 0x30000, ctx)
    assert struct.unpack_from("<q", mem.read(0x30004, 8))[0] == -1
    mem.write(0x30100, struct.pack("<ii", 3, -1))
    H.dispatch(0x480, 0x30100, ctx)
    assert struct.unpack_from("<i", mem.read(0x30104, 4))[0] == 0
    mem.write(0x21000, b"gone\0")
    mem.write(0x30200, struct.pack("<Qi", 0x21000, -1))
    H.dispatch(0x840, 0x30200, ctx)
    assert ("unlink", b"gone") in host.calls and struct.unpack_from("<i", mem.read(0x30208, 4))[0] == 0


def test_exit(env):
    mem, host, ctx = env
    mem.write(0x30000, struct.pack("<i", 42))
    assert H.dispatch(0x540, 0x30000, ctx).outcome.exit_code == 42


def test_cmdsize_and_cmdval(env):
    mem, host, ctx = env
    mem.write(0x30000, b"\xee" * 1032)
    H.dispatch(0x740, 0x30000, ctx)
    block = mem.read(0x30000, 1032)
    argc = struct.unpack_from("<i", block, 0)[0]
    assert argc == 3
    assert struct.unpack_from("<3i", block, 4) == (9, 4, 4)
    assert block[16:20] == b"\xee" * 4  # entries beyond argc untouched
    assert struct.unpack_from("<i", block, 516)[0] == 2
    assert struct.unpack_from("<2i", block, 520) == (4, 11)
    # CMDVAL: pointer arrays at 0x31000 (argv) and 0x31100 (envp), buffers at 0x32000+
    ptrs = [0x32000 + 0x100 * i for i in range(5)]
    mem.write(0x31000, struct.pack("<3Q", *ptrs[:3]))
    mem.write(0x31100, struct.pack("<2Q", *ptrs[3:]))
    mem.write(0x30400, struct.pack("<QQ", 0x31000, 0x31100))
    H.dispatch(0x780, 0x30400, ctx)
    assert mem.read(ptrs[0], 9) == b"/k/hello\0"
    assert mem.read(ptrs[2], 4) == b"two\0"
    assert mem.read(ptrs[4], 11) == b"HOME=/root\0"


def test_cmdval_pointer_outside_ram(env):
    mem, host, ctx = env
    mem.write(0x31000, struct.pack("<3Q", 0x32000, 0xFFFF_FFFF_0000, 0x32100))
    mem.write(0x30400, struct.pack("<QQ", 0x31000, 0))
    with pytest.raises(GuestError, match="CMDVAL argument 1 buffer"):
        H.dispatch(0x780, 0x30400, ctx)


@pytest.mark.parametrize("addr", [4 * MB, 4 * MB - 1, (1 << 32) - 1, (1 << 64) - 4])
def test_block_outside_ram(env, addr):
    mem, host, ctx = env
    with pytest.raises(GuestError, match="argument block"):
        H.dispatch(0x440, addr, ctx)


def test_name_without_nul_before_end_of_ram(env):
    mem, host, ctx = env
    mem.write(4 * MB - 16, b"A" * 16)
    mem.write(0x30000, struct.pack("<Qiii", 4 * MB - 16, 0, 0, -1))
    with pytest.raises(GuestError, match="no NUL terminator"):
        H.dispatch(0x440, 0x30000, ctx)
    assert host.calls == []


@pytest.mark.parametrize("buf,length,msg", [
    (4 * MB - 2, 8, "outside guest RAM"),
    (0x20000, 1 << 63, "larger than guest RAM"),
    (0x8000_0000_0000, 4, "not canonical"),
    (0x4000_0000, 4, "not mapped"),  # beyond the 1 GiB identity map
    ((1 << 64) - 2, 4, "wraps"),
])
def test_bad_write_buffers(env, buf, length, msg):
    mem, host, ctx = env
    mem.write(0x30000, struct.pack("<iQQ", 1, buf, length))
    with pytest.raises(GuestError, match=msg):
        H.dispatch(0x400, 0x30000, ctx)
    assert host.calls == []


def test_net_ports_are_no_ops(env):
    mem, host, ctx = env
    for port in (0x640, 0x680, 0x700):
        call = H.dispatch(port, 0xDEAD, ctx)
        assert call.outcome.ret is None and call.block == b""


def test_table_matches_abi():
    ports = {h.name: h.port for h in H.TABLE.values()}
    assert ports == {"write": 0x400, "open": 0x440, "close": 0x480, "read": 0x500, "exit": 0x540,
                     "lseek": 0x580, "netwrite": 0x640, "netread": 0x680, "netstat": 0x700,
                     "cmdsize": 0x740, "cmdval": 0x780, "unlink": 0x840}
    sizes = {h.name: h.layout.size for h in H.TABLE.values() if h.layout}
    assert sizes == {"write": 20, "open": 20, "close": 8, "read": 28, "exit": 4, "lseek": 16,
                     "cmdsize": 1032, "cmdval": 16, "unlink": 12}
    assert H.SYS_READ.offset("ret") == (20, "q") and H.SYS_OPEN.offset("ret") == (16, "i")
    assert H.SYS_LSEEK.offset("whence") == (12, "i") and H.SYS_UNLINK.offset("ret") == (8, "i")
