"""`make gpu-check` without CUDA: the same code path runs a tiny CPU dry run, writes its JSON/Markdown and
exits 0 — so CI checks the wiring of the command that a GPU holder will run once; and the Makefile target picks
the python to run it with (fake pythons that log their arguments: fast and offline)."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

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


def test_check_runs_the_cuda_tests_with_the_graph_replay_test():
    """``make gpu-check`` runs tests/test_cuda.py, which holds the persample CUDA-graph replay test."""
    cfg = gpu_check.CheckConfig()
    assert "tests/test_cuda.py" in cfg.tests
    tree = ast.parse((gpu_check.REPO / "tests" / "test_cuda.py").read_text())
    names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert "test_persample_cuda_graph_replay_matches_fp64_reference" in names


# ------------------------------------------------------------------------ the Makefile target
FAKE_PY = """#!/bin/sh
echo "{name} $*" >> "{log}"
{body}
"""


def _fake(path: Path, name: str, log: Path, body: str = "exit 0") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(FAKE_PY.format(name=name, log=log, body=body))
    path.chmod(0o755)
    return path


def _make(tmp_path: Path, torch_ok: bool, *flags: str) -> tuple[list[str], str]:
    """Run the real ``make gpu-check`` with fake pythons that only log their arguments: ``GPU_PY`` (with
    or without torch), ``python3`` on PATH (creates a fake venv on ``-m venv``) and the venv's python."""
    log = tmp_path / "calls.log"
    log.write_text("")
    venv_py = _fake(tmp_path / "proto" / "python", "venv-python", log)
    make_venv = f'if [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; cp "{venv_py}" "$3/bin/python"; fi'
    _fake(tmp_path / "bin" / "python3", "python3", log, make_venv)
    no_torch = 'case "$*" in *"import torch"*) exit 1;; esac; exit 1'
    gpu_py = _fake(tmp_path / "gpu" / "python", "gpu-python", log, "exit 0" if torch_ok else no_torch)
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(gpu_check.REPO), *flags, "gpu-check",
                           f"GPU_PY={gpu_py}", f"VENV={tmp_path / 'venv'}"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return log.read_text().splitlines(), proc.stdout


needs_make = pytest.mark.skipif(shutil.which("make") is None or shutil.which("sh") is None,
                                reason="needs GNU make and sh to run the Makefile target")


@needs_make
def test_make_gpu_check_without_torch_falls_back_to_the_venv(tmp_path):
    """python3 without torch: create and install .venv as `make install` does, run the check there."""
    calls, out = _make(tmp_path, torch_ok=False)
    venv = tmp_path / "venv"
    assert calls[0] == 'gpu-python -c import torch'
    assert [c for c in calls if c.startswith("gpu-python")] == [calls[0]]  # never pip-installed into
    assert f"python3 -m venv {venv}" in calls
    assert "venv-python -m pip install -q -e .[test]" in calls
    assert calls[-1] == "venv-python -m faig_fast.apps.gpu_check"
    assert (venv / ".faig-installed").exists() and "cannot import torch" in out


@needs_make
def test_make_gpu_check_with_torch_stays_offline_and_venv_free(tmp_path):
    """python3 with torch (a CUDA machine): no venv, no dependency download, the check on that python."""
    calls, _ = _make(tmp_path, torch_ok=True)
    assert calls == ["gpu-python -c import torch",
                     "gpu-python -m pip install -q -e . --no-deps --no-build-isolation",
                     "gpu-python -m faig_fast.apps.gpu_check"]
    assert not (tmp_path / "venv").exists()


@needs_make
def test_make_n_gpu_check_shows_the_branch_and_runs_nothing(tmp_path):
    """`make -n gpu-check` runs only the torch probe and prints the commands of the branch it would take."""
    calls, out = _make(tmp_path, False, "-n")
    assert calls == ["gpu-python -c import torch"]
    assert f"{tmp_path / 'venv'}/bin/python -m faig_fast.apps.gpu_check" in out
    assert not (tmp_path / "venv").exists()
