"""Faults and determinism: OOM back-off, failed saves, bit-identical reruns."""
from __future__ import annotations

import pytest
import torch

from conftest import make_images, make_loader, make_pair
from faig_fast import attribute
from faig_fast.core.attribution import Attribution
from faig_fast.core.engine import PathEngine
from faig_fast.errors import InvalidInputError


def test_oom_halves_the_chunk_and_retries(monkeypatch):
    a, b = make_pair()
    lq, gt = make_images(1)
    engine = PathEngine(a, b, strategy="linear", precision="fp64", chunk_size=8)
    expected = PathEngine(a, b, strategy="loop", precision="fp64").integrate(lq, gt, steps=8)[0].grads
    real = engine.strategies["linear"].chunk
    seen = []

    def flaky(x, y, alphas, weights):
        seen.append(len(alphas))
        if len(alphas) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x, y, alphas, weights)

    monkeypatch.setattr(engine.strategies["linear"], "chunk", flaky)
    got = engine.integrate(lq, gt, steps=8)[0].grads
    assert seen[:3] == [8, 4, 2]
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-10, atol=1e-12)


def test_oom_at_chunk_one_is_raised(monkeypatch):
    a, b = make_pair()
    lq, gt = make_images(1)
    engine = PathEngine(a, b, strategy="linear", chunk_size=1)

    def always(*args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.strategies["linear"], "chunk", always)
    with pytest.raises(torch.OutOfMemoryError):
        engine.integrate(lq, gt, steps=2)


def test_chunk_planner_respects_budget():
    a, b = make_pair()
    lq, _ = make_images(1)
    engine = PathEngine(a, b, strategy="vmap", memory_budget=1)
    assert engine.runner.plan_chunk(100, engine.step_bytes(lq[:1].to(engine.dtype))) == 1
    engine = PathEngine(a, b, strategy="vmap", memory_budget=1 << 40)
    assert engine.runner.plan_chunk(100, engine.step_bytes(lq[:1].to(engine.dtype))) == 100


def test_failed_save_keeps_previous_result(tmp_path, monkeypatch):
    a, b = make_pair()
    res = attribute(a, b, make_loader(), steps=2)
    path = res.save(tmp_path / "r.safetensors")
    before = path.read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError):
        res.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]


def test_corrupt_result_file_is_named(tmp_path):
    bad = tmp_path / "r.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(InvalidInputError, match="r.safetensors"):
        Attribution.load(bad)


def test_reruns_are_bit_identical():
    a, b = make_pair(dtype=torch.float32)
    data = [(x.float(), y.float(), l) for x, y, l in make_loader()]
    r1 = attribute(a, b, data, steps=5)
    r2 = attribute(a, b, data, steps=5)
    for label in r1.labels:
        assert torch.equal(r1.sums[label], r2.sums[label])
        assert torch.equal(r1.ranking(label), r2.ranking(label))


def test_failed_batch_save_leaves_no_torn_file_and_resumes(tmp_path, monkeypatch):
    """A failure while persisting a batch (disk full) leaves the earlier batches and no partial file; the
    rerun computes only the rest and gives the uninterrupted run's sums bit for bit."""
    from safetensors.torch import save_file as real_save

    from faig_fast.data import DegradedImageDataset

    a, b = make_pair(dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    ds = DegradedImageDataset([(f"im{i}", torch.rand(3, 8, 8 + 2 * i, generator=g)) for i in range(3)], ("blur", "noise"))
    whole = attribute(a, b, ds, steps=3)
    saves = []

    def flaky(tensors, path, metadata=None):
        saves.append(path)
        if len(saves) == 2:
            with open(path, "wb") as f:
                f.write(b"\x00" * 7)  # a torn write
            raise OSError("disk full (simulated)")
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr("safetensors.torch.save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        attribute(a, b, ds, steps=3, resume_dir=tmp_path / "r")
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["batch000000.safetensors", "run.json"]
    first = (tmp_path / "r" / "batch000000.safetensors").stat().st_mtime_ns
    again = attribute(a, b, ds, steps=3, resume_dir=tmp_path / "r")
    assert (tmp_path / "r" / "batch000000.safetensors").stat().st_mtime_ns == first
    assert again.counts == whole.counts and again.image_names == whole.image_names
    for label in whole.labels:
        assert torch.equal(again.sums[label], whole.sums[label])


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    import os

    from faig_fast.utils.io import atomic_write_text

    from faig_fast.utils import io

    expected = 0o666 & ~io._UMASK
    assert expected != 0o600  # the usual umasks (022, 002) give 0644 / 0664; mkstemp alone gives 0600
    path = atomic_write_text(tmp_path / "a.txt", "x")
    assert (os.stat(path).st_mode & 0o777) == expected
