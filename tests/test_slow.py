"""Long checks, left out of CI: run with `python3 -m pytest -m slow`."""
import pytest
import timm
import torch

import se_inject


@pytest.mark.slow
@pytest.mark.parametrize("name,side", [("resnet50", 96), ("inception_v3", 107), ("resnet152", 64)])
def test_compile_large_timm_models(name, side):
    model = se_inject.apply(timm.create_model(name).eval())
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)
