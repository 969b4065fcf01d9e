"""A catalogue of bad inputs across apply(), rule files, checkpoints and the command line. For
each: the error's type, a message that names the input, a non-zero exit from the CLI, and
nothing changed or written."""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
import random
import re
from dataclasses import dataclass
from random import uniform
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch
from torch import nn

import se_inject
from se_inject.checkpoint import CheckpointError
from se_inject.cli import main
from se_inject.errors import (InvalidArgumentError, NoSitesError, NotGatedError, RewriteError,
                              RuleError, SEInjectError, TraceError)
from se_inject.identity import IdentityInitError

from handwritten import BlockNet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fingerprint(model: nn.Module) -> tuple:
    return (type(model), [(k, v.clone()) for k, v in model.state_dict().items()],
            [(n, type(m)) for n, m in model.named_modules()],
            [n for n, m in model.named_modules() if "forward" in m.__dict__])


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[2] == b[2] and a[3] == b[3] and len(a[1]) == len(b[1]) and \
        all(ka == kb and torch.equal(va, vb) for (ka, va), (kb, vb) in zip(a[1], b[1]))


class _Branchy(nn.Module):
    """A forward that branches on a tensor's value: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.c(x)
        if y.sum() > 0:
            return y + x
        return y


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.b(self.a(x)) + x


class _Video3D(nn.Module):
    """A residual block of 3-D convolutions: its sum is of 5-D tensors (N, C, T, H, W)."""
    conv, in_chans = nn.Conv3d, 3

    def __init__(self):
        super().__init__()
        self.stem = self.conv(self.in_chans, 8, 3, padding=1)
        self.c1, self.c2 = self.conv(8, 8, 3, padding=1), self.conv(8, 8, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return x + self.c2(torch.relu(self.c1(x)))


class _Audio1D(_Video3D):
    """The same of 1-D convolutions: its sum is of 3-D tensors (N, C, L), as a transformer's
    token sums are, but made by convolutions."""
    conv, in_chans = nn.Conv1d, 1


class _WindowAttention(nn.Module):
    """A Swin-style window attention on channels-last tokens: its scores are viewed as 5-D
    (batch, windows, heads, tokens, tokens) to add relative-position logits computed from the
    queries (BoTNet's) and a mask per window; no convolution makes them, so they are not a 3-D
    CNN's volumes. (The mask, a buffer, is no operand of a merge: one map plus a constant.)"""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(8, 24), nn.Linear(8, 8)
        self.rel = nn.Parameter(torch.randn(16, 8))
        self.register_buffer("mask", torch.zeros(4, 16, 16))

    def forward(self, x):  # (N, 8, 8, 8) channels-last: four 4 x 4 windows
        n = x.shape[0]
        w = x.view(n, 2, 4, 2, 4, 8).permute(0, 1, 3, 2, 4, 5).reshape(n * 4, 16, 8)
        q, k, v = self.qkv(w).chunk(3, dim=-1)
        a = (q @ k.transpose(-2, -1)).view(n, 4, 1, 16, 16) + \
            (q @ self.rel.t()).view(n, 4, 1, 16, 16) + self.mask[None, :, None]
        y = self.proj(a.view(n * 4, 16, 16).softmax(-1) @ v)
        return x + y.view(n, 2, 2, 4, 4, 8).permute(0, 1, 3, 2, 4, 5).reshape(n, 8, 8, 8)


class _TokensBackToMap(nn.Module):
    """A transformer stage whose tokens, (N, H·W, C), are viewed as (N, C, H, W) without their
    channels moved back in front, and concatenated with a convolution's map: neither a
    channel-first nor a channels-last map of that size, so its channels cannot be told."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.mix, self.head = nn.Linear(8, 8), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        n, c, h, w = x.shape
        t = self.mix(x.flatten(2).transpose(1, 2))  # (N, H*W, C) tokens
        return self.head(torch.cat([self.conv(x), t.reshape(n, c, h, w)], 1))


@dataclass
class ApplyCase:
    id: str
    build: Callable[[], nn.Module]
    kwargs: dict
    error: type
    names: str      # the part of the message that names the bad input


APPLY_CASES = [
    ApplyCase("ratio-zero", BlockNet, {"ratio": 0}, InvalidArgumentError, "not 0"),
    ApplyCase("ratio-string", BlockNet, {"ratio": "16"}, InvalidArgumentError, "not '16'"),
    ApplyCase("ratio-per-stage-bad", BlockNet, {"ratio": {2: 0}}, InvalidArgumentError,
              "{2: 0}"),
    ApplyCase("stages-absent", BlockNet, {"stages": [9]}, InvalidArgumentError, "stages [9]"),
    ApplyCase("stages-word", BlockNet, {"stages": "first"}, InvalidArgumentError, "'first'"),
    ApplyCase("init", BlockNet, {"init": "zeros"}, InvalidArgumentError, "'zeros'"),
    ApplyCase("position", BlockNet, {"position": "middle"}, InvalidArgumentError, "'middle'"),
    ApplyCase("gate", BlockNet, {"gate": "cbam"}, InvalidArgumentError, "'cbam'"),
    ApplyCase("squeeze", BlockNet, {"squeeze": "median"}, InvalidArgumentError, "'median'"),
    ApplyCase("excite", BlockNet, {"excite": "relu"}, InvalidArgumentError, "'relu'"),
    ApplyCase("divisor", BlockNet, {"divisor": 0}, InvalidArgumentError, "divisor"),
    ApplyCase("min-channels-past-int64", BlockNet, {"min_channels": 10 ** 30},
              InvalidArgumentError, "min_channels=1" + "0" * 30),
    ApplyCase("divisor-past-int64", BlockNet, {"divisor": 10 ** 30}, InvalidArgumentError,
              "divisor=1" + "0" * 30),
    ApplyCase("tanh-identity", BlockNet, {"excite": "tanh", "init": "identity"},
              InvalidArgumentError, "tanh"),
    ApplyCase("fused", BlockNet, {"fused": "yes"}, InvalidArgumentError, "'yes'"),
    ApplyCase("input-size", BlockNet, {"input_size": (3, 0, 32)}, InvalidArgumentError,
              "(3, 0, 32)"),
    ApplyCase("input-size-past-int64", BlockNet, {"input_size": (3, 10 ** 12, 10 ** 12)},
              InvalidArgumentError, "more than a tensor can hold"),
    ApplyCase("unknown-rule", BlockNet, {"rules": ["no-such-rule"]}, RuleError,
              "no-such-rule"),
    ApplyCase("no-cnn-blocks", _MLP, {"input_size": (8,)}, NoSitesError, "_MLP"),
    ApplyCase("untraceable", _Branchy, {}, TraceError, "_Branchy"),
    ApplyCase("video-3d", _Video3D, {"input_size": (3, 4, 16, 16)}, NoSitesError,
              "_Video3D has no residual or inception-style block of 2-D feature maps: 1 of its "
              "sums or concatenations are of 5-D tensors"),
    ApplyCase("window-attention-5d", _WindowAttention, {"input_size": (8, 8, 8)},
              NoSitesError, "_WindowAttention has no residual or inception-style block: the "
              "traced graph holds no add or channel concatenation of 4-D convolutional feature "
              "maps (2 sums"),
    ApplyCase("tokens-back-to-a-map", _TokensBackToMap, {"input_size": (3, 6, 6)},
              NoSitesError, "maps (1 sum or concatenation of other tensors). It joins a "
              "feature map with a 4-D tensor made by a reshape se-inject cannot follow (tokens "
              "viewed as a map without their channels moved back in front, or at another "
              "size), in which it cannot tell which dimension holds the channels. se-inject "
              "gates CNN blocks"),
    ApplyCase("audio-1d", _Audio1D, {"input_size": (1, 64)}, NoSitesError,
              "_Audio1D has no residual or inception-style block of 2-D feature maps: its "
              "convolutions are 1-D"),
    # apply's default input is an image: the first layer that cannot take one says what it takes
    ApplyCase("audio-1d-default-size", _Audio1D, {}, TraceError,
              "The model ran on an input of shape (2, 3, 224, 224) (batch 2, then input_size). "
              "`stem` is a Conv1d, which takes a 3-D input (N, C, L), and was handed a 4-D one: "
              "pass input_size=(C, L);"),
    ApplyCase("video-3d-default-size", _Video3D, {}, TraceError,
              "`stem` is a Conv3d, which takes a 5-D input (N, C, D, H, W), and was handed a 4-D "
              "one: pass input_size=(C, D, H, W);"),
    # rules that look at none of the model's merges say which rule does
    ApplyCase("rules-that-miss-the-sums", lambda: timm.create_model("resnet18"),
              {"rules": ["inception"]}, NoSitesError,
              "no block of ResNet matched the rules passed: they look at channel "
              "concatenations only, and its traced graph holds no channel concatenation of 4-D "
              "feature maps. It holds 8 sums of 4-D feature maps, which no rule passed looks "
              "at: the residual rule looks at them; pass it too"),
    ApplyCase("rules-that-miss-the-concatenations", lambda: timm.create_model("densenet121"),
              {"rules": ["residual"]}, NoSitesError,
              "It holds 58 channel concatenations of 4-D feature maps, which no rule passed "
              "looks at: the inception rule looks at them"),
    # stages of a model with no site at all: the reason there is none, not the stages
    ApplyCase("stages-of-a-model-without-sites", lambda: timm.create_model("densenet121"),
              {"stages": [3]}, NoSitesError,
              "58 × inception: the block's entry is itself an operand (a dense connection)"),
    ApplyCase("identity-without-a-producer", lambda: timm.create_model("inception_v3"),
              {"init": "identity"}, IdentityInitError, "se_gate"),
]


@pytest.mark.parametrize("case", APPLY_CASES, ids=[c.id for c in APPLY_CASES])
def test_apply_refuses_and_leaves_the_model_as_it_was(case):
    model = case.build()
    before = _fingerprint(model)
    with pytest.raises(case.error) as info:
        se_inject.apply(model, **case.kwargs)
    assert isinstance(info.value, SEInjectError)
    assert case.names in str(info.value), str(info.value)
    assert _same(before, _fingerprint(model))


@pytest.mark.parametrize("kwargs,names", [({"measure": torch.zeros(2)}, "measure must be"),
                                          ({"measure": "yes"}, "'yes'"),
                                          ({"measure_rounds": 0}, "measure_rounds"),
                                          ({"measure_rounds": 2.5}, "2.5")])
def test_cost_refuses_a_bad_measure_option(kwargs, names):
    with pytest.raises(InvalidArgumentError, match=re.escape(names)):
        se_inject.cost(BlockNet(), input_size=(3, 16, 16), **kwargs)


class _LazyNet(nn.Module):
    """A residual block whose first convolution is lazy: it makes its weights on first use."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1, self.c2 = nn.LazyConv2d(16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return x + self.c2(torch.relu(self.c1(x)))


def test_a_lazy_layer_without_weights_is_named_and_nothing_changes():
    """Shape propagation would make the lazy layer's weights (and change its class) from meta
    tensors: apply() stops first, says what to do, and the layer is still waiting for its
    first input."""
    model = _LazyNet()
    with pytest.raises(TraceError, match=r"`c1` \(LazyConv2d\) has not made its weights yet.*"
                                         r"Run the model once"):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert type(model.c1) is nn.LazyConv2d and model.c1.has_uninitialized_params()
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert [n for n, _ in model.named_modules()] == ["", "stem", "c1", "c2"]
    x = torch.randn(2, 3, 16, 16)
    model(x)                                             # the lazy layer makes its weights
    with torch.no_grad():
        y0 = model(x)
    se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    assert type(model.c1) is nn.Conv2d and hasattr(model, "se_gate")
    with torch.no_grad():
        assert torch.equal(model(x), y0)


class _CountingBlock(nn.Module):
    """A residual block that keeps count of its calls, in a buffer or a plain attribute: a
    forward generated from its trace would not."""

    def __init__(self, count_in: str):
        super().__init__()
        self.count_in = count_in
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.register_buffer("seen", torch.zeros(()))
        self.calls, self.last = 0, torch.zeros(2)       # (a tensor that is not a buffer)
        self.kept, self.by_name = [], {}

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        if self.count_in == "buffer":
            self.seen += 1
        elif self.count_in == "attribute":
            self.calls += 1
        elif self.count_in == "tensor to number":
            self.last = 1
        elif self.count_in == "kept tensor":      # what it computed, kept for its caller
            self.last = y.detach()
        elif self.count_in == "kept in a list":
            self.kept.append(y)
        elif self.count_in == "kept in a dict":
            self.by_name["branch"] = y.mean()
        return x + y


class _CountingNet(nn.Module):
    def __init__(self, count_in: str):
        super().__init__()
        self.stem, self.block = nn.Conv2d(3, 16, 3, padding=1), _CountingBlock(count_in)
        self.steps = 0                                    # the root counts too, outside blocks

    def forward(self, x):
        self.steps += 1
        return self.block(self.stem(x))


@pytest.mark.parametrize("count_in,name", [("buffer", "seen"), ("attribute", "calls"),
                                           ("tensor to number", "last"), ("kept tensor", "last"),
                                           ("kept in a list", "kept"),
                                           ("kept in a dict", "by_name")])
def test_a_block_that_updates_its_own_state_is_refused_and_nothing_changes(count_in, name):
    # A value the forward computed and kept (the last three) was dropped without a word: the
    # block was gated, and its generated forward kept nothing.
    model = _CountingNet(count_in)
    before = _fingerprint(model)
    with pytest.raises(RewriteError, match=rf"`block` \(_CountingBlock\) changes its own state "
                                           rf"when it runs \(`{name}`\)"):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert _same(before, _fingerprint(model))
    assert (model.steps, model.block.calls, float(model.block.seen)) == (0, 0, 0.0)
    assert torch.equal(model.block.last, torch.zeros(2))
    assert model.block.kept == [] and model.block.by_name == {}
    model(torch.randn(1, 3, 16, 16))                      # the model counts as it did
    assert model.steps == 1 and model.block.calls + float(model.block.seen) == \
        (count_in in ("buffer", "attribute"))


class _Reverse(torch.autograd.Function):
    """Gradient reversal: the identity forward, the negated gradient backward."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -grad


class _ModalBlock(nn.Module):
    """A residual block that runs its branch in a mode of its own: ops a trace records, under
    a ``with`` it does not."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.c1, self.c2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)

    def _branch(self, x):
        return self.c2(torch.relu(self.c1(x)))

    def forward(self, x):
        if self.mode == "no_grad":
            with torch.no_grad():
                y = self._branch(x)
        elif self.mode == "autocast off":
            with torch.autocast("cpu", enabled=False):
                y = self._branch(x.float())
        elif self.mode == "autocast bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = self._branch(x)
        elif self.mode == "cuda autocast off":
            with torch.autocast("cuda", enabled=False):
                y = self._branch(x)
        else:
            y = self._branch(x)
        return x + y


class _ModeReadingBlock(_ModalBlock):
    def forward(self, x):
        y = self._branch(x)
        if torch.is_autocast_enabled("cpu") or not torch.is_grad_enabled():
            y = y.detach()
        return x + y


class _FxReadingBlock(_ModalBlock):
    """A branch taken only while torch.fx traces: true during apply(), false afterwards."""

    def forward(self, x):
        y = self._branch(x)
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            y = y * 2
        return x + y


class _RandomDepthBlock(_ModalBlock):
    """Stochastic depth drawn with Python's random: a trace draws once."""

    def forward(self, x):
        if self.training and random.random() < 0.5:
            return x
        return x + self._branch(x)


class _FunctionBlock(_ModalBlock):
    def forward(self, x):
        return x + self._branch(_Reverse.apply(x))


class _HiddenFunctionBlock(_ModalBlock):
    """The Function reached through an attribute: its name is not in the forward's code."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self.reverse = _Reverse.apply

    def forward(self, x):
        return x + self._branch(self.reverse(x))


def _coin() -> float:
    return uniform(0, 1)  # a draw whose code does not name `random`


def _drop_at_random(x, branch, training: bool):
    """Stochastic depth written as a module-level function: the block's code names no draw."""
    if training and _coin() < 0.5:
        return x
    return x + branch


def _detach_without_grad(y):
    return y if torch.is_grad_enabled() else y.detach()


def _keep_at_random(branch, training: bool):
    """A draw inside a function that the trace records as one call (torch.fx.wrap below, or
    ``autowrap_functions``): it runs at every call of the block, as in the plain model."""
    return branch * 0 if training and random.random() < 0.5 else branch


def keep_at_random(branch, training: bool):  # public: fx autowraps public names only
    return branch * 0 if training and random.random() < 0.5 else branch


torch.fx.wrap("_keep_at_random")


class _HelperDrawBlock(_ModalBlock):
    def forward(self, x):
        return _drop_at_random(x, self._branch(x), self.training)


class _Dropper:
    """Stochastic depth as a plain object (not a module) the block holds and calls."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, x, branch, training: bool):
        return self.drop(x, branch, training)

    def drop(self, x, branch, training: bool):
        return x if training and self.coin() < self.p else x + branch

    def coin(self):
        return uniform(0, 1)


class _HeldDrawBlock(_ModalBlock):
    """The helper held by the block: ``self.drop(...)`` names no global function."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self.drop = (functools.partial(_drop_at_random) if mode == "held partial"
                     else _drop_at_random)

    def forward(self, x):
        return self.drop(x, self._branch(x), self.training)


class _HeldObjectBlock(_ModalBlock):
    """An object held by the block, called (``self.dropper(...)``) or through a method
    (``self.dropper.drop(...)``)."""

    def __init__(self, mode: str):
        super().__init__(mode)
        self.dropper = _Dropper(0.5)

    def forward(self, x):
        if self.mode == "held object":
            return self.dropper(x, self._branch(x), self.training)
        return self.dropper.drop(x, self._branch(x), self.training)


class _HelperModeBlock(_ModalBlock):
    def forward(self, x):
        return x + _detach_without_grad(self._branch(x))


class _WrappedDrawBlock(_ModalBlock):
    def forward(self, x):
        return x + _keep_at_random(self._branch(x), self.training)


class _AutowrappedDrawBlock(_ModalBlock):
    def forward(self, x):
        return x + keep_at_random(self._branch(x), self.training)


class _ModalNet(nn.Module):
    def __init__(self, mode: str):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.block = {"reads": _ModeReadingBlock, "reads fx": _FxReadingBlock, "draws": _RandomDepthBlock,
                      "function": _FunctionBlock, "hidden function": _HiddenFunctionBlock,
                      "helper draws": _HelperDrawBlock, "helper reads": _HelperModeBlock,
                      "held draws": _HeldDrawBlock, "held partial": _HeldDrawBlock,
                      "held object": _HeldObjectBlock, "held object's method": _HeldObjectBlock,
                      "wrapped draw": _WrappedDrawBlock, "autowrapped draw": _AutowrappedDrawBlock}.get(
            mode, _ModalBlock)(mode)

    def forward(self, x):
        return self.block(self.stem(x))


@pytest.mark.parametrize("mode,why", [
    ("no_grad", "from `c1` on: gradients off, as torch.no_grad"),
    ("autocast off", "from `float_1` on: cpu autocast off"),
    ("autocast bf16", "from `c1` on: cpu autocast to bfloat16"),
    ("cuda autocast off", "from `c1` on: cuda autocast off"),
])
@pytest.mark.parametrize("caller", ["grad", "no_grad", "autocast"])
def test_a_block_that_runs_part_of_its_forward_in_a_mode_of_its_own_is_refused(mode, why, caller):
    """A forward generated from the trace would run the branch in the caller's mode: gradients
    through a branch the block keeps out of training, or autocast's half precision where the
    block asks for float32. Refused whatever mode apply() is called in, nothing changed."""
    model = _ModalNet(mode)
    before = _fingerprint(model)
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad,
           "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[caller]
    with pytest.raises(RewriteError, match=rf"`block` \(_ModalBlock\) runs part of its forward "
                                           rf"in a mode of its own \({re.escape(why)}"):
        with ctx():
            se_inject.apply(model, input_size=(3, 16, 16))
    assert _same(before, _fingerprint(model))
    assert not torch.is_autocast_enabled("cpu") and torch.is_grad_enabled()
    assert torch.get_autocast_dtype("cpu") == torch.bfloat16  # torch's default, given back


def test_a_block_that_reads_the_mode_it_runs_in_is_refused():
    """Its generated forward would keep the branch its trace took in every mode."""
    model = _ModalNet("reads")
    before = _fingerprint(model)
    with pytest.raises(RewriteError, match=r"`block` \(_ModeReadingBlock\) reads the mode it runs "
                                           r"in \(`torch.is_autocast_enabled\(\)`, "
                                           r"`torch.is_grad_enabled\(\)` in "
                                           r"`_ModeReadingBlock.forward`\)"):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert _same(before, _fingerprint(model))


def test_a_block_that_asks_whether_fx_is_tracing_it_is_refused():
    """apply()'s trace takes the branch for tracing, which no later call takes: gated, the
    block added twice its branch at every call, so that even identity-initialised gates
    changed its outputs; refused, it is left as it was."""
    model = _ModalNet("reads fx")
    before = _fingerprint(model)
    with pytest.raises(RewriteError, match=r"`block` \(_FxReadingBlock\) asks whether torch.fx is "
                                           r"tracing it .* in `_FxReadingBlock.forward`\)"):
        se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    assert _same(before, _fingerprint(model))


@pytest.mark.parametrize("mode,why", [
    ("function", r"`block` \(_FunctionBlock\) calls a torch.autograd.Function \(`_Reverse`\)"),
    ("hidden function", r"`block` \(_HiddenFunctionBlock\) runs part of its forward in a mode of "
                        r"its own \(from `view_as` on: inside `_Reverse`, the forward of a "
                        r"torch.autograd.Function"),
])
def test_a_block_that_calls_an_autograd_function_is_refused(mode, why):
    """A generated forward would keep the Function's ops and lose its backward: before, the
    gated block passed gradients on unreversed. Found by name in the forward's code, or, where
    the code reaches it otherwise, by autograd running its forward with gradients off."""
    model = _ModalNet(mode)
    before = _fingerprint(model)
    with pytest.raises(RewriteError, match=why):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert _same(before, _fingerprint(model))


@pytest.mark.parametrize("seed,error,why", [
    (0, RewriteError, r"`block` \(_RandomDepthBlock\) draws Python's or NumPy's random numbers"),
    (1, NoSitesError, r"no residual or inception-style block.* Note: _RandomDepthBlock draw\(s\) "
                      r"Python's or NumPy's random numbers in the forward"),
])
def test_a_block_that_draws_python_random_numbers_is_refused(seed, error, why):
    """Its trace draws once, and its generated forward would keep the branch the trace took
    at every call in training, where the block drops it half the time. Where the model's trace
    drew the drop, the block is not seen at all, and the error says why it may be missing."""
    model = _ModalNet("draws").train()
    before = _fingerprint(model)
    random.seed(seed)  # random.random() is 0.84 (keep the branch) or 0.13 (drop it) first
    with pytest.raises(error, match=why):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert _same(before, _fingerprint(model))


@pytest.mark.parametrize("mode,seed,error,why", [
    ("helper draws", 0, RewriteError,
     r"`block` \(_HelperDrawBlock\) draws Python's or NumPy's random numbers \(in "
     r"`test_bad_inputs._coin`\)"),
    ("helper draws", 1, NoSitesError, r"Note: _HelperDrawBlock draw\(s\) Python's or NumPy's"),
    ("held draws", 0, RewriteError,
     r"`block` \(_HeldDrawBlock\) draws Python's or NumPy's random numbers \(in "
     r"`test_bad_inputs._coin`\)"),
    ("held partial", 0, RewriteError, r"`block` \(_HeldDrawBlock\) draws Python's"),
    ("held draws", 1, NoSitesError, r"Note: _HeldDrawBlock draw\(s\) Python's or NumPy's"),
    ("held object", 0, RewriteError,
     r"`block` \(_HeldObjectBlock\) draws Python's or NumPy's random numbers \(in "
     r"`_HeldObjectBlock.dropper \(_Dropper.coin\)`\)"),
    ("held object's method", 0, RewriteError,
     r"draws Python's or NumPy's random numbers \(in `_HeldObjectBlock.dropper \(_Dropper.coin\)`\)"),
    ("helper reads", 0, RewriteError,
     r"`block` \(_HelperModeBlock\) reads the mode it runs in \(`torch.is_grad_enabled\(\)` "
     r"in `test_bad_inputs._detach_without_grad`\)"),
])
def test_a_draw_or_mode_read_in_a_function_the_forward_calls_is_refused(mode, seed, error, why):
    """The module-level functions a forward calls, and the functions a block holds in its
    attributes (and the methods of plain objects it holds), are traced through as its own code
    is: before, a block whose stochastic depth was such a function or object (drawing with
    ``from random import uniform``) was gated and never dropped its branch again."""
    model = _ModalNet(mode).train()
    before = _fingerprint(model)
    random.seed(seed)  # the first draw keeps the branch (0.84) or drops it (0.13)
    with pytest.raises(error, match=why):
        se_inject.apply(model, input_size=(3, 16, 16))
    assert _same(before, _fingerprint(model))


@pytest.mark.parametrize("mode", ["wrapped draw", "autowrapped draw"])
def test_a_draw_in_a_function_the_trace_records_as_one_call_is_gated_and_still_drawn(mode):
    """A function registered with torch.fx.wrap, or passed as one of apply()'s
    autowrap_functions, is called by the gated forward at every call: its draws are not the
    trace's, so the block is gated and drops its branch about half the time, as before."""
    model = _ModalNet(mode).train()
    extra = {"autowrap_functions": [keep_at_random]} if mode != "wrapped draw" else {}
    se_inject.apply(model, input_size=(3, 16, 16), **extra)
    assert hasattr(model.block, "se_gate")
    x = torch.randn(1, 16, 8, 8)
    random.seed(0)
    dropped = sum(torch.equal(model.block(x), x) for _ in range(200))
    assert 60 < dropped < 140


def test_a_block_in_the_callers_mode_is_gated_and_apply_gives_the_modes_back():
    model = _ModalNet("none")
    with torch.autocast("cpu", dtype=torch.float16), torch.no_grad():
        se_inject.apply(model, input_size=(3, 16, 16))
        assert torch.is_autocast_enabled("cpu") and not torch.is_grad_enabled()
        assert torch.get_autocast_dtype("cpu") == torch.float16
    assert hasattr(model.block, "se_gate")


def test_tracing_does_not_count_as_a_call_and_a_counter_outside_the_blocks_keeps_counting():
    model = _CountingNet("nothing")
    se_inject.apply(model, input_size=(3, 16, 16))
    assert hasattr(model.block, "se_gate") and model.steps == 0
    model(torch.randn(1, 3, 16, 16))
    assert model.steps == 1


@pytest.mark.parametrize("name,size,why", [
    ("resnet18", (1, 64, 64), r"`self.conv1\(x\)`.*Conv2d takes 3 channels, and would get 1"),
    # torch's own reason, worded by release (2.14: the kernel; 2.11: the output size)
    ("convnext_atto", (3, 16, 16),
     r"stages.3.downsample.1.*(Kernel size can't be greater|Output size is too small)"),
])
def test_an_input_size_the_model_cannot_take_is_named_and_nothing_changes(name, size, why):
    # The model itself would refuse such an input; its gates were once placed anyway (shapes
    # of wrong channels, or of maps shrunk to nothing, passed through convolutions' shortcut).
    model = timm.create_model(name, pretrained=False)
    before = _fingerprint(model)
    with pytest.raises(TraceError, match=why) as exc:
        se_inject.apply(model, input_size=size)
    # the message names the input the model ran on, so that a user sees what to change
    assert f"an input of shape {(2, *size)} (batch 2, then input_size)" in str(exc.value)
    assert "While executing" not in str(exc.value)
    assert _same(before, _fingerprint(model))


class _Detector(nn.Module):
    """A forward over a list of images that branches on their number: fx cannot trace it,
    while its backbone traces as any CNN does."""

    def __init__(self):
        super().__init__()
        self.backbone, self.head = BlockNet(), nn.Sequential(nn.Conv2d(16, 4, 1))
        self.stem = nn.Conv2d(3, 3, 1)

    def forward(self, images: list):
        if len(images) == 0:
            return []
        return [self.backbone(self.stem(i[None])) for i in images]


def test_an_untraceable_forward_names_the_parts_to_gate_instead():
    model = _Detector()
    before = _fingerprint(model)
    with pytest.raises(TraceError) as info:
        se_inject.apply(model)
    msg = str(info.value)
    assert "could not trace _Detector: it failed in the model's own forward" in msg
    assert "se_inject.apply(model.backbone)" in msg and "`head` (Sequential" in msg
    assert "`stem`" not in msg                        # a lone convolution holds no block
    assert _same(before, _fingerprint(model))
    se_inject.apply(model.backbone)
    assert any(isinstance(m, se_inject.ChannelGate) for m in model.backbone.modules())


def test_not_a_module_and_not_gated():
    with pytest.raises(InvalidArgumentError, match="not str"):
        se_inject.apply("resnet50")
    model = BlockNet()
    with pytest.raises(NotGatedError, match="BlockNet holds no se-inject gates"):
        se_inject.remove(model)


# ------------------------------------------------------------------------- rule files

RULE_CASES = {
    "python-tag": ("schema: 1\nname: x\nsummary: s\nmatch: !!python/object:os.system {}\n",
                   "rule.yaml:4"),
    "missing-gate": ("schema: 1\nname: x\nsummary: s\nmatch:\n  merge: add\n", "gate"),
    "bad-merge": ("schema: 1\nname: x\nsummary: s\nmatch:\n  merge: sum\ngate:\n  at: branch\n",
                  "'sum'"),
    "not-yaml": ("schema: 1\nname: [unclosed\n", "rule.yaml"),
    "bad-position": ("schema: 1\nname: x\nsummary: s\nmatch:\n  merge: add\ngate:\n"
                     "  at: middle\n", "'middle'"),
    "nested-past-the-stack": ("schema: 1\nname: x\nsummary: s\nmatch: " + "[" * 50_000
                              + "]" * 50_000 + "\n", "nested deeper"),
    # nine levels of nine aliases: 9**9 paths through a graph of 81 nodes, then a code tag
    "billion-laughs": ("schema: 1\nname: x\nsummary: s\nyield_to:\n  - &l0 [" + ", ".join(
        ["lol"] * 9) + "]\n" + "".join(f"  - &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
                                       for i in range(1, 9))
                       + "  - !!python/name:os.system ''\n", "rule.yaml:14"),
}


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_bad_rule_files(case, tmp_path, capsys):
    text, names = RULE_CASES[case]
    path = tmp_path / "rule.yaml"
    path.write_text(text)
    model = BlockNet()
    before = _fingerprint(model)
    with pytest.raises(RuleError) as info:
        se_inject.apply(model, rules=[str(path)])
    assert names in str(info.value) and "rule.yaml" in str(info.value)
    assert _same(before, _fingerprint(model))
    assert main(["rules", "check", str(path)]) != 0
    assert names in capsys.readouterr().err


# ------------------------------------------------------------------------- checkpoints, CLI

def _listing(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture
def folder(tmp_path):
    m = timm.create_model("resnet18", num_classes=3)
    torch.save(m.state_dict(), tmp_path / "r18.pth")
    with open(tmp_path / "evil.pth", "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    (tmp_path / "trunc.pth").write_bytes((tmp_path / "r18.pth").read_bytes()[:4000])
    (tmp_path / "exists.safetensors").write_bytes(b"keep me")
    (tmp_path / "out.safetensors").mkdir()
    (tmp_path / "plots.png").mkdir()
    deep = "[" * 100_000 + "]" * 100_000  # nested past Python's stack
    for sub, name, text in (("listcfg", "config.json", "[1]"), ("deepcfg", "config.json", deep),
                            ("deepindex", "model.safetensors.index.json", deep)):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / name).write_text(text)
    (tmp_path / "noise.safetensors").write_bytes(os.urandom(256))
    torch.save({"epoch": 1, "state_dict": m.state_dict()}, tmp_path / "noarch.pth.tar")
    se = se_inject.apply(timm.create_model("resnet18", num_classes=3))
    se_inject.save(se, tmp_path / "se.safetensors")
    from safetensors.torch import load_file, save_file
    save_file(load_file(tmp_path / "se.safetensors"), tmp_path / "bad-recipe.safetensors",
              metadata={"se_inject.recipe": "{not json"})
    return tmp_path


CLI_CASES = {
    "pickle-runs-code": (["convert", "evil.pth", "--model", "resnet18", "-o", "o.safetensors"],
                         "evil.pth: refused: unpickling it would import or run code"),
    "truncated": (["convert", "trunc.pth", "--model", "resnet18", "-o", "o.safetensors"],
                  "trunc.pth: not a readable PyTorch checkpoint"),
    "random-bytes": (["convert", "noise.safetensors", "--model", "resnet18", "-o", "o.pth"],
                     "noise.safetensors: not a readable safetensors file"),
    "wrong-model": (["convert", "r18.pth", "--model", "resnet34", "-o", "o.safetensors"],
                    "r18.pth does not fit ResNet"),
    "exists": (["convert", "r18.pth", "--model", "resnet18", "-o", "exists.safetensors"],
               "exists.safetensors exists; pass --force"),
    "onto-input": (["convert", "r18.pth", "--model", "resnet18", "-o", "r18.pth", "--force"],
                   "r18.pth: the output would overwrite the input"),
    "missing-folder": (["convert", "r18.pth", "--model", "resnet18", "-o", "no/o.safetensors"],
                       "folder no does not exist"),
    "output-is-a-folder": (["convert", "r18.pth", "--model", "resnet18", "-o", "out.safetensors",
                            "--force"], "out.safetensors is a folder; name the file to write"),
    "config-a-list": (["convert", "listcfg", "-o", "o.safetensors"],
                      "config.json: holds list, not a JSON object"),
    "config-nested-past-the-stack": (["convert", "deepcfg", "-o", "o.safetensors"],
                                     "config.json: not valid JSON"),
    "index-nested-past-the-stack": (["convert", "deepindex", "--model", "resnet18", "-o",
                                     "o.safetensors"], "index.json: not a valid shard index"),
    "kwargs-nested-past-the-stack": (["plan", "resnet18", "--model-kwargs", "[" * 100_000],
                                     "--model-kwargs takes a JSON object"),
    "no-architecture": (["convert", "noarch.pth.tar", "-o", "o.safetensors"],
                        "noarch.pth.tar does not name its architecture: pass --model"),
    "no-such-file": (["convert", "nothing.pth", "--model", "resnet18", "-o", "o.safetensors"],
                     "nothing.pth: no such file"),
    "already-gated": (["convert", "se.safetensors", "--model", "resnet18", "-o", "o.pth"],
                      "se.safetensors already holds SE gates"),
    "strip-a-plain-file": (["strip", "r18.pth", "-o", "o.safetensors"],
                           "r18.pth: no se-inject recipe"),
    "strip-bad-recipe": (["strip", "bad-recipe.safetensors", "-o", "o.safetensors"],
                         "bad-recipe.safetensors: its se-inject recipe is not valid JSON"),
    "unknown-model": (["plan", "resnet5O"], "resnet5O"),
    "bad-plot-path": (["report", "resnet18", "--plot", "costs.docx"], "costs.docx"),
    "plot-is-a-folder": (["report", "resnet18", "--plot", "plots.png"], "'plots.png' is a folder"),
    "report-no-block": (["report", "test_vit"],
                        "VisionTransformer has no residual or inception-style block"),
    "bad-ratio": (["plan", "resnet18", "--ratio", "2:x"], "'2:x'"),
    "bad-gate": (["plan", "resnet18", "--gate", "cbam"], "'cbam'"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_with_a_nonzero_exit_and_writes_nothing(case, folder, capsys, monkeypatch):
    argv, names = CLI_CASES[case]
    monkeypatch.chdir(folder)
    before = _listing(folder)
    try:
        code = main(argv)
    except SystemExit as exc:      # argparse's own refusals
        code = exc.code
    err = capsys.readouterr().err
    assert code != 0
    assert names in err, err
    assert "Traceback" not in err
    assert _listing(folder) == before                         # nothing written or changed
    assert not (folder / "pwned").exists() and not os.path.exists("pwned")


def test_load_refusals_name_the_file(folder):
    with pytest.raises(CheckpointError, match="r18.pth: no se-inject recipe"):
        se_inject.load(folder / "r18.pth")
    with pytest.raises(CheckpointError, match="bad-recipe.safetensors: its se-inject recipe"):
        se_inject.load(folder / "bad-recipe.safetensors")


def test_the_catalogue_is_large_enough():
    assert len(APPLY_CASES) + len(RULE_CASES) + len(CLI_CASES) + 2 >= 25
