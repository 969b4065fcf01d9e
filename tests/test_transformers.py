"""Hugging Face transformers' CNNs, built from their default configurations (random weights).

transformers is not a dependency of se-inject, so these run only where it is installed:
``pip install transformers`` then ``python3 -m pytest -m slow tests/test_transformers.py``.
Their forwards check the input's number of channels and pad as TensorFlow does, reading the
input's size as Python numbers, which torch.fx alone refuses to trace."""
import copy

import pytest
import torch

import se_inject
from conftest import gates

pytestmark = pytest.mark.slow


@pytest.fixture
def transformers():
    return pytest.importorskip("transformers")


def _residual_blocks(name, model, config):
    """How many residual blocks the model has, from its configuration or its layers."""
    if name == "MobileNetV2":
        return sum(1 for m in model.modules() if getattr(m, "use_residual", False))
    return sum(config.depths)


@pytest.mark.parametrize("name", ["ResNet", "ConvNext", "MobileNetV2"])
def test_transformers_cnns_get_a_gate_in_every_residual_block(name, transformers):
    config = getattr(transformers, f"{name}Config")()
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForImageClassification")(config).eval()
    plain = copy.deepcopy(model)
    keys = list(model.state_dict())
    se_inject.apply(model, init="identity")
    assert type(model) is type(plain)
    assert len(gates(model)) == _residual_blocks(name, plain, config) > 0
    assert [k for k in model.state_dict() if "se_gate" not in k] == keys
    with torch.no_grad():
        for side in (224, 193, 160):  # odd sizes pad on one side only
            x = torch.randn(2, 3, side, side)
            assert torch.equal(model(x).logits, plain(x).logits)
    if name != "MobileNetV2":  # its embeddings check the number of channels, as before
        with pytest.raises(ValueError, match="channel dimension"):
            model(torch.randn(1, 4, 224, 224))
    model.train()
    model(torch.randn(2, 3, 160, 160)).logits.sum().backward()
    assert all(g.fc1.weight.grad is not None for _, g in gates(model))
    se_inject.remove(model)
    assert list(model.state_dict()) == keys


def test_transformers_regnet_blocks_keep_their_own_gates(transformers):
    """RegNetConfig's default is a RegNetY: every block already holds an SE gate."""
    config = transformers.RegNetConfig()
    model = transformers.RegNetForImageClassification(config).eval()
    assert config.layer_type == "y"
    with pytest.warns(UserWarning, match=rf"already holds a gate \({sum(config.depths)} blocks\)"):
        se_inject.apply(model)
    assert not gates(model)


def test_transformers_convnextv2_blocks_keep_their_global_response_norm(transformers):
    """ConvNeXt V2's Global Response Norm scales each channel by a value taken from the whole
    map: the blocks' own channel gate, kept as timm's convnextv2 keeps it (README, "What gets a
    gate"), in Hugging Face's channels-last code as in timm's."""
    import timm
    config = transformers.ConvNextV2Config()
    model = transformers.ConvNextV2ForImageClassification(config).eval()
    with pytest.warns(UserWarning, match=rf"already holds a gate \({sum(config.depths)} blocks\)"):
        se_inject.apply(model)
    assert not gates(model)
    timm_model = timm.create_model("convnextv2_atto")
    held = [s for s in se_inject.plan(timm_model).skipped if "channel gate" in s.reason]
    assert len(held) == sum(len(stage.blocks) for stage in timm_model.stages) > 0

