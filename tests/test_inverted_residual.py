"""The inverted-residual rules: the paper's placement and the EfficientNet/MobileNetV3 one."""
import pytest
import timm
import torch
import torchvision

import se_inject
from conftest import paper_reference
from handwritten import BlockNet


@pytest.fixture(scope="module")
def tv_v2():
    return torchvision.models.mobilenet_v2(weights=None).eval()


def test_both_placements_find_every_inverted_residual(tv_v2):
    blocks = [n for n, m in tv_v2.named_modules()
              if type(m).__name__ == "InvertedResidual" and m.use_res_connect]
    standard = se_inject.plan(tv_v2, rules=["inverted-residual"])
    dw = se_inject.plan(tv_v2, rules=["inverted-residual-dw"])
    assert [s.block for s in standard] == blocks
    assert [s.block for s in dw] == blocks  # on the block, not on its Sequential `conv`
    for b, s, d in zip(blocks, standard, dw):
        block = tv_v2.get_submodule(b)
        assert s.channels == block.out_channels                       # after the projection
        assert d.channels == block.conv[1][0].out_channels > s.channels  # the expanded width


def test_after_depthwise_placement_computes_the_mbconv_se(tv_v2):
    import copy
    model = se_inject.apply(copy.deepcopy(tv_v2), rules=["inverted-residual-dw"])
    blk = model.features[3]
    assert len(blk.conv) == 4  # the gate is not one of the Sequential's layers
    x = torch.randn(2, blk.conv[0][0].in_channels, 14, 14)
    with torch.no_grad():
        h = paper_reference(blk.conv[1](blk.conv[0](x)), blk.se_gate)
        torch.testing.assert_close(blk(x), x + blk.conv[3](blk.conv[2](h)), rtol=1e-5, atol=1e-6)


def test_timm_mobilenetv2_gate_sits_in_the_se_slot():
    model = se_inject.apply(timm.create_model("mobilenetv2_100").eval(),
                            rules=["inverted-residual-dw"])
    blk = model.blocks[1][1]
    x = torch.randn(2, blk.conv_pw.in_channels, 14, 14)
    with torch.no_grad():
        h = blk.se(blk.aa(blk.bn2(blk.conv_dw(blk.bn1(blk.conv_pw(x))))))
        expected = blk.bn3(blk.conv_pwl(paper_reference(h, blk.se_gate))) + x
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-6)


def test_blocks_without_a_depthwise_conv_are_not_inverted_residuals():
    p = se_inject.plan(BlockNet(), rules=["inverted-residual"])
    assert len(p) == 0 and {s.reason for s in p.skipped} == \
        {"no depthwise convolution in the branch"}


def test_efficientnet_blocks_keep_their_own_se():
    model = timm.create_model("efficientnet_b0")
    p = se_inject.plan(model, rules=["inverted-residual-dw"])
    assert len(p) == 0
    assert all("already holds a channel gate" in s.reason for s in p.skipped)


def test_no_gate_goes_inside_a_norm_layer_the_depthwise_output_enters():
    """timm's ConvNeXt with conv_mlp (convnext_atto) normalises with LayerNorm2d, whose forward
    permutes to channels-last first. Before, the EfficientNet placement stopped at that permute
    and planned each gate inside the norm's forward (apply() then refused the norm for its
    autocast reads); now the rule passes those blocks by, saying why, and the residual rule
    after it gates them as it does alone."""
    model = timm.create_model("convnext_atto", pretrained=False).eval()
    with pytest.raises(se_inject.SEInjectError, match=r"12 × inverted-residual-dw: the depthwise "
                                                      r"output goes on inside a norm layer "
                                                      r"\(LayerNorm2d\), where no gate goes"):
        se_inject.apply(model, rules=["inverted-residual-dw"])
    both = se_inject.plan(model, rules=["inverted-residual-dw", "residual"])
    alone = se_inject.plan(model, rules=["residual"])
    assert both.by_rule() == {"residual": 12}
    assert [(s.block, s.gate, s.channels) for s in both] == \
        [(s.block, s.gate, s.channels) for s in alone]
    assert not any(type(model.get_submodule(s.block)).__name__ == "LayerNorm2d" for s in both)
