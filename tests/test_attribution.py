"""Attribution: Eq. 7 at filter, channel and layer granularity, merge, and save/load."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from faig_fast.core.attribution import FORMAT, Attribution, top_count
from faig_fast.core.filters import ChannelInfo, FilterIndex, LayerInfo
from faig_fast.errors import FAIGError, InvalidInputError

LABELS = ("blur", "noise", "blur", "clean", "noise", "blur")


def small_index() -> FilterIndex:
    """A conv, a grouped transpose conv and a linear layer: 6 + 8 + 10 filters, 3 + 8 + 5 channels."""
    return FilterIndex([("a.weight", (3, 2, 3, 3)), ("b.weight", (2, 4, 1, 1), "conv_transpose", 2),
                        ("c.weight", (5, 2), "linear")])


def per_image(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(24, generator=g, dtype=torch.float64) for _ in LABELS]


def build(scores: list[torch.Tensor], labels=LABELS, names=None, keep=True, index=None) -> Attribution:
    result = Attribution(index or small_index(), {"steps": 4}, keep_per_image=keep)
    for i, (label, s) in enumerate(zip(labels, scores)):
        result.add(label, s, (names or [f"img{j}" for j in range(len(labels))])[i], delta=0.01 * i)
    return result


def hand_eq7(scores, labels, label):
    own = [s for s, l in zip(scores, labels) if l == label]
    rest = [s for s, l in zip(scores, labels) if l != label]
    return sum(own) / len(own) - sum(rest) / len(rest)


def hand_by_channel(v: torch.Tensor, index: FilterIndex) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], float] = {}
    for f in index:
        out[(f.layer, f.out_channel)] = out.get((f.layer, f.out_channel), 0.0) + float(v[f.index])
    return out


@pytest.mark.parametrize("label", ["blur", "noise", "clean"])
def test_scores_by_channel_and_layer_against_hand_computation(label):
    scores = per_image()
    result = build(scores)
    eq7 = hand_eq7(scores, LABELS, label)
    torch.testing.assert_close(result.scores(label), eq7, rtol=1e-12, atol=1e-12)
    units = result.units("channel")
    hand = hand_by_channel(eq7, result.index)
    torch.testing.assert_close(result.scores(label, by="channel"),
                               torch.tensor([hand[(u.layer, u.channel)] for u in units], dtype=torch.float64))
    torch.testing.assert_close(result.scores(label, by="layer"), torch.stack([eq7[:6].sum(), eq7[6:14].sum(),
                                                                              eq7[14:].sum()]))
    # Eq. 7 is linear: Eq. 7 of the channel sums equals the channel sums of Eq. 7
    per_channel_images = [result.index.aggregate(s, "channel") for s in scores]
    torch.testing.assert_close(result.scores(label, by="channel"), hand_eq7(per_channel_images, LABELS, label),
                               rtol=1e-12, atol=1e-12)
    own = [s for s, l in zip(scores, LABELS) if l == label]
    torch.testing.assert_close(result.mean(label, by="layer"), result.index.aggregate(sum(own) / len(own), "layer"))
    torch.testing.assert_close(result.scores(label, subtract_others=False, by="channel"),
                               result.mean(label, by="channel"))


def test_ranking_top_and_units_by_granularity():
    result = build(per_image(1))
    for by, n in (("filter", 24), ("channel", 16), ("layer", 3)):
        s = result.scores("blur", by=by)
        r = result.ranking("blur", by=by)
        assert s.shape == (n,) and len(result.units(by)) == n == result.index.num_units(by)
        assert sorted(r.tolist()) == list(range(n)) and bool((s[r][:-1] >= s[r][1:]).all())
        top = result.top("blur", 0.25, by=by)
        assert top.tolist() == r[: top_count(n, 0.25)].tolist() and len(top) == max(1, n // 4)
    assert result.units("layer")[1] == LayerInfo("b.weight", "conv_transpose", 1)
    assert result.units("channel")[5] == ChannelInfo("b.weight", 2, 5)
    assert result.units() == result.filters
    assert result.image_ranking(2, by="layer").tolist() == torch.sort(
        result.index.aggregate(result.image_scores[2], "layer"), descending=True, stable=True).indices.tolist()
    for call in (lambda: result.scores("blur", by="neuron"), lambda: result.top("blur", by="pixel"),
                 lambda: result.units("neurons")):
        with pytest.raises(InvalidInputError, match="by must be one of"):
            call()


def test_merge_of_two_halves_equals_the_whole():
    scores = per_image(2)
    names = [f"img{j}" for j in range(len(LABELS))]
    whole = build(scores)
    first = build(scores[:3], LABELS[:3], names[:3])
    second = build(scores[3:], LABELS[3:], names[3:])
    second.convergence_delta = [0.03, 0.04, 0.05]
    merged = first.merge(second)
    assert merged is first and merged.counts == whole.counts
    for label in whole.labels:
        torch.testing.assert_close(merged.sums[label], whole.sums[label], rtol=1e-15, atol=0)
        torch.testing.assert_close(merged.scores(label, by="channel"), whole.scores(label, by="channel"))
    assert merged.image_names == names and merged.image_labels == list(LABELS)
    assert merged.convergence_delta == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
    assert all(torch.equal(x, y) for x, y in zip(merged.image_scores, scores)) and len(merged.image_scores) == 6
    # a label only the second half has is taken over, not aliased
    other = build(scores[:1], ("jpeg",), ["x"])
    merged.merge(other)
    assert merged.counts["jpeg"] == 1
    merged.sums["jpeg"] += 1
    assert not torch.equal(merged.sums["jpeg"], other.sums["jpeg"])


def test_merge_refuses_different_index_or_mixed_per_image():
    a = build(per_image()[:2], LABELS[:2])
    b = build([torch.rand(6, dtype=torch.float64)], ("blur",), index=FilterIndex([("a.weight", (3, 2, 3, 3))]))
    with pytest.raises(FAIGError, match="different models"):
        a.merge(b)
    with pytest.raises(FAIGError, match="per-image"):
        a.merge(build(per_image()[:2], LABELS[:2], keep=False))
    empty = Attribution(small_index())
    empty.merge(a)
    assert empty.keep_per_image and len(empty.image_scores) == 2


def test_merge_refuses_results_of_different_runs():
    """Shards of one run (or runs over other images) merge; another rule, precision, mode, model or
    scale does not, nor the same dataset's images twice."""
    from conftest import make_loader, make_pair
    from faig_fast import attribute
    from faig_fast.data import DegradedImageDataset

    a, b = make_pair()
    data = make_loader(("blur", "noise", "blur", "noise"))
    kw = dict(steps=4, precision="fp64", check_completeness=False)
    whole = attribute(a, b, data, **kw)
    merged = attribute(a, b, data[:2], **kw).merge(attribute(a, b, data[2:], **kw))
    for label in whole.labels:
        torch.testing.assert_close(merged.sums[label], whole.sums[label], rtol=1e-12, atol=0)
    _, other_b = make_pair(seed=1)
    for change, field in ((dict(steps=5), "rule"), (dict(precision="fp32"), "precision"),
                          (dict(mode="train"), "mode"), (dict(model_b=other_b), "model_b_sha256")):
        run = {**kw, **change}
        other = attribute(a, run.pop("model_b", b), data[2:], **run)
        with pytest.raises(FAIGError, match=f"different runs \\({field}: "):
            attribute(a, b, data[:2], **kw).merge(other)
    g = torch.Generator().manual_seed(0)
    ds = DegradedImageDataset([("x", torch.rand(3, 12, 12, generator=g, dtype=torch.float64))], ("blur",))
    once = attribute(a, b, ds, **kw)
    with pytest.raises(FAIGError, match="share images \\(e.g. 'x/blur'\\)"):
        once.merge(attribute(a, b, ds, **kw))


def test_save_load_round_trip_keeps_granularities(tmp_path):
    result = build(per_image(3))
    path = result.save(tmp_path / "r.safetensors")
    back = Attribution.load(path)
    assert back.index == result.index and [l.kind for l in back.index.layers] == ["conv", "conv_transpose", "linear"]
    assert back.index.layers[1].groups == 2 and back.counts == result.counts and back.meta == result.meta
    assert back.image_names == result.image_names and back.convergence_delta == result.convergence_delta
    for by in ("filter", "channel", "layer"):
        for label in result.labels:
            assert torch.equal(back.scores(label, by=by), result.scores(label, by=by))
            assert torch.equal(back.top(label, 0.3, by=by), result.top(label, 0.3, by=by))
        assert torch.equal(back.image_ranking(4, by=by), result.image_ranking(4, by=by))
        assert back.units(by) == result.units(by)


def _write_header(path, header: dict, tensors: dict) -> None:
    save_file(tensors, str(path), metadata={"faig_fast": json.dumps(header)})


def test_format_1_files_load_and_unknown_formats_are_refused(tmp_path):
    s = torch.arange(14, dtype=torch.float64)
    header = {"format": "faig_fast.core.attribution/1", "filters": [["a.weight", [3, 2, 3, 3]], ["b.weight", [2, 4, 1, 1]]],
              "counts": {"blur": 2}, "image_names": ["x", "y"], "image_labels": ["blur", "blur"],
              "convergence_delta": [], "keep_per_image": False, "meta": {"steps": 8}}
    _write_header(tmp_path / "v1.safetensors", header, {"sum/blur": s})
    old = Attribution.load(tmp_path / "v1.safetensors")
    torch.testing.assert_close(old.scores("blur"), s / 2)
    torch.testing.assert_close(old.scores("blur", by="layer"), torch.tensor([15.0, 76.0], dtype=torch.float64) / 2)
    with pytest.raises(InvalidInputError, match="not recorded"):
        old.scores("blur", by="channel")
    old.index = FilterIndex([("a.weight", (3, 2, 3, 3)), ("b.weight", (2, 4, 1, 1))])  # the documented fix
    assert old.scores("blur", by="channel").shape == (5,)
    assert FORMAT.endswith("/2")
    _write_header(tmp_path / "v9.safetensors", {**header, "format": "faig_fast.core.attribution/9"}, {"sum/blur": s})
    with pytest.raises(InvalidInputError, match="unknown attribution format"):
        Attribution.load(tmp_path / "v9.safetensors")
    _write_header(tmp_path / "bad.safetensors", header, {"sum/blur": s[:5].clone()})
    with pytest.raises(InvalidInputError, match="do not match"):
        Attribution.load(tmp_path / "bad.safetensors")
