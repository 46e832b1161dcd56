"""Checks that make a model's forward safe to integrate: unused parameters and in-place ops.

* Parameters the forward does not use (re-parameterised blocks whose training branches are folded
  away at inference) get zero gradient; :func:`warn_unused` says once which.
* A forward that autograd cannot differentiate (an in-place op overwrote a tensor the backward
  needs) becomes an :class:`InvalidInputError` naming the modules involved and what to do.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from faig_fast.errors import InvalidInputError

_INPLACE = "modified by an inplace operation"
_NO_GRAD = "does not require grad"


def warn_unused(model_name: str, names: list[str]) -> None:
    """Warn that ``names`` do not influence the output (their FAIG is 0)."""
    shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
    warnings.warn(f"{model_name}: {len(names)} parameter(s) do not affect the output in this mode and get zero "
                  f"gradient (FAIG 0): {shown}", UserWarning, stacklevel=3)


def inplace_suspects(net: nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[list[str], list[str]]:
    """Modules whose output was modified in place after they returned it, and modules with ``inplace=True``.

    Runs ``forward`` once with forward hooks that record each module output's version counter.
    """
    seen: list[tuple[str, torch.Tensor, int]] = []
    handles = []
    for name, m in net.named_modules():
        def hook(mod, inp, out, name=name):
            if isinstance(out, torch.Tensor):
                seen.append((name or type(mod).__name__, out, out._version))
        handles.append(m.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            forward()
    except Exception:  # noqa: BLE001 - a diagnosis must not hide the original error
        pass
    finally:
        for h in handles:
            h.remove()
    modified = list(dict.fromkeys(n for n, t, v in seen if t._version != v))
    flagged = [n for n, m in net.named_modules() if getattr(m, "inplace", False) is True]
    return modified, flagged


def autograd_error(model_name: str, mode: str, exc: RuntimeError,
                   suspects: Callable[[], tuple[list[str], list[str]]]) -> InvalidInputError | None:
    """A clear :class:`InvalidInputError` for a forward autograd cannot differentiate, else ``None``."""
    text = str(exc)
    if _INPLACE in text:
        modified, flagged = suspects()
        where = []
        if modified:
            where.append(f"outputs of {', '.join(modified[:6])} were overwritten in place after use")
        if flagged:
            where.append(f"modules with inplace=True: {', '.join(flagged[:6])}")
        return InvalidInputError(
            f"{model_name}'s {mode}-mode forward cannot be differentiated: an in-place operation overwrote a "
            f"tensor the backward pass needs ({'; '.join(where) or 'see the chained error'}). Set inplace=False "
            "on those modules or write `x = x * s` instead of `x *= s` in forward; if the in-place op runs only "
            "in this mode, try mode='train' or mode='as-is'.")
    if _NO_GRAD in text:
        return InvalidInputError(
            f"{model_name}'s {mode}-mode output does not depend on any parameter through autograd (does forward "
            "run under torch.no_grad() or detach its result?): FAIG needs a differentiable forward.")
    return None


@contextlib.contextmanager
def explained(model_name: str, mode: str, suspects: Callable[[], tuple[list[str], list[str]]]) -> Iterator[None]:
    """Turn autograd's in-place / no-grad errors raised inside the block into :class:`InvalidInputError`."""
    try:
        yield
    except RuntimeError as exc:
        err = autograd_error(model_name, mode, exc, suspects)
        if err is None:
            raise
        raise err from exc
