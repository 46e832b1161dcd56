"""Filter rankings to compare FAIG with (paper Sec. 5.2, Tables 2 and 3).

Every function returns scores or rankings over the same flat filter index as
:class:`faig_fast.core.attribution.Attribution` (conv weights in ``state_dict`` order, row-major over
(out, in)), so a ranking from any method can be masked, re-trained or modulated the same way.

* ``ig``: the authors' "modified IG" (IntInf-style, their ``analysis/tools/*/ig.py``). The *input*
  moves from the clean bilinear LR image x̄ to the degraded LR image x through the **target** model;
  at each α_k = k/N (left Riemann rule by default) the gradient of Σ F(θ, x̄ + α_k(x − x̄)) (the sum
  of all output pixels) w.r.t. every conv weight is accumulated; a filter's per-image score is
  Σ_{K×K} |Σ_k w_k ∂F/∂θ| (with w_k = 1/N this is their ``sum(abs(total_gradient)) / total_step``;
  like them we do not multiply by (x − x̄)). The clean LR x̄ is recomputed from the GT with
  ``make_degradation("clean")`` (bilinear ↓s + 8-bit quantisation), so any FAIG loader works.
  Per degradation D the score is then Eq. 7 applied to these per-image scores: the mean over the D
  images minus the mean over the images of every other degradation. (The authors' script ranks
  the plain mean over D images; the subtraction is ours, to match FAIG's Eq. 7.)
* ``weight_change``: Σ_{K×K} |θ − θ̄| per filter (degradation-independent).
* ``random``: i.i.d. uniform scores from a seeded generator; the seed is mixed with the
  degradation label so the deblurring and denoising random sets differ.
"""
from __future__ import annotations

import contextlib
import zlib
from typing import Iterable, Iterator

import torch
from torch import nn

from faig_fast.core.attribution import Attribution
from faig_fast.core.batches import infer_scale, model_scale
from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import check_pair
from faig_fast.core.quadrature import nodes_and_weights
from faig_fast.core.reference import filter_scores, score_images
from faig_fast.data.degradations import make_degradation
from faig_fast.errors import InvalidInputError

METHODS = ("faig", "ig", "weight_change", "random")


def ig_image_scores(model_target: nn.Module, clean_lq: torch.Tensor, lq: torch.Tensor, *, steps: int = 100,
                    method: str = "riemann_left", chunk: int | None = None) -> torch.Tensor:
    """Per-filter IntInf score of one image (1-D float64): Σ_kk |Σ_k w_k ∂ΣF(θ, x̄+α_k(x−x̄))/∂θ|.

    The path steps run ``chunk`` at a time as one batch (default: up to 16, at most 2²⁰ LR pixels per
    batch): the gradient of Σ_k w_k ΣF(x_k) w.r.t. the shared weights is the weighted sum of the
    per-step gradients.
    """
    clean_lq = clean_lq.unsqueeze(0) if clean_lq.dim() == 3 else clean_lq
    lq = lq.unsqueeze(0) if lq.dim() == 3 else lq
    if clean_lq.shape != lq.shape:
        raise InvalidInputError(f"clean LR {tuple(clean_lq.shape)} and degraded LR {tuple(lq.shape)} differ in shape")
    index = FilterIndex.from_model(model_target)
    names = [l.name for l in index.layers]
    params = dict(model_target.named_parameters())
    weights_of = [params[n] for n in names]
    alphas, w = nodes_and_weights(method, steps)
    if chunk is None:
        chunk = max(1, min(16, 2**20 // (lq.shape[-1] * lq.shape[-2])))
    p0 = next(model_target.parameters())
    x0, dx = clean_lq.to(p0), (lq - clean_lq).to(p0)
    total = {n: torch.zeros_like(params[n]) for n in names}
    for s in range(0, len(alphas), chunk):
        a = alphas[s:s + chunk].to(p0).view(-1, 1, 1, 1)
        ww = w[s:s + chunk].to(p0).view(-1, 1, 1, 1)
        out = model_target(x0 + a * dx)
        loss = (out * ww).sum()
        grads = torch.autograd.grad(loss, weights_of)
        for n, g in zip(names, grads):
            total[n] += g
    return filter_scores(total, index)


@contextlib.contextmanager
def _eval_with_grads(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with every parameter requiring grad, for the duration of the block; each
    submodule's mode and each parameter's ``requires_grad`` are restored afterwards, as the caller had them."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(True)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)


def _scale_of(net: nn.Module, lq: torch.Tensor, gt: torch.Tensor) -> int:
    """The model's declared scale, else the one its output on ``lq`` (CHW) shows, as the API infers it;
    the output must have ``gt``'s size."""
    declared = model_scale(net)
    if declared is not None:
        return declared
    p0 = next(net.parameters())
    with torch.no_grad():
        out = net(lq.unsqueeze(0).to(p0))
    scale = infer_scale(tuple(lq.shape[-2:]), tuple(out.shape[-2:]), "IG, first image")
    if tuple(out.shape[-2:]) != tuple(gt.shape[-2:]):
        raise InvalidInputError(
            f"IG, first image: the model maps lq of size {tuple(lq.shape[-2:])} to an output of size "
            f"{tuple(out.shape[-2:])}, but gt has size {tuple(gt.shape[-2:])}")
    return scale


def ig_attribution(model_target: nn.Module, loader: Iterable, steps: int = 100, *, method: str = "riemann_left",
                   keep_per_image: bool = False, progress: bool = False) -> Attribution:
    """IntInf-style IG scores of every image in ``loader``, as an :class:`Attribution` (Eq. 7 ready).

    The passes run in eval mode; the caller's model keeps its modes and ``requires_grad`` flags.  The
    clean LR x̄ uses the model's declared scale, else the one inferred from its first forward pass."""
    nodes_and_weights(method, steps)
    index = FilterIndex.from_model(model_target)
    result = Attribution(index, {"method": "ig_intinf", "steps": steps, "rule": f"{method}/{steps}"}, keep_per_image)
    clean: list = []  # the clean degradation, built on the first image (when the scale is known)

    def report(count: int, name: str, label: str) -> None:
        print(f"IG {count}: {name} ({label})", flush=True)

    with _eval_with_grads(model_target) as net:
        def score(lq: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
            if not clean:
                clean.append(make_degradation("clean", scale=_scale_of(net, lq, gt)))
            x_clean = clean[0](gt.float()).to(lq.dtype)
            return ig_image_scores(net, x_clean, lq, steps=steps, method=method)

        score_images(result, loader, model_scale(model_target), score, report if progress else None)
    return result


def ig_scores(model_target: nn.Module, loader: Iterable, steps: int = 100, **kwargs) -> dict[str, torch.Tensor]:
    """{label: Eq.-7-style IG score per filter} (mean over D images − mean over the other images)."""
    att = ig_attribution(model_target, loader, steps, **kwargs)
    return {label: att.scores(label) for label in att.labels}


def weight_change_scores(model_a: nn.Module, model_b: nn.Module) -> torch.Tensor:
    """Σ_{K×K} |θ − θ̄| per filter (float64), baseline ``model_a`` vs target ``model_b``."""
    check_pair(model_a, model_b)
    index = FilterIndex.from_model(model_b)
    pa, pb = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    return filter_scores({l.name: pb[l.name].double() - pa[l.name].double() for l in index.layers}, index)


def random_scores(num_filters: int, seed: int = 0, label: str | None = None) -> torch.Tensor:
    """Uniform random scores (float64); ``label`` is mixed into the seed so each D gets its own set."""
    mix = 0 if label is None else zlib.crc32(label.encode())
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + mix) % (2**63 - 1))
    return torch.rand(int(num_filters), generator=g, dtype=torch.float64)


def ranking_of(scores: torch.Tensor) -> torch.Tensor:
    """Flat indices by descending score; ties keep index order."""
    return torch.sort(scores, descending=True, stable=True).indices


def rankings(method: str, label: str, *, attribution: Attribution | None = None,
             ig: Attribution | dict[str, torch.Tensor] | None = None, model_a: nn.Module | None = None,
             model_b: nn.Module | None = None, num_filters: int | None = None, seed: int = 0) -> torch.Tensor:
    """Flat filter indices, descending, for degradation ``label`` by ``method`` in :data:`METHODS`.

    ``faig`` needs ``attribution``; ``ig`` needs ``ig`` (an IG Attribution or ``ig_scores`` dict);
    ``weight_change`` needs ``model_a`` and ``model_b``; ``random`` needs ``num_filters`` (or any of
    the others to read it from) and uses ``seed``.
    """
    if method == "faig":
        if attribution is None:
            raise InvalidInputError("rankings('faig') needs attribution=")
        return attribution.ranking(label)
    if method == "ig":
        if ig is None:
            raise InvalidInputError("rankings('ig') needs ig= (an IG Attribution or ig_scores dict)")
        return ig.ranking(label) if isinstance(ig, Attribution) else ranking_of(ig[label])
    if method == "weight_change":
        if model_a is None or model_b is None:
            raise InvalidInputError("rankings('weight_change') needs model_a= and model_b=")
        return ranking_of(weight_change_scores(model_a, model_b))
    if method == "random":
        if num_filters is None:
            if attribution is not None:
                num_filters = len(attribution.index)
            elif isinstance(ig, Attribution):
                num_filters = len(ig.index)
            elif model_b is not None:
                num_filters = len(FilterIndex.from_model(model_b))
            else:
                raise InvalidInputError("rankings('random') needs num_filters= (or a model/attribution)")
        return ranking_of(random_scores(num_filters, seed, label))
    raise InvalidInputError(f"unknown ranking method {method!r}; choose one of {METHODS}")
