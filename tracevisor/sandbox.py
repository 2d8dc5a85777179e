"""The file sandbox: guest paths are resolved only inside host directories given with ``--mount``.

``--mount HOSTDIR[:GUESTDIR][:ro]`` maps a host directory at a guest path (default ``/``; relative guest
paths are taken from ``/``, as uhyve's were from its working directory).  Resolution is done by the kernel
with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) relative to a directory fd opened at start-up, so
neither ``..`` nor a symlink planted inside the mount can reach a host file outside it.  With no mount the
guest sees no host file at all.
"""

from __future__ import annotations

import ctypes
import errno
import os
import posixpath
import stat
from dataclasses import dataclass

from .errors import TracevisorError

_SYS_openat2 = 437
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_have_openat2: bool | None = None

# Guest open flags tracevisor passes on (Hermit's values equal Linux x86-64's).
O_ACCMODE = 0o3
PASSED_FLAGS = O_ACCMODE | os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_APPEND
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _openat2(dirfd: int, path: str, flags: int, mode: int) -> int:
    """openat2 beneath ``dirfd``; falls back to a checked realpath walk where the syscall is missing."""
    global _have_openat2
    if _have_openat2 is not False:
        how = _OpenHow(flags=flags, mode=mode, resolve=_RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(_SYS_openat2, dirfd, os.fsencode(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            _have_openat2 = True
            return fd
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err))
        _have_openat2 = False
    # Fallback (kernels < 5.6): resolve the path and require it to stay inside the mount.
    root = os.path.realpath(f"/proc/self/fd/{dirfd}")
    real = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
        raise OSError(errno.EXDEV, "path escapes the mount")
    return os.open(real, flags | os.O_NOFOLLOW, mode)


@dataclass
class Mount:
    host: str
    guest: str
    readonly: bool
    dirfd: int = -1

    def describe(self) -> dict:
        return {"host": self.host, "guest": self.guest, "ro": self.readonly}


def parse_mount(spec: str) -> Mount:
    """``HOSTDIR[:GUESTDIR][:ro]`` → Mount (host directory checked now, with a clear error)."""
    parts = spec.split(":")
    readonly = False
    if len(parts) > 1 and parts[-1] in ("ro", "rw"):
        readonly = parts.pop() == "ro"
    if len(parts) > 2 or not parts[0]:
        raise TracevisorError(f"bad --mount {spec!r}: expected HOSTDIR[:GUESTDIR][:ro]")
    host = os.path.abspath(parts[0])
    guest = parts[1] if len(parts) == 2 and parts[1] else "/"
    if not guest.startswith("/"):
        guest = "/" + guest
    guest = posixpath.normpath(guest)
    if guest.startswith("//"):
        guest = "/" + guest.lstrip("/")
    if not os.path.isdir(host):
        raise TracevisorError(f"--mount {spec!r}: {host} is not a directory")
    return Mount(host=host, guest=guest, readonly=readonly)


class Refused(OSError):
    """A request the sandbox refuses by policy (outside every mount, climbing above the root, a write to a
    read-only mount, not a regular file), as opposed to an ordinary failure such as a missing file."""


#: errno values openat2 uses for paths that would leave the mount (RESOLVE_BENEATH) or cross a magic link
ESCAPE_ERRNOS = frozenset({errno.EXDEV, errno.ELOOP})


def is_refusal(err: BaseException) -> bool:
    return isinstance(err, Refused) or (isinstance(err, OSError) and err.errno in ESCAPE_ERRNOS)


class Sandbox:
    """Resolves guest paths to host files inside the mounts, and nothing else."""

    def __init__(self, mounts: list[Mount]) -> None:
        self.mounts = sorted(mounts, key=lambda m: len(m.guest), reverse=True)
        for m in self.mounts:
            try:
                m.dirfd = os.open(m.host, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as e:
                raise TracevisorError(f"cannot open mount directory {m.host}: {e.strerror}") from None

    def resolve(self, guest_path: bytes) -> tuple[Mount, str]:
        """(mount, path relative to it); raises OSError(EACCES/ENOENT) if no mount covers the path."""
        try:
            text = guest_path.decode("utf-8", "surrogateescape")
        except Exception:  # pragma: no cover - surrogateescape never fails
            raise OSError(errno.EINVAL, "undecodable path") from None
        if not text or "\0" in text:
            raise OSError(errno.ENOENT, "empty path")
        parts: list[str] = []
        for comp in ("/" + text).split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not parts:
                    raise Refused(errno.EACCES, "path climbs above the guest root")
                parts.pop()
            else:
                parts.append(comp)
        norm = "/" + "/".join(parts)
        for m in self.mounts:
            if m.guest == "/" or norm == m.guest or norm.startswith(m.guest + "/"):
                rel = norm[len(m.guest):].lstrip("/") if m.guest != "/" else norm.lstrip("/")
                return m, rel or "."
        raise Refused(errno.ENOENT, "no mount covers this path")

    def open(self, guest_path: bytes, flags: int, mode: int) -> tuple[int, str]:
        """Open a guest path; returns (host fd, host path for reports).  Raises OSError on refusal."""
        mount, rel = self.resolve(guest_path)
        gflags = flags & PASSED_FLAGS
        if mount.readonly and flags & WRITE_FLAGS:
            raise Refused(errno.EROFS, "read-only mount")
        # openat2 (unlike open) refuses a non-zero mode without O_CREAT with EINVAL, and Hermit's Rust std
        # passes 0o666 with every open: the mode only counts when a file may be created.
        mode = mode & 0o777 if gflags & os.O_CREAT else 0
        fd = _openat2(mount.dirfd, rel, gflags | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK, mode)
        try:
            st = os.fstat(fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise Refused(errno.EACCES, "not a regular file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, os.path.join(mount.host, rel)

    def unlink(self, guest_path: bytes) -> str:
        mount, rel = self.resolve(guest_path)
        if mount.readonly:
            raise Refused(errno.EROFS, "read-only mount")
        parent, name = posixpath.split(rel)
        if name in ("", ".", ".."):
            raise OSError(errno.EISDIR, "cannot unlink a directory")
        pfd = _openat2(mount.dirfd, parent or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, 0)
        try:
            os.unlink(name, dir_fd=pfd)
        finally:
            os.close(pfd)
        return os.path.join(mount.host, rel)

    def describe(self) -> list[dict]:
        return [m.describe() for m in self.mounts]

    def close(self) -> None:
        for m in self.mounts:
            if m.dirfd >= 0:
                os.close(m.dirfd)
                m.dirfd = -1
