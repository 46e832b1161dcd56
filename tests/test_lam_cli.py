"""``faig lam`` on tiny checkpoints: one image, two models, dataset mode with resume, guards."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import registry_pair, write_pair_and_images
from faig_fast.apps.lam_cli import add_lam_parser, cmd_lam
from faig_fast.apps.lam_runs import LamSettings, choose_windows, record_key
from faig_fast.core.lam import LocalAttribution, lam
from faig_fast.data.images import read_image
from faig_fast.errors import InvalidInputError


def run(argv: list[str]) -> int:
    """``faig lam ...`` through the ``faig`` parser when it is wired in (else the CLI's own parser);
    errors propagate so their messages can be checked."""
    import faig_fast.apps.cli as cli

    if "lam" in getattr(cli, "COMMANDS", {}):
        return cli.COMMANDS["lam"](cli.build_parser().parse_args(["lam", *argv]))
    parser = argparse.ArgumentParser(prog="faig")
    add_lam_parser(parser.add_subparsers(dest="command", required=True))
    return cmd_lam(parser.parse_args(["lam", *argv]))


@pytest.fixture
def files(tmp_path):
    write_pair_and_images(tmp_path)
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "lr.png")
    return tmp_path


def test_single_image_writes_map_json_and_figure(files):
    out = files / "one"
    assert run(["--model", str(files / "a.safetensors"), "--image", str(files / "lr.png"), "--window", "4,5,8",
                "--steps", "3", "--out", str(out)]) == 0
    doc = json.loads((out / "lam.json").read_text())
    for key in ("diffusion_index", "completeness", "nan_gradients", "seconds", "results"):
        assert key in doc
    res = doc["results"][0]
    assert res["window"] == [4, 5, 8] and res["steps"] == 3 and res["sigma"] == 1.2 and res["kernel_size"] == 9
    assert (out / "lam.png").stat().st_size > 1000
    saved = LocalAttribution.load(out / "lam.safetensors")
    a, _ = registry_pair("srcnn_style")
    direct = lam(a, read_image(files / "lr.png"), (4, 5, 8), steps=3)
    torch.testing.assert_close(saved.attribution, direct.attribution, rtol=1e-5, atol=1e-7)
    assert doc["diffusion_index"] == pytest.approx(direct.diffusion_index, rel=1e-5)


def test_two_models_side_by_side(files):
    out = files / "two"
    assert run(["--model", str(files / "a.safetensors"), "--model", str(files / "b.safetensors"),
                "--image", str(files / "lr.png"), "--window", "4,5,8", "--window", "0,0,6", "--steps", "2",
                "--out", str(out)]) == 0
    doc = json.loads((out / "lam.json").read_text())
    assert [(r["model"], tuple(r["window"])) for r in doc["results"]] == [
        ("a", (4, 5, 8)), ("a", (0, 0, 6)), ("b", (4, 5, 8)), ("b", (0, 0, 6))]
    assert doc["results"][0]["diffusion_index"] != doc["results"][2]["diffusion_index"]
    assert (out / "lam_grid.png").is_file() and (out / "lam_b_w1.safetensors").is_file()


def _dataset_args(files, out, *extra):
    return ["--baseline", str(files / "a.safetensors"), "--target", str(files / "b.safetensors"),
            "--data", str(files / "imgs"), "--windows", "2", "--window-size", "6", "--steps", "2",
            "--out", str(out), *extra]


def test_dataset_mode_resumes_and_recomputes_changed_inputs(files):
    out = files / "ds"
    assert run(_dataset_args(files, out)) == 0
    doc = json.loads((out / "lam_dataset.json").read_text())
    assert [im["name"] for im in doc["images"]] == ["0.png", "1.png"]
    assert not any(im["resumed"] for im in doc["images"])
    for im in doc["images"]:
        assert len(im["windows"]) == 2 and set(im["models"]) == {"baseline", "target"}
        assert len(im["models"]["target"]["diffusion_index"]) == 2 and im["models"]["target"]["mean"] is not None
    assert doc["overall"]["baseline"]["n"] == 4 and doc["difference"]["of"] == "target - baseline"
    md = (out / "lam_dataset.md").read_text()
    assert "| 0.png |" in md and "all windows" in md and (out / "lam_grid.png").is_file()
    first = {im["name"]: im for im in doc["images"]}

    assert run(_dataset_args(files, out)) == 0  # everything reused, same numbers
    again = json.loads((out / "lam_dataset.json").read_text())
    assert all(im["resumed"] for im in again["images"])
    assert again["overall"] == doc["overall"]

    rng = np.random.default_rng(5)  # change one image: only it is recomputed
    Image.fromarray(rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)).save(files / "imgs" / "1.png")
    assert run(_dataset_args(files, out)) == 0
    third = {im["name"]: im for im in json.loads((out / "lam_dataset.json").read_text())["images"]}
    assert third["0.png"]["resumed"] and not third["1.png"]["resumed"]
    assert third["0.png"]["models"] == first["0.png"]["models"]
    assert third["1.png"]["models"]["target"]["diffusion_index"] != first["1.png"]["models"]["target"]["diffusion_index"]

    assert run(_dataset_args(files, out, "--steps", "3")) == 0  # a changed setting recomputes all
    fourth = json.loads((out / "lam_dataset.json").read_text())
    assert not any(im["resumed"] for im in fourth["images"])


def test_guards(files):
    model = ["--model", str(files / "a.safetensors")]
    with pytest.raises(InvalidInputError, match="exactly one of --image"):
        run([*model, "--image", str(files / "lr.png"), "--data", str(files / "imgs"), "--window", "0,0,4"])
    with pytest.raises(InvalidInputError, match="outside the model's 20x24 output"):
        run([*model, "--image", str(files / "lr.png"), "--window", "18,0,4", "--steps", "1",
             "--out", str(files / "x")])
    with pytest.raises(InvalidInputError, match="go together"):
        run(["--baseline", str(files / "a.safetensors"), "--image", str(files / "lr.png"), "--window", "0,0,4"])
    with pytest.raises(InvalidInputError, match="at least one --window"):
        run([*model, "--image", str(files / "lr.png")])
    with pytest.raises(SystemExit):
        run([*model, "--image", str(files / "lr.png"), "--window", "1,2"])
    import faig_fast.apps.cli as cli

    if "lam" in getattr(cli, "COMMANDS", {}):  # `faig lam` reports the error and exits 2
        assert cli.main(["lam", *model, "--image", str(files / "lr.png")]) == 2


def test_windows_are_seeded_and_on_texture():
    g = torch.Generator().manual_seed(0)
    image = torch.full((3, 16, 16), 0.5)
    image[:, :, 8:] = torch.rand(3, 16, 8, generator=g)  # only the right half has texture
    ws = choose_windows(image, (32, 32), 3, 8, seed=0, name="x.png")
    assert len(ws) == 3 and len(set(ws)) == 3
    assert all(col >= 14 for _, col, _ in ws)  # on the textured half (output coords ×2)
    assert ws == choose_windows(image, (32, 32), 3, 8, seed=0, name="x.png")
    assert any(choose_windows(image, (32, 32), 3, 8, seed=s, name="x.png") != ws for s in range(1, 6))
    with pytest.raises(InvalidInputError, match="does not fit"):
        choose_windows(image, (32, 32), 3, 40, seed=0, name="x.png")


def test_record_key_covers_models_image_and_settings():
    s = LamSettings()
    k = record_key({"a": "1"}, "img", s)
    assert k == record_key({"a": "1"}, "img", LamSettings())
    assert k != record_key({"a": "2"}, "img", s)
    assert k != record_key({"a": "1"}, "img2", s)
    for change in ({"steps": 51}, {"sigma": 1.3}, {"seed": 1}, {"method": "gausslegendre"}, {"windows": 5},
                   {"precision": "fp64"}, {"input": "lr"}):
        assert k != record_key({"a": "1"}, "img", replace(s, **change))


def test_dataset_mode_under_torchrun_matches_one_process(files):
    """Two gloo ranks (images shared round-robin, records gathered on rank 0) give the single run's DI."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    cmd = ["-m", "faig_fast", "lam", *_dataset_args(files, files / "one")]
    single = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    cmd = ["-m", "faig_fast", "lam", *_dataset_args(files, files / "two")]
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *cmd],
                           env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = json.loads((files / "one" / "lam_dataset.json").read_text())
    two = json.loads((files / "two" / "lam_dataset.json").read_text())
    assert [im["name"] for im in two["images"]] == [im["name"] for im in one["images"]] == ["0.png", "1.png"]
    for a, b in zip(one["images"], two["images"]):
        assert a["windows"] == b["windows"]
        for m in ("baseline", "target"):
            assert b["models"][m]["diffusion_index"] == pytest.approx(a["models"][m]["diffusion_index"], rel=1e-9)
    assert two["overall"]["target"]["n"] == one["overall"]["target"]["n"] == 4
