"""The one run loop of ``faig_fast.attribute`` and ``faig attribute``: resumable (a real SIGKILL after a
persisted batch; never from other inputs) and sharded over 2 gloo processes under torchrun."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import faig_fast
from conftest import GrayDenoiser, make_pair, registry_pair
from faig_fast.core.attribution import Attribution
from faig_fast.core.attributor import Attributor
from faig_fast.core.batches import iterate_units, plan_batches, unit_digest
from faig_fast.core.resume import ResumeStore
from faig_fast.core.reference import reference_attribute
from faig_fast.data import DegradedImageDataset
from faig_fast.errors import InvalidInputError
from faig_fast.models import save_model

REPO = Path(__file__).resolve().parents[1]


def attribute_dataset(model_a, model_b, dataset, **kwargs) -> Attribution:
    """What ``faig attribute`` runs on its dataset."""
    return faig_fast.attribute(model_a, model_b, dataset, distributed=True, **kwargs)


@pytest.fixture
def workdir(tmp_path):
    a, b = registry_pair("msrresnet")
    save_model(a, tmp_path / "a.safetensors")
    save_model(b, tmp_path / "b.safetensors")
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (24, 20 + 2 * i, 3), dtype=np.uint8)).save(imgs / f"im{i}.png")
    return tmp_path


def _cli(workdir: Path, out: str, *extra: str, steps: int = 60) -> list[str]:
    return ["-m", "faig_fast", "attribute", "--baseline", str(workdir / "a.safetensors"),
            "--target", str(workdir / "b.safetensors"), "--data", str(workdir / "imgs"), "--steps", str(steps),
            "--out", str(workdir / out), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _dataset(sizes=((8, 8), (8, 10), (8, 8)), labels=("blur", "noise"), **kw) -> DegradedImageDataset:
    g = torch.Generator().manual_seed(0)
    return DegradedImageDataset([(f"img{i}", torch.rand(3, h, w, generator=g)) for i, (h, w) in enumerate(sizes)],
                                labels, **kw)


def test_killed_run_resumes_to_identical_result(workdir):
    straight = subprocess.run([sys.executable, *_cli(workdir, "straight.safetensors")], env=_env(),
                              capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    rdir = workdir / "resume"
    proc = subprocess.Popen([sys.executable, *_cli(workdir, "resumed.safetensors", "--resume-dir", str(rdir))],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(rdir.glob("batch*.safetensors")):  # the first persisted batch
        assert proc.poll() is None, "the run ended before persisting anything"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.name: p.stat().st_mtime_ns for p in rdir.glob("batch*.safetensors")}
    assert 1 <= len(done) < 4, "the kill should land after the first of the 4 batches (one per image)"
    again = subprocess.run([sys.executable, *_cli(workdir, "resumed.safetensors", "--resume-dir", str(rdir))],
                           env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    for name, mtime in done.items():
        assert (rdir / name).stat().st_mtime_ns == mtime, f"{name} was recomputed"
    assert len(list(rdir.glob("batch*.safetensors"))) == 4
    x, y = Attribution.load(workdir / "straight.safetensors"), Attribution.load(workdir / "resumed.safetensors")
    assert x.counts == y.counts and x.image_names == y.image_names
    for label in x.labels:
        assert torch.equal(x.sums[label], y.sums[label])


def test_resume_dir_rejects_other_settings(tmp_path):
    a, b = make_pair(dtype=torch.float32)
    ds = _dataset()
    attribute_dataset(a, b, ds, steps=2, resume_dir=tmp_path / "r")
    with pytest.raises(InvalidInputError, match="other settings"):
        attribute_dataset(a, b, ds, steps=3, resume_dir=tmp_path / "r")
    with pytest.raises(InvalidInputError, match="other settings"):
        attribute_dataset(a, b, _dataset(labels=("blur", "clean")), steps=2, resume_dir=tmp_path / "r")


def test_one_path_for_attribute_and_attribute_dataset(tmp_path):
    """A list of the dataset's items and the dataset itself give the same names and scores; with a resume
    folder the sums are bit-identical."""
    a, b = make_pair(dtype=torch.float32)
    ds = _dataset()
    assert plan_batches(ds) == [[0, 1], [2, 3], [4, 5]]
    kw = dict(steps=4, precision="fp64", strategy="vmap")
    direct = faig_fast.attribute(a, b, [ds[i] + (ds.item_name(i),) for i in range(len(ds))], keep_per_image=True,
                                 **kw)
    plain = attribute_dataset(a, b, ds, keep_per_image=True, **kw)
    resumable = attribute_dataset(a, b, ds, keep_per_image=True, resume_dir=tmp_path / "r", **kw)
    assert direct.image_names == plain.image_names == resumable.image_names == [ds.item_name(i) for i in range(6)]
    assert direct.counts == plain.counts == resumable.counts == {"blur": 3, "noise": 3}
    for label in direct.labels:
        torch.testing.assert_close(plain.sums[label], direct.sums[label], rtol=1e-12, atol=0)
        assert torch.equal(plain.sums[label], resumable.sums[label])
    for x, y, z in zip(direct.image_scores, plain.image_scores, resumable.image_scores):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=0)
        assert torch.equal(y, z)
    # checked: the first item and every 5th (20 / 4 steps), by dataset index
    assert plain.meta["completeness"]["images"] == resumable.meta["completeness"]["images"] == ["img0/blur",
                                                                                                "img2/noise"]
    assert plain.meta["completeness"]["delta"] == resumable.meta["completeness"]["delta"]


def test_resume_folder_with_foreign_and_corrupt_files(tmp_path):
    """Foreign, torn, stale or other-run files are recomputed, never trusted and never a KeyError."""
    from safetensors.torch import save_file

    a, b = make_pair(dtype=torch.float32)
    ds = _dataset()
    kw = dict(steps=3, precision="fp64")
    rdir = tmp_path / "r"
    whole = attribute_dataset(a, b, ds, resume_dir=rdir, keep_per_image=True, **kw)
    save_file({"x": torch.zeros(2)}, rdir / "batch000000.safetensors")  # a foreign safetensors file
    good = (rdir / "batch000002.safetensors").read_bytes()
    (rdir / "batch000002.safetensors").write_bytes(good[: len(good) // 2])  # torn
    save_file({"scores": torch.zeros(2, len(whole.index), dtype=torch.float64)}, rdir / "batch000004.safetensors",
              metadata={"faig_fast_batch": json.dumps({"indices": [4, 5]})})  # incomplete metadata
    (rdir / "notes.txt").write_text("not ours")
    (rdir / "item000001.safetensors").write_bytes(b"\x00" * 10)  # a file of an older layout
    again = attribute_dataset(a, b, ds, resume_dir=rdir, keep_per_image=True, **kw)
    assert again.counts == whole.counts and again.image_names == whole.image_names
    for label in whole.labels:
        assert torch.equal(again.sums[label], whole.sums[label])
    for x, y in zip(again.image_scores, whole.image_scores):
        assert torch.equal(x, y)
    assert (rdir / "notes.txt").read_text() == "not ours"
    assert (rdir / "batch000002.safetensors").read_bytes() == good  # recomputed, identically
    store = ResumeStore(rdir, again.meta["run_key"], len(again.index), rank=0)
    units = list(iterate_units(ds, Attributor(a, b, **kw).validate))
    assert len(units) == 3 and all(store.load(u, unit_digest(u)) is not None for u in units)


def test_resume_manifest_is_written_atomically(tmp_path, monkeypatch):
    a, b = make_pair(dtype=torch.float32)
    ds = _dataset(sizes=((8, 8),), labels=("blur",))
    rdir = tmp_path / "r"
    attribute_dataset(a, b, ds, steps=2, resume_dir=rdir)
    before = (rdir / "run.json").read_text()
    real = Path.write_text

    def torn(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2])
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="disk full"):
        attribute_dataset(a, b, ds, steps=2, resume_dir=rdir)
    monkeypatch.undo()
    assert (rdir / "run.json").read_text() == before and json.loads(before)["data"] == ds.fingerprint()
    assert sorted(p.name for p in rdir.iterdir()) == ["batch000000.safetensors", "run.json"]



def test_grayscale_denoising_dataset_equals_reference():
    """DnCNN-style pair on DegradedImageDataset(channels=1, scale=1): scale inferred as 1, reference scores."""
    torch.manual_seed(0)
    a, b = GrayDenoiser(), GrayDenoiser()
    b.load_state_dict({k: v + 0.05 * torch.randn_like(v) for k, v in a.state_dict().items()})
    ds = _dataset(sizes=((10, 10), (10, 10)), labels=("noise", "blur"), scale=1, channels=1)
    got = attribute_dataset(a.double(), b.double(), ds, steps=4, precision="fp64", keep_per_image=True)
    items = [tuple(t.double() if torch.is_tensor(t) else t for t in ds[i]) for i in range(len(ds))]
    ref = reference_attribute(a, b, items, steps=4, keep_per_image=True)
    assert got.meta["scale"] == 1 and got.counts == {"noise": 2, "blur": 2}
    for x, y in zip(got.image_scores, ref.image_scores):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_bad_dataset_items_are_named():
    a, b = make_pair(dtype=torch.float32)

    class Bad(torch.utils.data.Dataset):
        def __init__(self, items=()):
            self.items = list(items)

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    good = _dataset(sizes=((8, 8),), labels=("blur",))[0]
    with pytest.raises(InvalidInputError, match="item 1: lq contains NaN"):
        attribute_dataset(a, b, Bad([good, (good[0] * float("nan"), good[1], "blur")]), steps=2)
    with pytest.raises(InvalidInputError, match="dataset item 0: expected \\(lq, gt, label"):
        attribute_dataset(a, b, Bad([good[0]]), steps=2)
    with pytest.raises(InvalidInputError, match="no images"):
        attribute_dataset(a, b, Bad(), steps=2)


def test_torchrun_two_gloo_processes_match_single(workdir):
    single = subprocess.run([sys.executable, *_cli(workdir, "single.safetensors", "--keep-per-image", steps=8)],
                            env=_env(), capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                            *_cli(workdir, "multi.safetensors", "--keep-per-image", steps=8)], env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    x, y = Attribution.load(workdir / "single.safetensors"), Attribution.load(workdir / "multi.safetensors")
    assert x.counts == y.counts
    for label in x.labels:
        torch.testing.assert_close(x.sums[label], y.sums[label], rtol=1e-12, atol=0)
        assert torch.equal(x.ranking(label), y.ranking(label))
    # per-image lists in dataset order (rank 0 holds batches 0 and 2, rank 1 batches 1 and 3), not per rank
    assert x.image_names == y.image_names == [f"im{i}/{d}" for i in range(4) for d in ("blur", "noise")]
    assert x.image_labels == y.image_labels
    for s, t in zip(x.image_scores, y.image_scores):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=0)
    assert x.meta["completeness"]["images"] == y.meta["completeness"]["images"]


# stale resume: a resumed run never reuses work made from other inputs --------------------------

TINY = REPO / "faig_fast" / "assets" / "pairs" / "msrresnet_tiny"


def _tiny_cli(tmp_path: Path, out: str, *extra: str) -> list[str]:
    return ["attribute", "--baseline", str(TINY / "baseline.safetensors"), "--target", str(TINY / "target.safetensors"),
            "--data", str(tmp_path / "imgs"), "--steps", "2", "--out", str(tmp_path / out), "--json", *extra]


def _write_images(folder: Path, n: int = 2, seed: int = 0) -> None:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"im{i}.png")


def _same_sums(x: Attribution, y: Attribution) -> bool:
    return x.counts == y.counts and all(torch.equal(x.sums[l], y.sums[l]) for l in x.labels)


def test_cli_resume_refuses_other_seed_crop_or_images_and_resumes_an_unchanged_rerun(tmp_path, capsys):
    from faig_fast.apps.cli import main

    _write_images(tmp_path / "imgs")
    rdir = str(tmp_path / "r")
    assert main(_tiny_cli(tmp_path, "s0.safetensors", "--seed", "0", "--resume-dir", rdir)) == 0
    done = {p.name: p.stat().st_mtime_ns for p in Path(rdir).glob("batch*.safetensors")}
    assert len(done) == 1  # 2 images × 2 degradations of one size: one planned batch
    # an unchanged rerun resumes: nothing recomputed, bit-identical
    assert main(_tiny_cli(tmp_path, "again.safetensors", "--seed", "0", "--resume-dir", rdir)) == 0
    assert {p.name: p.stat().st_mtime_ns for p in Path(rdir).glob("batch*.safetensors")} == done
    s0 = Attribution.load(tmp_path / "s0.safetensors")
    assert _same_sums(s0, Attribution.load(tmp_path / "again.safetensors"))
    # another seed (noise), crop or image content with the same folder: refused, never the seed-0 sums
    capsys.readouterr()
    for extra in (["--seed", "1"], ["--crop", "12"]):
        assert main(_tiny_cli(tmp_path, "other.safetensors", *extra, "--resume-dir", rdir)) == 2
        assert "holds a run with other settings, models or images (data:" in capsys.readouterr().err
    assert main(_tiny_cli(tmp_path, "s1.safetensors", "--seed", "1")) == 0  # fresh: seed 1 really differs
    assert not torch.equal(Attribution.load(tmp_path / "s1.safetensors").sums["noise"], s0.sums["noise"])
    _write_images(tmp_path / "imgs", seed=1)  # same names and sizes, other pixels
    assert main(_tiny_cli(tmp_path, "changed.safetensors", "--resume-dir", rdir)) == 2
    assert "(data:" in capsys.readouterr().err
    assert not (tmp_path / "other.safetensors").exists() and not (tmp_path / "changed.safetensors").exists()


def test_resume_recomputes_batches_made_from_other_inputs():
    """A loader has no fingerprint: each batch file's input digest decides.  The seed-1 items with the
    seed-0 folder are recomputed (equal to a fresh seed-1 run), unchanged batches are reused."""
    import tempfile

    a, b = make_pair(dtype=torch.float32)

    def items(seed):
        ds = _dataset(seed=seed)
        return [ds[i] + (ds.item_name(i),) for i in range(len(ds))]

    with tempfile.TemporaryDirectory() as rdir:
        s0 = faig_fast.attribute(a, b, items(0), steps=2, resume_dir=rdir)
        before = {p.name: p.stat().st_mtime_ns for p in Path(rdir).glob("batch*.safetensors")}
        assert len(before) == 6 and json.loads((Path(rdir) / "run.json").read_text())["data"] is None
        s1 = faig_fast.attribute(a, b, items(1), steps=2, resume_dir=rdir)
        after = {p.name: p.stat().st_mtime_ns for p in Path(rdir).glob("batch*.safetensors")}
    fresh = faig_fast.attribute(a, b, items(1), steps=2)
    assert _same_sums(s1, fresh) and not torch.equal(s1.sums["noise"], s0.sums["noise"])
    # blur items carry no noise: the same inputs under both seeds, so their batches are reused
    changed = {n for n in before if before[n] != after[n]}
    assert changed == {f"batch{i:06d}.safetensors" for i in (1, 3, 5)}


def test_resume_checks_inputs_even_when_a_dataset_fingerprint_lies(tmp_path):
    class Lying(torch.utils.data.Dataset):
        def __init__(self, seed):
            self.ds = _dataset(seed=seed)

        def __len__(self):
            return len(self.ds)

        def __getitem__(self, i):
            return self.ds[i]

        def fingerprint(self):
            return "always the same"

    a, b = make_pair(dtype=torch.float32)
    faig_fast.attribute(a, b, Lying(0), steps=2, resume_dir=tmp_path / "r")
    got = faig_fast.attribute(a, b, Lying(1), steps=2, resume_dir=tmp_path / "r")
    assert _same_sums(got, faig_fast.attribute(a, b, Lying(1), steps=2))


def test_torchrun_ranks_with_different_runs_are_refused(monkeypatch):
    """Every rank gathers every rank's run key before the reduction: a rank with other settings (here
    another rule) makes all of them refuse; ranks without images (more ranks than batches) do not count."""
    from faig_fast.core import run_loop

    key = {"rule": "riemann_left/4", "scale": 2}
    ranks = [(key, True), ({"rule": "riemann_left/4", "scale": None}, False), ({**key, "rule": "riemann_left/5"}, True)]
    monkeypatch.setattr(run_loop.dist, "get_world_size", lambda: len(ranks))
    monkeypatch.setattr(run_loop.dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), ranks))
    with pytest.raises(faig_fast.FAIGError, match=r"torchrun ranks 0 and 2 attribute different runs \(rule: "
                                                  r"'riemann_left/4' vs 'riemann_left/5'\)"):
        run_loop._shared_key(key, True)
    ranks[2] = (key, True)
    assert run_loop._shared_key(key, True) == key


def test_the_whole_run_is_under_one_math_mode(monkeypatch):
    """Passes, endpoint losses of the completeness check, reductions and the report all run inside the
    run's one math-mode setting (TF32 off for fp32 on CUDA), entered once for the run."""
    import contextlib

    from conftest import make_loader
    from faig_fast.core.engine import ModuleRunner, PathEngine
    from faig_fast.core.scoring import FilterScorer

    depth, entered, seen = [0], [], []

    @contextlib.contextmanager
    def math_mode(self):
        entered.append(depth[0])
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(ModuleRunner, "math_mode", math_mode)
    for cls, name in ((PathEngine, "integrate"), (PathEngine, "loss_at"), (FilterScorer, "__call__"),
                      (Attributor, "validate"), (Attributor, "finish")):
        real = getattr(cls, name)
        monkeypatch.setattr(cls, name, lambda *a, _r=real, _n=name, **k: seen.append((_n, depth[0])) or _r(*a, **k))
    a, b = make_pair()
    faig_fast.attribute(a, b, make_loader(("blur", "noise")), steps=4, precision="fp64")
    assert {n for n, _ in seen} == {"integrate", "loss_at", "__call__", "validate", "finish"}
    assert all(d >= 1 for _, d in seen) and entered[0] == 0 and entered.count(0) == 1
