"""Resumable runs (a real SIGKILL midway) and torchrun sharding over 2 gloo processes."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faig_fast.core.attribution import Attribution
from faig_fast.data import DegradedImageDataset
from faig_fast.errors import InvalidInputError
from conftest import registry_pair
from faig_fast.models import save_model
from faig_fast.apps.runs import attribute_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workdir(tmp_path):
    a, b = registry_pair("msrresnet")
    save_model(a, tmp_path / "a.safetensors")
    save_model(b, tmp_path / "b.safetensors")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 20 + 2 * i, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return tmp_path


def _cli(workdir: Path, out: str, *extra: str, steps: int = 60) -> list[str]:
    return ["-m", "faig_fast", "attribute", "--baseline", str(workdir / "a.safetensors"),
            "--target", str(workdir / "b.safetensors"), "--data", str(workdir / "imgs"), "--steps", str(steps),
            "--out", str(workdir / out), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_killed_run_resumes_to_identical_result(workdir):
    straight = subprocess.run([sys.executable, *_cli(workdir, "straight.safetensors")], env=_env(),
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    rdir = workdir / "resume"
    proc = subprocess.Popen([sys.executable, *_cli(workdir, "resumed.safetensors", "--resume-dir", str(rdir))],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(rdir.glob("item*.safetensors"))) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in rdir.glob("item*.safetensors")}
    assert 2 <= len(done) < 8, "the kill should land midway through the 8 items"
    again = subprocess.run([sys.executable, *_cli(workdir, "resumed.safetensors", "--resume-dir", str(rdir))],
                           env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for name, mtime in done.items():
        assert (rdir / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    x, y = Attribution.load(workdir / "straight.safetensors"), Attribution.load(workdir / "resumed.safetensors")
    assert x.counts == y.counts
    for label in x.labels:
        assert torch.equal(x.sums[label], y.sums[label])


def test_resume_dir_rejects_other_settings(workdir):
    from faig_fast.models import load_model

    a, b = load_model(workdir / "a.safetensors"), load_model(workdir / "b.safetensors")
    ds = DegradedImageDataset(workdir / "imgs", ("blur",), seed=0)
    attribute_dataset(a, b, ds, steps=2, resume_dir=workdir / "r")
    with pytest.raises(InvalidInputError, match="other settings"):
        attribute_dataset(a, b, ds, steps=3, resume_dir=workdir / "r")


def test_torchrun_two_gloo_processes_match_single(workdir):
    single = subprocess.run([sys.executable, *_cli(workdir, "single.safetensors", steps=8)], env=_env(),
                            capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            *_cli(workdir, "multi.safetensors", steps=8)], env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    x, y = Attribution.load(workdir / "single.safetensors"), Attribution.load(workdir / "multi.safetensors")
    assert x.counts == y.counts
    for label in x.labels:
        torch.testing.assert_close(x.sums[label], y.sums[label], rtol=1e-12, atol=0)
        assert torch.equal(x.ranking(label), y.ranking(label))
    assert sorted(x.image_names) == sorted(y.image_names)
