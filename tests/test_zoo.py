"""A zoo of tiny architectures, one per trait researchers' restoration models have: every engine
strategy equals the reference loop at float64 (per parameter and per filter), and the caller's
models and images are bit-identical afterwards."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from conftest import perturb_

from faig_fast.core.engine import PathEngine, linear_path_blocker
from faig_fast.core.filters import FilterIndex
from faig_fast.core.reference import filter_scores, reference_image_faig
from faig_fast.errors import FAIGError

STEPS = 3


class WindowAttention(nn.Module):
    """Swin-style: 3×3 windows, a relative-position bias table indexed by an integer buffer, LayerNorm, Linear."""

    def __init__(self, dim: int = 4, win: int = 3):
        super().__init__()
        self.win = win
        self.head = nn.Conv2d(3, dim, 3, padding=1)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.table = nn.Parameter(0.1 * torch.randn((2 * win - 1) ** 2))
        c = torch.stack(torch.meshgrid(torch.arange(win), torch.arange(win), indexing="ij")).flatten(1)
        rel = (c[:, :, None] - c[:, None, :]).permute(1, 2, 0) + win - 1
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * win - 1) + rel[..., 1])
        self.tail = nn.Conv2d(dim, 3, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        b, c, hh, ww = h.shape
        w = self.win
        t = h.view(b, c, hh // w, w, ww // w, w).permute(0, 2, 4, 3, 5, 1).reshape(-1, w * w, c)
        q, k, v = self.qkv(self.norm(t)).chunk(3, dim=-1)
        bias = self.table[self.relative_position_index.view(-1)].view(w * w, w * w)
        att = torch.softmax(q @ k.transpose(-2, -1) / c ** 0.5 + bias, dim=-1)
        t = t + self.proj(att @ v)
        h = t.view(b, hh // w, ww // w, w, w, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hh, ww)
        return x + self.tail(h)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return x + self.tail(F.relu(self.bn(self.head(x))))


class InPlaceInput(nn.Module):
    """RCAN-style ``x *= rgb_range`` on the input itself."""

    def __init__(self, rgb_range: float = 255.0):
        super().__init__()
        self.rgb_range = rgb_range
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        x *= self.rgb_range
        return (x + self.tail(F.relu(self.head(x)))) / self.rgb_range


class OutOfPlaceInput(InPlaceInput):
    def forward(self, x):
        x = x * self.rgb_range
        return (x + self.tail(F.relu(self.head(x)))) / self.rgb_range


class NonPersistentBuffers(nn.Module):
    """OmniSR-style buffers left out of ``state_dict``: a floating mean and an integer index."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.4, 0.45, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("perm", torch.tensor([2, 0, 1, 3]), persistent=False)
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.head(x - self.mean))[:, self.perm]
        return self.tail(h) + self.mean


class Reparam(nn.Module):
    """SPAN-style: training branches (3×3 + 1×1) that eval folds into one conv, so eval leaves them unused."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.branch3 = nn.Conv2d(4, 4, 3, padding=1)
        self.branch1 = nn.Conv2d(4, 4, 1)
        self.fused = nn.Conv2d(4, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.head(x))
        h = self.branch3(h) + self.branch1(h) if self.training else self.fused(h)
        return x + self.tail(F.relu(h))


class PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.PReLU(4)
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return x + self.tail(self.act(self.head(x)))


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 6, 1)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.depthwise = nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False)
        self.tail = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        h = F.leaky_relu(self.head(x), 0.1)
        h = F.leaky_relu(self.grouped(h), 0.1)
        return x + self.tail(F.leaky_relu(self.depthwise(h), 0.1))


class Transposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 3, 4, stride=2, padding=1)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class Shuffle(nn.Module):
    """PixelUnshuffle → conv → PixelShuffle, then a ×2 PixelShuffle upsampler."""

    def __init__(self):
        super().__init__()
        self.unshuffle, self.shuffle = nn.PixelUnshuffle(2), nn.PixelShuffle(2)
        self.body = nn.Conv2d(12, 12, 1)
        self.up = nn.Conv2d(3, 12, 3, padding=1)
        self.upscale = 2

    def forward(self, x):
        h = self.shuffle(F.leaky_relu(self.body(self.unshuffle(x)), 0.1)) + x
        return self.shuffle(self.up(h)) + F.interpolate(x, scale_factor=2, mode="nearest")


class WeightNormed(nn.Module):
    def __init__(self):
        super().__init__()
        self.head = weight_norm(nn.Conv2d(3, 4, 3, padding=1))
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return x + self.tail(F.relu(self.head(x)))


class Tied(nn.Module):
    """Two convs sharing one weight tensor (``c2.weight`` is ``c1.weight``), separate biases."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight
        self.tail = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = F.leaky_relu(self.c1(F.leaky_relu(self.head(x), 0.1)), 0.1)
        return x + self.tail(F.leaky_relu(self.c2(h), 0.1))


class GrayDenoiser(nn.Module):
    """DnCNN-style 1-channel, scale-1 residual denoiser."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(4, 1, 3, padding=1))

    def forward(self, x):
        return x - self.body(x)


class NoiseMapInput(nn.Module):
    """FFDNet-style: RGB + a noise-level map in, RGB out."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(4, 4, 3, padding=1)
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return x[:, :3] - self.tail(F.relu(self.head(x)))


class Frozen(PReLUNet):
    """Some parameters frozen (requires_grad=False): they are on the path like any other."""

    def __init__(self):
        super().__init__()
        self.head.weight.requires_grad_(False)
        self.act.weight.requires_grad_(False)


class WritesOwnParams(nn.Module):
    """A forward that clamps its own scale parameter in place (as weight-clipping code does)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.scale = nn.Parameter(torch.full((1, 4, 1, 1), 0.9))
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        with torch.no_grad():
            self.scale.clamp_(max=0.95)
        return x + self.tail(F.relu(self.head(x)) * self.scale)


class ReadsData(nn.Module):
    """A gain normalised by statistics read through ``.data`` (constants to autograd); ``torch.func``'s
    vmap refuses ``.data``, so vmap falls back to the loop."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1))
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return x + self.tail(F.relu(self.head(x)) * (self.gain / self.gain.data.abs().mean()))


class _SoftSign(torch.autograd.Function):
    """A custom autograd.Function in the old style: no setup_context, no vmap rule."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x / (1 + x.abs())

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g / (1 + x.abs()) ** 2


class SoftSign(nn.Module):
    def forward(self, x):
        return _SoftSign.apply(x)


class CustomFunction(nn.Module):
    """An activation written as a custom autograd.Function without a vmap rule (torch.func refuses it)."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(3, 4, 3, padding=1)
        self.act = SoftSign()
        self.tail = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return x + self.tail(self.act(self.head(x)))


def forward_closure() -> nn.Module:
    """``m.forward = wrap(m.forward)``: forward overridden on the instance by a closure over the bound
    method (the copy must call its own network, not the caller's)."""
    m = Grouped()

    def wrap(fn):
        def forward(x):
            return 0.5 * fn(x) + 0.25 * x
        return forward
    m.forward = wrap(m.forward)
    return m


class Volumetric(nn.Module):
    """Parameters that are not 4-D: a Conv3d over a singleton depth axis and a modulated conv whose
    weight is a 5-D (1, out, in, k, k) parameter scaled by a style."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv3d(3, 4, (1, 3, 3), padding=(0, 1, 1))
        self.weight = nn.Parameter(0.2 * torch.randn(1, 3, 4, 3, 3))
        self.style = nn.Parameter(torch.ones(1, 1, 4, 1, 1))

    def forward(self, x):
        h = F.leaky_relu(self.head(x.unsqueeze(2)).squeeze(2), 0.1)
        return x + F.conv2d(h, (self.weight * self.style)[0], padding=1)


ZOO = {  # name: (class or factory, lq channels, gt channels, scale)
    "window_attention": (WindowAttention, 3, 3, 1),
    "batchnorm": (BatchNormNet, 3, 3, 1),
    "inplace_input": (InPlaceInput, 3, 3, 1),
    "nonpersistent_buffers": (NonPersistentBuffers, 3, 3, 1),
    "reparam": (Reparam, 3, 3, 1),
    "prelu": (PReLUNet, 3, 3, 1),
    "grouped_depthwise": (Grouped, 3, 3, 1),
    "conv_transpose": (Transposed, 3, 3, 1),
    "pixel_shuffle": (Shuffle, 3, 3, 2),
    "weight_norm": (WeightNormed, 3, 3, 1),
    "tied": (Tied, 3, 3, 1),
    "gray_denoiser": (GrayDenoiser, 1, 1, 1),
    "noise_map_input": (NoiseMapInput, 4, 3, 1),
    "frozen": (Frozen, 3, 3, 1),
    "writes_own_params": (WritesOwnParams, 3, 3, 1),
    "reads_data": (ReadsData, 3, 3, 1),
    "custom_function": (CustomFunction, 3, 3, 1),
    "forward_closure": (forward_closure, 3, 3, 1),
    "volumetric": (Volumetric, 3, 3, 1),
}


def zoo_pair(name: str, noise: float = 0.05):
    """Baseline (seeded init, float64) and a target with every floating parameter and buffer perturbed."""
    cls = ZOO[name][0]
    torch.manual_seed(0)
    a = cls().double().eval()
    torch.manual_seed(0)  # built again, not deep-copied: an instance-level closure must stay b's own
    b = cls().double().eval()
    perturb_(b, noise, torch.Generator().manual_seed(1))
    return a, b


def zoo_images(name: str, n: int = 2, size: int = 6):
    _, cin, cout, scale = ZOO[name]
    g = torch.Generator().manual_seed(2)
    lq = torch.rand(n, cin, size, size, generator=g, dtype=torch.float64)
    gt = torch.rand(n, cout, size * scale, size * scale, generator=g, dtype=torch.float64)
    return lq, gt


def snapshot(*objs):
    """Every tensor, requires_grad flag and training flag of models (and plain tensors), copied."""
    out = []
    for o in objs:
        if isinstance(o, torch.Tensor):
            out.append(o.clone())
            continue
        out += [(n, t.detach().clone(), t.requires_grad) for n, t in o.named_parameters(remove_duplicate=False)]
        out += [(n, t.clone()) for n, t in o.named_buffers(remove_duplicate=False)]
        out += [m.training for m in o.modules()]
    return out


def assert_identical(before, after):
    assert len(before) == len(after)
    for x, y in zip(before, after):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        elif isinstance(x, tuple):
            assert x[0] == y[0] and x[1].dtype == y[1].dtype and torch.equal(x[1], y[1]) and x[2:] == y[2:]
        else:
            assert x == y


def assert_hook_free(*models):
    for m in (x for model in models for x in model.modules()):
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), type(m).__name__


def strategies(name: str) -> list[str]:
    a, _ = zoo_pair(name)
    return ["loop", "vmap", "persample"] + (["linear"] if linear_path_blocker(a.eval()) is None else [])


CASES = [(name, s) for name in ZOO for s in strategies(name)]


@pytest.fixture(scope="module")
def references():
    """Reference FAIG of each zoo model, computed once per model."""
    cache = {}

    def get(name):
        if name not in cache:
            a, b = zoo_pair(name)
            lq, gt = zoo_images(name)
            cache[name] = [reference_image_faig(a, b, lq[i], gt[i], steps=STEPS) for i in range(len(lq))]
        return cache[name]
    return get


def test_linear_eligibility_of_the_zoo():
    eligible = {name for name in ZOO if "linear" in strategies(name)}
    assert eligible == {"grouped_depthwise", "pixel_shuffle", "tied", "reparam", "gray_denoiser", "inplace_input",
                        "noise_map_input", "custom_function", "forward_closure"}


@pytest.mark.filterwarnings("ignore:.*zero gradient", "ignore:There is a performance drop",
                            "ignore:.*using strategy 'loop' instead")
@pytest.mark.parametrize("name, strategy", CASES)
def test_zoo_strategy_equals_reference(name, strategy, references):
    a, b = zoo_pair(name)
    lq, gt = zoo_images(name)
    before = snapshot(a, b, lq, gt)
    engine = PathEngine(a, b, strategy=strategy, precision="fp64", chunk_size=2)
    images = engine.integrate(lq, gt, "riemann_left", STEPS)
    assert_identical(before, snapshot(a, b, lq, gt))
    assert_hook_free(a, b)
    filters = "conv+linear" if name == "window_attention" else "conv"
    index = FilterIndex.from_model(b, filters=filters)
    for img, ref in zip(images, references(name)):
        assert sum(float(r.abs().sum()) for r in ref.values()) > 0  # the reference ran the interpolated net
        faig = {n: engine.delta[n] * g for n, g in img.grads.items()}
        assert list(faig) == list(ref) == [n for n, _ in b.named_parameters()]
        for n in ref:
            torch.testing.assert_close(faig[n], ref[n], rtol=1e-9, atol=1e-13, msg=f"{name}/{strategy}: {n}")
        torch.testing.assert_close(filter_scores(faig, index), filter_scores(ref, index), rtol=1e-9, atol=1e-13)


def test_inplace_input_does_not_compound(references):
    """``x *= 255`` in forward gives the same FAIG as ``x = x * 255``: no pass sees a scaled input."""
    a, b = zoo_pair("inplace_input")
    a2, b2 = OutOfPlaceInput().double(), OutOfPlaceInput().double()
    a2.load_state_dict(a.state_dict())
    b2.load_state_dict(b.state_dict())
    lq, gt = zoo_images("inplace_input")
    twin_engine = PathEngine(a2, b2, strategy="loop", precision="fp64")
    twin = twin_engine.integrate(lq, gt, steps=STEPS)
    for x, ref in zip(twin, references("inplace_input")):  # the reference clones the input per pass too
        for n in ref:
            torch.testing.assert_close(twin_engine.delta[n] * x.grads[n], ref[n], rtol=1e-9, atol=1e-13)
    for strategy in ("loop", "vmap", "persample"):
        got = PathEngine(a, b, strategy=strategy, precision="fp64").integrate(lq, gt, steps=STEPS)
        for x, y in zip(got, twin):
            for n in y.grads:
                torch.testing.assert_close(x.grads[n], y.grads[n], rtol=1e-9, atol=1e-13)


def test_reparam_unused_parameters_get_zero_and_one_warning():
    a, b = zoo_pair("reparam")
    lq, gt = zoo_images("reparam")
    for strategy in ("loop", "persample", "vmap"):
        engine = PathEngine(a, b, strategy=strategy, precision="fp64")
        with pytest.warns(UserWarning, match="branch3.weight") as record:
            engine.integrate(lq, gt, steps=2)
            engine.integrate(lq, gt, steps=2)
        assert len([w for w in record if "zero gradient" in str(w.message)]) == 1
        assert engine.unused == ["branch3.weight", "branch3.bias", "branch1.weight", "branch1.bias"]
        grads = engine.integrate(lq, gt, steps=2)[0].grads
        assert all(not grads[n].any() for n in engine.unused)
        assert grads["fused.weight"].abs().sum() > 0


@pytest.mark.parametrize("name, where, strategy", [
    ("reads_data", "ReadsData (top level)", "vmap"),  # persample runs it: its parameters are not vmapped
    ("custom_function", "module 'act' (SoftSign)", "vmap"),
    ("custom_function", "module 'act' (SoftSign)", "persample")])
def test_torch_func_limits_fall_back_to_loop_with_one_warning(name, where, strategy, references):
    a, b = zoo_pair(name)
    lq, gt = zoo_images(name)
    engine = PathEngine(a, b, strategy=strategy, precision="fp64")
    with pytest.warns(UserWarning, match=f"strategy '{strategy}'.*{re.escape(where)}.*using strategy 'loop'") as rec:
        first = engine.integrate(lq, gt, steps=STEPS)
        second = engine.integrate(lq, gt, steps=STEPS)
    assert len([w for w in rec if "instead" in str(w.message)]) == 1
    assert engine.strategy == "loop" and where in engine.fallback
    for got in (first, second):
        for img, ref in zip(got, references(name)):
            for n in ref:
                torch.testing.assert_close(engine.delta[n] * img.grads[n], ref[n], rtol=1e-9, atol=1e-13)


def test_forward_closure_runs_the_private_copy():
    """The caller's closure keeps pointing at the caller; the engine's copy runs its own interpolated net."""
    a, b = zoo_pair("forward_closure")
    lq, gt = zoo_images("forward_closure")
    forward = b.forward
    engine = PathEngine(a, b, strategy="loop", precision="fp64")
    assert engine.net.forward is not forward and b.forward is forward
    with torch.no_grad():
        torch.testing.assert_close(engine.forward(0.0, lq), b(lq), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(engine.forward(1.0, lq), a(lq), rtol=1e-12, atol=1e-14)
    assert any(bool(g.abs().sum() > 0) for g in engine.integrate(lq, gt, steps=2)[0].grads.values())


class HiddenReference(BatchNormNet):
    """Built by :func:`hidden_reference`: forward reaches the tail through a dict the copy cannot rebind."""


def hidden_reference() -> nn.Module:
    m = HiddenReference()
    parts = {"bn": m.bn}

    def forward(x):
        return x + m.tail(F.relu(parts["bn"](m.head(x))))
    m.forward = forward
    return m


@pytest.mark.parametrize("strategy", ["loop", "vmap", "persample"])
def test_a_copy_that_still_calls_the_callers_model_is_refused(strategy):
    """Safety net: the first pass stops before the caller's module runs (its train-mode BatchNorm would
    update the caller's running statistics); the caller's model is bit-identical and hook-free."""
    torch.manual_seed(0)
    a = hidden_reference().double()
    torch.manual_seed(0)
    b = hidden_reference().double().train()
    with torch.no_grad():
        b.head.weight.add_(0.05)
    lq, gt = zoo_images("batchnorm")
    before = snapshot(a, b, lq, gt)
    engine = PathEngine(a, b, strategy=strategy, precision="fp64", mode="as-is")
    with pytest.raises(FAIGError, match=r"reaches the caller's model \(module 'bn' \(BatchNorm2d\)\)"):
        engine.integrate(lq, gt, steps=2)
    with pytest.raises(FAIGError, match="module 'bn'"):
        engine.loss_at(0.0, lq[:1], gt[:1])
    assert_identical(before, snapshot(a, b, lq, gt))
    assert_hook_free(a, b)
    quiet = PathEngine(*zoo_pair("batchnorm"), strategy=strategy, precision="fp64", mode="as-is")
    quiet.loss_at(0.0, lq[:1], gt[:1])  # a plain copy passes the same check
    assert quiet.runner.private_checked


def test_loop_keeps_non_4d_parameters_in_their_layout():
    a, b = zoo_pair("volumetric")
    lq, gt = zoo_images("volumetric")
    engine = PathEngine(a, b, strategy="loop", precision="fp64", device="cpu")
    engine.integrate(lq, gt, steps=2)
    assert all(p.is_contiguous() for p in engine.net.parameters())
