"""Helpers shared by the tests: the paper's equations written out, and gate utilities."""
from __future__ import annotations

import pytest
import torch

import se_inject


def se_reference(u: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """Hu et al. Eq. 2-4, written with plain matrix products (independent of SEGate)."""
    z = u.mean(dim=(2, 3))                                          # Eq. 2: squeeze
    h = torch.relu(z @ w1.reshape(w1.shape[0], -1).T + b1)          # W1 z, ReLU
    s = torch.sigmoid(h @ w2.reshape(w2.shape[0], -1).T + b2)       # Eq. 3: excitation
    return u * s[:, :, None, None]                                  # Eq. 4: scale


def paper_reference(u, gate):
    return se_reference(u, gate.fc1.weight, gate.fc1.bias, gate.fc2.weight, gate.fc2.bias)


def gates(model) -> list[tuple[str, se_inject.ChannelGate]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, se_inject.ChannelGate)]


@torch.no_grad()
def saturate(model) -> None:
    """Make every gate pass its input through unchanged: sigmoid(30) is 1.0 in float32."""
    assert torch.sigmoid(torch.tensor(30.0)).item() == 1.0
    for _, g in gates(model):
        g.fc2.weight.zero_()
        g.fc2.bias.fill_(30.0)


def eq5_parameters(stages, ratio):
    """Paper Eq. 5 (weights) plus the two bias vectors of each gate, from (N_s, C_s) pairs."""
    weights = sum(2 * n * c * (c // ratio) for n, c in stages)
    biases = sum(n * (c + c // ratio) for n, c in stages)
    return weights, biases


@torch.no_grad()
def randomize_norms(model, spread: float = 0.1) -> None:
    """Batch-norm statistics and affine terms as training leaves them, so that every layer acts
    (timm zero-initialises each branch's last norm, which would hide any gate)."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, spread)
            m.running_mean.normal_(0, spread)
            m.running_var.uniform_(0.5, 1.5)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
