"""`faig study precision`: speed and top-1% agreement of each precision × rule against a converged fp32
integral, as JSON the README can quote; no study touches the caller's global RNG."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_loader, make_pair
from faig_fast.core.api import attribute
from faig_fast.core.attribution import jaccard
from faig_fast.errors import InvalidInputError
from faig_fast.apps.studies import precision_markdown, precision_study, quadrature_study
from faig_fast.utils.paths import data_root


def test_precision_study_rows():
    a, b = make_pair(feat=6)
    items = make_loader(labels=("blur", "noise", "blur", "noise"), size=8)  # 2 images × {blur, noise}
    state = torch.get_rng_state()
    doc = precision_study(a, b, items, rules=(("riemann_left", 6), ("gausslegendre", 3)),
                          precisions=("fp32", "bf16"), reference_nodes=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert [(r["rule"], r["precision"]) for r in doc["rows"]] == [
        ("riemann_left/6", "fp32"), ("riemann_left/6", "bf16"), ("gausslegendre/3", "fp32"), ("gausslegendre/3", "bf16")]
    assert doc["reference"] == "gausslegendre/8 fp32" and doc["images"] == 2 and doc["entries"] == 4
    for r in doc["rows"]:  # per image = all degradations of one image, not per (image, degradation) item
        assert r["seconds"] > 0 and r["seconds_per_image"] == pytest.approx(r["seconds"] / 2)
        assert 0 <= r["min_jaccard_vs_converged"] <= 1 and set(r["jaccard_vs_converged"]) == {"blur", "noise"}
        if r["precision"] == "fp32":
            assert r["speedup_vs_fp32"] == 1.0 and r["min_jaccard_vs_fp32_same_rule"] == 1.0
    # the agreement is that of the top sets of two independent runs (recomputed here)
    ref = attribute(a, b, items, steps=8, method="gausslegendre")
    gl3 = attribute(a, b, items, steps=3, method="gausslegendre")
    for label in ("blur", "noise"):
        assert doc["rows"][2]["jaccard_vs_converged"][label] == jaccard(gl3.top(label, 0.01), ref.top(label, 0.01))
    table = precision_markdown(doc)
    assert table.count("\n") == 1 + len(doc["rows"]) and "| gausslegendre/3 | bf16 |" in table


@pytest.mark.parametrize("images", [0, 5, 2.0, True])
def test_precision_study_refuses_a_bad_image_count(images):
    a, b = make_pair(feat=4)
    with pytest.raises(InvalidInputError, match="images must be an integer from 1 to the 4 items"):
        precision_study(a, b, make_loader(labels=("blur", "noise") * 2, size=6), images=images)


def test_precision_study_takes_an_explicit_image_count():
    a, b = make_pair(feat=4)
    doc = precision_study(a, b, make_loader(labels=("blur", "noise") * 2, size=6), images=4,
                          rules=(("gausslegendre", 2),), precisions=("fp32",), reference_nodes=2)
    assert doc["images"] == 4 and doc["rows"][0]["seconds_per_image"] == pytest.approx(doc["rows"][0]["seconds"] / 4)


def test_precision_table_divides_by_source_images():
    """The table recomputes s / image from the raw seconds: files whose ``seconds_per_image`` was per
    (image, degradation) item render right."""
    row = {"rule": "gausslegendre/8", "precision": "bf16", "seconds": 12.0, "seconds_per_image": 1.5,
           "speedup_vs_fp32": 0.5, "min_jaccard_vs_converged": 0.9, "min_jaccard_vs_fp32_same_rule": 1.0}
    table = precision_markdown({"images": 4, "rows": [row]})
    assert "| gausslegendre/8 | bf16 | 3.000 | 0.50x | 0.900 | 1.000 |" in table


def test_quadrature_study_leaves_rng_alone():
    a, b = make_pair(feat=4)
    state = torch.get_rng_state()
    doc = quadrature_study(a, b, make_loader(size=6), reference_nodes=8, rules=(("riemann_left", 8),),
                           gl_nodes=(2, 4))
    assert torch.equal(torch.get_rng_state(), state)
    assert [(r["method"], r["steps"]) for r in doc["rows"]] == [  # the paper's rule is always the yardstick
        ("riemann_left", 8), ("riemann_left", 100), ("gausslegendre", 2), ("gausslegendre", 4)]


@pytest.mark.skipif(not (data_root() / "Set14").is_dir(), reason="Set14 not found under the data root")
def test_study_precision_command_writes_json(tmp_path, capsys):
    from faig_fast.apps.cli import main

    out = tmp_path / "p.json"
    assert main(["study", "precision", "--pair", "msrresnet_tiny", "--images", "1", "--crop", "16",
                 "--reference-nodes", "4", "--rules", "gausslegendre/2", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert [r["precision"] for r in doc["rows"]] == ["fp32", "bf16"]
    assert doc["options"]["rules"] == [["gausslegendre", 2]] and doc["images"] == 1 and doc["device"]
    assert "| gausslegendre/2 | bf16 |" in capsys.readouterr().out
