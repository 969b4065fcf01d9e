"""What kind of operation a traced node is: tables from module class, function and tensor
method to a kind (conv, dwconv, norm, act, add, sub, cat, pool, mul, linear, permute,
pixel_shuffle, gate, chgate, identity...), looked up by the graph view and by the tracer."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .gate import ChannelGate
from .shapes import VALUE

__all__ = ["node_kind", "MERGE_KINDS"]

MERGE_KINDS = ("add", "cat")  # the ops a block ends in

# Module class -> op kind, looked up along the class's MRO (subclasses such as timm's
# Conv2dSame or StdConv2d inherit their base's kind).
_MODULE_KINDS: dict[type, str] = {
    ChannelGate: "gate",
    nn.Conv1d: "conv", nn.Conv2d: "conv", nn.Conv3d: "conv",
    nn.ConvTranspose2d: "conv",
    nn.Linear: "linear",
    nn.modules.batchnorm._NormBase: "norm", nn.GroupNorm: "norm", nn.LayerNorm: "norm",
    nn.LocalResponseNorm: "norm",
    nn.ReLU: "act", nn.ReLU6: "act", nn.LeakyReLU: "act", nn.PReLU: "act", nn.ELU: "act",
    nn.SELU: "act", nn.CELU: "act", nn.GELU: "act", nn.SiLU: "act", nn.Mish: "act",
    nn.Sigmoid: "act", nn.Tanh: "act", nn.Hardswish: "act", nn.Hardsigmoid: "act",
    nn.Hardtanh: "act", nn.Softplus: "act",
    nn.MaxPool2d: "pool", nn.AvgPool2d: "pool", nn.AdaptiveAvgPool2d: "pool",
    nn.AdaptiveMaxPool2d: "pool",
    nn.Identity: "identity", nn.Dropout: "identity", nn.Dropout2d: "identity",
    # channels to pixels and back, (N, C·r², H, W) <-> (N, C, H·r, W·r): super-resolution
    # nets' upsamplers (ESPCN, EDSR, Real-ESRGAN's SRVGG), some stems
    nn.PixelShuffle: "pixel_shuffle", nn.PixelUnshuffle: "pixel_shuffle",
}

try:  # torchvision's leaf modules whose meaning matters here
    from torchvision.ops.misc import Permute as _TvPermute
    from torchvision.ops.misc import SqueezeExcitation as _TvSE
    _MODULE_KINDS[_TvPermute] = "permute"
    _MODULE_KINDS[_TvSE] = "chgate"   # a channel gate that is not ours
except ImportError:
    pass

# Function (call_function target) -> op kind.
_FUNCTION_KINDS: dict[Any, str] = {
    F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv", torch.conv2d: "conv",
    F.linear: "linear",
    F.batch_norm: "norm", F.layer_norm: "norm", F.group_norm: "norm",
    F.relu: "act", torch.relu: "act", F.relu6: "act", F.gelu: "act", F.silu: "act",
    F.hardswish: "act", F.leaky_relu: "act", torch.sigmoid: "act", torch.tanh: "act",
    F.max_pool2d: "pool", F.avg_pool2d: "pool", F.adaptive_avg_pool2d: "pool",
    F.adaptive_max_pool2d: "pool",
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.permute: "permute",
    torch.pixel_shuffle: "pixel_shuffle", torch.pixel_unshuffle: "pixel_shuffle",
}

# Tensor method (call_method target) -> op kind.
_METHOD_KINDS: dict[str, str] = {
    "add": "add", "add_": "add", "__add__": "add", "__iadd__": "add",
    "sub": "sub", "sub_": "sub", "__sub__": "sub", "__isub__": "sub",
    "mul": "mul", "mul_": "mul", "relu": "act", "relu_": "act", "sigmoid": "act",
    "permute": "permute",
}


def is_rearrange(obj) -> bool:
    """einops' ``rearrange`` function or its ``Rearrange`` layer class (einops is the model's
    dependency, not se-inject's: known by name and module, never imported here)."""
    return getattr(obj, "__name__", "") in ("rearrange", "Rearrange") and \
        (getattr(obj, "__module__", "") or "").startswith("einops")


def layer_kind(m: nn.Module) -> str | None:
    """The kind of a module of a known class (its own, or a base class's): "conv", "norm",
    "act", ...; None for others."""
    for cls in type(m).__mro__:
        kind = _MODULE_KINDS.get(cls)
        if kind is not None:
            if kind == "conv" and getattr(m, "groups", 1) > 1 and m.groups == m.in_channels:
                return "dwconv"
            return kind
    return None


def _module_kind(m: nn.Module) -> str:
    """A known class's kind; a leaf module fx did not look into (torchvision's
    Conv2dNormActivation, a user's leaf) counts as a convolution if it holds one."""
    kind = layer_kind(m)
    if kind is not None:
        return kind
    inner = {layer_kind(sub) for sub in m.modules()}
    for k in ("gate", "chgate", "conv", "dwconv"):
        if k in inner:
            return k
    return "module"


def node_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "call_module":
        return _module_kind(modules[node.target])
    if node.op == "call_function":
        kind = _FUNCTION_KINDS.get(node.target, "other")
        if kind == "conv":
            groups = node.kwargs.get("groups", node.args[6] if len(node.args) > 6 else 1)
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            w = weight.meta.get(VALUE) if isinstance(weight, fx.Node) else None
            if isinstance(groups, int) and groups > 1 and w is not None and w.shape[1] == 1:
                return "dwconv"
        return kind
    if node.op == "call_method":
        return _METHOD_KINDS.get(node.target, "other")
    return "other"


# Reads of a tensor that depend on its shape, dtype or device only (timm's drop path in
# training mode reads its input's shape and makes its mask with ``x.new_empty(...)``).
_METADATA_ATTRS = {"shape", "ndim", "dtype", "device", "layout", "is_cuda", "requires_grad"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "element_size", "get_device",
                     "is_contiguous", "new_empty", "new_zeros", "new_ones", "new_full"}
_METADATA_FUNCTIONS = {torch.empty_like, torch.zeros_like, torch.ones_like, torch.full_like}


def flat(args):
    """The items of ``args``, lists, tuples and dicts followed."""
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from flat(a)
        elif isinstance(a, dict):
            yield from flat(a.values())
        else:
            yield a


def reads_metadata_only(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads nothing of ``node`` but its shape, dtype or device."""
    if user.op == "call_function" and user.target is getattr:
        return user.args[0] is node and user.args[1] in _METADATA_ATTRS
    if (user.op == "call_method" and user.target in _METADATA_METHODS) or \
            (user.op == "call_function" and user.target in _METADATA_FUNCTIONS):
        return user.args[0] is node and node not in flat(user.args[1:]) and \
            node not in flat(user.kwargs.values())
    return False


def value_readers(node: fx.Node) -> list[fx.Node]:
    """The ops that read ``node``'s values, not only its shape, dtype or device."""
    return [u for u in node.users if not reads_metadata_only(u, node)]


# Stochastic depth: a residual branch dropped per sample in training (timm's DropPath,
# torchvision's StochasticDepth and stochastic_depth), identity in eval mode.
_DROP_MODULES: tuple[type, ...] = ()
_DROP_FUNCTIONS: set = set()
try:
    from timm.layers import DropPath as _TimmDropPath
    _DROP_MODULES += (_TimmDropPath,)
except ImportError:
    pass
try:
    from torchvision.ops import StochasticDepth as _TvDrop
    from torchvision.ops import stochastic_depth as _tv_drop
    _DROP_MODULES += (_TvDrop,)
    _DROP_FUNCTIONS.add(_tv_drop)
except ImportError:
    pass
_RANDOM_OPS = {"bernoulli", "bernoulli_", "uniform_", "rand_like", torch.bernoulli,
               torch.rand_like, torch.rand}
_PRODUCT_OPS = {operator.mul, torch.mul, "mul"}
_QUOTIENT_OPS = {operator.truediv, torch.div, "div"}


def drop_path_input(node: fx.Node, module_of) -> fx.Node | None:
    """``x`` where ``node`` is stochastic depth over ``x``: a call of a drop-path module or
    function, or, traced through in training mode, ``x`` times a random per-sample mask made
    from ``x``'s shape alone, or ``x`` divided by a number (the keep probability, as timm's
    drop path before 0.5 and the code that copied it, mmcv's among them, scale the input
    rather than the mask) times such a mask. ``module_of(node)`` gives a call_module node's
    module."""
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if not args:
        return None
    if node.op == "call_module" and isinstance(module_of(node), _DROP_MODULES) \
            or node.op == "call_function" and node.target in _DROP_FUNCTIONS:
        return node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if node.op in ("call_function", "call_method") and node.target in _PRODUCT_OPS \
            and len(args) == 2 and not node.kwargs:
        for x, mask in ((args[0], args[1]), (args[1], args[0])):
            if _random_mask(mask, x):
                return x
            inner = _divided_by_a_number(x)
            if inner is not None and _random_mask(mask, inner):
                return inner
    return None


def _divided_by_a_number(node: fx.Node) -> fx.Node | None:
    """``x`` where ``node`` is ``x / k`` or ``x.div(k)`` with ``k`` a Python number."""
    if node.op in ("call_function", "call_method") and node.target in _QUOTIENT_OPS \
            and len(node.args) == 2 and not node.kwargs and isinstance(node.args[0], fx.Node) \
            and type(node.args[1]) in (int, float):
        return node.args[0]
    return None


def _random_mask(mask: fx.Node, x: fx.Node, reach: int = 32) -> bool:
    """Whether ``mask`` is drawn at random from nothing but ``x``'s shape and constants."""
    seen, stack, drawn = {mask}, [mask], False
    while stack:
        n = stack.pop()
        if n.op not in ("call_function", "call_method") or len(seen) > reach:
            return False
        drawn = drawn or n.target in _RANDOM_OPS
        for p in n.all_input_nodes:
            if p is x:
                if not reads_metadata_only(n, x):
                    return False
            elif p not in seen:
                seen.add(p)
                stack.append(p)
    return drawn
