"""Random CNNs for property-based tests: chains, residual blocks of 1-3 convolutions, inception
modules of 2-5 branches (pooling branches among them), nested in each other, with random widths
and strides; and how many gates the built-in rules should place in each. Some pad as
TensorFlow does and check their input's channels, as Hugging Face's CNNs do, reading the
input's size as Python numbers."""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st
from torch import nn

import se_inject
from se_inject.errors import NoSitesError, TraceError
from se_inject.identity import IdentityInitError

from conftest import randomize_norms
from handwritten import tf_same_pad


class SamePad(nn.Module):
    """TensorFlow's "SAME" padding for a convolution of kernel k and stride s, worked out from
    the map's size as Python numbers."""

    def __init__(self, k: int, s: int):
        super().__init__()
        self.k, self.s = k, s

    def forward(self, x):
        return tf_same_pad(x, self.k, self.s)


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, relu: bool = True,
             same: bool = False) -> list:
    conv = [SamePad(k, stride), nn.Conv2d(cin, cout, k, stride, 0, bias=False)] if same else \
        [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)]
    layers = [*conv, nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU()] if relu else layers


class Res(nn.Module):
    """relu(branch(x) + shortcut(x)); the shortcut is x, or a 1x1 projection when the shape
    changes. The branch may hold a nested block between its convolutions. The sum is written
    ``y + s``, ``y += s`` or in place, ``y.add_(s)``, the ReLU then reading ``y``."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module | None, style: str = "plus"):
        super().__init__()
        self.branch, self.shortcut, self.style = branch, shortcut, style

    def forward(self, x, scale: float = 1.0):
        s = x if self.shortcut is None else self.shortcut(x)
        y = self.branch(x)
        if scale != 1.0:
            y = y * scale
        if self.style == "in_place":
            y.add_(s)
        elif self.style == "augmented":
            y += s
        else:
            y = y + s
        return torch.relu(y)


class ResDict(Res):
    """A Res its parent hands a dict, ``{"x": x}``."""

    def forward(self, feats: dict):
        return super().forward(feats["x"])


class ResStar(Res):
    def forward(self, *args):
        return super().forward(*args)


class ResKeywords(Res):
    def forward(self, x, **kw):
        return super().forward(x, **kw)


# How Net calls a block it holds: the class the block is of for each way, and the call
CALLS = {"plain": (Res, lambda b, x: b(x)), "keyword": (Res, lambda b, x: b(x, scale=1.0)),
         "dict": (ResDict, lambda b, x: b({"x": x})), "star": (ResStar, lambda b, x: b(x)),
         "keywords": (ResKeywords, lambda b, x: b(x, scale=1.0))}


def call_block(b: nn.Module, x):
    return CALLS[getattr(b, "call", "plain")][1](b, x)


class Inception(nn.Module):
    def __init__(self, branches: list[nn.Module]):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], dim=1)


class Net(nn.Module):
    def __init__(self, stem: int, blocks: list[nn.Module], width: int, checks: bool = False):
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, stem))
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(width, 5)
        self.checks = checks  # the input's channels, as Hugging Face's embeddings check them

    def forward(self, x):
        if self.checks and x.shape[1] != 3:
            raise ValueError("the input must have 3 channels")
        x = self.stem(x)
        for b in self.blocks:
            x = call_block(b, x)
        return self.head(x.mean((2, 3)))


@dataclass
class Built:
    module: nn.Module
    width: int           # output channels
    downsample: int      # how many stride-2 steps it took
    gates: int           # gates the built-in rules place in it, whatever encloses it
    pool_branches: int = 0
    kinds: list = field(default_factory=list)
    yielding: int = 0    # its own inception gate: the rule yields it when a matched residual or
                         # inception block encloses it


def _block(draw, cin: int, depth: int, strides_left: int, same: bool = False) -> Built:
    conv_bn = functools.partial(_conv_bn, same=same)
    kinds = ["chain", "res", "inception"] if depth < 2 else ["chain", "res"]
    kind = draw(st.sampled_from(kinds))
    width = st.integers(2, 12).map(lambda v: 2 * v)
    if kind == "chain":
        cout = draw(width)
        stride = 2 if strides_left and draw(st.booleans()) else 1
        return Built(nn.Sequential(*conv_bn(cin, cout, stride=stride)), cout, stride == 2, 0,
                     kinds=["chain"])
    if kind == "res":
        n = draw(st.integers(1, 3))
        cout = draw(width)
        stride = 2 if strides_left and draw(st.booleans()) else 1
        layers, c, inner = [], cin, None
        for i in range(n):
            last = i == n - 1
            layers += conv_bn(c, cout, stride=stride if i == 0 else 1, relu=not last)
            c = cout
            if i == 0 and not last and depth < 2 and draw(st.booleans()):
                inner = _block(draw, c, depth + 1, 0, same)
                layers.append(inner.module)
                c = inner.width
                if c != cout:
                    layers += conv_bn(c, cout, k=1)
                    c = cout
        if n == 1 and depth < 2 and draw(st.booleans()):   # a nested block after the conv
            inner = _block(draw, cout, depth + 1, 0, same)
            layers += [inner.module, *conv_bn(inner.width, cout, k=1, relu=False)]
        short = None if stride == 1 and cin == cout else \
            nn.Sequential(*conv_bn(cin, cout, k=1, stride=stride, relu=False))
        # a residual block matches unless it is one convolution written out: a single conv
        # and norm beside the shortcut, nothing nonlinear (the rule's reparam_sums: skip)
        linear = n == 1 and inner is None
        g = (0 if linear else 1) + (inner.gates if inner else 0)
        style = draw(st.sampled_from(["plus", "augmented", "in_place"]))
        call = draw(st.sampled_from(list(CALLS))) if depth == 0 else "plain"  # Net calls it
        block = CALLS[call][0](nn.Sequential(*layers), short, style)
        block.call = call
        return Built(block, cout, stride == 2, g,
                     inner.pool_branches if inner else 0, ["res"] + (inner.kinds if inner else []))
    n = draw(st.integers(2, 5))
    branches, widths, with_conv, pools, inners, kinds = [], [], 0, 0, [], ["inception"]
    for _ in range(n):
        b = draw(st.sampled_from(["conv", "conv2", "pool", "poolconv", "nested"]
                                 if depth < 1 else ["conv", "conv2", "pool", "poolconv"]))
        if b in ("conv", "conv2"):
            cout = draw(width)
            layers = conv_bn(cin, cout) + (conv_bn(cout, cout) if b == "conv2" else [])
            with_conv += 1
        elif b == "pool":
            layers, cout = [nn.MaxPool2d(3, 1, 1)], cin
            pools += 1
        elif b == "poolconv":
            cout = draw(width)
            layers = [nn.MaxPool2d(3, 1, 1), *conv_bn(cin, cout, k=1)]
            with_conv += 1
        else:
            cout = draw(width)
            inner = _block(draw, cin, depth + 1, 0, same)
            layers = [inner.module, *conv_bn(inner.width, cout, k=1)]
            with_conv += 1
            inners.append(inner)
            pools += inner.pool_branches
            kinds += inner.kinds
        branches.append(nn.Sequential(*layers))
        widths.append(cout)
    matches = with_conv >= 2           # the rule: at least 2 branches with a convolution
    gates = sum(i.gates + (0 if matches else i.yielding) for i in inners)
    return Built(Inception(branches), sum(widths), 0, gates, pools, kinds, int(matches))


@st.composite
def nets(draw) -> tuple[Net, int]:
    """A random Net and the number of gates the default rules should give it."""
    stem = draw(st.integers(2, 8).map(lambda v: 2 * v))
    same, checks = draw(st.booleans()), draw(st.booleans())
    blocks, c, strides, gates = [], stem, 2, 0
    for _ in range(draw(st.integers(1, 4))):
        b = _block(draw, c, 0, strides, same)
        blocks.append(b.module)
        c, strides, gates = b.width, strides - b.downsample, gates + b.gates + b.yielding
    torch.manual_seed(draw(st.integers(0, 2 ** 16)))
    net = Net(stem, blocks, c, checks).eval()
    randomize_norms(net, spread=0.2)
    return net, gates


def check(net: nn.Module, expected: int) -> str:
    """The invariants; returns the outcome ("gated", "refused", "identity refused")."""
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        y0 = net(x)
    state0 = {k: v.clone() for k, v in net.state_dict().items()}
    paper = copy.deepcopy(net)
    try:
        se_inject.apply(paper, input_size=(3, 16, 16))
    except NoSitesError:
        assert expected == 0, f"refused a net with {expected} blocks"
        assert list(paper.state_dict()) == list(state0)
        return "refused"
    n = sum(1 for m in paper.modules() if isinstance(m, se_inject.ChannelGate))
    assert n == expected, f"{n} gates for {expected} blocks"
    with torch.no_grad():
        assert paper(x).shape == y0.shape
        for m in paper.modules():  # gates that pass everything: the plain net's outputs
            if isinstance(m, se_inject.ChannelGate):
                m.fc2.weight.zero_()
                m.fc2.bias.fill_(30.0)  # sigmoid(30) is 1.0 in float32
        assert torch.allclose(paper(x), y0, rtol=0, atol=0), "saturated gates changed the net"
        odd = torch.randn(2, 3, 15, 15)  # another size, odd: nothing is fixed to the one traced
        assert torch.equal(paper(odd), net(odd)), "saturated gates changed the net at 15 x 15"
        if net.checks:  # the model's own forward, as it was: it still checks its input
            try:
                paper(torch.randn(1, 4, 16, 16))
            except ValueError:
                pass
            else:
                raise AssertionError("the gated net took an input of 4 channels")
    ident = copy.deepcopy(net)
    try:
        se_inject.apply(ident, input_size=(3, 16, 16), init="identity")
    except IdentityInitError:   # a branch without weights (a pooling branch) under a gate
        assert any(isinstance(m, nn.MaxPool2d) for m in net.modules()), \
            "identity initialisation refused for a net without a pooling branch"
        assert all(torch.equal(v, state0[k]) for k, v in ident.state_dict().items())
        return "identity refused"
    with torch.no_grad():
        assert torch.equal(ident(x), y0), "identity-initialised gates changed the outputs"
    ident.load_state_dict(state0, strict=False)  # the plain weights, loaded after gating
    with torch.no_grad():
        assert torch.equal(ident(x), y0), "a plain state_dict changed the identity-gated net"
    meta = copy.deepcopy(net).to("meta")  # made without memory, gated, given storage, loaded
    se_inject.apply(meta, input_size=(3, 16, 16), init="identity")
    meta.to_empty(device="cpu")
    with torch.no_grad():
        for g in meta.modules():
            if isinstance(g, se_inject.ChannelGate):
                for p in g.parameters():
                    p.fill_(float("nan"))  # what the memory to_empty() gives may hold
    meta.load_state_dict(state0, strict=False)
    with torch.no_grad():
        assert torch.equal(meta(x), y0), "gates made on the meta device: a plain state_dict " \
                                         "loaded after to_empty() changed the outputs"
    se_inject.remove(ident)
    with torch.no_grad():
        assert torch.equal(ident(x), y0)
    assert list(ident.state_dict()) == list(state0)
    assert all(torch.equal(v, state0[k]) for k, v in ident.state_dict().items())
    _check_last_block_alone(net, x, y0, state0)
    return "gated"


def _check_last_block_alone(net: nn.Module, x: torch.Tensor, y0: torch.Tensor,
                            state0: dict) -> None:
    """The last block as a part: part_input_size gives what the net's layers hand it, and
    gated alone with identity gates, then taken out through the whole net, it leaves the
    net's outputs and weights as they were."""
    with torch.no_grad():
        h = net.stem(x)
        for b in net.blocks[:-1]:
            h = call_block(b, h)
    part, call = f"blocks.{len(net.blocks) - 1}", getattr(net.blocks[-1], "call", "plain")
    if call == "keywords":  # a part gated alone is traced at its defaults: kw would be {}
        try:
            se_inject.part_input_size(net, part, input_size=tuple(x.shape[1:]))
        except TraceError:
            return
        raise AssertionError("part_input_size took a part handed a constant in **kw")
    if call == "star":  # super().forward(*args) iterates its input: fx cannot trace it alone
        return
    if call == "dict":  # (part_input_size asks for it)
        size = {"x": tuple(h.shape[1:])}
    else:
        size = se_inject.part_input_size(net, part, input_size=tuple(x.shape[1:]))
        assert size == tuple(h.shape[1:]), f"part_input_size gave {size} for {tuple(h.shape[1:])}"
    whole = copy.deepcopy(net)
    try:
        se_inject.apply(whole.blocks[-1], input_size=size, init="identity")
    except (NoSitesError, IdentityInitError):  # a chain, or a pooling branch under its gate
        return
    with torch.no_grad():
        assert torch.equal(whole(x), y0), "identity gates in the last block changed the net"
    se_inject.remove(whole)  # from the whole net: the part's gates, scaled layers and hooks
    assert list(whole.state_dict()) == list(state0)
    assert all(torch.equal(v, state0[k]) for k, v in whole.state_dict().items()), \
        "remove() on the net left the last block's layers scaled"
