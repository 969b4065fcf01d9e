"""A gated model goes wherever a PyTorch model goes: bf16 autocast, channels_last,
torch.export, ONNX (run with onnxruntime). Each is compared with the eager fp32 model."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import se_inject

from conftest import gates, randomize_norms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


@pytest.fixture(scope="module")
def gated():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    randomize_norms(model)
    se_inject.apply(model, input_size=(3, 64, 64))
    for _, g in gates(model):   # gates that act: not all near 0.5
        g.fc2.weight.data.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


def _rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_bf16_autocast(gated, x):
    with torch.no_grad():
        ref = gated(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = gated(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y, ref) <= 3e-2          # bf16 keeps 8 bits of mantissa


def test_channels_last(gated, x):
    m = copy.deepcopy(gated).to(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m(x.to(memory_format=torch.channels_last))
        ref = gated(x)
    assert _rel(y, ref) <= 1e-5


def test_torch_export(gated, x):
    ep = torch.export.export(gated, (x,))
    with torch.no_grad():
        assert _rel(ep.module()(x), gated(x)) <= 1e-6
    # the gates are in the exported program: one sigmoid per gate
    sigmoids = [n for n in ep.graph.nodes if "sigmoid" in str(n.target)]
    assert len(sigmoids) == len(gates(gated)) == 8


def test_onnx_export_runs_in_onnxruntime(gated, x, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    path = tmp_path / "gated.onnx"
    torch.onnx.export(gated, (x,), str(path), dynamo=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert _rel(torch.from_numpy(y), gated(x)) <= 1e-5
    import onnx
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Sigmoid") == 8


def test_torchscript_trace(gated, x):
    """torch.jit.trace records the rewritten forwards like any others (torch.jit.script, which
    compiles each class's own forward from its source, is not supported)."""
    traced = torch.jit.trace(gated, (x,))
    with torch.no_grad():
        assert _rel(traced(x), gated(x)) <= 1e-6
    assert str(traced.inlined_graph).count("aten::sigmoid") == 8
