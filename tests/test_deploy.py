"""A gated model goes wherever a PyTorch model goes: bf16 autocast, channels_last,
torch.export, ONNX (run with onnxruntime). Each is compared with the eager fp32 model."""
from __future__ import annotations

import copy
import dataclasses
import types

import pytest
import timm
import torch
import torchvision

import se_inject
from se_inject.errors import BlockChangedError

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


@pytest.mark.parametrize("gate", ["se", "eca", "ese"])
def test_torchscript_script_is_refused_clearly_and_works_once_the_gates_are_removed(gate, x):
    """torch.jit.script of a gated model is refused with se-inject's error, naming what to use
    instead, and the model stays as it was; the plain model, once the gates are removed, scripts
    and computes what it did before apply."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).eval()
    with torch.no_grad():
        plain = model(x)
    se_inject.apply(model, input_size=(3, 64, 64), gate=gate)
    for _, g in gates(model):
        for p in g.parameters():
            p.data.normal_(0, 0.5)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
    with pytest.raises(se_inject.SEInjectError, match=r"torch\.jit\.script.*torch\.jit\.trace"):
        torch.jit.script(model)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(x), before)
    se_inject.remove(model)
    scripted = torch.jit.script(model)
    with torch.no_grad():
        assert torch.equal(scripted(x), plain)


# Re-parameterisation (timm.utils.reparameterize_model, a step before deployment) changes blocks
# in place: a conv-norm Sequential becomes one convolution, a flag switches the forward to it.

class _ConvNorm(torch.nn.Sequential):
    def __init__(self, c):
        super().__init__(torch.nn.Conv2d(c, c, 3, padding=1, bias=False), torch.nn.BatchNorm2d(c))

    def fuse(self):
        conv, bn = self
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        fused = torch.nn.Conv2d(conv.in_channels, conv.out_channels, 3, padding=1)
        fused.weight.data = conv.weight * scale[:, None, None, None]
        fused.bias.data = bn.bias - bn.running_mean * scale
        return fused


class _RepBlock(torch.nn.Module):
    """A residual block whose branch holds a conv-norm container and a re-parameterisable
    sum (3x3 conv-norm + identity) that a flag replaces by one convolution."""

    def __init__(self, c):
        super().__init__()
        self.mix = _ConvNorm(c)
        self.branch = _ConvNorm(c)
        self.fused = False

    def reparameterize(self):
        conv = self.mix.fuse()
        c = torch.arange(conv.out_channels)
        conv.weight.data[c, c, 1, 1] += 1
        self.mix, self.fused = conv, True

    def forward(self, x):
        x = self.mix(x) if self.fused else self.mix(x) + x
        return x + self.branch(torch.relu(x))


class _RepNet(torch.nn.Module):
    def __init__(self, fused_flag: bool = True):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = torch.nn.Sequential(_RepBlock(32), _RepBlock(32))
        if not fused_flag:  # reparameterize() only fuses the containers
            for b in self.blocks:
                b.reparameterize = lambda b=b: setattr(b, "branch", b.branch.fuse())

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def _acting(model) -> None:
    randomize_norms(model)
    for _, g in gates(model):
        g.fc2.weight.data.normal_(0, 0.5)


def _regate(model, input_size) -> None:
    """README, "Changing a gated model": the gates' weights, the gates out, the gates in again,
    every trained gate tensor loaded into a new gate."""
    trained = {k: v for k, v in model.state_dict().items() if ".se_gate" in k}
    se_inject.remove(model)
    se_inject.apply(model, input_size=input_size)
    missing, unexpected = model.load_state_dict(trained, strict=False)
    assert not unexpected and not [k for k in missing if ".se_gate" in k]


@torch.no_grad()
def test_a_container_replaced_by_reparameterisation_keeps_the_gated_output():
    torch.manual_seed(0)
    model = _RepNet(fused_flag=False).eval()
    se_inject.apply(model, input_size=(3, 16, 16))
    _acting(model)
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    fused = timm.utils.reparameterize_model(model)
    assert isinstance(fused.blocks[0].branch, torch.nn.Conv2d)
    assert len(gates(fused)) == len(gates(model)) == 2
    assert _rel(fused(x), ref) <= 1e-5


@torch.no_grad()
def test_a_flag_changed_after_apply_is_refused_and_regating_keeps_the_trained_gates():
    torch.manual_seed(0)
    model = _RepNet().eval()
    se_inject.apply(model, input_size=(3, 16, 16))
    _acting(model)
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    fused = timm.utils.reparameterize_model(model)
    with pytest.raises(se_inject.SEInjectError, match=r"`blocks.0` \(_RepBlock\).*`fused`, "
                                                      r"which was False.* is True now"):
        fused(x)
    with pytest.raises(BlockChangedError, match="`fused`"):  # not a TraceError's leaf advice
        se_inject.plan(fused, input_size=(3, 16, 16))
    _regate(fused, (3, 16, 16))
    assert _rel(fused(x), ref) <= 1e-5


@pytest.mark.parametrize("name", ["repvit_m1", "lcnetv2_small"])
@torch.no_grad()
def test_timm_reparameterize_model_on_a_gated_model(name):
    """RepViT's conv-norm containers are fused; LCNetV2's multi-branch depthwise convolution
    becomes one, switching its forward by `dw_conv` (None before)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    se_inject.apply(model, input_size=(3, 64, 64))
    _acting(model)
    x = torch.randn(1, 3, 64, 64)
    ref = model(x)
    fused = timm.utils.reparameterize_model(model)
    if name == "lcnetv2_small":
        with pytest.raises(se_inject.SEInjectError,
                           match="`dw_conv`, which was None .* is a Conv2d now"):
            fused(x)
        _regate(fused, (3, 64, 64))
    assert len(gates(fused)) == len(gates(model))
    assert _rel(fused(x), ref) <= 1e-4


@torch.no_grad()
def test_a_container_holding_a_gate_replaced_after_apply_is_refused():
    """torchvision's MobileNetV2 keeps each inverted residual's layers in one nn.Sequential; the
    EfficientNet placement puts the gate inside it, so the generated forward calls its layers
    one by one and cannot follow a replacement."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    se_inject.apply(model, rules=["inverted-residual-dw"], input_size=(3, 64, 64))
    x = torch.randn(1, 3, 64, 64)
    model(x)
    block = model.features[3]
    block.conv = torch.nn.Sequential(*list(block.conv)[:-1])
    with pytest.raises(se_inject.SEInjectError, match=r"`features.3` \(InvertedResidual\).*`conv`, "
                                                      r"which was a Sequential of 4 layers"):
        model(x)


@torch.no_grad()
def test_a_hook_on_a_container_holding_a_gate_is_refused():
    """A hook on that nn.Sequential never ran after apply(): the generated forward calls its
    layers, not it (found with torchvision's MobileNetV2). A hook there before apply() is
    refused with the model untouched, one registered later at the next call; hooks on the block
    and on the layers still run."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    block = model.features[3]
    handle = block.conv.register_forward_hook(lambda m, i, o: None)
    keys = list(model.state_dict())
    with pytest.raises(se_inject.SEInjectError, match=r"`features.3` \(InvertedResidual\): a hook "
                                                      r"is registered on `conv` \(Sequential\).*"
                                                      r"nothing was changed"):
        se_inject.apply(model, rules=["inverted-residual-dw"], input_size=(3, 64, 64))
    assert list(model.state_dict()) == keys and "forward" not in vars(block)
    handle.remove()
    se_inject.apply(model, rules=["inverted-residual-dw"], input_size=(3, 64, 64))
    ran = []
    block.register_forward_hook(lambda m, i, o: ran.append("block"))
    block.conv[2].register_forward_hook(lambda m, i, o: ran.append("conv.2"))
    x = torch.randn(1, 3, 64, 64)
    model(x)
    assert ran == ["conv.2", "block"]
    block.conv.register_forward_pre_hook(lambda m, i: ran.append("conv"))
    with pytest.raises(BlockChangedError, match=r"a hook was registered on `conv` \(Sequential\) "
                                                r"after se_inject.apply.*would not run"):
        model(x)


class _SqueezeThroughBlock(torch.nn.Module):
    """The branch ends in a container (1x1 conv, norm): its gate takes the squeeze through the
    container's two layers (gate.mean_through_linear), which the generated code names."""

    def __init__(self, c):
        super().__init__()
        self.a = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.ReLU())
        self.b = torch.nn.Sequential(torch.nn.Conv2d(c, c, 1), torch.nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.b(self.a(x)))


@torch.no_grad()
def test_a_container_a_gate_squeezes_through_is_checked_and_one_it_does_not_is_free():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _SqueezeThroughBlock(16))
    se_inject.apply(model.eval(), input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    block = model[1]
    # the same computation in a container of another length: called whole, so not checked
    block.a = torch.nn.Sequential(torch.nn.Sequential(block.a[0], torch.nn.ReLU()))
    assert _rel(model(x), ref) == 0
    block.b = torch.nn.Conv2d(16, 16, 1)
    with pytest.raises(BlockChangedError, match="`b`, which was a Sequential of 2 layers .* is a "
                                                "Conv2d now"):
        model(x)


def _drop_by(block, y):
    """A helper the block passes itself to: the flag and the rate it reads are the block's."""
    return torch.nn.functional.dropout(y, block.p, block.training)


class _HelperBlock(torch.nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, c, 3, padding=1)
        self.act, self.p = act, 0.5

    def forward(self, x):
        return x + _drop_by(self, self.c2(self.act(self.c1(x))))


def _helper_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1),
                               _HelperBlock(16, torch.relu), _HelperBlock(16, torch.tanh))


def test_a_training_flag_read_in_a_function_the_forward_calls_keeps_both_modes():
    """Gated in eval mode: before, the gated blocks never ran their dropout again, as the
    function that reads ``block.training`` was traced in eval mode only. Now, seeded alike,
    the gated model (identity-initialised) computes what the plain one does in both modes."""
    torch.manual_seed(0)
    plain = _helper_net().eval()
    gated = copy.deepcopy(plain)
    se_inject.apply(gated, init="identity", input_size=(3, 16, 16))
    assert len(gates(gated)) == 2
    x = torch.randn(2, 3, 16, 16)
    for mode in (True, False, True):
        plain.train(mode), gated.train(mode)
        torch.manual_seed(1)
        want = plain(x)
        torch.manual_seed(1)
        assert torch.equal(gated(x), want)
    torch.manual_seed(2)
    assert not torch.equal(gated(x), gated(x))  # training: dropout draws anew


@pytest.mark.parametrize("attr,value,was", [
    ("p", 0.1, "which was 0.5"),                   # read by the function the forward calls
    ("act", torch.sigmoid, "which was <built-in method tanh"),  # a function the block holds
])
@torch.no_grad()
def test_an_attribute_a_called_or_held_function_reads_changed_after_apply_is_refused(
        attr, value, was):
    """The trace took the rate and the held function as they were (tanh's op is in the
    generated code): a change would have been ignored without a word."""
    torch.manual_seed(0)
    model = _helper_net().eval()
    se_inject.apply(model, input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    model(x)
    setattr(model[2], attr, value)
    with pytest.raises(BlockChangedError, match=rf"`2` \(_HelperBlock\).*`{attr}`, {was}"):
        model(x)


@dataclasses.dataclass
class _Settings:
    scale: float = 0.5
    relu: bool = True


class _ConfiguredBlock(torch.nn.Module):
    """A block that reads its settings from an object it holds, shared by its blocks."""

    def __init__(self, c, settings):
        super().__init__()
        self.settings = settings
        self.c1, self.c2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        y = x + self.c2(torch.relu(self.c1(x))) * self.settings.scale
        return torch.relu(y) if self.settings.relu else y


@torch.no_grad()
def test_settings_read_from_a_held_object_changed_after_apply_are_refused():
    """The trace took ``settings.scale`` and ``settings.relu`` as they were: before, a shared
    setting changed after apply() was ignored by every gated block without a word. Settings
    set back, or an equal object in its place, are fine."""
    torch.manual_seed(0)
    settings = _Settings()
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1),
                                _ConfiguredBlock(16, settings), _ConfiguredBlock(16, settings))
    se_inject.apply(model.eval(), input_size=(3, 16, 16))
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    settings.relu = False
    with pytest.raises(BlockChangedError, match=r"`1` \(_ConfiguredBlock\).*reads "
                                                r"`settings.relu`, which was True .* is False now"):
        model(x)
    settings.relu = True
    model[2].settings = _Settings()
    assert torch.equal(model(x), ref)
    model[2].settings = types.SimpleNamespace(scale=0.5, relu=True)
    with pytest.raises(BlockChangedError, match=r"`2` \(_ConfiguredBlock\).*reads `settings`, "
                                                r"which was a _Settings .* is a SimpleNamespace"):
        model(x)
