"""Build and load of the optional C++/CUDA extension ``faig_fast_ext``.

The sources in ``csrc/`` are compiled with ``torch.utils.cpp_extension.load`` (ninja) into a
per-torch-version cache folder, never at install time and never on the hot path: backend ``auto``
only *loads* an extension that is already built (:func:`load_extension` with ``build=False``), so a
fresh install's first ``attribute()`` does not wait ~30 s for a compiler.  ``faig info --build`` (or
``make ext``, or asking for ``backend="cpp"``/``"cuda"`` explicitly) builds it.  Any build failure
(no compiler, no ninja, a broken toolkit) is recorded, reported once as a warning, and the caller
falls back to PyTorch.  Set ``FAIG_FAST_NO_EXT=1`` to skip the extension, ``FAIG_FAST_EXT_DIR`` to
move the build cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

_LOG = logging.getLogger(__name__)
_NAME = "faig_fast_ext"
_CPP = "filter_reduce.cpp"
_CU = "filter_reduce_cuda.cu"

_lock = threading.RLock()
_module: Optional[ModuleType] = None
_reason: Optional[str] = None  # why the extension is unavailable; None while not tried or when loaded
_tried = False
_warned = False
_build_dir: Optional[Path] = None
_build_seconds: Optional[float] = None


class ExtensionUnavailableWarning(RuntimeWarning):
    """The C++/CUDA extension could not be used; faig_fast runs its PyTorch fallback instead."""


def csrc_dir() -> Path:
    """The folder holding the C++/CUDA sources (repository checkout first, then package data)."""
    package = Path(__file__).resolve().parents[1]
    for cand in (package.parent / "csrc", package / "csrc"):
        if (cand / _CPP).is_file():
            return cand
    return package.parent / "csrc"


def disabled() -> bool:
    """Whether ``FAIG_FAST_NO_EXT`` asks to skip the extension."""
    return os.environ.get("FAIG_FAST_NO_EXT", "").strip().lower() in {"1", "true", "yes", "on"}


def _cuda_toolkit() -> tuple[bool, str]:
    """Whether the CUDA kernels can be compiled: a CUDA torch plus a toolkit with nvcc."""
    if not torch.version.cuda:
        return False, "torch is a CPU-only build"
    from torch.utils.cpp_extension import CUDA_HOME

    if not CUDA_HOME:
        return False, "CUDA_HOME not found"
    nvcc = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    if not nvcc.exists():
        return False, f"nvcc not found in {CUDA_HOME}/bin"
    return True, ""


def build_directory(with_cuda: bool) -> Path:
    """Cache folder for one (torch version, python, sources, cuda?) combination."""
    h = hashlib.sha256()
    h.update(f"{torch.__version__}|{sys.implementation.cache_tag}|cuda={with_cuda}|{torch.version.cuda}".encode())
    srcs = [_CPP, _CU] if with_cuda else [_CPP]
    for name in srcs:
        h.update((csrc_dir() / name).read_bytes())
    root = os.environ.get("FAIG_FAST_EXT_DIR")
    if root:
        base = Path(root).expanduser()
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "faig_fast"
    tag = torch.__version__.replace("+", "_")
    return base / f"ext-{tag}-{'cuda' if with_cuda else 'cpu'}-{h.hexdigest()[:12]}"


def built_module_path() -> Optional[Path]:
    """The compiled module of these sources and this torch, if a previous build left one (CUDA build first)."""
    suffix = ".pyd" if os.name == "nt" else ".so"  # what torch.utils.cpp_extension.load writes
    kinds = [True, False] if _cuda_toolkit()[0] else [False]
    for with_cuda in kinds:
        try:
            path = build_directory(with_cuda) / f"{_NAME}{suffix}"
        except OSError:  # sources missing
            return None
        if path.is_file():
            return path
    return None


def _import_built(path: Path) -> ModuleType:
    """Import an already compiled module file (no ninja, no compiler)."""
    spec = importlib.util.spec_from_file_location(_NAME, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules.setdefault(_NAME, mod)
    return mod


def _compile(with_cuda: bool) -> ModuleType:
    from torch.utils.cpp_extension import load

    src = csrc_dir()
    build = build_directory(with_cuda)
    build.mkdir(parents=True, exist_ok=True)
    if os.name == "nt":
        cflags, ldflags = ["/O2", "/openmp"], []
    else:
        cflags, ldflags = ["-O3", "-fopenmp"], ["-fopenmp"]
    sources = [str(src / _CPP)]
    cuda_flags: list[str] = []
    if with_cuda:
        sources.append(str(src / _CU))
        cflags.append("-DWITH_CUDA")
        cuda_flags = ["-O3", "-DWITH_CUDA"]
    global _build_dir
    _build_dir = build
    return load(name=_NAME, sources=sources, extra_cflags=cflags, extra_cuda_cflags=cuda_flags or None,
                extra_ldflags=ldflags, build_directory=str(build), with_cuda=with_cuda, verbose=False)


def _precheck() -> Optional[str]:
    from torch.utils.cpp_extension import is_ninja_available

    if not (csrc_dir() / _CPP).is_file():
        return f"sources not found in {csrc_dir()}"
    if not is_ninja_available():
        return "ninja is not installed"
    cxx = os.environ.get("CXX", "cl" if os.name == "nt" else "c++")
    if shutil.which(cxx.split()[0]) is None:
        return f"no C++ compiler ({cxx!r} not on PATH)"
    return None


def _short(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    tail = " | ".join(lines[-6:]) if lines else ""
    return f"{type(exc).__name__}: {tail}"[:1500]


def _warn_once(reason: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"faig_fast C++ extension unavailable ({reason}); using the PyTorch fallback.",
                      ExtensionUnavailableWarning, stacklevel=4)


def _load_prebuilt() -> None:
    """Load a module a previous build left on disk, if any; never compiles."""
    global _module, _tried, _build_dir, _build_seconds
    path = built_module_path()
    if path is None:
        return
    t0 = time.perf_counter()
    try:
        _module = _import_built(path)
    except Exception as exc:  # noqa: BLE001 - a stale or broken file: leave it to an explicit build
        _LOG.warning("could not load the built %s (%s); run `faig info --build`", path, _short(exc))
        return
    _tried, _build_dir, _build_seconds = True, path.parent, time.perf_counter() - t0


def load_extension(warn: bool = True, build: bool = True) -> Optional[ModuleType]:
    """The compiled module; ``None`` (with one warning) if unavailable.

    ``build=True`` compiles it on first call when no build is on disk (tens of seconds);
    ``build=False`` only loads a build that already exists and returns ``None`` otherwise, silently
    (what backend ``auto`` does, so that no call ever waits for a compiler).
    """
    global _module, _reason, _tried, _build_seconds
    if disabled():
        if warn:
            _warn_once("disabled by FAIG_FAST_NO_EXT=1")
        return None
    with _lock:
        if not _tried:
            _load_prebuilt()
        if not _tried and not build:
            return None
        if not _tried:
            _tried = True
            _reason = _precheck()
            if _reason is None:
                cuda_ok, cuda_why = _cuda_toolkit()
                t0 = time.perf_counter()
                _LOG.info("building %s (first use; cached afterwards)", _NAME)
                try:
                    _module = _compile(cuda_ok)
                except Exception as exc:  # noqa: BLE001 - any build failure means "fall back"
                    _reason = _short(exc)
                    if cuda_ok:  # a broken CUDA toolchain should not also cost the CPU kernels
                        try:
                            _module = _compile(False)
                            _reason = None
                            _LOG.warning("faig_fast_ext built without CUDA: %s", _short(exc))
                        except Exception as exc2:  # noqa: BLE001
                            _reason = _short(exc2)
                _build_seconds = time.perf_counter() - t0
                if _module is None:
                    _LOG.debug("faig_fast_ext unavailable: %s (cuda: %s)", _reason, cuda_why or "ok")
        if _module is None and warn:
            _warn_once(_reason or "unknown reason")
        return _module


def build_extension() -> Optional[ModuleType]:
    """Build (or load) the extension now, e.g. from ``faig info --build``; ``None`` if it cannot be built."""
    return load_extension(warn=False, build=True)


def has_cuda_kernels() -> bool:
    """Whether the loaded extension includes the CUDA kernels (does not trigger a build)."""
    return _module is not None and bool(_module.has_cuda())


def extension_status() -> str:
    """One line saying whether the extension is loaded, not yet built, disabled or unavailable (and why)."""
    if disabled():
        return "disabled (FAIG_FAST_NO_EXT=1)"
    if not _tried:
        if built_module_path() is not None:
            return "built, not loaded yet (loaded on first use)"
        return "not built (PyTorch is used; build it with `faig info --build`)"
    if _module is None:
        return f"unavailable: {_reason}"
    kinds = "cpu+cuda" if _module.has_cuda() else "cpu"
    omp = "openmp" if _module.has_openmp() else "no openmp"
    took = f", load took {_build_seconds:.1f}s" if _build_seconds is not None else ""
    return f"loaded ({kinds}, {omp}) from {_build_dir}{took}"


def unavailable_reason() -> Optional[str]:
    """Why the extension cannot be used, or ``None`` if it is loaded or has not been tried yet."""
    if disabled():
        return "disabled by FAIG_FAST_NO_EXT=1"
    return _reason if _tried and _module is None else None


def _reset() -> None:
    """Forget the cached result and the warn-once flag (tests only; a loaded module stays imported)."""
    global _module, _reason, _tried, _warned, _build_dir, _build_seconds
    with _lock:
        _module, _reason, _tried, _warned, _build_dir, _build_seconds = None, None, False, False, None, None
