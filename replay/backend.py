"""ReplayingHostIO: answers every guest request to the host from the recording.

No host file is opened, created or deleted, no network is touched and no clock reaches the guest: each
request is matched against the next ``hostio`` event of the same vCPU and answered with the recorded
result.  A request that differs (another operation, path, fd or length) is a divergence.
"""

from __future__ import annotations

from tracevisor.errors import Divergence
from tracevisor.hostio import Console, ConsoleBackend

from .streams import CpuStream


def _show(v):
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode("utf-8", "backslashreplace")
    if isinstance(v, list):
        return [_show(x) for x in v]
    return v


class ReplayingHostIO(ConsoleBackend):
    def __init__(self, path: str, cpus: int, console: Console) -> None:
        self.streams = {cpu: CpuStream(path, cpu, {"hostio"}) for cpu in range(cpus)}
        self.console_out = console
        self.answered = 0

    def request(self, cpu: int, op: str, args: list) -> dict:
        """The recorded answer to request ``op(args)`` of ``cpu`` (generic: new ops need no code here)."""
        ev = self.streams[cpu].next()
        if ev is None:
            raise Divergence(f"the guest asked the host for {op}{tuple(_show(args))} but the recording has no "
                             "further host request for this vCPU",
                             kind="hostio", actual={"op": op, "args": _show(args)}, expected=None)
        rec = ev[2]
        if rec.get("op") != op or list(rec.get("args", [])) != list(args):
            raise Divergence(
                f"host request differs: recorded {rec.get('op')}{tuple(_show(rec.get('args', [])))}, "
                f"replay asks {op}{tuple(_show(args))}",
                kind="hostio", seq=rec.get("seq"),
                expected={"op": rec.get("op"), "args": _show(rec.get("args"))},
                actual={"op": op, "args": _show(args)})
        self.answered += 1
        return rec

    def open(self, cpu, path, flags, mode):
        return self.request(cpu, "open", [bytes(path), flags, mode])["ret"]

    def close(self, cpu, fd):
        return self.request(cpu, "close", [fd])["ret"]

    def read(self, cpu, fd, length):
        rec = self.request(cpu, "read", [fd, length])
        data = rec.get("data", b"") or b""
        return rec["ret"], data

    def write(self, cpu, fd, data):
        ret = self.request(cpu, "write", [fd, len(data)])["ret"]
        if fd in (1, 2):
            self.console_out.write("stdout" if fd == 1 else "stderr", data)
        return ret

    def lseek(self, cpu, fd, offset, whence):
        return self.request(cpu, "lseek", [fd, offset, whence])["ret"]

    def unlink(self, cpu, path):
        return self.request(cpu, "unlink", [bytes(path)])["ret"]

    def cmdline(self, cpu):
        argv, env = self.request(cpu, "cmdline", [])["ret"]
        return [bytes(a) for a in argv], [bytes(e) for e in env]

    def boot_time_ns(self, cpu):
        return self.request(cpu, "boot_time", [])["ret"]

    def cpu_freq_khz(self, cpu):
        return self.request(cpu, "cpu_freq", [])["ret"]

    def net_rx(self, cpu, poll):
        """The frame recorded at delivery point ``poll``, if any.  Only delivery points that got a frame were
        recorded, so "no net_rx event for this poll next" means "nothing arrived here"."""
        ev = self.streams[cpu].peek()
        if ev is None or ev[2].get("op") != "net_rx":
            return None
        rec = ev[2]
        at = (list(rec.get("args") or []) or [None])[0]
        if at != poll:
            if isinstance(at, int) and at < poll:
                raise Divergence(f"the recording delivered a received frame at device poll {at}, but the replay "
                                 f"is already at poll {poll} without having taken it",
                                 kind="hostio", seq=rec.get("seq"), expected={"op": "net_rx", "args": [at]},
                                 actual={"op": "net_rx", "args": [poll]})
            return None
        self.streams[cpu].next()
        self.answered += 1
        return bytes(rec.get("data") or b"")

    def net_tx(self, cpu, frame):
        pass  # replay touches no network; the checker compares the `net` events instead

    def close_all(self):
        self.console_out.flush()

    def save(self) -> dict:
        return {"consumed": {c: s.consumed for c, s in self.streams.items()}, "answered": self.answered}

    def load(self, path: str, st: dict) -> None:
        self.answered = st["answered"]
        for c, n in st["consumed"].items():
            self.streams[c] = CpuStream.at(path, c, {"hostio"}, n)

    def leftover(self) -> dict[int, int]:
        """Recorded host requests never asked for, per vCPU."""
        return {cpu: len(s.rest()) for cpu, s in self.streams.items()}
