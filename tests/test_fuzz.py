"""Property-based bad-input fuzzing: every case is a correct result or the project's own error."""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TinySR, make_pair
from faig_fast import FAIGError, attribute
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
    try:
        result = attribute(*PAIR, [(lq, gt, labels)], steps=2)
    except FAIGError:
        return
    _check(result)


labels = st.one_of(st.text(max_size=8), st.integers(), st.none(),
                   st.lists(st.one_of(st.text(max_size=5), st.integers()), max_size=4))


@FUZZ
@given(label=labels, batch=st.integers(1, 3), as_dict=st.booleans(), missing_key=st.booleans())
def test_fuzz_labels_and_batch_forms(label, batch, as_dict, missing_key):
    lq = torch.rand(batch, 3, 4, 4)
    gt = torch.rand(batch, 3, 8, 8)
    item = {"lq": lq, "gt": gt, "label": label} if as_dict else (lq, gt, label)
    if as_dict and missing_key:
        del item["gt"]
    try:
        result = attribute(*PAIR, [item], steps=2)
    except FAIGError:
        return
    _check(result)
    assert sum(result.counts.values()) == batch


@FUZZ
@given(feat_a=st.integers(1, 4), feat_b=st.integers(1, 4), poison=st.sampled_from([None, "nan", "inf"]),
       scale=st.sampled_from([2, 3]), method=st.sampled_from(["riemann_left", "gausslegendre", "trapezoid", ""]),
       steps=st.integers(-1, 3), strategy=st.sampled_from(["auto", "loop", "vmap", "linear", "fast"]))
def test_fuzz_model_pairs_and_options(feat_a, feat_b, poison, scale, method, steps, strategy):
    torch.manual_seed(0)
    a, b = TinySR(feat_a, scale), TinySR(feat_b, scale)
    if poison:
        with torch.no_grad():
            b.tail.bias[0] = float(poison)
    lq, gt = torch.rand(1, 3, 4, 4), torch.rand(1, 3, 4 * scale, 4 * scale)
    try:
        result = attribute(a, b, [(lq, gt, "noise")], steps=steps, method=method, strategy=strategy)
    except FAIGError:
        return
    _check(result)


@FUZZ
@given(steps=st.sampled_from(["0", "-3", "2", "x"]), method=st.sampled_from(["riemann_left", "bogus"]),
       degr=st.sampled_from(["blur", "jpeg", "blur+noise"]), data=st.sampled_from(["imgs", "nowhere"]))
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
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse rejects a non-integer --steps with its usage message
        assert e.code == 2
        return
    assert rc in (0, 2)
