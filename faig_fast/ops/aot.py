"""Ahead-of-time checks of the GPU code, on any machine (no GPU needed).

* Every Triton kernel in ``kernels/`` is compiled with ``triton.compile`` for a ``GPUTarget`` (sm_80,
  sm_90, ...) with the specialisations its module lists in ``aot_variants()`` and every autotune
  config the autotuner keeps for each (``aot_configs()`` when the module prunes, else all); registers, shared memory and local memory (spills) are read from the cubin with
  ``cuobjdump -res-usage`` (shipped with Triton).  A compile error or a spill is a failure.
* The CUDA C++ kernels in ``csrc/filter_reduce_cuda.cu`` are compiled with ``nvcc -arch=sm_XX -c``
  against torch's headers (``nvcc -Xptxas -v`` gives registers and spills).  CPU-only torch wheels ship
  the CUDA headers but not the generated ``c10/cuda/impl/cuda_cmake_macros.h``; a one-line stand-in
  is put on the include path for this compile-only check.

``faig info --kernels sm_80,sm_90`` prints :func:`report_table` of :func:`compile_report`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Sequence

from faig_fast.errors import FAIGError, InvalidInputError

__all__ = ["KernelCheckError", "KernelReport", "parse_archs", "compile_report", "check_kernels", "report_table",
           "nvcc_path", "nvcc_compile", "TRITON_KERNEL_MODULES"]

TRITON_KERNEL_MODULES = ("faig_fast.kernels.filter_reduce", "faig_fast.kernels.linear_path")
_RES_RE = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


class KernelCheckError(FAIGError):
    """A GPU kernel failed to compile ahead of time, or spills registers to local memory."""


@dataclasses.dataclass
class KernelReport:
    """One compiled (kernel, specialisation, autotune config, architecture)."""

    kernel: str
    variant: str
    config: str
    arch: str
    num_warps: int = 0
    registers: int | None = None
    shared_bytes: int | None = None  # dynamic shared memory the launch requests (Triton's metadata)
    static_shared_bytes: int | None = None
    local_bytes: int | None = None  # per-thread local memory (stack frame + spills)
    seconds: float = 0.0
    error: str | None = None

    @property
    def spills(self) -> bool:
        return bool(self.local_bytes)

    @property
    def ok(self) -> bool:
        return self.error is None and not self.spills


def parse_archs(archs: str | Iterable[str]) -> list[int]:
    """``"sm_80,sm_90"`` (or ``["80", "sm90"]``) as compute capabilities ``[80, 90]``."""
    items = archs.split(",") if isinstance(archs, str) else list(archs)
    out = []
    for a in items:
        m = re.fullmatch(r"(?:sm_?)?(\d{2,3})", str(a).strip().lower())
        if not m:
            raise InvalidInputError(f"not a CUDA architecture: {a!r}; write e.g. sm_80,sm_90")
        out.append(int(m.group(1)))
    if not out:
        raise InvalidInputError("no CUDA architecture given; write e.g. sm_80,sm_90")
    return out


def _resource_usage(cubin: bytes) -> dict[str, dict[str, int]]:
    """Per-function REG/STACK/SHARED/LOCAL of a cubin, via Triton's bundled ``cuobjdump -res-usage``."""
    from triton import knobs

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        proc = subprocess.run([knobs.nvidia.cuobjdump.path, "-res-usage", str(path)], capture_output=True,
                              text=True, check=True)
    return {m.group(1): {"reg": int(m.group(2)), "stack": int(m.group(3)), "shared": int(m.group(4)),
                         "local": int(m.group(5))} for m in _RES_RE.finditer(proc.stdout)}


def _jit_function(kernel):
    """A compilable ``JITFunction`` even when TRITON_INTERPRET=1 made ``triton.jit`` return an interpreted one."""
    from triton.runtime.jit import JITFunction

    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def _compile_one(fn, module: str, variant: tuple[str, dict, dict], config, arch: int) -> KernelReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, sig, const = variant
    const = {**const, **config.kwargs}
    cfg = ",".join(f"{k}={v}" for k, v in config.kwargs.items()) + f",warps={config.num_warps}"
    if getattr(config, "maxnreg", None) is not None:
        cfg += f",maxnreg={config.maxnreg}"
    row = KernelReport(kernel=f"{module.rsplit('.', 1)[-1]}:{fn.__name__}", variant=label, config=cfg,
                       arch=f"sm_{arch}", num_warps=config.num_warps)
    t0 = time.perf_counter()
    try:
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        if getattr(config, "maxnreg", None) is not None:  # as the autotuner launches it (ptx .maxnreg)
            options["maxnreg"] = config.maxnreg
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        use = _resource_usage(k.asm["cubin"]).get(k.metadata.name) or {}
        row.registers, row.static_shared_bytes = use.get("reg"), use.get("shared")
        row.local_bytes = use.get("local", 0) + use.get("stack", 0)
        row.shared_bytes = int(k.metadata.shared)
    except Exception as exc:  # noqa: BLE001 - every compile failure is reported, not raised here
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
    row.seconds = time.perf_counter() - t0
    return row


def compile_report(archs: str | Iterable[str] = "sm_80,sm_90", *, full: bool = False,
                   modules: Sequence[str] = TRITON_KERNEL_MODULES) -> list[KernelReport]:
    """Compile every Triton kernel × specialisation × autotune config for each architecture.

    Needs triton (no GPU).  Failures are reported in the rows (``error``, ``spills``), never raised;
    :func:`check_kernels` raises on them.  Under TRITON_INTERPRET=1 triton's own library functions
    (``tl.sum``, ...) are interpreter objects that cannot be compiled, so the compiles then run in a
    child process without it.
    """
    caps = parse_archs(archs)
    from faig_fast.kernels._interpret import interpret_enabled

    if interpret_enabled():
        return _compile_in_child(caps, full, modules)
    return _compile_here(caps, full, modules)


def _compile_in_child(caps: list[int], full: bool, modules: Sequence[str]) -> list[KernelReport]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    arg = json.dumps({"caps": caps, "full": full, "modules": list(modules)})
    proc = subprocess.run([sys.executable, "-m", "faig_fast.ops.aot", arg], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise KernelCheckError(f"the kernel compile process failed: {proc.stderr.strip()[-800:]}")
    return [KernelReport(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _compile_here(caps: list[int], full: bool, modules: Sequence[str]) -> list[KernelReport]:
    import importlib
    import warnings

    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for name in modules:
            mod = importlib.import_module(name)
            for variant in mod.aot_variants(full):
                configs = mod.aot_configs(variant[2]) if hasattr(mod, "aot_configs") else mod.AUTOTUNE_CONFIGS
                for config in configs:
                    for cap in caps:
                        rows.append(_compile_one(_jit_function(mod.AOT_KERNEL), name, variant, config, cap))
    return rows


def check_kernels(archs: str | Iterable[str] = "sm_80,sm_90", *, full: bool = False) -> list[KernelReport]:
    """:func:`compile_report`, raising :class:`KernelCheckError` on any compile error or register spill."""
    rows = compile_report(archs, full=full)
    bad = [r for r in rows if not r.ok]
    if bad:
        lines = [f"{r.kernel} [{r.variant}; {r.config}] {r.arch}: "
                 f"{r.error or f'spills ({r.local_bytes} bytes of local memory per thread)'}" for r in bad[:10]]
        raise KernelCheckError(f"{len(bad)} of {len(rows)} kernel compiles failed:\n" + "\n".join(lines))
    return rows


def report_table(rows: Sequence[KernelReport]) -> str:
    """A Markdown table: one line per compile, with registers, shared and local memory."""
    head = ["| kernel | variant | config | arch | regs | smem (B) | local (B) | s | status |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    body = [f"| {r.kernel} | {r.variant} | {r.config} | {r.arch} | {r.registers} | {r.shared_bytes} | "
            f"{r.local_bytes} | {r.seconds:.2f} | {'ok' if r.ok else (r.error or 'SPILLS')} |" for r in rows]
    return "\n".join(head + body)


# --------------------------------------------------------------------------- the CUDA C++ kernels

def nvcc_path() -> str | None:
    """``nvcc`` on PATH, else under ``$CUDA_HOME``/``/usr/local/cuda``; None when there is none."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


_PTXAS_RE = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'.*?"
                       r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                       r"Used (\d+) registers", re.S)


def _nvcc_command(nvcc: str, arch: int, shim: Path, out: Path) -> list[str]:
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    from faig_fast.ops.extension import csrc_dir

    incs = [str(shim), *include_paths(), sysconfig.get_paths()["include"]]
    return [nvcc, f"-arch=sm_{arch}", "-c", "-std=c++20", "-O3", "-DWITH_CUDA", "-Xcompiler", "-fPIC",
            "-Xptxas", "-v", *(f"-I{i}" for i in incs), "-o", str(out), str(csrc_dir() / "filter_reduce_cuda.cu")]


def _nvcc_cache_file(nvcc: str, arch: int) -> Path:
    """Cache of a successful compile report, keyed by the source, torch, the nvcc binary and the arch."""
    import torch

    from faig_fast.ops.extension import csrc_dir

    h = hashlib.sha256((csrc_dir() / "filter_reduce_cuda.cu").read_bytes())
    h.update(f"{torch.__version__}|{nvcc}|{os.path.getmtime(nvcc)}|{arch}|{sys.version_info[:2]}".encode())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "faig_fast" / "nvcc-check"
    return base / f"sm{arch}-{h.hexdigest()[:16]}.json"


def nvcc_compile(arch: str | int = "sm_90", *, use_cache: bool = True) -> dict:
    """Compile ``csrc/filter_reduce_cuda.cu`` for one architecture with nvcc (no GPU needed).

    Returns ``{"arch", "seconds", "kernels": [{"name", "registers", "spill_stores", "spill_loads",
    "stack_bytes"}], "cached"}``; raises :class:`KernelCheckError` when nvcc fails or a kernel spills,
    :class:`FAIGError` when there is no nvcc.  A successful report is cached (the compile takes ~40 s).
    """
    cap = parse_archs([str(arch)])[0]
    nvcc = nvcc_path()
    if nvcc is None:
        raise FAIGError("nvcc not found (not on PATH, nor in $CUDA_HOME/bin or /usr/local/cuda/bin)")
    cache = _nvcc_cache_file(nvcc, cap)
    if use_cache and cache.is_file():
        return {**json.loads(cache.read_text()), "cached": True}
    with tempfile.TemporaryDirectory() as tmp:
        shim = Path(tmp) / "shim"
        (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
        (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text(
            "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        t0 = time.perf_counter()
        proc = subprocess.run(_nvcc_command(nvcc, cap, shim, Path(tmp) / "k.o"), capture_output=True, text=True)
        seconds = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        errors = [ln for ln in log.splitlines() if "error" in ln.lower()][:8]
        raise KernelCheckError(f"nvcc -arch=sm_{cap} failed on filter_reduce_cuda.cu:\n" + "\n".join(errors or
                               log.splitlines()[-8:]))
    kernels = [{"name": m.group(1), "registers": int(m.group(6)), "stack_bytes": int(m.group(3)),
                "spill_stores": int(m.group(4)), "spill_loads": int(m.group(5))} for m in _PTXAS_RE.finditer(log)]
    if not kernels:
        raise KernelCheckError(f"nvcc -arch=sm_{cap} printed no ptxas report; cannot check registers")
    spilling = [k["name"] for k in kernels if k["spill_stores"] or k["spill_loads"]]
    if spilling:
        raise KernelCheckError(f"{len(spilling)} CUDA kernels spill registers on sm_{cap}: {spilling[:3]}")
    doc = {"arch": f"sm_{cap}", "seconds": seconds, "kernels": kernels}
    cache.parent.mkdir(parents=True, exist_ok=True)
    from faig_fast.utils.io import atomic_write_json

    atomic_write_json(cache, doc)
    return {**doc, "cached": False}


if __name__ == "__main__":  # the child process of compile_report under TRITON_INTERPRET=1
    _args = json.loads(sys.argv[1])
    print(json.dumps([dataclasses.asdict(r) for r in _compile_here(_args["caps"], _args["full"], _args["modules"])]))
