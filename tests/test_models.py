"""Models, registry and checkpoint I/O: architecture fidelity to BasicSR, BasicSR `.pth`
compatibility, safetensors round trips, and clear CheckpointErrors for every bad file."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import faig_fast
from faig_fast.errors import CheckpointError, InvalidInputError
from faig_fast.models import (
    MSRResNet, SRCNNStyle, create_model, list_models, load_model, load_state_dict_file,
    read_metadata, save_model,
)
from faig_fast.models.checkpoint import infer_msrresnet_args, infer_srcnn_style_args


def _tiny(arch: str, upscale: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(arch, preset="tiny", upscale=upscale).eval()


def _x(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 6, 7, generator=g)


def _basicsr_keys(num_block: int, upscale: int) -> list[str]:
    keys = ["conv_first.weight", "conv_first.bias"]
    for i in range(num_block):
        keys += [f"body.{i}.conv1.weight", f"body.{i}.conv1.bias",
                 f"body.{i}.conv2.weight", f"body.{i}.conv2.bias"]
    keys += ["upconv1.weight", "upconv1.bias"]
    if upscale == 4:
        keys += ["upconv2.weight", "upconv2.bias"]
    return keys + ["conv_hr.weight", "conv_hr.bias", "conv_last.weight", "conv_last.bias"]


# ------------------------------------------------------------------ architectures

@pytest.mark.parametrize("arch", ["msrresnet", "srcnn_style"])
@pytest.mark.parametrize("scale", [2, 3, 4])
def test_output_shapes(arch, scale):
    m = _tiny(arch, scale)
    assert m.upscale == scale
    with torch.no_grad():
        y = m(_x())
    assert y.shape == (2, 3, 6 * scale, 7 * scale)
    assert torch.isfinite(y).all()


def test_msrresnet_exact_basicsr_keys_x2():
    m = MSRResNet(num_feat=8, num_block=2, upscale=2)
    assert list(m.state_dict()) == [
        "conv_first.weight", "conv_first.bias",
        "body.0.conv1.weight", "body.0.conv1.bias", "body.0.conv2.weight", "body.0.conv2.bias",
        "body.1.conv1.weight", "body.1.conv1.bias", "body.1.conv2.weight", "body.1.conv2.bias",
        "upconv1.weight", "upconv1.bias",
        "conv_hr.weight", "conv_hr.bias", "conv_last.weight", "conv_last.bias",
    ]
    assert m.state_dict()["upconv1.weight"].shape == (8 * 4, 8, 3, 3)


def test_msrresnet_exact_basicsr_keys_x4():
    m = MSRResNet(num_feat=8, num_block=2, upscale=4)
    assert list(m.state_dict()) == [
        "conv_first.weight", "conv_first.bias",
        "body.0.conv1.weight", "body.0.conv1.bias", "body.0.conv2.weight", "body.0.conv2.bias",
        "body.1.conv1.weight", "body.1.conv1.bias", "body.1.conv2.weight", "body.1.conv2.bias",
        "upconv1.weight", "upconv1.bias", "upconv2.weight", "upconv2.bias",
        "conv_hr.weight", "conv_hr.bias", "conv_last.weight", "conv_last.bias",
    ]
    sd = m.state_dict()
    assert sd["upconv1.weight"].shape == sd["upconv2.weight"].shape == (32, 8, 3, 3)


def test_msrresnet_x3_upconv_shape_and_init():
    torch.manual_seed(0)
    m = MSRResNet(num_feat=16, num_block=1, upscale=3)
    sd = m.state_dict()
    assert sd["upconv1.weight"].shape == (16 * 9, 16, 3, 3)
    for k, v in sd.items():
        if k.endswith("bias"):
            assert torch.count_nonzero(v) == 0, k
    # kaiming_normal (fan_in, gain sqrt(2)) scaled by 0.1 -> std ~ 0.1*sqrt(2/fan_in)
    w = sd["body.0.conv1.weight"]
    expected = 0.1 * (2.0 / (16 * 9)) ** 0.5
    assert 0.7 * expected < w.std().item() < 1.3 * expected


def _reference_msrresnet(sd, x, num_block, upscale):
    """BasicSR's MSRResNet.forward written functionally from a state dict."""
    def conv(name, t):
        return F.conv2d(t, sd[f"{name}.weight"], sd[f"{name}.bias"], padding=1)

    def lrelu(t):
        return F.leaky_relu(t, 0.1)

    out = feat = lrelu(conv("conv_first", x))
    for i in range(num_block):
        out = out + conv(f"body.{i}.conv2", F.relu(conv(f"body.{i}.conv1", out)))
    if upscale == 4:
        out = lrelu(F.pixel_shuffle(conv("upconv1", out), 2))
        out = lrelu(F.pixel_shuffle(conv("upconv2", out), 2))
    else:
        out = lrelu(F.pixel_shuffle(conv("upconv1", out), upscale))
    del feat
    out = conv("conv_last", lrelu(conv("conv_hr", out)))
    return out + F.interpolate(x, scale_factor=upscale, mode="bilinear", align_corners=False)


@pytest.mark.parametrize("scale", [2, 3, 4])
def test_msrresnet_matches_functional_basicsr_forward(scale):
    m = _tiny("msrresnet", scale)
    x = _x()
    with torch.no_grad():
        ref = _reference_msrresnet(m.state_dict(), x, m.num_block, scale)
        torch.testing.assert_close(m(x), ref, rtol=0, atol=1e-6)


def test_srcnn_style_has_exactly_nine_convs():
    m = SRCNNStyle(num_feat=16, num_mid=32, upscale=2)
    weights = [k for k in m.state_dict() if k.endswith("weight")]
    assert weights == [f"features.{i}.weight" for i in (0, 2, 4, 6, 8, 10, 12, 15, 17)]
    assert all(k.startswith("features.") for k in m.state_dict())
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 9
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 16), (16, 32), (32, 32), (32, 32), (32, 32), (32, 32), (32, 128), (32, 32), (32, 3)]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)


def test_no_inplace_activations_and_torch_func_grad():
    for arch in ("msrresnet", "srcnn_style"):
        m = _tiny(arch, 2)
        for mod in m.modules():
            assert not getattr(mod, "inplace", False), (arch, mod)
        params = {k: v.detach() for k, v in m.named_parameters()}
        x = _x()

        def loss(p):
            return torch.func.functional_call(m, p, (x,)).square().mean()

        grads = torch.func.grad(loss)(params)
        assert set(grads) == set(params)


def test_config_rebuilds_model():
    for arch in ("msrresnet", "srcnn_style"):
        m = _tiny(arch, 3)
        cfg = m.config()
        assert cfg["arch"] == arch
        m2 = create_model(cfg["arch"], **cfg["args"])
        assert m2.config() == cfg
        json.dumps(cfg)


# ------------------------------------------------------------------ registry

def test_registry_names_and_presets():
    assert list_models() == ["msrresnet", "srcnn_style"]
    paper = create_model("msrresnet", preset="paper")
    assert (paper.num_block, paper.num_feat, paper.upscale) == (16, 64, 4)
    assert len(paper.body) == 16
    tiny = create_model("msrresnet", preset="tiny", upscale=2)
    assert (tiny.num_block, tiny.num_feat) == (2, 16)
    s = create_model("srcnn_style", preset="paper")
    assert (s.num_feat, s.num_mid) == (64, 128)
    s = create_model("srcnn_style", preset="tiny", num_mid=8)  # kwargs override the preset
    assert (s.num_feat, s.num_mid) == (16, 8)


def test_registry_errors():
    with pytest.raises(InvalidInputError, match="msrresnet.*srcnn_style"):
        create_model("edsr")
    with pytest.raises(InvalidInputError, match="paper.*tiny"):
        create_model("msrresnet", preset="huge")
    with pytest.raises(InvalidInputError, match="num_blocks"):
        create_model("msrresnet", num_blocks=3)
    for bad in (1, 5, 8, 2.0, True):
        with pytest.raises(InvalidInputError, match="upscale"):
            create_model("msrresnet", preset="tiny", upscale=bad)
        with pytest.raises(InvalidInputError, match="upscale"):
            SRCNNStyle(upscale=bad)
    with pytest.raises(InvalidInputError, match="num_feat"):
        MSRResNet(num_feat=0)


# ------------------------------------------------------------------ BasicSR .pth files

@pytest.mark.parametrize("layout", ["params_ema", "params", "raw", "module", "both"])
def test_basicsr_pth_layouts_load_exactly(tmp_path, layout):
    m = _tiny("msrresnet", 4)
    sd = m.state_dict()
    if layout == "params_ema":
        obj = {"params_ema": sd}
    elif layout == "params":
        obj = {"params": sd}
    elif layout == "raw":
        obj = sd
    elif layout == "module":
        obj = {"params": {f"module.{k}": v for k, v in sd.items()}}
    else:  # params_ema wins over params
        obj = {"params": {k: torch.zeros_like(v) for k, v in sd.items()}, "params_ema": sd}
    path = tmp_path / "net_g.pth"
    torch.save(obj, path)

    loaded_sd = load_state_dict_file(path)
    assert list(loaded_sd) == list(sd)
    for k in sd:
        assert torch.equal(loaded_sd[k], sd[k])

    m2 = load_model(path, arch="msrresnet")  # args inferred from key shapes
    assert not m2.training
    assert m2.config() == m.config()
    x = _x()
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))


def test_pth_without_arch_is_explained(tmp_path):
    path = tmp_path / "net.pth"
    torch.save({"params": _tiny("msrresnet").state_dict()}, path)
    assert read_metadata(path) == {}
    with pytest.raises(CheckpointError, match="arch") as ei:
        load_model(path)
    assert str(path) in str(ei.value)


def test_srcnn_style_pth_with_explicit_and_inferred_args(tmp_path):
    m = _tiny("srcnn_style", 3)
    path = tmp_path / "srcnn.pt"
    torch.save(m.state_dict(), path)
    assert infer_srcnn_style_args(m.state_dict()) == m.config()["args"]
    x = _x()
    with torch.no_grad():
        for m2 in (load_model(path, arch="srcnn_style"),
                   load_model(path, arch="srcnn_style", preset="tiny", upscale=3)):
            assert torch.equal(m2(x), m(x))


def test_infer_msrresnet_args():
    for scale in (2, 3, 4):
        m = MSRResNet(num_in_ch=1, num_out_ch=2, num_feat=8, num_block=3, upscale=scale)
        assert infer_msrresnet_args(m.state_dict()) == m.config()["args"]
    with pytest.raises(CheckpointError, match="conv_first.weight"):
        infer_msrresnet_args({"conv_last.weight": torch.zeros(3, 8, 3, 3)})


# ------------------------------------------------------------------ safetensors round trip

@pytest.mark.parametrize("arch", ["msrresnet", "srcnn_style"])
def test_safetensors_round_trip_from_file_alone(tmp_path, arch):
    m = _tiny(arch, 3)
    path = tmp_path / "model.safetensors"
    save_model(m, path, metadata={"role": "target", "noise": [0, 10]})
    meta = read_metadata(path)
    assert meta["arch"] == arch and meta["args"] == m.config()["args"]
    assert meta["role"] == "target" and meta["noise"] == [0, 10]
    # The header is the documented {"faig_fast": json} entry.
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["faig_fast"]) == meta

    m2 = load_model(path)
    assert type(m2) is type(m) and not m2.training
    assert m2.config() == m.config()
    x = _x()
    with torch.no_grad():
        assert torch.equal(m2(x), m(x))
    assert load_state_dict_file(path).keys() == m.state_dict().keys()
    # No temp files left behind.
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_safetensors_arch_conflict_and_bad_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(_tiny("msrresnet"), path)
    with pytest.raises(CheckpointError, match="srcnn_style"):
        load_model(path, arch="srcnn_style")
    assert isinstance(load_model(path, arch="msrresnet"), MSRResNet)
    with pytest.raises(InvalidInputError, match="reserved"):
        save_model(_tiny("msrresnet"), tmp_path / "x.safetensors", metadata={"arch": "x"})
    with pytest.raises(InvalidInputError, match="JSON"):
        save_model(_tiny("msrresnet"), tmp_path / "y.safetensors", metadata={"t": object()})
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_plain_safetensors_without_metadata(tmp_path):
    m = _tiny("msrresnet", 2)
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({f"module.{k}": v.contiguous() for k, v in m.state_dict().items()},
                                str(path))
    assert read_metadata(path) == {}
    with pytest.raises(CheckpointError, match="arch"):
        load_model(path)
    m2 = load_model(path, arch="msrresnet")
    with torch.no_grad():
        assert torch.equal(m2(_x()), m(_x()))


# ------------------------------------------------------------------ failures

def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    for fn in (load_state_dict_file, read_metadata, load_model):
        with pytest.raises(CheckpointError, match="not found") as ei:
            fn(path)
        assert str(path) in str(ei.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_files(tmp_path, suffix, damage):
    m = _tiny("msrresnet")
    path = tmp_path / f"m{suffix}"
    if suffix == ".pth":
        torch.save({"params": m.state_dict()}, path)
    else:
        save_model(m, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x13\x37 definitely not a checkpoint " * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError) as ei:
        load_model(path, arch="msrresnet")
    assert str(path) in str(ei.value)


def test_non_tensor_contents(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"params": {"conv_first.weight": torch.zeros(1), "conv_first.bias": 3}}, path)
    with pytest.raises(CheckpointError, match="conv_first.bias") as ei:
        load_state_dict_file(path)
    assert str(path) in str(ei.value)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="list"):
        load_state_dict_file(path)
    torch.save({}, path)
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict_file(path)


def test_key_and_shape_mismatches(tmp_path):
    m = _tiny("msrresnet", 2)
    sd = dict(m.state_dict())
    path = tmp_path / "m.pth"

    missing = {k: v for k, v in sd.items() if k != "conv_hr.bias"}
    torch.save(missing, path)
    with pytest.raises(CheckpointError, match="missing key 'conv_hr.bias'") as ei:
        load_model(path, arch="msrresnet")
    assert str(path) in str(ei.value)

    torch.save({**sd, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="unexpected key 'extra.weight'"):
        load_model(path, arch="msrresnet")

    torch.save({**sd, "conv_hr.weight": torch.zeros(16, 16, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="shape mismatch for 'conv_hr.weight'"):
        load_model(path, arch="msrresnet")

    # Explicit args that disagree with the file: shape mismatch, not a raw RuntimeError.
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match="conv_first.weight"):
        load_model(path, arch="msrresnet", num_feat=8)
    # Wrong architecture altogether.
    with pytest.raises(CheckpointError, match="features.0.weight"):
        load_model(path, arch="srcnn_style")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights(tmp_path, bad):
    m = _tiny("srcnn_style", 2)
    with torch.no_grad():
        m.features[15].weight[0, 0, 1, 1] = bad
    path = tmp_path / "nan.safetensors"
    save_model(m, path)
    with pytest.raises(CheckpointError, match="features.15.weight") as ei:
        load_model(path)
    assert str(path) in str(ei.value)


def test_atomic_save_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    old = _tiny("msrresnet", 2)
    save_model(old, path)
    before = path.read_bytes()

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # leave a half-written temp file behind
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(CheckpointError, match="disk full") as ei:
        save_model(_tiny("srcnn_style", 4), path)
    assert str(path) in str(ei.value)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]
    monkeypatch.undo()
    m2 = load_model(path)
    with torch.no_grad():
        assert torch.equal(m2(_x()), old(_x()))


SHIPPED = sorted((Path(faig_fast.__file__).parent / "assets" / "pairs").iterdir())


@pytest.mark.parametrize("pair_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_pairs_load_as_matching_finite_pairs(pair_dir):
    from faig_fast.core.pair import check_pair

    base = load_model(pair_dir / "baseline.safetensors")
    target = load_model(pair_dir / "target.safetensors")
    check_pair(base, target)
    assert type(base).__name__ == type(target).__name__ and base.upscale == target.upscale == 2
    assert all(torch.isfinite(p).all() for p in [*base.parameters(), *target.parameters()])
    assert any(not torch.equal(p, q) for p, q in zip(base.parameters(), target.parameters()))
    for doc in ("README.md", "psnr.md", "log_baseline.jsonl", "log_target.jsonl"):
        assert (pair_dir / doc).is_file(), f"{pair_dir.name} lacks {doc}"


# ------------------------------------------------------------------ seeds and the caller's RNG

def test_create_model_with_seed_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    m = create_model("msrresnet", preset="tiny", seed=7)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's stream goes on as if nothing ran
    torch.manual_seed(7)
    ref = create_model("msrresnet", preset="tiny")  # the same weights as seeding globally
    other = create_model("msrresnet", preset="tiny", seed=8)
    for k, v in m.state_dict().items():
        assert torch.equal(v, ref.state_dict()[k]), k
    assert not torch.equal(m.state_dict()["conv_first.weight"], other.state_dict()["conv_first.weight"])
    with pytest.raises(InvalidInputError, match="seed"):
        create_model("msrresnet", seed=1.5)


def test_load_model_leaves_the_global_rng_alone(tmp_path):
    m = _tiny("srcnn_style")
    save_model(m, tmp_path / "m.safetensors")
    torch.save(m.state_dict(), tmp_path / "m.pth")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    load_model(tmp_path / "m.safetensors")  # building the model draws initial weights: from a forked RNG
    load_model(tmp_path / "m.pth", arch="srcnn_style")
    load_model(tmp_path / "m.pth", arch="auto")
    assert torch.equal(torch.get_rng_state(), before)


# ------------------------------------------------------------------ your own model: model_class, arch="auto"

_OWN_MODULE = '''
import torch
from torch import nn


class GrayDenoiser(nn.Module):
    """A 1-channel scale-1 residual denoiser with no `upscale` attribute."""

    def __init__(self, feat: int = 4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, feat, 3, padding=1), nn.ReLU(), nn.Conv2d(feat, 1, 3, padding=1))

    def forward(self, x):
        return x - self.body(x)


def make(feat=4):
    return GrayDenoiser(feat)
'''


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """A model class in a module that is importable only through sys.path (as a user's own code)."""
    name = f"own_arch_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(_OWN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    return importlib.import_module(name)


@pytest.mark.parametrize("layout", ["pth_raw", "pth_params", "pth_params_ema", "safetensors"])
def test_load_model_with_your_own_class(tmp_path, own_module, layout):
    torch.manual_seed(0)
    m = own_module.GrayDenoiser(feat=5).eval()
    sd = m.state_dict()
    path = tmp_path / ("w.safetensors" if layout == "safetensors" else "w.pth")
    if layout == "safetensors":
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save({"pth_raw": sd, "pth_params": {"params": sd}, "pth_params_ema": {"params_ema": sd}}[layout], path)
    spec = f"{own_module.__name__}:GrayDenoiser"
    x = torch.rand(1, 1, 6, 7, generator=torch.Generator().manual_seed(1))
    for loaded in (load_model(path, model_class=spec, model_kwargs={"feat": 5}),
                   load_model(path, model_class=own_module.GrayDenoiser, feat=5),
                   load_model(path, model_class=f"{own_module.__name__}:make", model_kwargs={"feat": 5})):
        assert type(loaded).__name__ == "GrayDenoiser" and not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x), m(x))


def test_own_class_errors_name_the_problem(tmp_path, own_module):
    path = tmp_path / "w.pth"
    torch.save(own_module.GrayDenoiser(feat=5).state_dict(), path)
    mod = own_module.__name__
    with pytest.raises(InvalidInputError, match="package.module:Class"):
        load_model(path, model_class="no_colon_here")
    with pytest.raises(InvalidInputError, match="cannot import module 'no_such_module_xyz'"):
        load_model(path, model_class="no_such_module_xyz:Net")
    with pytest.raises(InvalidInputError, match="has no attribute 'Nope'"):
        load_model(path, model_class=f"{mod}:Nope")
    with pytest.raises(InvalidInputError, match="cannot build GrayDenoiser"):
        load_model(path, model_class=f"{mod}:GrayDenoiser", model_kwargs={"width": 5})
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(path, model_class=f"{mod}:GrayDenoiser", model_kwargs={"feat": 4})
    with pytest.raises(InvalidInputError, match="not both"):
        load_model(path, arch="msrresnet", model_class=f"{mod}:GrayDenoiser")


def test_arch_auto_finds_registered_architectures(tmp_path):
    for arch, scale in (("msrresnet", 3), ("srcnn_style", 2)):
        m = _tiny(arch, scale)
        path = tmp_path / f"{arch}.pth"
        torch.save({"params_ema": m.state_dict()}, path)
        loaded = load_model(path, arch="auto")
        assert loaded.config() == m.config()


class _FakeDescriptor:
    def __init__(self, model, scale):
        self.model, self.scale = model, scale


def test_arch_auto_uses_spandrel_when_it_imports(tmp_path, own_module, monkeypatch):
    import sys
    import types

    path = tmp_path / "w.pth"
    net = own_module.GrayDenoiser(feat=3)
    torch.save(net.state_dict(), path)

    monkeypatch.setitem(sys.modules, "spandrel", None)  # not installed
    with pytest.raises(CheckpointError, match="pip install spandrel"):
        load_model(path, arch="auto")

    seen = {}

    class Loader:
        def load_from_state_dict(self, state):
            seen["keys"] = sorted(state)
            m = own_module.GrayDenoiser(feat=3)
            m.load_state_dict(state)
            return _FakeDescriptor(m, 1)

    monkeypatch.setitem(sys.modules, "spandrel", types.SimpleNamespace(ModelLoader=Loader))
    loaded = load_model(path, arch="auto")
    assert seen["keys"] == sorted(net.state_dict()) and loaded.upscale == 1 and not loaded.training
    x = torch.rand(1, 1, 5, 5)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))

    class Refuses:
        def load_from_state_dict(self, state):
            raise RuntimeError("Unsupported model")

    monkeypatch.setitem(sys.modules, "spandrel", types.SimpleNamespace(ModelLoader=Refuses))
    with pytest.raises(CheckpointError, match="spandrel cannot detect the architecture.*model_class"):
        load_model(path, arch="auto")
