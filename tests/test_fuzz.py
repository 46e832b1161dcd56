"""Property-based input fuzzing: every valid draw must succeed with a finite result, every invalid one
must raise the project's own error of the expected type (never a crash, never a silent result)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from conftest import TinySR, make_pair
from faig_fast import FAIGError, InvalidInputError, ModelMismatchError, attribute
from faig_fast.apps.cli import main

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
PAIR = make_pair(dtype=torch.float32)

dtypes = st.sampled_from([torch.float16, torch.float32, torch.float64, torch.uint8, torch.int64, torch.bool])
fills = st.sampled_from(["uniform", "negative", "large", "nan", "inf", "zeros", "ones"])


def _tensor(shape, dtype, fill, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if fill == "negative":
        t = t - 0.5
    elif fill == "large":
        t = t * 300
    elif fill == "nan" and t.numel():
        t.view(-1)[0] = math.nan
    elif fill == "inf" and t.numel():
        t.view(-1)[-1] = math.inf
    elif fill == "zeros":
        t = torch.zeros(shape, dtype=torch.float64)
    elif fill == "ones":
        t = torch.ones(shape, dtype=torch.float64)
    if dtype in (torch.uint8, torch.int64, torch.bool):
        t = torch.nan_to_num(t).clamp(0, 255)
    return t.to(dtype)


def _check(result):
    for label in result.labels:
        s = result.scores(label)
        assert torch.isfinite(s).all(), "NaN/Inf in a result"
        assert len(result.ranking(label)) == len(result.index)


@FUZZ
@given(batch=st.integers(1, 3), channels=st.integers(1, 4), h=st.integers(0, 6), w=st.integers(0, 6),
       scale=st.sampled_from([1, 2, 3]), dtype=dtypes, fill=fills, squeeze=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fuzz_images(batch, channels, h, w, scale, dtype, fill, squeeze, seed):
    lq = _tensor((batch, channels, h, w), dtype, fill, seed)
    gt = _tensor((batch, 3, h * scale, w * 2), torch.float32, "uniform", seed + 1)
    if squeeze and batch == 1:
        lq, gt = lq[0], gt[0]
    labels = ["blur"] * batch
    # PAIR is a 3-channel ×2 model: valid = float lq in [0, 1] of 3 channels, non-empty, gt twice its size
    in_range = lq.is_floating_point() and lq.numel() > 0 and bool(torch.isfinite(lq).all()) \
        and float(lq.min()) >= 0 and float(lq.max()) <= 1
    valid = in_range and channels == 3 and scale == 2
    if not valid:
        with pytest.raises(InvalidInputError):
            attribute(*PAIR, [(lq, gt, labels)], steps=2)
        return
    result = attribute(*PAIR, [(lq, gt, labels)], steps=2)
    _check(result)
    assert result.counts == {"blur": batch}


@FUZZ
@given(batch=st.integers(1, 3), channels=st.just(3), h=st.integers(1, 6), w=st.integers(1, 6),
       dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
       fill=st.sampled_from(["uniform", "zeros", "ones"]), seed=st.integers(0, 2**16))
def test_fuzz_valid_images_succeed(batch, channels, h, w, dtype, fill, seed):
    """Only valid draws (the general property above meets few of them): each must give a finite result."""
    lq = _tensor((batch, channels, h, w), dtype, fill, seed)
    gt = _tensor((batch, 3, 2 * h, 2 * w), torch.float32, "uniform", seed + 1)
    result = attribute(*PAIR, [(lq, gt, ["noise"] * batch)], steps=2)
    _check(result)
    assert result.counts == {"noise": batch}


labels = st.one_of(st.text(max_size=8), st.integers(), st.none(),
                   st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=4))


@FUZZ
@given(label=labels, batch=st.integers(1, 3), as_dict=st.booleans(), missing_key=st.booleans())
@example(label="", batch=1, as_dict=False, missing_key=False)
@example(label=["a", "b"], batch=2, as_dict=True, missing_key=False)
@example(label=["x", "x", "0"], batch=3, as_dict=False, missing_key=True)
def test_fuzz_labels_and_batch_forms(label, batch, as_dict, missing_key):
    lq = torch.rand(batch, 3, 4, 4)
    gt = torch.rand(batch, 3, 8, 8)
    item = {"lq": lq, "gt": gt, "label": label} if as_dict else (lq, gt, label)
    if as_dict and missing_key:
        del item["gt"]
    valid_label = (isinstance(label, str) and batch == 1) or (
        isinstance(label, list) and len(label) == batch and all(isinstance(x, str) for x in label))
    if not valid_label or (as_dict and missing_key):
        with pytest.raises(InvalidInputError, match="batch 0"):
            attribute(*PAIR, [item], steps=2)
        return
    result = attribute(*PAIR, [item], steps=2)
    _check(result)
    assert sum(result.counts.values()) == batch
    assert result.image_labels == ([label] if isinstance(label, str) else label)


@FUZZ
@given(feat_a=st.integers(1, 4), feat_b=st.integers(1, 4), poison=st.sampled_from([None, "nan", "inf"]),
       scale=st.sampled_from([2, 3]), method=st.sampled_from(["riemann_left", "gausslegendre", "trapezoid", ""]),
       steps=st.integers(-1, 3), strategy=st.sampled_from(["auto", "loop", "vmap", "linear", "fast"]))
@example(feat_a=2, feat_b=2, poison=None, scale=3, method="gausslegendre", steps=3, strategy="linear")
@example(feat_a=1, feat_b=1, poison=None, scale=2, method="riemann_left", steps=1, strategy="vmap")
def test_fuzz_model_pairs_and_options(feat_a, feat_b, poison, scale, method, steps, strategy):
    torch.manual_seed(0)
    a, b = TinySR(feat_a, scale), TinySR(feat_b, scale)
    if poison:
        with torch.no_grad():
            b.tail.bias[0] = float(poison)
    lq, gt = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4 * scale, 4 * scale)
    bad_options = method not in ("riemann_left", "gausslegendre") or steps < 1 or strategy == "fast" or poison
    mismatch = feat_a != feat_b
    if bad_options or mismatch:
        # one kind of fault names its own error; several may be reported in any order
        expected = InvalidInputError if not mismatch else ModelMismatchError if not bad_options else FAIGError
        with pytest.raises(expected):
            attribute(a, b, [(lq, gt, "noise")], steps=steps, method=method, strategy=strategy)
        return
    result = attribute(a, b, [(lq, gt, "noise")], steps=steps, method=method, strategy=strategy)
    _check(result)
    assert result.meta["strategy"] in ("loop", "vmap", "linear", "persample")


@FUZZ
@given(steps=st.sampled_from(["0", "-3", "2", "x"]), method=st.sampled_from(["riemann_left", "bogus"]),
       degr=st.sampled_from(["blur", "jpeg", "blur+noise"]), data=st.sampled_from(["imgs", "nowhere"]))
@example(steps="2", method="riemann_left", degr="blur+noise", data="imgs")
def test_fuzz_cli(tmp_path_factory, steps, method, degr, data):
    import numpy as np
    from PIL import Image

    from faig_fast.models import create_model, save_model

    root = tmp_path_factory.mktemp("cli")
    m = create_model("srcnn_style", preset="tiny", upscale=2)
    save_model(m, root / "a.safetensors")
    save_model(m, root / "b.safetensors")
    (root / "imgs").mkdir()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(root / "imgs" / "x.png")
    argv = ["attribute", "--baseline", str(root / "a.safetensors"), "--target", str(root / "b.safetensors"),
            "--data", str(root / data), "--steps", steps, "--method", method, "--degradations", degr,
            "--out", str(root / "r.safetensors")]
    valid = steps == "2" and method == "riemann_left" and degr != "jpeg" and data == "imgs"
    if steps == "x":  # argparse rejects a non-integer --steps with its usage message
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        return
    assert main(argv) == (0 if valid else 2)
    if valid:
        from faig_fast.core.attribution import Attribution

        assert Attribution.load(root / "r.safetensors").counts == {degr: 1}
