"""The traced graph as a networkx DiGraph of activations, labelled with what rules need.

Only nodes that depend on a model input are in the view (parameters and constants are not
activations). Each carries ``kind`` (conv, dwconv, norm, act, add, cat, pool, mul, linear,
gate, input, other), ``ndim``, ``channels``, ``layout`` (nchw, nhwc or other), ``frame``
(the module invocation that created it) and ``module`` (the module it calls, if any).
``gate`` is an se-inject gate; ``chgate`` any other channel gate (an SE, ECA... scale).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .gate import SEGate
from .shapes import VALUE
from .trace import SCOPE, Frame, iter_tensor_args

__all__ = ["GraphView", "ROOT", "build_view", "node_kind"]

ROOT = "__se_inject_root__"  # virtual source of every model input, for dominator analysis

# Module class -> op kind, looked up along the class's MRO (subclasses such as timm's
# Conv2dSame or StdConv2d inherit their base's kind).
_MODULE_KINDS: dict[type, str] = {
    SEGate: "gate",
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
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    torch.cat: "cat", torch.concat: "cat", torch.concatenate: "cat",
    torch.permute: "permute",
}

# Tensor method (call_method target) -> op kind.
_METHOD_KINDS: dict[str, str] = {
    "add": "add", "add_": "add", "__add__": "add", "__iadd__": "add",
    "mul": "mul", "mul_": "mul", "relu": "act", "relu_": "act", "sigmoid": "act",
    "permute": "permute",
}

# Kinds whose 4-D output is channel-first whatever their input was.
_NCHW_PRODUCERS = {"conv", "pool"}


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


def _is_channel_gate(g: nx.DiGraph, node, reach: int = 32) -> bool:
    """``u * s`` where ``s`` is one value per channel (N, C, 1, 1) computed from ``u``: the
    scale of a squeeze-and-excitation, ECA or similar gate, whatever code wrote it."""
    a = g.nodes[node]
    if a["kind"] != "mul" or a["layout"] != "nchw":
        return False
    ins = list(g.predecessors(node))
    for u, s in ((x, y) for x in ins for y in ins if x is not y):
        while getattr(s, "target", None) in ("expand", "expand_as"):  # ECA broadcasts its scale
            s = s.args[0]
        su, ss = g.nodes[u].get("shape"), g.nodes[s].get("shape") if s in g else None
        if not (su and ss and len(su) == 4 and len(ss) == 4 and ss[1] == su[1] > 1
                and ss[2] == ss[3] == 1 and su[2] * su[3] > 1):
            continue
        seen, stack = {s}, [s]  # is u among s's nearby ancestors?
        while stack and len(seen) < reach:
            for p in g.predecessors(stack.pop()):
                if p is u:
                    return True
                if p not in seen:
                    seen.add(p)
                    stack.append(p)
    return False


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


def _permuted_layout(layout: str, dims: tuple[int, ...]) -> str:
    if layout == "nchw" and tuple(d % 4 for d in dims) == (0, 2, 3, 1):
        return "nhwc"
    if layout == "nhwc" and tuple(d % 4 for d in dims) == (0, 3, 1, 2):
        return "nchw"
    return "other"


def _permute_dims(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[int, ...]:
    if node.op == "call_module":  # torchvision.ops.Permute
        return tuple(getattr(modules[node.target], "dims", ()))
    rest = node.args[1:]
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = rest[0]
    dims = node.kwargs.get("dims", rest)
    return tuple(d for d in dims if isinstance(d, int))


_CHANNEL_DIM = {"nchw": 1, "nhwc": 3}


def _inherited_layout(g: nx.DiGraph, inputs: list, shape: tuple, kind: str) -> str:
    """An op keeps its 4-D inputs' layout if they agree on one and it keeps either their
    channel count or their batch and spatial sizes (a concatenation, a slice of channels);
    anything else (a permuting leaf module, a reshape) has an unknown layout."""
    alike = {g.nodes[i]["layout"] for i in inputs
             if g.nodes[i]["shape"] == shape and g.nodes[i]["layout"] != "other"}
    if len(alike) == 1:  # elementwise, or a broadcast against a feature map of this shape
        return alike.pop()
    layouts = {g.nodes[i]["layout"] for i in inputs if g.nodes[i]["ndim"] in (4, -1)
               and g.nodes[i]["layout"] != "other"}
    if len(layouts) != 1:
        return "other"
    layout = layouts.pop()
    if kind == "linear" and layout == "nhwc":
        return layout  # a linear layer on channels-last maps channels, like a 1x1 convolution
    dim = _CHANNEL_DIM.get(layout)
    if dim is None:
        return "other"
    if kind == "cat":
        return layout
    others = [d for d in range(4) if d != dim]  # batch and the two spatial dimensions
    for i in inputs:
        s = g.nodes[i]["shape"]
        if s is None and g.nodes[i]["ndim"] == -1:
            return layout  # an item of a chunk or split of a feature map
        if s is not None and len(s) == 4 and (s[dim] == shape[dim]  # channels kept
                                              or all(s[d] == shape[d] for d in others)):
            return layout  # ...or only channels changed: a slice, narrow or chunk of channels
    return "other"


@dataclass
class GraphView:
    """The activation graph and what was found on it."""

    graph: nx.DiGraph
    fx_graph: fx.Graph
    modules: dict[str, nn.Module]

    def attrs(self, node: fx.Node) -> dict:
        return self.graph.nodes[node]

    def describe(self, node: fx.Node) -> str:
        """A readable name for the tensor a node yields: the module path, or scope.op."""
        a = self.graph.nodes[node]
        if node.op == "call_module":
            return str(node.target)
        frame: Frame = a["frame"]
        op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "op")
        if node.op == "placeholder":
            return f"input:{node.target}"
        return f"{frame.qualname}.{op}" if frame.qualname else str(op)


def build_view(fx_graph: fx.Graph, model: nn.Module) -> GraphView:
    modules = dict(model.named_modules())
    g = nx.DiGraph()
    g.add_node(ROOT, kind="root", ndim=0, channels=None, layout="other", frame=Frame(""))
    for index, node in enumerate(fx_graph.nodes):
        inputs = [a for a in iter_tensor_args((node.args, node.kwargs)) if a in g]
        if node.op != "placeholder" and not inputs:
            continue  # parameters, buffers and constants are not activations
        value = node.meta.get(VALUE)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        kind = node_kind(node, modules)
        ndim = len(shape) if shape is not None else -1
        if ndim == -1 and isinstance(value, (list, tuple)) and inputs:
            layout = g.nodes[inputs[0]]["layout"]  # chunk, split: each piece keeps the layout
        elif ndim != 4:
            layout = "other"
        elif node.op == "placeholder" or kind in _NCHW_PRODUCERS:
            layout = "nchw"
        elif kind == "permute" and inputs:
            layout = _permuted_layout(g.nodes[inputs[0]]["layout"], _permute_dims(node, modules))
        else:
            layout = _inherited_layout(g, inputs, shape, kind)
        channels = None
        if shape is not None and layout in _CHANNEL_DIM:
            channels = shape[_CHANNEL_DIM[layout]]
        g.add_node(node, index=index, kind=kind, ndim=ndim, shape=shape, channels=channels,
                   layout=layout,
                   frame=node.meta.get(SCOPE, Frame("")),
                   module=node.target if node.op == "call_module" else None)
        if node.op == "placeholder":
            g.add_edge(ROOT, node)
        for i in inputs:
            g.add_edge(i, node)
        if kind == "mul" and _is_channel_gate(g, node):
            g.nodes[node]["kind"] = "chgate"
    return GraphView(graph=g, fx_graph=fx_graph, modules=modules)
