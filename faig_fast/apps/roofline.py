"""Roofline of a FAIG workload: counted FLOPs, a minimum DRAM traffic, the device's peaks, fractions.

*FLOPs* are counted by ``torch.utils.flop_counter`` on one forward+backward of L = Σ(F(x) − gt)² per
image and node (the useful work of the paper's Eq. 6), whatever the strategy does on top.

*Minimum DRAM bytes* (a documented lower bound for an implementation that runs the network layer by
layer, as every strategy here does): per image and node, every tensor autograd saves for the backward
pass is written once and read back once (2×), every parameter is read once and its gradient
accumulator read and written once (3×), and the LR input and the GT are read once.  Nothing is
assumed to stay in cache between kernels; cross-layer fusion could go below it, no strategy here does.

*Peaks*: GPUs from the vendors' datasheets (dense, no sparsity) in :data:`GPU_PEAKS`; CPUs from
``/proc/cpuinfo`` as cores × SIMD lanes × 2 FMA units × 2 FLOP × clock (2 FMA units per core is an
assumption, stated in the output), next to a measured GEMM (``torch.mm``) and a measured copy bandwidth.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch
from torch import nn

from faig_fast.utils.device import sync

__all__ = ["GPU_PEAKS", "workload_counts", "device_peaks", "roofline", "cpu_theoretical_peak"]

# name pattern -> dense TFLOP/s per precision and HBM TB/s (NVIDIA datasheets; tensor-core rates for tf32/bf16).
GPU_PEAKS: list[tuple[str, dict[str, float]]] = [
    (r"H200.*NVL", {"fp64": 30.0, "fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "tb_s": 4.8}),
    (r"H200", {"fp64": 34.0, "fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tb_s": 4.8}),
    (r"H100.*NVL", {"fp64": 30.0, "fp32": 60.0, "tf32": 417.5, "bf16": 835.5, "tb_s": 3.9}),
    (r"H100.*PCIe", {"fp64": 26.0, "fp32": 51.2, "tf32": 378.0, "bf16": 756.0, "tb_s": 2.0}),
    (r"H100", {"fp64": 34.0, "fp32": 67.0, "tf32": 494.7, "bf16": 989.4, "tb_s": 3.35}),
    (r"A100.*(PCIE|PCIe).*40GB|A100.*40GB.*(PCIE|PCIe)", {"fp64": 9.7, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0,
                                                          "tb_s": 1.555}),
    (r"A100.*(PCIE|PCIe)", {"fp64": 9.7, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "tb_s": 1.935}),
    (r"A100.*40GB", {"fp64": 9.7, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "tb_s": 1.555}),
    (r"A100", {"fp64": 9.7, "fp32": 19.5, "tf32": 156.0, "bf16": 312.0, "tb_s": 2.039}),
]


def _autocast(device: torch.device, precision: str):
    import contextlib

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def workload_counts(model: nn.Module, lq: torch.Tensor, gt: torch.Tensor, precision: str = "fp32") -> dict:
    """FLOPs and minimum DRAM bytes of one forward+backward of one image (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return t

    with FlopCounterMode(display=False) as counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(lq.device, precision):
            loss = ((model(lq[None]).float() - gt[None]) ** 2).sum()
        loss.backward()
    model.zero_grad(set_to_none=True)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    act = sum(saved.values())
    io = lq.numel() * lq.element_size() + gt.numel() * gt.element_size()
    return {"flops": int(counter.get_total_flops()), "saved_activation_bytes": act, "param_bytes": pbytes,
            "io_bytes": io, "min_dram_bytes": 2 * act + 3 * pbytes + io}


def _cpu_flags_and_clock() -> tuple[set[str], float | None]:
    flags, mhz = set(), None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags, mhz
    m = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    if m:
        flags = set(m.group(1).split())
    try:
        mhz = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        m = re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)
        mhz = float(m.group(1)) if m else None
    return flags, mhz


def cpu_theoretical_peak() -> dict:
    """cores × fp32 SIMD lanes × 2 FMA units × 2 FLOP × clock, per precision (TFLOP/s), with its inputs."""
    flags, mhz = _cpu_flags_and_clock()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags or "fma" in flags) else 4
    if mhz is None:
        return {"cores": cores, "fp32_lanes": lanes, "clock_mhz": None}
    fp32 = cores * lanes * 2 * 2 * mhz * 1e6 / 1e12
    # VDPBF16PS does two bf16 products per fp32 lane; without it bf16 math runs on the fp32 FMAs.
    # AMX is not modelled: the measured GEMM replaces the peak when it is higher.
    bf16 = 2 * fp32 if "avx512_bf16" in flags else fp32
    return {"cores": cores, "fp32_lanes": lanes, "fma_units_assumed": 2, "clock_mhz": mhz,
            "fp32": fp32, "tf32": fp32, "fp64": fp32 / 2, "bf16": bf16}


def _measure_gemm(device: torch.device, dtype: torch.dtype, max_n: int = 1536, reps: int = 3,
                  target_s: float = 0.02) -> float:
    """Best TFLOP/s of ``torch.mm`` on n×n matrices; n doubles from 256 until one product takes
    ``target_s`` (so a slow dtype, e.g. bf16 emulated on an AVX2 CPU, costs milliseconds, not a minute)."""
    g = torch.Generator(device=device).manual_seed(0)
    n, best = 256, float("inf")
    while True:
        a = torch.randn(n, n, device=device, generator=g).to(dtype)
        b = torch.randn(n, n, device=device, generator=g).to(dtype)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
        if best >= target_s or 2 * n > max_n:
            return 2 * n ** 3 / best / 1e12
        n *= 2


def _measure_copy(device: torch.device, mbytes: int = 256, reps: int = 3) -> float:
    """Best copy bandwidth in TB/s (read + write counted)."""
    src = torch.empty(mbytes * 2 ** 20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e12


def device_peaks(device: torch.device, precision: str = "fp32", measure: bool = True) -> dict:
    """The peak FLOP rate and DRAM bandwidth the fractions are taken against, and where they come from."""
    device = torch.device(device)
    out: dict = {"precision": precision}
    dtype = torch.bfloat16 if precision == "bf16" else torch.float64 if precision == "fp64" else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = next((v for pat, v in GPU_PEAKS if re.search(pat, name)), None)
        if table is not None:
            out.update(peak_tflop_s=table[precision], peak_tb_s=table["tb_s"], source=f"datasheet ({name})")
    else:
        theo = cpu_theoretical_peak()
        out["cpu"] = theo
        if theo.get(precision):
            out.update(peak_tflop_s=theo[precision], source="cores x lanes x 2 FMA x 2 x clock (/proc/cpuinfo)")
    if measure:
        out["gemm_tflop_s"] = _measure_gemm(device, dtype, 8192 if device.type == "cuda" else 1536)
        out["copy_tb_s"] = _measure_copy(device, 1024 if device.type == "cuda" else 256)
    if measure and out.get("peak_tflop_s", 0) < out["gemm_tflop_s"]:  # no table entry, or a wrong assumption
        out.update(peak_tflop_s=out["gemm_tflop_s"], source="measured torch.mm")
    if "peak_tb_s" not in out and measure:
        out.update(peak_tb_s=out["copy_tb_s"])
    return out


def roofline(flops: float, dram_bytes: float, seconds: float, peaks: dict) -> dict:
    """Achieved rates and their fractions of the peaks; the roofline bound max(F/peak, Q/bandwidth)."""
    out = {"flops": flops, "min_dram_bytes": dram_bytes, "achieved_tflop_s": flops / seconds / 1e12,
           "achieved_gb_s": dram_bytes / seconds / 1e9}
    pf, pb = peaks.get("peak_tflop_s"), peaks.get("peak_tb_s")
    if pf:
        out["fraction_of_peak_flops"] = out["achieved_tflop_s"] / pf
    if pb:
        out["fraction_of_peak_bw"] = out["achieved_gb_s"] / (pb * 1e3)
    if pf and pb:
        out["roofline_bound_s"] = max(flops / (pf * 1e12), dram_bytes / (pb * 1e12))
        out["fraction_of_roofline"] = out["roofline_bound_s"] / seconds
    return out
