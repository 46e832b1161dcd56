"""Filter modulation: move only the discovered filters between baseline and target.

θ_λ = θ̄ + λ(θ − θ̄) on the discovered filters. Elsewhere the model holds the **target** weights by
default (``elsewhere="target"``), as the authors' ``analysis/scripts/filter_modulation.py`` does:
λ = 1 is the target model, λ = 0 is the target with those filters masked (Sec. 5.2.1), so the strip
isolates what these filters alone contribute inside the working network (e.g. how much deblurring
they switch on). ``elsewhere="baseline"`` instead asks whether the filters alone add the function to
the baseline (λ = 0 is the baseline). Biases always come from the ``elsewhere`` model.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from faig_fast.errors import InvalidInputError
from faig_fast.core.filters import FilterIndex
from faig_fast.core.pair import check_pair

DEFAULT_LAMBDAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def modulate(baseline: nn.Module, target: nn.Module, indices: torch.Tensor | Sequence[int], lam: float,
             elsewhere: str = "target") -> nn.Module:
    """A model with θ̄ + λ(θ − θ̄) on filters ``indices`` and the ``elsewhere`` model's weights elsewhere."""
    check_pair(baseline, target)
    if elsewhere not in ("target", "baseline"):
        raise InvalidInputError(f"elsewhere must be 'target' or 'baseline', got {elsewhere!r}")
    rows = FilterIndex.from_model(target).split(indices)
    out = copy.deepcopy(target if elsewhere == "target" else baseline)
    sd, sa, sb = out.state_dict(), baseline.state_dict(), target.state_dict()
    with torch.no_grad():
        for name, local in rows.items():
            n = sd[name].shape[0] * sd[name].shape[1]
            w = sd[name].view(n, -1)
            a = sa[name].reshape(n, -1)[local].to(w)
            b = sb[name].reshape(n, -1)[local].to(w)
            w[local] = a + lam * (b - a)
    return out


@torch.no_grad()
def modulation_strip(baseline: nn.Module, target: nn.Module, indices: torch.Tensor | Sequence[int],
                     lq: torch.Tensor, lams: Sequence[float] = DEFAULT_LAMBDAS,
                     elsewhere: str = "target") -> list[torch.Tensor]:
    """Outputs (CHW, clamped to [0, 1]) of the modulated model on ``lq`` for each λ in ``lams``."""
    x = lq.unsqueeze(0) if lq.dim() == 3 else lq
    outs = []
    for lam in lams:
        m = modulate(baseline, target, indices, float(lam), elsewhere).eval()
        outs.append(m(x.to(next(m.parameters())))[0].clamp(0, 1).cpu())
    return outs
