"""LAM over an image folder: K windows per image on textured regions (seeded), the diffusion index of
every window for one or more models on the same windows, mean ± std per image and over the set,
written as JSON + Markdown + a figure grid.

Each finished image is a record (JSON + its maps as safetensors) written atomically under
``<out>/records``; its canonical key hashes the models, the image's pixels and every setting, so a
restarted run reuses exactly the records whose inputs and settings are unchanged and recomputes the
rest.  Under ``torchrun`` rank r takes images i ≡ r (mod world) (as ``faig attribute``); the
records are gathered with ``all_gather_object`` and rank 0 writes the summary.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

import faig_fast
from faig_fast.core.lam_figures import lam_grid_figure
from faig_fast.core.batches import resolve_scale
from faig_fast.core.lam import LocalAttributor, Window
from faig_fast.core.run_loop import process_group
from faig_fast.data.degradations import bicubic_down
from faig_fast.data.images import list_images, read_image
from faig_fast.utils.tensors import update_digest
from faig_fast.errors import InvalidInputError
from faig_fast.utils.io import atomic_save_safetensors, atomic_write_json, atomic_write_text

_RECORD_VERSION = 1


@dataclass
class LamSettings:
    """Everything that decides a dataset run's numbers (all of it goes into the resume key)."""

    windows: int = 4
    window_size: int = 16
    seed: int = 0
    input: str = "hr"            # "hr": images are ground truth, the input is their bicubic ÷scale; "lr": as-is
    channels: int = 3
    steps: int = 50
    method: str = "lam"
    sigma: float = 1.2
    kernel_size: int = 9
    precision: str = "fp32"
    mode: str = "eval"
    device: str | None = None
    internal_batch_size: int | None = None


# windows ------------------------------------------------------------------------------------------
def texture_map(image: torch.Tensor) -> np.ndarray:
    """Σ_c (|∂x| + |∂y|) of ``image`` (C, H, W) as (H, W) float64: where the detail is."""
    a = image.detach().to("cpu", torch.float64).numpy()
    t = np.zeros(a.shape[1:])
    t[:, :-1] += np.abs(np.diff(a, axis=2)).sum(0)
    t[:-1, :] += np.abs(np.diff(a, axis=1)).sum(0)
    return t


def choose_windows(image: torch.Tensor, out_hw: tuple[int, int], k: int, size: int, seed: int,
                   name: str) -> list[Window]:
    """``k`` windows of ``size`` output pixels on textured regions of ``image`` (the model input),
    reproducible from ``seed`` and ``name``: candidates on a half-window grid are ranked by the mean
    texture of the input pixels under them; ``k`` are drawn from the top quarter (at least ``2k``)."""
    h_out, w_out = out_hw
    if size < 2 or size > min(h_out, w_out):
        raise InvalidInputError(f"{name}: window size {size} does not fit the model's {h_out}x{w_out} output "
                                "(need 2 <= size <= the shorter side)")
    tex = texture_map(image)
    h, w = tex.shape
    rows = np.minimum((np.arange(h_out) * h) // h_out, h - 1)
    cols = np.minimum((np.arange(w_out) * w) // w_out, w - 1)
    up = tex[rows][:, cols]  # the input's texture on the output grid
    integral = np.pad(up.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    stride = max(1, size // 2)
    cands = [(r, c) for r in range(0, h_out - size + 1, stride) for c in range(0, w_out - size + 1, stride)]
    scores = np.array([integral[r + size, c + size] - integral[r, c + size] - integral[r + size, c] + integral[r, c]
                       for r, c in cands])
    order = np.argsort(-scores, kind="stable")
    pool = order[:min(len(cands), max(2 * k, len(cands) // 4))]
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    picked = rng.choice(pool, size=min(k, len(pool)), replace=False)
    return [(int(cands[i][0]), int(cands[i][1]), int(size)) for i in sorted(picked.tolist())]


# inputs -------------------------------------------------------------------------------------------
def image_sha256(image: torch.Tensor) -> str:
    h = hashlib.sha256()
    update_digest(h, image)
    return h.hexdigest()


def record_key(models: dict[str, str], image_hash: str, settings: LamSettings) -> str:
    """SHA-256 of the canonical JSON of the models (name → state hash), the input's pixels and every setting."""
    doc = {"models": models, "image": image_hash, "settings": asdict(settings), "version": _RECORD_VERSION}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# records ------------------------------------------------------------------------------------------
class RecordStore:
    """One JSON + one safetensors per image under ``folder``, written atomically; a record is used only
    when its key matches (anything torn, foreign or stale is recomputed)."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _paths(self, index: int, stem: str) -> tuple[Path, Path]:
        base = self.folder / f"{index:05d}_{stem}"
        return base.with_suffix(".json"), base.with_suffix(".safetensors")

    def load(self, index: int, stem: str, key: str) -> dict | None:
        js, st = self._paths(index, stem)
        try:
            rec = json.loads(js.read_text())
            if rec.get("key") != key:
                return None
            with safe_open(str(st), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
        except (OSError, ValueError, SafetensorError):
            return None
        return rec

    def maps(self, index: int, stem: str) -> dict[str, torch.Tensor]:
        with safe_open(str(self._paths(index, stem)[1]), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def save(self, index: int, stem: str, rec: dict, tensors: dict[str, torch.Tensor]) -> None:
        js, st = self._paths(index, stem)
        atomic_save_safetensors({k: v.contiguous() for k, v in tensors.items()}, {"key": rec["key"]}, st)
        atomic_write_json(js, rec)  # last: a record exists only with its maps


def _stats(values: Sequence[float]) -> dict[str, Any]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "n": 0, "non_finite": len(values)}
    a = np.asarray(finite)
    return {"mean": float(a.mean()), "std": float(a.std()), "n": len(finite), "non_finite": len(values) - len(finite)}


def _compute(attributors: dict[str, LocalAttributor], lr: torch.Tensor, name: str, settings: LamSettings,
             out_hw: tuple[int, int]) -> tuple[dict, dict[str, torch.Tensor]]:
    """Windows, then every model's LAM on them: the record (without key) and the maps to store."""
    windows = choose_windows(lr, out_hw, settings.windows, settings.window_size, settings.seed, name)
    rec: dict[str, Any] = {"name": name, "input_shape": list(lr.shape), "windows": [list(w) for w in windows],
                           "models": {}}
    tensors: dict[str, torch.Tensor] = {"image": lr.float()}
    for mname, att in attributors.items():
        results = att.attribute([lr], [windows], names=[name])[0]
        di = [r.diffusion_index for r in results]
        rec["models"][mname] = {"diffusion_index": [d if math.isfinite(d) else None for d in di],
                                "completeness": [r.completeness if math.isfinite(r.completeness) else None
                                                 for r in results],
                                "nan_gradients": [r.nan_gradients for r in results],
                                "seconds": results[0].meta["seconds"], **_stats(di)}
        tensors[f"{mname}/maps"] = torch.stack([r.attribution.float() for r in results])
        tensors[f"{mname}/output"] = results[0].output
    return rec, tensors


def lam_dataset(models: dict[str, nn.Module], folder: str | Path, out: str | Path, settings: LamSettings, *,
                resume: bool = True, progress: bool = True, max_images: int | None = None) -> dict | None:
    """LAM of every model on K windows of every image of ``folder``; writes ``lam_dataset.json``,
    ``lam_dataset.md`` and ``lam_grid.png`` under ``out`` (rank 0) and returns the summary (None on
    other ranks)."""
    if not models:
        raise InvalidInputError("lam_dataset: no models given")
    files = list_images(folder)[:max_images]
    rank, world = process_group()
    out = Path(out)
    store = RecordStore(out / "records")
    attributors = {n: LocalAttributor(m, steps=settings.steps, method=settings.method, sigma=settings.sigma,
                                      kernel_size=settings.kernel_size, device=settings.device,
                                      precision=settings.precision, internal_batch_size=settings.internal_batch_size,
                                      mode=settings.mode) for n, m in models.items()}
    hashes = {n: a.meta["model_sha256"] for n, a in attributors.items()}
    scale = common_scale(models, settings.channels)
    records = []
    mine = list(range(len(files)))[rank::world]
    with tqdm(total=len(mine), desc=f"LAM rank {rank}" if world > 1 else "LAM", unit="img",
              disable=not progress) as bar:
        for i in mine:
            records.append(_one_image(i, files[i], attributors, settings, scale, hashes, store, resume))
            bar.update(1)
    if world > 1:
        parts: list = [None] * world
        dist.all_gather_object(parts, records)
        records = sorted((r for p in parts for r in p), key=lambda r: r["index"])
    if rank != 0:
        return None
    return _write_summary(records, list(models), store, out, settings, hashes, scale)


def common_scale(models: dict[str, nn.Module], channels: int) -> int:
    """The models' common scale (declared, else measured by one forward pass, as ``faig attribute``
    measures it); all must agree, since LAM compares them on the same windows."""
    scales = {n: resolve_scale(m, channels, f"model {n}") for n, m in models.items()}
    if len(set(scales.values())) != 1:
        raise InvalidInputError(f"the models have different scales {scales}: LAM compares them on the same windows")
    return next(iter(scales.values()))


def _one_image(i: int, path: Path, attributors: dict[str, LocalAttributor], settings: LamSettings, scale: int,
               hashes: dict[str, str], store: RecordStore, resume: bool) -> dict:
    img = read_image(path, settings.channels)
    lr = bicubic_down(img, scale) if settings.input == "hr" else img
    key = record_key(hashes, image_sha256(lr), settings)
    rec = store.load(i, path.stem, key) if resume else None
    if rec is None:
        out_shape = next(iter(attributors.values())).output_shape(lr, path.name)
        rec, tensors = _compute(attributors, lr, path.name, settings, tuple(out_shape[-2:]))
        rec.update(key=key, index=i, stem=path.stem, resumed=False)
        store.save(i, path.stem, rec, tensors)
    else:
        rec["resumed"] = True
    return rec


def _write_summary(records: list[dict], names: list[str], store: RecordStore, out: Path, settings: LamSettings,
                   hashes: dict[str, str], scale: int) -> dict:
    overall = {n: _stats([d for r in records for d in r["models"][n]["diffusion_index"]]) for n in names}
    doc = {"settings": asdict(settings), "models": hashes, "scale": scale, "version": faig_fast.__version__,
           "images": [{"name": r["name"], "windows": r["windows"], "resumed": r["resumed"],
                       "models": r["models"]} for r in records],
           "overall": overall}
    if len(names) == 2:
        a, b = names
        diffs = [db - da for r in records for da, db in zip(r["models"][a]["diffusion_index"],
                                                            r["models"][b]["diffusion_index"])
                 if da is not None and db is not None]
        doc["difference"] = {"of": f"{b} - {a}", **_stats(diffs)}
    atomic_write_json(out / "lam_dataset.json", doc)
    atomic_write_text(out / "lam_dataset.md", lam_markdown(doc))
    rows = []
    for r in records[:8]:
        try:
            t = store.maps(r["index"], r["stem"])
        except (OSError, SafetensorError):
            continue
        for k, w in enumerate(r["windows"][:2]):
            rows.append({"name": r["name"], "image": t["image"], "output": t[f"{names[0]}/output"], "window": w,
                         "maps": {n: (t[f"{n}/maps"][k], _nan(r["models"][n]["diffusion_index"][k])) for n in names}})
    if rows:
        lam_grid_figure(rows, out / "lam_grid.png")
    return doc


def _nan(x: float | None) -> float:
    return float("nan") if x is None else x


def _pm(s: dict) -> str:
    return "–" if s.get("mean") is None else f"{s['mean']:.2f} ± {s['std']:.2f}"


def lam_markdown(doc: dict) -> str:
    """Per-image and overall DI (mean ± std over windows) for each model, as a Markdown table."""
    names = list(doc["models"])
    st = doc["settings"]
    lines = [f"DI (mean ± std over {st['windows']} windows of {st['window_size']} px per image), "
             f"{st['method']}/{st['steps']}, σ₀ = {st['sigma']}, l = {st['kernel_size']}, seed {st['seed']}", "",
             "| image | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for im in doc["images"]:
        lines.append(f"| {im['name']} | " + " | ".join(_pm(im["models"][n]) for n in names) + " |")
    lines.append("| **all windows** | " + " | ".join(f"**{_pm(doc['overall'][n])}**" for n in names) + " |")
    if "difference" in doc:
        lines += ["", f"DI difference {doc['difference']['of']} per window: {_pm(doc['difference'])} "
                      f"(n = {doc['difference']['n']})"]
    return "\n".join(lines) + "\n"
