"""FilterIndex: numbering, true channel labels for every weight layout, granularities, which weights are filters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

from conftest import TinySR, registry_pair
from faig_fast.core.filters import ChannelInfo, FilterIndex, FilterInfo, LayerInfo, conv_weight_names
from faig_fast.errors import InvalidInputError


def old_rule_names(model: nn.Module) -> list[str]:
    """The numbering before filters= existed: conv weights in state_dict order."""
    conv = {f"{p}.weight" for p, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))}
    return [k for k in model.state_dict() if k in conv]


@pytest.mark.parametrize("arch", ["msrresnet", "srcnn_style"])
def test_conv_numbering_unchanged_on_registry_models(arch):
    _, b = registry_pair(arch)
    index = FilterIndex.from_model(b)
    sd = b.state_dict()
    assert [l.name for l in index.layers] == old_rule_names(b) == conv_weight_names(b)
    starts = [0]
    for n in old_rule_names(b)[:-1]:
        starts.append(starts[-1] + sd[n].shape[0] * sd[n].shape[1])
    assert [l.start for l in index.layers] == starts
    assert all(l.kind == "conv" and l.groups == 1 for l in index.layers)
    assert FilterIndex.from_model(b, filters="conv+linear") == index  # no Linear layers: same index


def test_unknown_filters_value_and_no_layers():
    with pytest.raises(InvalidInputError, match="filters must be one of"):
        FilterIndex.from_model(TinySR(), filters="linear")
    with pytest.raises(InvalidInputError, match="no convolution layers"):
        FilterIndex.from_model(nn.Sequential(nn.Linear(3, 3)))
    assert len(FilterIndex.from_model(nn.Sequential(nn.Linear(3, 2)), filters="conv+linear")) == 6


def _response_channels(module: nn.Module, info: FilterInfo, in_channels: int) -> tuple[set[int], bool]:
    """Output channels that respond when only filter ``info`` is non-zero and every input is 1, and
    whether zeroing input channel ``info.in_channel`` silences them: the weight's true semantics."""
    index = FilterIndex.from_model(module)
    rows = index.split([info.index])[index.layers[0].name]
    with torch.no_grad():
        w = torch.zeros_like(module.weight).reshape(len(index), -1)
        w[rows] = 1.0
        module.weight.copy_(w.reshape(module.weight.shape))
        module.bias.zero_()
        x = torch.ones(1, in_channels, 5, 5, dtype=torch.float64)
        out = module(x).abs().sum((0, 2, 3))
        x[:, info.in_channel] = 0
        silenced = bool(module(x).abs().sum() == 0)
    return {int(c) for c in torch.nonzero(out).reshape(-1)}, silenced


@pytest.mark.parametrize("make", [
    lambda: nn.Conv2d(4, 6, 3, groups=2),
    lambda: nn.Conv2d(4, 4, 3, groups=4),  # depthwise
    lambda: nn.ConvTranspose2d(4, 6, 3, groups=2),
    lambda: nn.ConvTranspose2d(2, 3, 3),
])
def test_filter_labels_are_the_true_channels(make):
    """FilterInfo(out, in) must name the channels the filter really connects, whatever the layout."""
    module = make().double()
    index = FilterIndex.from_model(module)
    layer = index.layers[0]
    assert layer.kind == ("conv_transpose" if isinstance(module, nn.ConvTranspose2d) else "conv")
    assert layer.groups == module.groups and layer.out_channels == module.out_channels
    assert len(index) == module.weight.shape[0] * module.weight.shape[1]
    seen = set()
    for info in index:
        outs, silenced = _response_channels(module, info, module.in_channels)
        assert outs == {info.out_channel} and silenced, info
        seen.add((info.out_channel, info.in_channel))
    assert len(seen) == len(index)


def test_grouped_labels_by_hand():
    index = FilterIndex([("c", (6, 2, 3, 3), "conv", 2), ("t", (4, 3, 3, 3), "conv_transpose", 2)])
    # grouped conv (out 6, in 4, groups 2): weight[4, 1] connects input 2 + 1 = 3 to output 4
    assert index.lookup(4 * 2 + 1) == FilterInfo("c", 4, 3, 9)
    # grouped transpose (in 4, out 6, groups 2): weight[3, 2] connects input 3 to output 3 + 2 = 5
    assert index.lookup(12 + 3 * 3 + 2) == FilterInfo("t", 5, 3, 23)
    assert index.lookup(12 + 1 * 3 + 0) == FilterInfo("t", 0, 1, 15)


def test_lookup_iter_and_split_agree():
    index = FilterIndex([("a", (3, 2, 3, 3)), ("b", (2, 4, 1, 1), "conv_transpose", 2), ("c", (5, 2), "linear")])
    infos = list(index)
    assert len(infos) == len(index) == 6 + 8 + 10
    assert [f.index for f in infos] == list(range(len(index)))
    assert all(index.lookup(i) == f for i, f in enumerate(infos))
    for bad in (-1, len(index)):
        with pytest.raises(InvalidInputError, match="out of range"):
            index.lookup(bad)
    rows = index.split([23, 0, 7, 5, 14])
    assert list(rows) == ["a", "b", "c"]
    assert rows["a"].tolist() == [0, 5] and rows["b"].tolist() == [1] and rows["c"].tolist() == [9, 0]
    with pytest.raises(InvalidInputError, match="must lie in"):
        index.split([len(index)])


def test_channel_and_layer_aggregation_by_hand():
    index = FilterIndex([("a", (3, 2, 3, 3)), ("b", (2, 4, 1, 1), "conv_transpose", 2), ("c", (5, 2), "linear")])
    v = torch.arange(len(index), dtype=torch.float64) ** 1.5
    by_layer = index.aggregate(v, "layer")
    torch.testing.assert_close(by_layer, torch.stack([v[:6].sum(), v[6:14].sum(), v[14:].sum()]))
    # transpose (in 2, out/groups 4, groups 2): out channels 0-3 from input 0, 4-7 from input 1
    ch = index.aggregate(v, "channel")
    expect = [v[0:2].sum(), v[2:4].sum(), v[4:6].sum()] + [v[6 + j] for j in range(8)] + \
             [v[14 + 2 * o: 16 + 2 * o].sum() for o in range(5)]
    torch.testing.assert_close(ch, torch.stack(expect))
    units = index.units("channel")
    assert len(units) == index.num_units("channel") == 3 + 8 + 5
    assert units[3] == ChannelInfo("b", 0, 3) and units[10] == ChannelInfo("b", 7, 10) and units[-1] == ChannelInfo("c", 4, 15)
    assert index.units("layer") == [LayerInfo("a", "conv", 0), LayerInfo("b", "conv_transpose", 1),
                                    LayerInfo("c", "linear", 2)]
    # the channel of each unit is the out_channel of its filters
    by_unit = {}
    for f in index:
        by_unit.setdefault((f.layer, f.out_channel), 0.0)
        by_unit[(f.layer, f.out_channel)] += float(v[f.index])
    torch.testing.assert_close(ch, torch.tensor([by_unit[(u.layer, u.channel)] for u in units], dtype=torch.float64))
    batch = torch.stack([v, 2 * v])
    torch.testing.assert_close(index.aggregate(batch, "channel"), torch.stack([ch, 2 * ch]))
    with pytest.raises(InvalidInputError, match="by must be one of"):
        index.aggregate(v, "neuron")


class LinearNet(nn.Module):
    """Conv + Linear layers, a Linear weight tied across two modules and a conv tied to another conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc2.weight = self.fc1.weight  # tied: one tensor, two names
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 3, padding=1)
        self.conv3.weight = self.conv2.weight
        self.out = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        h = self.conv(x)
        t = h.flatten(2).transpose(1, 2)
        t = self.fc2(F.gelu(self.fc1(t)))
        t = t + self.attn(t, t, t, need_weights=False)[0]
        h = t.transpose(1, 2).reshape(h.shape)
        return self.out(self.conv3(self.conv2(h))) + x


def test_conv_linear_index_with_tied_weights():
    model = LinearNet().double()
    canon = [n for n, _ in model.named_parameters()]
    conv = FilterIndex.from_model(model)
    assert [l.name for l in conv.layers] == ["conv.weight", "conv2.weight", "out.weight"]
    both = FilterIndex.from_model(model, filters="conv+linear")
    names = [l.name for l in both.layers]
    assert names == ["conv.weight", "fc1.weight", "attn.in_proj_weight", "attn.out_proj.weight",
                     "conv2.weight", "out.weight"]
    assert all(n in canon for n in names) and "fc2.weight" not in names and "conv3.weight" not in names
    assert [l.kind for l in both.layers] == ["conv", "linear", "linear", "linear", "conv", "conv"]
    assert len(both) == 12 + 16 + 48 + 16 + 16 + 12
    # every layer's rows are the filters of the named parameter; a Linear element is a 1x1 filter
    params = dict(model.named_parameters())
    x = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    model(x).square().sum().backward()
    for l in both.layers:
        g = params[l.name].grad
        assert g.reshape(l.num_filters, -1).shape == (l.num_filters, l.kk)
        assert tuple(g.shape) == l.shape
    fc = both.layers[1]
    assert fc.kk == 1 and both.lookup(fc.start + 2 * 4 + 3) == FilterInfo("fc1.weight", 2, 3, fc.start + 11)
    assert both.num_units("channel") == 4 + 4 + 12 + 4 + 4 + 3


def test_weight_norm_conv_index_names_the_original():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), parametrizations.weight_norm(nn.Conv2d(4, 5, 3)),
                          parametrizations.spectral_norm(nn.ConvTranspose2d(5, 2, 3))).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    index = FilterIndex.from_model(model)
    params = dict(model.named_parameters())
    assert [l.name for l in index.layers] == ["0.weight", "1.parametrizations.weight.original1",
                                              "2.parametrizations.weight.original"]
    assert [l.shape for l in index.layers] == [(4, 3, 3, 3), (5, 4, 3, 3), (5, 2, 3, 3)]
    assert all(tuple(params[l.name].shape) == l.shape for l in index.layers)
    assert index.layers[2].kind == "conv_transpose"
    # building the index evaluates no parametrization (spectral norm would update its vectors)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_deprecated_weight_norm_hook():
    with pytest.warns(FutureWarning):
        conv = nn.utils.weight_norm(nn.Conv2d(2, 3, 3))
    index = FilterIndex.from_model(nn.Sequential(conv))
    assert [l.name for l in index.layers] == ["0.weight_v"] and index.layers[0].shape == (3, 2, 3, 3)


def test_weight_norm_with_ambiguous_shapes_takes_v():
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv2d(1, 1, 1)))
    assert [l.name for l in FilterIndex.from_model(model).layers] == ["0.parametrizations.weight.original1"]


def test_lazy_module_is_refused():
    with pytest.raises(InvalidInputError, match="lazy module"):
        FilterIndex.from_model(nn.Sequential(nn.LazyConv2d(4, 3)))


def test_json_round_trip_and_legacy_pairs():
    index = FilterIndex([("a", (3, 2, 3, 3)), ("b", (2, 4, 1, 1), "conv_transpose", 2), ("c", (5, 2), "linear")])
    again = FilterIndex.from_json(index.to_json())
    assert again == index and list(again) == list(index)
    legacy = FilterIndex.from_json([["a", [3, 2, 3, 3]], ["b", [2, 4, 1, 1]]])
    assert [l.kind for l in legacy.layers] == [None, None] and legacy != FilterIndex([("a", (3, 2, 3, 3)),
                                                                                    ("b", (2, 4, 1, 1))])
    assert legacy.lookup(7) == FilterInfo("b", 0, 1, 7)  # labelled as stored: (dim 0, dim 1)
    torch.testing.assert_close(legacy.aggregate(torch.ones(14), "layer"), torch.tensor([6.0, 8.0]))
    with pytest.raises(InvalidInputError, match="not recorded"):
        legacy.aggregate(torch.ones(14), "channel")
    for bad in ([{"name": "a", "shape": [3, 2], "kind": "dense", "groups": 1}],
                [{"name": "a", "shape": [3, 2, 1], "kind": "linear", "groups": 1}],
                [{"name": "a", "shape": [3, 2, 1, 1], "kind": "conv", "groups": 2}],
                [{"name": "a"}], [["a"]]):
        with pytest.raises(InvalidInputError):
            FilterIndex.from_json(bad)
