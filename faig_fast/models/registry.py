"""A small timm-style model registry: architectures register under a short name with named
presets, so analyses, checkpoints and the CLI can build a model from (name, preset, kwargs)."""
from __future__ import annotations

import inspect
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from faig_fast.errors import InvalidInputError

__all__ = ["register_model", "list_models", "list_presets", "create_model", "validate_scale"]

VALID_SCALES = (2, 3, 4)

_MODELS: dict[str, type[nn.Module]] = {}
_PRESETS: dict[str, dict[str, dict[str, Any]]] = {}

M = TypeVar("M", bound=type)


def validate_scale(upscale: Any) -> int:
    """Return `upscale` as an int, or raise InvalidInputError unless it is 2, 3 or 4."""
    if isinstance(upscale, bool) or not isinstance(upscale, int) or upscale not in VALID_SCALES:
        raise InvalidInputError(
            f"upscale must be one of {list(VALID_SCALES)}, got {upscale!r}")
    return int(upscale)


def validate_positive(name: str, value: Any, minimum: int = 1) -> int:
    """Return an integer constructor argument, or raise InvalidInputError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidInputError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def register_model(name: str, presets: dict[str, dict[str, Any]] | None = None
                   ) -> Callable[[M], M]:
    """Class decorator registering an architecture under `name` with optional named presets."""
    def deco(cls: M) -> M:
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered to {_MODELS[name]!r}")
        _MODELS[name] = cls
        _PRESETS[name] = {k: dict(v) for k, v in (presets or {}).items()}
        cls.arch_name = name
        return cls
    return deco


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_MODELS)


def list_presets(name: str) -> list[str]:
    """Preset names of the registered architecture `name`, sorted."""
    _lookup(name)
    return sorted(_PRESETS[name])


def _lookup(name: str) -> type[nn.Module]:
    if not isinstance(name, str) or name not in _MODELS:
        raise InvalidInputError(f"unknown model {name!r}; valid models: {list_models()}")
    return _MODELS[name]


def create_model(name: str, preset: str | None = None, *, seed: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a registered model; `preset` supplies base kwargs that explicit `kwargs` override.

    With `seed`, the weights are initialised as after `torch.manual_seed(seed)` (same values), from a
    forked CPU RNG: the caller's global RNG state is the same after the call as before it."""
    if seed is None:
        return _build(name, preset, kwargs)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidInputError(f"seed must be None or an int, got {seed!r}")
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return _build(name, preset, kwargs)


def _build(name: str, preset: str | None, kwargs: dict[str, Any]) -> nn.Module:
    cls = _lookup(name)
    args: dict[str, Any] = {}
    if preset is not None:
        presets = _PRESETS[name]
        if preset not in presets:
            raise InvalidInputError(
                f"unknown preset {preset!r} for model {name!r}; valid presets: {sorted(presets)}")
        args.update(presets[preset])
    args.update(kwargs)
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(args) - set(valid))
    if unknown:
        raise InvalidInputError(
            f"unknown argument(s) {unknown} for model {name!r}; valid arguments: {valid}")
    return cls(**args)
