"""The faig command line and the bench/study harnesses, on tiny models."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from conftest import make_loader, make_pair, registry_pair
from faig_fast.core.attribution import Attribution, read_index_file
from faig_fast.apps.bench import run_benchmarks
from faig_fast.apps.cli import main
from faig_fast.models import save_model
from faig_fast.apps.studies import precision_study, quadrature_markdown, quadrature_study


@pytest.fixture
def files(tmp_path):
    a, b = registry_pair("srcnn_style")
    save_model(a, tmp_path / "a.safetensors")
    save_model(b, tmp_path / "b.safetensors")
    (tmp_path / "imgs").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    return tmp_path


def test_attribute_command(files, capsys):
    rc = main(["attribute", "--baseline", str(files / "a.safetensors"), "--target", str(files / "b.safetensors"),
               "--data", str(files / "imgs"), "--steps", "3", "--out", str(files / "r.safetensors"),
               "--index-dir", str(files / "top"), "--top", "0.05"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    result = Attribution.load(files / "r.safetensors")
    assert result.counts == {"blur": 2, "noise": 2}
    assert summary["images"] == 4
    assert read_index_file(files / "top" / "blur_top0.05.txt").tolist() == result.top("blur", 0.05).tolist()


def test_attribute_command_reports_bad_input(files, capsys):
    rc = main(["attribute", "--baseline", str(files / "missing.safetensors"), "--target", str(files / "b.safetensors"),
               "--data", str(files / "imgs")])
    assert rc == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_info_command(capsys):
    assert main(["info"]) == 0
    assert "torch" in json.loads(capsys.readouterr().out)["reduction_backends"]


def test_bench_writes_json(tmp_path):
    path = run_benchmarks(arch="msrresnet", preset="tiny", size=8, images=2, steps=3,
                          cases=["naive", "loop", "loop-gl", "reduce-torch"], gl_nodes=2, out=str(tmp_path / "b.json"))
    doc = json.loads(path.read_text())
    cases = {r["case"]: r for r in doc["results"]}
    assert set(cases) == {"naive", "loop", "loop-gl", "reduce-torch"}
    assert all("error" not in r for r in doc["results"])
    assert cases["loop"]["jaccard_top1_vs_naive"] == {"blur": 1.0, "noise": 1.0}
    assert cases["loop"]["achieved_tflop_s"] > 0 and cases["loop"]["peak_memory_mb"] > 0
    assert doc["device"] and doc["torch"]


def test_quadrature_and_precision_studies():
    a, b = make_pair()
    data = make_loader(("blur", "noise"))
    doc = quadrature_study(a, b, data, reference_nodes=16, rules=(("riemann_left", 100),), gl_nodes=(2, 8))
    assert doc["rows"][0]["jaccard"] == {"blur": 1.0, "noise": 1.0}
    assert doc["fewest_gl_nodes"] in (2, 8)
    assert "gausslegendre | 8" in quadrature_markdown(doc)
    p = precision_study(a.float(), b.float(), [(x.float(), y.float(), l) for x, y, l in data], steps=4)
    assert [r["precision"] for r in p["rows"]] == ["fp32", "bf16"]
    assert 0.5 <= p["rows"][1]["min_jaccard"] <= 1
