"""Long checks, left out of CI: run with `python3 -m pytest -m slow`."""
import pytest
import timm
import torch

import se_inject


@pytest.mark.slow
@pytest.mark.parametrize("name,side", [("resnet50", 96), ("inception_v3", 107), ("resnet152", 64)])
def test_compile_large_timm_models(name, side):
    torch.manual_seed(0)
    model = se_inject.apply(timm.create_model(name).eval())
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        compiled, eager = torch.compile(model)(x), model(x)
    # random-init activations reach 1e8 here and compile reorders float sums: compare the
    # error relative to the output's norm. The unmodified models show ~2e-6; gated Inception-v3,
    # whose gates' sigmoids see pre-activations of that size, 3.6e-6 to 2.9e-5 over three
    # seeds (1.2e-5 with this one, which failed the 1e-5 this test held before). Without its
    # gates, the same Inception-v3 is 1.7e2 off by this measure.
    assert ((compiled - eager).norm() / eager.norm()).item() < 1e-4
