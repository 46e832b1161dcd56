"""`make gpu-check` without CUDA: the same code path runs a tiny CPU dry run, writes its JSON/Markdown and
exits 0 — so CI checks the wiring of the command that a GPU holder will run once."""
from __future__ import annotations

import json

import pytest
import torch

from faig_fast.apps import gpu_check


def test_dry_run_exercises_every_part(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rng = torch.get_rng_state()
    assert gpu_check.main(["--out-dir", str(tmp_path)]) == 0
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's global RNG is untouched
    [path] = list(tmp_path.glob("gpu-cpu-dry-run-*.json"))
    doc = json.loads(path.read_text())
    assert path.with_suffix(".md").read_text().startswith("# gpu-check on")
    cfg = gpu_check.dry_run_config()
    rows = doc["rows"]
    for method, steps in cfg.rules:
        rule = [r for r in rows if r["rule"] == f"{method}/{steps}" and r["case"] != "strategy"]
        assert {(r["case"], r["precision"]) for r in rule} == {("engine", p) for p in cfg.precisions} | {
            ("naive", "fp32"), ("engine", "fp64")}
        for r in rule:
            assert r["seconds"] > 0 and "skipped" not in r and "error" not in r, r
        fp32 = next(r for r in rule if r["case"] == "engine" and r["precision"] == "fp32")
        # fp32 and fp64 of the same integral agree on the top-1% set of this tiny pair
        assert fp32["jaccard_top1_vs_fp64"] == pytest.approx(1.0)
        assert fp32["speedup_vs_naive"] > 0
        rl = fp32["roofline"]
        assert rl["flops"] > 0 and rl["min_dram_bytes"] > 0 and 0 < rl["fraction_of_peak_flops"] < 1
    assert doc["training"]["it_per_s"] > 0
    assert doc["tests"] == {"skipped": "dry run: no tests"}
    assert doc["peaks"]["fp32"]["peak_tflop_s"] > 0


def test_budget_skips_and_records(tmp_path, monkeypatch):
    """A job whose estimate does not fit is recorded as skipped, never dropped."""
    cfg = gpu_check.dry_run_config()
    run = gpu_check.Runner(cfg, (None, None, "none"), gpu_check.Budget(10.0), {})
    run.rate["naive"] = 100.0  # seconds per TFLOP
    assert run.job({"case": "naive"}, 1.0, "naive", lambda: pytest.fail("ran over budget")) is None
    assert run.rows[-1]["skipped"].startswith("over budget (estimate 100 s")
    out = run.job({"case": "x"}, 1e-3, "other", lambda: 42, scale=10.0)
    assert out["result"] == 42 and "extrapolated" in run.rows[-1]
    assert run.job({"case": "y"}, 1e-3, "boom", lambda: 1 / 0) is None
    assert run.rows[-1]["error"].startswith("ZeroDivisionError")
