"""A micro end-to-end reproduction: every stage, the report, and resuming without recomputation."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from faig_fast.utils.paths import shipped_pair_dir
from faig_fast.apps.report import HEADERS
from faig_fast.apps.reproduce import PRESET_CONFIGS, reproduce
from faig_fast.errors import InvalidInputError

MICRO = {
    "crop": 32, "steps": 2, "ig_steps": 2, "prediction_steps": 2, "backend": "torch",
    "bsd_calib": 2, "bsd_test": 2, "bsd_crop": 32,
    "retrain_iters": 2, "retrain_batch": 2, "retrain_patch": 32, "retrain_images": None,
    "table_fractions": [0.01, 0.05], "curve_fractions": [0.0, 0.01, 1.0], "lams": [0.0, 1.0],
}


def _write_images(folder, n, size, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        # smooth-ish content so blur and noise change the image differently
        base = rng.random((size // 8, size // 8, 3))
        img = np.kron(base, np.ones((8, 8, 1))) * 0.7 + 0.3 * rng.random((size, size, 3))
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"im{i:02d}.png")


def _micro_files(tmp_path, arch: str = "msrresnet"):
    """Tiny Set14/BSD68/SunHays80 folders and a saved ``arch`` pair: (data root, pair dir, out dir)."""
    data = tmp_path / "data"
    _write_images(data / "Set14", 2, 40, 0)
    _write_images(data / "BSD68", 4, 40, 1)
    _write_images(data / "SunHays80", 2, 48, 2)
    pair = tmp_path / "pair"  # the shipped tiny pair, trained: its FAIG filters carry their functions
    pair.mkdir()
    for name in ("baseline.safetensors", "target.safetensors"):
        shutil.copy(shipped_pair_dir(f"{arch}_tiny") / name, pair / name)
    return data, pair, tmp_path / "out"


@pytest.fixture
def micro_setup(tmp_path):
    return _micro_files(tmp_path)


def test_micro_reproduce_and_resume(micro_setup):
    data, pair, out = micro_setup
    report = reproduce("tiny", data_root=data, out_dir=out, seeds=(0,), pair_dir=pair, config=MICRO,
                       progress=False)
    text = report.read_text()
    for h in HEADERS.values():
        assert h in text
    assert "_Not run._" not in text
    for f in ("pair.json", "faig_set14.safetensors", "ig_set14.safetensors", "masking.json", "retrain.json",
              "faig_bsd68_calib.safetensors", "faig_bsd68_test.safetensors", "prediction.json",
              "modulation.json", "timings.json", "figures/masking_curves.png", "figures/layer_distribution.png",
              "figures/masking_examples.png", "figures/modulation.png"):
        assert (out / f).exists(), f
    retrain = json.loads((out / "retrain.json").read_text())
    assert set(retrain["methods"]) == {"faig", "ig", "weight_change", "random"}
    pred = json.loads((out / "prediction.json").read_text())
    assert len(pred["test"]["labels"]) == 2 * 3 and set(pred["thresholds"]) == {"blur", "noise"}
    _numbers_that_must_hold(out)

    stage_files = [p for p in out.rglob("*") if p.is_file()]
    mtimes = {p: p.stat().st_mtime_ns for p in stage_files}
    timings = (out / "timings.json").read_text()
    report2 = reproduce("tiny", data_root=data, out_dir=out, seeds=(0,), pair_dir=pair, config=MICRO,
                        progress=False)
    assert report2 == report
    # nothing was recomputed or rewritten (config.json is re-written with the same content)
    changed = [p for p in stage_files if p.name != "config.json" and p.stat().st_mtime_ns != mtimes[p]]
    assert changed == []
    assert (out / "timings.json").read_text() == timings

    # a lost stage file is recomputed alone; a different configuration is refused
    (out / "modulation.json").unlink()
    reproduce("tiny", data_root=data, out_dir=out, seeds=(0,), pair_dir=pair, config=MICRO, progress=False)
    assert (out / "modulation.json").exists()
    assert (out / "masking.json").stat().st_mtime_ns == mtimes[out / "masking.json"]
    with pytest.raises(InvalidInputError, match="different configuration"):
        reproduce("tiny", data_root=data, out_dir=out, seeds=(0, 1), pair_dir=pair, config=MICRO, progress=False)


def _numbers_that_must_hold(out):
    """Relations the micro run's numbers obey whatever the tiny sizes: by construction, or by a margin
    of orders of magnitude on this pair (FAIG's own 1% set vs 1% random filters)."""
    masking = json.loads((out / "masking.json").read_text())
    table, curves = masking["table"], masking["curves"]
    i1 = table["fractions"].index(0.01)
    for d in ("blur", "noise"):
        own = table["mean"][d][d]
        assert own["faig"][i1] > 3 * own["random"][i1], (d, own)
        for mask in ("blur", "noise"):
            faig, rnd = curves["faig"][mask][d], curves["random"][mask][d]
            assert faig[0] == rnd[0] == 0.0  # nothing masked: the target itself
            assert faig[-1] == rnd[-1] > 0  # everything masked: the baseline, whichever ranking
    retrain = json.loads((out / "retrain.json").read_text())
    modulation = json.loads((out / "modulation.json").read_text())
    assert modulation["lams"][-1] == 1.0
    for fset in ("blur", "noise"):
        for inp in ("blur", "noise"):
            # λ = 1 moves the filters all the way to θ: the target model, evaluated on the same inputs
            assert modulation["psnr"][fset][inp][-1] == retrain["reference"]["target"][inp]
    report = (out / "report.md").read_text()
    assert "Masking 1% FAIG filters hurts far more than masking 1% random filters" in report


def test_unknown_preset_and_config_key(tmp_path):
    with pytest.raises(InvalidInputError, match="unknown preset"):
        reproduce("huge", data_root=tmp_path, out_dir=tmp_path / "o")
    with pytest.raises(InvalidInputError, match="unknown config key"):
        reproduce("tiny", data_root=tmp_path, out_dir=tmp_path / "o", config={"nope": 1})
    assert set(PRESET_CONFIGS) == {"tiny", "small", "paper"}


def test_micro_reproduce_srcnn_style_pair_via_cli(tmp_path, monkeypatch):
    """`faig reproduce --arch srcnn_style --pair-dir ...` runs every stage on the other architecture."""
    from faig_fast.apps import cli, reproduce as R

    data, pair, out = _micro_files(tmp_path, "srcnn_style")
    monkeypatch.setitem(R.PRESET_CONFIGS, "tiny", {**PRESET_CONFIGS["tiny"], **MICRO})
    assert cli.main(["reproduce", "--preset", "tiny", "--arch", "srcnn_style", "--data-root", str(data),
                     "--pair-dir", str(pair), "--out", str(out), "--seeds", "0"]) == 0
    text = (out / "report.md").read_text()
    assert "`srcnn_style`" in text and "_Not run._" not in text
    assert json.loads((out / "config.json").read_text())["analysis"]["arch"] == "srcnn_style"
