"""The --mount sandbox: guest paths resolve only inside mounted host directories."""

from __future__ import annotations

import os

import pytest

from tracevisor.errors import TracevisorError
from tracevisor.hostio import Console, LiveHostIO
from tracevisor.sandbox import Sandbox, parse_mount


@pytest.fixture
def tree(tmp_path):
    inside = tmp_path / "mnt"
    inside.mkdir()
    (inside / "data.txt").write_text("inside")
    (inside / "sub").mkdir()
    (inside / "sub" / "deep.txt").write_text("deep")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    os.symlink(outside, inside / "link-out")
    os.symlink("/etc/passwd", inside / "abs-link")
    os.symlink("sub/deep.txt", inside / "link-in")
    return tmp_path, inside, outside


def hostio(mounts):
    return LiveHostIO(Sandbox(mounts), [], [], Console(quiet=True))


def test_parse_mount(tmp_path):
    m = parse_mount(f"{tmp_path}:/data:ro")
    assert (m.host, m.guest, m.readonly) == (str(tmp_path), "/data", True)
    assert parse_mount(str(tmp_path)).guest == "/"
    with pytest.raises(TracevisorError, match="not a directory"):
        parse_mount(str(tmp_path / "nope"))
    with pytest.raises(TracevisorError, match="expected HOSTDIR"):
        parse_mount(":x")


def test_open_inside(tree):
    _, inside, _ = tree
    io = hostio([parse_mount(str(inside))])
    for path in (b"data.txt", b"/data.txt", b"./sub/../data.txt", b"sub/deep.txt", b"link-in"):
        fd = io.open(0, path, os.O_RDONLY, 0)
        assert fd >= 3, path
        n, data = io.read(0, fd, 100)
        assert data in (b"inside", b"deep")
        assert io.close(0, fd) == 0


@pytest.mark.parametrize("path", [b"../secret.txt", b"/../secret.txt", b"sub/../../secret.txt",
                                  b"link-out", b"abs-link", b"/etc/passwd", b"", b"/proc/self/root/etc/passwd"])
def test_escapes_refused(tree, path):
    _, inside, _ = tree
    io = hostio([parse_mount(str(inside))])
    assert io.open(0, path, os.O_RDONLY, 0) == -1


def test_no_mount_sees_nothing(tree):
    _, inside, _ = tree
    io = hostio([])
    assert io.open(0, str(inside / "data.txt").encode(), os.O_RDONLY, 0) == -1
    assert io.open(0, b"data.txt", os.O_RDONLY, 0) == -1


def test_guest_dir_mapping(tree):
    _, inside, _ = tree
    io = hostio([parse_mount(f"{inside}:/data")])
    assert io.open(0, b"/data/data.txt", os.O_RDONLY, 0) >= 3
    assert io.open(0, b"/data.txt", os.O_RDONLY, 0) == -1
    assert io.open(0, b"/database", os.O_RDONLY, 0) == -1


def test_create_and_unlink_stay_inside(tree):
    tmp, inside, outside = tree
    io = hostio([parse_mount(str(inside))])
    fd = io.open(0, b"new.txt", os.O_CREAT | os.O_WRONLY, 0o644)
    assert fd >= 3 and io.write(0, fd, b"x") == 1 and io.close(0, fd) == 0
    assert (inside / "new.txt").read_bytes() == b"x"
    assert io.unlink(0, b"new.txt") == 0 and not (inside / "new.txt").exists()
    assert io.unlink(0, b"../secret.txt") == -1 and outside.exists()
    assert io.unlink(0, b"link-out") == 0  # removes the link itself, not its target
    assert outside.exists()
    assert io.open(0, b"link-out", os.O_CREAT | os.O_WRONLY, 0o644) >= 3  # a new file inside
    assert outside.read_text() == "secret"


def test_read_only_mount(tree):
    _, inside, _ = tree
    io = hostio([parse_mount(f"{inside}:/:ro")])
    assert io.open(0, b"data.txt", os.O_RDONLY, 0) >= 3
    assert io.open(0, b"data.txt", os.O_RDWR, 0) == -1
    assert io.open(0, b"n.txt", os.O_CREAT | os.O_WRONLY, 0o644) == -1
    assert io.unlink(0, b"data.txt") == -1 and (inside / "data.txt").exists()


def test_fifo_refused_without_blocking(tree):
    _, inside, _ = tree
    os.mkfifo(inside / "fifo")
    io = hostio([parse_mount(str(inside))])
    assert io.open(0, b"fifo", os.O_RDONLY, 0) == -1


def test_fd_table_limits_and_errors(tree):
    _, inside, _ = tree
    io = LiveHostIO(Sandbox([parse_mount(str(inside))]), [], [], Console(quiet=True), max_files=8)
    fds = [io.open(0, b"data.txt", os.O_RDONLY, 0) for _ in range(10)]
    assert fds[:8] == list(range(3, 11)) and fds[8:] == [-1, -1]
    assert io.close(0, 5) == 0 and io.close(0, 5) == -1
    assert io.open(0, b"data.txt", os.O_RDONLY, 0) == 5  # lowest free guest fd is reused
    assert io.write(0, 77, b"x") == -1 and io.read(0, 77, 4) == (-1, b"")
    assert io.lseek(0, 3, 0, 7) == -1 and io.lseek(0, 3, 2, 0) == 2
    io.close_all()
    assert io.files == {}
