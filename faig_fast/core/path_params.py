"""A private copy of a caller's network in one module mode: the mode helpers and the deep copy that
leaves nothing pointing back at the caller's modules.

``copy.deepcopy`` copies bound methods but treats plain functions as atoms, so a ``forward``
overridden on an instance as a closure (``m.forward = wrap(m.forward)``) or a hook closing over a
module would keep calling the caller's own module: every pass would run the caller's
un-interpolated network.  :func:`private_copy` rebuilds such functions with their closure cells and
defaults mapped onto the copy.
"""
from __future__ import annotations

import copy
import functools
import types
from typing import Any

import torch
from torch import nn

from faig_fast.errors import InvalidInputError

MODES = ("eval", "train", "as-is")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_state_dict_hooks", "_load_state_dict_pre_hooks")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else :class:`InvalidInputError`."""
    if mode not in MODES:
        raise InvalidInputError(f"unknown mode {mode!r}; choose one of {MODES} (the module mode of every pass)")
    return mode


def set_mode(net: nn.Module, mode: str) -> nn.Module:
    """Put ``net`` (a private copy) in eval or train mode, or leave each submodule as it is (``as-is``)."""
    check_mode(mode)
    if mode == "eval":
        net.eval()
    elif mode == "train":
        net.train()
    return net


def private_copy(model: nn.Module, mode: str = "as-is") -> nn.Module:
    """A deep copy of ``model`` in ``mode`` whose instance-level functions (overridden ``forward``,
    hooks) refer to the copy's modules, not the caller's.  ``model`` is not modified."""
    memo: dict[int, Any] = {}
    net = copy.deepcopy(model, memo)
    Rebinder(memo).rebind(model)
    return set_mode(net, mode)


class Rebinder:
    """Maps functions, bound methods, modules and tensors of the caller's model onto the deep copy."""

    def __init__(self, memo: dict[int, Any]):
        self.memo = memo
        self.done: dict[int, Any] = {}

    def rebind(self, model: nn.Module) -> None:
        for m in model.modules():
            twin = self.memo.get(id(m))
            if twin is None:
                continue
            for key, value in list(vars(twin).items()):
                if key in _HOOK_DICTS and isinstance(value, dict):
                    for k, hook in list(value.items()):
                        value[k] = self.map(hook)
                elif isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
                    twin.__dict__[key] = self.map(value)

    def map(self, obj: Any) -> Any:
        """``obj`` with every reference to the caller's model replaced by the copy's counterpart."""
        if isinstance(obj, (nn.Module, torch.Tensor)):
            return self.memo.get(id(obj), obj)
        if isinstance(obj, types.MethodType):
            owner = self.map(obj.__self__)
            func = self.map(obj.__func__)
            return obj if owner is obj.__self__ and func is obj.__func__ else types.MethodType(func, owner)
        if isinstance(obj, types.FunctionType):
            return self._function(obj)
        if isinstance(obj, functools.partial):
            func, args = self.map(obj.func), tuple(self.map(a) for a in obj.args)
            kwargs = {k: self.map(v) for k, v in obj.keywords.items()}
            if func is obj.func and not _differ(obj.args, args) and not _differ(obj.keywords.values(), kwargs.values()):
                return obj
            return functools.partial(func, *args, **kwargs)
        return obj

    def _function(self, f: types.FunctionType) -> types.FunctionType:
        if id(f) in self.done:
            return self.done[id(f)]
        self.done[id(f)] = f  # a function that refers to itself keeps referring to the original
        cells = f.__closure__ or ()
        contents = [_cell_contents(c) for c in cells]
        mapped = [self.map(v) if v is not _EMPTY else v for v in contents]
        defaults = tuple(self.map(v) for v in f.__defaults__) if f.__defaults__ else f.__defaults__
        kwdefaults = {k: self.map(v) for k, v in f.__kwdefaults__.items()} if f.__kwdefaults__ else None
        wrapped = getattr(f, "__wrapped__", None)
        changed = (_differ(contents, mapped) or _differ(f.__defaults__ or (), defaults or ())
                   or (kwdefaults is not None and _differ(f.__kwdefaults__.values(), kwdefaults.values()))
                   or (wrapped is not None and self.map(wrapped) is not wrapped))
        if not changed:
            return f
        closure = tuple(types.CellType() if v is _EMPTY else types.CellType(v) for v in mapped) or None
        new = types.FunctionType(f.__code__, f.__globals__, f.__name__, defaults, closure)
        new.__kwdefaults__ = kwdefaults
        new.__dict__.update(f.__dict__)
        new.__qualname__, new.__doc__, new.__module__ = f.__qualname__, f.__doc__, f.__module__
        if wrapped is not None:
            new.__wrapped__ = self.map(wrapped)
        self.done[id(f)] = new
        return new


_EMPTY = object()


def _differ(old, new) -> bool:
    return any(a is not b for a, b in zip(old, new))


def _cell_contents(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a variable not yet assigned)
        return _EMPTY
