"""Training, evaluation and filter re-training on tiny models and tiny synthetic images."""
from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from faig_fast.analyses.retrain import filter_mask, retrain_filters
from faig_fast.errors import InvalidInputError
from faig_fast.analyses.evaluate import MAX_PSNR, evaluate, psnr, psnr_table
from faig_fast.core.filters import FilterIndex
from faig_fast.models import create_model, load_model, read_metadata, save_model
from faig_fast.apps.train import PRESETS, train_pair
from faig_fast.training import TrainConfig, build_model, load_training_images, sample_batch, train

TINY = {"num_feat": 8, "num_block": 1}


def _cfg(**kw) -> TrainConfig:
    base = dict(model_kwargs=dict(TINY), patch_size=32, batch_size=2, iters=6, log_every=1,
                ckpt_every=2, blur_prob=0.5, noise_prob=0.5)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Three smooth 72×80 RGB PNGs (bilinearly upsampled noise)."""
    d = tmp_path_factory.mktemp("imgs")
    g = torch.Generator().manual_seed(0)
    paths = []
    for i in range(3):
        x = F.interpolate(torch.rand(1, 3, 9, 10, generator=g), size=(72, 80), mode="bilinear",
                          align_corners=False)[0]
        arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        p = d / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------- train
def test_train_writes_files_and_metadata(images, tmp_path):
    out = train(_cfg(), images, tmp_path / "run", progress=False)
    assert out == tmp_path / "run" / "model.safetensors" and out.exists()
    assert (tmp_path / "run" / "state.pt").exists()
    log = [json.loads(l) for l in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(set(r) == {"iter", "loss", "lr", "elapsed"} and math.isfinite(r["loss"]) for r in log)
    assert log[0]["lr"] == pytest.approx(2e-4) and log[-1]["lr"] < log[0]["lr"]  # cosine decay
    meta = read_metadata(out)
    assert meta["arch"] == "msrresnet" and meta["args"]["num_feat"] == 8
    assert meta["iters"] == 6 and meta["seed"] == 0 and meta["blur_prob"] == 0.5
    assert meta["noise_prob"] == 0.5 and meta["lr"] == 2e-4 and meta["preset"] == "tiny"
    assert load_model(out).upscale == 2
    # A finished run is not retrained: calling again returns the same file unchanged.
    w = _weights(out)
    assert train(_cfg(), images, tmp_path / "run", progress=False) == out
    assert _same(w, _weights(out))


def test_training_reduces_loss_on_fixed_batch(images, tmp_path):
    cfg = _cfg(iters=40, lr=2e-3, blur_prob=0.0, noise_prob=0.0, batch_size=4, lr_schedule="constant")
    imgs = load_training_images(images, cfg.patch_size)
    lq, gt = sample_batch(imgs, cfg, torch.Generator().manual_seed(123))
    init = build_model(cfg).eval()
    out = train(cfg, images, tmp_path / "run", progress=False)
    trained = load_model(out)
    with torch.no_grad():
        before = F.l1_loss(init(lq), gt).item()
        after = F.l1_loss(trained(lq), gt).item()
    assert after < before


def test_sample_batch_shapes_and_degradation_flags(images):
    imgs = load_training_images(images, 32)
    assert imgs[0].dtype == torch.uint8 and imgs[0].shape == (3, 72, 80)
    cfg = _cfg(batch_size=3, blur_prob=0.0, noise_prob=0.0)
    lq, gt = sample_batch(imgs, cfg, torch.Generator().manual_seed(0))
    assert lq.shape == (3, 3, 16, 16) and gt.shape == (3, 3, 32, 32)
    # clean: LQ is exactly the quantised bilinear downsampling of the GT
    ref = torch.round(F.interpolate(gt, size=(16, 16), mode="bilinear", align_corners=False) * 255).clamp(0, 255) / 255
    assert torch.equal(lq, ref)
    lq2, gt2 = sample_batch(imgs, _cfg(batch_size=3, blur_prob=1.0, noise_prob=1.0),
                            torch.Generator().manual_seed(0))
    assert torch.equal(gt, gt2) and not torch.equal(lq, lq2)


def test_determinism_same_seed(images, tmp_path):
    a = train(_cfg(), images, tmp_path / "a", progress=False)
    b = train(_cfg(), images, tmp_path / "b", progress=False)
    c = train(_cfg(seed=1), images, tmp_path / "c", progress=False)
    assert _same(_weights(a), _weights(b))
    assert not _same(_weights(a), _weights(c))


def test_train_leaves_the_callers_global_rng_alone(images, tmp_path):
    torch.manual_seed(99)
    before = torch.get_rng_state()
    model = build_model(_cfg(seed=3))
    assert torch.equal(torch.get_rng_state(), before)
    train(_cfg(iters=2), images, tmp_path / "run", progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)  # the init is the one a global seed would give
    ref = create_model("msrresnet", upscale=2, **TINY)
    assert _same(model.state_dict(), ref.state_dict())


def test_training_images_are_the_files_exact_8bit_pixels(images):
    imgs = load_training_images(images)
    for path, img in zip(images, imgs):
        raw = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)
        assert img.dtype == torch.uint8 and torch.equal(img, raw)


def test_resume_equals_straight_run(images, tmp_path):
    straight = train(_cfg(), images, tmp_path / "straight", progress=False)
    part = train(_cfg(), images, tmp_path / "resumed", progress=False, max_iters_this_call=3)
    assert part == tmp_path / "resumed" / "state.pt"
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    assert torch.load(part, weights_only=False)["iteration"] == 3
    resumed = train(_cfg(), images, tmp_path / "resumed", progress=False)
    assert _same(_weights(straight), _weights(resumed))
    iters = [json.loads(l)["iter"] for l in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    assert iters == [1, 2, 3, 4, 5, 6]
    # a callback can stop a run too; resuming after it also ends identical
    cb = train(_cfg(), images, tmp_path / "cb", progress=False, callback=lambda it, loss: it == 5)
    assert cb.name == "state.pt"
    assert _same(_weights(straight), _weights(train(_cfg(), images, tmp_path / "cb", progress=False)))


def test_resume_with_other_config_is_refused(images, tmp_path):
    train(_cfg(), images, tmp_path / "run", progress=False, max_iters_this_call=2)
    with pytest.raises(InvalidInputError, match="different config"):
        train(_cfg(lr=1e-3), images, tmp_path / "run", progress=False)


def test_param_mask_keeps_unmasked_weights_bit_identical(images, tmp_path):
    torch.manual_seed(0)
    model = create_model("msrresnet", upscale=2, **TINY)
    save_model(model, tmp_path / "init.safetensors")
    index = FilterIndex.from_model(model)
    chosen = torch.tensor([0, 5, index.layers[2].start + 7, index.num_filters - 1])
    mask = filter_mask(model, chosen)
    out = train(_cfg(lr=1e-2), images, tmp_path / "run", init=tmp_path / "init.safetensors",
                param_mask=mask, progress=False)
    before, after = model.state_dict(), _weights(out)
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)["model"]
    changed = 0
    for name, w0 in before.items():
        for w1 in (after[name], state[name]):  # the saved EMA and the raw trained weights
            if name in mask:
                keep = mask[name] == 0
                assert torch.equal(w1[keep], w0[keep]), name
                changed += int((w1[~keep] != w0[~keep]).sum())
            else:
                assert torch.equal(w1, w0), name  # biases and unmasked layers frozen
    assert changed > 0


# ---------------------------------------------------------------------------------- filter_mask
def test_filter_mask_follows_flat_index_convention():
    model = create_model("msrresnet", upscale=2, **TINY)
    index = FilterIndex.from_model(model)
    chosen = [0, 9, index.layers[3].start + 2 * index.layers[3].shape[1] + 5, index.num_filters - 1]
    masks = filter_mask(model, torch.tensor(chosen))
    assert list(masks) == [l.name for l in index.layers]
    sd = model.state_dict()
    for name, m in masks.items():
        assert m.shape == sd[name].shape
    assert sum(int(m.sum()) for m in masks.values()) == len(chosen) * 9  # 3×3 filters
    for i in chosen:
        info = index.lookup(i)
        assert bool((masks[info.layer][info.out_channel, info.in_channel] == 1).all())
    # flat index 9 of conv_first (8, 3, 3, 3): out 3, in 0
    assert masks["conv_first.weight"][3, 0].sum() == 9
    assert masks[index.layers[3].name][2, 5].sum() == 9
    assert filter_mask(model, []) and all(int(m.sum()) == 0 for m in filter_mask(model, []).values())
    with pytest.raises(InvalidInputError):
        filter_mask(model, [index.num_filters])


def test_retrain_filters_runs_and_upper_bound(images, tmp_path):
    torch.manual_seed(0)
    base = create_model("msrresnet", upscale=2, **TINY)
    save_model(base, tmp_path / "base.safetensors", {"preset": "tiny"})
    out = retrain_filters(tmp_path / "base.safetensors", torch.tensor([1, 2, 3]), "blur", images,
                          tmp_path / "sel", iters=2, batch_size=2, patch_size=32, lr=1e-3, progress=False)
    meta = read_metadata(out)
    assert meta["blur_prob"] == 1.0 and meta["noise_prob"] == 0.0 and meta["masked_params"]
    w = _weights(out)
    assert torch.equal(w["conv_first.bias"], base.state_dict()["conv_first.bias"])
    full = retrain_filters(tmp_path / "base.safetensors", None, "noise", images, tmp_path / "all",
                           iters=2, batch_size=2, patch_size=32, lr=1e-3, progress=False)
    assert not torch.equal(_weights(full)["conv_first.bias"], base.state_dict()["conv_first.bias"])
    with pytest.raises(InvalidInputError):
        retrain_filters(tmp_path / "base.safetensors", None, "jpeg", images, tmp_path / "x", iters=1)


def test_train_pair_writes_both_models(images, tmp_path, monkeypatch):
    monkeypatch.setitem(PRESETS, "unit", dict(PRESETS["tiny"], batch_size=2, patch_size=32,
                                             model_kwargs={"msrresnet": dict(TINY)}))
    base, target = train_pair("msrresnet", "unit", images, tmp_path, baseline_iters=2,
                              finetune_iters=2, progress=False)
    assert base == tmp_path / "baseline" / "model.safetensors"
    assert target == tmp_path / "target" / "model.safetensors"
    mb, mt = read_metadata(base), read_metadata(target)
    assert (mb["blur_prob"], mb["noise_prob"]) == (0.0, 0.0)
    assert (mt["blur_prob"], mt["noise_prob"]) == (0.5, 0.5) and mt["init"] == str(base)
    assert mb["lr"] == PRESETS["unit"]["baseline_lr"] and mt["lr"] == PRESETS["unit"]["finetune_lr"]
    assert (PRESETS["paper"]["baseline_lr"], PRESETS["paper"]["finetune_lr"]) == (2e-4, 5e-5)


# ----------------------------------------------------------------------------------------- layers
#: The package's layers, lowest first: a module may import its own subpackage and lower layers only
#: (apps -> analyses -> core -> training -> models / ops -> data -> utils -> errors).
LAYERS = {"errors": 0, "utils": 1, "data": 2, "models": 3, "ops": 3, "training": 4, "core": 5, "analyses": 6,
          "apps": 7}
PACKAGE = Path(__file__).resolve().parents[1] / "faig_fast"


def _imported_layers(path: Path) -> set[tuple[str, int]]:
    """(layer, line) of every faig_fast import in ``path``, lazy ones inside functions included."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = ["faig_fast", *parts[:len(parts) - node.level]]
                names = [".".join(base + ([node.module] if node.module else []))]
            else:
                names = [node.module or ""]
        for name in names:
            bits = name.split(".")
            if bits[0] == "faig_fast" and len(bits) > 1 and bits[1] in LAYERS:
                found.add((bits[1], node.lineno))
    return found


def test_package_layers_import_only_downward():
    """No module imports a layer above its own (retrain used to import faig_fast.apps.train)."""
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0]
        if layer not in LAYERS:
            continue
        for dep, line in sorted(_imported_layers(path)):
            if dep != layer and LAYERS[dep] >= LAYERS[layer]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports faig_fast.{dep}")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)
    assert "training" in {dep for dep, _ in _imported_layers(PACKAGE / "analyses" / "retrain.py")}


def test_layer_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself trips on an upward import, a lazy one included (so the test above can fail)."""
    pkg = tmp_path / "faig_fast"
    (pkg / "training").mkdir(parents=True)
    bad = pkg / "training" / "bad.py"
    bad.write_text("def f():\n    from faig_fast.apps.train import PRESETS\n    from ..core import api\n")
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    assert _imported_layers(bad) == {("apps", 2), ("core", 3)}


# ------------------------------------------------------------------------------------- evaluate
def test_psnr_hand_computation_and_identical_images():
    gt = torch.zeros(3, 4, 4)
    assert psnr(gt, gt) == MAX_PSNR
    pred = gt.clone()
    pred[0, 1, 1] = 10 / 255  # one pixel off by 10 levels
    mse = 100 / 48
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(255 ** 2 / mse))
    # crop_border=1 keeps the 2×2 centre (12 values), which contains (1, 1)
    assert psnr(pred, gt, crop_border=1) == pytest.approx(10 * math.log10(255 ** 2 / (100 / 12)))
    # the prediction is rounded to 8-bit levels and clipped before comparison
    assert psnr(gt + 0.4 / 255, gt) == MAX_PSNR
    assert psnr(gt - 1.0, gt + 1.0) == pytest.approx(0.0)  # clipped to 0 vs 1: MSE 255²
    with pytest.raises(InvalidInputError):
        psnr(gt, gt[:, :2])


def test_evaluate_and_table_are_finite(images):
    torch.manual_seed(0)
    model = create_model("msrresnet", upscale=2, **TINY)
    res = evaluate(model, images[:2], max_side=32)
    assert set(res) == {"clean", "blur", "noise"} and all(math.isfinite(v) and v > 10 for v in res.values())
    assert res["clean"] > res["blur"]
    assert res == evaluate(model, images[:2], max_side=32)  # deterministic (noise seeded)
    table = psnr_table({"m": model}, {"d": images[:2]}, labels=("clean", "noise"), max_side=32)
    lines = table.strip().splitlines()
    assert lines[0] == "| model | dataset | clean | noise |" and lines[2].startswith("| m | d | ")
    assert len(lines) == 3
