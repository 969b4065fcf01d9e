"""What kind of operation a traced node is: tables from module class, function and tensor
method to a kind (conv, dwconv, norm, act, add, sub, cat, pool, mul, linear, permute, gate,
chgate, identity...), looked up by the graph view and by the tracer."""
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
}

# Tensor method (call_method target) -> op kind.
_METHOD_KINDS: dict[str, str] = {
    "add": "add", "add_": "add", "__add__": "add", "__iadd__": "add",
    "sub": "sub", "sub_": "sub", "__sub__": "sub", "__isub__": "sub",
    "mul": "mul", "mul_": "mul", "relu": "act", "relu_": "act", "sigmoid": "act",
    "permute": "permute",
}


def _class_kind(m: nn.Module) -> str | None:
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
    kind = _class_kind(m)
    if kind is not None:
        return kind
    inner = {_class_kind(sub) for sub in m.modules()}
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
