"""faig_fast.attribute against the reference loop, the index convention, persistence and bad input."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import faig_fast
from conftest import GrayDenoiser, make_images, make_loader, make_pair
from faig_fast import attribute
from faig_fast.core.attribution import Attribution, jaccard, read_index_file, top_count, write_index_file
from faig_fast.errors import FAIGError, InvalidInputError, ModelMismatchError
from faig_fast.core.filters import FilterIndex
from faig_fast.core.reference import reference_attribute


@pytest.mark.parametrize("strategy", ["loop", "vmap", "linear", "tune"])
@pytest.mark.parametrize("method", ["riemann_left", "gausslegendre"])
def test_attribute_equals_reference(strategy, method):
    a, b = make_pair()
    data = make_loader(("blur", "noise", "blur+noise", "noise"))
    ref = reference_attribute(a, b, data, steps=6, method=method, keep_per_image=True)
    got = attribute(a, b, data, steps=6, method=method, strategy=strategy, precision="fp64",
                    keep_per_image=True, internal_batch_size=4)
    assert got.counts == ref.counts
    for label in ref.labels:
        torch.testing.assert_close(got.scores(label), ref.scores(label), rtol=1e-9, atol=1e-12)
        assert torch.equal(got.ranking(label), ref.ranking(label))
    for x, y in zip(got.image_scores, ref.image_scores):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
def test_device_accumulation_equals_per_image_sums(dtype, backend, monkeypatch):
    """The fused reduce-and-accumulate kernel sums each degradation on the device; the per-image scores
    kept on request add up to the same sums, and keeping them does not change the sums."""
    from faig_fast.core import scoring

    calls = []
    fused = scoring.filter_abs_sum_accumulate
    monkeypatch.setattr(scoring, "filter_abs_sum_accumulate", lambda *a, **k: calls.append(1) or fused(*a, **k))
    a, b = make_pair(dtype=dtype)
    lq, gt = make_images(4, dtype=dtype)
    batched = [(lq[:3], gt[:3], ["noise", "blur", "noise"]), (lq[3], gt[3], "clean")]
    kw = dict(steps=3, strategy="vmap", backend=backend, precision="fp64" if dtype == torch.float64 else "fp32")
    kept = attribute(a, b, batched, keep_per_image=True, **kw)
    assert calls
    dev = attribute(a, b, batched, **kw)
    assert dev.counts == kept.counts == {"noise": 2, "blur": 1, "clean": 1}
    assert dev.image_labels == kept.image_labels == ["noise", "blur", "noise", "clean"]
    assert not dev.image_scores and len(kept.image_scores) == 4
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-9)
    for label in kept.labels:
        assert torch.equal(dev.sums[label], kept.sums[label])
        per_image = sum(s for s, l in zip(kept.image_scores, kept.image_labels) if l == label)
        torch.testing.assert_close(dev.sums[label], per_image, **tol)
        assert dev.sums[label].dtype == torch.float64 and dev.sums[label].device.type == "cpu"


@pytest.mark.parametrize("internal_batch_size", [1, 2, None])
def test_label_sums_with_internal_batch_chunks(internal_batch_size):
    """Mixed labels in one batch, cut into chunks of internal_batch_size images: every label's device sum
    equals the sum of the reference's per-image scores of that label."""
    a, b = make_pair()
    lq, gt = make_images(5)
    labels = ["noise", "blur", "noise", "clean", "noise"]
    ref = reference_attribute(a, b, [(lq[i], gt[i], labels[i]) for i in range(5)], steps=3, keep_per_image=True)
    for strategy in ("vmap", "loop"):
        got = attribute(a, b, [(lq, gt, labels)], steps=3, strategy=strategy, precision="fp64",
                        internal_batch_size=internal_batch_size)
        assert got.counts == {"noise": 3, "blur": 1, "clean": 1}
        for label in ("noise", "blur", "clean"):
            expect = sum(s for s, l in zip(ref.image_scores, labels) if l == label)
            torch.testing.assert_close(got.sums[label], expect, rtol=1e-9, atol=1e-12)


def test_label_sums_add_rows_by_label_in_any_order():
    from faig_fast.core.scoring import LabelSums

    def sums(labels, rows):
        s = LabelSums(2, torch.device("cpu"))
        s.label_index(labels)
        s.totals += torch.tensor(rows, dtype=torch.float64)
        return s

    run = sums(["blur", "noise"], [[1, 2], [3, 4]])
    run.add(sums(["blur", "noise"], [[10, 20], [30, 40]]))  # rows line up
    run.add(sums(["clean", "noise", "blur"], [[5, 6], [100, 200], [300, 400]]))  # new and permuted labels
    run.add(LabelSums(2, torch.device("cpu")))  # nothing
    got = {l: t.tolist() for l, t in run.to_host().items()}
    assert got == {"blur": [311, 422], "noise": [133, 244], "clean": [5, 6]}


def test_vmap_batches_images_of_equal_size():
    a, b = make_pair()
    lq, gt = make_images(3)
    batched = [(lq, gt, ["blur", "noise", "blur"])]
    single = make_loader(("blur", "noise", "blur"))
    x = attribute(a, b, batched, steps=4, strategy="vmap", precision="fp64", keep_per_image=True)
    y = reference_attribute(a, b, single, steps=4, keep_per_image=True)
    for s, t in zip(x.image_scores, y.image_scores):
        torch.testing.assert_close(s, t, rtol=1e-9, atol=1e-12)


def test_fp32_engine_matches_fp64_reference():
    a, b = make_pair()
    data = make_loader()
    ref = reference_attribute(a, b, data, steps=8)
    got = attribute(a.float(), b.float(), [(x.float(), y.float(), l) for x, y, l in data], steps=8)
    torch.testing.assert_close(got.scores("blur"), ref.scores("blur"), rtol=1e-4, atol=1e-6)


def test_convergence_delta_reported():
    a, b = make_pair(noise=0.2)
    data = make_loader(("blur",))
    coarse = attribute(a, b, data, steps=4, precision="fp64", return_convergence_delta=True)
    fine = attribute(a, b, data, steps=8, method="gausslegendre", precision="fp64", return_convergence_delta=True)
    assert len(coarse.convergence_delta) == 1
    # measured on this pair: left Riemann N=4 ≈ 1e-1, Gauss–Legendre 8 nodes ≈ 8e-5 (LeakyReLU kinks)
    assert fine.convergence_delta[0] < 1e-3 < coarse.convergence_delta[0]


def test_dict_batches_and_label_sequences():
    a, b = make_pair()
    lq, gt = make_images(2)
    res = attribute(a, b, [{"lq": lq, "gt": gt, "label": ("blur", "noise"), "name": ["x", "y"]}], steps=2)
    assert res.counts == {"blur": 1, "noise": 1}
    assert res.image_names == ["x", "y"]


def test_index_convention_matches_state_dict_row_major():
    a, b = make_pair(feat=4)
    index = FilterIndex.from_model(b)
    assert [l.name for l in index.layers] == ["head.weight", "mid.weight", "tail.weight"]
    assert len(index) == 4 * 3 + 4 * 4 + 12 * 4
    info = index.lookup(12 + 2 * 4 + 1)
    assert (info.layer, info.out_channel, info.in_channel) == ("mid.weight", 2, 1)
    flat = list(index)
    assert [f.index for f in flat] == list(range(len(index)))
    assert flat[5] == ("head.weight", 1, 2, 5)
    with pytest.raises(InvalidInputError):
        index.lookup(len(index))


def test_top_and_ranking():
    a, b = make_pair()
    res = attribute(a, b, make_loader(), steps=3)
    n = len(res.index)
    assert top_count(n, 0.01) == 1
    top = res.top("blur", 0.1)
    assert len(top) == math.floor(0.1 * n)
    s = res.scores("blur")
    assert torch.all(s[top].min() >= s[res.ranking("blur")[len(top):]])


def test_save_load_round_trip(tmp_path):
    a, b = make_pair()
    res = attribute(a, b, make_loader(), steps=3, keep_per_image=True, return_convergence_delta=True)
    path = res.save(tmp_path / "attr.safetensors")
    back = Attribution.load(path)
    assert back.counts == res.counts and back.index == res.index
    assert back.image_names == res.image_names and back.convergence_delta == res.convergence_delta
    for l in res.labels:
        assert torch.equal(back.scores(l), res.scores(l))
    assert back.meta["model_a_sha256"] == res.meta["model_a_sha256"]
    assert back.meta["version"] == faig_fast.__version__
    assert all(torch.equal(x, y) for x, y in zip(back.image_scores, res.image_scores))


def test_index_file_round_trip(tmp_path):
    write_index_file(torch.tensor([5, 2, 9]), tmp_path / "idx.txt")
    assert read_index_file(tmp_path / "idx.txt").tolist() == [5, 2, 9]
    (tmp_path / "bad.txt").write_text("1 2 x")
    with pytest.raises(InvalidInputError, match="bad.txt"):
        read_index_file(tmp_path / "bad.txt")
    assert jaccard([1, 2, 3], [2, 3, 4]) == 0.5


# bad input --------------------------------------------------------------------------------------

def test_mismatched_architectures():
    a, _ = make_pair(feat=4)
    _, b = make_pair(feat=5)
    with pytest.raises(ModelMismatchError, match="head.weight"):
        attribute(a, b, make_loader(), steps=2)
    with pytest.raises(ModelMismatchError, match="TinySR"):
        attribute(a, nn.Sequential(nn.Conv2d(3, 3, 3)), make_loader(), steps=2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_weights(bad):
    a, b = make_pair()
    with torch.no_grad():
        b.mid.weight[0, 0, 0, 0] = bad
    with pytest.raises(InvalidInputError, match="mid.weight"):
        attribute(a, b, make_loader(), steps=2)


def test_empty_loader(pair):
    with pytest.raises(InvalidInputError, match="no images"):
        attribute(*pair, [], steps=2)


def test_wrong_scale(pair):
    lq, gt = make_images(1)
    with pytest.raises(InvalidInputError, match="scale 2"):
        attribute(*pair, [(lq, gt[..., :-2, :], "blur")], steps=2)


@pytest.mark.parametrize("mutate, match", [
    (lambda lq: lq * 3, r"\[0, 1\]"),
    (lambda lq: lq.masked_fill(lq > 0.5, float("nan")), "NaN"),
    (lambda lq: lq[:, :1], "cannot run on lq of shape \\(1, 6, 6\\)"),
    (lambda lq: (lq * 255).to(torch.uint8), "float"),
    (lambda lq: lq.numpy(), "torch.Tensor"),
    (lambda lq: lq[..., :0], "empty"),
])
def test_bad_images(pair, mutate, match):
    lq, gt = make_images(1)
    with pytest.raises(InvalidInputError, match=f"batch 0: .*{match}"):
        attribute(*pair, [(mutate(lq), gt, "blur")], steps=2)


def test_gt_channels_must_match_the_output(pair):
    lq, gt = make_images(1)
    with pytest.raises(InvalidInputError, match=r"batch 0: .*output of shape \(3, 12, 12\).*gt has shape \(1, 12, 12\)"):
        attribute(*pair, [(lq, gt[:, :1], "blur")], steps=2)
    with pytest.raises(InvalidInputError, match="batch 1: lq/gt have 3/1 channels but the first batch had 3/3"):
        attribute(*pair, [(lq, gt, "blur"), (lq, gt[:, :1], "blur")], steps=2)


def test_names_must_match_the_batch(pair):
    lq, gt = make_images(3)
    with pytest.raises(InvalidInputError, match="batch 0: 2 names for 3 images"):
        attribute(*pair, [{"lq": lq, "gt": gt, "label": ["blur"] * 3, "name": ["x", "y"]}], steps=2)
    with pytest.raises(InvalidInputError, match="batch 0: 4 names for 3 images"):
        attribute(*pair, [(lq, gt, ["blur"] * 3, ["w", "x", "y", "z"])], steps=2)


def test_bad_labels(pair):
    lq, gt = make_images(2)
    with pytest.raises(InvalidInputError, match="labels"):
        attribute(*pair, [(lq, gt, ["blur"])], steps=2)
    with pytest.raises(InvalidInputError, match="label"):
        attribute(*pair, [(lq, gt, 3)], steps=2)


def test_unknown_label_in_scores(pair):
    res = attribute(*pair, make_loader(), steps=2)
    with pytest.raises(InvalidInputError, match="unknown degradation label 'jpeg'"):
        res.scores("jpeg")


def test_bad_quadrature(pair):
    with pytest.raises(InvalidInputError, match="quadrature"):
        attribute(*pair, make_loader(), method="simpson")
    with pytest.raises(InvalidInputError, match="steps"):
        attribute(*pair, make_loader(), steps=0)


def test_errors_share_one_base():
    assert issubclass(InvalidInputError, FAIGError) and issubclass(ModelMismatchError, FAIGError)


def test_model_without_convs():
    a, b = nn.Sequential(nn.Linear(3, 3)), nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(InvalidInputError, match="no convolution"):
        attribute(a, b, make_loader(), steps=2)


def test_tune_keeps_the_fastest_measured_strategy():
    a, b = make_pair()
    res = attribute(a, b, make_loader(("blur",)), steps=3, strategy="tune")
    assert res.meta["strategy"] in ("loop", "vmap", "linear")


def test_fused_triton_epilogue_matches_torch(monkeypatch):
    """The linear-path conv with the Triton epilogue (interpreted on CPU) equals the PyTorch combine."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from faig_fast.core.engine import linear_path_conv

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.rand(5, 3, 6, 6)
    alphas = torch.linspace(0, 1, 5)
    dw, db = torch.randn_like(conv.weight), torch.randn_like(conv.bias)
    w = conv.weight.detach().clone().requires_grad_()
    b = conv.bias.detach().clone().requires_grad_()
    outs, grads = [], []
    for fused in (False, True):
        y = linear_path_conv(x, w, dw, b, db, alphas, conv, fused=fused)
        gw, gb = torch.autograd.grad((y ** 2).sum(), (w, b))
        outs.append(y.detach())
        grads.append((gw, gb))
    torch.testing.assert_close(outs[0], outs[1])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-5)


# any restoration network: channels, scale 1, inferred scale ------------------------------------

def _perturbed_pair(cls, seed: int = 0, noise: float = 0.05, **kw):
    torch.manual_seed(seed)
    a = cls(**kw).double().eval()
    b = cls(**kw).double().eval()
    b.load_state_dict({k: v + noise * torch.randn_like(v) if v.is_floating_point() else v
                       for k, v in a.state_dict().items()})
    return a, b



class NoiseMapSR(nn.Module):
    """×2 SR taking RGB plus a noise-level map (4 channels in, 3 out), FFDNet-style."""

    def __init__(self):
        super().__init__()
        self.scale = 2
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 12, 3, padding=1)
        self.shuffle = nn.PixelShuffle(2)

    def forward(self, x):
        return self.shuffle(self.tail(torch.relu(self.head(x))))


class PaddedX3(nn.Module):
    """×3 SR without a scale attribute that pads its input to a multiple of 4 and crops the output back."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 27, 3, padding=1)
        self.shuffle = nn.PixelShuffle(3)

    def forward(self, x):
        h, w = x.shape[-2:]
        x = torch.nn.functional.pad(x, (0, -w % 4, 0, -h % 4), mode="reflect")
        return self.shuffle(self.conv(x))[..., : 3 * h, : 3 * w]


def _assert_equals_reference(a, b, data, steps=4, **kw):
    ref = reference_attribute(a, b, data, steps=steps, keep_per_image=True)
    got = attribute(a, b, data, steps=steps, precision="fp64", keep_per_image=True, **kw)
    assert got.counts == ref.counts
    for x, y in zip(got.image_scores, ref.image_scores):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    for label in ref.labels:
        torch.testing.assert_close(got.sums[label], ref.sums[label], rtol=1e-9, atol=1e-12)
    return got


@pytest.mark.parametrize("strategy", ["loop", "vmap", "linear"])
def test_grayscale_scale1_denoiser(strategy):
    a, b = _perturbed_pair(GrayDenoiser)
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64)
    lq = (gt + 0.1 * torch.randn(gt.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    data = [(lq[i], gt[i], ("noise", "clean", "noise")[i]) for i in range(3)]
    got = _assert_equals_reference(a, b, data, strategy=strategy)
    assert got.meta["scale"] == 1


def test_four_channel_input_model():
    a, b = _perturbed_pair(NoiseMapSR)
    lq, gt = make_images(3)
    noise_map = torch.full_like(lq[:, :1], 0.1)
    data = [(torch.cat([lq[i], noise_map[i]]), gt[i], "noise") for i in range(3)]
    got = _assert_equals_reference(a, b, data, strategy="vmap")
    assert got.meta["scale"] == 2
    with pytest.raises(InvalidInputError, match="batch 0: the model cannot run on lq of shape \\(3, 6, 6\\)"):
        attribute(a, b, [(lq[0], gt[0], "noise")], steps=2)


def test_scale_inferred_from_one_output():
    a, b = _perturbed_pair(PaddedX3)
    g = torch.Generator().manual_seed(0)
    gt = torch.rand(2, 3, 15, 15, generator=g, dtype=torch.float64)
    lq = torch.nn.functional.avg_pool2d(gt, 3)  # 5x5: the model pads it to 8x8 inside
    got = _assert_equals_reference(a, b, [(lq, gt, ["blur", "noise"])], strategy="loop")
    assert got.meta["scale"] == 3
    with pytest.raises(InvalidInputError, match="batch 0: gt size 10x10 is not lq size 5x5 times the model scale 3"):
        attribute(a, b, [(lq, gt[..., :10, :10], ["blur", "noise"])], steps=2)
    with pytest.raises(InvalidInputError, match="batch 1: gt size 12x12 is not lq size 5x5 times the model scale 3"):
        attribute(a, b, [(lq, gt, ["blur", "noise"]), (lq, gt[..., :12, :12].contiguous(), ["blur", "noise"])],
                  steps=2)


def test_scale_that_is_not_an_integer_is_refused():
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Conv2d(3, 3, 3)).double(), nn.Sequential(nn.Conv2d(3, 3, 3)).double()  # 6x6 -> 4x4
    lq, gt = make_images(1, scale=1)
    with pytest.raises(InvalidInputError, match="batch 0: cannot infer the model's scale: an input of 6x6 gives an "
                                                "output of 4x4"):
        attribute(a, b, [(lq, gt, "blur")], steps=2)


def test_resolve_scale_is_the_cli_s_scale_before_any_data():
    """Declared, else measured on a private copy by the same probe and inference the run uses."""
    from faig_fast.core.batches import resolve_scale

    a, _ = _perturbed_pair(PaddedX3)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    assert resolve_scale(a) == 3 and resolve_scale(GrayDenoiser(), channels=1) == 1
    assert resolve_scale(make_pair()[1]) == 2  # declared (upscale = 2)
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())
    with pytest.raises(InvalidInputError, match=r"--target m.pth \(declares no scale; measuring it\): the model "
                                                r"cannot run on lq of shape \(3, 24, 24\)"):
        resolve_scale(nn.Sequential(nn.Conv2d(4, 3, 3)), where="--target m.pth")
    with pytest.raises(InvalidInputError, match="cannot infer the model's scale"):
        resolve_scale(nn.Sequential(nn.Conv2d(3, 3, 3)))


class _Items(torch.utils.data.Dataset):
    """A map-style dataset of single (lq, gt, label) images without item names; counts its loads."""

    def __init__(self, items):
        self.items, self.loaded = items, []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.loaded.append(i)
        return self.items[i]


def test_a_dataset_runs_in_planned_batches_with_position_names():
    from faig_fast.core.batches import iterate_units

    a, b = make_pair()
    data = make_loader(("blur", "noise", "blur"))
    ds = _Items(data)
    got = attribute(a, b, ds, steps=4, precision="fp64", keep_per_image=True)
    ref = attribute(a, b, data, steps=4, precision="fp64", keep_per_image=True)
    assert got.image_names == ref.image_names == ["image0", "image1", "image2"]
    for x, y in zip(got.image_scores, ref.image_scores):
        assert torch.equal(x, y)
    ds.loaded.clear()  # a shard's other units are not loaded
    units = list(iterate_units(ds, lambda batch, where: batch, wanted=lambda j: j == 1))
    assert [u.positions for u in units] == [[0], [1], [2]] and [u.parts is None for u in units] == [True, False, True]
    assert ds.loaded == [1]
    lq, gt = make_images(2)
    with pytest.raises(InvalidInputError, match="item 0: a dataset item must be one image, got a batch of 2"):
        attribute(a, b, _Items([(lq, gt, ["blur", "noise"])]), steps=2)


# filters and mode ---------------------------------------------------------------------------------

class ConvLinear(nn.Module):
    """A conv, then a Linear mixing channels at every pixel (as transformer blocks do), scale 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.mix = nn.Linear(4, 3)

    def forward(self, x):
        return self.mix(torch.relu(self.conv(x)).permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x


def test_filters_conv_plus_linear_equals_reference():
    a, b = _perturbed_pair(ConvLinear)
    lq, _ = make_images(2)
    data = [(lq[i], lq[i].flip(-1), "blur") for i in range(2)]
    ref = reference_attribute(a, b, data, steps=3, filters="conv+linear", keep_per_image=True)
    got = attribute(a, b, data, steps=3, precision="fp64", filters="conv+linear", keep_per_image=True)
    conv_only = attribute(a, b, data, steps=3, precision="fp64")
    assert len(got.index) == len(conv_only.index) + 12 and got.meta["filters"] == "conv+linear"
    for x, y in zip(got.image_scores, ref.image_scores):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.sums["blur"][: len(conv_only.index)], conv_only.sums["blur"], rtol=1e-12, atol=0)


def test_mode_reaches_the_engine():
    """BatchNorm in train mode uses batch statistics: mode='train' must differ from 'eval' and equal the
    reference loop run in train mode."""
    class BN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.conv(x))

    a, b = _perturbed_pair(BN)
    lq, _ = make_images(2)
    data = [(lq[i], lq[i].flip(-1), "blur") for i in range(2)]
    ref = reference_attribute(a, b, data, steps=3, mode="train")
    got = attribute(a, b, data, steps=3, precision="fp64", mode="train")
    assert got.meta["mode"] == "train"
    torch.testing.assert_close(got.sums["blur"], ref.sums["blur"], rtol=1e-9, atol=1e-12)
    assert not torch.allclose(attribute(a, b, data, steps=3, precision="fp64").sums["blur"], ref.sums["blur"])


def test_unknown_filters_and_mode(pair):
    with pytest.raises(InvalidInputError, match="filters must be one of .*got 'linear'"):
        attribute(*pair, make_loader(), steps=2, filters="linear")
    with pytest.raises(InvalidInputError, match="unknown mode 'inference'"):
        attribute(*pair, make_loader(), steps=2, mode="inference")
