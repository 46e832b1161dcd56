"""The faig command line and the bench/study harnesses, on tiny models."""
from __future__ import annotations

import json

import pytest

from conftest import make_loader, make_pair, write_pair_and_images
from faig_fast.core.attribution import Attribution, read_index_file
from faig_fast.apps.bench import run_benchmarks
from faig_fast.apps.cli import main
from faig_fast.apps.studies import precision_study, quadrature_markdown, quadrature_study


@pytest.fixture
def files(tmp_path):
    return write_pair_and_images(tmp_path)


def _attribute_args(files, *extra: str) -> list[str]:
    return ["attribute", "--baseline", str(files / "a.safetensors"), "--target", str(files / "b.safetensors"),
            "--data", str(files / "imgs"), "--steps", "3", "--out", str(files / "r.safetensors"), *extra]


def test_attribute_command(files, capsys):
    """A readable table per degradation (rank, layer, out/in channel, score; 10 rows), not bare flat indices."""
    assert main(_attribute_args(files, "--index-dir", str(files / "top"), "--top", "0.05")) == 0
    out = capsys.readouterr().out
    result = Attribution.load(files / "r.safetensors")
    assert result.counts == {"blur": 2, "noise": 2}
    assert read_index_file(files / "top" / "blur_top0.05.txt").tolist() == result.top("blur", 0.05).tolist()
    assert out.startswith("FAIG: 4 images (blur 2, noise 2)")
    for label in ("blur", "noise"):
        lines = out.split(f"\n{label}: top 10 of {len(result.index)} filters by Eq. 7 score\n")[1].splitlines()
        assert lines[0].split() == ["rank", "layer", "out", "in", "score"]
        units, scores = result.units(), result.scores(label)
        for rank, (line, i) in enumerate(zip(lines[1:11], result.ranking(label)[:10].tolist()), 1):
            u = units[i]
            assert line.split() == [str(rank), u.layer, str(u.out_channel), str(u.in_channel), f"{scores[i]:.4g}"]
        assert not lines[11].strip()
    assert "[" not in out  # no lists of flat indices


def test_attribute_command_json(files, capsys):
    """--json: every unit of the top fraction with its fields and score (the machine-readable output)."""
    assert main(_attribute_args(files, "--json", "--top", "0.05", "--by", "channel")) == 0
    summary = json.loads(capsys.readouterr().out)
    result = Attribution.load(files / "r.safetensors")
    assert summary["images"] == 4 and summary["counts"] == {"blur": 2, "noise": 2} and summary["by"] == "channel"
    for label in ("blur", "noise"):
        top, scores, units = result.top(label, 0.05, by="channel"), result.scores(label, by="channel"), \
            result.units("channel")
        rows = summary["top"][label]
        assert [r["index"] for r in rows] == top.tolist() and [r["rank"] for r in rows] == list(range(1, len(top) + 1))
        assert [(r["layer"], r["channel"]) for r in rows] == [(units[i].layer, units[i].channel) for i in top.tolist()]
        assert [r["score"] for r in rows] == scores[top].tolist()


def test_attribute_command_passes_the_api_options(files, capsys, monkeypatch):
    """--check-completeness/--no-check-completeness, --internal-batch-size, --backend, --memory-budget reach
    faig_fast.attribute, with the dataset itself (one loop) and torchrun sharding on."""
    from faig_fast.core import api

    seen = []
    real = api.attribute
    monkeypatch.setattr(api, "attribute", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    assert main(_attribute_args(files, "--no-check-completeness", "--internal-batch-size", "2", "--backend",
                                "torch", "--memory-budget", "64M")) == 0
    assert "not checked (check_completeness=False)" in capsys.readouterr().out
    (_, _, data), kw = seen[0]
    assert kw["check_completeness"] is False and kw["internal_batch_size"] == 2 and kw["backend"] == "torch"
    assert kw["memory_budget"] == 64 << 20 and kw["distributed"] is True
    assert data.item_name(0) == "0/blur" and len(data) == 4
    assert Attribution.load(files / "r.safetensors").meta["completeness"]["checked"] == 0
    assert main(_attribute_args(files, "--steps", "8")) == 0  # 3 Riemann steps are too coarse to check
    assert seen[1][1]["check_completeness"] is True and seen[1][1]["backend"] == "auto"
    assert Attribution.load(files / "r.safetensors").meta["completeness"]["checked"] >= 1
    capsys.readouterr()
    for bad, message in ((["--internal-batch-size", "0"], "must be an integer >= 1, got '0'"),
                         (["--memory-budget", "lots"], "not a byte count: 'lots'"), (["--backend", "numpy"], "invalid")):
        with pytest.raises(SystemExit):
            main(_attribute_args(files, *bad))
        assert message in capsys.readouterr().err


def test_demo_help_names_the_pair_it_runs(capsys):
    from faig_fast.apps.demo import PAIR_DIR

    assert PAIR_DIR.name == "msrresnet_small"
    with pytest.raises(SystemExit):
        main(["--help"])
    line = next(l for l in capsys.readouterr().out.splitlines() if l.strip().startswith("demo"))
    assert "MSRResNet-small" in line and "tiny" not in line
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "shipped MSRResNet-small pair (faig_fast/assets/pairs/msrresnet_small)" in text and "tiny" not in text


def test_attribute_command_reports_bad_input(files, capsys):
    rc = main(["attribute", "--baseline", str(files / "missing.safetensors"), "--target", str(files / "b.safetensors"),
               "--data", str(files / "imgs")])
    assert rc == 2
    assert "missing.safetensors" in capsys.readouterr().err


def test_info_command(capsys):
    import torch

    import faig_fast
    from faig_fast.ops.reduction import available_backends

    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["faig_fast"] == faig_fast.__version__ and info["torch"] == torch.__version__
    assert info["cuda"] is torch.cuda.is_available()
    assert info["reduction_backends"] == available_backends() and "torch" in info["reduction_backends"]


_OWN_MODEL = """
import torch.nn.functional as F
from torch import nn


class PlainX2(nn.Module):
    \"\"\"A x2 net that declares no scale: the CLI must measure it from one forward pass.\"\"\"

    def __init__(self, feat=4):
        super().__init__()
        self.head = nn.Conv2d(3, feat, 3, padding=1)
        self.tail = nn.Conv2d(feat, 12, 3, padding=1)

    def forward(self, x):
        return F.pixel_shuffle(self.tail(F.relu(self.head(x))), 2) + F.interpolate(x, scale_factor=2.0)
"""


def test_attribute_command_with_your_own_model_class(files, capsys, monkeypatch):
    """--model-class/--model-kwargs build any architecture from plain .pth state dicts; the scores
    are those of the Python API on the same images."""
    import torch

    from faig_fast import attribute
    from faig_fast.data import DegradedImageDataset

    (files / "own_cli_model.py").write_text(_OWN_MODEL)
    monkeypatch.syspath_prepend(str(files))
    from own_cli_model import PlainX2

    torch.manual_seed(0)
    a = PlainX2(feat=3)
    b = PlainX2(feat=3)
    b.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in a.state_dict().items()})  # a fine-tune
    torch.save({"params": a.state_dict()}, files / "a.pth")
    torch.save(b.state_dict(), files / "b.pth")
    rc = main(["attribute", "--baseline", str(files / "a.pth"), "--target", str(files / "b.pth"),
               "--model-class", "own_cli_model:PlainX2", "--model-kwargs", '{"feat": 3}',
               "--data", str(files / "imgs"), "--steps", "3", "--out", str(files / "own.safetensors"),
               "--by", "channel", "--index-dir", str(files / "top"), "--top", "0.2", "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    result = Attribution.load(files / "own.safetensors")
    ref = attribute(a.eval(), b.eval(), DegradedImageDataset(str(files / "imgs"), ("blur", "noise"), scale=2), steps=3)
    assert result.image_names == ref.image_names == [f"{i}/{d}" for i in range(2) for d in ("blur", "noise")]
    for label in ("blur", "noise"):
        torch.testing.assert_close(result.scores(label), ref.scores(label), rtol=1e-5, atol=0)
        top = ref.top(label, 0.2, by="channel")
        assert [r["index"] for r in summary["top"][label]] == top.tolist() and summary["by"] == "channel"
        assert read_index_file(files / "top" / f"{label}_channel_top0.2.txt").tolist() == top.tolist()


_GRAY_DENOISER = """
from torch import nn


class GrayDenoiser(nn.Module):
    def __init__(self, feat=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, feat, 3, padding=1), nn.ReLU(), nn.Conv2d(feat, 1, 3, padding=1))

    def forward(self, x):
        return x - self.body(x)
"""


def test_attribute_command_gray_scale1_denoiser(files, capsys, monkeypatch):
    """A 1-channel denoiser that declares no scale: --gray reads gray images, the scale (1) is measured."""
    import torch

    from faig_fast import attribute
    from faig_fast.data import DegradedImageDataset

    (files / "own_gray_model.py").write_text(_GRAY_DENOISER)
    monkeypatch.syspath_prepend(str(files))
    from own_gray_model import GrayDenoiser

    torch.manual_seed(1)
    a = GrayDenoiser()
    b = GrayDenoiser()
    b.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in a.state_dict().items()})
    safetensors_save = __import__("safetensors.torch", fromlist=["save_file"]).save_file
    safetensors_save(a.state_dict(), str(files / "ga.safetensors"))
    safetensors_save(b.state_dict(), str(files / "gb.safetensors"))
    assert main(["attribute", "--baseline", str(files / "ga.safetensors"), "--target", str(files / "gb.safetensors"),
                 "--model-class", "own_gray_model:GrayDenoiser", "--gray", "--data", str(files / "imgs"),
                 "--steps", "2", "--out", str(files / "gray.safetensors")]) == 0
    capsys.readouterr()
    result = Attribution.load(files / "gray.safetensors")
    ds = DegradedImageDataset(str(files / "imgs"), ("blur", "noise"), scale=1, channels=1)
    assert ds[0][0].shape == ds[0][1].shape == (1, 16, 18)
    ref = attribute(a.eval(), b.eval(), ds, steps=2)
    for label in ("blur", "noise"):
        torch.testing.assert_close(result.scores(label), ref.scores(label), rtol=1e-5, atol=0)


def test_attribute_command_rejects_bad_model_options(files, capsys):
    base = ["attribute", "--baseline", str(files / "a.safetensors"), "--target", str(files / "b.safetensors"),
            "--data", str(files / "imgs")]
    assert main(base + ["--model-class", "x:Y", "--model-kwargs", "{feat: 3}"]) == 2
    assert "--model-kwargs is not valid JSON" in capsys.readouterr().err
    assert main(base + ["--model-class", "no_such_module_q:Net"]) == 2
    assert "cannot import module 'no_such_module_q'" in capsys.readouterr().err
    import torch

    torch.save({"params": {"odd.weight": torch.zeros(2, 3, 3, 3)}}, files / "odd.pth")
    assert main(["attribute", "--baseline", str(files / "odd.pth"), "--target", str(files / "odd.pth"),
                 "--data", str(files / "imgs"), "--arch", "auto"]) == 2
    err = capsys.readouterr().err
    assert "odd.pth" in err and "spandrel" in err and "--model-class" in err
    with pytest.raises(SystemExit):  # --arch choices are the registry's names (+ auto)
        main(base + ["--arch", "not_a_model"])
    assert "invalid choice" in capsys.readouterr().err


def test_arch_choices_come_from_the_registry():
    from faig_fast.apps.cli import build_parser
    from faig_fast.models import list_models

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for command, extra in (("attribute", ["auto"]), ("train", []), ("reproduce", [])):
        arch = next(a for a in sub.choices[command]._actions if a.dest == "arch")
        assert list(arch.choices) == list_models() + extra, command


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
    doc = quadrature_study(a, b, data, reference_nodes=16, rules=(("riemann_left", 100),), gl_nodes=(1, 2, 3, 8))
    assert doc["rows"][0]["jaccard"] == {"blur": 1.0, "noise": 1.0}
    # recompute the study's answer from its own rows: the fewest nodes from which on every GL count agrees
    # with the converged integral at least as well as the paper's rule
    gl = sorted((r["steps"], r["min_jaccard"] >= doc["paper_rule_min_jaccard"]) for r in doc["rows"]
                if r["method"] == "gausslegendre")
    expected = next(n for i, (n, _) in enumerate(gl) if all(ok for _, ok in gl[i:]))
    assert doc["fewest_gl_nodes"] == expected
    assert [r["steps"] for r in doc["rows"] if r["method"] == "gausslegendre"] == [1, 2, 3, 8]
    assert "gausslegendre | 8" in quadrature_markdown(doc)
    p = precision_study(a.float(), b.float(), [(x.float(), y.float(), l) for x, y, l in data],
                        rules=(("gausslegendre", 4),), reference_nodes=8)
    assert [r["precision"] for r in p["rows"]] == ["fp32", "bf16"]
    assert p["rows"][0]["min_jaccard_vs_fp32_same_rule"] == 1.0
    assert 0.0 <= p["rows"][1]["min_jaccard_vs_converged"] <= 1
    assert p["rows"][1]["seconds"] > 0 and p["rows"][1]["speedup_vs_fp32"] > 0
