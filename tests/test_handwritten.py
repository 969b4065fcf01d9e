"""Hand-written CNNs: blocks inline in a top-level forward, inception from F.conv2d, and the
models that must be refused or left alone."""
import contextlib
import copy
import functools
import inspect
import io
import types
import warnings

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F

import se_inject
from se_inject.errors import InvalidArgumentError, NoSitesError, RewriteError, TraceError

try:  # as research code imports it: at the top of the module, by name or as a namespace
    import einops
    from einops import rearrange
except ImportError:
    einops = rearrange = None
from conftest import gates, paper_reference, randomize_norms, saturate
import handwritten
from handwritten import (HANDWRITTEN, BlockNet, BlurNet, CallerFlagNet, PerSampleBlock, DenseNetLike,
                         FunctionalInceptionNet, InlineResidualNet, TokenMixer, TrainingNet,
                         UntraceableNet)

# as torch has them (a trace swaps them while it runs)
_JIT_ISINSTANCE, _IS_TENSOR = torch.jit.isinstance, torch.is_tensor

# Models with blocks inline in their own forward warn about fx (asserted in one test below).
pytestmark = pytest.mark.filterwarnings("ignore:.*sit in the forward of the model itself")


@pytest.mark.parametrize("name", list(HANDWRITTEN))
def test_handwritten_gates_and_invariants(name):
    cls, expected, by_rule = HANDWRITTEN[name]
    model = cls().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
    keys = list(model.state_dict())
    p = se_inject.plan(model)
    assert len(p) == expected and p.by_rule() == by_rule
    se_inject.apply(model)
    assert type(model) is cls and len(gates(model)) == expected
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), y0)
        saturate(twin)
        assert torch.equal(twin(x), y0)
    model.train()
    model(x).sum().backward()
    assert all(g.fc1.weight.grad is not None for _, g in gates(model))
    se_inject.remove(model)
    model.eval()
    assert list(model.state_dict()) == keys


def test_inline_residuals_gate_the_branch_not_the_shortcut():
    """+, += and torch.add in the model's own forward; the third block has a projection."""
    model = InlineResidualNet().eval()
    p = se_inject.plan(model)  # one scope's sums, each its own name in the plan
    assert [(s.merge, s.entry) for s in p] == [("add", "relu"), ("add_1", "relu_2"),
                                               ("add_2", "relu_4")]
    with pytest.warns(UserWarning, match=r"trace nn.Sequential\(model\) instead"):
        se_inject.apply(model)
    names = [n for n, _ in gates(model)]
    assert names == ["se_gate", "se_gate_1", "se_gate_2"]      # on the model itself, in order
    g0, g1, g2 = model.se_gate, model.se_gate_1, model.se_gate_2
    assert (g0.channels, g1.channels, g2.channels) == (32, 32, 64)
    x = torch.randn(2, 3, 16, 16)
    m = model
    with torch.no_grad():                    # the forward written out with the paper's gate
        h = F.relu(m.stem(x))
        h = F.relu(h + paper_reference(m.a2(F.relu(m.a1(h))), g0))
        h = F.relu(paper_reference(m.b2(F.relu(m.b1(h))), g1) + h)
        h = F.relu(m.proj(h) + paper_reference(m.c2(F.relu(m.c1(h))), g2))
        expected = m.head(h.mean((2, 3)))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        traced = fx.symbolic_trace(torch.nn.Sequential(model))  # as the warning advises
        assert sum(1 for n in traced.graph.nodes if str(n.target).endswith(".fc1.weight")) == 3
        torch.testing.assert_close(traced(x), expected, rtol=1e-5, atol=1e-6)


def test_a_sum_in_place_gates_the_branch_and_keeps_the_sum():
    """``y.add_(x); relu(y)`` (and ``y.__iadd__(x); relu(y)``): fx traced the ReLU as reading
    the branch before the sum, so a gate on the branch scaled a tensor only the sum read, and
    the sum itself was lost."""
    from handwritten import InPlaceNet
    model = InPlaceNet().eval()
    randomize_norms(model)
    se_inject.apply(model)
    b, x = model.blocks, torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = F.relu(model.stem(x))
        h = F.relu(paper_reference(b[0].branch(h), b[0].se_gate) + h)
        h = F.relu(paper_reference(b[1].branch(h), b[1].se_gate) + h)
        h = h + paper_reference(F.relu(b[2].branch(h)), b[2].se_gate)
        h = F.relu(paper_reference(b[3].branch(h), b[3].se_gate) + h)
        torch.testing.assert_close(model(x), h.mean((2, 3)), rtol=1e-5, atol=1e-6)
    ref = InPlaceNet().eval()
    ref.load_state_dict(model.state_dict(), strict=False)
    twin = copy.deepcopy(model)
    se_inject.apply(ref, init="identity")
    with torch.no_grad():
        saturate(twin)
        y = twin(x)
        torch.testing.assert_close(ref(x), y, rtol=0, atol=1e-6)   # (both: the plain model)


_TWO_BRANCH_SUMS = {  # a block's shortcut and two residual branches, summed as people write it
    "x + a + b": lambda x, a, b: x + a + b,
    "a + x + b": lambda x, a, b: a + x + b,
    "sum([x, a, b])": lambda x, a, b: sum([x, a, b]),
    "torch.add(torch.add(x, a), b)": lambda x, a, b: torch.add(torch.add(x, a), b),
    "relu(x + a) + b": lambda x, a, b: F.relu(x + a) + b,
}


@pytest.mark.parametrize("how", list(_TWO_BRANCH_SUMS))
@pytest.mark.parametrize("init", ["paper", "identity"])
def test_a_sum_of_the_shortcut_and_two_branches_gates_each_branch_never_the_shortcut(how, init):
    """``relu(x + a(x) + b(x))`` is summed as ``(x + a) + b``: the second sum's operands are a
    partial sum that holds the shortcut and a branch. The gate goes on the branch, so each
    residual branch gets its own gate and the shortcut stays unscaled, as in the paper. (The
    partial sum had as many convolutions as the branch and won by its one extra node: the
    shortcut was scaled by a gate in every block, and a branch gated twice.)"""
    from handwritten import branch

    combine = _TWO_BRANCH_SUMS[how]

    class Block(torch.nn.Module):
        def __init__(self, c=32):
            super().__init__()
            self.a, self.b = branch(c), branch(c)

        def forward(self, x):
            return F.relu(combine(x, self.a(x), self.b(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 32, 3, padding=1)
            self.blocks = torch.nn.Sequential(Block(), Block())

        def forward(self, x):
            return self.blocks(self.stem(x)).mean((2, 3))

    torch.manual_seed(0)
    model = Net().eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = model(x)
    p = se_inject.plan(model)
    assert sorted(s.tensor for s in p) == ["blocks.0.a.4", "blocks.0.b.4", "blocks.1.a.4",
                                          "blocks.1.b.4"]
    se_inject.apply(model, init=init)
    gate = {s.tensor: dict(gates(model))[s.gate] for s in p}
    with torch.no_grad():
        if init == "identity":
            torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
            return
        h = model.stem(x)
        for i, blk in enumerate(model.blocks):
            a = paper_reference(blk.a(h), gate[f"blocks.{i}.a.4"])
            b = paper_reference(blk.b(h), gate[f"blocks.{i}.b.4"])
            h = F.relu(combine(h, a, b))
        torch.testing.assert_close(model(x), h.mean((2, 3)), rtol=1e-5, atol=1e-6)


_SUMMED_BRANCHES = {  # the branches summed first, then the shortcut: ResNeXt's form (a);
    # g: where the gate goes (nothing in the model's forward, the gate in the reference)
    "(a + b) + x": lambda x, bs, drop, g: g(bs[0] + bs[1]) + x,
    "x + (a + b)": lambda x, bs, drop, g: x + g(bs[0] + bs[1]),
    "x + drop_path(a + b)": lambda x, bs, drop, g: x + drop(g(bs[0] + bs[1])),
    "torch.add(x, torch.add(a, b))": lambda x, bs, drop, g: torch.add(x, g(torch.add(*bs[:2]))),
    "x + relu(a + b)": lambda x, bs, drop, g: x + g(F.relu(bs[0] + bs[1])),
    # their mean (Shake-Shake in eval mode), or their sum scaled by a weight
    "x + 0.5 * (a + b)": lambda x, bs, drop, g: x + g(0.5 * (bs[0] + bs[1])),
    "(a + b) * w + x": lambda x, bs, drop, g: g((bs[0] + bs[1]) * bs[4]) + x,
    # more branches, summed pairwise: ((a + b) + c)
    "a + b + c + x": lambda x, bs, drop, g: g(bs[0] + bs[1] + bs[2]) + x,
    "x + (a + b + c + d)": lambda x, bs, drop, g: x + g(bs[0] + bs[1] + bs[2] + bs[3]),
    "sum([a, b, c]) + x": lambda x, bs, drop, g: g(sum(bs[:3])) + x,
    "x + drop_path(a + (b + c))": lambda x, bs, drop, g: x + drop(g(bs[0] + (bs[1] + bs[2]))),
}


@pytest.mark.parametrize("how", list(_SUMMED_BRANCHES))
@pytest.mark.parametrize("init", ["paper", "identity"])
def test_branches_summed_before_the_shortcut_get_one_gate_on_their_sum(how, init):
    """``x + (a(x) + b(x))``: the block's residual branch is the sum of its branches, and the
    gate scales that sum, once, as SE-ResNeXt gates its aggregated branch. (The inner sum was
    a block of its own, which gated ``a``, and the block's gate then scaled ``a`` a second
    time; with more branches, ``((a + b) + c)``, the first partial sum was still one: k - 1
    gates for k branches.) So through a drop path, norms, activations and scales (``x + relu(a
    + b)``, ``x + 0.5 * (a + b)``), and from Python's ``sum()`` (its 0 added); behind a
    convolution the inner sum stays a block of its own."""
    from timm.layers import DropPath

    from handwritten import branch

    combine = _SUMMED_BRANCHES[how]

    class Block(torch.nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.branches = torch.nn.ModuleList(branch(c) for _ in range(4))
            self.drop = DropPath(0.2)

            self.scale = torch.nn.Parameter(torch.rand(c, 1, 1) + 0.5)

        def forward(self, x):
            branches = [*(b(x) for b in self.branches), self.scale]
            return F.relu(combine(x, branches, self.drop, lambda t: t))

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), Block(), Block()).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = model(x)
    p = se_inject.plan(model)
    assert [(s.block, s.gate) for s in p] == [("1", "1.se_gate"), ("2", "2.se_gate")]
    assert any("one gate per block" in s.reason for s in p.skipped)
    se_inject.apply(model, init=init)
    with torch.no_grad():
        if init == "identity":
            torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
            return
        h = model[0](x)
        for blk in model[1:]:
            h = F.relu(combine(h, [*(b(h) for b in blk.branches), blk.scale], blk.drop,
                               lambda t: paper_reference(t, blk.se_gate)))
        torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["add_", "__iadd__", "__add__", "__radd__"])
def test_a_sum_written_as_a_method_starts_as_the_identity_after_it(how):
    """A gate after the sum (position="post") starts as the identity through a sum written as
    a tensor method, in place or not, or by its operator's name: both operands are scaled."""
    from handwritten import branch, conv_bn

    class Block(torch.nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.branch, self.proj = branch(c), conv_bn(c, c, k=1)

        def forward(self, x):
            y = self.branch(x)
            s = getattr(y, how)(self.proj(x))
            return F.relu(y if how in ("add_", "__iadd__") else s)  # (in place: y holds it)

    model = torch.nn.Sequential(conv_bn(3, 16), torch.nn.ReLU(), Block(), Block()).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
    se_inject.apply(model, init="identity", position="post")
    assert [n for n, _ in gates(model)] == ["2.se_gate", "3.se_gate"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-6)


def test_a_layer_scale_multiplied_in_place_by_name_is_what_identity_initialisation_scales():
    """``y.__imul__(self.gamma)`` (a layer scale, in place, called by name) is a product with a
    parameter, which identity initialisation doubles as it doubles ``y * self.gamma``."""
    from handwritten import branch, conv_bn

    class Block(torch.nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.branch, self.gamma = branch(c), torch.nn.Parameter(torch.rand(c, 1, 1))

        def forward(self, x):
            y = self.branch(x)
            y.__imul__(self.gamma)
            return x + y

    model = torch.nn.Sequential(conv_bn(3, 16), Block(), Block()).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(x)
    gamma = model[1].gamma.detach().clone()
    se_inject.apply(model, init="identity")
    assert [n for n, _ in gates(model)] == ["1.se_gate", "2.se_gate"]
    torch.testing.assert_close(model[1].gamma.detach(), 2 * gamma)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain, rtol=0, atol=1e-6)


def test_functional_inception_gates_the_concat_output():
    model = FunctionalInceptionNet().eval()
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["mix1.se_gate", "mix2.se_gate"]
    x = torch.randn(2, 3, 16, 16)
    m = model
    with torch.no_grad():
        def mix(block, h):  # the class's own forward (ungated), then the paper's gate
            return paper_reference(type(block).forward(block, h), block.se_gate)
        expected = m.fc(torch.flatten(F.adaptive_avg_pool2d(
            mix(m.mix2, mix(m.mix1, F.relu(m.stem(x)))), 1), 1))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_block_module_gets_gate_before_the_sum_with_projection():
    model = BlockNet().eval()
    se_inject.apply(model)
    blk = model.blocks[2]
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        expected = F.relu(paper_reference(blk.body(x), blk.se_gate) + blk.short(x))
        torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-6)


def test_training_dependent_block_keeps_both_modes():
    model = TrainingNet()
    se_inject.apply(model)
    saturate(model)
    x = torch.randn(2, 3, 16, 16)
    ref = TrainingNet()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "se_gate" not in k})
    for mode in (True, False):
        model.train(mode)
        ref.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def _drop_connect(x, p, training):
    """efficientnet_pytorch's drop connect: in training, a sum of a number and random ones
    (one more sum in the block's forward than in eval mode, before its residual sum)."""
    if not training:
        return x
    keep = 1 - p
    r = keep + torch.rand([x.shape[0], 1, 1, 1], dtype=x.dtype, device=x.device)
    return x / keep * torch.floor(r)


class _DropConnectBlock(torch.nn.Module):
    def __init__(self, c=16):
        super().__init__()
        from handwritten import branch
        self.branch = branch(c)

    def forward(self, x, rate=0.2):
        return F.relu(x + _drop_connect(self.branch(x), rate, self.training))


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_block_with_one_more_sum_in_training_is_gated_at_its_merge_in_both_modes(mode):
    # The gate's place is the block's k-th sum in the mode the model was traced in; in the
    # other mode that sum was another one (the drop connect's number + random ones), and the
    # gated forward scaled the random tensor with a gate of the block's width (a model gated
    # in eval mode failed in training). The gate goes before the drop connect, which divides
    # the branch by its keep probability, so that its squeeze reads the branch's own values.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _DropConnectBlock(),
                                _DropConnectBlock())
    randomize_norms(model)
    model.train(mode == "train")
    se_inject.apply(model, input_size=(3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            torch.manual_seed(1)
            out = model(x)
            torch.manual_seed(1)
            h = model[0](x)
            for blk in model[1:]:
                u = paper_reference(blk.branch(h), blk.se_gate)
                h = F.relu(h + _drop_connect(u, 0.2, training))
        torch.testing.assert_close(out, h, rtol=1e-5, atol=1e-6)


class _SumPerMode(torch.nn.Module):
    def __init__(self, c=16):
        super().__init__()
        from handwritten import branch
        self.branch = branch(c)

    def forward(self, x):
        y = self.branch(x)
        return F.relu(torch.add(x, y) if self.training else x + y)


class _HalfOrBoth(torch.nn.Module):
    """An octave convolution's shape: a high- and a low-frequency output, the low one None
    where the layer has none (pytorchcv's OctResNet, its last unit)."""

    def __init__(self, c=16, low=False):
        super().__init__()
        self.high = torch.nn.Conv2d(c, c, 3, padding=1)
        self.low = torch.nn.Conv2d(c, c, 1) if low else None

    def forward(self, x):
        return self.high(x), (self.low(x) if self.low is not None else None)


class _NoSkip(torch.nn.Module):
    """A skip that is no skip: it returns None (pytorchcv's BreakBlock in an hourglass)."""

    def forward(self, x):
        return None


class _OptionalPartsBlock(torch.nn.Module):
    def __init__(self, how, c=16):
        super().__init__()
        self.part = _HalfOrBoth(c, low=False)
        self.skip = _NoSkip() if how == "none" else _HalfOrBoth(c, low=False)
        self.conv, self.bn = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)

    def forward(self, x):
        h, low = self.part(x)
        y = self.bn(self.conv(F.relu(h)))
        if low is not None:
            y = y + low
        s = self.skip(x)
        if isinstance(s, tuple):
            s = s[1]
        if s is not None:
            y = y + s
        return F.relu(x + y)


@pytest.mark.parametrize("how", ["none", "tuple"])
def test_a_block_whose_layers_return_none_is_gated_as_the_model_runs_it(how):
    # A trace of the block alone called its layers whole and saw a tensor where they returned
    # None: its generated forward summed the missing low-frequency half and the missing skip,
    # and the gated model failed when it ran (None + a tensor).
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _OptionalPartsBlock(how),
                                _OptionalPartsBlock(how)).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = model(x)
    p = se_inject.plan(model, input_size=(3, 16, 16))
    assert [(s.gate, s.tensor) for s in p] == [("1.se_gate", "1.bn"), ("2.se_gate", "2.bn")]
    se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    with torch.no_grad():
        torch.testing.assert_close(model(x), y0, rtol=0, atol=0)
        for _, g in gates(model):
            g.fc2.bias.normal_()  # gates that act
        h = model[0](x)
        for blk in model[1:]:
            u = blk.bn(blk.conv(F.relu(blk.part.high(h))))
            h = F.relu(h + paper_reference(u, blk.se_gate))
        torch.testing.assert_close(model(x), h, rtol=1e-5, atol=1e-6)


class _Parts(torch.nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.high = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return types.SimpleNamespace(high=self.high(x), low=None)


class _NamespaceBlock(torch.nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.part = _Parts(c)
        self.conv, self.bn = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.part(x)
        y = self.bn(self.conv(F.relu(out.high)))
        if out.low is not None:
            y = y + out.low
        return F.relu(x + y)


class _ResDropBlock(torch.nn.Module):
    """pytorchcv's ResDrop unit: in training, the branch is kept or dropped by a number read
    from a random tensor (float(b)), which no trace can hold."""

    def __init__(self, c=16):
        super().__init__()
        from handwritten import branch
        self.branch = branch(c)

    def forward(self, x):
        y = self.branch(x)
        if self.training:
            b = torch.bernoulli(torch.full((1,), 0.8, dtype=x.dtype, device=x.device))
            y = float(b) / 0.8 * y
        return F.relu(x + y)


@pytest.mark.parametrize("block,told", [
    # its merge is another op in training mode (torch.add) than in eval mode (+)
    (_SumPerMode, r"computes otherwise in training and in eval mode .*its merge `add` \(#0\), "
     r"gated in the mode the model was in, matches no op\(s\) in training mode"),
    # a layer's output of a kind a trace of the block alone cannot mirror (an object with a
    # None in it): the block alone sums what the model never sums
    (_NamespaceBlock, r"computes otherwise traced alone than in the model \(alone: with "
     r"`add`\): a layer it calls returns something other than tensors"),
    # its training-mode part, which the model's trace (eval mode) did not run, cannot be
    # traced: the refusal said the forward needed arguments only its caller knows
    (_ResDropBlock, r"could not be traced in training mode, which its forward reads "
     r"\(self.training\) and the model's trace, in the mode the model is in, did not run: "
     r"TypeError"),
], ids=["merge-per-mode", "unmirrored-output", "other-mode-untraceable"])
def test_a_block_whose_trace_alone_would_compute_otherwise_is_refused(block, told):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), block()).eval()
    keys = list(model.state_dict())
    with pytest.raises(RewriteError, match=rf"`1` \({block.__name__}\) {told}"):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert list(model.state_dict()) == keys and "forward" not in model[1].__dict__


def test_compile_runs_gated_models():
    for cls in (InlineResidualNet, BlockNet):
        model = se_inject.apply(cls().eval())
        x = torch.randn(2, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-5)


def test_model_level_gates_after_second_apply_with_more_rules():
    """A second apply() adds only what is new, and never a second gate on the same block."""
    model = InlineResidualNet().eval()
    se_inject.apply(model, rules=["residual"])
    with pytest.warns(UserWarning):
        se_inject.apply(model, rules=["residual", "inception"])
    assert len(gates(model)) == 3


# --- what is not a block ----------------------------------------------------------------

def test_dense_connections_are_not_inception_modules():
    p = se_inject.plan(DenseNetLike())
    assert len(p) == 0
    assert any("dense connection" in s.reason for s in p.skipped)
    with pytest.raises(NoSitesError, match="dense connection"):
        se_inject.apply(DenseNetLike())


def test_token_sums_are_not_blocks():
    model = TokenMixer()
    keys = list(model.state_dict())
    with pytest.raises(NoSitesError, match="no residual or inception-style block"):
        se_inject.apply(model)
    assert list(model.state_dict()) == keys and "forward" not in model.__dict__


def test_untraceable_model_names_the_module_and_the_leaf_fix():
    model = UntraceableNet()
    with pytest.raises(TraceError) as err:
        se_inject.apply(model)
    msg = str(err.value)
    assert "`odd` (PerSampleBlock)" in msg and "leaf_modules=[PerSampleBlock]" in msg
    assert not gates(model)
    # the trace that failed put back what it swaps while it runs
    assert "isinstance" not in vars(handwritten) and torch.jit.isinstance is _JIT_ISINSTANCE
    assert torch.is_tensor is _IS_TENSOR
    se_inject.apply(model, leaf_modules=[PerSampleBlock])  # the rest still gets its gate
    assert [n for n, _ in gates(model)] == ["res.se_gate"]


def test_a_layer_with_nothing_to_gate_that_fx_cannot_trace_is_called_whole():
    """Before, fx's failure in ClampedBlur refused the whole model. It holds no parameters,
    buffers or layers, so nothing in it could be gated: it is called whole, and the blocks
    around it get their gates and compute what they computed."""
    model = BlurNet().eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model, init="identity")
    assert [n for n, _ in gates(model)] == ["blocks.0.se_gate", "blocks.1.se_gate"]
    for size in (16, 2):  # on a 2 x 2 map the layer takes its other branch
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_a_layer_that_branches_on_its_input_size_with_a_parameter_is_traced_at_it():
    """One instance of ClampedBlur has a parameter of its own, so the class is not called
    whole; its branch reads the map's size, which the trace takes at the input size. The
    blocks around it run the layer as a layer, so on a 2 x 2 map it takes its other branch."""
    model = BlurNet(weights=(False, True)).eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model, init="identity")
    assert [n for n, _ in gates(model)] == ["blocks.0.se_gate", "blocks.1.se_gate"]
    for size in (16, 2):
        x = torch.randn(2, 3, size, size)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_a_gate_before_a_container_the_forward_calls_feeds_it():
    """DeepLabV3's ASPP: the gate on the concatenation must feed the projection, an
    nn.Sequential the forward calls. The generated forward called the gate and passed the
    ungated concatenation to the projection (the gate computed and dropped), and identity
    initialisation was refused for the size read from the input's shape."""
    from handwritten import ASPPNet
    model = ASPPNet().eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model)
    m, x = model.aspp, torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        cat = torch.cat([m.convs[0](x), m.convs[1](x),
                         F.interpolate(m.convs[2](x), size=(8, 8), mode="bilinear",
                                       align_corners=False)], dim=1)
        torch.testing.assert_close(m(x), m.project(paper_reference(cat, m.se_gate)),
                                   rtol=1e-5, atol=1e-6)
    se_inject.remove(model)
    se_inject.apply(model, init="identity")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_a_generated_forward_that_passes_a_gate_by_is_refused(monkeypatch):
    """The check behind the fix above: should any rewrite leave a gate's output unread, the
    block is refused and the model left as it was, rather than gated with a dead gate."""
    import se_inject.rewrite as rewrite
    from handwritten import ASPPNet
    whole = rewrite._call_containers_whole

    def pass_gates_by(graph):
        for node in list(graph.nodes):
            if node.op == "call_module" and node.target.startswith(rewrite.GATE_PREFIX):
                node.replace_all_uses_with(node.args[0])
        return whole(graph)

    monkeypatch.setattr(rewrite, "_call_containers_whole", pass_gates_by)
    model = ASPPNet()
    keys = list(model.state_dict())
    with pytest.raises(RewriteError, match=r"`aspp` \(ASPPLike\): the forward generated for "
                                           r"its gate `se_gate` does not read the gate's output"):
        se_inject.apply(model)
    assert list(model.state_dict()) == keys and not gates(model)
    assert "forward" not in model.aspp.__dict__


def test_failure_in_a_later_block_leaves_earlier_blocks_untouched():
    model = CallerFlagNet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RewriteError, match="`flag` \\(FlagBlock\\) is called from 2 places "
                                           "with different arguments"):
        se_inject.apply(model)
    assert not gates(model)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == list(before)
    x = torch.randn(2, 3, 16, 16)
    traced = fx.symbolic_trace(model)  # the model still works exactly as before
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


TWO_BRANCH_RULE = """\
schema: 1
name: two-branch
summary: residual blocks whose shortcut is a projection
match: {merge: add, operands: 2, equal_shapes: true, min_branches_with_conv: 2}
gate: {at: branch}
"""


def test_new_site_in_a_block_already_rewritten(tmp_path):
    """The first apply rewrites the model's forward (its torch.add becomes an in-place sum);
    a second apply with a wider rule must still find the remaining block and only that one."""
    from handwritten import ProjectionFirstNet
    rule = tmp_path / "two.yaml"
    rule.write_text(TWO_BRANCH_RULE)
    model = ProjectionFirstNet().eval()
    se_inject.apply(model, rules=[str(rule)])
    assert [n for n, _ in gates(model)] == ["se_gate"]
    p = se_inject.plan(model, rules=["residual"])
    assert len(p) == 1 and p[0].gate == "se_gate_1"
    assert [s.reason for s in p.skipped] == ["already gated"]
    se_inject.apply(model, rules=["residual"])
    m, x = model, torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = F.relu(m.stem(x))
        h = F.relu(m.proj(h) + paper_reference(m.p2(F.relu(m.p1(h))), m.se_gate))
        h = F.relu(h + paper_reference(m.i2(F.relu(m.i1(h))), m.se_gate_1))
        torch.testing.assert_close(model(x), h.mean((2, 3)), rtol=1e-5, atol=1e-6)
    se_inject.remove(model)
    assert not gates(model) and "forward" not in model.__dict__


def test_block_called_with_its_parent_arguments():
    """A shortcut left to its default, or passed, and a flag: each block gated as it is called."""
    from handwritten import ShortcutArgNet
    model = ShortcutArgNet().eval()
    se_inject.apply(model)
    m, x = model, torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = F.relu(m.stem(x))
        h = F.relu(paper_reference(m.a.conv(h), m.a.se_gate) + h)
        h = paper_reference(m.b.conv(h), m.b.se_gate) + m.down(h)
        torch.testing.assert_close(model(x), h.mean((2, 3)), rtol=1e-5, atol=1e-6)
        with pytest.raises(se_inject.SEInjectError, match="relu = False"):
            m.b(h, h, relu=True)  # not how the parent calls it: refused, not silently wrong


def test_block_taking_a_list_of_tensors():
    from handwritten import BranchListNet
    model = BranchListNet().eval()
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["block.se_gate", "block.se_gate_1"]
    blk, x = model.block, torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        hi, lo = blk([x, x[:, :, ::2, ::2]])
        torch.testing.assert_close(hi, x + paper_reference(blk.convs[0](x), blk.se_gate))


class _Branched(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from handwritten import branch
        self.branch = branch(16)


class _DictBlock(_Branched):
    def forward(self, feats: dict):
        x, y = feats["x"], self.branch(feats["x"])
        for key, extra in feats.items():  # the trace follows the keys it was given
            if key != "x":
                y = y + extra
        return F.relu(x + y)


class _StarBlock(_Branched):
    def forward(self, *args):
        return F.relu(args[0] + self.branch(args[0]))


class _KeywordBlock(_Branched):
    def forward(self, x, **kw):
        return F.relu(x + kw["scale"] * self.branch(x))


class _StringBlock(_Branched):
    def forward(self, x, pool: str = "it's max"):
        y = self.branch(x)
        if pool == "it's max":
            y = F.max_pool2d(y, 3, 1, 1)
        return F.relu(x + y)


class _NamesBlock(_Branched):
    def forward(self, x, _body=None, _cls: float = 1.0, _mismatch="m", _c3=None):
        return F.relu(x + _cls * self.branch(x))  # (names the generated code once used)


_ARGUMENT_CALLS = {  # the block; how its parent calls it; a call the trace did not follow;
    # what the traced call computes
    "dict": (_DictBlock, lambda b, h: b({"x": h}), lambda b, h: b({"x": h, "extra": h}),
             lambda b, h, gate: F.relu(h + gate(b.branch(h)))),
    "star": (_StarBlock, lambda b, h: b(h), lambda b, h: b(h, h),
             lambda b, h, gate: F.relu(h + gate(b.branch(h)))),
    "keywords": (_KeywordBlock, lambda b, h: b(h, scale=0.5),
                 lambda b, h: b(h, scale=0.5, shift=1.0),
                 lambda b, h, gate: F.relu(h + 0.5 * gate(b.branch(h)))),
    "string": (_StringBlock, lambda b, h: b(h, pool="it's max"), lambda b, h: b(h, pool="avg"),
               lambda b, h, gate: F.relu(h + gate(F.max_pool2d(b.branch(h), 3, 1, 1)))),
    "names": (_NamesBlock, lambda b, h: b(h, _cls=0.5), lambda b, h: b(h, _cls=2.0),
              lambda b, h, gate: F.relu(h + 0.5 * gate(b.branch(h)))),
}


class _Calling(torch.nn.Module):
    def __init__(self, block, call):
        super().__init__()
        from handwritten import conv_bn
        self.stem, self.block, self.call = conv_bn(3, 16), block, call

    def forward(self, x):
        return self.call(self.block, torch.relu(self.stem(x)))


@pytest.mark.parametrize("how", list(_ARGUMENT_CALLS))
def test_a_block_taking_a_dict_starred_arguments_or_a_quoted_string_is_gated_as_called(how):
    """The generated forward takes the block's arguments as its forward does (``*args`` and
    ``**kwargs`` were refused, a string constant holding a quote made apply() fail with a
    SyntaxError, and a parameter named ``_body`` stood for the traced code, which the gated
    block then failed to call), and refuses a call the trace did not follow (a dict with
    another key was computed without it)."""
    cls, call, other, formula = _ARGUMENT_CALLS[how]
    model = _Calling(cls(), call).eval()
    randomize_norms(model)
    se_inject.apply(model, input_size=(3, 16, 16))
    assert [n for n, _ in gates(model)] == ["block.se_gate"]
    b, h = model.block, torch.relu(model.stem(torch.randn(2, 3, 16, 16)))
    with torch.no_grad():
        expected = formula(b, h, lambda u: paper_reference(u, b.se_gate))
        torch.testing.assert_close(call(b, h), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(RewriteError, match="traced for calls with"):
            other(b, h)


def test_blocks_of_one_class_with_different_children_get_their_own_forward():
    from handwritten import OptionalAttnNet
    model = OptionalAttnNet().eval()
    se_inject.apply(model)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        for blk in model.blocks:
            y = blk.conv1(x)
            if blk.attn is not None:
                y = y * blk.attn(y)
            expected = F.relu(paper_reference(blk.conv2(y), blk.se_gate) + x)
            torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-6)


def test_blocks_sharing_a_forward_each_take_a_later_gate(tmp_path):
    """Two blocks of one class share one rewritten forward; a second apply must still find
    the remaining site in each of them."""
    from handwritten import TwoMergeNet
    rule = tmp_path / "two.yaml"
    rule.write_text(TWO_BRANCH_RULE)
    model = TwoMergeNet().eval()
    se_inject.apply(model, rules=[str(rule)])
    assert model.blocks[0].forward.__func__ is model.blocks[1].forward.__func__
    se_inject.apply(model, rules=["residual"])
    assert [n for n, _ in gates(model)] == ["blocks.0.se_gate", "blocks.0.se_gate_1",
                                            "blocks.1.se_gate", "blocks.1.se_gate_1"]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        for b in model.blocks:
            h = F.relu(b.proj(x) + paper_reference(b.p2(F.relu(b.p1(x))), b.se_gate))
            expected = F.relu(h + paper_reference(b.i2(F.relu(b.i1(h))), b.se_gate_1))
            torch.testing.assert_close(b(x), expected, rtol=1e-5, atol=1e-6)


def _saturated_equals_plain(model, cls, x) -> None:
    """With its gates saturated, ``model`` computes what a plain ``cls`` with its weights does."""
    saturate(model)
    ref = cls().eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if "se_gate" not in k})
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_shape_propagation_leaves_no_meta_tensors_in_the_model():
    """A leaf that caches a tensor in eval mode runs on meta tensors while apply() learns the
    shapes; its cache must be as it was afterwards, and the gated model's outputs the plain
    model's with its gates saturated."""
    from handwritten import CachingBlock, CachingLeafNet
    model = CachingLeafNet().eval()
    x = torch.randn(2, 3, 16, 16)
    p = se_inject.plan(model, leaf_modules=[CachingBlock])
    assert [s.block for s in p.sites] == ["res"]
    assert model.cached.cache == {}
    se_inject.apply(model, leaf_modules=[CachingBlock])
    assert model.cached.cache == {}
    _saturated_equals_plain(model, CachingLeafNet, x)
    assert model.cached.cache["bias"].device.type == "cpu"  # filled by the run, on the CPU


def test_tracing_leaves_no_traced_values_in_the_model():
    """A block that caches a tensor in eval mode must not keep a tracing proxy afterwards."""
    from handwritten import CachingNet
    model = CachingNet().eval()
    x = torch.randn(2, 3, 16, 16)
    se_inject.plan(model)
    assert model.block.cache == {}
    se_inject.apply(model)
    assert model.block.cache == {}
    _saturated_equals_plain(model, CachingNet, x)


class _Collector:
    """A forward hook's owner that keeps what it saw in a list of its own."""

    def __init__(self):
        self.seen = []

    def hook(self, module, args, output):
        self.seen.append(output)


def test_tracing_leaves_no_traced_values_in_the_objects_hooks_belong_to():
    """timm's features_only models with ``feature_cls="hook"`` collect their maps with forward
    hooks, methods of an object (``model.hooks``) that files each output in a dict of its own,
    keyed by device. Tracing runs the hooks on traced values and shape propagation on meta
    tensors: the object held both afterwards, and the model no longer deep-copied ("'node'
    not in new_dict during proxy unpickling"). It is as it was after plan() and apply(), the
    gated model copies, and with identity gates it returns the plain model's maps bit for bit;
    a hook's owner filling a list is put back too."""
    import timm

    def make():
        torch.manual_seed(0)
        return timm.create_model("resnet18", features_only=True, feature_cls="hook").eval()

    model, plain, x = make(), make(), torch.randn(2, 3, 64, 64)
    randomize_norms(plain)
    model.load_state_dict(plain.state_dict())
    collector = _Collector()
    model.body.layer2.register_forward_hook(collector.hook)
    se_inject.plan(model)
    assert dict(model.hooks._feature_outputs) == {} and collector.seen == []
    se_inject.apply(model, init="identity")
    assert dict(model.hooks._feature_outputs) == {} and collector.seen == []
    assert len(gates(model)) == 8
    for m in (model, copy.deepcopy(model)):
        with torch.no_grad():
            out, ref = m(x), plain(x)
        assert len(out) == len(ref) == 5 and all(map(torch.equal, out, ref))
    assert len(collector.seen) == 1 and collector.seen[0].device.type == "cpu"


def test_tracing_takes_back_attributes_a_forward_sets_or_replaces():
    """A forward that stores a traced value in a new attribute, or in place of an existing one,
    leaves the model as it was before apply() traced it (a list it only read is kept as is).
    Values computed from the input and kept are state a generated forward would not keep:
    the block is refused (it was gated, and stopped keeping them)."""
    from handwritten import CachingNet, branch

    class Stashing(torch.nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.conv = branch(c)
            self.last = None
            self.names = ["a"]

        def forward(self, x):
            y = x + self.conv(x)
            self.last = y          # replaces None
            self.seen = y.mean()   # a new attribute
            return y + len(self.names)

    model = CachingNet().eval()
    model.block = Stashing()
    names = model.block.names
    with pytest.raises(RewriteError, match=r"`block` \(Stashing\) changes its own state when "
                                           r"it runs \(`last`, `seen`\)"):
        se_inject.apply(model)
    assert not gates(model)
    assert model.block.last is None and "seen" not in model.block.__dict__
    assert model.block.names is names and names == ["a"]


class _MeanShiftSR(torch.nn.Module):
    """A super-resolution net as EDSR, RCAN and SwinIR write it (BasicSR): the data mean, a
    plain tensor attribute, recast to the input's type at every call, subtracted before the
    body and added back after it; the body's global residual sits in this forward."""

    def __init__(self, recast: str):
        super().__init__()
        self.recast = recast
        self.mean = torch.tensor([0.45, 0.44, 0.40]).view(1, 3, 1, 1)
        self.head = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.body = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1),
                                        torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1))
        self.tail = torch.nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        if self.recast == "type_as":
            self.mean = self.mean.type_as(x)
        elif self.recast == "to_tensor":
            self.mean = self.mean.to(x)
        elif self.recast == "to_dtype_device":
            self.mean = self.mean.to(device=x.device, dtype=x.dtype)
        else:  # the input's own statistics, kept: a value of the input
            self.mean = x.mean((0, 2, 3), keepdim=True).type_as(self.mean)
        h = self.head(x - self.mean)
        res = self.body(h)
        res += h
        return self.tail(res) + self.mean


@pytest.mark.parametrize("recast", ["type_as", "to_tensor", "to_dtype_device"])
def test_a_constant_recast_to_the_inputs_type_is_not_state_the_forward_keeps(recast):
    """``self.mean = self.mean.type_as(x)`` takes only the input's dtype and device: the value
    is the constant's, which the generated forward casts again at every call. It was refused as
    a value computed from the input and kept, and with it every gate of EDSR."""
    torch.manual_seed(0)
    model = _MeanShiftSR(recast).eval()
    mean, x = model.mean, torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="forward of the model itself"):
        se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    assert [n for n, _ in gates(model)] == ["se_gate"]
    assert torch.equal(model.mean, mean)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        model.double()  # the attribute is no buffer: only the forward's cast follows the input
        out = model(x.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), ref, rtol=1e-5, atol=1e-5)


def test_a_statistic_of_the_input_kept_in_place_of_a_constant_is_still_refused():
    model = _MeanShiftSR("statistic").eval()
    with pytest.raises(RewriteError, match=r"`\(model\)` \(_MeanShiftSR\) changes its own "
                                           r"state when it runs \(`mean`\)"):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert not gates(model) and model.mean.shape == (1, 3, 1, 1)


@pytest.mark.parametrize("extra", ["keyword_only", "var_keyword", "var_positional"])
def test_keyword_only_and_variadic_model_arguments_keep_their_defaults(extra):
    """A forward with keyword-only parameters, **kwargs or *args (a backbone wrapper with
    ``return_features=False``): traced as ``model(x)`` calls it, each at its default. fx's
    own placeholders for them made the flag a traced value (and the trace fail on ``if``)."""
    from handwritten import BlockNet

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = BlockNet()

        def features(self, x):
            return self.net.blocks(F.relu(self.net.stem(x)))

        if extra == "keyword_only":
            def forward(self, x, *, return_features=False):
                f = self.features(x)
                return f if return_features else self.net.fc(f.mean((2, 3)))
        elif extra == "var_keyword":
            def forward(self, x, **options):
                f = self.features(x)
                return f if options.get("return_features") else self.net.fc(f.mean((2, 3)))
        else:
            def forward(self, x, *more):
                f = self.features(x)
                return f if more else self.net.fc(f.mean((2, 3)))

    model = Wrapper().eval()
    randomize_norms(model)
    ref, x = copy.deepcopy(model), torch.randn(2, 3, 16, 16)
    se_inject.apply(model, input_size=(3, 16, 16))
    assert [n for n, _ in gates(model)] == [f"net.blocks.{i}.se_gate" for i in range(3)]
    saturate(model)                                   # gates that pass everything through
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        features = model(x, True) if extra == "var_positional" else \
            model(x, return_features=True)
        assert features.shape == (2, 64, 8, 8) and torch.equal(features, ref.features(x))


def test_optional_model_arguments_keep_their_defaults():
    from handwritten import OptionalMaskNet
    model = OptionalMaskNet().eval()
    with pytest.warns(UserWarning, match="sit in the forward of the model itself"):
        se_inject.apply(model)
    m, x = model, torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        h = F.relu(m.stem(x))
        expected = F.relu(h + paper_reference(m.c2(F.relu(m.c1(h))), m.se_gate)).mean((2, 3))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
        with pytest.raises(se_inject.SEInjectError, match="mask = None"):
            model(x, torch.ones(1, 16, 1, 1))


def test_channels_last_branch_is_gated_on_its_channels():
    from handwritten import ChannelsLastNet
    model = se_inject.apply(ChannelsLastNet().eval())
    assert [(n, g.channels) for n, g in gates(model)] == [("blocks.0.se_gate", 16),
                                                          ("blocks.1.se_gate", 16)]
    blk, x = model.blocks[0], torch.randn(2, 16, 6, 6)
    with torch.no_grad():
        y = blk.fc2(F.gelu(blk.fc1(blk.norm(blk.dw(x).permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        torch.testing.assert_close(blk(x), x + paper_reference(y, blk.se_gate), rtol=1e-5,
                                   atol=1e-6)


def test_channels_last_blocks_are_gated_on_their_last_dimension():
    """MambaOut's residual blocks read and return (N, H, W, C) maps: the gate squeezes over H
    and W and scales C, on the channel-first view, and the map leaves in the layout it came in."""
    from handwritten import ChannelsLastResidualNet
    model = ChannelsLastResidualNet().eval()  # (the invariants: HANDWRITTEN, above)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y0 = model(x)
    p = se_inject.plan(model)
    assert [(s.block, s.rule, s.channels) for s in p] == [
        ("blocks.0", "residual", 16), ("blocks.1", "residual", 16), ("mixed", "inception", 32)]
    twin = copy.deepcopy(model)
    se_inject.apply(model)
    m, t = model, torch.randn(2, 8, 8, 16)
    with torch.no_grad():
        for blk in m.blocks:
            g, c = blk.fc1(blk.norm(t)).chunk(2, dim=-1)
            c = blk.conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            u = blk.fc2(F.gelu(g) * c)
            expected = t + paper_reference(u.permute(0, 3, 1, 2), blk.se_gate).permute(0, 2, 3, 1)
            out = blk(t)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
            assert out.shape == t.shape and out.is_contiguous()
        u = t.permute(0, 3, 1, 2)
        cat = torch.cat([m.mixed.a(u), m.mixed.b(u)], 1)
        expected = paper_reference(cat, m.mixed.se_gate).permute(0, 2, 3, 1)
        torch.testing.assert_close(m.mixed(t), expected, rtol=1e-5, atol=1e-6)
    se_inject.apply(twin, init="identity")
    with torch.no_grad():
        torch.testing.assert_close(twin(x), y0, rtol=1e-5, atol=1e-6)


def test_channels_last_token_sums_are_not_feature_maps():
    from handwritten import TokensLastNet
    with pytest.raises(NoSitesError, match="no residual or inception-style block"):
        se_inject.apply(TokensLastNet())


def test_a_map_added_to_itself_or_to_its_pooling_is_no_block():
    """``y + y`` (a block whose shortcut is, at stride 2, its own output, as a CIFAR
    EfficientNet writes ``out + (self.shortcut(x) if self.stride == 1 else out)``) and
    ``y + pool(y)``: no branch holds a convolution, and the plan says so."""
    from handwritten import conv_bn

    class Doubling(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(3, 8), conv_bn(8, 8)

        def forward(self, x):
            y = self.a(x)
            y = y + y
            z = self.b(F.relu(y))
            return (z + F.avg_pool2d(z, 3, 1, 1)).mean((2, 3))

    p = se_inject.plan(Doubling())
    assert not p.sites
    assert [s.reason for s in p.skipped] == ["no branch with a convolution"] * 2


def test_a_selective_kernel_keeps_its_own_gates_and_a_sum_pooled_into_the_head_is_a_block(
        tmp_path):
    """SKNet's unit sums its branches, ``u = a + b``, only to pool u into the attention that
    weighs a and b: a sum of its channel gates' squeeze, not a block (it got a gate on a
    inside the unit). Its bottleneck holds those gates and keeps just them. A residual sum
    pooled straight into the classifier is a block; with `existing_gate: allow` the unit's
    sum is gated as before."""
    from handwritten import SKNet
    model = SKNet().eval()
    p = se_inject.plan(model)
    assert [(s.block, s.tensor) for s in p] == [("", "last.4")]
    reasons = {s.merge: s.reason for s in p.skipped}
    assert all(reasons[f"blocks.{i}.sk.add"].startswith("a sum read only by the squeeze")
               for i in (0, 1))
    assert all(reasons[f"blocks.{i}.{m}"] == "the block already holds a channel gate (SE, ECA...)"
               for i in (0, 1) for m in ("sk.add_1", "add"))
    text = (se_inject.rules.builtin_rules_dir() / "residual.yaml").read_text()
    rule = tmp_path / "allow.yaml"
    rule.write_text(text.replace("existing_gate: skip", "existing_gate: allow"))
    assert {"blocks.0.sk.a.2", "blocks.1.sk.a.2"} <= {
        s.tensor for s in se_inject.plan(model, rules=[rule])}


def test_a_sum_of_broadcast_attention_maps_is_no_block():
    """BAM sums its channel attention, (N, C, 1, 1), and its spatial attention, (N, 1, H, W),
    each expanded to the map's size: a sum of equal shapes with a convolution in one branch,
    which got a gate on the spatial attention's logits. Neither operand is a feature map."""
    from handwritten import BAMNet
    p = se_inject.plan(BAMNet())
    assert [s.tensor for s in p] == ["b1.4", "b2.4"]
    reasons = {s.merge: s.reason for s in p.skipped}
    assert reasons["bam.add"] == (
        "an operand broadcasts one value per channel or per pixel to the map's size (an "
        "attention map's logits, as BAM sums its channel and spatial attention), not a "
        "feature map")


def test_partial_residual_gates_the_whole_branch_and_a_split_is_no_inception():
    from handwritten import SplitNet
    model = SplitNet().eval()
    p = se_inject.plan(model)
    assert [(s.rule, s.channels) for s in p] == [("residual", 24)]  # all 24 channels, not 16
    reasons = {s.merge: s.reason for s in p.skipped}
    assert "share layers (a channel split" in reasons["partial.cat"]
    assert reasons["split.cat"] == "fewer than 2 branches with a convolution"  # one conv side
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["partial.se_gate"]  # not inside the Sequential conv2
    assert len(model.partial.conv2) == 2
    blk, x = model.partial, torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        y = paper_reference(blk.conv2(F.relu(blk.conv1(x))), blk.se_gate)
        torch.testing.assert_close(blk(x), torch.cat([y[:, :16] + x, y[:, 16:]], 1),
                                   rtol=1e-5, atol=1e-6)


def test_shufflenet_v2_downsampling_units_are_two_branch_modules():
    """torchvision's ShuffleNetV2: a stride-2 unit concatenates two conv branches of its input
    (an inception-style module, gated after the concatenation, before the channel shuffle); a
    stride-1 unit concatenates an untouched channel split with one branch (not a module)."""
    tv = pytest.importorskip("torchvision")
    from torchvision.models.shufflenetv2 import InvertedResidual, channel_shuffle
    model = tv.models.shufflenet_v2_x0_5().eval()
    units = {n: m for n, m in model.named_modules() if isinstance(m, InvertedResidual)}
    two_branch = [n for n, m in units.items() if len(m.branch1) > 0]
    assert len(two_branch) == 3 and len(units) == 16                      # from the structure
    p = se_inject.plan(model)
    assert [(s.block, s.rule) for s in p] == [(n, "inception") for n in two_branch]
    assert [s.channels for s in p] == [units[n].branch2[-2].num_features * 2 for n in two_branch]
    # the stride-1 units are left out as channel splits, half their channels untouched (the
    # shuffle before each of them, view, transpose and view, keeps its maps' channels first)
    assert [s.reason for s in p.skipped] == ["fewer than 2 branches with a convolution"] * 13
    se_inject.apply(model)
    for name, unit in units.items():
        x = torch.randn(2, unit.branch2[0].in_channels * (1 if unit.stride > 1 else 2), 16, 16)
        with torch.no_grad():
            got = unit(x)
            if name in two_branch:  # Eq. 2-4 on the concatenation, then the shuffle
                u = torch.cat((unit.branch1(x), unit.branch2(x)), dim=1)
                want = channel_shuffle(paper_reference(u, unit.se_gate), 2)
            else:
                a, b = x.chunk(2, dim=1)
                want = channel_shuffle(torch.cat((a, unit.branch2(b)), dim=1), 2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class _ShuffledThenBlock(torch.nn.Module):
    """A channel shuffle (ShuffleNet's: view to groups, swap them, view back), then a residual
    block on the shuffled map, written with each of the ops a shuffle is written with."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.shape
        if self.how == "view":
            x = x.view(n, 4, c // 4, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        elif self.how == "reshape":
            x = torch.reshape(x, (n, 4, c // 4, h, w)).permute(0, 2, 1, 3, 4).reshape(n, -1, h, w)
        elif self.how == "unflatten":
            x = x.unflatten(1, (4, c // 4)).transpose(2, 1).flatten(1, 2)
        else:
            x = torch.flatten(torch.transpose(torch.unflatten(x, 1, (4, -1)), 1, 2), 1, 2)
        return x + self.c2(F.relu(self.c1(x)))


@pytest.mark.parametrize("how", ["view", "reshape", "unflatten", "functions"])
def test_a_block_on_a_channel_shuffled_map_is_gated(how):
    model = _ShuffledThenBlock(how).eval()
    p = se_inject.plan(model, input_size=(3, 8, 8))
    assert [(s.rule, s.tensor, s.channels) for s in p] == [("residual", "c2", 16)]
    se_inject.apply(model, input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        s = model.stem(x)
        t = s.view(2, 4, 4, 8, 8).transpose(1, 2).reshape(2, 16, 8, 8)
        want = t + paper_reference(model.c2(F.relu(model.c1(t))), model.se_gate)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_a_view_that_moves_the_spatial_dimensions_is_no_channel_shuffle():
    """A 5-D view whose last two dimensions are not the map's height and width, or a swap that
    moves one of them, makes a tensor whose channels cannot be told: no gate there."""
    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
            self.c1 = torch.nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            x = self.stem(x)
            n, c, h, w = x.shape  # (h == w == c: every view below has the map's shape)
            x = x.view(n, 4, c // 4, h, w).transpose(2, 3).reshape(n, c, h, w)
            return x + self.c1(x)
    with pytest.raises(NoSitesError, match="made by a reshape"):
        se_inject.apply(Mixed(), input_size=(3, 16, 16))


class _PixelShuffleSR(torch.nn.Module):
    """Real-ESRGAN's SRVGGNetCompact in small: a body of convolutions at the input's size, a
    convolution to 3·r² channels and a pixel shuffle to 3 channels at r times the size, plus
    the input upsampled (the net learns the residual). ``how`` writes the shuffle as a layer,
    as torch's function, or on a view with height and channels swapped (no gate there)."""

    def __init__(self, how, r=2):
        super().__init__()
        self.how, self.r = how, r
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.PReLU(16),
                                        torch.nn.Conv2d(16, 3 * r * r, 3, padding=1))
        self.up = torch.nn.PixelShuffle(r)

    def forward(self, x):
        h = self.body(x)
        if self.how == "layer":
            out = self.up(h)
        elif self.how == "function":
            out = F.pixel_shuffle(h, self.r)
        else:  # (N, H, C, W) shuffled as if its channels were first: no map's channels
            out = F.pixel_shuffle(h.permute(0, 2, 1, 3), self.r)  # (at H = C = 3·r²)
        out += F.interpolate(x, scale_factor=self.r, mode="nearest")
        return out


@pytest.mark.parametrize("how", ["layer", "function"])
def test_a_pixel_shuffled_map_keeps_its_channels_first(how):
    """A pixel shuffle turns (N, C·r², H, W) into (N, C, H·r, W·r): a channel-first map, whose
    sum with the upsampled input is a residual block. It made a tensor of unknown layout, and
    the net was refused as having no block."""
    torch.manual_seed(0)
    model = _PixelShuffleSR(how).eval()
    p = se_inject.plan(model, input_size=(3, 8, 8))
    tensor = "up" if how == "layer" else "pixel_shuffle"
    assert [(s.block, s.rule, s.tensor, s.channels) for s in p] == [
        ("", "residual", tensor, 3)]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)
    with pytest.warns(UserWarning, match="forward of the model itself"):
        se_inject.apply(model, input_size=(3, 8, 8), init="identity")
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the body's last layer doubled, through the shuffle
        model.se_gate.fc2.weight.normal_()
        u = F.pixel_shuffle(model.body(x), 2)
        want = paper_reference(u, model.se_gate) + F.interpolate(x, scale_factor=2)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_a_pixel_shuffle_of_a_view_with_channels_moved_is_no_map():
    model = _PixelShuffleSR("swapped")
    assert model(torch.randn(1, 3, 12, 8)).shape == (1, 3, 24, 16)
    with pytest.raises(NoSitesError, match="1 sum or concatenation of other tensors"):
        se_inject.apply(model, input_size=(3, 12, 8))


class _MixThenConv(torch.nn.Module):
    """``x + conv(...)`` where the convolution reads a permuted view (an MLP over channels-last
    pixels, then back): its output has channels-last strides, the shortcut channel-first ones,
    and the sum lays its result out as its first operand, the shortcut."""

    def __init__(self, c=16):
        super().__init__()
        self.lin = torch.nn.Linear(c, c)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        h = F.gelu(self.lin(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return x + self.conv(h)


def test_a_gated_sum_keeps_the_layout_of_the_sum_it_replaces():
    """With identity gates the model computes what it computed, to the bit, and its tensors
    are laid out as they were: the gated sum ``x + gate(u)`` was written ``gate(u) += x``,
    laid out as ``u``, and the mean after it summed in another order (1e-8 off)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _MixThenConv(),
                                _MixThenConv()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref, ref_block = model(x).mean((2, 3)), model[:2](x)
    se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    assert [n for n, _ in gates(model)] == ["1.se_gate", "2.se_gate"]
    with torch.no_grad():
        block = model[:2](x)
        assert torch.equal(block, ref_block) and block.stride() == ref_block.stride()
        assert torch.equal(model(x).mean((2, 3)), ref)


class _EinopsMixBlock(torch.nn.Module):
    """A block written with einops, as much research code is: its pixels as tokens
    (``rearrange``), an MLP over channels, back to a map at the height read off the input,
    a convolution, the residual sum."""

    def __init__(self, c=16):
        super().__init__()
        self.lin = torch.nn.Linear(c, c)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        t = F.gelu(self.lin(rearrange(x, "b c h w -> b (h w) c")))
        return x + self.conv(rearrange(t, "b (h w) c -> b c h w", h=x.shape[2]))


def test_einops_functions_and_layers_are_one_call_each():
    """einops parses its pattern against the tensor's shape, which fx's traced values have
    none of: a model using it failed to trace (TraceError inside ``rearrange``). Its functions
    and layers (``Rearrange``, ``Reduce``, ``EinMix``) are recorded as one call each, as timm's
    and torchvision's registries keep theirs, where the model's code has imported einops."""
    if rearrange is None:
        pytest.skip("einops is not installed (the test extras install it)")
    from einops.layers.torch import Reduce
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _EinopsMixBlock(),
                                _EinopsMixBlock(), Reduce("b c h w -> b c", "mean"),
                                torch.nn.Linear(16, 10)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    p = se_inject.plan(model, input_size=(3, 16, 16))
    assert [(s.block, s.tensor) for s in p] == [("1", "1.conv"), ("2", "2.conv")]
    se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    with torch.no_grad():
        assert torch.equal(model(x), ref)
        for _, g in gates(model):
            g.fc2.weight.normal_()
        blk, h = model[1], model[0](x)
        t = F.gelu(blk.lin(h.flatten(2).transpose(1, 2))).transpose(1, 2).reshape(2, 16, 16, 16)
        torch.testing.assert_close(blk(h), h + paper_reference(blk.conv(t), blk.se_gate),
                                   rtol=1e-5, atol=1e-6)
        # the height is read at every call, not kept from the trace
        assert model(torch.randn(1, 3, 8, 24)).shape == (1, 10)


class _EinopsConvNeXtBlock(torch.nn.Module):
    """A ConvNeXt block written with einops: a depthwise convolution, the map moved to
    channels-last (or to tokens) for a norm and an MLP over channels, and back, by
    ``rearrange`` or by ``Rearrange`` layers."""

    def __init__(self, how, c=16):
        super().__init__()
        from einops.layers.torch import Rearrange
        self.how = how
        self.dw = torch.nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.mlp = torch.nn.Sequential(torch.nn.LayerNorm(c), torch.nn.Linear(c, 2 * c),
                                       torch.nn.GELU(), torch.nn.Linear(2 * c, c))
        self.to_last, self.to_first = Rearrange("b c h w -> b h w c"), \
            Rearrange("b h w c -> b c h w")

    def forward(self, x):
        h = self.dw(x)
        if self.how == "layers":
            y = self.to_first(self.mlp(self.to_last(h)))
        elif self.how == "function":
            y = rearrange(self.mlp(rearrange(h, "b c h w -> b h w c")), "b h w c -> b c h w")
        elif self.how == "namespace":  # einops.rearrange(...)
            y = einops.rearrange(self.mlp(einops.rearrange(h, "b c h w -> b h w c")),
                                 "b h w c -> b c h w")
        else:  # the pixels as tokens, (N, H·W, C), and back at the map's height
            t = self.mlp(rearrange(h, "b c h w -> b (h w) c"))
            y = rearrange(t, "b (h w) c -> b c h w", h=x.shape[2])
        return x + y


@pytest.mark.parametrize("how", ["layers", "function", "namespace", "tokens"])
def test_an_einops_rearrange_that_moves_channels_keeps_the_map(how):
    """A rearrange that only moves batch, channels, height and width, or flattens height and
    width (in that order) into tokens and back at the map's size, keeps the map's channels
    known, as ``permute``, ``flatten`` and ``view`` do: the block is gated on its channels."""
    if rearrange is None:
        pytest.skip("einops is not installed (the test extras install it)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 4, 4), _EinopsConvNeXtBlock(how),
                                _EinopsConvNeXtBlock(how)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    p = se_inject.plan(model, input_size=(3, 32, 32))
    assert [(s.block, s.rule, s.channels) for s in p] == [("1", "residual", 16),
                                                          ("2", "residual", 16)]
    se_inject.apply(model, input_size=(3, 32, 32), init="identity")
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the MLP's last layer doubled, through the move
        for _, g in gates(model):
            g.fc2.weight.normal_()
        blk, h = model[1], model[0](x)
        y = blk.mlp(blk.dw(h).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(blk(h), h + paper_reference(y, blk.se_gate), rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize("pattern, src, shape, want", [
    ("b c h w -> b h w c", ("nchw", (2, 16, 8, 6)), (2, 8, 6, 16), ("nhwc", None)),
    ("b h w c -> b c h w", ("nhwc", (2, 8, 6, 16)), (2, 16, 8, 6), ("nchw", None)),
    ("b c h w -> b (h w) c", ("nchw", (2, 16, 8, 6)), (2, 48, 16), ("nlc", (8, 6))),
    ("n c h w -> n c (h w)", ("nchw", (2, 16, 8, 6)), (2, 16, 48), ("ncl", (8, 6))),
    ("b c h w -> b w h c", ("nchw", (2, 16, 8, 6)), (2, 6, 8, 16), ("other", None)),
    ("b c h w -> b (w h) c", ("nchw", (2, 16, 8, 6)), (2, 48, 16), ("other", None)),
    ("b c (h p) (w q) -> b (c p q) h w", ("nchw", (2, 16, 8, 6)), (2, 64, 4, 3),
     ("other", None)),
    ("b ... h w -> b h w ...", ("nchw", (2, 16, 8, 6)), (2, 8, 6, 16), ("other", None)),
    ("b h w c -> b c h w", ("nchw", (2, 16, 8, 6)), (2, 6, 16, 8), ("other", None)),
])
def test_the_layout_an_einops_pattern_gives(pattern, src, shape, want):
    from se_inject.graph import _einops_layout
    layout, s = src
    assert _einops_layout({"layout": layout, "shape": s, "hw": None}, pattern, shape) == want


def test_einops_tokens_viewed_back_at_another_size_are_no_map():
    from se_inject.graph import _einops_layout
    tokens = {"layout": "nlc", "shape": (2, 48, 16), "hw": (8, 6)}
    assert _einops_layout(tokens, "b (h w) c -> b c h w", (2, 16, 8, 6)) == ("nchw", None)
    assert _einops_layout(tokens, "b (h w) c -> b c h w", (2, 16, 6, 8)) == ("other", None)
    assert _einops_layout(tokens, "b (h w) c -> b h w c", (2, 8, 6, 16)) == ("nhwc", None)


class _TokenBranchBlock(torch.nn.Module):
    """A residual block whose branch is a depthwise convolution, then the map's pixels as
    tokens through a norm, an MLP and a layer scale, then viewed back as a map (EdgeNeXt's
    SplitTransposeBlock, without its attention): channels-last via tokens, flattened as
    (N, C, H·W) and transposed, or the other way (`route`)."""

    def __init__(self, route, c=16):
        super().__init__()
        self.route = route
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(c), torch.nn.Linear(c, 2 * c), \
            torch.nn.Linear(2 * c, c)
        self.gamma = torch.nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        n, c, h, w = x.shape
        if self.route == "permute":
            t = self.dw(x).reshape(n, c, h * w).permute(0, 2, 1)
        else:
            t = self.dw(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(F.gelu(self.fc1(self.norm(t))))
        t = self.gamma * t
        if self.route == "permute":
            y = t.reshape(n, h, w, c).permute(0, 3, 1, 2)
        elif self.route == "transpose":
            y = t.transpose(1, 2).reshape(n, c, h, w)
        else:  # the tokens viewed as a map of another height and width: no map of this one
            y = t.transpose(1, 2).reshape(n, c, h * 2, w // 2)
            x = x.reshape(n, c, h * 2, w // 2)
        return x + y


@pytest.mark.parametrize("route", ["permute", "transpose"])
def test_a_branch_through_tokens_back_to_the_map_is_gated_on_channels(route):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _TokenBranchBlock(route))
    p = se_inject.plan(model, input_size=(3, 8, 8))
    assert [(s.block, s.rule, s.channels) for s in p] == [("1", "residual", 16)]
    se_inject.apply(model, input_size=(3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    block = model[1]
    with torch.no_grad():
        h = model[0](x)
        t = block.dw(h).flatten(2).transpose(1, 2)
        t = block.gamma * (t + block.fc2(F.gelu(block.fc1(block.norm(t)))))
        y = t.transpose(1, 2).reshape(2, 16, 8, 8)
        torch.testing.assert_close(model(x), h + paper_reference(y, block.se_gate),
                                   rtol=1e-5, atol=1e-6)


def test_tokens_viewed_as_a_map_of_another_size_are_no_map():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), _TokenBranchBlock("other"))
    with pytest.raises(NoSitesError, match="made by a reshape"):
        se_inject.apply(model, input_size=(3, 8, 8))


class _OneChannelResidual(torch.nn.Module):
    """A spatial attention whose map (one channel: the mean and maximum over channels, then a
    convolution) goes through a residual block of its own before it scales the input."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = torch.nn.Conv2d(2, 1, 7, padding=3)
        self.c1, self.c2 = torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        s = self.squeeze(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1))
        s = s + self.c2(F.relu(self.c1(s)))
        return x * torch.sigmoid(s)


def test_a_block_of_one_channel_is_not_gated():
    """A channel gate weighs channels against each other: a one-channel map (a spatial
    attention's) has none, so its residual block gets no gate."""
    p = se_inject.plan(_OneChannelResidual(), input_size=(3, 8, 8))
    assert list(p) == []
    assert [s.reason for s in p.skipped if s.merge == "add"] == [
        "a map of one channel (a spatial attention's), with no channels for a gate to weigh"]


def test_sums_of_linear_branches_are_layers_not_blocks(tmp_path):
    """A sum whose every path from the entry crosses at most one convolution, with nothing but
    norms, identities, sums, differences and weight scales besides, is one convolution written
    out (RepVGG, MobileOne, a position encoding): no gate by default; `reparam_sums: allow`
    gates it like any other sum."""
    from handwritten import LinearSumsNet, RepBranchNet
    model = LinearSumsNet().eval()
    p = se_inject.plan(model)
    reparam = [s.merge for s in p.skipped if "re-parameterisable" in s.reason]
    assert sorted(reparam) == ["add", "add_1", "rep.add", "rep.add_1"]  # (a scope's 2nd sum: _1)
    assert [s.tensor for s in p] == ["deep2.1", "r2.1"]   # two convs in series; a block
    assert all(s.rule == "residual" for s in p)
    text = (se_inject.rules.builtin_rules_dir() / "residual.yaml").read_text()
    rule = tmp_path / "rep.yaml"
    rule.write_text(text.replace("reparam_sums: skip", "reparam_sums: allow"))
    # (RepVGG's block, kxk(x) + k1(x) + bn(x): one gate on the sum of its two convolutions,
    # before the norm of its input, its shortcut, is added)
    assert [s.tensor for s in se_inject.plan(model, rules=[rule])] == [
        "rep.add", "pos", "mul", "deep2.1", "r2.1"]
    with pytest.raises(se_inject.SEInjectError, match="re-parameterisable"):
        se_inject.apply(RepBranchNet())


def test_an_octave_convolution_is_one_layer_and_its_blocks_are_gated_on_each_stream(tmp_path):
    """An octave convolution sums convolutions of its two streams, conv(h) + up(conv(low)):
    one layer, so none of its sums gets a gate (each did, a gate inside every layer, with
    the gate of the block around it scaling the same tensor again). The bottlenecks' sums are
    residual blocks, one on each stream; `layer_sums: allow` gates the layers' sums too."""
    from handwritten import OctaveBottleneck, OctaveConv, OctaveNet
    model = OctaveNet().eval()
    layers = [m for m in model.modules() if isinstance(m, OctaveConv)]
    blocks = [n for n, m in model.named_modules() if isinstance(m, OctaveBottleneck)]
    p = se_inject.plan(model)
    assert [s.tensor for s in p] == [f"{b}.conv3.{bn}" for b in blocks for bn in ("bn_h", "bn_l")]
    in_layers = [s for s in p.skipped if "one layer written in pieces" in s.reason]
    assert len(in_layers) == sum(m.sums() for m in layers) == 13
    text = (se_inject.rules.builtin_rules_dir() / "residual.yaml").read_text()
    rule = tmp_path / "layers.yaml"
    rule.write_text(text.replace("layer_sums: skip", "layer_sums: allow"))
    assert len(se_inject.plan(model, rules=[rule])) == len(p) + 13
    se_inject.apply(model)
    m, x = model, torch.randn(2, 3, 32, 32)
    with torch.no_grad():                    # the forward written out with the paper's gate
        h, low = m.first(m.stem(x))
        h, low = F.relu(h), F.relu(low)
        for b in m.blocks:
            a, c = b.conv3(tuple(F.relu(t) for t in b.conv2(
                tuple(F.relu(t) for t in b.conv1((h, low))))))
            h, low = (F.relu(paper_reference(a, b.se_gate) + h),
                      F.relu(paper_reference(c, b.se_gate_1) + low))
        expected = m.head(m.last((h, low))[0].mean((2, 3)))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_two_streams_gate_the_residual_streams_sum_of_branches_only():
    """ResNet in ResNet: r' = relu(bn(rr(r) + tr(t) + r)), t' = relu(bn(rt(r) + tt(t))). The
    residual stream's branches, rr(r) + tr(t), get one gate before the shortcut is added; the
    transient stream, convolutions of the two streams summed without a shortcut, is one layer
    and gets none (it had one on rt(r) alone, and the residual stream a second gate on rr(r))."""
    from handwritten import TwoStreamNet
    model = TwoStreamNet().eval()
    p = se_inject.plan(model)
    assert [(s.block, s.tensor) for s in p] == [(f"blocks.{i}", f"blocks.{i}.add")
                                                for i in range(3)]
    se_inject.apply(model)
    m, x = model, torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        r, t = F.relu(m.stem_r(x)), F.relu(m.stem_t(x))
        for b in m.blocks:
            r, t = (F.relu(b.bn_r(paper_reference(b.rr(r) + b.tr(t), b.se_gate) + r)),
                    F.relu(b.bn_t(b.rt(r) + b.tt(t))))
        expected = m.head(torch.cat([r, t], 1).mean((2, 3)))
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pad,block", [
    (lambda x: F.pad(x, (1, 1, 1, 1)), False),
    (torch.nn.ZeroPad2d(1), False),
    (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), False),
    (torch.nn.ReplicationPad2d(1), False),
    (lambda x: F.pad(x, (1, 1, 1, 1), value=1.0), True),  # not a convolution's own padding
])
def test_padding_written_apart_belongs_to_its_convolution(pad, block):
    """``x + bn(conv(pad(x)))`` is one convolution written out, as ``x + bn(conv(x))`` with the
    convolution padding itself is, for every padding nn.Conv2d can do (TensorFlow's "same"
    padding, as Hugging Face's MobileNets pad); a constant other than zero is not one."""
    from handwritten import conv_bn

    class Padded(torch.nn.Module):
        def __init__(self, c=8):
            super().__init__()
            self.stem = conv_bn(3, c)
            self.pad = pad if isinstance(pad, torch.nn.Module) else None
            self.conv, self.bn = torch.nn.Conv2d(c, c, 3, bias=False), torch.nn.BatchNorm2d(c)

        def forward(self, x):
            x = F.relu(self.stem(x))
            return (x + self.bn(self.conv(self.pad(x) if self.pad else pad(x)))).mean((2, 3))

    p = se_inject.plan(Padded())
    assert len(p) == int(block)
    assert [("re-parameterisable" in s.reason) for s in p.skipped] == ([] if block else [True])


def _drop_scaling_the_mask(y, keep):
    """Stochastic depth as timm writes it now: the mask carries 1 / keep."""
    return y * (y.new_empty((y.shape[0], 1, 1, 1)).bernoulli_(keep) / keep)


def _drop_scaling_the_input(y, keep):
    """Stochastic depth as timm wrote it before 0.5, and as code that copied it does (mmcv,
    the reference ConvNeXt and Swin): the input is divided by keep, the mask is 0 or 1."""
    shape = (y.shape[0],) + (1,) * (y.ndim - 1)
    return y.div(keep) * (keep + torch.rand(shape, dtype=y.dtype, device=y.device)).floor()


def _drop_dividing_the_input(y, keep):
    """The same, with an operator and the mask first."""
    mask = torch.bernoulli(torch.full((y.shape[0], 1, 1, 1), keep, device=y.device))
    return mask * (y / keep)


class _InlineDropBlock(torch.nn.Module):
    """A residual block that drops its branch per sample itself, in its own forward, in
    training mode only (no drop-path module to recognise)."""

    def __init__(self, c=16, p=0.5, drop=_drop_scaling_the_mask):
        super().__init__()
        self.conv1, self.bn1 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.conv2, self.bn2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.p, self.drop = p, drop

    def branch(self, x):
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        y = self.branch(x)
        if self.training and self.p > 0:
            y = self.drop(y, 1 - self.p)
        return F.relu(x + y)


class _OldDropPath(torch.nn.Module):
    """Stochastic depth as a layer of a class se-inject does not know by name (mmcv's
    DropPath, and the copies of timm's early one that model code carries)."""

    def __init__(self, p):
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        return _drop_scaling_the_input(x, 1 - self.drop_prob)


class _DropPathLayerBlock(_InlineDropBlock):
    def __init__(self, c=16, p=0.5):
        super().__init__(c, p)
        self.drop_path = _OldDropPath(p)

    def forward(self, x):
        return F.relu(x + self.drop_path(self.branch(x)))


class _Counting(torch.nn.Module):
    """A layer with no weights that notes the batch size of each call in a list."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return x


def test_a_layer_looked_into_for_a_drop_path_keeps_its_state():
    """The layer a branch ends in is traced alone to learn whether it is a drop path: what
    that trace puts in its lists stays out of them."""
    from handwritten import branch

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.count = branch(16), _Counting()

        def forward(self, x):
            return F.relu(x + self.count(self.body(x)))

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), Block()).eval()
    se_inject.apply(net)
    assert net[1].count.seen == []
    net(torch.randn(3, 3, 8, 8))
    assert net[1].count.seen == [3]


def _gated_by_hand(net, x, drop):
    """``net``'s blocks computed with each gate on the branch, before its drop path."""
    h = net[0](x)
    for block in net[1:]:
        y = block.se_gate(block.branch(h))
        if block.training:
            y = drop(y, 0.5)
        h = F.relu(h + y)
    return h


@pytest.mark.parametrize("drop", [_drop_scaling_the_mask, _drop_scaling_the_input,
                                  _drop_dividing_the_input, _OldDropPath])
@pytest.mark.parametrize("apply_in_train", [True, False])
def test_a_drop_path_stays_after_the_gate(apply_in_train, drop):
    """The gate scales the branch before its random per-sample mask in training, and is the
    branch's last op in eval, whichever mode the block was gated in; where the drop path
    divides its input by the keep probability, before that division too, so that the
    squeeze reads the same values in training as in eval. The drop path is written in the
    block's forward, or is a layer of a class se-inject does not know."""
    torch.manual_seed(0)
    block = _DropPathLayerBlock if drop is _OldDropPath else functools.partial(
        _InlineDropBlock, drop=drop)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), block(), block())
    net.train(apply_in_train)
    tensors = [s.tensor for s in se_inject.plan(net).sites]
    assert tensors == ["1.bn2", "2.bn2"]
    assert [s.tensor for s in se_inject.plan(net.train(not apply_in_train)).sites] == tensors
    se_inject.apply(net.train(apply_in_train))
    x = torch.randn(8, 3, 8, 8)
    by_hand = _drop_scaling_the_input if drop is _OldDropPath else drop
    for train in (True, False):
        net.train(train)
        torch.manual_seed(5)
        got = net(x)
        torch.manual_seed(5)
        torch.testing.assert_close(got, _gated_by_hand(net, x, by_hand), rtol=0, atol=0)


def test_a_sum_that_folds_into_one_convolution_stays_ungated_with_drop_path_in_training():
    """``x + drop_path(dwconv(x))`` is one convolution written as two branches, in eval mode
    and in training mode, where its drop path is traced as a random mask: ungated in both
    (the mask once made it look like a block in training mode only)."""
    from timm.layers import DropPath

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.dw = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.drop_path = DropPath(0.5)
            self.block = _InlineDropBlock(8)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.drop_path(self.dw(x))
            return self.block(x)

    net = Net()
    for train in (True, False):
        p = se_inject.plan(net.train(train))
        assert [s.block for s in p.sites] == ["block"]
        assert [s.reason for s in p.skipped if s.rule == "residual"
                and s.reason.startswith("a sum of parallel branches")] != []


class _ReshapedEntry(torch.nn.Module):
    """A residual block whose input is a token sequence, (N, H·W, C), viewed as (N, C, H, W)
    without moving its channels back in front: neither a channel-first nor a channels-last map
    of the input's size, so its layout cannot be told."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.c1, self.b1 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.c2, self.b2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.BatchNorm2d(c)
        self.proj = torch.nn.Conv2d(c, c, 1)

    def forward(self, img):
        x = self.stem(img)
        b, c, h, w = x.shape
        y = x.flatten(2).transpose(1, 2).reshape(b, c, h, w)
        return self.proj(y) + self.b2(self.c2(F.relu(self.b1(self.c1(y)))))


def test_a_gate_in_front_of_a_reshaped_input_is_refused_not_a_crash():
    """position='pre' gates the block's input; here that input is a reshaped token sequence,
    not a known feature map. The block is skipped with that reason (a TypeError before), and
    apply() raises an SEInjectError, leaving the model as it was."""
    net = _ReshapedEntry()
    assert [s.tensor for s in se_inject.plan(net, input_size=(3, 16, 16)).sites] == ["b2"]
    p = se_inject.plan(net, input_size=(3, 16, 16), position="pre")
    assert not p.sites
    assert [s.reason for s in p.skipped] == [
        "the tensor the rule would gate is not a 4-D channel-first feature map "
        "(a token sequence reshaped, say)"]
    keys = list(net.state_dict())
    with pytest.raises(NoSitesError):
        se_inject.apply(net, input_size=(3, 16, 16), position="pre")
    assert list(net.state_dict()) == keys


class _MixedConvNet(torch.nn.Module):
    """MixNet's mixed convolution: the channels split in groups, each convolved with its own
    kernel size, concatenated again. One layer, not an inception module."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 24, 3, padding=1)
        self.convs = torch.nn.ModuleList(torch.nn.Conv2d(8, 8, k, padding=k // 2)
                                         for k in (3, 5, 7))
        self.inception = torch.nn.ModuleList([torch.nn.Conv2d(24, 8, 1),
                                              torch.nn.Conv2d(24, 8, 3, padding=1)])

    def forward(self, x):
        x = self.stem(x)
        pieces = torch.split(x, [8, 8, 8], 1)
        x = torch.cat([c(pieces[i]) for i, c in enumerate(self.convs)], 1)
        return torch.cat([b(x) for b in self.inception], 1)


def test_a_mixed_convolution_is_not_an_inception_module():
    """Its branches convolve different pieces of one split tensor: skipped, with that reason;
    the inception module after it, whose branches read one tensor, is gated."""
    p = se_inject.plan(_MixedConvNet(), input_size=(3, 16, 16))
    assert [(s.rule, s.channels) for s in p.sites] == [("inception", 16)]  # not the 24 mixed
    assert [s.reason for s in p.skipped] == [
        "its branches convolve different pieces of one split tensor (a mixed convolution, "
        "as MixNet's: one layer), not one input in parallel"]


def test_tensors_made_in_a_forward_stay_with_the_block_that_made_them():
    """torch.fx stores a tensor made while tracing on the traced module; plan() must leave no
    such attribute behind, and each gated block reads its own (blocks alike in code, with
    different settings, make different ones)."""
    from handwritten import ConstantNet
    model = ConstantNet().eval()
    x = torch.randn(2, 3, 16, 16)

    def attrs():
        return {n: set(m.__dict__) for n, m in model.named_modules()}
    before = attrs()
    for _ in range(2):
        se_inject.plan(model)
        assert attrs() == before
    ref = copy.deepcopy(model)
    se_inject.apply(model)
    saturate(model)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    held = {n: {k: v for k, v in m.__dict__.items() if isinstance(v, torch.Tensor)}
            for n, m in model.blocks.named_children()}
    assert sorted(v.tolist() for c in held.values() for v in c.values() if v.dim() == 0) == \
        [0.5, 1.0, 2.0]
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buffer, weights_only=False)(x), ref(x))
    se_inject.remove(model)
    assert attrs() == before


@pytest.mark.parametrize("made", [False, True], ids=["buffer", "made_in_forward"])
def test_identity_init_scales_the_layer_not_a_factor_that_is_no_parameter(made):
    """A branch times a buffer (or a tensor its forward makes): the identity gate's factor of 2
    goes into the branch's last layer, and the gated model computes what the model did."""
    from handwritten import FactorNet
    model = FactorNet(made).eval()
    randomize_norms(model)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 16, 16)
    se_inject.apply(model, init="identity")
    assert len(gates(model)) == 2
    assert torch.equal(model.blocks[0].factor, ref.blocks[0].factor)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-6)


def test_a_model_that_reads_its_input_size_is_traced_at_it():
    """Hugging Face's CNNs check the number of channels and pad as TensorFlow does, reading the
    input's size as Python numbers, which torch.fx refuses. apply() traces such a model at the
    input size; the blocks it gates keep running their layers' own code, so every size still
    pads as the plain model does (odd sizes pad on one side only; 36 reaches OddPadBlock with
    an odd map), and the channel check still refuses a wrong input."""
    from handwritten import ShapeReadingNet
    with pytest.raises(Exception, match="control flow"):
        fx.symbolic_trace(ShapeReadingNet())
    model = ShapeReadingNet().eval()
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match=r"1 block\(s\) of ShapeReadingNet kept without a gate "
                                         r"\(`blocks.2.add`\)"):
        se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["blocks.0.se_gate", "blocks.1.se_gate",
                                            "blocks.3.se_gate"]
    assert "forward" not in vars(model.blocks[2])  # the block that reads its size: as it was
    assert [k for k in model.state_dict() if "se_gate" not in k] == keys
    for size in (32, 33, 36, 50):
        _saturated_equals_plain(model, ShapeReadingNet, torch.randn(2, 3, size, size))
        with pytest.raises(ValueError, match="channel dimension"):
            model(torch.randn(1, 4, size, size))


def test_sums_in_a_forward_that_reads_the_input_size_are_refused_with_what_to_do():
    from handwritten import InlineShapeReadingNet
    model = InlineShapeReadingNet()
    p = se_inject.plan(model)
    assert not p.sites and len(p.skipped) == 2
    assert all("reads a traced value as a Python number" in s.reason for s in p.skipped)
    with pytest.raises(NoSitesError, match=r"torch._assert\(x.shape\[1\] == 3") as info:
        se_inject.apply(model)
    assert "nothing was changed" in str(info.value)
    assert not gates(model) and "forward" not in vars(model)

    class Asserting(InlineShapeReadingNet):  # the advice: the check as an op fx records
        def forward(self, x):
            torch._assert(x.shape[1] == 3, "expected 3 channels")
            x = F.relu(self.stem(x))
            x = F.relu(x + self.b1(x))
            return F.relu(x + self.b2(x)).mean((2, 3))

    model = Asserting().eval()
    se_inject.apply(model)
    assert len(gates(model)) == 2
    _saturated_equals_plain(model, Asserting, torch.randn(2, 3, 20, 20))
    with pytest.raises(AssertionError, match="expected 3 channels"):
        model(torch.randn(1, 4, 20, 20))


def test_asserts_on_sizes_stay_checks_in_the_gated_forwards():
    """An ``assert`` on sizes is recorded as a check (torch._assert) rather than answered at the
    input size: the forwards that hold one are gated, and still check at every size. (The
    model is defined out of this file, whose asserts pytest rewrites.)"""
    from handwritten import AssertingNet
    with pytest.raises(Exception, match="control flow"):
        fx.symbolic_trace(AssertingNet())
    model = AssertingNet().eval()
    assert [s.block for s in se_inject.plan(model).sites] == ["", "b2"]
    se_inject.apply(model)
    assert sorted(n for n, _ in gates(model)) == ["b2.se_gate", "se_gate"]
    for size in (20, 36):
        _saturated_equals_plain(model, AssertingNet, torch.randn(2, 3, size, size))
    plain = AssertingNet().eval()
    for bad in ((2, 4, 20, 20), (2, 3, 22, 22), (2, 3, 20, 21)):
        for m in (plain, model):
            with pytest.raises(AssertionError):
                m(torch.randn(*bad))
    assert "torch._assert(" in inspect.getsource(model.b2.forward)  # (its check, in place)


def test_an_assert_that_compares_tuples_is_answered_at_the_input_size():
    """Where the truth asked for is not the assert's own (the items of tuples compared), the
    block reads a value, as before, rather than checking the item."""
    from handwritten import TupleAssertingBlock
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), TupleAssertingBlock())
    p = se_inject.plan(net)
    assert not p.sites
    assert len(p.skipped) == 1
    assert "reads a traced value as a Python number" in p.skipped[0].reason


def test_asserts_on_values_stay_checks_in_the_gated_forwards():
    """``assert torch.isfinite(y).all()``: recorded as a check, as fx records it when asked
    to, and run by the gated forward on each input, where the plain model runs it."""
    from handwritten import FiniteCheckingNet
    model = FiniteCheckingNet().eval()
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["blocks.0.se_gate", "blocks.1.se_gate"]
    _saturated_equals_plain(model, FiniteCheckingNet, torch.randn(2, 3, 12, 12))
    bad = torch.randn(2, 3, 12, 12)
    bad[0, 0, 5, 5] = float("inf")  # (a NaN after the stem's convolution)
    for m in (FiniteCheckingNet().eval(), model):
        with pytest.raises(AssertionError):
            m(bad)


def test_tensors_made_with_sizes_given_one_by_one_are_traced_at_every_size():
    """``torch.zeros(b, h, w)`` with sizes read off a traced tensor: torch takes a first
    size that is not a number for the whole size, and fx fails. The trace records the sizes
    as one tuple; the gated blocks make their masks at each size they are given."""
    from handwritten import PositionMaskNet
    with pytest.raises(TypeError, match="zeros"):
        fx.symbolic_trace(PositionMaskNet())
    model = PositionMaskNet().eval()
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["blocks.0.se_gate", "blocks.1.se_gate"]
    assert torch.zeros is torch._C._VariableFunctions.zeros  # (as it was)
    for size in (16, 23, 40):
        _saturated_equals_plain(model, PositionMaskNet, torch.randn(2, 3, size, size + 3))


def test_a_sum_with_a_tensor_made_from_the_input_size_alone_is_no_block():
    """``x + pos(coords)``, the coordinates made from ``x``'s size, not its values: the
    convolution does not compute from the block's input, and the sum is no block."""
    from handwritten import AddedPositionBlock
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), AddedPositionBlock())
    p = se_inject.plan(net)
    assert [s.tensor for s in p.sites] == ["1.body.4"]
    assert [(s.merge, s.reason) for s in p.skipped] == [
        ("1.add", "its other operand is made from the input's size alone, not its values (a "
                  "position encoding), and is no branch")]


def test_reading_the_size_after_a_caching_leaf_leaves_no_meta_tensors():
    """To learn a size the trace needs, the layers before it run on meta tensors, a leaf that
    caches a tensor in eval mode among them: its cache is as it was afterwards."""
    from handwritten import CachingBlock, CachingLeafNet, tf_same_pad

    class ReadingAfterCache(CachingLeafNet):
        def forward(self, x):
            x = self.cached(self.res(F.relu(self.stem(x))))
            return tf_same_pad(x, 3, 2).mean((2, 3))

    with pytest.raises(Exception, match="Proxy"):
        fx.symbolic_trace(ReadingAfterCache())  # (which leaves a proxy in that one's cache)
    model = ReadingAfterCache().eval()
    se_inject.apply(model, leaf_modules=[CachingBlock])
    assert [n for n, _ in gates(model)] == ["res.se_gate"] and model.cached.cache == {}
    _saturated_equals_plain(model, ReadingAfterCache, torch.randn(2, 3, 15, 15))
    assert model.cached.cache["bias"].device.type == "cpu"


def test_a_branch_on_a_tensors_values_is_still_refused_where_it_is():
    """Only numbers a shape gives are answered: a branch on values stays fx's refusal, named
    at the module that branches."""
    from handwritten import BlockNet

    class Clipping(BlockNet):
        def forward(self, x):
            x = self.blocks(F.relu(self.stem(x)))
            if x.abs().max() > 100:
                x = x / 2
            return self.fc(x.mean((2, 3)))

    model = Clipping()
    keys = list(model.state_dict())
    with pytest.raises(TraceError, match="the model's own forward.*control flow"):
        se_inject.apply(model)
    assert list(model.state_dict()) == keys and not gates(model)


@pytest.mark.parametrize("scale, fails", [
    (lambda corr, c: corr / torch.sqrt(torch.tensor(c)), "__cuda_array_interface__"),
    (lambda corr, c: corr * torch.as_tensor([1.0 / c], dtype=torch.float32), "'len'"),
], ids=["tensor", "as_tensor_of_a_list"])
def test_a_tensor_made_of_a_size_is_traced_at_the_input_size(scale, fails):
    """``torch.tensor(n)`` of a size fails in torch.fx ("`__cuda_array_interface__` must be a
    dict", or "'len' is not supported" for a list of them); traced at the input size it is that
    size's number, as in every other read of a size there, and the blocks get their gates. The
    gated blocks' forwards come from their own traces, so another input size scales by its own
    number, as the plain model does."""
    from handwritten import CorrelatingNet
    with pytest.raises((TypeError, RuntimeError), match=fails):
        fx.symbolic_trace(CorrelatingNet(scale))
    model = CorrelatingNet(scale).eval()
    se_inject.apply(model, input_size=(3, 16, 16))
    assert [n for n, _ in gates(model)] == [f"net.blocks.{i}.se_gate" for i in range(3)]
    for size in (16, 24):
        _saturated_equals_plain(model, lambda: CorrelatingNet(scale), torch.randn(2, 3, size, size))


def test_a_tensor_made_of_a_tensors_values_is_refused_naming_the_call():
    """``torch.tensor()`` of a traced tensor has no number at the input size either: refused,
    saying what fx was given instead of torch's words about CUDA arrays."""
    from handwritten import CorrelatingNet

    def scale(corr, c):
        return corr / torch.as_tensor(corr.amax())
    model = CorrelatingNet(scale)
    with pytest.raises(TraceError, match=r"torch.tensor\(\) or torch.as_tensor\(\) of a traced "
                                         r"value") as info:
        se_inject.apply(model)
    assert "__cuda_array_interface__" not in str(info.value)
    assert not gates(model) and "forward" not in vars(model.net.blocks[0])


def test_a_layer_without_state_made_in_a_forward_is_traced_through():
    """``nn.ZeroPad2d(...)(x)`` in a forward: torch.fx refuses a module the model does not hold
    ("module is not installed as a submodule"), which refused NASNet-A Mobile whole. A layer
    made so with no parameters or buffers is what its forward computes, and is traced through
    as code: every block is gated, the one that makes its padding in its own forward too (its
    new forward pads as that layer did), identity gates change nothing bit for bit, and with
    saturated gates the model computes the plain one's outputs at another size."""
    from handwritten import MadeLayerNet
    with pytest.raises(NameError, match="not installed as a submodule"):
        fx.symbolic_trace(MadeLayerNet())
    model = MadeLayerNet().eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model, init="identity", input_size=(3, 16, 16))
    assert sorted(n for n, _ in gates(model)) == ["b3.se_gate", "se_gate", "se_gate_1"]
    assert "functional.pad(x, (1, 1, 1, 1), mode = 'reflect'" in inspect.getsource(
        model.b3.forward)
    x = torch.randn(2, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    _saturated_equals_plain(model, MadeLayerNet, x)


def test_a_layer_with_weights_made_in_a_forward_is_still_refused():
    """A layer with weights made in a forward draws new ones at every call; a trace would
    keep one draw as constants. Refused as fx refuses it, naming the module to keep whole."""
    from handwritten import MadeLayerNet
    model = MadeLayerNet(stateful=True)
    keys = list(model.state_dict())
    with pytest.raises(TraceError, match=r"not installed as a submodule.*"
                                         r"leaf_modules=\[LayerMadeInForward\]"):
        se_inject.apply(model)
    assert list(model.state_dict()) == keys and not gates(model)


def test_a_model_traced_at_its_input_size_is_the_model_traced_plainly():
    """The same blocks, sites and identity initialisation whether the trace has to take the
    input's size (a channel check in the model's forward) or not: in-place sums read through
    the first operand's name (``y.add_(x); relu(y)``) among them, which the trace at the input
    size once read as the value before the sum, refusing identity initialisation."""
    from handwritten import InPlaceNet

    class Checked(InPlaceNet):
        def forward(self, x):
            if x.shape[1] != 3:
                raise ValueError("expected 3 channels")
            return super().forward(x)

    def sites(model):
        return [(s.block, s.tensor, s.rule, s.channels, s.merge) for s in se_inject.plan(model)]

    assert sites(Checked()) == sites(InPlaceNet()) and len(sites(InPlaceNet())) == 4
    model = Checked().eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model, init="identity")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("reads", [False, True])
def test_a_block_that_cannot_be_gated_leaves_its_nested_inception_module_its_gate(reads):
    """An Inception-ResNet block: the inception module in its branch yields its gate to the
    residual block. Where the residual block's own forward reads its input's size, it cannot
    be gated, and the inception module gets its gate instead."""
    from handwritten import FunctionalInception, conv_bn

    class IncRes(torch.nn.Module):
        def __init__(self, c=16):
            super().__init__()
            self.inc = FunctionalInception(c, 4)
            self.proj = conv_bn(16, c, 1)

        def forward(self, x):
            if reads and x.shape[-1] % 2:
                x = F.pad(x, (0, 1, 0, 1))
            return F.relu(x + self.proj(self.inc(x)))

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.block = conv_bn(3, 16), IncRes()

        def forward(self, x):
            return self.block(F.relu(self.stem(x))).mean((2, 3))

    model = Net().eval()
    p = se_inject.plan(model)
    assert [(s.block, s.rule) for s in p] == ([("block.inc", "inception")] if reads else
                                              [("block", "residual")])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        se_inject.apply(model)
    _saturated_equals_plain(model, Net, torch.randn(2, 3, 15, 15))


class _TwoArgumentNet(torch.nn.Module):
    """An image and a depth map, each through a stem, fused, then residual blocks."""

    def __init__(self):
        super().__init__()
        from handwritten import Bottleneck, conv_bn
        self.rgb, self.depth = conv_bn(3, 16), conv_bn(1, 16)
        self.blocks = torch.nn.Sequential(Bottleneck(16, 8, 32), Bottleneck(32, 8, 32),
                                          Bottleneck(32, 16, 64, stride=2))

    def forward(self, rgb, depth):
        return self.blocks(F.relu(self.rgb(rgb)) * torch.sigmoid(self.depth(depth)))


class _TakesADict(_TwoArgumentNet):
    def forward(self, batch):
        return super().forward(batch["rgb"], batch["depth"])


class _TakesAList(_TwoArgumentNet):
    def forward(self, images):
        return super().forward(images[0], images[1])


class _LoopsOverAList(_TwoArgumentNet):
    """Iterates over its input and takes its length: fx alone refuses both."""

    def forward(self, images):
        torch._assert(len(images) == 2, "an image and a depth map")
        rgb, depth = [stem(x) for stem, x in zip((self.rgb, self.depth), images)]
        return self.blocks(F.relu(rgb) * torch.sigmoid(depth))


class _TakesKeywords(_TwoArgumentNet):
    def forward(self, **batch):
        return super().forward(batch["rgb"], batch["depth"])


class _TakesNested(_TwoArgumentNet):
    def forward(self, batch):
        return super().forward(*batch["images"])


_SIZES = {"rgb": (3, 32, 48), "depth": (1, 32, 48)}
_AS_LIST = [[_SIZES["rgb"], _SIZES["depth"]]]
_STRUCTURED = [(_TakesADict, _SIZES), (_TakesAList, _AS_LIST), (_LoopsOverAList, _AS_LIST),
               (_TakesKeywords, _SIZES), (_TakesNested, {"images": _AS_LIST[0]})]


def _inputs(cls):
    rgb, depth = torch.randn(2, 3, 32, 48), torch.randn(2, 1, 32, 48)
    if cls is _TakesNested:
        return {"images": [rgb, depth]}
    return {"rgb": rgb, "depth": depth} if cls in (_TakesADict, _TakesKeywords) else [rgb, depth]


def _call(model, x):
    return model(**x) if isinstance(model, _TakesKeywords) else model(x)


@pytest.mark.parametrize("cls,size", _STRUCTURED)
def test_an_input_that_holds_several_tensors_takes_their_sizes(cls, size):
    """A forward that takes a dict or a list of tensors is planned, gated and costed as the same
    network taking them as separate arguments."""
    torch.manual_seed(0)
    ref = se_inject.plan(_TwoArgumentNet(), input_size=list(_SIZES.values()))
    model = cls().eval()
    randomize_norms(model)
    p = se_inject.plan(model, input_size=size)
    assert [(s.gate, s.channels, s.spatial, s.stage) for s in p] == \
        [(s.gate, s.channels, s.spatial, s.stage) for s in ref] and len(p) == 3
    x = _inputs(cls)
    with torch.no_grad():
        y0 = _call(model, x)
        twin = copy.deepcopy(model)
        se_inject.apply(twin, input_size=size, init="identity")
        assert len(gates(twin)) == 3 and torch.equal(_call(twin, x), y0)
        se_inject.apply(model, input_size=size)
        assert not torch.allclose(_call(model, x), y0)
        saturate(model)
        assert torch.allclose(_call(model, x), y0, atol=1e-6)
    assert se_inject.part_input_size(cls(), "blocks", input_size=size) == (16, 32, 48)
    c = se_inject.cost(cls().eval(), input_size=size)
    c_ref = se_inject.cost(_TwoArgumentNet().eval(), input_size=list(_SIZES.values()))
    assert c.input_size == (3, 32, 48) and c.base_ops == c_ref.base_ops > 0
    assert c.ratios[0].added_parameters == c_ref.ratios[0].added_parameters == \
        p.added_parameters()


class _TimeBlock(torch.nn.Module):
    """A diffusion U-Net's residual block: the time embedding shifts the branch's map."""

    def __init__(self, c=16, dim=8):
        super().__init__()
        from handwritten import conv_bn
        self.conv1, self.conv2, self.time = conv_bn(c, c), conv_bn(c, c), torch.nn.Linear(dim, c)

    def forward(self, x, t):
        h = F.silu(self.conv1(x)) + self.time(t)[:, :, None, None]
        return x + self.conv2(F.silu(h))


class _TimeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        from handwritten import conv_bn
        self.stem, self.embed = conv_bn(3, 16), torch.nn.Linear(1, 8)
        self.b1, self.b2 = _TimeBlock(), _TimeBlock()

    def forward(self, x, t):
        e = F.silu(self.embed(t))
        return self.b2(self.b1(self.stem(x), e), e)


def test_a_block_a_second_input_only_shifts_is_gated_as_the_block_of_its_feature_map():
    """Every sum of a time-conditioned block depends on both model inputs, so the block had no
    single entry and no gate; a tensor of one value per channel that shifts or scales a map
    does not make it another path into the block."""
    model = _TimeNet().eval()
    randomize_norms(model)
    twin = copy.deepcopy(model)
    sizes = [(3, 16, 16), (1,)]
    p = se_inject.plan(model, input_size=sizes)
    assert [(s.gate, s.tensor, s.entry) for s in p] == [
        ("b1.se_gate", "b1.conv2.1", "stem.1"), ("b2.se_gate", "b2.conv2.1", "b1.add_1")]
    se_inject.apply(model, input_size=sizes, init="identity")
    x, t = torch.randn(2, 3, 20, 20), torch.rand(2, 1)
    with torch.no_grad():
        assert torch.equal(model(x, t), twin(x, t))
        b, h, e = model.b1, model.stem(x), F.silu(model.embed(t))
        u = b.conv2(F.silu(F.silu(b.conv1(h)) + b.time(e)[:, :, None, None]))
        torch.testing.assert_close(b(h, e), h + paper_reference(u, b.se_gate), rtol=1e-5,
                                   atol=1e-6)


class _KeyedBlock(_Branched):
    def forward(self, feats: dict):
        return F.relu(feats["x"] + self.branch(feats["x"]))


class _IndexedBlock(_Branched):
    def forward(self, pair: list):
        return F.relu(pair[0] + self.branch(pair[0])), pair[1]


@pytest.mark.parametrize("cls,size,given", [
    (_KeyedBlock, {"x": (16, 8, 8)}, lambda x: {"x": x}),
    (_IndexedBlock, [[(16, 8, 8), (4, 2, 2)]], lambda x: [x, x[:, :4, :2, :2]]),
    (_StarBlock, (16, 8, 8), lambda x: x),
])
def test_a_block_gated_alone_takes_its_shortcut_from_an_input_that_holds_tensors(cls, size, given):
    """A block whose input is a dict, a list or *args, gated as the model: the sum's shortcut
    is an item of that input, a feature map like a plain input (it was taken for something
    else, and the block had no site)."""
    block = cls().eval()
    randomize_norms(block)
    twin = copy.deepcopy(block)
    se_inject.apply(block, input_size=size, init="identity")
    assert [n for n, _ in gates(block)] == ["se_gate"]
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        out, ref = block(given(x)), twin(given(x))
        for a, b in zip(*[o if isinstance(o, tuple) else (o,) for o in (out, ref)]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("cls,size", _STRUCTURED)
def test_the_recorded_structured_input_size_gates_a_fresh_model_alike(cls, size):
    import json

    from se_inject.recipe import recipe_of
    model = se_inject.apply(cls().eval(), input_size=size)
    recorded = json.loads(json.dumps(recipe_of(model)[-1]["input_size"]))
    again = se_inject.apply(cls().eval(), input_size=recorded)
    assert [n for n, _ in gates(again)] == [n for n, _ in gates(model)] and len(gates(model)) == 3


@pytest.mark.parametrize("cls,words", [
    (_TakesADict, r"takes `batch` as a dict of tensors \(batch\['rgb'\], batch\['depth'\]\).*"
                  r"input_size=\{'rgb': \(C, H, W\), 'depth': \(C, H, W\)\}"),
    (_TakesKeywords, r"takes `\*\*batch` as a dict of tensors \(batch\['rgb'\], "
                     r"batch\['depth'\]\)"),
    (_TakesAList, r"takes `images` as a list or tuple of tensors \(images\[0\], images\[1\]\).*"
                  r"input_size=\[\[\(C, H, W\), \(C, H, W\)\]\]"),
])
def test_one_size_for_an_input_that_holds_several_tensors_says_how_to_give_them(cls, words):
    from se_inject.errors import InvalidArgumentError
    model = cls().eval()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (se_inject.apply, se_inject.plan):
        with pytest.raises(InvalidArgumentError, match=words):
            call(model, input_size=(3, 32, 48))
    assert not gates(model) and all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("size", [{"rgb": (3, 0, 32), "depth": (1, 32, 32)}, {1: (3, 32, 32)},
                                  {}, [[]], [[(3, 32, 32), "depth"]]])
def test_a_malformed_structured_input_size_is_refused(size):
    from se_inject.errors import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="input_size must be"):
        se_inject.plan(_TakesADict(), input_size=size)


def test_starred_inputs_take_one_size_each():
    """``forward(self, *images)`` takes the inputs that remain, one size each, as the same
    network taking them by name."""
    class TakesStarred(_TwoArgumentNet):
        def forward(self, *images):
            return super().forward(images[0], images[1])

    sizes = list(_SIZES.values())
    ref = se_inject.plan(_TwoArgumentNet(), input_size=sizes)
    p = se_inject.plan(TakesStarred(), input_size=sizes)
    assert [(s.gate, s.spatial) for s in p] == [(s.gate, s.spatial) for s in ref] and len(p) == 3


class _CatByName(torch.nn.Module):
    """Inception-style modules whose concatenation names its arguments."""

    def __init__(self, how):
        super().__init__()
        from handwritten import conv_bn
        self.how = how
        self.stem = conv_bn(3, 16)
        self.a, self.b = conv_bn(16, 8, 1), torch.nn.Sequential(conv_bn(16, 8), conv_bn(8, 8))
        self.c, self.d = conv_bn(16, 8, 1), torch.nn.Sequential(conv_bn(16, 8), conv_bn(8, 8))

    def merge(self, parts):
        if self.how == "tensors":
            return torch.cat(tensors=parts, dim=1)
        if self.how == "axis":
            return torch.concatenate(parts, axis=1)
        return torch.cat(parts, 1)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.merge([self.a(x), self.b(x)]))
        return F.relu(self.merge([self.c(x), self.d(x)]))


@pytest.mark.parametrize("how", ["tensors", "axis"])
def test_a_concatenation_naming_its_arguments_is_gated_as_one_by_position(how):
    """torch.cat(tensors=[...], dim=1) and torch.concatenate([...], axis=1) are the same
    inception modules as torch.cat([...], 1): same sites, and identity gates that keep the
    output exactly (the layers feeding the concatenation found through its named tensors)."""
    torch.manual_seed(0)
    ref = se_inject.plan(_CatByName("position"), input_size=(3, 16, 16))
    model = _CatByName(how).eval()
    randomize_norms(model)
    p = se_inject.plan(model, input_size=(3, 16, 16))
    assert [(s.gate, s.rule, s.channels) for s in p] == \
        [(s.gate, s.rule, s.channels) for s in ref] and len(p) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = model(x)
        se_inject.apply(model, input_size=(3, 16, 16), init="identity")
        assert len(gates(model)) == 2 and torch.equal(model(x), y0)


class _SumByName(torch.nn.Module):
    """Residual blocks whose sum names its operands."""

    def __init__(self, how):
        super().__init__()
        from handwritten import conv_bn
        self.how = how
        self.stem = conv_bn(3, 16)
        self.f1 = torch.nn.Sequential(conv_bn(16, 16), torch.nn.ReLU(), conv_bn(16, 16))
        self.f2 = torch.nn.Sequential(conv_bn(16, 16), torch.nn.ReLU(), conv_bn(16, 16))

    def add(self, x, y):
        if self.how == "input_other":
            return torch.add(input=x, other=y)
        if self.how == "other":
            return torch.add(x, other=y)
        if self.how == "method":
            return x.add(other=y)
        return x + y

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.add(x, self.f1(x)))
        return F.relu(self.add(x, self.f2(x)))


@pytest.mark.parametrize("how", ["input_other", "other", "method"])
@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
def test_a_sum_naming_its_operands_is_the_sum_made_by_position(how, position):
    """torch.add(input=x, other=y), torch.add(x, other=y) and x.add(other=y) are found,
    gated and placed as x + y is, in every position; identity gates keep the output."""
    ref = se_inject.plan(_SumByName("plus"), input_size=(3, 16, 16), position=position)
    model = _SumByName(how).eval()
    randomize_norms(model)
    p = se_inject.plan(model, input_size=(3, 16, 16), position=position)
    assert [(s.gate, s.tensor, s.channels) for s in p] == \
        [(s.gate, s.tensor, s.channels) for s in ref] and len(p) == 2
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = model(x)
        twin = copy.deepcopy(model)
        se_inject.apply(model, input_size=(3, 16, 16), position=position)
        assert len(gates(model)) == 2 and not torch.allclose(model(x), y0)
        saturate(model)
        assert torch.allclose(model(x), y0, atol=1e-6)
        if position == "standard":
            se_inject.apply(twin, input_size=(3, 16, 16), init="identity")
            assert torch.equal(twin(x), y0)


class _FlagInlineNet(torch.nn.Module):
    """A residual block inline in the model's own forward, which reads a setting and runs
    otherwise in training (dropout): its gated forward checks the setting and picks the
    trace of the mode it runs in, wrappers that take (*args, **kwargs)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1),
                                          torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                          torch.nn.Conv2d(16, 16, 3, padding=1),
                                          torch.nn.BatchNorm2d(16))
        self.double = False
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x, scale: float = 1.0):
        x = F.relu(self.stem(x))
        y = self.branch(x)
        if self.double:
            y = y * 2
        x = F.relu(x + y)
        return self.head(F.dropout(x.mean((2, 3)), 0.2, self.training)) * scale


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_model_whose_own_forward_is_gated_can_be_planned_and_gated_again(mode):
    """plan() and apply() trace a model whose own forward se-inject generated as they trace
    any other: through the forward's own parameters, where its wrappers (a check of the
    settings it read, a choice between its training and eval traces) take (*args, **kwargs).
    They once failed there with fx's 'Proxy object cannot be iterated'."""
    model = getattr(_FlagInlineNet(), mode)()
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["se_gate"]
    wrapper = type(model).__dict__["forward"]
    assert model.forward.__func__ is not wrapper  # the generated forward, on the instance
    assert list(inspect.signature(model.forward).parameters) == ["x", "scale"]
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    before = model(x)
    again = se_inject.plan(model)
    assert len(again) == 0 and {s.reason for s in again.skipped} == {"already gated"}
    with pytest.warns(UserWarning, match="changed nothing|already"):
        se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["se_gate"]
    torch.manual_seed(0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    model.double = True
    with pytest.raises(se_inject.SEInjectError, match="double"):
        model(x)


class _Branch(torch.nn.Module):
    """A residual branch as a layer of its own class (one call in a block's trace)."""

    def __init__(self, c):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=1),
                                        torch.nn.BatchNorm2d(c), torch.nn.ReLU(),
                                        torch.nn.Conv2d(c, c, 3, padding=1),
                                        torch.nn.BatchNorm2d(c))

    def forward(self, x):
        return self.body(x)


class _CheckpointedBlock(torch.nn.Module):
    """``x + checkpoint(self.branch, x)``, the branch a container or a layer of its own; or its
    part checkpointed through something the trace goes into (checkpoint_sequential)."""

    def __init__(self, c, how, **settings):
        super().__init__()
        self.how, self.settings = how, settings
        branch = _Branch(c)
        self.branch = branch.body if how in ("container", "sequential") else branch

    def forward(self, x):
        if self.how == "sequential":
            y = torch.utils.checkpoint.checkpoint_sequential(self.branch, 2, x, **self.settings)
        elif self.how == "save_on_cpu":
            with torch.autograd.graph.save_on_cpu():
                y = self.branch(x)
        else:
            y = torch.utils.checkpoint.checkpoint(self.branch, x, **self.settings)
        return F.relu(x + y)


def _checkpointed_net(how, **settings):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                               _CheckpointedBlock(8, how, **settings),
                               _CheckpointedBlock(8, how, **settings))


def _code(forward) -> str:
    from se_inject.rewrite import RECIPE
    fn = forward.__func__
    while fn.__dict__[RECIPE][0] != "code":
        fn = fn.__dict__[RECIPE][1]
    return fn.__dict__[RECIPE][1]


@pytest.mark.parametrize("how", ["container", "layer"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_a_layer_called_through_torch_checkpoint_stays_checkpointed(how, reentrant):
    """A block that runs its branch through torch.utils.checkpoint.checkpoint keeps doing so
    once gated, with the same settings: the branch runs again in backward, and outputs and
    gradients are those of the same gated model without checkpointing. The generated forward
    once called the branch plainly, silently dropping the checkpoint and the memory it saves."""
    settings = {"use_reentrant": reentrant, "preserve_rng_state": False}
    model = _checkpointed_net(how, **settings).train()
    plain = copy.deepcopy(model)
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == ["1.se_gate", "2.se_gate"]
    code = _code(model[1].forward)
    assert "torch.utils.checkpoint.checkpoint(" in code and "preserve_rng_state = False" in code
    assert f"use_reentrant = {reentrant}" in code
    reference = copy.deepcopy(model)
    for block in reference[1:]:
        block.forward = types.MethodType(
            lambda self, x: F.relu(x + self.se_gate(self.branch(x))), block)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    runs = []
    model[1].branch.register_forward_pre_hook(lambda *_: runs.append(1))
    out, want = model(x), reference(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    out.square().mean().backward()
    want.square().mean().backward()
    assert len(runs) == 2  # once in forward, again in backward
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    saturate(model)
    with torch.no_grad():  # (training mode: norms of the batch, which both models see alike)
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_the_default_context_fn_given_is_checkpointed_as_without_it():
    model = _checkpointed_net("container", use_reentrant=False,
                              context_fn=torch.utils.checkpoint.noop_context_fn)
    se_inject.apply(model)
    code = _code(model[1].forward)
    assert "torch.utils.checkpoint.checkpoint(" in code and "context_fn" not in code


@pytest.mark.parametrize("how,settings,rules,match", [
    ("sequential", {"use_reentrant": False}, None, "inside torch.utils.checkpoint"),
    ("sequential", {"use_reentrant": True}, None, "CheckpointFunction"),
    ("container", {"use_reentrant": False}, ["inverted-residual-dw"], None),
    ("layer", {"use_reentrant": False, "context_fn": lambda: (contextlib.nullcontext(),
                                                              contextlib.nullcontext())},
     None, "inside torch.utils.checkpoint"),
    ("save_on_cpu", {}, None, "save_on_cpu"),
])
def test_checkpointing_a_gated_forward_cannot_keep_is_refused(how, settings, rules, match):
    """A checkpointed part of a forward that the trace goes into (checkpoint_sequential's
    segments), a container whose layers a gate goes between, or a checkpoint with a context of
    its own would run without its checkpointing in a generated forward, and a part under
    save_on_cpu() without its hooks: refused, the model unchanged."""
    model = _checkpointed_net(how, **settings)
    if rules:  # a gate inside the checkpointed container: an inverted residual's branch
        nn = torch.nn
        for block in model[1:]:
            block.branch = nn.Sequential(nn.Conv2d(8, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                         nn.Conv2d(32, 32, 3, padding=1, groups=32),
                                         nn.BatchNorm2d(32), nn.ReLU(), nn.Conv2d(32, 8, 1),
                                         nn.BatchNorm2d(8))
    keys = list(model.state_dict())
    with pytest.raises(RewriteError, match=match or r"checkpoints `branch` \(torch.utils"):
        se_inject.apply(model, rules=rules)
    assert list(model.state_dict()) == keys and "forward" not in model[1].__dict__


class _RandomBlock(torch.nn.Module):
    """A residual block that draws random numbers: from a tensor it makes itself (drawn once
    by a trace) or from one made on its input's device (traced, drawn at every call)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.branch = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1),
                                          torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                          torch.nn.Conv2d(8, 8, 3, padding=1))

    def forward(self, x):
        if self.how == "layer drop" and self.training and torch.rand(1) < 0.5:
            return x
        noise = torch.randn(8, 1, 1, device=x.device) if self.how == "traced" else \
            torch.randn(8, 1, 1) if self.how == "noise" else 0.0
        return x + self.branch(x) + noise


@pytest.mark.parametrize("how", ["layer drop", "noise"])
def test_a_block_drawing_random_numbers_a_trace_would_fix_is_refused(how):
    """``if self.training and torch.rand(1) < p: return x`` (layer drop) or noise made without
    the input: a trace draws them once, and the generated forward would drop the block at every
    call or never, or add the same noise at every call. Refused, the model unchanged; noise
    made on the input's device is traced and drawn anew at every call. Both were once gated
    with the trace's draw fixed."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _RandomBlock(how))
    keys = list(net.state_dict())
    with pytest.raises(RewriteError, match=r"`1` \(_RandomBlock\) draws random numbers"):
        se_inject.apply(net.eval())  # (planned in eval mode: the block is seen whatever drawn)
    assert list(net.state_dict()) == keys and "forward" not in net[1].__dict__
    traced = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _RandomBlock("traced"))
    se_inject.apply(traced.eval())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        first, second = traced(x), traced(x)
        assert not torch.equal(first, second)  # drawn at every call
        torch.manual_seed(3)
        got = traced(x)
        torch.manual_seed(3)
        block = traced[1]
        h = traced[0](x)
        noise = torch.randn(8, 1, 1)
        torch.testing.assert_close(got, h + block.se_gate(block.branch(h)) + noise,
                                   rtol=1e-6, atol=1e-6)


def test_random_numbers_another_thread_draws_meanwhile_do_not_count():
    """Only the tracing thread's draws refuse a block: apply() in one thread while another
    draws random numbers all along (a training loop's dropout) gates every time."""
    import sys
    import threading

    stop = threading.Event()

    def draw():
        while not stop.is_set():
            torch.rand(64).bernoulli_(0.5)

    other = threading.Thread(target=draw)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # the threads take turns often, inside every trace
    other.start()
    try:
        for _ in range(10):
            net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                      _RandomBlock("traced"), _RandomBlock("none"))
            se_inject.apply(net)
            assert len(gates(net)) == 2
    finally:
        stop.set()
        other.join()
        sys.setswitchinterval(interval)


def test_a_module_every_unit_shares_is_named_where_each_block_calls_it():
    """YOLO's conv units share one activation module (``Conv.default_act``), which fx names by
    its first path, ``layers.0.act``, in every block. Each gate scales its own bottleneck's
    ``cv2`` output, and the plan and messages name the activation as that block calls it."""
    from handwritten import YoloNet
    model = YoloNet().eval()
    randomize_norms(model)
    p = se_inject.plan(model)
    blocks = [f"layers.{i}.m.{j}" for i in (1, 3) for j in (0, 1)]
    assert [(s.block, s.tensor) for s in p] == [(b, f"{b}.cv2.act") for b in blocks]
    with pytest.raises(se_inject.SEInjectError, match=r"`layers\.1\.m\.0\.cv2\.act` \(SiLU\)"):
        se_inject.apply(copy.deepcopy(model), init="identity")
    se_inject.apply(model)
    m, x = model, torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for b in [m.get_submodule(b) for b in blocks]:
            b.se_gate.fc2.bias.normal_()
        h = x
        for layer in m.layers:
            if hasattr(layer, "m"):
                y = list(layer.cv1(h).chunk(2, 1))
                for b in layer.m:
                    y.append(y[-1] + paper_reference(b.cv2.act(b.cv2.bn(b.cv2.conv(
                        b.cv1(y[-1])))), b.se_gate))
                h = layer.cv2(torch.cat(y, 1))
            else:
                h = layer(h)
        torch.testing.assert_close(model(x), m.head(h.mean((2, 3))), rtol=1e-5, atol=1e-6)


def test_a_sequential_with_its_own_forward_owns_its_block_and_apply_says_its_gate_is_a_layer():
    """``class Block(nn.Sequential)`` returning ``relu(x + super().forward(x))``: the gate is
    registered on the block, so it is one of its layers (len 5 -> 6, ``block[-1]`` is the
    gate); apply() says so. The rewritten forward runs each layer and the gate once, as the
    paper's formula written out; remove() gives back the five layers and the plain output."""
    from handwritten import SequentialResidualNet
    model = SequentialResidualNet().eval()
    randomize_norms(model)
    plain, x = copy.deepcopy(model), torch.randn(2, 3, 16, 16)
    assert [s.tensor for s in se_inject.plan(model)] == ["blocks.0.4", "blocks.1.4"]
    with pytest.warns(UserWarning, match=r"nn\.Sequential with a forward of its own "
                      r"\(SequentialResidual `blocks\.0` and 1 more\).*"
                      r"`blocks\.0\[-1\]` is `blocks\.0\.se_gate`"):
        se_inject.apply(model)
    assert [len(b) for b in model.blocks] == [6, 6]
    assert all(b[-1] is b.se_gate for b in model.blocks)
    with torch.no_grad():
        for b in model.blocks:
            b.se_gate.fc2.bias.normal_()
        h = F.relu(model.stem(x))
        for b in model.blocks:
            y = h
            for layer in list(b)[:5]:
                y = layer(y)
            h = F.relu(h + paper_reference(y, b.se_gate))
        torch.testing.assert_close(model(x), model.head(h.mean((2, 3))), rtol=1e-5, atol=1e-6)
        se_inject.remove(model)
        assert [len(b) for b in model.blocks] == [5, 5]
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("check", ["isinstance", "jit_isinstance", "is_tensor", "tuple"])
def test_a_forward_that_checks_an_argument_is_a_tensor_is_traced_down_the_branch_it_runs(check):
    """``if isinstance(skip, torch.Tensor): y = y + skip`` (or torch.jit.isinstance, as
    MONAI's U-Net decoders check, or torch.is_tensor): fx's proxies are no tensors, so the
    trace, and the forward generated from it, left the sum out, and the gated model, its gates
    passing everything through, computed something else than the plain one. The trace answers
    as the model runs, and puts back what it changed to do so."""
    from handwritten import OptionalSkipNet
    model = OptionalSkipNet(check=check).eval()
    randomize_norms(model)
    plain, x = copy.deepcopy(model), torch.randn(2, 3, 16, 16)
    assert [(s.gate, s.tensor) for s in se_inject.plan(model)] == [
        ("b1.se_gate", "b1.body.4"), ("b2.se_gate", "b2.body.4"), ("b3.se_gate", "b3.body.4"),
        ("b3.se_gate_1", "b3.relu")]  # the last: the stem's map added to b3's output
    se_inject.apply(model)
    assert "isinstance" not in vars(handwritten) and torch.jit.isinstance is _JIT_ISINSTANCE
    assert torch.is_tensor is _IS_TENSOR
    twin = copy.deepcopy(model)
    saturate(twin)
    with torch.no_grad():
        assert torch.equal(twin(x), plain(x))
        m = model
        for _, g in gates(m):
            g.fc2.bias.normal_()
        s = F.relu(m.stem(x))
        h = F.relu(s + paper_reference(m.b1.body(s), m.b1.se_gate))
        h = F.relu(h + paper_reference(m.b2.body(h), m.b2.se_gate))
        h = F.relu(h + paper_reference(m.b3.body(h), m.b3.se_gate))
        h = paper_reference(h, m.b3.se_gate_1) + s
        torch.testing.assert_close(model(x), m.head(h.mean((2, 3))), rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_a_torchscript_part_is_called_whole_and_apply_names_it():
    """fx calls a scripted module whole (its compiled forward), so a block scripted inside an
    eager model gets no gate, which apply() said nothing of. It names the scripted parts that
    add or concatenate tensors (not a scripted conv and norm), gates the rest, and the model
    computes as before; a model whose every block is scripted is refused, naming them."""
    model = BlockNet().eval()
    randomize_norms(model)
    model.blocks[1] = torch.jit.script(model.blocks[1])
    model.stem = torch.jit.script(model.stem)  # nothing added inside: not named
    plain, x = copy.deepcopy(model), torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        se_inject.apply(model)
    said = [str(w.message) for w in caught if "TorchScript" in str(w.message)]
    assert len(said) == 1 and "1 part(s) of BlockNet" in said[0] and "(`blocks.1`)" in said[0]
    assert "`stem`" not in said[0]
    assert [n for n, _ in gates(model)] == ["blocks.0.se_gate", "blocks.2.se_gate"]
    saturate(model)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    whole = BlockNet()
    whole.blocks = torch.jit.script(whole.blocks)
    with pytest.raises(NoSitesError, match=r"TorchScript modules .*\(`blocks`\)"):
        se_inject.apply(whole)
    assert not gates(whole)


def test_a_size_unpacked_into_a_call_stays_a_traced_value():
    """``y.view(n, c, *x.size()[2:])``, as non-local blocks are written: fx cannot tell how
    many items to unpack, so the model was traced at its input size and the block kept
    without a gate (its generated forward would have held that size). A size is as long as
    its tensor has dimensions, whatever the input's size: its items stay traced values, the
    block's own trace unpacks as many, and the gated block computes the paper's gate at any
    size."""
    from handwritten import NonLocalNet
    model = NonLocalNet().eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    p = se_inject.plan(model)
    assert [(s.gate, s.tensor) for s in p.sites] == [("res.se_gate", "res.body.4.1"),
                                                    ("nl.se_gate", "nl.W.1")]
    assert p.skipped == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no block kept for reading a value
        se_inject.apply(model)
    m = model
    for _, g in gates(m):
        g.fc2.bias.data.normal_()
    for x in (torch.randn(2, 3, 32, 32), torch.randn(1, 3, 24, 40)):
        with torch.no_grad():
            h = F.relu(m.stem(x))
            h = F.relu(paper_reference(m.res.body(h), m.res.se_gate) + m.res.short(h))
            nl, n = m.nl, h.size(0)
            g = nl.g(h).view(n, nl.inter, -1).permute(0, 2, 1)
            theta = nl.theta(h).view(n, nl.inter, -1).permute(0, 2, 1)
            a = F.softmax(torch.matmul(theta, nl.phi(h).view(n, nl.inter, -1)), dim=-1)
            y = torch.matmul(a, g).permute(0, 2, 1).reshape(n, nl.inter, *h.shape[2:])
            h = paper_reference(nl.W(y), nl.se_gate) + h
            torch.testing.assert_close(model(x), m.head(h.mean((2, 3))), rtol=1e-5, atol=1e-6)
            assert model(x).shape == plain(x).shape


def test_a_size_unpacked_at_two_lengths_is_a_value_read():
    """A helper that unpacks a size where two layers call it, on a 4-D map and on a 3-D
    sequence: the length differs between calls at one place in the code, so no trace of a
    block may take it from the model's trace. The block that calls it is kept without a gate,
    as a forward that reads a value is, and the rest is gated."""
    from handwritten import SharedUnflattenNet
    model = SharedUnflattenNet().eval()
    randomize_norms(model)
    plain, x = copy.deepcopy(model), torch.randn(2, 3, 16, 16)
    p = se_inject.plan(model)
    assert [s.gate for s in p.sites] == ["res.se_gate"]
    assert [(s.merge, s.reason.split(" (")[0]) for s in p.skipped] == [
        ("mix.add", "its forward reads a traced value as a Python number")]
    with pytest.warns(UserWarning, match=r"1 block\(s\) of SharedUnflattenNet kept .*`mix.add`"):
        se_inject.apply(model)
    saturate(model)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("spelling", ["unpacked", "len", "list", "tuple", "loop"])
def test_a_size_taken_whole_stays_a_traced_value_however_spelled(spelling):
    """Each spelling needs the size's length only: the block is gated, and the gated model,
    its gates passing everything, computes what the plain one does at two input sizes."""
    from handwritten import ReshapedBranchNet
    model = ReshapedBranchNet(spelling).eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    p = se_inject.plan(model)
    assert [s.gate for s in p.sites] == ["block.se_gate"] and p.skipped == ()
    se_inject.apply(model)
    saturate(model)
    with torch.no_grad():
        for x in (torch.randn(2, 3, 16, 16), torch.randn(1, 3, 12, 20)):
            assert torch.equal(model(x), plain(x))


class _TimestepBlock(torch.nn.Module):
    """A diffusion U-Net's residual block (diffusers' ResnetBlock2D): the time embedding
    projected to one number per channel and added inside the branch."""

    def __init__(self, c=16, e=32):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.time = torch.nn.Linear(e, c)

    def forward(self, x, emb):
        h = self.conv1(F.silu(x)) + self.time(emb)[:, :, None, None]
        return x + self.conv2(F.silu(h))


class _TimestepUNet(torch.nn.Module):
    """forward(sample, timestep): the timestep one number per sample, or one for the batch."""

    def __init__(self, c=16, e=32):
        super().__init__()
        self.e = e
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.embed = torch.nn.Linear(e, e)
        self.blocks = torch.nn.ModuleList(_TimestepBlock(c, e) for _ in range(2))
        self.out = torch.nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, sample, timestep):
        if len(timestep.shape) == 0:
            timestep = timestep[None].expand(sample.shape[0])
        freqs = torch.exp(-torch.arange(self.e // 2, device=sample.device) / (self.e // 2))
        angles = timestep[:, None].float() * freqs[None]
        emb = self.embed(torch.cat([angles.sin(), angles.cos()], dim=1))
        h = self.stem(sample)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)


def test_an_input_of_one_number_per_sample_takes_an_empty_size():
    """``()`` in input_size is an input of one number per sample, (N,): a diffusion U-Net's
    timestep beside its image. It was refused as no size, and the U-Net could not be gated
    whole."""
    torch.manual_seed(0)
    model = _TimestepUNet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    with torch.no_grad():
        ref, ref_one = model(x, t), model(x, torch.tensor(7))
    sizes = [(3, 16, 16), ()]
    assert [s.block for s in se_inject.plan(model, input_size=sizes)] == ["blocks.0",
                                                                         "blocks.1"]
    se_inject.apply(model, input_size=sizes, init="identity")
    with torch.no_grad():
        assert torch.equal(model(x, t), ref) and torch.equal(model(x, torch.tensor(7)), ref_one)
    with pytest.raises(InvalidArgumentError, match=r"\(\) for one that is a number"):
        se_inject.plan(_TimestepUNet(), input_size=[(3, 16, 16), []])


def test_a_module_list_is_refused_with_the_modules_to_gate():
    """A ModuleList or ModuleDict has no forward: apply() named it a trace failure ("missing
    the required forward function") and suggested gating `model.0`, which is no Python."""
    net = _TimestepUNet()
    with pytest.raises(InvalidArgumentError,
                       match=r"ModuleList, which has no forward.*se_inject.apply\(model\[0\]\) "
                             r"\(_TimestepBlock\), se_inject.apply\(model\[1\]\)"):
        se_inject.apply(net.blocks)
    heads = torch.nn.ModuleDict({"a": _TimestepBlock(), "b": torch.nn.Linear(3, 3)})
    with pytest.raises(InvalidArgumentError, match=r"ModuleDict, which has no forward.*"
                                                   r"apply\(model\['a'\]\) \(_TimestepBlock\)$"):
        se_inject.plan(heads)
    assert not gates(net)


def test_a_trace_failure_names_the_items_of_a_module_list_to_gate():
    """Where the model's own forward cannot be traced, the parts to gate instead are its
    children, and the items of a child that has no forward, named as Python names them."""
    class Untraceable(_TimestepUNet):
        def forward(self, sample, timestep):
            if timestep.sum() > 0:  # a branch on a value
                return super().forward(sample, timestep)
            return sample

    with pytest.raises(TraceError, match=r"se_inject.apply\(model.blocks\[\d\]\); its parts "
                                         r"with convolutions: `blocks.\d` \(_TimestepBlock") as e:
        se_inject.apply(Untraceable(), input_size=[(3, 16, 16), ()])
    assert set(e.value.parts) == {"blocks.0", "blocks.1"}  # (a lone convolution is no part)


class _FrozenStemNet(torch.nn.Module):
    """XFeat's shape (kornia.feature.XFeatModel): its input made grey and normalised under
    ``with torch.no_grad():`` in the model's own forward, the residual sum after it; here with
    a layer of its own there too, never trained. ``after``: a second such block after the sum."""

    def __init__(self, after=False):
        super().__init__()
        nn = torch.nn
        self.after = after
        self.norm = nn.InstanceNorm2d(1)
        self.frozen = nn.Conv2d(1, 8, 3, padding=1)
        self.branch = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Conv2d(8, 4, 1)

    def stem(self, x):
        return self.frozen(self.norm(x.mean(dim=1, keepdim=True)))

    def forward(self, x):
        with torch.no_grad():
            x = self.stem(x)
        y = torch.relu(x + self.branch(x))
        if not self.after:
            return y
        with torch.no_grad():
            z = self.head(y)
        return y, z


class _GradOnInsideNet(_FrozenStemNet):
    """Gradients on again inside the ``with torch.no_grad():``: a trace sees no end to it."""

    def forward(self, x):
        with torch.no_grad():
            x = self.stem(x)
            with torch.enable_grad():
                x = x * 1.0
        return torch.relu(x + self.branch(x))


class _GradOffCalledNet(_FrozenStemNet):
    """Gradients turned off without a ``with``: off until the caller turns them on again."""

    def forward(self, x):
        torch._C._set_grad_enabled(False)
        x = self.stem(x)
        return torch.relu(x + self.branch(x))


def _hand_gated(model):
    """_FrozenStemNet's forward with its gate written by hand."""
    def forward(self, x):
        with torch.no_grad():
            x = self.stem(x)
        y = torch.relu(x + self.se_gate(self.branch(x)))
        if not self.after:
            return y
        with torch.no_grad():
            z = self.head(y)
        return y, z
    model.forward = types.MethodType(forward, model)
    return model


@pytest.mark.parametrize("after", [False, True])
def test_a_part_of_a_forward_run_without_gradients_runs_so_once_gated(after):
    """A part of a forward under ``with torch.no_grad():`` runs so in the gated forward too:
    its layers never train, nothing before it gets a gradient through it, and gradients are
    on again after it, also where it raised. fx records its ops but not the ``with``, and
    such models (XFeat) were refused whole."""
    torch.manual_seed(0)
    model = _FrozenStemNet(after).train()
    se_inject.apply(model, input_size=(3, 16, 16))
    assert [n for n, _ in gates(model)] == ["se_gate"]
    assert "with torch.no_grad():" in _code(model.forward)
    reference = _hand_gated(copy.deepcopy(model))
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out, want = model(x), reference(xr)
    y, z = out if after else (out, None)
    if after:
        assert not z.requires_grad
        torch.testing.assert_close(z, want[1], rtol=0, atol=0)
        want = want[0]
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    y.square().mean().backward()
    want.square().mean().backward()
    assert x.grad is None and xr.grad is None
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if name.startswith(("frozen.", "head.")):
            assert p.grad is None and grads[name].grad is None, name
        else:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=0, atol=0, msg=name)
    assert model.se_gate.fc2.bias.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="expected 3D or 4D input"):  # (the instance norm)
        model(torch.randn(2, 3, 2, 16, 16))
    assert torch.is_grad_enabled()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    se_inject.remove(model)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("cls", [_GradOnInsideNet, _GradOffCalledNet])
def test_gradients_turned_off_in_a_way_a_with_block_cannot_write_are_refused(cls):
    """Gradients on again inside a ``with torch.no_grad():`` block look to a trace like the
    caller's mode, and a forward that turns them off without a ``with`` returns so: the
    generated forward would run part of it otherwise. Refused, the model unchanged."""
    model = cls()
    keys = list(model.state_dict())
    try:
        with pytest.raises(RewriteError, match=r"runs part of its forward in a mode of its own "
                                               r"\(from `mean` on: gradients off"):
            se_inject.apply(model, input_size=(3, 16, 16))
    finally:
        torch.set_grad_enabled(True)
    assert list(model.state_dict()) == keys and "forward" not in model.__dict__


@pytest.mark.parametrize("join,why", [("chain", "computed on the way to another (a dense"),
                                      ("slices", "share layers (a channel split")])
def test_branches_sharing_an_operand_or_pieces_of_one_tensor_are_no_inception_module(join, why):
    """SSH's branches share their first convolution and are an inception module (above);
    concatenating that convolution's output too is a dense connection, and slices of one
    tensor are a channel split: neither is gated."""
    model = handwritten.SSHNet(join).eval()
    plan = se_inject.plan(model)
    assert not [s for s in plan if s.rule == "inception"]
    assert [s.reason for s in plan.skipped if why in s.reason] and \
        all(s.rule != "inception" or why in s.reason for s in plan.skipped)
