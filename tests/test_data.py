"""Image reading, the degraded-image dataset, batching and the bundled demo images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from faig_fast.data import (
    DegradedImageDataset,
    SizeGroupedBatchSampler,
    collate_same_size,
    demo_images,
    list_images,
    loader,
    modcrop,
    read_image,
)
from faig_fast.data.degradations import make_degradation
from faig_fast.errors import InvalidInputError


def rgb_array(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_rgb(path: Path, h: int, w: int, seed: int = 0) -> np.ndarray:
    arr = rgb_array(h, w, seed)
    Image.fromarray(arr).save(path)
    return arr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Three small PNGs, two sizes (a.png and c.png share one)."""
    write_rgb(tmp_path / "b.png", 20, 30, seed=2)
    write_rgb(tmp_path / "a.png", 16, 18, seed=1)
    write_rgb(tmp_path / "c.PNG", 17, 19, seed=3)  # modcrops to 16x18 at scale 2
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def pairs(*sizes: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(f"img{i}", torch.rand(3, h, w, generator=g)) for i, (h, w) in enumerate(sizes)]


# ---------------------------------------------------------------------------------- read_image
def test_read_rgb(tmp_path: Path) -> None:
    arr = write_rgb(tmp_path / "x.png", 5, 7)
    t = read_image(tmp_path / "x.png")
    assert t.shape == (3, 5, 7) and t.dtype == torch.float32
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), arr / 255, atol=1e-7)


def test_read_gray_becomes_rgb(tmp_path: Path) -> None:
    arr = rgb_array(6, 4)[:, :, 0]
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    t = read_image(str(tmp_path / "g.png"))
    assert t.shape == (3, 6, 4)
    for c in range(3):
        np.testing.assert_allclose(t[c].numpy(), arr / 255, atol=1e-7)


def test_read_gray_as_one_channel(tmp_path: Path) -> None:
    arr = rgb_array(6, 4)[:, :, 0]
    Image.fromarray(arr, mode="L").save(tmp_path / "g.png")
    t = read_image(tmp_path / "g.png", channels=1)
    assert t.shape == (1, 6, 4) and t.dtype == torch.float32
    np.testing.assert_allclose(t[0].numpy(), arr / 255, atol=1e-7)
    arr16 = np.array([[0, 1000, 65535], [32768, 12345, 40000]], dtype=np.uint16)
    Image.fromarray(arr16).save(tmp_path / "d.png")
    np.testing.assert_allclose(read_image(tmp_path / "d.png", channels=1)[0].numpy(), arr16 / 65535, atol=1e-7)


def test_read_rgb_as_luma(tmp_path: Path) -> None:
    import cv2

    arr = write_rgb(tmp_path / "x.png", 5, 7)
    t = read_image(tmp_path / "x.png", channels=1)
    assert t.shape == (1, 5, 7)
    np.testing.assert_allclose(t[0].numpy(), (arr / 255) @ np.array([0.299, 0.587, 0.114]), atol=1e-6)
    # OpenCV's 8-bit conversion is the same luma, rounded to 8-bit levels
    np.testing.assert_allclose(t[0].numpy(), cv2.cvtColor(arr, cv2.COLOR_RGB2GRAY) / 255, atol=0.5 / 255 + 1e-6)
    for bad in (2, 4, 0, True):
        with pytest.raises(InvalidInputError, match="channels must be 1 \\(grayscale\\) or 3 \\(RGB\\)"):
            read_image(tmp_path / "x.png", channels=bad)


def test_read_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.concatenate([rgb_array(4, 5), np.full((4, 5, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    t = read_image(tmp_path / "a.png")
    assert t.shape == (3, 4, 5)
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), rgba[:, :, :3] / 255, atol=1e-7)


def test_read_palette(tmp_path: Path) -> None:
    Image.fromarray(rgb_array(8, 8)).convert("P").save(tmp_path / "p.png")
    t = read_image(tmp_path / "p.png")
    expect = np.asarray(Image.open(tmp_path / "p.png").convert("RGB")) / 255
    np.testing.assert_allclose(t.permute(1, 2, 0).numpy(), expect, atol=1e-7)


def test_read_16bit_png(tmp_path: Path) -> None:
    arr = np.array([[0, 1000, 65535], [32768, 12345, 40000]], dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "d.png")
    t = read_image(tmp_path / "d.png")
    assert t.shape == (3, 2, 3)
    np.testing.assert_allclose(t[1].numpy(), arr / 65535, atol=1e-7)
    assert float(t.max()) == 1.0


def test_read_corrupt_truncated_missing(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    with pytest.raises(InvalidInputError, match="corrupt.png"):
        read_image(bad)
    good = tmp_path / "good.png"
    write_rgb(good, 64, 64)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InvalidInputError, match="trunc.png"):
        read_image(trunc)
    with pytest.raises(InvalidInputError, match="nope.png"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(InvalidInputError, match="text.jpg"):
        read_image(tmp_path / "text.jpg")
    with pytest.raises(InvalidInputError, match=str(tmp_path.name)):
        read_image(tmp_path)  # a directory


# ------------------------------------------------------------------------- modcrop / listing
def test_modcrop() -> None:
    img = torch.rand(3, 17, 22)
    assert modcrop(img, 4).shape == (3, 16, 20)
    assert torch.equal(modcrop(img, 4), img[:, :16, :20])
    assert modcrop(torch.rand(2, 3, 9, 9), 3).shape == (2, 3, 9, 9)
    assert modcrop(img, 1).shape == img.shape
    with pytest.raises(InvalidInputError):
        modcrop(img, 0)


def test_list_images(folder: Path) -> None:
    assert [p.name for p in list_images(folder)] == ["a.png", "b.png", "c.PNG"]
    with pytest.raises(InvalidInputError, match="missing"):
        list_images(folder / "missing")
    empty = folder / "empty"
    empty.mkdir()
    with pytest.raises(InvalidInputError, match="empty"):
        list_images(empty)


# ------------------------------------------------------------------------------------ dataset
def test_dataset_length_order_labels(folder: Path) -> None:
    ds = DegradedImageDataset(folder, ("clean", "blur", "noise"))
    assert len(ds) == 9
    assert ds.names == ["a", "b", "c"]
    assert ds.labels == ["clean", "blur", "noise"] * 3
    assert [ds.item_name(i) for i in (0, 4, 8)] == ["a/clean", "b/blur", "c/noise"]
    assert ds.item_name(-1) == "c/noise"
    lq, gt, label = ds[4]
    assert label == "blur" and gt.shape == (3, 20, 30) and lq.shape == (3, 10, 15)
    assert gt.dtype == lq.dtype == torch.float32
    assert 0 <= float(lq.min()) and float(lq.max()) <= 1
    np.testing.assert_allclose(gt.permute(1, 2, 0).numpy(), rgb_array(20, 30, seed=2) / 255, atol=1e-7)
    torch.testing.assert_close(lq, make_degradation("blur")(gt))
    assert ds[8][1].shape == (3, 16, 18)  # c: 17x19 modcropped
    assert ds.gt_size(8) == (16, 18)
    with pytest.raises(IndexError):
        ds[9]


def test_dataset_from_paths_and_pairs(folder: Path) -> None:
    ds = DegradedImageDataset([folder / "b.png", str(folder / "a.png")], "blur+noise", scale=4)
    assert ds.names == ["b", "a"] and ds.labels == ["blur+noise"] * 2
    assert ds[0][0].shape == (3, 5, 7)
    ds = DegradedImageDataset(pairs((12, 12), (9, 15)), scale=3)
    assert ds.names == ["img0", "img1"] and len(ds) == 4
    assert ds[2][1].shape == (3, 9, 15) and ds[2][0].shape == (3, 3, 5)


def test_dataset_crop() -> None:
    (name, img), = pairs((40, 50))
    ds = DegradedImageDataset([(name, img)], ("clean",), scale=4, crop=23)  # → 20x20, centred
    lq, gt, _ = ds[0]
    assert gt.shape == (3, 20, 20) and lq.shape == (3, 5, 5)
    assert torch.equal(gt, img[:, 10:30, 14:34])
    small = DegradedImageDataset([(name, img)], ("clean",), scale=2, crop=64)
    assert small[0][1].shape == (3, 40, 50)


def test_dataset_grayscale_scale_1(folder: Path) -> None:
    """Denoising data: 1-channel GT (BT.601 luma of the RGB files), LQ of the same size."""
    ds = DegradedImageDataset(folder, ("clean", "noise", "blur"), scale=1, channels=1, seed=3)
    assert ds.channels == 1 and len(ds) == 9
    lq, gt, label = ds[4]
    assert label == "noise" and gt.shape == lq.shape == (1, 20, 30)
    assert ds[8][1].shape == (1, 17, 19) and ds.gt_size(8) == (17, 19)  # scale 1: no modcrop
    np.testing.assert_allclose(gt[0].numpy(), (rgb_array(20, 30, seed=2) / 255) @ np.array([0.299, 0.587, 0.114]),
                               atol=1e-6)
    assert torch.equal(ds[3][0], make_degradation("clean", scale=1)(gt))  # 8-bit quantisation only
    assert not torch.equal(lq, gt) and float((lq - gt).std()) > 0.05
    # tensors: RGB ones become luma, gray ones stay; gray ones become RGB with channels=3
    (name, rgb), = pairs((8, 8))
    gray = DegradedImageDataset([(name, rgb)], ("clean",), scale=1, channels=1)[0][1]
    torch.testing.assert_close(gray[0], (rgb * torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)).sum(0))
    back = DegradedImageDataset([(name, gray)], ("clean",), scale=2)[0][1]
    assert back.shape == (3, 8, 8) and torch.equal(back[0], back[2]) and torch.equal(back[1], gray[0])
    with pytest.raises(InvalidInputError, match="channels must be 1"):
        DegradedImageDataset(folder, channels=4)
    with pytest.raises(InvalidInputError, match="1 \\(gray\\) or 3 \\(RGB\\) channels"):
        DegradedImageDataset([("x", torch.rand(2, 4, 4))])


def test_dataset_determinism(folder: Path) -> None:
    labels = ("clean", "blur", "noise", "blur+noise")
    a = DegradedImageDataset(folder, labels, seed=5)
    b = DegradedImageDataset(folder, labels, seed=5)
    c = DegradedImageDataset(folder, labels, seed=6)
    order = list(reversed(range(len(a))))
    got_b = {i: b[i][0] for i in order}  # a different access order
    for i in range(len(a)):
        lq = a[i][0]
        assert torch.equal(lq, got_b[i]), a.item_name(i)
        if "noise" in a.labels[i]:
            assert not torch.equal(lq, c[i][0]), a.item_name(i)
        else:
            assert torch.equal(lq, c[i][0]), a.item_name(i)
    # items of the same image get different noise
    assert not torch.equal(a[2][0] - a[0][0], c[2][0] - c[0][0])


def test_dataset_fingerprint_covers_everything_that_makes_its_tensors(folder: Path) -> None:
    """Equal for equal inputs (another instance, a touched file); different when any file's bytes, the
    seed, crop, scale, channels, a degradation parameter or the labels change."""
    import os

    base = dict(degradations=("blur", "noise"), seed=0)
    fp = DegradedImageDataset(folder, **base).fingerprint()
    assert fp == DegradedImageDataset(folder, **base).fingerprint() and len(fp) == 64
    os.utime(folder / "a.png", ns=(1, 1))  # only the mtime: same bytes, same items
    assert DegradedImageDataset(folder, **base).fingerprint() == fp
    changes = [dict(seed=1), dict(crop=12), dict(scale=3), dict(channels=1), dict(blur_sigma=1.5),
               dict(noise_sigma=0.05), dict(kernel_size=15), dict(degradations=("blur", "blur+noise"))]
    prints = {DegradedImageDataset(folder, **{**base, **c}).fingerprint() for c in changes}
    assert len(prints) == len(changes) and fp not in prints
    stat = (folder / "a.png").stat()
    arr = np.array(Image.open(folder / "a.png"))
    arr[0, 0, 0] ^= 1  # one pixel, same size, same mtime
    Image.fromarray(arr).save(folder / "a.png")
    os.utime(folder / "a.png", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert DegradedImageDataset(folder, **base).fingerprint() != fp
    tensors = pairs((8, 8), (8, 10))
    fp_t = DegradedImageDataset(tensors, **base).fingerprint()
    tensors[1][1][0, 0, 0] += 0.01
    assert DegradedImageDataset(tensors, **base).fingerprint() != fp_t


def test_dataset_validation(folder: Path) -> None:
    with pytest.raises(InvalidInputError, match="valid labels"):
        DegradedImageDataset(folder, ("blurry",))
    with pytest.raises(InvalidInputError):
        DegradedImageDataset(folder, ())
    with pytest.raises(InvalidInputError, match="duplicate"):
        DegradedImageDataset(folder, ("blur", "blur"))
    with pytest.raises(InvalidInputError, match="missing.png"):
        DegradedImageDataset([folder / "missing.png"])
    with pytest.raises(InvalidInputError):
        DegradedImageDataset([])
    with pytest.raises(InvalidInputError, match="crop"):
        DegradedImageDataset(folder, crop=1)
    with pytest.raises(InvalidInputError, match="scale"):
        DegradedImageDataset(folder, scale=0)
    with pytest.raises(InvalidInputError, match="\\[0, 1\\]"):
        DegradedImageDataset([("x", torch.full((3, 4, 4), 2.0))])
    with pytest.raises(InvalidInputError, match="CHW"):
        DegradedImageDataset([("x", torch.rand(4, 4))])


# ----------------------------------------------------------------------------------- batching
def test_collate_same_size() -> None:
    ds = DegradedImageDataset(pairs((8, 8), (8, 8), (6, 10)), ("clean", "noise"))
    lq, gt, labels = collate_same_size([ds[0], ds[1], ds[2]])
    assert lq.shape == (3, 3, 4, 4) and gt.shape == (3, 3, 8, 8)
    assert labels == ["clean", "noise", "clean"]
    with pytest.raises(InvalidInputError, match="SizeGroupedBatchSampler"):
        collate_same_size([ds[0], ds[4]])


def test_size_grouped_sampler(folder: Path) -> None:
    ds = DegradedImageDataset(folder, ("clean", "blur"))  # a: 16x18, b: 20x30, c: 16x18
    batches = list(SizeGroupedBatchSampler(ds, 3))
    assert batches == [[0, 1, 4], [5], [2, 3]]
    assert len(SizeGroupedBatchSampler(ds, 3)) == 3
    assert list(SizeGroupedBatchSampler(ds, 1)) == [[i] for i in (0, 1, 4, 5, 2, 3)]
    with pytest.raises(InvalidInputError):
        SizeGroupedBatchSampler(ds, 0)


def test_dataloader(folder: Path) -> None:
    ds = DegradedImageDataset(folder, ("clean", "noise"), seed=1)
    seen: list[str] = []
    for lq, gt, labels in loader(ds, batch_size=4):
        assert lq.dim() == gt.dim() == 4 and lq.shape[0] == gt.shape[0] == len(labels)
        assert gt.shape[-2:] == (2 * lq.shape[-2], 2 * lq.shape[-1])
        seen += labels
    assert sorted(seen) == sorted(ds.labels)
    # the plain DataLoader path with batch_size=1 gives the dataset's items
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(ds, batch_size=1, num_workers=0, collate_fn=collate_same_size)))
    assert torch.equal(batch[0][0], ds[0][0]) and batch[2] == ["clean"]


# --------------------------------------------------------------------------------------- demo
def test_demo_images() -> None:
    imgs = demo_images(("astronaut", "chelsea"), max_side=64)
    assert [n for n, _ in imgs] == ["astronaut", "chelsea"]
    for _, t in imgs:
        assert t.dtype == torch.float32 and t.shape[0] == 3 and max(t.shape[1:]) == 64
        assert 0 <= float(t.min()) and float(t.max()) <= 1
    assert imgs[1][1].shape == (3, 43, 64)  # 300x451 keeps its aspect
    full = demo_images(("camera",), max_side=None)[0][1]  # a grayscale one
    assert full.shape == (3, 512, 512) and torch.equal(full[0], full[2])
    with pytest.raises(InvalidInputError, match="no_such"):
        demo_images(("no_such",))
    ds = DegradedImageDataset(demo_images(max_side=32), ("blur",))
    assert len(ds) == 4 and ds[0][0].shape == (3, 16, 16)
