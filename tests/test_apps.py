"""The `train` and `demo` commands end to end through the CLI, on tiny sizes."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from faig_fast.apps.cli import main
from faig_fast.core.attribution import Attribution, top_count
from faig_fast.models import load_model, read_metadata


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        base = rng.random((9, 10, 3))
        img = np.kron(base, np.ones((8, 8, 1))) * 0.8 + 0.2 * rng.random((72, 80, 3))
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"p{i}.png")
    return folder


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_train_command_trains_a_pair_and_resumes(photos, tmp_path, capsys, monkeypatch):
    from faig_fast.apps.train import PRESETS

    monkeypatch.setitem(PRESETS, "unit", dict(PRESETS["tiny"], batch_size=2, patch_size=32,
                                             model_kwargs={"srcnn_style": {"num_feat": 8, "num_mid": 8}}))
    out = tmp_path / "pair"
    argv = ["train", "--arch", "srcnn_style", "--preset", "unit", "--data", str(photos), "--out", str(out),
            "--baseline-iters", "2", "--finetune-iters", "3", "--seed", "4"]
    torch.manual_seed(11)
    rng_before = torch.get_rng_state()
    assert main(argv) == 0
    assert torch.equal(torch.get_rng_state(), rng_before)  # the command seeds its own generators
    printed = capsys.readouterr().out
    base, target = out / "baseline" / "model.safetensors", out / "target" / "model.safetensors"
    assert f"baseline: {base}" in printed and f"target:   {target}" in printed
    mb, mt = read_metadata(base), read_metadata(target)
    assert (mb["arch"], mb["iters"], mb["seed"], mb["blur_prob"], mb["noise_prob"]) == ("srcnn_style", 2, 4, 0.0, 0.0)
    assert (mt["iters"], mt["init"], mt["blur_prob"], mt["noise_prob"]) == (3, str(base), 0.5, 0.5)
    wb, wt = _weights(load_model(base)), _weights(load_model(target))
    assert wb.keys() == wt.keys() and any(not torch.equal(wb[k], wt[k]) for k in wb)  # fine-tuning moved it
    log = [json.loads(line) for line in (out / "target" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["iter"] == 3 and np.isfinite(log[-1]["loss"])

    mtimes = {p: p.stat().st_mtime_ns for p in (base, target)}
    assert main(argv) == 0  # finished runs are not trained again
    assert {p: p.stat().st_mtime_ns for p in (base, target)} == mtimes
    again = _weights(load_model(target))
    assert all(torch.equal(wt[k], again[k]) for k in wt)


def test_demo_command_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "2", "--max-side", "32"]) == 0
    assert f"Demo report: {(out / 'report.md').resolve()}" in capsys.readouterr().out
    result = Attribution.load(out / "attribution.safetensors")
    assert result.counts == {"blur": 4, "noise": 4} and result.meta["steps"] == 2
    text = (out / "report.md").read_text()
    assert "longest side 32 px" in text and "riemann_left with 2 steps" in text
    rows = {m.group(1): (float(m.group(2)), float(m.group(3)))
            for m in re.finditer(r"^\| (deblurring \(FAIG\)|denoising \(FAIG\)|random) \| ([\d.]+) \| ([\d.]+) \|$",
                                 text, re.M)}
    assert set(rows) == {"deblurring (FAIG)", "denoising (FAIG)", "random"}
    # masking each degradation's top 1% changes its own outputs more than masking random filters does
    assert rows["deblurring (FAIG)"][0] > rows["random"][0]
    assert rows["denoising (FAIG)"][1] > rows["random"][1]
    # the per-layer table accounts for every top-1% filter of each set
    layer_rows = re.findall(r"^\| (\S+\.weight) \| (\d+) \| (\d+) \|$", text, re.M)
    k = top_count(len(result.index), 0.01)
    assert sum(int(b) for _, b, _ in layer_rows) == k and sum(int(n) for _, _, n in layer_rows) == k
    assert (out / "layer_distribution.png").read_bytes()[:4] == b"\x89PNG"
