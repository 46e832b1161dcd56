"""Reading images: files (any Pillow format, gray/16-bit/alpha handled) and scikit-image's bundled
photographs, as float32 CHW tensors in [0, 1], RGB (3 channels, the default) or grayscale (1
channel, for denoisers such as DnCNN).  The one place image files are decoded."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from faig_fast.errors import InvalidInputError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

PathLike = Union[str, "os.PathLike[str]"]

#: Luma weights of ITU-R BT.601 (what Pillow's ``convert("L")`` and OpenCV's ``COLOR_RGB2GRAY`` use),
#: applied here in float so 16-bit and float images keep their precision.
LUMA = (0.299, 0.587, 0.114)

# What Pillow raises for missing, unreadable, corrupt or truncated files.
PIL_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def _to_chw(arr: np.ndarray, where: str, gray: bool = False) -> Tensor:
    """HW / HWC integer or float array → float32 CHW RGB in [0, 1] (1×H×W with ``gray``, from HW)."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.float32)
    elif arr.dtype == np.uint8:
        arr = arr.astype(np.float32) / 255.0
    elif arr.dtype in (np.uint16, np.int32, np.dtype(">u2"), np.dtype("<u2")):
        # 16-bit images (Pillow gives I;16 or I for 16-bit PNG/TIFF).
        arr = np.clip(arr.astype(np.float32) / 65535.0, 0.0, 1.0)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = np.clip(arr.astype(np.float32), 0.0, 1.0)
    else:
        raise InvalidInputError(f"{where}: unsupported pixel type {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None] if gray else np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] in (1, 2):  # gray (+ alpha)
        arr = np.repeat(arr[:, :, :1], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] >= 3:  # RGB(A): drop alpha
        arr = arr[:, :, :3]
    else:
        raise InvalidInputError(f"{where}: unsupported image array shape {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).contiguous()


def check_channels(channels: int) -> int:
    if isinstance(channels, bool) or channels not in (1, 3):
        raise InvalidInputError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")
    return channels


def to_channels(img: Tensor, channels: int, where: str = "image") -> Tensor:
    """A CHW image with 1 or 3 channels as ``channels`` channels: gray → RGB repeats the channel,
    RGB → gray takes the BT.601 luma (:data:`LUMA`)."""
    check_channels(channels)
    c = img.shape[-3]
    if c == channels:
        return img
    if c == 1:
        return img.expand(*img.shape[:-3], 3, *img.shape[-2:]).contiguous()
    if c == 3:
        w = torch.tensor(LUMA, dtype=img.dtype, device=img.device).view(3, 1, 1)
        return (img * w).sum(-3, keepdim=True).clamp_(0, 1)
    raise InvalidInputError(f"{where}: cannot make {channels} channel(s) out of {c}; give 1 (gray) or 3 (RGB)")


def read_image(path: PathLike, channels: int = 3) -> Tensor:
    """Read an image file as float32 CHW in [0, 1] with ``channels`` channels (3: RGB, 1: gray).

    Gray and palette images become RGB (``channels=3``), colour images become their BT.601 luma
    (``channels=1``); alpha is dropped, 16-bit images are scaled by 65535. Any unreadable file raises
    ``InvalidInputError`` naming the path (the whole file is decoded here, so truncation is caught
    now, not later)."""
    check_channels(channels)
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "P":  # palette: expand via RGBA so transparency info is not mis-handled
                img = img.convert("RGBA")
            elif img.mode not in ("1", "L", "LA", "RGB", "RGBA", "I", "F") and not img.mode.startswith("I;16"):
                img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, PA, ...
            arr = np.array(img)
    except FileNotFoundError as e:
        raise InvalidInputError(f"image file not found: {path}") from e
    except PIL_ERRORS as e:
        raise InvalidInputError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    if arr.size == 0:
        raise InvalidInputError(f"image {path} is empty ({arr.shape})")
    if channels == 1 and (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 2))):
        arr = arr if arr.ndim == 2 else arr[:, :, 0]  # already gray: no round trip through RGB
        return _to_chw(arr, str(path), gray=True)
    return to_channels(_to_chw(arr, str(path)), channels, str(path))


def modcrop(img: Tensor, scale: int) -> Tensor:
    """Crop H and W (the last two dims) down to multiples of ``scale``, keeping the top-left corner."""
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise InvalidInputError(f"modcrop: scale must be an int >= 1, got {scale!r}")
    if not isinstance(img, Tensor) or img.dim() < 2:
        raise InvalidInputError(f"modcrop: expected an image tensor (..., H, W), got {getattr(img, 'shape', img)!r}")
    h, w = img.shape[-2:]
    return img[..., : h - h % scale, : w - w % scale]


def list_images(folder: PathLike) -> list[Path]:
    """The image files (png/jpg/jpeg/bmp/tif/tiff, any case; hidden files skipped) directly in
    ``folder``, sorted by name. A missing folder or one without images raises ``InvalidInputError``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidInputError(f"image folder not found (or not a directory): {folder}")
    files = sorted(
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    )
    if not files:
        raise InvalidInputError(
            f"no images ({'/'.join(sorted(e[1:] for e in IMAGE_EXTENSIONS))}) in folder {folder}"
        )
    return files


def demo_images(
    names: Sequence[str] = ("astronaut", "chelsea", "coffee", "rocket"),
    max_side: int | None = 256,
) -> list[tuple[str, Tensor]]:
    """Photographs bundled with scikit-image (``skimage.data.<name>()``, no network) as
    ``(name, float32 CHW RGB)`` pairs, area-downscaled so the longest side is at most ``max_side``."""
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 1):
        raise InvalidInputError(f"demo_images: max_side must be an int >= 1 or None, got {max_side!r}")
    if isinstance(names, str):
        names = (names,)
    import skimage.data  # imported lazily: only the demo needs it

    out: list[tuple[str, Tensor]] = []
    for name in names:
        fn = getattr(skimage.data, name, None) if isinstance(name, str) and not name.startswith("_") else None
        if not callable(fn):
            raise InvalidInputError(f"demo_images: skimage.data has no image {name!r}")
        try:
            arr = np.asarray(fn())
        except Exception as e:  # e.g. an image that needs a download (pooch, network) in this install
            raise InvalidInputError(f"demo_images: cannot load skimage.data.{name}(): {type(e).__name__}: {e}") from e
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
            raise InvalidInputError(f"demo_images: skimage.data.{name}() is not an 8-bit image ({arr.dtype}, {arr.shape})")
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]
        h, w = arr.shape[:2]
        if max_side is not None and max(h, w) > max_side:
            f = max_side / max(h, w)
            size = (max(1, min(max_side, round(w * f))), max(1, min(max_side, round(h * f))))
            arr = np.asarray(Image.fromarray(arr).resize(size, Image.Resampling.BOX))
        out.append((name, _to_chw(arr, f"skimage.data.{name}")))
    return out
