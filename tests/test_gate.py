"""The gate is the paper's block, Eq. 2-4."""
import pytest
import torch

from se_inject import SEGate
from conftest import paper_reference


@pytest.mark.parametrize("channels,ratio,expected", [(256, 16, 16), (2048, 16, 128), (64, 16, 4),
                                                     (24, 16, 1), (8, 32, 1), (100, 3, 33)])
def test_reduced_width_is_c_over_r(channels, ratio, expected):
    g = SEGate(channels, ratio)
    assert g.fc1.weight.shape == (expected, channels, 1, 1)
    assert g.fc2.weight.shape == (channels, expected, 1, 1)
    assert g.fc1.bias.shape == (expected,) and g.fc2.bias.shape == (channels,)


@pytest.mark.parametrize("shape", [(2, 32, 7, 7), (1, 64, 1, 1), (3, 16, 5, 9)])
def test_gate_equals_paper_equations(shape):
    g = SEGate(shape[1], 4)
    with torch.no_grad():  # non-trivial biases so every term of Eq. 3 matters
        g.fc1.bias.normal_()
        g.fc2.bias.normal_()
    u = torch.randn(shape)
    torch.testing.assert_close(g(u), paper_reference(u, g), rtol=1e-5, atol=1e-6)


def test_gate_scales_each_channel_by_a_factor_in_0_1():
    g = SEGate(32, 8)
    u = torch.rand(2, 32, 6, 6) + 0.1
    s = g(u) / u
    # one factor per (sample, channel), constant over space, strictly between 0 and 1
    torch.testing.assert_close(s, s[:, :, :1, :1].expand_as(s))
    assert ((s > 0) & (s < 1)).all()
