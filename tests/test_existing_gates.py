"""Blocks that already hold a channel gate are not gated twice, unless a rule allows it."""
from pathlib import Path

import pytest
import timm
import torch

import se_inject
from conftest import gates
from handwritten import ChannelsLastGatedNet, GatedBlocksNet, SEInceptionNet
from test_rules import GOOD

HOLDS = "the block already holds a channel gate (SE, ECA...)"


def _allowing(tmp_path):
    rule = tmp_path / "regate.yaml"
    rule.write_text(GOOD.replace("  min_branches_with_conv: 1\n",
                                 "  min_branches_with_conv: 1\n  existing_gate: allow\n"))
    return str(rule)


def test_inline_se_is_recognised_and_spatial_attention_is_not():
    p = se_inject.plan(GatedBlocksNet())
    assert [s.block for s in p] == ["spatial_block"]
    assert [(s.merge, s.reason) for s in p.skipped] == [("se_block.add", HOLDS)]


def test_an_inception_module_whose_output_is_gated_already_is_not_gated_twice(tmp_path):
    """SE-Inception (the paper's Fig. 2): the gate scales the module's output, after the
    concatenation, where the module's own gate would go; a rule that allows a second gate
    gates it anyway."""
    p = se_inject.plan(SEInceptionNet())
    assert [s.block for s in p] == ["mix2"]
    assert [(s.merge, s.reason) for s in p.skipped] == [("mix1.cat", HOLDS), ("mix3.cat", HOLDS)]
    rule = tmp_path / "inception.yaml"
    rule.write_text((Path(se_inject.__file__).parents[1] / "rules" / "inception.yaml").read_text()
                    .replace("existing_gate: skip", "existing_gate: allow"))
    assert [s.block for s in se_inject.plan(SEInceptionNet(), rules=[str(rule)])] == \
        ["mix1", "mix2", "mix3"]


def test_a_channel_gate_on_a_channels_last_map_is_recognised():
    """(N, H, W, C) * (N, 1, 1, C) computed from the map is a channel gate too."""
    p = se_inject.plan(ChannelsLastGatedNet())
    assert [s.block for s in p] == ["plain_block"]
    assert [(s.merge, s.reason) for s in p.skipped] == [("se_block.add", HOLDS)]


@pytest.mark.parametrize("conv_mlp", [True, False], ids=["channels_first", "channels_last"])
def test_global_response_norm_counts_as_a_channel_gate_in_either_layout(conv_mlp):
    """ConvNeXt V2's GRN scales each channel by a value computed from the map (x * x_n, with
    x_n of shape (N, C, 1, 1) or (N, 1, 1, C)): its blocks are left alone in both layouts (the
    channels-last one was gated on top of its GRN)."""
    model = timm.create_model("convnextv2_atto", pretrained=False, conv_mlp=conv_mlp)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "ConvNeXtBlock"]
    p = se_inject.plan(model)
    assert len(p) == 0 and len(blocks) == 12
    assert sorted(s.merge.rsplit(".", 1)[0] for s in p.skipped if s.reason == HOLDS) == \
        sorted(blocks)


@pytest.mark.parametrize("name,gated_class", [("seresnet50", "SEModule"),
                                              ("ecaresnet26t", "EcaModule")])
def test_timm_native_gates_are_not_doubled(name, gated_class):
    model = timm.create_model(name)
    blocks = {n.rsplit(".", 1)[0] for n, m in model.named_modules()
              if type(m).__name__ == gated_class}
    p = se_inject.plan(model)
    assert len(p) == 0
    assert len([s for s in p.skipped if s.reason == HOLDS]) == len(blocks)
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match="existing_gate: allow"):
        se_inject.apply(model)
    assert list(model.state_dict()) == keys


def test_a_rule_can_allow_a_second_gate(tmp_path):
    model = se_inject.apply(timm.create_model("seresnet50"), rules=[_allowing(tmp_path)])
    assert len(gates(model)) == 16


def test_tresnet_gates_only_its_blocks_without_se():
    model = timm.create_model("tresnet_m")
    without_se = sorted(n for n, m in model.named_modules()
                        if type(m).__name__ in ("BasicBlock", "Bottleneck") and m.se is None)
    se_inject.apply(model)
    assert sorted(n.rsplit(".", 1)[0] for n, _ in gates(model)) == without_se
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (1, 1000)


def test_cbam_is_a_gate_its_pooled_sum_is_no_block_and_allowing_gates_adds_none_there(tmp_path):
    """CBAM's channel attention adds an MLP of the mean to the MLP of the maximum: a sum of two
    (N, C, 1, 1) tensors, each through 1x1 convolutions, which the residual rule took for a
    block and gated inside the attention. It is a channel gate: its block holds one."""
    from se_inject.match import DESCRIPTORS
    model = timm.create_model("resnet18", block_args=dict(attn_layer="cbam"), pretrained=False)
    blocks = sorted(n for n, m in model.named_modules() if type(m).__name__ == "BasicBlock")
    p = se_inject.plan(model, input_size=(3, 64, 64))
    assert len(p) == 0 and len(blocks) == 8
    assert sorted(s.merge.rsplit(".", 1)[0] for s in p.skipped if s.reason == HOLDS) == blocks
    assert len([s for s in p.skipped if s.reason == DESCRIPTORS]) == 8
    # a second gate where allowed: on the blocks, not the MLPs
    p = se_inject.plan(model, rules=[_allowing(tmp_path)], input_size=(3, 64, 64))
    assert sorted(s.block for s in p) == blocks and {s.spatial for s in p} != {(1, 1)}


@pytest.mark.parametrize("name,radix", [("resnest14d", 2), ("resnest50d_1s4x24d", 1),
                                        ("skresnet18", 2)])
def test_split_attention_is_a_channel_gate_with_one_path_or_several(name, radix, tmp_path):
    """ResNeSt's split attention and SKNet's selective kernel weigh each channel of each path by
    a value computed from the map: with one path an SE gate on a 4-D map, with several one on
    the stacked paths, (N, P, C, H, W) * (N, P, C, 1, 1). Either way their blocks keep just it
    (with two paths they got a second gate, with one they did not); a rule with
    `existing_gate: allow` gates them."""
    model = timm.create_model(name, pretrained=False)
    units = {n: m for n, m in model.named_modules()
             if type(m).__name__ in ("SplitAttn", "SelectiveKernel")}
    assert {getattr(m, "radix", len(getattr(m, "paths", ()))) for m in units.values()} == {radix}
    blocks = sorted(n.rsplit(".", 1)[0] for n in units)
    p = se_inject.plan(model, input_size=(3, 64, 64))
    assert len(p) == 0 and len(blocks) > 0
    assert sorted(s.merge.rsplit(".", 1)[0] for s in p.skipped if s.reason == HOLDS) == blocks
    p = se_inject.plan(model, rules=[_allowing(tmp_path)], input_size=(3, 64, 64))
    assert sorted(s.block for s in p) == blocks


def test_a_per_channel_affine_cast_to_the_maps_dtype_is_no_gate():
    """EvoNorm-S0's affine, ``x * weight.view(1, -1, 1, 1).to(x.dtype)``, reads the map's
    dtype, not its values: resnetv2_50d_evos's blocks, each taken to hold a gate, are gated
    where resnetv2_50d's are."""
    evos = se_inject.plan(timm.create_model("resnetv2_50d_evos"), input_size=(3, 64, 64))
    plain = se_inject.plan(timm.create_model("resnetv2_50d"), input_size=(3, 64, 64))
    assert len(evos) == 16
    assert [(s.block, s.tensor) for s in evos] == [(s.block, s.tensor) for s in plain]


class _NormedBlock(torch.nn.Module):
    """conv-bn-relu-conv, then one value per channel computed from the map scales it."""

    def __init__(self, scale, c=8):
        super().__init__()
        self.conv1, self.conv2 = (torch.nn.Conv2d(c, c, 3, padding=1) for _ in range(2))
        self.fc = torch.nn.Conv2d(c, c, 1)
        self.scale = scale

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return x + y * self.scale(self, y)


def _ms(y):
    return y.pow(2).mean((2, 3), keepdim=True) + 1e-5


@pytest.mark.parametrize("scale,gate", [
    (lambda m, y: torch.rsqrt(_ms(y)), False),                    # Filter Response Norm
    (lambda m, y: _ms(y).rsqrt().to(y.dtype), False),
    (lambda m, y: _ms(y).reciprocal(), False),
    (lambda m, y: _ms(y) ** -0.5, False),
    (lambda m, y: torch.sigmoid(m.fc(y.mean((2, 3), keepdim=True))), True),  # SE
    (lambda m, y: _ms(y) ** 0.5, True),
], ids=["rsqrt", "rsqrt_cast", "reciprocal", "power", "sigmoid", "root"])
def test_a_map_divided_by_a_statistic_of_its_own_is_normalised_not_gated(scale, gate):
    """Filter Response Normalization scales each channel by rsqrt(mean(x**2) + eps): one value
    per channel computed from the map, as a gate's scale is, but the inverse of a statistic,
    a normalization. Its blocks get their gate (resnetv2_50d_frn's 16 blocks, each with three
    such norms, are gated where resnetv2_50d's are); an SE's sigmoid is a gate."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _NormedBlock(scale))
    p = se_inject.plan(model, input_size=(3, 16, 16))
    assert [s.block for s in p] == ([] if gate else ["1"])
    assert len([s for s in p.skipped if s.reason == HOLDS]) == gate


def test_filter_response_norm_is_no_gate():
    frn = se_inject.plan(timm.create_model("resnetv2_50d_frn"), input_size=(3, 64, 64))
    plain = se_inject.plan(timm.create_model("resnetv2_50d"), input_size=(3, 64, 64))
    assert len(frn) == 16
    assert [(s.block, s.tensor) for s in frn] == [(s.block, s.tensor) for s in plain]


@pytest.mark.parametrize("scale, held", [
    (lambda c: timm.layers.GatherExcite(c, extent=4, use_mlp=False), True),
    ("LocalSE", True),
    ("GatedLinearUnit", False),
    ("CoarseProduct", False),
], ids=["gather_excite", "local_se", "glu", "coarse_product"])
def test_a_channel_gate_over_windows_is_a_channel_gate(scale, held, tmp_path):
    """Gather-Excite (Hu et al., 2018; timm's GatherExcite, parameter-free: its other forms
    fail to build in this timm) and NinaSR's attention scale each
    channel by a value squashed from a pooled window of the map and brought back to its size:
    SE over a window instead of the whole map, so the block holds a gate and is not gated
    twice. A scale per pixel at the map's resolution (a gated linear unit) and coarse features
    multiplied in without a squashing gate are no channel gates, and their blocks are gated."""
    import handwritten
    make = getattr(handwritten, scale) if isinstance(scale, str) else scale
    model = handwritten.ScaledBranchNet(make)
    p = se_inject.plan(model, input_size=(3, 32, 32))
    assert (len(p), [s.reason for s in p.skipped]) == ((0, [HOLDS]) if held else (1, []))
    if held:  # a rule that allows a second gate puts one there
        assert len(se_inject.plan(model, rules=[_allowing(tmp_path)], input_size=(3, 32, 32))) == 1
