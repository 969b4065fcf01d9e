"""Function-preserving gates, checkpoints with their recipe, conversion, and safe reading."""
from __future__ import annotations

import argparse
import copy
import errno
import json
import os
import pickle
import re
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.utils import prune

import se_inject
from se_inject.checkpoint import CheckpointError, convert, read_checkpoint, strip
from se_inject.cli import main
from se_inject.identity import IdentityInitError

from conftest import gates, paper_reference
from handwritten import BlockNet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@torch.no_grad()
def _trained_like(model):
    """Norm layers as training leaves them: timm starts each block's last norm at zero
    (zero_init_last), where a branch, and so its gate, would see nothing."""
    for m in model.modules():
        if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.LayerNorm,
                          torch.nn.GroupNorm)) and getattr(m, "weight", None) is not None:
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    for n, p in model.named_parameters():
        if n.endswith("gamma"):
            p.data.uniform_(0.5, 1.5)
    return model


def _out(m, x):
    with torch.no_grad():
        return m.eval()(x)


@pytest.mark.parametrize("name", ["resnet18", "resnext26ts", "convnext_atto", "dla34",
                                  "mobilenetv2_050", "regnetx_002"])
def test_identity_init_keeps_outputs_and_gates_learn(name):
    model = _trained_like(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 96, 96)
    y0 = _out(model, x)
    se_inject.apply(model, init="identity", input_size=(3, 96, 96))
    y1 = _out(model, x)
    assert (y1 - y0).abs().max() <= 1e-6 * y0.abs().max()
    trained = copy.deepcopy(model).train()   # a training step updates norm statistics
    trained(x).float().square().mean().backward()
    for n, g in gates(trained):
        assert g.fc2.bias.grad is not None and g.fc2.bias.grad.abs().sum() > 0, n
    se_inject.remove(model)
    assert torch.equal(_out(model, x), y0)        # the scaled layers are scaled back


def test_a_plain_checkpoint_loaded_into_identity_gates_gives_the_plain_model():
    # Gate first, load pretrained weights after (strict=False: the file has no gates). The
    # layers scaled for the gates must hold twice the file's values, or every gated branch
    # would be halved.
    plain = _trained_like(timm.create_model("resnet18", pretrained=False)).eval()
    sd = plain.state_dict()
    kept = {k: v.clone() for k, v in sd.items()}
    x = torch.randn(2, 3, 64, 64)
    y0 = _out(plain, x)
    model = se_inject.apply(timm.create_model("resnet18", pretrained=False), init="identity")
    result = model.load_state_dict(sd, strict=False)
    assert not result.unexpected_keys and all(".se_gate." in k for k in result.missing_keys)
    assert torch.equal(_out(model, x), y0)
    assert all(torch.equal(kept[k], v) for k, v in sd.items())          # the caller's dict
    twin = se_inject.apply(timm.create_model("resnet18", pretrained=False), init="identity")
    twin = copy.deepcopy(twin)                                # the hook travels with a copy
    twin.load_state_dict(sd, strict=False)
    assert torch.equal(_out(twin, x), y0)
    again = se_inject.apply(timm.create_model("resnet18", pretrained=False), init="identity")
    again.load_state_dict(model.state_dict())                 # a gated model's own: as saved
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(),
                                                 model.state_dict().values()))
    se_inject.remove(model)
    model.load_state_dict(sd)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
    paper = se_inject.apply(timm.create_model("resnet18", pretrained=False), init="paper")
    paper.load_state_dict(sd, strict=False)                  # nothing scaled, nothing changed
    assert all(torch.equal(paper.state_dict()[k], v) for k, v in sd.items())


def test_identity_gate_is_still_the_paper_gate():
    model = timm.create_model("resnet18", pretrained=False).eval()
    se_inject.apply(model, init="identity")
    blk, u = model.layer2[0], torch.randn(2, 128, 8, 8)
    assert torch.equal(blk.se_gate(u), paper_reference(u, blk.se_gate))
    assert torch.equal(blk.se_gate(u), 0.5 * u)   # sigmoid(0): the layer before is doubled


def test_identity_refused_where_no_layer_can_make_up_for_it():
    """Refused before anything changes; the message names the block's class to leave out, and
    leaving out the classes named so gates the rest as the identity."""
    from timm.models.inception_v3 import InceptionB, InceptionD
    model = timm.create_model("inception_v3", pretrained=False).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IdentityInitError, match=r"Mixed_6a.se_gate.*init='paper'.*"
                       r"leaf_modules=\[InceptionB\]"):
        se_inject.apply(model, init="identity")
    assert not gates(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(se_inject.SEInjectError, match="init must be"):
        se_inject.apply(model, init="zeros")
    with pytest.raises(IdentityInitError, match=r"Mixed_7a.se_gate.*leaf_modules=\[InceptionD\]"):
        se_inject.apply(model, init="identity", leaf_modules=[InceptionB])
    ref = copy.deepcopy(model)
    se_inject.apply(model, init="identity", leaf_modules=[InceptionB, InceptionD])
    assert sorted(n for n, _ in gates(model)) == sorted(
        f"{n}.se_gate" for n, m in model.named_modules()
        if type(m).__name__ in ("InceptionA", "InceptionC", "InceptionE"))
    x = torch.randn(1, 3, 299, 299)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


class _LeakyWhereBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1), torch.nn.Conv2d(c, c, 1)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv1(x)))
        return x + torch.where(y > 0, y, 0.1 * y)


def test_identity_refusal_names_the_op_as_written_and_where():
    """The op that stops identity initialisation is named as the code that made it and the
    block it is in, not in fx's graph notation (``%where : [num_users=1] = call_function...``)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _LeakyWhereBlock(8))
    with pytest.raises(IdentityInitError) as info:
        se_inject.apply(model, init="identity", input_size=(3, 8, 8))
    said = str(info.value)
    assert "`torch.where(gt, _1_conv2, mul)` in `1` does not scale with its input" in said, said
    assert "%" not in said and "call_function" not in said
    assert not gates(model)


class _NormFreeBlock(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))


class _NormFreeNet(torch.nn.Module):
    """Residual blocks without norms (as GAN discriminators and weight-normalised nets have):
    the layer an identity gate scales is the branch's last convolution itself."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = torch.nn.Sequential(_NormFreeBlock(16), _NormFreeBlock(16))
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _HalvingPrune(prune.BasePruningMethod):
    """A pruning method with a mask of its own making: ``weight_orig * mask / 2``."""
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t, default_mask):
        return default_mask

    def apply_mask(self, module):
        return super().apply_mask(module) / 2


def _reparametrized(how: str) -> _NormFreeNet:
    from torch.nn.utils import parametrizations
    torch.manual_seed(0)
    model = _NormFreeNet().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            if how == "weight_norm":
                parametrizations.weight_norm(m)
            elif how == "spectral_norm":
                parametrizations.spectral_norm(m)
            elif how.startswith("hook_"):  # the older API: a pre-hook computes the weight
                with warnings.catch_warnings():  # (deprecated in favour of the above)
                    warnings.simplefilter("ignore", FutureWarning)
                    getattr(torch.nn.utils, how[len("hook_"):])(m)
            elif how == "pruned":  # a pre-hook computes weight_orig * weight_mask
                prune.l1_unstructured(m, "weight", amount=0.3)
            elif how == "pruned_own_mask":  # a pruning method that masks in its own way
                _HalvingPrune.apply(m, "weight")
            elif how == "buffer":  # frozen weights, kept as a buffer
                w = m.weight.detach().clone()
                del m.weight
                m.register_buffer("weight", w)
    return model


def _identity_doubles(model, ref, x, doubled: list[str]) -> dict:
    """Gates ``model`` (two blocks) with identity init: it computes bit for bit what ``ref``
    (its twin, ungated) computes, and of its tensors exactly ``doubled`` changed, each doubled.
    Returns ``ref``'s state_dict."""
    se_inject.apply(model, init="identity", input_size=tuple(x.shape[1:]))
    assert len(gates(model)) == 2
    assert torch.equal(_out(model, x), _out(ref, x))
    before, now = ref.state_dict(), model.state_dict()
    assert sorted(k for k, v in before.items() if not torch.equal(now[k], v)) == doubled
    assert all(torch.equal(now[k], 2 * before[k]) for k in doubled)
    return before


@pytest.mark.parametrize("how,scaled", [("weight_norm", "parametrizations.weight.original0"),
                                        ("hook_weight_norm", "weight_g"), ("buffer", "weight"),
                                        ("pruned", "weight_orig")])
def test_identity_init_scales_weight_norms_magnitude_or_a_frozen_weight(how, scaled):
    """W = g · v / ‖v‖ scales with g, a pruned W = W_orig · mask with W_orig, and a weight
    kept as a buffer scales as a parameter does: the gated model computes bit for bit what the
    model did, with only g (W_orig, the buffer) and the bias doubled."""
    model, ref = _reparametrized(how), _reparametrized(how)  # (no deepcopy of the older API's)
    x = torch.randn(2, 3, 12, 12)
    before = _identity_doubles(model, ref, x, [f"blocks.{i}.conv2.{p}" for i in (0, 1)
                                               for p in sorted(("bias", scaled))])
    se_inject.remove(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert torch.equal(_out(model, x), _out(ref, x))


@pytest.mark.parametrize("how,why", [
    ("spectral_norm", r"blocks\.0\.conv2\.weight` is computed by a parametrization \(_SpectralNorm"),
    ("hook_spectral_norm", r"blocks\.0\.conv2\.weight` is computed by a forward pre-hook "
                           r"\(SpectralNorm"),
    ("pruned_own_mask", r"blocks\.0\.conv2\.weight` is computed by a forward pre-hook "
                        r"\(_HalvingPrune")],
    ids=["spectral_norm", "hook_spectral_norm", "pruned_own_mask"])
def test_identity_init_refuses_a_weight_it_cannot_scale_and_changes_nothing(how, why):
    """Spectral normalisation divides any factor out of the weight: the identity gate is
    refused before anything changes."""
    model = _reparametrized(how)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 12, 12)
    y0 = _out(model, x)
    with pytest.raises(IdentityInitError, match=f"gate `blocks.0.se_gate` .*{why}.*init='paper'"):
        se_inject.apply(model, init="identity", input_size=(3, 12, 12))
    assert not gates(model) and not any("forward" in m.__dict__ for m in model.modules())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(_out(model, x), y0)
    se_inject.apply(model, input_size=(3, 12, 12))        # the paper's init needs no scaling
    assert len(gates(model)) == 2 and not torch.equal(_out(model, x), y0)


class _FunctionalConv(torch.nn.Module):
    """A convolution written as ``F.conv2d`` on its own parameters."""

    def __init__(self, c: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(c, c, 3, 3) * 0.1)
        self.bias = torch.nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)


class _LearnableAffine(torch.nn.Module):
    """HGNetV2's LearnableAffineBlock: ``scale * x + bias``, one scale and one bias."""

    def __init__(self):
        super().__init__()
        self.scale, self.bias = (torch.nn.Parameter(torch.tensor([v])) for v in (1.0, 0.0))

    def forward(self, x):
        return self.scale * x + self.bias


def _conv(c: int) -> torch.nn.Conv2d:
    return torch.nn.Conv2d(c, c, 3, padding=1)


# a residual branch's last layer that a trace goes through as functions, and what an identity
# gate after it doubles
_FUNCTIONAL_TAILS = {
    "scaled_std_conv": (lambda c: timm.layers.ScaledStdConv2d(c, c, 3, padding=1),
                        ("conv2.bias", "conv2.gain")),
    "group_norm": (lambda c: torch.nn.Sequential(_conv(c), timm.layers.GroupNorm(c, 4)),
                   ("conv2.1.bias", "conv2.1.weight")),
    "group_norm_act": (lambda c: torch.nn.Sequential(
        _conv(c), timm.layers.GroupNormAct(c, 4, apply_act=False)),
        ("conv2.1.bias", "conv2.1.weight")),
    "functional_conv": (_FunctionalConv, ("conv2.bias", "conv2.weight")),
    "learnable_affine": (lambda c: torch.nn.Sequential(_conv(c), _LearnableAffine()),
                         ("conv2.1.bias", "conv2.1.scale")),
}


def _with_tails(make) -> _NormFreeNet:
    torch.manual_seed(0)
    model = _NormFreeNet()
    for block in model.blocks:
        block.conv2 = make(16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("tail", sorted(_FUNCTIONAL_TAILS))
def test_identity_init_scales_layers_traced_as_functions(tail):
    """timm's GroupNorm and GroupNormAct call F.group_norm, its ScaledStdConv2d standardizes its
    weight then multiplies by a gain before F.conv2d, HGNetV2's affine block is ``scale * x +
    bias``: the trace goes through them as functions. The gate after each is the identity with
    exactly those parameters doubled (the gain, not the standardized weight), bit for bit; remove()
    halves them back, and a plain state_dict loaded into the gated model comes in doubled."""
    make, scaled = _FUNCTIONAL_TAILS[tail]
    model, ref = _with_tails(make), _with_tails(make)
    x = torch.randn(2, 3, 12, 12)
    _identity_doubles(model, ref, x, [f"blocks.{i}.{p}" for i in (0, 1) for p in scaled])
    other = _with_tails(make)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict(), strict=False)
    assert torch.equal(_out(model, x), _out(other, x))
    se_inject.remove(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())


@pytest.mark.parametrize("functional", [False, True], ids=["module", "function"])
def test_identity_init_scales_an_affine_instance_norm(functional):
    """nnU-Net's residual encoders end each branch in an InstanceNorm2d with affine terms:
    ``norm(x) · w + b`` doubles with ``w`` and ``b`` whatever ``x`` is, as a batch norm's does,
    so the identity gate doubles them and the gated model computes bit for bit what the model
    did. Called as a module or as ``F.instance_norm``."""
    class FunctionalInstanceNorm(torch.nn.InstanceNorm2d):
        def forward(self, x):
            return torch.nn.functional.instance_norm(x, None, None, self.weight, self.bias,
                                                     True, 0.1, self.eps)

    norm = FunctionalInstanceNorm if functional else torch.nn.InstanceNorm2d
    make = lambda c: torch.nn.Sequential(_conv(c), norm(c, affine=True))  # noqa: E731
    model, ref = _with_tails(make), _with_tails(make)
    x = torch.randn(2, 3, 12, 12)
    _identity_doubles(model, ref, x, [f"blocks.{i}.conv2.1.{p}" for i in (0, 1)
                                      for p in ("bias", "weight")])


def test_identity_init_refuses_an_instance_norm_without_affine_terms():
    """Without them an instance norm's output is the same for ``x`` and ``2x``: nothing to
    scale, refused naming it (torchvision's RAFT encoders)."""
    model = _with_tails(lambda c: torch.nn.Sequential(_conv(c), torch.nn.InstanceNorm2d(c)))
    keys = list(model.state_dict())
    with pytest.raises(IdentityInitError, match=r"`blocks.0.conv2.1` \(InstanceNorm2d\) does "
                                                r"not scale"):
        se_inject.apply(model, init="identity", input_size=(3, 12, 12))
    assert list(model.state_dict()) == keys and not gates(model)


class _TwiceNamed(torch.nn.Module):
    """nnU-Net's ConvDropoutNormReLU: its layers as attributes, and again in the Sequential that
    runs them (``norm`` is ``all_modules.1``). ``twice``: the norm is called under both names."""

    def __init__(self, c, twice=False):
        super().__init__()
        self.conv, self.norm, self.twice = _conv(c), torch.nn.BatchNorm2d(c), twice
        self.all_modules = torch.nn.Sequential(self.conv, self.norm)

    def forward(self, x):
        y = self.all_modules(x)
        return y + self.norm(x) if self.twice else y


def test_identity_init_scales_a_layer_held_under_two_names_once():
    """A norm held as ``norm`` and as ``all_modules.1`` is one layer: its weight and bias are
    doubled once (both state_dict names show them doubled, being one tensor) and the gated
    model computes bit for bit what the model did. It was refused as 'shared with another
    layer', which refused identity gates on every nnU-Net residual encoder."""
    model, ref = _with_tails(_TwiceNamed), _with_tails(_TwiceNamed)
    x = torch.randn(2, 3, 12, 12)
    _identity_doubles(model, ref, x, [f"blocks.{i}.conv2.{p}" for i in (0, 1) for p in (
        "all_modules.1.bias", "all_modules.1.weight", "norm.bias", "norm.weight")])


@pytest.mark.parametrize("case", ["called_under_both_names", "tied_to_another_layer"])
def test_identity_init_refuses_a_norm_that_another_call_reads(case):
    """Called a second time under its other name, or its weight tied to another block's norm,
    the tensor an identity gate would double is read elsewhere too: refused, nothing changed."""
    if case == "called_under_both_names":
        model, why = _with_tails(lambda c: _TwiceNamed(c, twice=True)), "called 2 times"
    else:
        model, why = _with_tails(_TwiceNamed), "shared with another layer"
        model.blocks[1].conv2.norm.weight = model.blocks[0].conv2.norm.weight
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(IdentityInitError, match=why):
        se_inject.apply(model, init="identity", input_size=(3, 12, 12))
    assert not gates(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# casts between a residual branch's last layer and the sum, as code written for mixed
# precision has them: a float cast scales with its input exactly (a factor of 2 is exact in
# any float format), a cast to integers does not
_CASTS = {
    "float": lambda y, x: y.float(),
    "to_dtype_of_input": lambda y, x: y.to(x.dtype),
    "to_dtype_keyword": lambda y, x: y.to(dtype=torch.float32),
    "type_as_input": lambda y, x: y.type_as(x),
    "type": lambda y, x: y.type(torch.float32),
    "bfloat16_and_back": lambda y, x: y.bfloat16().float(),
    "half_and_back": lambda y, x: y.half().to(torch.float32),
    "clone": lambda y, x: y.clone(),
}


class _TailBlock(_NormFreeBlock):
    """A residual block with ``tail(y, x)`` between its branch's last layer and the sum."""

    def __init__(self, c, tail):
        super().__init__(c)
        self.tail = tail

    def forward(self, x):
        return torch.relu(x + self.tail(self.conv2(torch.relu(self.conv1(x))), x))


def _tail_net(tail) -> _NormFreeNet:
    torch.manual_seed(0)
    model = _NormFreeNet()
    model.blocks = torch.nn.Sequential(_TailBlock(16, tail), _TailBlock(16, tail))
    return model.eval()


@pytest.mark.parametrize("cast", sorted(_CASTS))
def test_identity_init_goes_through_float_casts(cast):
    model, ref = _tail_net(_CASTS[cast]), _tail_net(_CASTS[cast])
    _identity_doubles(model, ref, torch.randn(2, 3, 12, 12),
                      [f"blocks.{i}.conv2.{p}" for i in (0, 1) for p in ("bias", "weight")])


def test_identity_init_refuses_a_cast_to_integers():
    class _Rounded(_NormFreeBlock):
        def forward(self, x):
            return x + self.conv2(torch.relu(self.conv1(x))).long().float()
    model = _NormFreeNet()
    model.blocks = torch.nn.Sequential(_Rounded(16), _Rounded(16))
    with pytest.raises(IdentityInitError, match=r"`.*\.long\(\)` in `blocks\.0` does not "
                       "scale with its input"):
        se_inject.apply(model, init="identity", input_size=(3, 12, 12))
    assert not gates(model)


# ops between a residual branch's last layer and the sum that move values without changing
# them, or pad with zeros, as code that upsamples and crops back to the shortcut's size has
# them (LoFTR's feature pyramid, kornia.feature.loftr: ``interpolate(y)[..., :h, :w]``)
_MOVES = {
    "zero_pad_and_crop": lambda y, x: F.pad(y, (0, 1, 0, 1))[..., :x.shape[-2], :x.shape[-1]],
    "reflect_pad_and_crop": lambda y, x: F.pad(y, (1, 1, 1, 1), mode="reflect")[:, :, 1:-1, 1:-1],
    "upsample_and_crop": lambda y, x: F.interpolate(
        y[..., :-1, :-1], scale_factor=2.0, mode="bilinear")[..., :x.shape[-2], :x.shape[-1]],
    "narrow": lambda y, x: F.pad(y, (0, 2)).narrow(3, 0, x.shape[3]),
    "transpose": lambda y, x: y.transpose(2, 3).transpose(3, 2),
    "torch_transpose": lambda y, x: torch.transpose(torch.transpose(y, 2, 3), 2, 3),
    "flip": lambda y, x: y.flip(3),
    "roll": lambda y, x: torch.roll(y, 1, 3),
}


@pytest.mark.parametrize("move", sorted(_MOVES))
def test_identity_init_goes_through_ops_that_move_values(move):
    """A crop, a transpose, a flip or a zero padding after the branch's last layer: doubling
    that layer doubles what reaches the sum exactly, and the gated model computes bit for bit
    what the model did. A crop (``y[..., :h, :w]``) was refused as not scaling."""
    model, ref = _tail_net(_MOVES[move]), _tail_net(_MOVES[move])
    _identity_doubles(model, ref, torch.randn(2, 3, 12, 12),
                      [f"blocks.{i}.conv2.{p}" for i in (0, 1) for p in ("bias", "weight")])


def test_identity_init_refuses_padding_with_another_value_than_zero():
    """Padding with 1 adds a constant, which doubling the branch does not double."""
    model = _tail_net(lambda y, x: F.pad(y, (0, 1, 0, 1), value=1.0)[..., :-1, :-1])
    with pytest.raises(IdentityInitError, match=r"`torch.nn.functional.pad\(blocks_0_conv2, "
                       r"\(0, 1, 0, 1\), mode='constant', value=1.0\)` in `blocks\.0` does "
                       r"not scale"):
        se_inject.apply(model, init="identity", input_size=(3, 12, 12))
    assert not gates(model)


class _ConvReadTwice(torch.nn.Module):
    """The branch ends in ``conv``; ``conv`` (as a layer or its weight as a tensor) is read
    again for a second output, which scaling it for the gate would change."""

    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.c1, self.conv = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 1)

    def forward(self, x):
        h = torch.relu(self.c1(x))
        if self.functional:  # the branch reads the tensors, the second output the layer
            return x + torch.nn.functional.conv2d(h, self.conv.weight, self.conv.bias), \
                self.conv(x)
        return x + self.conv(h), self.conv.weight.sum()


@pytest.mark.parametrize("functional", [False, True], ids=["layer_then_tensor",
                                                           "tensor_then_layer"])
def test_identity_init_refuses_a_layer_read_again_for_another_output(functional):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _ConvReadTwice(functional))
    x = torch.randn(2, 3, 8, 8)
    before = [y.clone() for y in model(x)]
    with pytest.raises(IdentityInitError, match=r"`1.conv.weight` is read 2 times"):
        se_inject.apply(model, init="identity", input_size=(3, 8, 8))
    assert not gates(model) and all(torch.equal(a, b) for a, b in zip(model(x), before))


def test_identity_init_refuses_a_weight_standardized_without_a_gain():
    """timm's StdConv2d (BiT's ResNetV2) standardizes its weight and has no gain: its output
    does not scale with any parameter, so the gate is refused, naming the op."""
    model = _with_tails(lambda c: timm.layers.StdConv2d(c, c, 3, padding=1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IdentityInitError, match=r"gate `blocks.0.se_gate` .*batch_norm\(.*"
                       r"in `blocks.0.conv2` has no affine weight to scale.*StdConv2d"):
        se_inject.apply(model, init="identity", input_size=(3, 12, 12))
    assert not gates(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _frozen(name: str, freeze: bool = True):
    """Batch norms frozen into buffers: torchvision's in its detection backbones, timm's from
    timm.layers.freeze_batch_norm_2d (with the activation, FrozenBatchNormAct2d)."""
    torch.manual_seed(0)
    if name == "torchvision/resnet18":
        import torchvision
        from torchvision.ops.misc import FrozenBatchNorm2d
        model = torchvision.models.resnet18(**({"norm_layer": FrozenBatchNorm2d} if freeze else {}))
    else:
        model = timm.create_model(name, pretrained=False)
        model = timm.layers.freeze_batch_norm_2d(model) if freeze else model
    with torch.no_grad():
        for m in model.modules():
            if "Frozen" in type(m).__name__:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("name", ["torchvision/resnet18", "resnet18", "regnetx_002"])
def test_identity_init_scales_frozen_batch_norms(name):
    model = _frozen(name)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 64, 64)
    y0 = _out(model, x)
    se_inject.apply(model, init="identity", input_size=(3, 64, 64))
    plain = _frozen(name, freeze=False)                  # the same sites as with its norms
    se_inject.apply(plain, input_size=(3, 64, 64))
    assert [n for n, _ in gates(model)] == [n for n, _ in gates(plain)]
    assert torch.equal(_out(model, x), y0)
    now = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(now[k], v)]
    assert changed and all(k.rsplit(".", 1)[1] in ("weight", "bias") for k in changed)
    assert all(torch.equal(now[k], 2 * before[k]) for k in changed)
    se_inject.remove(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.fixture
def r18(tmp_path):
    m = _trained_like(timm.create_model("resnet18", pretrained=False, num_classes=7)).eval()
    path = tmp_path / "r18.pth"
    torch.save(m.state_dict(), path)
    return m, path


def test_convert_load_strip_round_trip(r18, tmp_path):
    m, src = r18
    x = torch.randn(2, 3, 64, 64)
    out = convert(src, tmp_path / "se.safetensors", model="resnet18")
    g = se_inject.load(out)
    assert type(g) is type(m) and len(gates(g)) == 8 and g.num_classes == 7
    y0, y1 = _out(m, x), _out(g, x)
    assert (y1 - y0).abs().max() <= 1e-6 * y0.abs().max()
    again = convert(src, tmp_path / "se2.safetensors", model="resnet18")
    assert out.read_bytes() == again.read_bytes()                     # deterministic
    plain = strip(out, tmp_path / "plain.safetensors")
    state, _ = read_checkpoint(plain)
    assert state.keys() == m.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in m.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["plain.safetensors", "r18.pth", "se.safetensors", "se2.safetensors"]  # nothing else


def test_converted_model_uses_the_file_tensors_without_a_second_copy(r18, tmp_path):
    from se_inject.checkpoint import _from_state
    m, src = r18
    state, _ = read_checkpoint(src)
    net = _from_state("resnet18", {"num_classes": 7}, state, str(src))
    own = net.state_dict()
    assert all(own[k].data_ptr() == v.data_ptr() for k, v in state.items())
    assert all(not t.is_meta for t in (*net.parameters(), *net.buffers()))
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    net = _from_state("resnet18", {"num_classes": 7}, half, str(src))
    assert all(p.dtype == torch.float32 for p in net.parameters())   # the model's dtype, as
    assert torch.equal(net.fc.weight, half["fc.weight"].float())       # load_state_dict gives


def test_a_loaded_model_computes_bit_for_bit_what_the_saved_model_computed(r18, tmp_path):
    """safetensors hands tensors out at any byte offset; CPU convolutions round differently on
    memory that is not 64-byte aligned (by 3e-8 on a torchvision SE's 1x1 conv here), so the
    loaded tensors are given memory as torch allocates it."""
    m, _ = r18
    se_inject.apply(m)
    path = se_inject.save(m, tmp_path / "se.safetensors")
    g = se_inject.load(path).eval()
    assert all(t.data_ptr() % 64 == 0 for t in g.state_dict().values() if t.numel())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_out(g, x), _out(m, x))


def test_convert_falls_back_where_the_meta_device_cannot_build_the_model(tmp_path, monkeypatch):
    # test_coatnet keeps relative-position indices outside its state_dict: the constructor
    # must fill them, so the model is built for real and the weights copied in.
    m = _trained_like(timm.create_model("test_coatnet", pretrained=False)).eval()
    torch.save(m.state_dict(), tmp_path / "c.pth")
    x = torch.randn(1, 3, 160, 160)
    g = se_inject.load(convert(tmp_path / "c.pth", tmp_path / "c.safetensors",
                               model="test_coatnet"))
    y0, y1 = _out(m, x), _out(g, x)
    assert (y1 - y0).abs().max() <= 1e-6 * y0.abs().max()
    import se_inject.checkpoint as ck
    real = ck._create

    def no_meta(arch, kwargs):  # a constructor that computes with its tensors
        if torch.empty(0).is_meta:
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return real(arch, kwargs)
    monkeypatch.setattr(ck, "_create", no_meta)
    g = se_inject.load(convert(tmp_path / "c.pth", tmp_path / "c2.safetensors",
                               model="test_coatnet"))
    assert (_out(g, x) - y0).abs().max() <= 1e-6 * y0.abs().max()


def test_large_conversions_show_progress(r18, tmp_path, monkeypatch, capsys):
    import se_inject.checkpoint as ck
    m, src = r18
    monkeypatch.setattr(ck, "_PROGRESS_BYTES", src.stat().st_size + 1)
    convert(src, tmp_path / "quiet.safetensors", model="resnet18")
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(ck, "_PROGRESS_BYTES", src.stat().st_size - 1)
    convert(src, tmp_path / "loud.safetensors", model="resnet18")
    err = capsys.readouterr().err.splitlines()
    steps = [re.sub(r"^\[\s*[\d.]+ s\] ", "", line).split(" ")[0] for line in err]
    assert steps == ["reading", "building", "placing", "writing", "done"], err
    assert f"{src.stat().st_size / 2 ** 20:.0f} MiB" in err[0]


def test_paper_init_and_pth_format(r18, tmp_path):
    m, src = r18
    out = convert(src, tmp_path / "se.pth", model="resnet18", init="paper", format="pth",
                  ratio=8)
    obj = torch.load(out, weights_only=True)
    recipe = json.loads(obj["se_inject.recipe"])
    assert recipe["steps"][0]["ratio"] == 8 and recipe["steps"][0]["init"] == "paper"
    g = se_inject.load(out)
    assert all(g2.fc2.weight.abs().sum() > 0 for _, g2 in gates(g))   # not zero: new layers
    assert not torch.equal(_out(g, torch.ones(1, 3, 32, 32)), _out(m, torch.ones(1, 3, 32, 32)))


@pytest.mark.parametrize("name,fmt", [("se.pth", "safetensors"), ("se.safetensors", "pth"),
                                      ("se.bin", "safetensors"), ("se", "pth")])
def test_a_file_named_for_the_other_format_reads_by_its_contents(r18, tmp_path, name, fmt):
    """--format given against the name's suffix: what se-inject writes it reads back, and a
    plain file so named converts."""
    m, src = r18
    out = convert(src, tmp_path / name, model="resnet18", format=fmt)
    g = se_inject.load(out)
    assert len(gates(g)) == 8
    x = torch.randn(2, 3, 64, 64)
    assert (_out(g, x) - _out(m, x)).abs().max() <= 1e-6 * _out(m, x).abs().max()
    plain = strip(out, tmp_path / ("plain." + name), format=fmt)
    again = convert(plain, tmp_path / "again.safetensors", model="resnet18")
    assert se_inject.load(again).state_dict().keys() == g.state_dict().keys()


def test_save_from_python_and_recipe(tmp_path):
    m = timm.create_model("resnet18", pretrained=False)
    se_inject.apply(m, ratio=4, stages="all-but-last")
    path = se_inject.save(m, tmp_path / "m.safetensors")
    g = se_inject.load(path)
    assert [n for n, _ in gates(g)] == [n for n, _ in gates(m)]
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), g.state_dict().values()))
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        se_inject.save(m, path)
    se_inject.save(m, path, force=True)
    with pytest.raises(CheckpointError, match="holds no gates"):
        se_inject.save(timm.create_model("resnet18"), tmp_path / "plain.safetensors")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_written_files_get_the_permissions_open_would_give(r18, tmp_path, fmt):
    """A new file: 0o666 less the umask, as ``open(path, "w")`` or ``torch.save`` would make
    it, not the owner-only mode of a private temporary file; a replaced file keeps its mode."""
    m, src = r18
    old = os.umask(0o022)
    try:
        new = convert(src, tmp_path / f"se.{fmt}", model="resnet18", format=fmt)
        os.umask(0o077)
        private = convert(src, tmp_path / f"private.{fmt}", model="resnet18", format=fmt)
    finally:
        os.umask(old)
    assert new.stat().st_mode & 0o777 == 0o644
    assert private.stat().st_mode & 0o777 == 0o600
    os.chmod(new, 0o640)
    again = convert(src, new, model="resnet18", format=fmt, force=True)
    assert again.stat().st_mode & 0o777 == 0o640
    assert len(gates(se_inject.load(again))) == 8
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_file_system_without_hard_links_is_written_to(r18, tmp_path, monkeypatch):
    """exFAT and some network shares refuse os.link, which puts a new file in place only if
    its name is free; there the name is taken by an exclusive create instead."""
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, os.strerror(errno.EPERM))
    monkeypatch.setattr(os, "link", no_links)
    m, src = r18
    out = convert(src, tmp_path / "se.safetensors", model="resnet18")
    assert len(gates(se_inject.load(out))) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.pth", "se.safetensors"]
    before = out.read_bytes()
    with pytest.raises(CheckpointError, match="exists; pass --force"):
        convert(src, out, model="resnet18", init="paper")
    assert out.read_bytes() == before
    from se_inject._files import atomic_write
    late = tmp_path / "late.bin"

    def write_while_another_writes(tmp):  # the name is taken while the file is written
        late.write_bytes(b"theirs")
        with open(tmp, "wb") as fh:
            fh.write(b"ours")
    with pytest.raises(FileExistsError):
        atomic_write(late, write_while_another_writes, replace=False)
    assert late.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late.bin", "r18.pth", "se.safetensors"]


def test_the_longest_file_name_the_system_allows_is_written(r18, tmp_path):
    m, src = r18
    longest = os.pathconf(tmp_path, "PC_NAME_MAX")
    out = convert(src, tmp_path / ("n" * (longest - len(".safetensors")) + ".safetensors"),
                  model="resnet18")
    assert len(out.name) == longest and len(gates(se_inject.load(out))) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, src.name])


@pytest.mark.parametrize("force", [False, True])
def test_a_write_that_fails_says_why_and_leaves_what_was_there(r18, tmp_path, monkeypatch,
                                                                capsys, force):
    """A full disk (or no permission) part-way through the write: the CLI exits 2 with the
    system's reason, no partial or temporary file is left, and a file it was to replace is
    untouched."""
    import safetensors.torch

    def no_room(state, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"part of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)
    monkeypatch.setattr(safetensors.torch, "save_file", no_room)
    m, src = r18
    out = tmp_path / "se.safetensors"
    if force:
        out.write_bytes(b"keep me")
    argv = ["convert", str(src), "--model", "resnet18", "-o", str(out)] + ["--force"] * force
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{out}: could not write it: {os.strerror(errno.ENOSPC)}. Nothing was written; " \
        "free some space" in err, err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r18.pth"] + ["se.safetensors"] * force
    assert not force or out.read_bytes() == b"keep me"


def _shards(sd: dict, folder, suffix: str) -> None:
    """``sd`` in three shards with Hugging Face's index of them (``max_shard_size``)."""
    from safetensors.torch import save_file
    keys, weight_map = list(sd), {}
    for i in range(3):
        name = f"model-{i + 1:05d}-of-00003.{suffix}"
        part = {k: sd[k].contiguous() for k in keys[i::3]}
        if suffix == "safetensors":
            save_file(part, folder / name)
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if suffix == "safetensors" else \
        "pytorch_model.bin.index.json"
    (folder / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("kind", ["train", "ema", "prefixed", "folder", "folder-bin",
                                  "folder-shards", "folder-shards-bin",
                                  "torchvision-reference", "lightning"])
def test_input_kinds(r18, tmp_path, kind):
    m, _ = r18
    sd = m.state_dict()
    if kind in ("train", "ema"):
        src = tmp_path / "ckpt.pth.tar"
        torch.save({"epoch": 3, "arch": "resnet18", "state_dict": sd,
                    "state_dict_ema": {k: v + 1 if v.is_floating_point() else v
                                       for k, v in sd.items()}}, src)
    elif kind == "prefixed":
        src = tmp_path / "ddp.bin"
        torch.save({f"module._orig_mod.{k}": v for k, v in sd.items()}, src)
    elif kind == "torchvision-reference":  # its train.py keeps the command line beside
        src = tmp_path / "checkpoint.pth"
        torch.save({"model": sd, "optimizer": {"state": {}}, "epoch": 3,
                    "args": argparse.Namespace(lr=0.5, model="resnet18")}, src)
    elif kind == "lightning":  # a LightningModule holding the model as `self.net`, and a loss
        src = tmp_path / "epoch=3.ckpt"
        torch.save({"epoch": 3, "global_step": 9, "state_dict": {
            **{f"net.{k}": v for k, v in sd.items()}, "criterion.weight": torch.ones(7)}}, src)
    else:
        src = tmp_path / "hf"
        src.mkdir()
        (src / "config.json").write_text(json.dumps({"architecture": "resnet18",
                                                     "num_classes": 7}))
        if kind == "folder":
            from safetensors.torch import save_file
            save_file(dict(sd), src / "model.safetensors")
        elif kind == "folder-bin":
            torch.save(sd, src / "pytorch_model.bin")
        else:
            _shards(sd, src, "safetensors" if kind == "folder-shards" else "bin")
    named = kind in ("train", "ema", "folder", "folder-bin", "folder-shards",
                     "folder-shards-bin")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        out = convert(src, tmp_path / "se.safetensors", model=None if named else "resnet18",
                      ema=kind == "ema")
    left = [str(w.message) for w in said if "not part of the model" in str(w.message)]
    assert left == ([] if kind != "lightning" else [
        f"{src}: converting the {len(sd)} tensors under `net.`; the other 1 (e.g. "
        "`criterion.weight`) are not part of the model"])
    g = se_inject.load(out)
    want = sd["fc.weight"] + (1 if kind == "ema" else 0)
    assert torch.equal(g.state_dict()["fc.weight"], want)


def test_a_shard_index_that_does_not_fit_its_shards_is_refused(tmp_path):
    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architecture": "resnet18"}))
    _shards(sd, src, "safetensors")
    index = src / "model.safetensors.index.json"
    weights = json.loads(index.read_text())
    weights["weight_map"]["fc.bias"] = "model-00001-of-00003.safetensors"  # it is in another
    index.write_text(json.dumps(weights))
    with pytest.raises(CheckpointError, match="does not hold, e.g. fc.bias"):
        convert(src, tmp_path / "se.safetensors")
    weights["weight_map"]["fc.bias"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(weights))
    with pytest.raises(CheckpointError, match="'../elsewhere.safetensors' is not a file in"):
        convert(src, tmp_path / "se.safetensors")
    assert not (tmp_path / "se.safetensors").exists()


@pytest.mark.parametrize("name,in_chans,first", [("resnet18", 1, "conv1"),
                                                   ("resnet18", 4, "conv1"),
                                                   ("tresnet_m", 1, "body.conv1.conv")])
def test_a_checkpoint_for_other_input_channels_converts_and_loads(tmp_path, name, in_chans, first):
    # Grayscale or multispectral inputs: the file's first layer says how many channels the
    # model takes. TResNet folds 4 x 4 pixels into channels before its first convolution,
    # which takes 16 x in_chans: in_chans is not that layer's width.
    m = _trained_like(timm.create_model(name, pretrained=False, in_chans=in_chans,
                                        num_classes=5)).eval()
    torch.save({"arch": name, "state_dict": m.state_dict()}, tmp_path / "plain.pth")
    g = se_inject.load(convert(tmp_path / "plain.pth", tmp_path / "se.safetensors"))
    assert g.get_submodule(first).in_channels == m.get_submodule(first).in_channels
    x = torch.randn(2, in_chans, 64, 64)
    y0, y1 = _out(m, x), _out(g, x)
    assert (y1 - y0).abs().max() <= 1e-5 * y0.abs().max()
    again = se_inject.load(se_inject.save(g, tmp_path / "again.safetensors"))  # save's own record
    assert again.get_submodule(first).in_channels == m.get_submodule(first).in_channels
    assert torch.equal(_out(again, x), y1)


@pytest.mark.parametrize("kwargs,layer", [({"global_pool": "max"}, "global_pool.pool"),
                                          ({"output_stride": 16}, "layer4.0.conv1")])
def test_save_refuses_a_model_that_would_load_back_as_another(tmp_path, kwargs, layer):
    # Options that change no tensor's shape are not in a model's state: timm's resnet18 rebuilt
    # from its name would pool by the mean, or downsample where this one dilates.
    m = _trained_like(timm.create_model("resnet18", pretrained=False, **kwargs)).eval()
    se_inject.apply(m, init="identity")
    with pytest.raises(CheckpointError, match=rf"would not load back.*`{re.escape(layer)}`"):
        se_inject.save(m, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    g = se_inject.load(se_inject.save(m, tmp_path / "m.safetensors", model_kwargs=kwargs))
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_out(g, x), _out(m, x))


def test_save_refuses_a_layer_held_under_a_second_name(tmp_path):
    # named_modules() lists a module once: `m.head = m.fc` adds state_dict keys (head.weight,
    # head.bias) that resnet18 rebuilt from its name lacks, so load() would refuse the file
    m = timm.create_model("resnet18", pretrained=False)
    m.head = m.fc
    se_inject.apply(m)
    with pytest.raises(CheckpointError, match=r"would not load back as itself: its layer `head`"):
        se_inject.save(m, tmp_path / "m.pth")
    assert list(tmp_path.iterdir()) == []


def _prune(layer):
    prune.l1_unstructured(layer, "weight", amount=0.3)


def _undo_prune(layer):
    prune.remove(layer, "weight")


def _weight_norm(layer):
    with warnings.catch_warnings():  # (deprecated for torch.nn.utils.parametrizations')
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(layer)


def _parametrized_norm(layer):
    torch.nn.utils.parametrizations.weight_norm(layer)


def _undo_parametrized(layer):
    torch.nn.utils.parametrize.remove_parametrizations(layer, "weight")


def _spectral_norm(layer):
    torch.nn.utils.spectral_norm(layer)


@pytest.mark.parametrize("reparametrize,undo,told", [
    (_prune, _undo_prune, r"has 8 key\(s\) that .* lacks \(layer1\.0\.conv1\.weight_mask, "
     r"layer1\.0\.conv1\.weight_orig, .*torch\.nn\.utils\.prune\.remove\(layer, 'weight'\)"),
    (_weight_norm, torch.nn.utils.remove_weight_norm,
     r"\(layer1\.0\.conv1\.weight_g, .*torch\.nn\.utils\.remove_weight_norm\(layer\)"),
    (_parametrized_norm, _undo_parametrized,
     r"its layer `layer1\.0\.conv1` computes 'weight' through torch\.nn\.utils\.parametrize.*"
     r"remove_parametrizations\(layer, 'weight'\)"),
    (_spectral_norm, torch.nn.utils.remove_spectral_norm,
     r"lacks \(layer1\.0\.conv1\.weight_orig, .*weight_u, .*NAME_orig, NAME_u and NAME_v: "
     r".*torch\.nn\.utils\.remove_spectral_norm\(layer\)"),
], ids=["prune", "weight_norm", "parametrize", "spectral_norm"])
def test_save_refuses_a_weight_a_hook_computes_and_saves_it_once_made_plain(
        tmp_path, reparametrize, undo, told):
    # A pruned, weight-normed or spectral-normed layer keeps its weight in other tensors: its
    # state_dict keys are not those of resnet18 rebuilt from its name, so load() would refuse
    # the file. Made plain, the weight the layer computed is saved and loads back.
    m = _trained_like(timm.create_model("resnet18", pretrained=False)).eval()
    convs = [m.layer1[0].conv1, m.layer1[0].conv2, m.layer1[1].conv1, m.layer1[1].conv2]
    for layer in convs:
        reparametrize(layer)
    se_inject.apply(m, init="identity")
    x = torch.randn(2, 3, 64, 64)
    before = _out(m, x)
    with pytest.raises(CheckpointError, match=told):
        se_inject.save(m, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    for layer in convs:
        undo(layer)
    g = se_inject.load(se_inject.save(m, tmp_path / "m.safetensors"))
    assert (_out(g, x) - before).abs().max() <= 1e-5 * before.abs().max()


def test_convert_names_pruning_in_a_checkpoint_it_does_not_fit(tmp_path, capsys):
    m = timm.create_model("resnet18", pretrained=False)
    _prune(m.layer1[0].conv1)
    torch.save(m.state_dict(), tmp_path / "pruned.pth")
    out = tmp_path / "se.safetensors"
    assert main(["convert", str(tmp_path / "pruned.pth"), "--model", "resnet18", "-o",
                 str(out)]) == 2
    err = capsys.readouterr().err
    assert "1 missing, e.g. layer1.0.conv1.weight;" in err
    assert "torch.nn.utils.prune keeps a pruned weight as NAME_orig and NAME_mask" in err
    assert "Check --model" not in err and not out.exists()


@pytest.mark.parametrize("name,convert_sync,plain", [
    ("resnet18", torch.nn.SyncBatchNorm.convert_sync_batchnorm, "BatchNorm2d"),
    ("mobilenetv2_050", timm.layers.convert_sync_batchnorm, "BatchNormAct2d")])
def test_save_keeps_sync_batch_norms_as_the_batch_norms_they_replaced(tmp_path, name,
                                                                       convert_sync, plain):
    # a model trained with DistributedDataParallel holds SyncBatchNorm layers (torch's, or
    # timm's SyncBatchNormAct): the same tensors as the architecture's batch norms
    m = convert_sync(_trained_like(timm.create_model(name, pretrained=False)))
    se_inject.apply(m)
    m.eval()
    count = sum(isinstance(x, torch.nn.SyncBatchNorm) for x in m.modules())
    with pytest.warns(UserWarning, match=rf"{count} SyncBatchNorm layer\(s\) of .* \(e\.g\. "
                      r"`bn1`\) are saved as the batch norms"):
        g = se_inject.load(se_inject.save(m, tmp_path / "m.safetensors")).eval()
    assert type(g.bn1).__name__ == plain
    assert not any(isinstance(x, torch.nn.SyncBatchNorm) for x in g.modules())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(_out(g, x), _out(m, x))
    # one whose settings differ from the architecture's is another model
    m.bn1.eps = 1e-3
    with pytest.raises(CheckpointError, match=r"would not load back as itself: its layer `bn1`"):
        se_inject.save(m, tmp_path / "eps.safetensors")
    assert not (tmp_path / "eps.safetensors").exists()


def test_tied_weights_are_refused_by_safetensors_and_kept_tied_in_a_pth(tmp_path):
    # one tensor under two names (weights tied by hand): safetensors cannot hold it, a .pth can
    m = _trained_like(timm.create_model("resnet18", pretrained=False)).eval()
    m.layer1[1].conv2.weight = m.layer1[0].conv2.weight
    se_inject.apply(m, init="identity")
    with pytest.raises(CheckpointError, match=r"`layer1\.0\.conv2\.weight` and "
                       r"`layer1\.1\.conv2\.weight` are one tensor under two names.*\.pth"):
        se_inject.save(m, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    g = se_inject.load(se_inject.save(m, tmp_path / "m.pth"))
    sd = g.state_dict()
    assert sd.keys() == m.state_dict().keys()
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    assert g.layer1[1].conv2.weight.data_ptr() == g.layer1[0].conv2.weight.data_ptr()


def test_views_of_one_tensor_that_do_not_overlap_are_saved_as_safetensors(tmp_path):
    # two buffers that are halves of one storage (as after packing them together): two
    # tensors to safetensors, which writes them; only overlapping ones are one tensor
    m = _trained_like(timm.create_model("resnet18", pretrained=False)).eval()
    bn = m.layer1[0].bn1
    both = torch.cat([bn.running_mean, bn.running_var + 1])
    bn.running_mean, bn.running_var = both[:64], both[64:]
    se_inject.apply(m)
    g = se_inject.load(se_inject.save(m, tmp_path / "m.safetensors"))
    assert all(torch.equal(g.state_dict()[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {"features_only": True, "out_indices": (1, 3)}),
    ("mobilenetv2_050", {"features_only": True}),                 # timm's own features class
    ("resnet18", {"features_only": True, "feature_cls": "hook"}),  # a wrapper chosen by name
    ("resnet18", {"features_only": True, "feature_cls": "dict"}),
    ("mobilenetv2_050", {"features_only": True, "feature_cls": "hook"}),  # not its own class
    ("convnext_atto", {"drop_path_rate": 0.2, "drop_rate": 0.3}),
    ("hardcorenas_b", {"drop_path_rate": 0.1, "drop_rate": 0.2}),  # largest rate 0.1 * 18/19
    ("fastvit_t8", {"drop_path_rate": 0.1, "drop_rate": 0.2}),     # the head's own Dropout
    ("resnet18", {"drop_block_rate": 0.2, "drop_path_rate": 0.1})])
def test_save_records_a_features_wrapper_and_dropout_rates(tmp_path, name, kwargs):
    m = _trained_like(timm.create_model(name, pretrained=False, **kwargs)).eval()
    se_inject.apply(m, init="identity")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                            # no rate left behind
        g = se_inject.load(se_inject.save(m, tmp_path / "m.safetensors"))
    assert type(g) is type(m)
    def rates(model):
        return [(n, getattr(mod, "drop_prob", None), getattr(mod, "p", None))
                for n, mod in model.named_modules()
                if type(mod).__name__ in ("DropPath", "Dropout", "DropBlock2d")]
    assert rates(g) == rates(m)
    assert any(r[1] or r[2] for r in rates(m)) == any(k.startswith("drop_") for k in kwargs)
    assert getattr(g, "drop_rate", None) == getattr(m, "drop_rate", None)
    x = torch.randn(2, 3, 64, 64)
    y0, y1 = _out(m, x), _out(g, x)
    if isinstance(y0, torch.Tensor):
        y0, y1 = [y0], [y1]
    if isinstance(y0, dict):
        assert list(y0) == list(y1)
        y0, y1 = list(y0.values()), list(y1.values())
    assert len(y0) == len(y1) and all(torch.equal(a, b) for a, b in zip(y0, y1))


def test_convert_takes_the_options_a_checkpoint_does_not_show(tmp_path, capsys):
    m = _trained_like(timm.create_model("resnet18", pretrained=False, global_pool="max")).eval()
    torch.save(m.state_dict(), tmp_path / "max.pth")
    out = tmp_path / "se.safetensors"
    assert main(["convert", str(tmp_path / "max.pth"), "--model", "resnet18", "-o", str(out),
                 "--model-kwargs", '{"global_pool": "max"}']) == 0
    x = torch.randn(2, 3, 64, 64)
    y0, y1 = _out(m, x), _out(se_inject.load(out), x)
    assert (y1 - y0).abs().max() <= 1e-5 * y0.abs().max()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["convert", str(tmp_path / "max.pth"), "--model", "resnet18", "-o",
              str(tmp_path / "bad.safetensors"), "--model-kwargs", "global_pool=max"])
    assert exc.value.code == 2 and "--model-kwargs takes a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "bad.safetensors").exists()


def test_convert_leaves_out_the_classes_an_identity_refusal_names(tmp_path, capsys):
    """Inception-v3's reduction modules cannot start as the identity. The refusal names the
    class and the option; with --leaf those blocks stay ungated, the file records the classes
    by name, and se_inject.load() finds them in the model it rebuilds (nothing imported):
    the loaded model computes the checkpoint's outputs bit for bit, with 9 gates."""
    m = _trained_like(timm.create_model("inception_v3", pretrained=False)).eval()
    src, out = tmp_path / "inc.pth", tmp_path / "se.safetensors"
    torch.save(m.state_dict(), src)
    capsys.readouterr()
    assert main(["convert", str(src), "--model", "inception_v3", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "Mixed_6a.se_gate" in err and "On the command line: --leaf InceptionB, or --init paper" \
        in err and not out.exists()
    assert main(["convert", str(src), "--model", "inception_v3", "-o", str(out),
                 "--leaf", "InceptionX"]) == 2
    assert "'InceptionX': no module of InceptionV3 is of that class. Did you mean" in \
        capsys.readouterr().err and not out.exists()
    assert main(["convert", str(src), "--model", "inception_v3", "-o", str(out),
                 "--leaf", "InceptionB", "timm.models.inception_v3.InceptionD"]) == 0
    loaded = se_inject.load(out)
    assert sorted(n for n, _ in gates(loaded)) == sorted(
        f"{n}.se_gate" for n, b in loaded.named_modules()
        if type(b).__name__ in ("InceptionA", "InceptionC", "InceptionE"))
    x = torch.randn(1, 3, 299, 299)
    assert torch.equal(_out(loaded, x), _out(m, x))
    assert main(["plan", "inception_v3", "--leaf", "InceptionB", "InceptionD"]) == 0
    assert "9 gates (9 inception)" in capsys.readouterr().out


def test_leaf_class_names_must_name_one_class_of_the_model():
    """A bare class name held by two classes of the model is refused, listing both by their
    qualified names, which then pick one."""
    from se_inject._models import classes_named
    from se_inject.errors import InvalidArgumentError
    a = type("Block", (torch.nn.Identity,), {"__module__": "first"})
    b = type("Block", (torch.nn.Identity,), {"__module__": "second"})
    model = torch.nn.Sequential(a(), b(), torch.nn.ReLU())
    with pytest.raises(InvalidArgumentError, match=r"--leaf 'Block' names 2 classes of the "
                       r"model: first\.Block, second\.Block"):
        classes_named(model, ["Block"], "--leaf")
    assert classes_named(model, ["second.Block", "ReLU"], "--leaf") == (b, torch.nn.ReLU)
    assert classes_named(model, [a], "--leaf") == (a,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_checkpoint_converts_and_strips_in_its_own_dtype(r18, tmp_path, dtype):
    m, _ = r18
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    torch.save(sd, tmp_path / "half.pth")
    out = convert(tmp_path / "half.pth", tmp_path / "se.safetensors", model="resnet18")
    state, _ = read_checkpoint(out)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {dtype}
    plain = timm.create_model("resnet18", pretrained=False, num_classes=7)
    plain.load_state_dict(sd)
    x = torch.randn(2, 3, 64, 64)
    y0, y1 = _out(plain, x), _out(se_inject.load(out), x)
    assert (y1 - y0).abs().max() <= 1e-6 * y0.abs().max()
    state, _ = read_checkpoint(strip(out, tmp_path / "back.safetensors"))
    assert state.keys() == sd.keys() and all(torch.equal(state[k], v) for k, v in sd.items())


def test_a_half_precision_weight_that_scaling_would_overflow_is_refused(r18, tmp_path):
    m, _ = r18
    sd = {k: v.half() if v.is_floating_point() else v for k, v in m.state_dict().items()}
    sd["layer1.0.bn2.weight"][0] = 40000.0                 # x 2 is past float16's 65504
    torch.save(sd, tmp_path / "half.pth")
    with pytest.raises(CheckpointError, match=r"`layer1.0.bn2.weight` does not fit torch.float16"):
        convert(tmp_path / "half.pth", tmp_path / "se.safetensors", model="resnet18")
    assert not (tmp_path / "se.safetensors").exists()


def test_convert_takes_a_backbone_saved_without_its_classifier(tmp_path):
    m = _trained_like(timm.create_model("resnet18", pretrained=False, num_classes=0)).eval()
    torch.save(m.state_dict(), tmp_path / "backbone.pth")
    g = se_inject.load(convert(tmp_path / "backbone.pth", tmp_path / "se.safetensors",
                               model="resnet18"))
    x = torch.randn(2, 3, 64, 64)
    y0, y1 = _out(m, x), _out(g, x)
    assert y1.shape == (2, 512) and (y1 - y0).abs().max() <= 1e-5 * y0.abs().max()


def test_convert_refuses_a_model_whose_blocks_all_hold_gates(tmp_path):
    torch.save(timm.create_model("efficientnet_b0", pretrained=False).state_dict(),
               tmp_path / "b0.pth")
    with pytest.raises(CheckpointError, match="already holds a channel gate.*nothing was written"):
        convert(tmp_path / "b0.pth", tmp_path / "se.safetensors", model="efficientnet_b0")
    assert [p.name for p in tmp_path.iterdir()] == ["b0.pth"]


def test_two_models_in_one_checkpoint_are_not_guessed_between(r18, tmp_path):
    m, _ = r18
    sd = m.state_dict()
    torch.save({"state_dict": {**{f"model.{k}": v for k, v in sd.items()},
                               **{f"model_ema.{k}": v for k, v in sd.items()}}}, tmp_path / "t.ckpt")
    with pytest.raises(CheckpointError, match="two sets of resnet18's weights in it, under "
                                              "`model.` and `model_ema.`"):
        convert(tmp_path / "t.ckpt", tmp_path / "se.safetensors", model="resnet18")
    assert not (tmp_path / "se.safetensors").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    src = tmp_path / "evil.pth"
    with open(src, "wb") as fh:
        pickle.dump({"state_dict": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="would import or run code"):
        read_checkpoint(src)
    assert not (tmp_path / "pwned").exists() and not os.path.exists("pwned")


@pytest.mark.parametrize("option", [{"checkpoint_path": "OTHER"}, {"pretrained": True}])
def test_a_recipe_that_asks_for_weights_from_elsewhere_is_refused(r18, tmp_path, option):
    """A recipe is data from a file: the architecture's options in it must not make load() read
    another file (timm's checkpoint_path) or download weights (pretrained)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    m, src = r18
    path = convert(src, tmp_path / "se.safetensors", model="resnet18")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta[se_inject.checkpoint.METADATA_KEY])
    option = {k: str(src) if v == "OTHER" else v for k, v in option.items()}
    recipe["base"]["kwargs"].update(option)
    crafted = tmp_path / "crafted.safetensors"
    save_file(load_file(path), crafted,
              metadata={**meta, se_inject.checkpoint.METADATA_KEY: json.dumps(recipe)})
    (key, value), = option.items()
    with pytest.raises(se_inject.SEInjectError, match=f"{key}={value!r} is not taken"):
        se_inject.load(crafted)
    assert main(["plan", "resnet18", "--model-kwargs", json.dumps(option)]) == 2


_BROKEN_RECIPES = {
    "nested-past-the-stack": (lambda r: "[" * 100_000 + "]" * 100_000, "not valid JSON"),
    "steps-not-a-list": (lambda r: {**r, "steps": 5}, "'steps' is not a list"),
    "no-steps": (lambda r: {k: v for k, v in r.items() if k != "steps"}, "'steps' is not"),
    "kwargs-a-list": (lambda r: {**r, "base": {**r["base"], "kwargs": [1]}},
                      "'base.kwargs' is not an object"),
    "rules-a-number": (lambda r: {**r, "steps": [{**r["steps"][0], "rules": 3}]},
                       "step 0: 'rules' is not a list"),
    "gates-not-names": (lambda r: {**r, "steps": [{**r["steps"][0], "gates": [1]}]},
                        "step 0: 'gates' is not a list of str"),
    "step-a-string": (lambda r: {**r, "steps": ["apply"]}, "step 0 is not an object"),
    "ratio-a-word": (lambda r: {**r, "steps": [{**r["steps"][0], "ratio": "x"}]},
                     "step 0 holds what apply() refuses: ratio must be a positive integer"),
    "input-past-int64": (lambda r: {**r, "steps": [{**r["steps"][0],
                                                     "input_size": [3, 10 ** 12, 10 ** 12]}]},
                         "more than a tensor can hold"),
}


@pytest.mark.parametrize("case", list(_BROKEN_RECIPES))
def test_a_recipe_changed_by_hand_gets_an_error_naming_the_file(r18, tmp_path, case):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    m, src = r18
    path = convert(src, tmp_path / "se.safetensors", model="resnet18")
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    change, message = _BROKEN_RECIPES[case]
    recipe = change(json.loads(meta[se_inject.checkpoint.METADATA_KEY]))
    crafted = tmp_path / "crafted.safetensors"
    save_file(load_file(path), crafted, metadata={**meta, se_inject.checkpoint.METADATA_KEY:
                                                  recipe if isinstance(recipe, str)
                                                  else json.dumps(recipe)})
    with pytest.raises(se_inject.SEInjectError, match=re.escape(message)) as info:
        se_inject.load(crafted)
    assert str(crafted) in str(info.value)


def test_a_pickled_model_object_is_refused_naming_its_class(tmp_path):
    """torch.save(model) rather than its state_dict: the message names what the file would
    import, and carries none of torch.load's terminal escapes."""
    src = tmp_path / "whole.pth"
    torch.save(BlockNet(), src)
    with pytest.raises(CheckpointError, match="would import or run code") as info:
        read_checkpoint(src)
    assert "holds a pickled handwritten.BlockNet" in str(info.value)
    assert "\x1b" not in str(info.value)


def test_bad_checkpoints_exit_2_and_write_nothing(r18, tmp_path, capsys):
    m, src = r18
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(src.read_bytes()[:5000])
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    out = tmp_path / "out.safetensors"
    cases = [
        (["convert", str(trunc), "--model", "resnet18", "-o", str(out)], "corrupt or truncated"),
        (["convert", str(bad_st), "--model", "resnet18", "-o", str(out)], "corrupt or truncated"),
        (["convert", str(src), "--model", "resnet34", "-o", str(out)],
         "does not fit ResNet.*missing.*e.g."),
        (["convert", str(src), "-o", str(out)], "does not name its architecture"),
        (["convert", str(src), "--model", "resnet18", "-o", str(src), "--force"],
         "overwrite the input"),
        (["convert", str(src), "--model", "resnet81", "-o", str(out)], "Did you mean"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert re.search(message, err), (argv, err)
        assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "r18.pth",
                                                          "trunc.pth"]
    out.write_text("keep me")
    assert main(["convert", str(src), "--model", "resnet18", "-o", str(out)]) == 2
    assert out.read_text() == "keep me"
    assert main(["convert", str(src), "--model", "resnet18", "-o", str(out), "--force"]) == 0
    assert len(gates(se_inject.load(out))) == 8
    assert main(["convert", str(out), "--remove", "-o", str(tmp_path / "back.pth"),
                 "--format", "pth"]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)["state_dict"]
    assert all(torch.equal(back[k], v) for k, v in m.state_dict().items())


def test_load_builds_on_the_meta_device_and_adopts_the_file_tensors(r18, tmp_path, monkeypatch):
    import se_inject.checkpoint as ck
    m, src = r18
    out = convert(src, tmp_path / "se.safetensors", model="resnet18")
    real = ck._create
    devices = []

    def spy(arch, kwargs):
        devices.append(torch.empty(0).device.type)
        return real(arch, kwargs)
    monkeypatch.setattr(ck, "_create", spy)
    g = se_inject.load(out)
    assert devices == ["meta"]                       # no model with random weights was made
    assert all(not t.is_meta for t in (*g.parameters(), *g.buffers()))
    x = torch.randn(2, 3, 64, 64)
    y0, y1 = _out(m, x), _out(g, x)
    assert (y1 - y0).abs().max() <= 1e-6 * y0.abs().max()
    se_inject.remove(g)                              # the scaled layers are scaled back
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in g.state_dict().items())


def test_a_recipe_from_before_reparam_sums_loads_its_gates_where_they_were(tmp_path):
    """Rules in checkpoints written before `reparam_sums` existed gated such sums: loading
    one rebuilds those gates (reading them as `allow`), not the fewer that `skip` gives."""
    text = (se_inject.rules.builtin_rules_dir() / "residual.yaml").read_text()
    rule = tmp_path / "residual.yaml"
    rule.write_text(text.replace("reparam_sums: skip", "reparam_sums: allow"))
    m = se_inject.apply(timm.create_model("repvgg_a0", num_classes=10).eval(), rules=[rule])
    path = se_inject.save(m, tmp_path / "rep.pth")
    obj = torch.load(path, weights_only=True)
    recipe = json.loads(obj["se_inject.recipe"])
    for step in recipe["steps"]:
        for r in step["rules"]:
            del r["reparam_sums"]
    obj["se_inject.recipe"] = json.dumps(recipe)
    torch.save(obj, path)
    g = se_inject.load(path).eval()
    assert [n for n, _ in gates(g)] == [n for n, _ in gates(m)]
    assert len(gates(g)) > 0
    assert len(se_inject.plan(timm.create_model("repvgg_a0"))) == 0   # what `skip` would give
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)


def test_a_recipe_from_before_layer_sums_reads_them_as_allowed(tmp_path):
    """Rules in checkpoints written before `layer_sums` existed gated sums of convolutions of
    parallel streams (an octave convolution's) like any other sum: a recipe without the key
    reads it as `allow`, so that such gates come back where they were; one written now
    records `skip`, and both load."""
    from se_inject.recipe import rules_from
    m = se_inject.apply(timm.create_model("resnet18", num_classes=10).eval())
    path = se_inject.save(m, tmp_path / "r.pth")
    obj = torch.load(path, weights_only=True)
    recipe = json.loads(obj["se_inject.recipe"])
    step = recipe["steps"][0]
    assert [r.layer_sums for r in rules_from(step)] == ["skip", "skip"]
    for r in step["rules"]:
        del r["layer_sums"]
    assert [r.layer_sums for r in rules_from(step)] == ["allow", "allow"]
    obj["se_inject.recipe"] = json.dumps(recipe)
    torch.save(obj, path)
    g = se_inject.load(path).eval()
    assert [n for n, _ in gates(g)] == [n for n, _ in gates(m)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)


def test_a_checkpoint_from_before_a_block_was_found_loads_with_the_gates_it_had(tmp_path):
    """cspresnet50's checkpoints written before the first block of each CSP stage was found
    hold 9 gates where apply() now places 13: load() places the 9 it records, and the model
    computes what the saved one did, the 4 others counting as gates that pass everything."""
    m = se_inject.apply(timm.create_model("cspresnet50", num_classes=10).eval(),
                        input_size=(3, 64, 64))
    new = [n for n, _ in gates(m) if ".blocks.0." in n]
    assert len(gates(m)) == 13 and len(new) == 4
    path = se_inject.save(m, tmp_path / "csp.pth")
    obj = torch.load(path, weights_only=True)
    recipe = json.loads(obj["se_inject.recipe"])
    for step in recipe["steps"]:
        step["gates"] = [g for g in step["gates"] if g not in new]
    obj["state_dict"] = {k: v for k, v in obj["state_dict"].items()
                         if not any(k.startswith(g + ".") for g in new)}
    obj["se_inject.recipe"] = json.dumps(recipe)
    torch.save(obj, path)
    g = se_inject.load(path).eval()
    assert sorted(n for n, _ in gates(g)) == sorted(n for n, _ in gates(m) if n not in new)
    with torch.no_grad():
        for n, gate in gates(m):
            if n in new:
                gate.fc2.weight.zero_()
                gate.fc2.bias.fill_(30.0)  # sigmoid(30) is 1.0 in float32: passes everything
        x = torch.randn(1, 3, 64, 64)
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)
    assert len(gates(se_inject.apply(timm.create_model("cspresnet50", num_classes=10),
                                     input_size=(3, 64, 64)))) == 13  # outside load(): all


def test_a_half_precision_checkpoint_loads_in_float32_with_its_values(tmp_path):
    model = timm.create_model("resnet18", pretrained=False).half()
    se_inject.apply(model)
    path = se_inject.save(model, tmp_path / "half.safetensors")
    loaded = se_inject.load(path)
    state = model.state_dict()
    for k, v in loaded.state_dict().items():
        if v.is_floating_point():
            assert v.dtype == torch.float32, k  # as timm builds it
            assert torch.equal(v, state[k].float()), k  # every float16 value, exactly
    assert torch.equal(loaded.half().state_dict()["fc.weight"], state["fc.weight"])


@pytest.mark.parametrize("wrap,attr", [(torch.compile, "_orig_mod"),
                                       (torch.nn.DataParallel, "module")])
def test_saving_a_wrapped_model_names_the_model_to_save(tmp_path, wrap, attr):
    """save() of torch.compile's wrapper or of DataParallel (as a training script holds the
    model) is refused with the attribute that holds the model, and nothing is written; saving
    that model loads back as it."""
    model = timm.create_model("resnet18", num_classes=3).eval()
    se_inject.apply(model, input_size=(3, 64, 64))
    wrapper = wrap(model)
    with pytest.raises(CheckpointError, match=rf"se_inject\.save\(model\.{attr}, path\)"):
        se_inject.save(wrapper, tmp_path / "se.safetensors")
    assert not list(tmp_path.iterdir())
    again = se_inject.load(se_inject.save(getattr(wrapper, attr), tmp_path / "se.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again.eval()(x), model(x))
