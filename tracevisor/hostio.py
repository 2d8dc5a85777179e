"""HostIO: the one seam through which every value from outside reaches the guest.

Hypercall handlers never call ``os.*`` themselves; they ask a HostIO.  Three backends:

* :class:`LiveHostIO` — does the real thing: sandboxed files (see sandbox.py), host stdio, clock.
* :class:`RecordingHostIO` — wraps another HostIO and logs every request with its answer as a ``hostio``
  trace event (plus console output as ``console`` events).
* ``replay.backend.ReplayingHostIO`` — answers from a trace and checks that the request matches.

Every method takes the calling vCPU first, so record and replay can keep one ordered stream per vCPU.
Results follow uhyve 0.2.1: raw values, -1 on any error (errno is not passed to the guest).
"""

from __future__ import annotations

import errno
import functools
import os
import select
import stat
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .sandbox import Sandbox, is_refusal

STDIN, STDOUT, STDERR = 0, 1, 2
MAX_GUEST_FILES = 512
UART_EVENT_MAX = 4096  # a recorded UART console event ends at a newline or at this many bytes
MAX_IO_CHUNK = 1 << 26  # one READ never asks the host for more than 64 MiB at once
MAX_LOG = 1000  # refusals kept for -v: a guest repeating a refused request must not grow host memory


def console_stream(fd: int) -> str | None:
    """The console stream a guest fd writes to: fd 1 is "stdout", fd 2 "stderr", any other fd none.
    (Whether the guest still has it open is the live HostIO's business: after CLOSE of fd 1 a WRITE fails.)"""
    return "stdout" if fd == STDOUT else "stderr" if fd == STDERR else None


I32 = (-(1 << 31), (1 << 31) - 1)
I64 = (-(1 << 63), (1 << 63) - 1)
U32 = (0, (1 << 32) - 1)
U64 = (0, (1 << 64) - 1)


@dataclass(frozen=True)
class HostOp:
    """One kind of host request as a ``hostio`` trace event records it.

    ``args`` turns the HostIO method's arguments (after ``cpu``) into the event's ``args`` list: the
    recording HostIO writes it, the replaying one asks for exactly it.  ``ret`` is the range of an integer
    answer — what the guest's field (or the boot info) can hold — or None; ``data``: the answer carries
    bytes (the event's ``data`` field)."""

    name: str
    args: Callable[..., list]
    ret: tuple[int, int] | None
    data: bool = False


#: The host requests, by the ``op`` name of their ``hostio`` events (the method of the same role is
#: HostIO.<method>: open, close, read, write, lseek, unlink, cmdline, boot_time_ns, cpu_freq_khz, net_rx).
HOST_OPS: dict[str, HostOp] = {op.name: op for op in (
    HostOp("open", lambda path, flags, mode: [bytes(path), flags, mode], I32),
    HostOp("close", lambda fd: [fd], I32),
    HostOp("read", lambda fd, length: [fd, length], I64, data=True),
    HostOp("write", lambda fd, data: [fd, len(data)], I64),
    HostOp("lseek", lambda fd, offset, whence: [fd, offset, whence], I64),
    HostOp("unlink", lambda path: [bytes(path)], I32),
    HostOp("cmdline", lambda: [], None),
    HostOp("boot_time", lambda: [], I64),
    HostOp("cpu_freq", lambda: [], U32),
    HostOp("net_rx", lambda poll: [poll], None, data=True),  # logged only when a frame arrived
    # exact mode: patched nondeterministic instructions (tracevisor/ndinsn.py)
    HostOp("rdtsc", lambda: [], U64),
    HostOp("rdrand", lambda bits: [bits], U64),
    HostOp("rdseed", lambda bits: [bits], U64),
)}
(OPEN, CLOSE, READ, WRITE, LSEEK, UNLINK, CMDLINE, BOOT_TIME, CPU_FREQ, NET_RX,
 RDTSC, RDRAND, RDSEED) = HOST_OPS.values()


class HostIO:
    """The interface (and the documentation of each request)."""

    def open(self, cpu: int, path: bytes, flags: int, mode: int) -> int:
        """Guest fd (≥ 3) or -1."""
        raise NotImplementedError

    def close(self, cpu: int, fd: int) -> int:
        raise NotImplementedError

    def read(self, cpu: int, fd: int, length: int) -> tuple[int, bytes]:
        """(result, data): result = len(data) ≥ 0, or -1 with no data."""
        raise NotImplementedError

    def write(self, cpu: int, fd: int, data: bytes) -> int:
        raise NotImplementedError

    def lseek(self, cpu: int, fd: int, offset: int, whence: int) -> int:
        raise NotImplementedError

    def unlink(self, cpu: int, path: bytes) -> int:
        raise NotImplementedError

    def cmdline(self, cpu: int) -> tuple[list[bytes], list[bytes]]:
        """(argv, env) as given to the guest; argv[0] is the kernel path."""
        raise NotImplementedError

    def boot_time_ns(self, cpu: int) -> int:
        raise NotImplementedError

    def cpu_freq_khz(self, cpu: int) -> int:
        raise NotImplementedError

    def rdtsc(self, cpu: int) -> int:
        """The value a patched RDTSC/RDTSCP of ``cpu`` reads (the guest's TSC, 64 bits); see ndinsn.py."""
        raise NotImplementedError

    def rdrand(self, cpu: int, bits: int, seed: bool) -> int:
        """The ``bits``-bit value a patched RDRAND (RDSEED when ``seed``) of ``cpu`` returns (always
        successful: CF=1)."""
        raise NotImplementedError

    def console(self, cpu: int, stream: str, data: bytes) -> None:
        """Guest output: stream is "uart", "stdout" or "stderr".  Not an input; never fails."""
        raise NotImplementedError

    def net_rx(self, cpu: int, poll: int) -> bytes | None:
        """The next Ethernet frame received for the guest's NIC, or None (nothing waiting, or no network).
        ``poll`` numbers the device's delivery points (guest accesses), so a recording can say at which
        one a frame arrived; the device asks again at the same point until it gets None."""
        return None

    def net_tx(self, cpu: int, frame: bytes) -> None:
        """Send an Ethernet frame the guest transmitted.  An output: nothing comes back to the guest."""

    def console_sink(self, cpu: int, stream: str):
        """A callable ``sink(data)`` equivalent to ``console(cpu, stream, data)``; backends may return a
        faster one (the UART path calls it once per exit)."""
        return lambda data: self.console(cpu, stream, data)

    def uart_batch_sink(self, cpu: int):
        """A callable ``sink(data, t_ns)`` for UART bytes the native run loop handled in one batch (``t_ns``:
        trace time of the first byte); equivalent to calling the ``uart`` console sink with each byte."""
        inner = self.console_sink(cpu, "uart")
        return lambda data, t_ns: inner(data)

    def console_output(self, cpu: int, stream: str):
        """A callable ``sink(data)`` that shows guest output without logging it anywhere (the machine logs
        coalesced console bytes itself, at exits)."""
        return self.console_sink(cpu, stream)

    def flush(self) -> None:
        """Flush buffered console output."""

    def close_all(self) -> None:
        """Release every host resource held for the guest."""

    def cancel(self) -> None:
        """The VM is stopping: end any request that is waiting for the outside world (a READ of stdin)."""


class Console:
    """Line-buffered guest console on the host's stdout/stderr (as uhyve's Rust stdout)."""

    #: After :meth:`cancel`, how long output may still wait for a reader before it is dropped (s).
    CANCEL_GRACE_S = 2.0

    def __init__(self, out_fd: int | None = None, err_fd: int | None = None, quiet: bool = False) -> None:
        self._give_up_at: float | None = None  # monotonic deadline once cancelled
        self._out = _writer(sys.stdout, out_fd, self._gave_up)
        self._err = _writer(sys.stderr, err_fd, self._gave_up)
        self.quiet = quiet
        self._buf = bytearray()
        self._lock = threading.Lock()

    def write(self, stream: str, data: bytes) -> None:
        # Hot path (a UART byte per exit): append under the GIL, take the lock only to flush.
        if self.quiet:
            return
        if stream == "stderr":
            with self._lock:
                self._flush_locked()
                self._err(data)
            return
        if len(data) >= 8192:  # a big WRITE goes out as is: copying it into the line buffer doubles it
            with self._lock:
                self._flush_locked()
                self._out(data)
            return
        buf = self._buf
        buf += data
        if 10 in data or len(buf) >= 8192:
            self.flush()

    def _flush_locked(self) -> None:
        buf = self._buf
        if buf:
            data = bytes(buf)
            del buf[:len(data)]  # bytes appended meanwhile by another vCPU stay queued
            self._out(data)

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def cancel(self) -> None:
        """The VM is stopping: output still goes out, but a write to a pipe nobody reads waits at most
        CANCEL_GRACE_S more, then the rest is dropped (the vCPU thread must not hang on it)."""
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + self.CANCEL_GRACE_S

    def _gave_up(self) -> bool:
        return self._give_up_at is not None and time.monotonic() >= self._give_up_at


def _writer(stream, fd: int | None, gave_up=lambda: False):
    """Where console bytes go: ``fd`` when given, else the stream's file descriptor, else (a notebook kernel's
    stdout has none) the stream object itself, decoded as UTF-8 with replacement.  Pipes and sockets are
    written only when poll says they take data, so that ``gave_up()`` can end a wait for a reader."""
    if fd is None and stream is not None:
        try:
            fd = stream.fileno()
        except (OSError, ValueError):  # io.UnsupportedOperation is both
            fd = None
    if fd is not None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            return functools.partial(_write_all, fd)
        if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            return functools.partial(_write_polled, fd, gave_up)
        return functools.partial(_write_all, fd)
    if stream is None:
        return lambda data: None

    def write(data: bytes) -> None:
        try:
            stream.write(data.decode("utf-8", "replace"))
            stream.flush()
        except (OSError, ValueError):
            pass  # the stream went away: drop guest output, keep running

    return write


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except InterruptedError:
            continue
        except BlockingIOError:
            time.sleep(0.001)
            continue
        except OSError:
            return  # the host's stdout went away (closed pipe): drop guest output, keep running
        view = view[n:]


def _write_polled(fd: int, gave_up, data: bytes) -> None:
    """Write to a pipe or socket in PIPE_BUF pieces, each after poll() reports room, checking ``gave_up``
    while waiting: a blocking write to a full pipe could not be interrupted."""
    view = memoryview(data)
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    while view:
        try:
            ready = poller.poll(100)
        except InterruptedError:
            continue
        if not ready:
            if gave_up():
                return
            continue
        if ready[0][1] & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            return  # the reader went away: drop guest output, keep running
        try:
            n = os.write(fd, view[:select.PIPE_BUF])
        except InterruptedError:
            continue
        except BlockingIOError:
            continue
        except OSError:
            return
        view = view[n:]


class ConsoleBackend(HostIO):
    """Guest output to a :class:`Console` (``self.console_out``): shared by the live and replaying backends."""

    console_out: Console

    def console(self, cpu, stream, data):
        self.console_out.write(stream, data)  # "uart" shares stdout with fd 1, as under uhyve

    def console_sink(self, cpu, stream):
        return functools.partial(self.console_out.write, stream)

    def flush(self):
        self.console_out.flush()

    def cancel(self):
        self.console_out.cancel()


@dataclass
class OpenFile:
    host_fd: int
    path: str


class LiveHostIO(ConsoleBackend):
    """The real host: sandboxed files, stdio, wall clock and KVM's TSC frequency."""

    def __init__(self, sandbox: Sandbox, argv: list[bytes], env: list[bytes], console: Console,
                 tsc_khz: int = 0, max_files: int = MAX_GUEST_FILES, net=None) -> None:
        self.sandbox = sandbox
        self.net = net  # a netbackend.NetBackend when the VM has a network device
        self.argv = argv
        self.env = env
        self.console_out = console
        self.tsc_khz = tsc_khz
        self._tsc_origin_ns = time.monotonic_ns()  # the guest TSC counts from here (as KVM's starts near 0)
        self.max_files = max_files
        self.files: dict[int, OpenFile] = {}
        self.closed_stdio: set[int] = set()
        self._lock = threading.Lock()  # guards the fd table and every use of a host fd taken from it
        self._cancelled = threading.Event()
        self.log: list[str] = []  # failed file requests, for -v (the first MAX_LOG)
        self.refusals = 0  # failed file requests (a missing file included)
        self.policy_refusals = 0  # of those, refused by the sandbox's policy (reported even without -v)
        self.first_policy_refusal: str | None = None
        # Host operations on an open file that failed (or wrote only part): guest fd -> [path, count, bytes
        # not written, last error].  The first failure per fd is reported at once, the totals at the end.
        self.host_failures: dict[int, list] = {}
        self._last_error: dict[int, str] = {}  # per vCPU: the errno name of its last failed host operation
        self.warn = lambda msg: print(f"tracevisor: warning: {msg}", file=sys.stderr, flush=True)

    def _refuse(self, what: str, err: OSError | str) -> int:
        self.refusals += 1
        msg = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        if isinstance(err, str) or is_refusal(err):
            self.policy_refusals += 1
            if self.first_policy_refusal is None:
                self.first_policy_refusal = f"{what[:300]}: {msg}"
        if self.refusals <= MAX_LOG:
            self.log.append(f"{what[:300]}: {msg}")
        elif self.refusals == MAX_LOG + 1:
            self.log.append(f"… further refusals are counted, not listed (limit {MAX_LOG})")
        return -1

    def _alloc_fd(self) -> int | None:
        fd = 3
        while fd in self.files:
            fd += 1
        return fd if len(self.files) < self.max_files else None

    def open(self, cpu, path, flags, mode):
        with self._lock:
            if len(self.files) >= self.max_files:
                return self._refuse(f"open {path!r}", f"too many open files ({self.max_files})")
            try:
                host_fd, host_path = self.sandbox.open(path, flags, mode)
            except OSError as e:
                return self._refuse(f"open {path!r}", e)
            fd = self._alloc_fd()
            assert fd is not None
            self.files[fd] = OpenFile(host_fd, host_path)
            return fd

    def close(self, cpu, fd):
        with self._lock:
            f = self.files.pop(fd, None)
            if f is None:
                if fd in (STDIN, STDOUT, STDERR) and fd not in self.closed_stdio:
                    self.closed_stdio.add(fd)  # the guest's view only; the host's stdio stay open
                    return 0
                return -1
            try:
                os.close(f.host_fd)
            except OSError:
                return -1
            return 0

    def read(self, cpu, fd, length):
        length = min(length, MAX_IO_CHUNK)
        if fd == STDIN and fd not in self.closed_stdio:
            return self._read_stdin(length)
        # The lock is held across the host call: another vCPU's CLOSE (and a later OPEN reusing the host
        # fd number) cannot slip in between the table lookup and the read.
        with self._lock:
            f = self.files.get(fd)
            if f is None:
                return -1, b""
            try:
                data = os.read(f.host_fd, length)
            except OSError as e:
                self._host_failed(cpu, "READ", fd, f, e, -1)
                return -1, b""
        return len(data), data

    def _read_stdin(self, length):
        """The host's stdin may never deliver: wait in slices so that :meth:`cancel` can end the wait."""
        try:
            host_fd = sys.stdin.fileno() if sys.stdin else -1
        except (OSError, ValueError):
            host_fd = -1
        if host_fd < 0:
            return -1, b""
        poller = select.poll()
        poller.register(host_fd, select.POLLIN)
        while not poller.poll(100):
            if self._cancelled.is_set():
                return -1, b""
        try:
            data = os.read(host_fd, length)
        except OSError:
            return -1, b""
        return len(data), data

    def cancel(self):
        self._cancelled.set()
        super().cancel()

    def refusal_notes(self, verbose: bool) -> list[str]:
        """What to tell the user about failed file requests when the run ends: with ``verbose`` every one
        (up to MAX_LOG), else one line when the sandbox refused something (an escape attempt, a path no
        mount covers, a write to a read-only mount) — an ordinary missing file stays quiet."""
        failures = [f"{n} host operation{'s' if n != 1 else ''} on guest fd {fd} ({path}) failed"
                    + (f", {lost} bytes not written" if lost else "") + f" (last: {err})"
                    for fd, (path, n, lost, err) in sorted(self.host_failures.items())]
        if verbose:
            return [f"refused {line}" for line in self.log] + failures
        if not self.policy_refusals:
            return failures
        n = self.policy_refusals
        return [f"the sandbox refused {n} guest file request{'s' if n != 1 else ''} "
                f"(first: {self.first_policy_refusal}); -v lists every failed request"] + failures

    def write(self, cpu, fd, data):
        stream = console_stream(fd)
        if stream is not None and fd not in self.closed_stdio:
            self.console_out.write(stream, data)
            return len(data)
        with self._lock:
            f = self.files.get(fd)
            if f is None:
                return -1
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(f.host_fd, view):]
            except OSError as e:
                done = len(data) - len(view)
                ret = done if done else -1  # like write(2): what was written counts
                self._host_failed(cpu, "WRITE", fd, f, e, ret, lost=len(view),
                                  partial=f" after {done} of {len(data)} bytes" if done else "")
                return ret
        return len(data)

    def _host_failed(self, cpu: int, op: str, fd: int, f: OpenFile, e: OSError, ret: int, lost: int = 0,
                     partial: str = "") -> None:
        """A host operation on an open file failed (disk full, I/O error): report the first per fd at once,
        count the rest for :meth:`refusal_notes`, and remember the errno for the recording (call with the
        lock held)."""
        name = errno.errorcode.get(e.errno or 0, str(e.errno))
        self._last_error[cpu] = name
        entry = self.host_failures.get(fd)
        if entry is None or entry[0] != f.path:
            self.host_failures[fd] = [f.path, 1, lost, e.strerror or name]
            self.warn(f"{op} of guest fd {fd} ({f.path}) failed on the host{partial}: {e.strerror or name}; "
                      f"the guest got {ret}. Further failures on this fd are counted and reported at the end")
        else:
            entry[1] += 1
            entry[2] += lost
            entry[3] = e.strerror or name

    def take_error(self, cpu: int) -> str | None:
        """The errno name of ``cpu``'s last host operation if it failed on the host (once), for the trace."""
        return self._last_error.pop(cpu, None)

    def lseek(self, cpu, fd, offset, whence):
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END):
            return -1
        with self._lock:
            f = self.files.get(fd)
            if f is None:
                return -1
            try:
                return os.lseek(f.host_fd, offset, whence)
            except (OSError, OverflowError):
                return -1

    def unlink(self, cpu, path):
        try:
            self.sandbox.unlink(path)
            return 0
        except OSError as e:
            return self._refuse(f"unlink {path!r}", e)

    def cmdline(self, cpu):
        return list(self.argv), list(self.env)

    def boot_time_ns(self, cpu):
        return time.time_ns()

    def cpu_freq_khz(self, cpu):
        return (self.tsc_khz // 1000) * 1000  # whole MHz, as uhyve rounds

    def rdtsc(self, cpu):
        # KVM's guest TSC runs at tsc_khz from about 0 at VM creation: the same, from the host's monotonic
        # clock (shared by every vCPU, so the TSC is synchronised and never goes back).
        khz = self.tsc_khz or 1_000_000
        return (time.monotonic_ns() - self._tsc_origin_ns) * khz // 1_000_000

    def rdrand(self, cpu, bits, seed):
        return int.from_bytes(os.urandom(bits // 8), "little")

    def net_rx(self, cpu, poll):
        return self.net.recv() if self.net is not None else None

    def net_tx(self, cpu, frame):
        if self.net is not None:
            self.net.send(frame)

    def close_all(self):
        if self.net is not None:
            self.net.close()
        self.console_out.flush()
        with self._lock:
            for f in self.files.values():
                try:
                    os.close(f.host_fd)
                except OSError:
                    pass
            self.files.clear()
        self.sandbox.close()


class RecordingHostIO(HostIO):
    """Wraps a HostIO and logs each request and answer as a ``hostio`` event (console as ``console``)."""

    def __init__(self, inner: HostIO, writer, clock) -> None:
        self.inner = inner
        self.writer = writer
        self.clock = clock  # () -> ns since the trace's start
        self._uart: dict[int, tuple[int, bytearray]] = {}

    def _error(self, cpu: int) -> str | None:
        take = getattr(self.inner, "take_error", None)
        return take(cpu) if take is not None else None

    def _log(self, cpu: int, op: HostOp, args: tuple, ret, data: bytes | None = None,
             error: str | None = None) -> None:
        fields = {"op": op.name, "args": op.args(*args), "ret": ret}
        if data:
            fields["data"] = data
        if error:  # the host operation failed or was partial: counted in the trace (analysis, dump)
            fields["error"] = error
        self.writer.event("hostio", cpu, self.clock(), **fields)

    def _ask(self, op: HostOp, method, cpu: int, *args):
        """Ask the inner HostIO and log request and answer."""
        ret = method(cpu, *args)
        self._log(cpu, op, args, ret)
        return ret

    def open(self, cpu, path, flags, mode):
        return self._ask(OPEN, self.inner.open, cpu, path, flags, mode)

    def close(self, cpu, fd):
        return self._ask(CLOSE, self.inner.close, cpu, fd)

    def read(self, cpu, fd, length):
        ret, data = self.inner.read(cpu, fd, length)
        self._log(cpu, READ, (fd, length), ret, data, self._error(cpu))
        return ret, data

    def write(self, cpu, fd, data):
        ret = self.inner.write(cpu, fd, data)
        stream = console_stream(fd)
        if stream is not None and ret >= 0:  # not after the guest closed its fd 1/2: nothing was shown
            self._flush_uart(cpu)
            self.writer.event("console", cpu, self.clock(), stream=stream, data=bytes(data))
        self._log(cpu, WRITE, (fd, data), ret, error=self._error(cpu))
        return ret

    def lseek(self, cpu, fd, offset, whence):
        return self._ask(LSEEK, self.inner.lseek, cpu, fd, offset, whence)

    def unlink(self, cpu, path):
        return self._ask(UNLINK, self.inner.unlink, cpu, path)

    def cmdline(self, cpu):
        argv, env = self.inner.cmdline(cpu)
        self._log(cpu, CMDLINE, (), [list(argv), list(env)])
        return argv, env

    def boot_time_ns(self, cpu):
        return self._ask(BOOT_TIME, self.inner.boot_time_ns, cpu)

    def cpu_freq_khz(self, cpu):
        return self._ask(CPU_FREQ, self.inner.cpu_freq_khz, cpu)

    def rdtsc(self, cpu):
        return self._ask(RDTSC, self.inner.rdtsc, cpu)

    def rdrand(self, cpu, bits, seed):
        ret = self.inner.rdrand(cpu, bits, seed)
        self._log(cpu, RDSEED if seed else RDRAND, (bits,), ret)
        return ret

    def net_rx(self, cpu, poll):
        frame = self.inner.net_rx(cpu, poll)
        if frame is not None:  # delivery points without a frame are not logged (replay: no event = no frame)
            self._log(cpu, NET_RX, (poll,), len(frame), frame)
        return frame

    def net_tx(self, cpu, frame):
        self.inner.net_tx(cpu, frame)  # an output: the device's `net` event records the frame

    def console(self, cpu, stream, data):
        self.inner.console(cpu, stream, data)
        if stream != "uart":
            self.writer.event("console", cpu, self.clock(), stream=stream, data=bytes(data))
            return
        # UART output arrives a byte per exit: coalesce it into one event per line (or 4 KiB).
        entry = self._uart.get(cpu)
        if entry is None:
            entry = self._uart[cpu] = (self.clock(), bytearray())
        entry[1].extend(data)
        if b"\n" in data or len(entry[1]) >= UART_EVENT_MAX:
            self._flush_uart(cpu)

    def console_sink(self, cpu, stream):
        if stream != "uart":
            return super().console_sink(cpu, stream)
        inner = self.inner.console_sink(cpu, stream)
        pending = self._uart
        clock = self.clock

        def sink(data: bytes) -> None:
            inner(data)
            entry = pending.get(cpu)
            if entry is None:
                entry = pending[cpu] = (clock(), bytearray())
            buf = entry[1]
            buf += data
            if 10 in data or len(buf) >= UART_EVENT_MAX:
                self._flush_uart(cpu)

        return sink

    def uart_batch_sink(self, cpu):
        # Bytes of one native-loop batch: at most one newline, at its end, and no more than uart_room(cpu),
        # so the console events are cut exactly where the byte-at-a-time sink cuts them.
        inner = self.inner.console_sink(cpu, "uart")
        pending = self._uart

        def sink(data: bytes, t_ns: int) -> None:
            inner(data)
            entry = pending.get(cpu)
            if entry is None:
                entry = pending[cpu] = (t_ns, bytearray())
            buf = entry[1]
            buf += data
            if 10 in data or len(buf) >= UART_EVENT_MAX:
                self._flush_uart(cpu)

        return sink

    def uart_room(self, cpu: int) -> int:
        """UART bytes that fit in the pending console event of ``cpu`` before it is cut."""
        entry = self._uart.get(cpu)
        return UART_EVENT_MAX - (len(entry[1]) if entry else 0)

    def console_output(self, cpu, stream):
        return self.inner.console_sink(cpu, stream)

    def _flush_uart(self, cpu: int) -> None:
        entry = self._uart.pop(cpu, None)
        if entry and entry[1]:
            self.writer.event("console", cpu, entry[0], stream="uart", data=bytes(entry[1]))

    def flush(self):
        for cpu in list(self._uart):
            self._flush_uart(cpu)
        self.inner.flush()

    def close_all(self):
        self.flush()
        self.inner.close_all()

    def cancel(self):
        self.inner.cancel()


def host_errno_name(err: int) -> str:
    return errno.errorcode.get(err, str(err))
