"""The fused fast path: torch.compile of the gated model, in place, with the gate fused into
the kernels around it, and the same outputs as the eager model."""
from __future__ import annotations

import copy
import re
from unittest import mock

import pytest
import torch
from torch import nn
from torch._inductor.graph import GraphLowering
from torch._inductor.utils import run_and_get_code
from torch.overrides import TorchFunctionMode

import se_inject
from se_inject import gate as gate_module
from se_inject.errors import InvalidArgumentError
from se_inject.fuse import fused_settings

from conftest import randomize_norms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                  nn.BatchNorm2d(cout)) if stride > 1 or cin != cout else None

    def forward(self, x):
        s = x if self.down is None else self.down(x)
        y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(y + s)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 2, 1)
        self.blocks = nn.Sequential(Block(32, 32, 1), Block(32, 64, 2))
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _net():
    torch.manual_seed(0)
    net = Net()
    randomize_norms(net)
    return net


def test_fused_model_is_the_same_object_with_the_same_outputs():
    net = se_inject.apply(_net().eval(), input_size=(3, 32, 32))
    eager = copy.deepcopy(net)
    keys = list(net.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert se_inject.fuse(net) is net and type(net) is Net
    assert list(net.state_dict()) == keys                   # no _orig_mod. prefix
    with torch.no_grad():
        y, (code, *_) = run_and_get_code(net, x)
        ref = eager(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    kernels = re.findall(r"(cpp_fused_\w+) = ", code) or re.findall(r"(triton_\w+) = ", code)
    # each gate's scale runs in one kernel with the excitation, the residual sum and the ReLU...
    assert sum(all(op in k for op in ("add", "mul", "relu", "sigmoid")) for k in kernels) == 2
    # ...and its squeeze in the same kernel as the norm before it
    assert sum("mean" in k and "batch_norm" in k for k in kernels) >= 2
    # (the last block's scale kernel also takes the head's global pooling: one pass fewer)


_MATRIX_PRODUCTS = r"(_mkl_linear|_linear_pointwise)(\.default)?\(|extern_kernels\.(addmm|mm)\("


def _fused_and_checked(freeze):
    """A gated _net() in eval mode, fused; its output checked against the eager model's.
    Returns the model, the input and the code Inductor generated."""
    net = se_inject.apply(_net().eval(), input_size=(3, 32, 32))
    eager = copy.deepcopy(net)
    x = torch.randn(4, 3, 32, 32)
    se_inject.fuse(net, freeze=freeze)
    with torch.no_grad():
        y, (code, *_) = run_and_get_code(net, x)
        ref = eager(x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    return net, x, code


@pytest.mark.parametrize("freeze", [False, True])
def test_compiled_gates_compute_their_layers_inside_the_generated_kernels(freeze):
    # compiled for the CPU, a gate's two small layers are generated C++ in the gate's kernels;
    # the only matrix product left is the head's (written as matrix products, the two gates
    # would add four calls of their own)
    _, _, code = _fused_and_checked(freeze)
    assert len(re.findall(_MATRIX_PRODUCTS, code)) == 1
    kernels = re.findall(r"(cpp_fused_\w+) = ", code)
    assert sum("sum" in k and "sigmoid" in k for k in kernels) == 2


class _Calls(TorchFunctionMode):
    """The names of the torch functions called under it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_compiled_gate_layers_are_a_multiply_and_a_sum_on_every_device(device, monkeypatch):
    # not for the CPU alone: on a GPU too, Inductor's reductions beat cuBLAS on a few vectors
    # (README, GPU figures); "meta" stands for a device other than the CPU
    conv = nn.Conv2d(8, 3, 1).to(device)
    v = torch.randn(5, 8, device=device)

    def layers():
        with _Calls() as calls:
            out = gate_module._excitation_fc(conv, v)
        return out, calls.names
    eager, names = layers()
    assert "linear" in names                                # eager: the matrix product
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out, names = layers()
    assert "linear" not in names and "sum" in names
    if device == "cpu":                                     # Eq. 3's W·v + b, from the weights
        ref = v @ conv.weight.flatten(1).T + conv.bias
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(gate_module, "EXCITATION_AS_SUM", False)  # the setting is read
    assert "linear" in layers()[1]


def test_freeze_folds_the_norms_and_keeps_the_gates_fused():
    net, x, code = _fused_and_checked(freeze=True)
    # the weights are constants of the compiled code: its only input is the image...
    (inputs,) = re.findall(r"def call\(self, args\):\n\s+(.*) = args", code)
    assert len([a for a in inputs.split(",") if a.strip()]) == 1, inputs
    # ...and every norm is folded into its convolution: no kernel computes one
    assert "batch_norm" not in code
    kernels = re.findall(r"(cpp_fused_\w+) = ", code)
    assert sum(all(op in k for op in ("add", "mul", "relu", "sigmoid")) for k in kernels) == 2
    # a fused training step still compiles without freezing
    net.train()
    net(x).sum().backward()
    assert net.blocks[0].se_gate.fc1.weight.grad is not None


class Bottleneck(nn.Module):
    """1x1 (narrow), 3x3, 1x1 (widen four times) as in ResNet-50: the gated tensor is
    ``bn3(conv3(h))``, a 1x1 convolution and a norm of ``h``."""

    def __init__(self, cin, width, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=True)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.down = nn.Conv2d(cin, 4 * width, 1, stride) if stride > 1 or cin != 4 * width \
            else None

    def forward(self, x):
        s = x if self.down is None else self.down(x)
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return torch.relu(self.bn3(self.conv3(h)) + s)


class BottleneckNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, 1, 1)
        # at 32x32: 1,024 pixels and 8 channels into conv3, then 16 pixels and 64 channels
        self.blocks = nn.Sequential(Bottleneck(32, 8), Bottleneck(32, 8), Bottleneck(32, 64, 8))
        self.head = nn.Linear(256, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _squeezed_channels(net, x, freeze):
    """Every reduction of a 4-D tensor over its pixels in the graph Dynamo captures, and the
    tensor's channels: ("mean", C), or ("chunks", C) for a frozen gate's squeeze on the CPU
    (gate.squeeze_in_chunks, which starts by turning the map channels-last)."""
    graphs = []

    def capture(gm, example_inputs, **options):
        graphs.append(gm)
        return gm.forward

    se_inject.fuse(net, freeze=freeze, backend=capture)
    with torch.no_grad():
        net(x)
    (gm,) = graphs
    inputs = [(n, n.args[0].meta["example_value"]) for n in gm.graph.nodes
              if n.target in ("mean", torch.mean, "permute")]
    return [("chunks" if n.target == "permute" else "mean", v.shape[1]) for n, v in inputs
            if v.dim() == 4]


def test_frozen_gates_average_a_1x1_convolutions_input_where_that_reads_less():
    # the mean of bn3(conv3(h)) is bn3(conv3(mean(h))): frozen, the first two gates average h
    # (8 channels of 1,024 pixels, not 32); the third keeps its own squeeze, as h and conv3's
    # weights (64 channels of 16 pixels, 64 x 256) would be more to read than its input
    torch.manual_seed(0)
    net = BottleneckNet().eval()
    randomize_norms(net)
    se_inject.apply(net, input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    assert _squeezed_channels(net, x, freeze=False) == [("mean", 32), ("mean", 32),
                                                        ("mean", 256), ("mean", 256)]  # (head)
    assert _squeezed_channels(net, x, freeze=True) == [("chunks", 8), ("chunks", 8),
                                                       ("chunks", 256), ("mean", 256)]
    eager = copy.deepcopy(net)
    se_inject.fuse(net, freeze=True)
    with torch.no_grad():
        torch.testing.assert_close(net(x), eager(x), rtol=1e-5, atol=1e-5)
    se_inject.unfuse(net)                                   # eager again: its own squeeze
    from se_inject.gate import FROZEN
    assert not any(FROZEN in g.__dict__ for g in net.modules())
    with torch.no_grad():
        assert torch.equal(net(x), eager(x))


@pytest.mark.parametrize("size", [(56, 56), (7, 7), (13, 13), (2, 3), (1, 1)])
@pytest.mark.parametrize("how", ["avg", "max"])
def test_a_squeeze_in_chunks_of_pixels_is_the_squeeze_over_all_of_them(size, how):
    # 56x56 and 7x7 split into 8 and 7 chunks; 13x13 and 2x3 cannot be split into equal
    # chunks of 4 pixels or more (nor 1x1), and are reduced at once
    from se_inject.gate import squeeze_in_chunks
    torch.manual_seed(0)
    x = torch.randn(2, 24, *size)
    want = x.mean((2, 3)) if how == "avg" else x.amax((2, 3))
    for layout in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.testing.assert_close(squeeze_in_chunks(layout, how), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gate", [dict(gate="se", squeeze="max"), dict(gate="eca"),
                                  dict(gate="ese")])
def test_frozen_gates_of_every_kind_squeeze_in_chunks_and_match_eager(gate):
    # the max squeeze and the other gates take the same chunked squeeze when frozen
    torch.manual_seed(0)
    net = se_inject.apply(_net().eval(), input_size=(3, 32, 32), **gate)
    eager = copy.deepcopy(net)
    x = torch.randn(2, 3, 32, 32)
    assert [k for k, _ in _squeezed_channels(net, x, freeze=True)] == ["chunks", "chunks", "mean"]
    se_inject.fuse(net, freeze=True)
    with torch.no_grad():
        torch.testing.assert_close(net(x), eager(x), rtol=1e-5, atol=1e-5)


def test_frozen_with_dynamic_shapes_one_graph_serves_every_size():
    # with symbolic sizes the squeeze is not split (deciding would guard on divisibility by
    # each count and compile again for each new size); outputs stay the eager model's
    net = se_inject.apply(_net().eval(), input_size=(3, 32, 32))
    eager = copy.deepcopy(net)
    graphs = []

    def capture(gm, example_inputs, **options):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    se_inject.fuse(net, freeze=True, dynamic=True, backend=capture)
    with torch.no_grad():
        for size in (32, 48, 26, 40, 36):
            x = torch.randn(2, 3, size, size)
            torch.testing.assert_close(net(x), eager(x), rtol=1e-5, atol=1e-5)
    assert len(graphs) == 1


@pytest.mark.parametrize("case", ["plain", "no-bias", "no-affine", "no-norm", "3x3", "stride-2",
                                  "training", "max", "not-frozen", "eager"])
def test_mean_through_linear_is_the_mean_of_the_norm_of_the_convolution(case):
    from se_inject.gate import FROZEN, mean_through_linear
    torch.manual_seed(0)
    k, stride = (3, 1) if case == "3x3" else (1, 2) if case == "stride-2" else (1, 1)
    conv = nn.Conv2d(8, 32, k, stride, bias=case != "no-bias").eval()
    bn = None if case == "no-norm" else nn.BatchNorm2d(32, affine=case != "no-affine").eval()
    if bn is not None:
        if bn.affine:
            randomize_norms(bn)
        else:
            bn.running_var.uniform_(0.5, 1.5)
        bn.train(case == "training")
    gate = se_inject.SEGate(32, spec=se_inject.GateSpec(squeeze="max" if case == "max" else "avg"))
    if case != "not-frozen":
        gate.__dict__[FROZEN] = True
    h = torch.randn(2, 8, 16, 16)

    def squeeze(h):
        s = mean_through_linear(gate, h, conv, bn)
        return torch.full((1,), float("nan")) if s is None else s

    torch._dynamo.reset()   # (one case's code could serve the next: new objects, reused ids)
    with torch.no_grad():
        s = (squeeze if case == "eager" else torch.compile(squeeze, fullgraph=True))(h)
        u = conv(h) if bn is None else bn(conv(h))
    if case in ("plain", "no-bias", "no-affine", "no-norm"):
        torch.testing.assert_close(s, u.mean((2, 3)), rtol=1e-5, atol=1e-6)
    else:                                                   # the gate squeezes u itself
        assert s.shape == (1,) and s.isnan().all()


def test_mean_through_linear_squeezes_through_the_layers_on_the_cpu_only():
    # on a GPU its extra kernels cost more than the pass over the gated tensor they save
    # (README, GPU figures). Frozen compiled code is stood in for by patching its check.
    from se_inject import gate as gate_module
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 32, 1).eval(), nn.BatchNorm2d(32).eval()
    randomize_norms(bn)
    gate, h = se_inject.SEGate(32), torch.randn(2, 8, 16, 16)
    with mock.patch.object(gate_module, "_compiled_frozen", return_value=True), torch.no_grad():
        s = gate_module.mean_through_linear(gate, h, conv, bn)
        torch.testing.assert_close(s, bn(conv(h)).mean((2, 3)), rtol=1e-5, atol=1e-6)
        conv.to("meta"), bn.to("meta")
        assert gate_module.mean_through_linear(gate, h.to("meta"), conv, bn) is None


class NetWithGraphBreak(Net):
    def forward(self, x):
        h = self.blocks(self.stem(x))
        torch._dynamo.graph_break()           # the head runs in a function Dynamo generates
        return self.head(h.mean((2, 3)))


def _call_and_get_code(model, x):
    # run_and_get_code resets Dynamo first; this keeps what it has compiled before
    codes = []
    with mock.patch.object(GraphLowering, "save_output_code", codes.append):
        return model(x), codes


@pytest.mark.parametrize("cls", [Net, NetWithGraphBreak])
def test_freezing_again_after_loading_new_weights_uses_them(cls):
    # frozen code keeps the weights it saw, and Dynamo's guards check only their identity:
    # fuse(freeze=True) again must compile with the new ones, also code resumed after a
    # graph break; and past Dynamo's limit of compiled versions per function (8; 2 here)
    torch.manual_seed(0)
    net = se_inject.apply(cls().eval(), input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        se_inject.fuse(net, freeze=True)
        net(x)
        for seed in range(4):
            torch.manual_seed(100 + seed)
            other = cls().eval()
            randomize_norms(other)
            se_inject.apply(other, input_size=(3, 32, 32))
            net.load_state_dict(other.state_dict())
            ref = other(x)
            if seed == 0:                               # frozen: the old weights
                assert (net(x) - ref).abs().max() > 1e-2
            se_inject.fuse(net, freeze=True)
            y, codes = _call_and_get_code(net, x)
            assert len(codes) == (1 if cls is Net else 2)   # compiled, not run eagerly
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_freezing_again_without_dynamos_internals_forgets_all_compiled_code(monkeypatch):
    # a torch without the internals that drop one model's code: freezing again must still
    # take the new weights, at the price of all compiled code
    import torch._dynamo.eval_frame as eval_frame
    monkeypatch.delattr(eval_frame, "reset_code")
    net = se_inject.apply(_net().eval(), input_size=(3, 32, 32))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        se_inject.fuse(net, freeze=True)
        net(x)
        torch.manual_seed(100)
        other = Net().eval()
        randomize_norms(other)
        se_inject.apply(other, input_size=(3, 32, 32))
        net.load_state_dict(other.state_dict())
        se_inject.fuse(net, freeze=True)
        y, codes = _call_and_get_code(net, x)
        assert len(codes) == 1
        torch.testing.assert_close(y, other(x), rtol=1e-5, atol=1e-5)


def test_fused_training_step_matches_eager():
    net = se_inject.apply(_net().train(), input_size=(3, 32, 32))
    eager = copy.deepcopy(net)
    x = torch.randn(4, 3, 32, 32)
    se_inject.fuse(net)
    net(x).square().mean().backward()
    eager(x).square().mean().backward()
    grads = dict(eager.named_parameters())
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("blocks.0.se_gate.fc1.weight", "blocks.1.se_gate.fc2.bias"):
        assert dict(net.named_parameters())[name].grad.abs().sum() > 0


def test_apply_fused_and_remove_unfuses():
    net = _net().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = net(x)
    se_inject.apply(net, input_size=(3, 32, 32), fused=True, init="identity")
    assert fused_settings(net) is not None
    with torch.no_grad():
        torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-5)
    se_inject.remove(net)
    assert fused_settings(net) is None and net._compiled_call_impl is None
    with torch.no_grad():
        assert torch.equal(net(x), before)
    with pytest.raises(se_inject.SEInjectError, match="fused must be True or False"):
        se_inject.apply(net, fused="yes")


class Mixer(nn.Module):
    """A layer kept whole (a leaf) with no shape shortcut: it runs during shape propagation."""

    def forward(self, x):
        return torch.tanh(x) * x.mean((2, 3), keepdim=True)


class MixedBlock(Block):
    def __init__(self, cin, cout, stride):
        super().__init__(cin, cout, stride)
        self.mix = Mixer()

    def forward(self, x):
        return super().forward(self.mix(x))


@pytest.mark.parametrize("sessions", [True, False], ids=["sessions", "no-sessions"])
def test_blocks_compiled_in_place_are_gated_and_their_compiled_code_runs_the_gates(
        sessions, monkeypatch):
    """Regional compilation (``block.compile()`` on each block, the model called once): fx
    cannot trace compiled code, so se-inject traces what each block compiled, gates it, and the
    next call compiles the gated blocks (Dynamo sees their new forwards). Their outputs are the
    gated model's run eagerly, and the gates act. A compiled layer kept whole runs its Python
    during shape propagation: apply() compiles nothing. ``no-sessions``: with tracing sessions
    off, as on torch 2.11, where fx's own patch of nn.Module would run the compiled code."""
    if not sessions:
        monkeypatch.setattr(se_inject.trace, "_FX_HOOKS", False)
    net = _net().eval()
    net.blocks[1] = MixedBlock(32, 64, 2)
    randomize_norms(net)
    for b in (*net.blocks, net.blocks[1].mix):
        b.compile()
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    with torch.no_grad():
        plain = net(x)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    se_inject.apply(net, input_size=(3, 32, 32), leaf_modules=[Mixer])
    assert torch._dynamo.utils.counters["frames"]["ok"] == frames  # nothing compiled for shapes
    assert [n for n, m in net.named_modules() if isinstance(m, se_inject.ChannelGate)] == \
        ["blocks.0.se_gate", "blocks.1.se_gate"]
    with torch.no_grad():
        for g in net.modules():
            if isinstance(g, se_inject.ChannelGate):
                g.fc2.bias.fill_(-3.0)
        out = net(x)
        for b in (*net.blocks, net.blocks[1].mix):
            b._compiled_call_impl = None
        eager = net(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    assert (eager - plain).abs().max() > 0.1 * plain.abs().max()


def test_a_part_wrapped_by_torch_compile_is_refused_by_name():
    net = _net().eval()
    net.blocks[1] = torch.compile(net.blocks[1])
    keys = list(net.state_dict())
    with pytest.raises(InvalidArgumentError,
                       match=r"blocks\.1 is torch.compile's wrapper \(OptimizedModule\) of a "
                             r"Block.*compile\(\) on it"):
        se_inject.apply(net, input_size=(3, 32, 32))
    assert list(net.state_dict()) == keys

@pytest.mark.slow
@pytest.mark.parametrize("freeze", [False, True])
def test_fused_resnet50_matches_eager(freeze):
    # (norms randomised: timm zero-initialises each bottleneck's last, whose output the gates
    # average, frozen for stages 1 and 2 through conv3)
    import timm
    net = timm.create_model("resnet50").eval()
    randomize_norms(net)
    net = se_inject.apply(net)
    eager = copy.deepcopy(net)
    x = torch.randn(2, 3, 224, 224)
    se_inject.fuse(net, freeze=freeze)
    with torch.no_grad():
        y, ref = net(x), eager(x)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.slow
def test_frozen_inception_v3_at_batch_8_matches_eager():
    # concatenations, batch > 1, every norm folded into its convolution
    import timm
    torch.manual_seed(0)
    net = se_inject.apply(timm.create_model("inception_v3").eval())
    eager = copy.deepcopy(net)
    x = torch.randn(8, 3, 299, 299)
    se_inject.fuse(net, freeze=True)
    with torch.no_grad():
        y, ref = net(x), eager(x)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()
