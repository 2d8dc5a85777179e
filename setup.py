"""Build hook: ship the guest SDK sources and prebuilt example guests inside the package.

Metadata lives in pyproject.toml.  This file only extends ``build_py`` so that a wheel contains

* ``tracevisor/_guest_src/`` - a copy of ``guests/`` (SDK, examples, README), so an installed
  tracevisor can build guests without the source checkout, and
* ``tracevisor/_guests/<name>`` - the example guests, compiled at build time with
  ``tracevisor/guestbuild.py`` when gcc is available.  Without gcc the wheel ships the sources only
  and ``tracevisor.guestbuild.example()`` builds a guest on first use.

guestbuild.py is stdlib-only and is loaded from the source tree by path, because the package is not
installed while it is being built.  The sdist command adds guests/ to source distributions.

It also builds ``tracevisor._fastloop``, the native run loop (tracevisor/_fastloop.c), linked with zlib when
its header is there.  The extension is optional: without a C compiler the package still installs and the
pure-Python loop runs (tracevisor/fastloop.py says so in one line at first use).
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent
GUESTS = HERE / "guests"
GUEST_SOURCE_SUFFIXES = {".c", ".h", ".S", ".s", ".ld", ".md", ".txt"}
GUEST_SOURCE_NAMES = {"Makefile"}
GUEST_SOURCE_DIRS = ("sdk", "examples")


def load_guestbuild() -> ModuleType:
    """Import tracevisor/guestbuild.py from the source tree without importing the package."""
    name = "_tracevisor_setup_guestbuild"
    spec = importlib.util.spec_from_file_location(name, HERE / "tracevisor" / "guestbuild.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load tracevisor/guestbuild.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up while the class body runs
    spec.loader.exec_module(module)
    return module


def guest_source_files() -> list[Path]:
    """The files of guests/ that make up the SDK and the examples (no build products)."""
    files = [GUESTS / "README.md"] if (GUESTS / "README.md").is_file() else []
    for sub in GUEST_SOURCE_DIRS:
        root = GUESTS / sub
        if root.is_dir():
            files += sorted(
                p for p in root.rglob("*")
                if p.is_file() and (p.suffix in GUEST_SOURCE_SUFFIXES or p.name in GUEST_SOURCE_NAMES)
            )
    return files


class BuildPyWithGuests(build_py):
    """build_py that also packages the guest sources and (if possible) prebuilt example guests."""

    def run(self) -> None:
        super().run()
        self._guest_outputs: list[str] = []
        if getattr(self, "editable_mode", False):
            return  # an editable install uses the checkout's guests/ directly
        self._copy_guest_sources()
        self._build_guests()

    def _copy_guest_sources(self) -> None:
        dest_root = Path(self.build_lib) / "tracevisor" / "_guest_src"
        if dest_root.exists():
            shutil.rmtree(dest_root)
        for src in guest_source_files():
            dest = dest_root / src.relative_to(GUESTS)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
            self._guest_outputs.append(str(dest))

    def _build_guests(self) -> None:
        dest = Path(self.build_lib) / "tracevisor" / "_guests"
        if dest.exists():
            shutil.rmtree(dest)
        if shutil.which("gcc") is None:
            warnings.warn("gcc not found: shipping the guest sources only; "
                          "the example guests will be built on first use", stacklevel=2)
            return
        guestbuild = load_guestbuild()
        try:
            built = guestbuild.build(outdir=dest)
        except guestbuild.TracevisorError as exc:
            warnings.warn(f"example guests not prebuilt ({exc}); they will be built on first use", stacklevel=2)
            shutil.rmtree(dest, ignore_errors=True)
            return
        for path in built.values():
            self._guest_outputs.append(str(path))
        print(f"prebuilt {len(built)} example guests into {dest}")

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return list(super().get_outputs(include_bytecode)) + list(getattr(self, "_guest_outputs", []))


class SdistWithGuests(sdist):
    """sdist that also carries guests/ (the SDK and examples), so a wheel built from it has them."""

    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        for src in guest_source_files():
            dest = Path(base_dir) / src.relative_to(HERE)
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest)


def fastloop_extension() -> Extension:
    """The native run loop; CRC-32 from zlib when its header is present, else the module's own table."""
    zlib = any(Path(d, "zlib.h").is_file() for d in ("/usr/include", "/usr/local/include"))
    # the build tag tracevisor/fastloop.py checks against the shipped source (source_sha there)
    sha = "h" + hashlib.sha256((HERE / "tracevisor" / "_fastloop.c").read_bytes()).hexdigest()[:16]
    return Extension(
        "tracevisor._fastloop", ["tracevisor/_fastloop.c"],
        define_macros=[("TV_SOURCE_SHA", sha)] + ([("TV_HAVE_ZLIB", "1")] if zlib else []),
        libraries=["z"] if zlib else [],
        extra_compile_args=["-O2", "-std=gnu11"],
        optional=True,  # a failed build is a warning: the pure-Python loop still runs
    )


class OptionalBuildExt(build_ext):
    """build_ext that never fails the install (no compiler at all included)."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils raises its own error types for a missing compiler
            warnings.warn(f"native run loop not built ({exc}); tracevisor will use the pure-Python loop",
                          stacklevel=2)


setup(
    ext_modules=[fastloop_extension()],
    cmdclass={"build_py": BuildPyWithGuests, "build_ext": OptionalBuildExt, "sdist": SdistWithGuests},
    package_data={"tracevisor": ["_guests/*", "_guest_src/*", "_guest_src/*/*", "_fastloop.c"]},
)
