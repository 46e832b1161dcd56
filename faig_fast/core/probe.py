"""Checks that make a model's forward safe to integrate: unused parameters, in-place ops, calls back
into the caller's network, and which module a transform cannot run.

* Parameters the forward does not use (re-parameterised blocks whose training branches are folded
  away at inference) get zero gradient; :func:`warn_unused` says once which.
* A forward that autograd cannot differentiate (an in-place op overwrote a tensor the backward
  needs) becomes an :class:`InvalidInputError` naming the modules involved and what to do.
* A private copy whose forward still reaches the caller's modules or tensors (a closure the copy
  could not rebind, a global) would silently run the caller's un-interpolated network:
  :func:`check_private` refuses it, naming the module, without touching the caller's model.
* :func:`failing_module` names the module in which a pass raised (for fallback warnings).
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from faig_fast.errors import FAIGError, InvalidInputError

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


def is_autograd_error(exc: BaseException) -> bool:
    """True for the errors :func:`autograd_error` explains (a property of the forward, not of a strategy)."""
    return isinstance(exc, RuntimeError) and (_INPLACE in str(exc) or _NO_GRAD in str(exc))


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


# calls back into the caller's network ---------------------------------------------------------------

class _Foreign(Exception):
    """Raised inside the probe pass, before the op that would touch the caller's model runs."""


class _CallerTensors(TorchFunctionMode):
    """Stops any torch op that reads or writes a storage of the caller's parameters or buffers."""

    def __init__(self, storages: dict[int, str]):
        super().__init__()
        self.storages = storages

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs or {}))[0]:
            if isinstance(t, torch.Tensor):
                name = self.storages.get(_storage(t))
                if name is not None:
                    raise _Foreign(f"tensor '{name}'")
        return func(*args, **(kwargs or {}))


def _storage(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # wrapper tensors without storage
        return 0


def check_private(model: nn.Module, model_name: str, forward: Callable[[], Any]) -> Any:
    """Run ``forward`` (one pass of the private copy) and refuse, with a :class:`FAIGError`, if it calls a
    module of the caller's ``model`` or touches one of its tensors.  The op is stopped before it runs,
    and the temporary hooks are removed, so ``model`` stays bit-identical and hook-free."""
    storages = {}
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            ptr = _storage(t)
            if ptr:
                storages.setdefault(ptr, n)

    def pre_hook(name: str) -> Callable:
        def hook(module, args):
            raise _Foreign(f"module '{name}' ({type(module).__name__})")
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n or type(m).__name__)) for n, m in model.named_modules()]
    try:
        with _CallerTensors(storages):
            return forward()
    except _Foreign as exc:
        raise FAIGError(
            f"{model_name}: the private copy's forward still reaches the caller's model ({exc}), so it would run "
            "the caller's own network instead of the interpolated one. This happens when forward (or a hook) is "
            "replaced on an instance by a function the copy cannot rebind, or reads the model through a global; "
            "wrap the model in a module subclass instead of assigning `m.forward = ...`.") from None
    finally:
        for h in handles:
            h.remove()


def failing_module(net: nn.Module, run: Callable[[], Any]) -> str | None:
    """The innermost module of ``net`` running when ``run()`` raised, as "'name' (Class)", or ``None``."""
    stack: list[str] = []
    handles = []
    for name, m in net.named_modules():
        label = f"'{name}' ({type(m).__name__})" if name else f"{type(m).__name__} (top level)"
        handles.append(m.register_forward_pre_hook(lambda mod, args, label=label: stack.append(label)))
        handles.append(m.register_forward_hook(lambda mod, args, out: stack.pop() if stack else None))
    try:
        run()
    except Exception:  # noqa: BLE001 - we only want to know where
        return stack[-1] if stack else None
    finally:
        for h in handles:
            h.remove()
    return None
