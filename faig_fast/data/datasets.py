"""(LQ, GT, label) triples: a dataset that applies every degradation of
``faig_fast.data.degradations`` to every image, deterministically, and size-grouped batching.

Images are float32 CHW tensors in [0, 1] throughout: RGB by default, grayscale with ``channels=1``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from faig_fast.data.degradations import Degradation, make_degradation
from faig_fast.data.images import PIL_ERRORS, PathLike, check_channels, list_images, read_image, to_channels
from faig_fast.errors import InvalidInputError
from faig_fast.utils.tensors import update_digest

ImageSource = Union[PathLike, Sequence[PathLike], Sequence[tuple[str, Tensor]]]
#: Version of how items are made from sources (bump when a degradation or crop changes its output).
FINGERPRINT_FORMAT = "DegradedImageDataset/1"


# ------------------------------------------------------------------------------------ dataset
def _image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image file from its header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            w, h = img.size
    except FileNotFoundError as e:
        raise InvalidInputError(f"image file not found: {path}") from e
    except PIL_ERRORS as e:
        raise InvalidInputError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    return h, w


def _file_sha256(path: Path) -> str:
    """SHA-256 of all bytes of an image file."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise InvalidInputError(f"cannot read image {path}: {e}") from e
    return h.hexdigest()


def _item_seed(seed: int, image_index: int, degradation_index: int) -> int:
    """A 63-bit noise seed for one item, independent of access order and worker process."""
    digest = hashlib.blake2b(f"faig-noise:{seed}:{image_index}:{degradation_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class DegradedImageDataset(Dataset):
    """Every image × every degradation (image-major order) as ``(lq, gt, label)``.

    ``images`` is a folder, a list of image paths, or a list of ``(name, CHW tensor)`` pairs (1 or 3
    channels). The GT is the image as ``channels`` channels (3: RGB, 1: grayscale BT.601 luma),
    modcropped to ``scale`` and, with ``crop``, centre-cropped to ``crop``×``crop`` (rounded down to a
    multiple of ``scale``; smaller images keep their size). ``scale=1`` keeps the LQ at the GT's size
    (denoising, deblurring). Files are read lazily. The noise
    of item (image ``j``, degradation ``d``) is seeded from ``(seed, j, d)``, so an item is the same
    whatever the access order or the DataLoader worker.
    """

    def __init__(
        self,
        images: ImageSource,
        degradations: Sequence[str] = ("blur", "noise"),
        *,
        scale: int = 2,
        seed: int = 0,
        blur_sigma: float = 2.0,
        noise_sigma: float = 0.1,
        kernel_size: int = 21,
        crop: int | None = None,
        channels: int = 3,
    ) -> None:
        self.channels = check_channels(channels)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidInputError(f"seed must be an int, got {seed!r}")
        if isinstance(degradations, str):
            degradations = (degradations,)
        degradations = tuple(degradations)
        if not degradations:
            raise InvalidInputError("degradations is empty: give at least one label, e.g. ('blur', 'noise')")
        if len(set(degradations)) != len(degradations):
            raise InvalidInputError(f"degradations has duplicate labels: {degradations}")
        self.degradations: tuple[Degradation, ...] = tuple(
            make_degradation(d, scale=scale, blur_sigma=blur_sigma, noise_sigma=noise_sigma, kernel_size=kernel_size)
            for d in degradations
        )
        self.degradation_labels: tuple[str, ...] = degradations
        self.scale = scale
        self.seed = seed
        if crop is not None:
            if isinstance(crop, bool) or not isinstance(crop, int) or crop - crop % scale < scale:
                raise InvalidInputError(f"crop must be None or an int >= scale ({scale}), got {crop!r}")
            crop -= crop % scale
        self.crop = crop

        self._paths: list[Path] | None = None
        self._tensors: list[Tensor] | None = None
        if isinstance(images, (str, os.PathLike)):
            self._paths = list_images(images)
            self.names = [p.stem for p in self._paths]
        else:
            items = list(images)
            if not items:
                raise InvalidInputError("images is empty: give a folder, image paths or (name, tensor) pairs")
            if all(isinstance(it, tuple) and len(it) == 2 and isinstance(it[1], Tensor) for it in items):
                self.names = [self._check_pair(name, t) for name, t in items]
                self._tensors = [t for _, t in items]
            elif all(isinstance(it, (str, os.PathLike)) for it in items):
                self._paths = [Path(p) for p in items]
                for p in self._paths:
                    if not p.is_file():
                        raise InvalidInputError(f"image file not found: {p}")
                self.names = [p.stem for p in self._paths]
            else:
                raise InvalidInputError("images must be a folder, a list of paths, or a list of (name, CHW tensor) pairs")
        self.labels: list[str] = [d for _ in self.names for d in self.degradation_labels]
        self._sizes: dict[int, tuple[int, int]] = {}
        self._cache: tuple[int, Tensor] | None = None  # last GT: items of one image are consecutive

    @staticmethod
    def _check_pair(name: object, t: Tensor) -> str:
        if not isinstance(name, str):
            raise InvalidInputError(f"image name must be a str, got {name!r}")
        if t.dim() != 3 or t.shape[0] not in (1, 3) or not t.is_floating_point():
            raise InvalidInputError(
                f"image {name!r}: expected a float CHW tensor with 1 (gray) or 3 (RGB) channels, got shape "
                f"{tuple(t.shape)} dtype {t.dtype}"
            )
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise InvalidInputError(f"image {name!r}: values must be in [0, 1], got [{t.min():.4g}, {t.max():.4g}]")
        return name

    def __len__(self) -> int:
        return len(self.names) * len(self.degradations)

    def _split(self, i: int) -> tuple[int, int]:
        """Item index → (image index, degradation index)."""
        n = len(self)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"dataset index must be an int, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range for a dataset of {n} items")
        return divmod(i, len(self.degradations))

    def item_name(self, i: int) -> str:
        """E.g. ``"baboon/blur"``."""
        j, d = self._split(i)
        return f"{self.names[j]}/{self.degradation_labels[d]}"

    def _crop_box(self, h: int, w: int, name: str) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the GT inside an h×w image."""
        hh, ww = h - h % self.scale, w - w % self.scale
        if hh < self.scale or ww < self.scale:
            raise InvalidInputError(f"image {name} ({h}x{w}) is smaller than the scale {self.scale}")
        if self.crop is None:
            return 0, 0, hh, ww
        ch, cw = min(self.crop, hh), min(self.crop, ww)
        return (hh - ch) // 2, (ww - cw) // 2, ch, cw

    def _source_size(self, j: int) -> tuple[int, int]:
        if self._tensors is not None:
            return tuple(self._tensors[j].shape[-2:])  # type: ignore[return-value]
        if j not in self._sizes:
            self._sizes[j] = _image_size(self._paths[j])  # type: ignore[index]
        return self._sizes[j]

    def gt_size(self, i: int) -> tuple[int, int]:
        """(H, W) of item ``i``'s GT, from the file header (no decoding)."""
        j, _ = self._split(i)
        h, w = self._source_size(j)
        return self._crop_box(h, w, self.names[j])[2:]

    def gt(self, j: int) -> Tensor:
        """The GT of image ``j`` (``channels`` channels, modcropped, centre-cropped), float32 CHW in [0, 1]."""
        if self._cache is not None and self._cache[0] == j:
            return self._cache[1]
        if self._tensors is not None:
            img = to_channels(self._tensors[j].float(), self.channels, f"image {self.names[j]!r}")
        else:
            img = read_image(self._paths[j], self.channels)  # type: ignore[index]
        top, left, h, w = self._crop_box(img.shape[-2], img.shape[-1], self.names[j])
        img = img[:, top : top + h, left : left + w].contiguous()
        self._cache = (j, img)
        return img

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, str]:
        j, d = self._split(i)
        gt = self.gt(j)
        gen = torch.Generator().manual_seed(_item_seed(self.seed, j, d))
        lq = self.degradations[d](gt, generator=gen)
        return lq, gt.clone(), self.degradation_labels[d]  # clone: callers may edit it in place

    def fingerprint(self) -> str:
        """SHA-256 of everything that determines this dataset's tensors: every source image's content
        (all bytes of each file, or a tensor's dtype, shape and values) and name, every degradation
        parameter, the seed, the crop, the scale and the channel count.  Two datasets with one
        fingerprint yield the same items; a resumed run uses it to refuse another dataset's work."""
        h = hashlib.sha256()
        params = {
            "format": FINGERPRINT_FORMAT, "names": self.names, "labels": list(self.degradation_labels),
            "degradations": [dataclasses.asdict(d) for d in self.degradations], "scale": self.scale,
            "seed": self.seed, "crop": self.crop, "channels": self.channels,
        }
        h.update(json.dumps(params, sort_keys=True).encode())
        if self._tensors is not None:
            for t in self._tensors:
                update_digest(h, t)
        else:
            for path in self._paths:  # type: ignore[union-attr]
                h.update(_file_sha256(path).encode())
        return h.hexdigest()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cache"] = None  # don't ship a decoded image to DataLoader workers
        return state


# ------------------------------------------------------------------------------------ batching
def collate_same_size(batch: Sequence[tuple[Tensor, Tensor, str]]) -> tuple[Tensor, Tensor, list[str]]:
    """Stack ``(lq, gt, label)`` items into ``(lq BCHW, gt BCHW, [label, ...])``; all items must share
    one size (use ``SizeGroupedBatchSampler`` / ``loader`` to batch images of different sizes)."""
    if len(batch) == 0:
        raise InvalidInputError("collate_same_size: empty batch")
    lqs, gts, labels = zip(*batch)
    lq_shapes = {tuple(t.shape) for t in lqs}
    gt_shapes = {tuple(t.shape) for t in gts}
    if len(lq_shapes) > 1 or len(gt_shapes) > 1:
        raise InvalidInputError(
            f"collate_same_size: items in a batch have different sizes (GT {sorted(gt_shapes)}, "
            f"LQ {sorted(lq_shapes)}); use batch_size=1 or SizeGroupedBatchSampler (faig_fast.data.loader)"
        )
    return torch.stack(lqs), torch.stack(gts), list(labels)


class SizeGroupedBatchSampler(Sampler[list[int]]):
    """Batches of item indices whose GTs have the same size, so any dataset can be batched.

    Groups are ordered by their first item, items within a group by index; each group is cut into
    batches of at most ``batch_size``. The order is deterministic. Uses ``dataset.gt_size(i)`` when
    available (cheap), otherwise loads each item once to read its GT shape.
    """

    def __init__(self, dataset: Dataset, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidInputError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        size_of = getattr(dataset, "gt_size", None)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(dataset)):  # type: ignore[arg-type]
            key = tuple(size_of(i)) if callable(size_of) else tuple(dataset[i][1].shape)
            groups.setdefault(key, []).append(i)
        self._batches = [
            idx[k : k + batch_size] for idx in groups.values() for k in range(0, len(idx), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter([list(b) for b in self._batches])

    def __len__(self) -> int:
        return len(self._batches)


def loader(dataset: Dataset, batch_size: int = 1, *, num_workers: int = 0) -> DataLoader:
    """A DataLoader over ``dataset`` yielding ``(lq BCHW, gt BCHW, labels)`` batches of same-size items."""
    return DataLoader(
        dataset,
        batch_sampler=SizeGroupedBatchSampler(dataset, batch_size),
        collate_fn=collate_same_size,
        num_workers=num_workers,
    )
