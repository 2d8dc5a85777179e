"""ReplayingHostIO: answers every guest request to the host from the recording.

No host file is opened, created or deleted, no network is touched and no clock reaches the guest: each
request is matched against the next ``hostio`` event of the same vCPU and answered with the recorded
result.  A request that differs (another operation, path, fd or length) is a divergence.
"""

from __future__ import annotations

from tracevisor.errors import Divergence
from tracevisor.hostio import (
    BOOT_TIME,
    CLOSE,
    CMDLINE,
    CPU_FREQ,
    LSEEK,
    NET_RX,
    OPEN,
    RDRAND,
    RDSEED,
    RDTSC,
    READ,
    UNLINK,
    WRITE,
    Console,
    ConsoleBackend,
    HostOp,
    console_stream,
)

from .streams import CpuStream


def _args(v) -> str:
    return str(tuple(_show(v))) if isinstance(v, (list, tuple)) else f"({_show(v)!r})"


def _show(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "backslashreplace")
    if isinstance(v, list):
        return [_show(x) for x in v]
    return v


class ReplayingHostIO(ConsoleBackend):
    """Guest output through WRITE is held until the checker has compared the hypercall that made it
    (:meth:`release`): a replay never prints, as guest output, bytes it has not verified."""

    def __init__(self, path: str, cpus: int, console: Console) -> None:
        self.streams = {cpu: CpuStream(path, cpu, {"hostio"}) for cpu in range(cpus)}
        self.console_out = console
        self.answered = 0
        self.held: dict[int, list[tuple[str, bytes]]] = {}  # per vCPU: output of a hypercall not yet compared
        #: Called with the vCPU when its recorded host requests run out in a recording that ends at an
        #: arbitrary point (set by the Replayer; it raises, ending that vCPU's part of the replay).
        self.at_end = None

    def release(self, cpu: int) -> None:
        """The hypercall of ``cpu`` matched the recording: its output is verified, print it."""
        held = self.held.pop(cpu, None)
        if held:
            for stream, data in held:
                self.console_out.write(stream, data)

    def unverified_output(self) -> bytes:
        """Output held back because the replay diverged before it was verified."""
        return b"".join(data for held in self.held.values() for _stream, data in held)

    def request(self, cpu: int, op: str, args: list) -> dict:
        """The recorded answer to request ``op(args)`` of ``cpu`` (generic: new ops need no code here)."""
        ev = self.streams[cpu].next()
        if ev is None and self.at_end is not None:
            self.at_end(cpu)
        if ev is None:
            raise Divergence(f"the guest asked the host for {op}{tuple(_show(args))} but the recording has no "
                             "further host request for this vCPU",
                             kind="hostio", actual={"op": op, "args": _show(args)}, expected=None)
        rec = ev[2]
        rec_args = rec.get("args", [])
        if rec.get("op") != op or not isinstance(rec_args, (list, tuple)) or list(rec_args) != list(args):
            raise Divergence(
                f"host request differs: recorded {_show(rec.get('op'))}{_args(rec.get('args', []))}, "
                f"replay asks {op}{tuple(_show(args))}",
                kind="hostio", seq=rec.get("seq"),
                expected={"op": rec.get("op"), "args": _show(rec.get("args"))},
                actual={"op": op, "args": _show(args)})
        self.answered += 1
        return rec

    @staticmethod
    def _malformed(rec: dict, what: str) -> Divergence:
        """A recorded answer the guest cannot be given (a damaged or crafted trace)."""
        return Divergence(f"the recorded answer to {rec.get('op')} is malformed: {what}", kind="hostio",
                          seq=rec.get("seq"), expected={"op": rec.get("op"), "ret": _show(rec.get("ret"))},
                          actual=None)

    def _ret(self, cpu: int, op: HostOp, *args) -> tuple[int, dict]:
        """The recorded integer result of ``op(*args)``, checked against what the guest's field can hold."""
        rec = self.request(cpu, op.name, op.args(*args))
        ret = rec.get("ret")
        lo, hi = op.ret
        if type(ret) is not int or not lo <= ret <= hi:
            raise self._malformed(rec, f"result {ret!r:.60} is not an integer in [{lo}, {hi}]")
        return ret, rec

    def open(self, cpu, path, flags, mode):
        return self._ret(cpu, OPEN, path, flags, mode)[0]

    def close(self, cpu, fd):
        return self._ret(cpu, CLOSE, fd)[0]

    def read(self, cpu, fd, length):
        ret, rec = self._ret(cpu, READ, fd, length)
        data = rec.get("data", b"") or b""
        if not isinstance(data, (bytes, bytearray)):
            raise self._malformed(rec, f"data is {type(data).__name__}, not bytes")
        if ret > length or (ret >= 0 and len(data) != ret):
            raise self._malformed(rec, f"{ret} bytes read with {len(data)} bytes of data for a read of {length}")
        return ret, bytes(data)

    def write(self, cpu, fd, data):
        ret = self._ret(cpu, WRITE, fd, data)[0]
        stream = console_stream(fd)
        if stream is not None and ret >= 0:  # as recorded: nothing was shown after the guest closed fd 1/2
            self.held.setdefault(cpu, []).append((stream, bytes(data)))  # printed once its hypercall matched
        return ret

    def lseek(self, cpu, fd, offset, whence):
        return self._ret(cpu, LSEEK, fd, offset, whence)[0]

    def unlink(self, cpu, path):
        return self._ret(cpu, UNLINK, path)[0]

    def cmdline(self, cpu):
        rec = self.request(cpu, CMDLINE.name, CMDLINE.args())
        ret = rec.get("ret")
        if (not isinstance(ret, (list, tuple)) or len(ret) != 2
                or not all(isinstance(part, (list, tuple)) for part in ret)
                or not all(isinstance(s, (bytes, bytearray)) for part in ret for s in part)):
            raise self._malformed(rec, "the command line is not two lists of byte strings (argv, env)")
        argv, env = ret
        return [bytes(a) for a in argv], [bytes(e) for e in env]

    def boot_time_ns(self, cpu):
        return self._ret(cpu, BOOT_TIME)[0]

    def cpu_freq_khz(self, cpu):
        return self._ret(cpu, CPU_FREQ)[0]

    def rdtsc(self, cpu):
        return self._ret(cpu, RDTSC)[0]

    def rdrand(self, cpu, bits, seed):
        ret, rec = self._ret(cpu, RDSEED if seed else RDRAND, bits)
        if ret >> bits:
            raise self._malformed(rec, f"{ret:#x} does not fit in {bits} bits")
        return ret

    def net_rx(self, cpu, poll):
        """The frame recorded at delivery point ``poll``, if any.  Only delivery points that got a frame were
        recorded, so "no net_rx event for this poll next" means "nothing arrived here"."""
        ev = self.streams[cpu].peek()
        if ev is None or ev[2].get("op") != NET_RX.name:
            return None
        rec = ev[2]
        at = (list(rec.get("args") or []) or [None])[0]
        if at != poll:
            if isinstance(at, int) and at < poll:
                raise Divergence(f"the recording delivered a received frame at device poll {at}, but the replay "
                                 f"is already at poll {poll} without having taken it",
                                 kind="hostio", seq=rec.get("seq"), expected={"op": NET_RX.name, "args": [at]},
                                 actual={"op": NET_RX.name, "args": [poll]})
            return None
        self.streams[cpu].next()
        self.answered += 1
        data = rec.get("data") or b""
        if not isinstance(data, (bytes, bytearray)):
            raise self._malformed(rec, f"the received frame is {type(data).__name__}, not bytes")
        return bytes(data)

    def net_tx(self, cpu, frame):
        pass  # replay touches no network; the checker compares the `net` events instead

    def close_all(self):
        self.console_out.flush()

    def save(self) -> dict:
        return {"consumed": {c: s.consumed for c, s in self.streams.items()}, "answered": self.answered}

    def load(self, path: str, st: dict) -> None:
        self.answered = st["answered"]
        self.held.clear()
        for c, n in st["consumed"].items():
            self.streams[c] = CpuStream.at(path, c, {"hostio"}, n)

    def leftover(self) -> dict[int, int]:
        """Recorded host requests never asked for, per vCPU."""
        return {cpu: len(s.rest()) for cpu, s in self.streams.items()}
