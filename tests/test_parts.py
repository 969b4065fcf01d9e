"""Gates in a part of a model: remove() on a part of the module apply() gated."""
from __future__ import annotations

import pytest
import timm
import torch

import se_inject

from conftest import gates, randomize_norms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

def _resnet18():
    model = timm.create_model("resnet18", pretrained=False).eval()
    randomize_norms(model)  # timm starts each block's last norm at zero
    return model


@torch.no_grad()
def test_remove_on_a_part_scales_back_what_its_identity_gates_doubled():
    model = _resnet18()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    se_inject.apply(model, init="identity")
    doubled = [k for k, v in model.state_dict().items()
               if k in plain and not torch.equal(v, plain[k])]
    assert {k.split(".")[0] for k in doubled} == {"layer1", "layer2", "layer3", "layer4"}
    se_inject.remove(model.layer1)
    for k, v in model.state_dict().items():
        if k.startswith("layer1."):
            assert torch.equal(v, plain[k]), k  # its gates out, its layers as they were
        elif k in plain and k in doubled:
            assert torch.equal(v, 2 * plain[k]), k  # the other gates' layers still doubled
    assert not any(n.startswith("layer1.") for n, _ in gates(model))
    assert any(n.startswith("layer2.") for n, _ in gates(model))
