"""The native run loop: loading the C extension ``tracevisor._fastloop`` and driving one vCPU with it.

Why a C loop at all: on nested KVM each guest entry/exit flushes branch predictors and instruction caches, so
the interpreter's work between two ``KVM_RUN`` calls costs several times what it costs in a tight loop; a
pure-Python loop cannot get below ~1.2× a raw C loop.  The extension runs ``KVM_RUN`` itself and handles the
commonest exit, a one-byte OUT to the UART (console byte + exit row appended to the trace writer's chunk,
or compared with the recorded row in replay), returning to Python only for every other exit, a complete
console line, a full chunk, an interruption (EINTR) or an exit budget.  Python keeps every decision.

Where it comes from, in order: ``TRACEVISOR_PURE_PYTHON=1`` forces the pure-Python loop; the module built by
setup.py at install; otherwise (a source checkout) it is compiled once into the build cache with the system C
compiler.  When none works, one line on stderr says why and the pure-Python loop runs: same traces, slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

from .kvm import uapi as U

SOURCE = Path(__file__).resolve().parent / "_fastloop.c"
ABI = 2  # bumped with every incompatible change of the extension's interface

_lock = threading.Lock()
_state: dict = {}  # "module": the loaded module or None, "why": the reason it is None


def _zlib_available(cc: str) -> bool:
    include = Path("/usr/include/zlib.h")
    return include.is_file() and bool(shutil.which(cc.split()[0]))


def source_sha(source: Path = SOURCE) -> str:
    """The build tag of a _fastloop.c: "h" and 16 hex digits of its SHA-256 (setup.py computes the same)."""
    return "h" + hashlib.sha256(source.read_bytes()).hexdigest()[:16]


def _compile(out: Path) -> None:
    """Compile SOURCE into the extension module ``out`` (raises OSError/CalledProcessError on failure)."""
    cc = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    cc_argv = cc.split()
    if shutil.which(cc_argv[0]) is None:
        raise OSError(f"no C compiler ({cc_argv[0]} not found)")
    include = sysconfig.get_paths()["include"]
    if not (Path(include) / "Python.h").is_file():
        raise OSError(f"Python.h not found in {include} (install the Python development headers)")
    base = [*cc_argv, "-shared", "-fPIC", "-O2", "-std=gnu11", f"-I{include}", f"-DTV_SOURCE_SHA={source_sha()}",
            str(SOURCE), "-o"]
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so")
    os.close(fd)
    try:
        attempts = [["-DTV_HAVE_ZLIB", "-lz"], []] if _zlib_available(cc) else [[]]
        err = ""
        for extra in attempts:
            # -l must follow the source file
            r = subprocess.run(base + [tmp] + extra, capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp, out)
                return
            err = (r.stderr.strip().splitlines() or ["failed"])[-1]
        raise OSError(f"compiling {SOURCE.name} failed: {err}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _cache_path() -> Path:
    from .guestbuild import cache_root

    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    key = hashlib.sha256(SOURCE.read_bytes() + sys.version.encode() + suffix.encode()).hexdigest()[:16]
    return cache_root() / "native" / key / f"_fastloop{suffix}"


def _load_file(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("tracevisor._fastloop", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _check(module: ModuleType) -> ModuleType:
    """The extension's layout constants must be the ones uapi.py describes (a stale build must not run)."""
    expected = {"ABI": ABI, "KVM_RUN": U.KVM_RUN, "OFF_EXIT_REASON": U.kvm_run.exit_reason.offset,
                "OFF_REGS": U.kvm_run.s.offset, "IO_DATA_OFFSET": 4096,
                "OFF_IO": U.kvm_run.exit.offset}
    if SOURCE.is_file():  # a build of another version of the source (a stale in-place build) must not run
        expected["SOURCE_SHA"] = source_sha()
    for name, value in expected.items():
        if getattr(module, name, None) != value:
            raise ImportError(f"{module.__file__} is stale or foreign ({name} = {getattr(module, name, None)}, "
                              f"expected {value})")
    return module


def _find() -> ModuleType:
    try:
        from . import _fastloop  # type: ignore[attr-defined]  # built by setup.py

        return _check(_fastloop)
    except ImportError:
        pass
    if not SOURCE.is_file():
        raise ImportError("the extension was not built at install and its source is not shipped")
    path = _cache_path()
    if not path.is_file():
        _compile(path)
    return _check(_load_file(path))


def load(log=None) -> ModuleType | None:
    """The extension module, or None (pure-Python loop).  The first call that finds it unavailable logs one
    line saying why, unless ``TRACEVISOR_PURE_PYTHON=1`` asked for the pure-Python loop."""
    if os.environ.get("TRACEVISOR_PURE_PYTHON") == "1":
        return None
    module = extension()
    with _lock:
        why = _state["why"]
        tell = module is None and not _state.get("told")  # say why once
        _state["told"] = True
    if tell:
        line = (f"native run loop unavailable ({why}); using the pure-Python loop "
                "(same traces, higher cost per exit)")
        if log is not None:
            log(line)
        else:
            print(f"tracevisor: {line}", file=sys.stderr, flush=True)
    return module


def extension() -> ModuleType | None:
    """The extension for what is not the run loop (the instruction fallback's block counter): loaded whatever
    ``TRACEVISOR_PURE_PYTHON`` says; None, without a message, when it cannot be (the run loop's :func:`load`
    says why)."""
    with _lock:
        if "module" not in _state:
            try:
                _state["module"], _state["why"] = _find(), ""
            except Exception as e:
                _state["module"], _state["why"] = None, str(e) or type(e).__name__
        return _state["module"]


def unavailable_reason() -> str | None:
    """Why the last :func:`load` returned None ("" when it did not; None before any load)."""
    if os.environ.get("TRACEVISOR_PURE_PYTHON") == "1":
        return "TRACEVISOR_PURE_PYTHON=1"
    return _state.get("why")


# ------------------------------------------------------------------------------------------------------
# The vCPU loop on the extension.  This is the one place the run loop meets the C code: it reads the same
# VcpuRunner/VcpuState fields as VcpuRunner.loop (the pure-Python loop) and hands every exit it does not
# handle to the runner's ExitDispatcher, decoded the same way.
# ------------------------------------------------------------------------------------------------------

def vcpu_loop(runner: Any, v: Any, ext: ModuleType) -> None:
    """Run vCPU ``v`` (a runloop.VcpuState) of ``runner`` (a runloop.VcpuRunner, which passes itself) on the
    native loop until it stops (returns) or raises like the pure-Python loop (VmStop, GuestExit, ...).
    This module does not import runloop: the runner hands over what the loop needs."""
    from . import hypercalls

    decode = runner.decode
    from .trace.schema import EXIT_ROW_SIZE

    vc = v.vcpu
    mm = vc.run_mmap
    run = vc.run
    cpu = v.cpu
    d = runner.dispatcher
    sink = d.sink
    ring = bool(runner.ring_offset)
    mode, rows, call = ext.MODE_NONE, None, None
    window = getattr(sink, "native_window", None)
    stream_of = getattr(sink, "native_stream", None)
    if sink is None:
        pass
    elif window is not None and window() is not None:
        mode, rows = ext.MODE_ROWS, window()[0]  # a single-threaded trace writer: rows appended in place
    elif stream_of is not None:
        mode = ext.MODE_CHECK  # the replay checker: recorded rows compared in C
    else:
        mode, call = ext.MODE_CALL, sink.exit  # any other sink (a writer shared by vCPUs): called per exit
    loop = ext.Loop(vc.fd, ctypes.addressof(run), len(mm), cpu, d.clock.t0, uart_port=hypercalls.UART_PORT,
                    mode=mode, rows=rows, call=call, row_size=EXIT_ROW_SIZE, ring_offset=runner.ring_offset,
                    con_limit=UART_BATCH_MAX)
    commit = sink.native_commit if mode == ext.MODE_ROWS else None
    batch = v.uart_batch
    room = v.uart_room
    budget_of = runner.exit_budget
    every = d.mem_every  # periodic memory hashes: the C loop returns after the countdown's last exit
    periodic = d.mem_check if every else None
    if periodic is not None and not v.mem_countdown:
        v.mem_countdown = every
    dispatch = d.dispatch
    MODE_ROWS, MODE_CHECK = ext.MODE_ROWS, ext.MODE_CHECK
    uart_port = hypercalls.UART_PORT
    off = lim = i = 0
    items = None
    st = None
    while True:
        fast = True
        if mode == MODE_ROWS:
            _, off, lim = window()
        elif mode == MODE_CHECK:
            st = stream_of(cpu)
            if st is None:
                fast = False  # callbacks, pauses or checkpoints: every exit goes through the checker
            else:
                items, i = st.items, st.i
        climit = room(cpu) if room is not None else 0
        budget = budget_of(v) if budget_of is not None else 0
        if periodic is not None:
            budget = v.mem_countdown if not budget else min(budget, v.mem_countdown)
        status, handled, off2, i2, con, con_t, ex = loop.run(budget, fast, off, lim, items, i, climit)
        if handled or status == 0:
            v.spin_since = None  # the vCPU made exits: not a spin without exits (see the watchdog)
        # Order matters: the rows of the UART exits first, then their console bytes (a line's console
        # event follows its last exit row), then the exit Python handles.
        if handled and fast:
            if commit is not None:
                commit(off2)
            elif st is not None:
                st.i = i2
        if con is not None:
            if ring:
                runner.ring_collect(v, con, con_t)
            else:
                batch(con, con_t)
        if periodic is not None and handled:
            _count_exits(v, handled, every, periodic)
        if status == 1:
            continue
        if status == 0:
            reason, direction, size, port, count, data_offset, rip, data, digest = ex
            if ring:
                if reason == 2 and direction and port == uart_port and count == 1:  # the ring was full
                    runner.ring_collect(v, (data & 0xFFFF_FFFF).to_bytes(4, "little")[:size], d.clock.now())
                    continue
                runner.ring_flush(v)
            dispatch(v, decode(run, mm, reason, rip))
            if periodic is not None:
                _count_exits(v, 1, every, periodic)
        elif status == 2:
            if runner.interrupted(v):
                return
        else:
            runner.kvm_run_failed(v, ex)


def _count_exits(v: Any, n: int, every: int, periodic) -> None:
    """``n`` more exits of ``v``: hash memory when its countdown runs out (the budget stops the C loop there)."""
    left = v.mem_countdown - n
    if left <= 0:
        left = every
        v.mem_countdown = left
        periodic(v, "every")
    v.mem_countdown = left


#: Console bytes gathered in C before they go to Python (RecordingHostIO cuts UART console events here too).
UART_BATCH_MAX = 4096
