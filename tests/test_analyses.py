"""Analyses: baselines, masking, prediction, modulation, figures and the report writer."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from faig_fast.analyses import baselines as B
from faig_fast.analyses import figures as FIG
from faig_fast.analyses import masking as M
from faig_fast.analyses import modulation as MOD
from faig_fast.analyses import prediction as P
from faig_fast.core.attribution import Attribution
from faig_fast.data.degradations import make_degradation
from faig_fast.core.filters import FilterIndex
from conftest import registry_pair
from faig_fast.apps.report import HEADERS, write_report
from faig_fast.errors import InvalidInputError


def tiny_pair(seed: int = 0, noise: float = 0.05):
    """Tiny MSRResNet baseline and a target whose conv *weights* (not biases) are perturbed."""
    return registry_pair(noise=noise, seed=seed, weights_only=True)


@pytest.fixture(scope="module")
def models():
    return tiny_pair()


def images(n: int = 2, size: int = 16, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [(f"img{i}", torch.rand(3, size, size, generator=g)) for i in range(n)]


def items(labels=("blur", "noise"), n: int = 2, size: int = 16):
    """(lq, gt, label) items degraded with the paper's degradations."""
    out = []
    for name, gt in images(n, size):
        for k, l in enumerate(labels):
            out.append((make_degradation(l)(gt, torch.Generator().manual_seed(k)), gt, l, f"{name}/{l}"))
    return out


# ------------------------------------------------------------------------------------ baselines
def test_ig_shapes_determinism_and_labels(models):
    _, b = models
    n = len(FilterIndex.from_model(b))
    s1 = B.ig_scores(b, items(), steps=3)
    s2 = B.ig_scores(b, items(), steps=3)
    assert set(s1) == {"blur", "noise"}
    for d in s1:
        assert s1[d].shape == (n,) and s1[d].dtype == torch.float64
        assert torch.equal(s1[d], s2[d])
    # Eq. 7 structure: blur score = mean(blur) − mean(noise) = −(noise score) with two labels
    torch.testing.assert_close(s1["blur"], -s1["noise"])


def test_ig_zero_path_is_abs_gradient(models):
    """With x = x̄ (a clean input) every path point is x̄: IG = Σ_kk |∂ΣF(x̄)/∂θ|."""
    _, b = models
    gt = images(1)[0][1]
    clean = make_degradation("clean")(gt)
    att = B.ig_attribution(b, [(clean, gt, "clean")], steps=4)
    net = copy.deepcopy(b)
    net.zero_grad()
    net(clean[None]).sum().backward()
    index = FilterIndex.from_model(b)
    params = dict(net.named_parameters())
    expect = torch.cat([params[l.name].grad.abs().reshape(l.num_filters, -1).sum(1).double() for l in index.layers])
    torch.testing.assert_close(att.mean("clean"), expect, rtol=1e-4, atol=1e-7)


def _abs_gradient(model, x):
    """Σ_kk |∂ΣF(x)/∂θ| per filter: what IG gives on a zero path (x = x̄)."""
    net = copy.deepcopy(model)
    net.zero_grad()
    net(x[None]).sum().backward()
    params = dict(net.named_parameters())
    return torch.cat([params[l.name].grad.abs().reshape(l.num_filters, -1).sum(1).double()
                      for l in FilterIndex.from_model(model).layers])


def test_ig_restores_the_callers_modes_and_grad_flags(models):
    """IG runs in eval mode but hands the model back as the caller had it, submodule by submodule."""
    _, b = models
    net = copy.deepcopy(b).train()
    net.body.eval()  # a mixed model: train overall, one part frozen in eval
    net.conv_first.weight.requires_grad_(False)
    modes = {n: m.training for n, m in net.named_modules()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    B.ig_attribution(net, items()[:1], steps=2)
    assert {n: m.training for n, m in net.named_modules()} == modes
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert net.training and not net.body.training


def _undeclared_x3() -> torch.nn.Module:
    """A ×3 SR net that declares no ``upscale``/``scale``: its scale shows only in its output."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 27, 3, padding=1), torch.nn.PixelShuffle(3)).double()


@pytest.mark.parametrize("which", ["denoiser_x1", "sr_x3"])
def test_ig_infers_the_scale_of_models_that_declare_none(which):
    """The clean LR x̄ uses the model's own scale (inferred from one forward pass), not ×2: on x = x̄
    the zero path gives the plain absolute gradient."""
    from conftest import GrayDenoiser

    if which == "denoiser_x1":
        torch.manual_seed(0)
        model, gt, scale = GrayDenoiser().double(), torch.rand(1, 12, 12, dtype=torch.float64), 1
    else:
        model, gt, scale = _undeclared_x3(), torch.rand(3, 12, 12, dtype=torch.float64), 3
    lq = make_degradation("clean", scale=scale)(gt)
    att = B.ig_attribution(model, [(lq, gt, "clean")], steps=3)
    # x̄ is rebuilt from gt in fp32 (as the loaders give it): equal to lq up to fp32 rounding of the 8-bit levels
    torch.testing.assert_close(att.mean("clean"), _abs_gradient(model, lq), rtol=1e-6, atol=1e-9)


def test_ig_refuses_gt_that_the_model_output_does_not_match():
    """The scale is inferred from the model's output, which must have gt's size (here ×3 vs gt ×6)."""
    model = _undeclared_x3()
    gt = torch.rand(3, 24, 24, dtype=torch.float64)
    lq = make_degradation("clean", scale=6)(gt)
    with pytest.raises(InvalidInputError, match="output of size"):
        B.ig_attribution(model, [(lq, gt, "clean")], steps=2)


def test_weight_change_random_and_rankings(models):
    a, b = models
    index = FilterIndex.from_model(b)
    wc = B.weight_change_scores(a, b)
    l0 = index.layers[0]
    manual = (b.state_dict()[l0.name] - a.state_dict()[l0.name]).abs().sum((2, 3)).reshape(-1).double()
    torch.testing.assert_close(wc[: l0.num_filters], manual)
    assert torch.equal(B.weight_change_scores(a, a), torch.zeros(len(index), dtype=torch.float64))
    r1, r2 = B.random_scores(100, 1), B.random_scores(100, 1)
    assert torch.equal(r1, r2) and not torch.equal(r1, B.random_scores(100, 2))
    assert not torch.equal(B.random_scores(100, 1, "blur"), B.random_scores(100, 1, "noise"))
    att = Attribution(index)
    for lab in ("blur", "noise"):
        att.add(lab, torch.rand(len(index), dtype=torch.float64))
    for m in B.METHODS:
        r = B.rankings(m, "blur", attribution=att, ig=att, model_a=a, model_b=b, seed=0)
        assert sorted(r.tolist()) == list(range(len(index)))
    assert torch.equal(B.rankings("weight_change", "noise", model_a=a, model_b=b), B.ranking_of(wc))
    assert wc[B.ranking_of(wc)[0]] == wc.max()


# -------------------------------------------------------------------------------------- masking
def test_mask_none_is_target_all_is_baseline(models):
    a, b = models
    x = items()[0][0][None]
    n = len(FilterIndex.from_model(b))
    with torch.no_grad():
        assert torch.equal(M.mask_filters(a, b, [])(x), b(x))
        assert torch.equal(M.mask_filters(a, b, torch.arange(n))(x), a(x))
    one = M.mask_filters(a, b, [5])
    w_b, w_a, w_m = (m.state_dict()["conv_first.weight"] for m in (b, a, one))
    assert torch.equal(w_m[1, 2], w_a[1, 2])  # filter 5 = (out 1, in 2) of conv_first (3 inputs)
    w_m2 = w_m.clone()
    w_m2[1, 2] = w_b[1, 2]
    assert torch.equal(w_m2, w_b)
    assert torch.equal(b.state_dict()["conv_first.weight"], w_b)  # target untouched


def test_gradient_map_mse_hand_check():
    a = torch.zeros(3, 4, 4)
    b = torch.zeros(3, 4, 4)
    v = 0.5
    b[:, 1, 1] = v  # gray = (0.299 + 0.587 + 0.114) v = v
    # central differences: the 4 neighbours of (1, 1) get |∇| = √(v² + 1e-6); elsewhere both maps are √1e-6
    per = (math.sqrt(v * v + 1e-6) - math.sqrt(1e-6)) ** 2
    assert M.gradient_map_mse(a, b) == pytest.approx(1000 * 4 * per / 16, rel=1e-6)
    assert M.gradient_map_mse(a, a) == 0.0
    gray = M.to_gray(torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1))
    assert float(gray) == pytest.approx(0.299)


def test_masking_curve_and_table(models):
    a, b = models
    lqs = [it[0] for it in items()]
    n = len(FilterIndex.from_model(b))
    rank = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    curve = M.masking_curve(a, b, rank, lqs, [0.0, 0.01, 1.0])
    assert curve[0] == 0.0 and curve[2] > 0
    ranks = lambda s: {"faig": {"blur": rank, "noise": rank.flip(0)},  # noqa: E731
                       "random": {d: B.rankings("random", d, num_filters=n, seed=s) for d in ("blur", "noise")}}
    tab = M.masking_table(a, b, ranks, images(2), seeds=(0, 1), fractions=(0.01, 0.05))
    assert tab["methods"] == ["faig", "random"]
    assert len(tab["values"]["noise"]["blur"]["faig"]) == 2  # seeds
    assert len(tab["mean"]["blur"]["noise"]["random"]) == 2  # fractions
    assert tab["std"]["blur"]["blur"]["faig"][0] == pytest.approx(0.0, abs=1e-12)  # blur inputs don't vary


def test_analyses_take_the_pair_in_attribute_order(models):
    """Every analysis takes (baseline, target), as faig_fast.attribute does: same parameter names,
    and swapping the models changes the answer (masking nothing leaves the *target*)."""
    import inspect

    for fn in (M.mask_filters, M.masking_curve, M.masking_table, MOD.modulate, MOD.modulation_strip):
        assert list(inspect.signature(fn).parameters)[:2] == ["baseline", "target"], fn.__name__
    a, b = models
    lqs = [it[0] for it in items()][:2]
    n = len(FilterIndex.from_model(b))
    rank = torch.arange(n)
    with torch.no_grad():
        ref_b = [b(x[None]) for x in lqs]
    # half the filters masked: measured against the *target's* outputs, on the target with the
    # baseline's filters (a swapped pair would measure the baseline with the target's filters)
    half = M.masking_curve(a, b, rank, lqs, [0.5])[0]
    with torch.no_grad():
        masked = M.mask_filters(a, b, rank[: n // 2])
        expect = sum(M.gradient_map_mse(masked(x[None]), r, True) for x, r in zip(lqs, ref_b)) / len(lqs)
        swapped_masked = M.mask_filters(b, a, rank[: n // 2])
        swapped = sum(M.gradient_map_mse(swapped_masked(x[None]), a(x[None]), True) for x in lqs) / len(lqs)
    assert half == pytest.approx(expect, rel=1e-12) and half > 0
    assert abs(half - swapped) > 1e-6 * half
    tab = M.masking_table(a, b, {"faig": {"blur": rank}}, images(1), seeds=(0,), fractions=(0.5,), inputs=("noise",))
    lq_noise = M.degraded_inputs(images(1), ("noise",), scale=2, seed=0)["noise"]
    assert tab["mean"]["noise"]["blur"]["faig"][0] == pytest.approx(
        M.masking_curve(a, b, rank, lq_noise, [0.5])[0], rel=1e-12)


def test_display_names_have_one_home():
    from faig_fast.analyses import names as N

    assert N.method_name("weight_change", markdown=True, capital=True) == "\\|θ−θ̄\\|"
    assert N.method_name("random", capital=True) == "Random" and N.method_name("faig", capital=True) == "FAIG"
    assert N.input_name("blur", noun=True) == "blurry input" and N.input_name("noise", capital=True) == "Noisy"
    assert N.filter_set_name("noise") == "denoising" and N.filter_set_name("other") == "other"
    for module in (FIG, M):
        assert not any(k.endswith("_NAMES") or k == "FILTER_SETS" for k in vars(module)), module.__name__


# ----------------------------------------------------------------------------------- prediction
def test_overlap_score_hand_check():
    assert P.overlap_score({1, 2, 3, 4}, {3, 4, 5}) == 0.5
    assert P.overlap_score(torch.tensor([7, 8]), torch.tensor([8, 9, 10])) == 0.5
    with pytest.raises(InvalidInputError):
        P.overlap_score(set(), {1})


def test_thresholds_calibrate_to_perfect_accuracy():
    g = torch.Generator().manual_seed(0)
    u = lambda lo, hi: float(lo + (hi - lo) * torch.rand(1, generator=g))  # noqa: E731
    scores = {"blur": [{"blur": u(0.6, 0.9), "noise": u(0.0, 0.3)} for _ in range(5)],
              "noise": [{"blur": u(0.0, 0.3), "noise": u(0.7, 1.0)} for _ in range(5)],
              "clean": [{"blur": u(0.0, 0.4), "noise": u(0.0, 0.4)} for _ in range(5)]}
    thr = P.calibrate_thresholds(scores)
    assert 0.4 <= thr["blur"] <= 0.6 and 0.4 <= thr["noise"] <= 0.7
    acc = P.accuracy(scores, thr)
    assert acc == {"blur": 1.0, "noise": 1.0, "overall": 1.0}
    assert P.predict([{"blur": 0.8, "noise": 0.1}, {"blur": 0.1, "noise": 0.1}], thr) == ["blur", "clean"]
    t, a = P.best_threshold(torch.tensor([0.1, 0.2, 0.8, 0.9]).numpy(), torch.tensor([0, 0, 1, 1]).bool().numpy())
    assert a == 1.0 and t == pytest.approx(0.5)


def test_run_prediction_on_synthetic_attributions():
    index = FilterIndex([("w", (10, 10, 3, 3))])  # 100 filters, 1% = 1 filter
    disc = Attribution(index, keep_per_image=True)
    base = torch.zeros(100, dtype=torch.float64)
    hot = {"blur": 3, "noise": 7, "clean": 50}

    def img(label: str) -> torch.Tensor:
        s = base.clone() + 0.01 * torch.rand(100, dtype=torch.float64)
        s[hot[label]] = 1.0
        return s
    for lab in ("blur", "noise"):
        for _ in range(2):
            disc.add(lab, img(lab))
    cal, test = Attribution(index, keep_per_image=True), Attribution(index, keep_per_image=True)
    for att in (cal, test):
        for lab in ("clean", "blur", "noise"):
            att.add(lab, img(lab))
    res = P.run_prediction(disc, cal, test, fraction=0.01, fixed_thresholds={"blur": 0.5, "noise": 2.0})
    assert res["test_accuracy"] == {"blur": 1.0, "noise": 1.0, "overall": 1.0}
    assert res["test"]["predicted"] == ["clean", "blur", "noise"]
    assert set(res["protocols"]) == {"all_labels", "degraded_only", "fixed", "fixed_degraded_only"}
    only = res["protocols"]["degraded_only"]["test_accuracy"]
    assert only == {"blur": 1.0, "noise": 1.0, "overall": 1.0}
    fixed = res["protocols"]["fixed_degraded_only"]["test_accuracy"]  # T_noise = 2 never fires
    assert fixed == {"blur": 1.0, "noise": 0.5, "overall": 0.5}


# ----------------------------------------------------------------------------------- modulation
def test_modulate_endpoints(models):
    a, b = models
    x = items()[1][0][None]
    idx = torch.tensor([0, 100, 1500, 2399])
    with torch.no_grad():
        assert torch.equal(MOD.modulate(a, b, idx, 1.0)(x), b(x))
        assert torch.equal(MOD.modulate(a, b, idx, 0.0)(x), M.mask_filters(a, b, idx)(x))
        assert torch.equal(MOD.modulate(a, b, idx, 0.0, elsewhere="baseline")(x), a(x))
    half = MOD.modulate(a, b, idx, 0.5).state_dict()["conv_first.weight"]
    expect = 0.5 * (a.state_dict()["conv_first.weight"][0, 0] + b.state_dict()["conv_first.weight"][0, 0])
    torch.testing.assert_close(half[0, 0], expect)
    strip = MOD.modulation_strip(a, b, idx, x[0], lams=(0.0, 1.0))
    assert len(strip) == 2 and strip[0].shape == (3, 16, 16)


# -------------------------------------------------------------------------------------- figures
def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_write_pngs(tmp_path, models):
    _, b = models
    index = FilterIndex.from_model(b)
    fr = [0.0, 0.01, 0.1]
    curves = {m: {k: {i: [0.0, 1.0 + j, 2.0] for j, i in enumerate(("blur", "noise"))} for k in ("blur", "noise")}
              for m in ("faig", "random")}
    paths = [
        FIG.plot_masking_curves(curves, fr, tmp_path / "curves.png"),
        FIG.plot_layer_distribution(index, {"blur": torch.arange(24), "noise": torch.arange(2000, 2024)},
                                    tmp_path / "dist.png"),
        FIG.plot_image_grid([("row", [("a", torch.rand(3, 8, 8)), ("b", torch.rand(1, 3, 16, 16))])],
                            tmp_path / "grid.png"),
        FIG.plot_modulation_strips({"s": [torch.rand(3, 8, 8)] * 2}, [0.0, 1.0], tmp_path / "sub" / "mod.png"),
    ]
    for p in paths:
        assert _is_png(p)
    assert list(FIG.layer_counts(index, torch.tensor([0, 47, 48, 2399]))) == [2, 1, 0, 0, 0, 0, 0, 1]


# --------------------------------------------------------------------------------------- report
def test_report_contains_every_header(tmp_path):
    fr = [0.01, 0.05]
    mean = {i: {m: {k: [1.0, 2.0] for k in B.METHODS} for m in ("blur", "noise")} for i in ("blur", "noise")}
    results = {
        "config": {"preset": "micro"},
        "masking": {"fractions": fr, "seeds": [0], "methods": list(B.METHODS), "inputs": ["blur", "noise"],
                    "mean": mean, "std": mean},
        "retrain": {"fraction": 0.01, "iters": 2, "seeds": [0], "inputs": ["blur", "noise"],
                    "upper": {"blur": [28.0], "noise": [26.0]},
                    "methods": {m: {s: {t: [25.0] for t in ("blur", "noise")} for s in ("blur", "noise")}
                                for m in B.METHODS}},
        "prediction": {"fraction": 0.01, "degradations": ["blur", "noise"], "thresholds": {"blur": 0.5, "noise": 0.6},
                       "calibration_accuracy": {"blur": 1.0, "noise": 1.0, "overall": 1.0},
                       "test_accuracy": {"blur": 0.9, "noise": 1.0, "overall": 0.9},
                       "test_mean_overlap": {"blur": {"blur": 0.7, "noise": 0.1}}},
        "distribution": {"layers": [["a", 10], ["b", 20]], "counts": {"blur": [1, 2], "noise": [3, 0]},
                         "centroid": {"blur": 0.7, "noise": 0.2}, "jaccard": 0.0},
        "modulation": {"lams": [0, 1], "psnr": {"blur": {"blur": [24.0, 26.0]}}},
        "findings": [("claim", True, "numbers"), ("other", False, "numbers")],
        "figures": {"Curves": "figures/curves.png"},
        "reductions": ["smaller"],
        "timings": {"faig": 1.5},
    }
    text = write_report(tmp_path / "report.md", results).read_text()
    for h in HEADERS.values():
        assert h in text
    assert "6.68±0.63" in text and "27.889" in text and "29.203" in text and "98%" in text
    assert "does NOT hold" in text and "![Curves](figures/curves.png)" in text
    empty = write_report(tmp_path / "empty.md", {}).read_text()
    for h in HEADERS.values():
        assert h in empty
