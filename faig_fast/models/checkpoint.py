"""Checkpoint I/O: BasicSR `.pth` files and self-describing safetensors files.

`save_model` writes safetensors with the architecture in the header, atomically, so a file on
disk is always complete and rebuilds its model alone; `load_model` validates keys, shapes and
finiteness and turns every failure into a CheckpointError that names the file and key."""
from __future__ import annotations

import importlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import safetensors
import safetensors.torch
import torch
from torch import nn

from faig_fast.utils.tensors import first_nonfinite
from faig_fast.utils.io import atomic_save_safetensors
from faig_fast.errors import CheckpointError, FAIGError, InvalidInputError
from faig_fast.models.registry import VALID_SCALES, create_model, list_models

__all__ = ["load_state_dict_file", "save_model", "read_metadata", "load_model", "import_model_class",
           "infer_msrresnet_args", "infer_srcnn_style_args", "METADATA_KEY"]

METADATA_KEY = "faig_fast"
_TORCH_SUFFIXES = {".pth", ".pt", ".pkl", ".ckpt", ".bin"}
_ZIP_MAGIC = b"PK\x03\x04"

PathLike = Union[str, "os.PathLike[str]"]


def _is_safetensors(path: Path) -> bool:
    """Dispatch on suffix; for unknown suffixes sniff the header (torch files are zip archives)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return True
    if suffix in _TORCH_SUFFIXES:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from e
    return len(head) == 9 and head[:4] != _ZIP_MAGIC and head[8:9] == b"{"


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {str(path)!r}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint path is not a regular file: {str(path)!r}")


def _strip_module_prefix(state: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """Drop a leading `module.` (DataParallel/DDP) from keys, as BasicSR's load_network does."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"checkpoint {str(path)!r} has a non-string state-dict key {key!r}")
        new = key[len("module."):] if key.startswith("module.") else key
        if new in out:
            raise CheckpointError(
                f"checkpoint {str(path)!r}: key {key!r} collides with {new!r} after stripping "
                "the 'module.' prefix")
        out[new] = value
    return out


def load_state_dict_file(path: PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from `.safetensors` or a torch `.pth`/`.pt` file (BasicSR layout:
    `params_ema`, else `params`, else the raw dict), with any `module.` prefix stripped."""
    path = Path(path)
    _check_exists(path)
    if _is_safetensors(path):
        try:
            state: Any = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...: corrupt or truncated
            raise CheckpointError(
                f"cannot read safetensors checkpoint {str(path)!r} (corrupt or truncated?): "
                f"{e}") from e
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError, RuntimeError, EOFError, zip errors ...
            raise CheckpointError(
                f"cannot read torch checkpoint {str(path)!r} (corrupt, truncated, or holds "
                f"objects other than tensors): {type(e).__name__}: {e}") from e
        if not isinstance(obj, Mapping):
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a {type(obj).__name__}, expected a state dict "
                "(optionally under 'params_ema' or 'params')")
        state = obj
        for wrapper in ("params_ema", "params"):
            if wrapper in obj:
                state = obj[wrapper]
                if not isinstance(state, Mapping):
                    raise CheckpointError(
                        f"checkpoint {str(path)!r}: {wrapper!r} holds a "
                        f"{type(state).__name__}, expected a state dict")
                break
    state = _strip_module_prefix(state, path)
    if not state:
        raise CheckpointError(f"checkpoint {str(path)!r} holds an empty state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"checkpoint {str(path)!r}: entry {key!r} is a {type(value).__name__}, "
                "not a tensor")
    return state


def _atomic_write_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                              header: dict[str, str]) -> None:
    try:
        atomic_save_safetensors(tensors, header, path)
    except BaseException as e:
        if isinstance(e, Exception) and not isinstance(e, FAIGError):
            raise CheckpointError(
                f"failed to write checkpoint {str(path)!r} ({type(e).__name__}: {e}); "
                "any previous file there is unchanged") from e
        raise


def save_model(model: nn.Module, path: PathLike, metadata: dict | None = None) -> None:
    """Write `model`'s weights as safetensors with `{"faig_fast": json({arch, args, **metadata})}`
    in the header, atomically (temp file in the same directory + os.replace)."""
    path = Path(path)
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"save_model expects an nn.Module, got {type(model).__name__}")
    meta: dict[str, Any] = {}
    config = getattr(model, "config", None)
    if callable(config):
        cfg = config()
        meta["arch"] = cfg["arch"]
        meta["args"] = dict(cfg["args"])
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise InvalidInputError(
                f"metadata for {str(path)!r} must be a dict, got {type(metadata).__name__}")
        clash = sorted({"arch", "args"} & set(metadata))
        if clash:
            raise InvalidInputError(
                f"metadata for {str(path)!r} may not set reserved key(s) {clash}; they come "
                "from model.config()")
        meta.update(metadata)
    try:
        header = {METADATA_KEY: json.dumps(meta, sort_keys=True)}
    except (TypeError, ValueError) as e:
        raise InvalidInputError(
            f"metadata for {str(path)!r} is not JSON-serialisable: {e}") from e
    # Detached contiguous CPU copies: safetensors refuses shared or non-contiguous storage.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_write_safetensors(tensors, path, header)


def read_metadata(path: PathLike) -> dict:
    """The `faig_fast` JSON header of a safetensors checkpoint; `{}` for files without one
    (e.g. BasicSR `.pth`)."""
    path = Path(path)
    _check_exists(path)
    if not _is_safetensors(path):
        return {}
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(
            f"cannot read safetensors header of {str(path)!r} (corrupt or truncated?): "
            f"{e}") from e
    raw = header.get(METADATA_KEY)
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: header entry {METADATA_KEY!r} is not valid JSON: "
            f"{e}") from e
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"checkpoint {str(path)!r}: header entry {METADATA_KEY!r} is not a JSON object")
    return meta


def _shape(state: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"state dict has no key {key!r}")
    return tuple(state[key].shape)


def _scale_from_ratio(ratio: float, key: str) -> int:
    s = round(math.sqrt(ratio))
    if s * s != ratio or s not in VALID_SCALES:
        raise CheckpointError(
            f"cannot infer upscale from {key!r}: channel ratio {ratio} is not 4, 9 or 16")
    return s


def infer_msrresnet_args(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Derive MSRResNet(num_in_ch, num_out_ch, num_feat, num_block, upscale) from key shapes."""
    num_feat, num_in_ch = _shape(state_dict, "conv_first.weight")[:2]
    num_out_ch = _shape(state_dict, "conv_last.weight")[0]
    blocks = {int(m.group(1)) for k in state_dict
              if (m := re.fullmatch(r"body\.(\d+)\.conv1\.weight", k))}
    if blocks != set(range(len(blocks))):
        raise CheckpointError(
            f"residual blocks are not numbered 0..N-1: found body indices {sorted(blocks)}")
    up1 = _shape(state_dict, "upconv1.weight")[0]
    if "upconv2.weight" in state_dict:
        upscale = 4
    else:
        upscale = _scale_from_ratio(up1 / num_feat, "upconv1.weight")
        if upscale == 4:  # x4 in BasicSR is always two x2 stages
            raise CheckpointError("'upconv1.weight' implies x4 but 'upconv2.weight' is missing")
    return {"num_in_ch": num_in_ch, "num_out_ch": num_out_ch, "num_feat": num_feat,
            "num_block": len(blocks), "upscale": upscale}


def infer_srcnn_style_args(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Derive SRCNNStyle(num_in_ch, num_out_ch, num_feat, num_mid, upscale) from key shapes."""
    num_feat, num_in_ch = _shape(state_dict, "features.0.weight")[:2]
    num_mid = _shape(state_dict, "features.2.weight")[0]
    up = _shape(state_dict, "features.12.weight")[0]
    num_out_ch = _shape(state_dict, "features.17.weight")[0]
    return {"num_in_ch": num_in_ch, "num_out_ch": num_out_ch, "num_feat": num_feat,
            "num_mid": num_mid, "upscale": _scale_from_ratio(up / num_mid, "features.12.weight")}


_INFERERS = {"msrresnet": infer_msrresnet_args, "srcnn_style": infer_srcnn_style_args}


def _check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    key = first_nonfinite(state.items())
    if key is not None:
        raise CheckpointError(f"checkpoint {str(path)!r}: parameter {key!r} contains NaN or Inf values")


def _check_keys(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing key {missing[0]!r} ({len(missing)} missing in all)")
    if unexpected:
        problems.append(f"unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    if mismatched:
        k = mismatched[0]
        problems.append(f"shape mismatch for {k!r}: checkpoint {tuple(state[k].shape)} vs model "
                        f"{tuple(expected[k].shape)} ({len(mismatched)} mismatched in all)")
    if problems:
        raise CheckpointError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: "
            + "; ".join(problems))


def import_model_class(spec: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """The class (or factory) named by ``"package.module:Class"`` (``Outer.Inner`` after the colon
    works too); a class or callable passes through. The module must be importable (on ``sys.path``)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise InvalidInputError(f"model class must be given as 'package.module:Class', got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidInputError(f"cannot import module {module_name!r} of model class {spec!r} "
                                f"({type(e).__name__}: {e}); is it on sys.path / PYTHONPATH?") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InvalidInputError(f"module {module_name!r} has no attribute {attr!r} (model class {spec!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InvalidInputError(f"model class {spec!r} is a {type(obj).__name__}, not a class or factory")
    return obj


def _build_custom(model_class: str | Callable[..., nn.Module], args: dict[str, Any], path: Path) -> nn.Module:
    cls = import_model_class(model_class)
    name = getattr(cls, "__qualname__", repr(cls))
    try:
        model = cls(**args)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"cannot build {name}(**{args}) for checkpoint {str(path)!r}: {e}") from e
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"{name}(**{args}) returned a {type(model).__name__}, not an nn.Module")
    return model


def _auto_registered(state: Mapping[str, torch.Tensor]) -> nn.Module | None:
    """A registered architecture whose inferred arguments fit every key and shape of ``state``."""
    for arch, infer in _INFERERS.items():
        try:
            model = create_model(arch, **infer(state))
        except FAIGError:
            continue
        expected = model.state_dict()
        if expected.keys() == state.keys() and all(expected[k].shape == state[k].shape for k in state):
            return model
    return None


def _auto_spandrel(state: dict[str, torch.Tensor], path: Path) -> nn.Module:
    """Detect the architecture with the optional ``spandrel`` package (weights loaded by spandrel)."""
    try:
        import spandrel
    except ImportError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a {' / '.join(list_models())} checkpoint and arch='auto' needs "
            "the optional package 'spandrel' to detect other architectures (pip install spandrel); or "
            "give the architecture: model_class='package.module:Class' (CLI: --model-class) plus "
            "model_kwargs") from e
    try:
        desc = spandrel.ModelLoader().load_from_state_dict(state)
    except Exception as e:  # spandrel's UnsupportedModelError, or a key/shape error while loading
        raise CheckpointError(
            f"spandrel cannot detect the architecture of checkpoint {str(path)!r} "
            f"({type(e).__name__}: {e}); give it with model_class='package.module:Class' "
            "(CLI: --model-class) plus model_kwargs") from e
    model = desc.model
    if getattr(model, "upscale", None) is None and isinstance(getattr(desc, "scale", None), int):
        model.upscale = int(desc.scale)  # the scale spandrel read from the weights
    return model


def _load_weights(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> nn.Module:
    _check_keys(model, state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # e.g. an un-castable dtype
        raise CheckpointError(f"checkpoint {str(path)!r} failed to load: {e}") from e
    return model.to("cpu").eval()


def _from_metadata(meta: dict, arch: str | None, args: dict[str, Any], path: Path) -> nn.Module:
    meta_arch = meta["arch"]
    if arch not in (None, "auto") and arch != meta_arch:
        raise CheckpointError(
            f"checkpoint {str(path)!r} holds a {meta_arch!r} model but arch={arch!r} was requested")
    full = {**dict(meta.get("args") or {}), **args}
    try:
        return create_model(meta_arch, **full)
    except FAIGError as e:
        raise CheckpointError(
            f"checkpoint {str(path)!r}: cannot rebuild {meta_arch!r} from its metadata args {full}: {e}") from e


def _from_arch(arch: str | None, state: dict[str, torch.Tensor], args: dict[str, Any], path: Path) -> nn.Module:
    if arch is None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} carries no architecture metadata (e.g. a BasicSR '.pth'); pass "
            f"arch=<one of {list_models()}> (plus constructor kwargs if they cannot be inferred from the key "
            "shapes), arch='auto' to detect it, or model_class='package.module:Class' for your own model")
    inferred: dict[str, Any] = {}
    if arch in _INFERERS and "preset" not in args:
        try:
            inferred = _INFERERS[arch](state)
        except CheckpointError as e:
            raise CheckpointError(f"checkpoint {str(path)!r}: cannot infer {arch!r} arguments: {e}") from e
    return create_model(arch, **{**inferred, **args})


def load_model(path: PathLike, arch: str | None = None, *,
               model_class: str | Callable[..., nn.Module] | None = None,
               model_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> nn.Module:
    """Rebuild a model from the checkpoint ``path`` (safetensors, or a torch ``.pth`` with or without
    BasicSR's ``params`` / ``params_ema``) and load its weights strictly; eval mode, on CPU.

    The architecture comes from, in order: ``model_class`` (any ``nn.Module`` class or factory, or its
    ``"package.module:Class"`` name, called with ``model_kwargs`` and ``kwargs``); the file's own
    metadata (files written by :func:`save_model`); ``arch`` (a registered name, whose arguments are
    inferred from the key shapes for msrresnet / srcnn_style); ``arch="auto"``: a registered
    architecture that fits every key, else detection by the optional ``spandrel`` package.
    Building the model draws its (then overwritten) initial weights from a forked RNG: the caller's
    global RNG state is the same after the call as before it.
    """
    path = Path(path)
    if model_class is not None and arch not in (None, "auto"):
        raise InvalidInputError(f"give either arch ({arch!r}) or model_class ({model_class!r}), not both")
    args = {**dict(model_kwargs or {}), **kwargs}
    with torch.random.fork_rng(devices=[]):
        return _load(path, arch, model_class, args)


def _load(path: Path, arch: str | None, model_class: str | Callable[..., nn.Module] | None,
          args: dict[str, Any]) -> nn.Module:
    meta = read_metadata(path)
    state = load_state_dict_file(path)
    _check_finite(state, path)
    if model_class is not None:
        return _load_weights(_build_custom(model_class, args, path), state, path)
    if meta.get("arch") is not None:
        return _load_weights(_from_metadata(meta, arch, args, path), state, path)
    if arch == "auto":
        model = _auto_registered(state) if not args else None
        if model is None:
            return _auto_spandrel(state, path).to("cpu").eval()
        return _load_weights(model, state, path)
    return _load_weights(_from_arch(arch, state, args, path), state, path)
