"""`faig bench` and its roofline: counted FLOPs, the minimum DRAM traffic, device peaks, fractions."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from faig_fast.apps import bench, roofline


def test_workload_counts_of_one_conv_are_exact():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    lq, gt = torch.rand(3, 8, 8), torch.rand(4, 8, 8)
    c = roofline.workload_counts(conv, lq, gt)
    macs = 4 * 3 * 9 * 64
    assert c["flops"] == 2 * macs * 2  # forward + weight gradient (the input needs none)
    assert c["param_bytes"] == (4 * 3 * 9 + 4) * 4
    assert c["io_bytes"] == (3 + 4) * 64 * 4
    # saved for backward: the conv input (the weight is a parameter) and out - gt for the square
    assert c["saved_activation_bytes"] == (3 + 4) * 64 * 4
    assert c["min_dram_bytes"] == 2 * c["saved_activation_bytes"] + 3 * c["param_bytes"] + c["io_bytes"]
    assert all(p.grad is None for p in conv.parameters())


def test_roofline_fractions():
    r = roofline.roofline(2e12, 1e9, 2.0, {"peak_tflop_s": 10.0, "peak_tb_s": 1.0})
    assert r["achieved_tflop_s"] == pytest.approx(1.0) and r["fraction_of_peak_flops"] == pytest.approx(0.1)
    assert r["achieved_gb_s"] == pytest.approx(0.5) and r["fraction_of_peak_bw"] == pytest.approx(5e-4)
    assert r["roofline_bound_s"] == pytest.approx(0.2) and r["fraction_of_roofline"] == pytest.approx(0.1)


@pytest.mark.parametrize("name, precision, tflops, tb_s", [
    ("NVIDIA H100 80GB HBM3", "tf32", 494.7, 3.35), ("NVIDIA H100 PCIe", "bf16", 756.0, 2.0),
    ("NVIDIA H200", "fp32", 67.0, 4.8), ("NVIDIA A100-SXM4-40GB", "tf32", 156.0, 1.555),
    ("NVIDIA A100 80GB PCIe", "bf16", 312.0, 1.935)])
def test_gpu_peak_table(monkeypatch, name, precision, tflops, tb_s):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    p = roofline.device_peaks(torch.device("cuda"), precision, measure=False)
    assert (p["peak_tflop_s"], p["peak_tb_s"]) == (tflops, tb_s) and name in p["source"]


def test_cpu_peak_is_positive_and_measured():
    p = roofline.device_peaks(torch.device("cpu"), "fp32")
    assert p["peak_tflop_s"] >= p["gemm_tflop_s"] > 0 and p["peak_tb_s"] > 0


def test_random_pair_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b, desc = bench._pair("srcnn_style", "paper")
    assert torch.equal(torch.get_rng_state(), state)
    a2, _, _ = bench._pair("srcnn_style", "paper")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), a2.state_dict().values()))
    assert "random-init" in desc


def test_bench_command_writes_roofline(tmp_path, capsys, monkeypatch):
    from faig_fast.apps.cli import main

    monkeypatch.setenv("FAIG_FAST_NO_EXT", "1")  # the case processes must not build the extension here
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--size", "8", "--images", "2", "--steps", "2", "--cases", "naive",
                 "loop", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    loop = next(r for r in doc["results"] if r["case"] == "loop")
    rl = loop["roofline"]
    assert 0 < rl["fraction_of_peak_flops"] < 1 and rl["min_dram_bytes"] > 0 and loop["speedup_vs_naive"] > 0
    assert doc["peaks"]["fp32"]["peak_tflop_s"] > 0
    assert "| loop |" in capsys.readouterr().out
