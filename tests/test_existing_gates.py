"""Blocks that already hold a channel gate are not gated twice, unless a rule allows it."""
import pytest
import timm
import torch

import se_inject
from conftest import gates
from handwritten import ChannelsLastGatedNet, GatedBlocksNet
from test_rules import GOOD

HOLDS = "the block already holds a channel gate (SE, ECA...)"


def test_inline_se_is_recognised_and_spatial_attention_is_not():
    p = se_inject.plan(GatedBlocksNet())
    assert [s.block for s in p] == ["spatial_block"]
    assert [(s.merge, s.reason) for s in p.skipped] == [("se_block.add", HOLDS)]


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
    rule = tmp_path / "regate.yaml"
    rule.write_text(GOOD.replace("  min_branches_with_conv: 1\n",
                                 "  min_branches_with_conv: 1\n  existing_gate: allow\n"))
    model = se_inject.apply(timm.create_model("seresnet50"), rules=[str(rule)])
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
    rule = tmp_path / "regate.yaml"  # a second gate where allowed: on the blocks, not the MLPs
    rule.write_text(GOOD.replace("  min_branches_with_conv: 1\n",
                                 "  min_branches_with_conv: 1\n  existing_gate: allow\n"))
    p = se_inject.plan(model, rules=[str(rule)], input_size=(3, 64, 64))
    assert sorted(s.block for s in p) == blocks and {s.spatial for s in p} != {(1, 1)}
