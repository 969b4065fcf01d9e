"""The traced graph as a networkx DiGraph of activations, labelled with what rules need.

Only nodes that depend on a model input are in the view (parameters and constants are not
activations). Each carries ``kind`` (conv, dwconv, norm, act, add, cat, pool, mul, linear,
gate, input, other), ``ndim``, ``channels``, ``layout`` (nchw, nhwc or other), ``frame``
(the module invocation that created it) and ``module`` (the module it calls, if any).
``gate`` is an se-inject gate; ``chgate`` any other channel gate (an SE, ECA... scale).
"""
from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .kinds import is_rearrange, node_kind, reads_metadata_only
from .shapes import VALUE
from .trace import SCOPE, Frame

__all__ = ["CHANNEL_DIM", "GraphView", "ROOT", "build_view", "height_width"]

ROOT = "__se_inject_root__"  # virtual source of every model input, for dominator analysis

# Kinds whose 4-D output is channel-first whatever their input was.
_NCHW_PRODUCERS = {"conv", "pool"}

EXPANDS = ("expand", "expand_as")  # tensor methods that broadcast a tensor to a larger shape


def _is_channel_gate(g: nx.DiGraph, node, modules: dict[str, nn.Module] | None = None,
                     reach: int = 32) -> bool:
    """``u * s`` where ``s`` is one value per channel (N, C, 1, 1), or (N, 1, 1, C) on a
    channels-last map, computed from ``u``: the scale of a squeeze-and-excitation, ECA or
    similar gate, whatever code wrote it. Also one value per channel of each path of a stack
    of paths, u (N, P, C, H, W) and s (N, P, C, 1, 1): the split attention of ResNeSt and the
    selective kernel of SKNet, written with their paths stacked (with one path, ResNeSt's is
    an SE gate on a 4-D map); and one value per channel and window (_windowed_scale)."""
    a = g.nodes[node]
    c = CHANNEL_DIM.get(a["layout"])
    if a["kind"] != "mul" or (c is None and a["ndim"] != 5):
        return False
    ins = list(g.predecessors(node))
    for u, s in ((x, y) for x in ins for y in ins if x is not y):
        while getattr(s, "target", None) in EXPANDS:  # ECA broadcasts its scale
            s = s.args[0]
        su, ss = g.nodes[u].get("shape"), g.nodes[s].get("shape") if s in g else None
        windowed = _windowed_scale(g, modules, s, su, c) if su and ss == su and \
            c is not None and modules is not None else None
        if windowed is not None:
            s = windowed
        elif not (su and ss and _per_channel(su, ss, c)) or _inverse_statistic(s):
            continue
        seen, stack = {s}, [s]  # is u among s's nearby ancestors (tensors, not sizes)?
        while stack and len(seen) < reach:
            for p in g.predecessors(stack.pop()):
                if p is u:
                    return True
                if p not in seen and _holds_tensors(p):
                    seen.add(p)
                    stack.append(p)
    return False


_UPSAMPLES = {F.interpolate, F.upsample, F.upsample_nearest, F.upsample_bilinear}
_SQUASHES = {torch.sigmoid, F.sigmoid, F.hardsigmoid, "sigmoid", "sigmoid_"}


def _windowed_scale(g: nx.DiGraph, modules: dict[str, nn.Module], s, su: tuple, c: int):
    """Where ``s``, of ``u``'s shape (``su``), is one value per channel and window: a map of
    fewer pixels, squashed by a sigmoid and brought back to ``u``'s size by an upsampling (and
    a crop to it), as Gather-Excite (timm's GatherExcite with an extent) and NinaSR's
    attention write an SE over windows of the map: that smaller map, in which _is_channel_gate
    looks for ``u``. None for any other ``s``: a scale per pixel (a gated linear unit's
    ``x * sigmoid(conv(x))``), or coarse features multiplied in without a squashing gate, are
    no channel gates."""
    squashed, node, low = False, s, None
    for _ in range(8):  # back from the scale, through squashes, crops and views, to the upsampling
        if not isinstance(node, fx.Node) or node not in g or not node.args:
            return None
        op = modules.get(node.target) if node.op == "call_module" else node.target
        if op in _UPSAMPLES or isinstance(op, nn.Upsample):
            low = node.args[0]
            break
        if _squashes(node, op):
            squashed = True
        elif not (op is operator.getitem or getattr(op, "__name__", op) in _SAME_VALUES):
            return None
        node = node.args[0]
    if not isinstance(low, fx.Node) or low not in g:
        return None
    squashed = squashed or _squashes(low, modules.get(low.target) if low.op == "call_module"
                                     else low.target)  # (squashed before it was upsampled)
    shape, hw = g.nodes[low].get("shape"), [d for d in range(len(su)) if d not in (0, c)]
    if not squashed or not shape or len(shape) != len(su) or shape[0] != su[0] or \
            shape[c] != su[c] or math.prod(shape[d] for d in hw) >= math.prod(su[d] for d in hw):
        return None
    return low


def _squashes(node: fx.Node, op) -> bool:
    """A sigmoid (or a hard one): the squashing that makes a gate's scale."""
    if node.op == "call_module":
        return isinstance(op, (nn.Sigmoid, nn.Hardsigmoid)) or \
            type(op).__name__.lower() in ("sigmoid", "hardsigmoid")  # (timm's own classes)
    return op in _SQUASHES


# ops that leave a tensor's values as they are (a cast, a view), and those that make a scale
# the inverse of a statistic: a normalization's divisor, not a gate's output
_SAME_VALUES = {"to", "type", "type_as", "float", "half", "bfloat16", "contiguous", "view",
                "reshape", "unsqueeze", "squeeze", "flatten"}
_INVERSES = {torch.rsqrt, "rsqrt", "rsqrt_", torch.reciprocal, "reciprocal", "reciprocal_"}
_POWERS = {operator.pow, torch.pow, "pow", "pow_", "__pow__"}


def _inverse_statistic(s) -> bool:
    """A scale made by ``rsqrt``, ``reciprocal`` or a negative power (after casts and views):
    a map divided by a statistic of its own, as Filter Response Normalization's
    ``x * rsqrt(mean(x**2) + eps)`` or an instance norm written out does, is normalised, not
    gated."""
    while isinstance(s, fx.Node) and s.op in ("call_method", "call_function") and \
            getattr(s.target, "__name__", s.target) in _SAME_VALUES and s.args:
        s = s.args[0]
    if not (isinstance(s, fx.Node) and s.op in ("call_method", "call_function")):
        return False
    if s.target in _POWERS and len(s.args) == 2:  # var ** -0.5
        return isinstance(s.args[1], (int, float)) and s.args[1] < 0
    return s.target in _INVERSES


_READ_OFF = (bool, int, float, str, torch.dtype, torch.device)  # what x.shape[0], x.dtype hold


def _holds_tensors(node) -> bool:
    """Anything but a size, dtype or device read off a tensor (``x.shape``, ``x.dtype``), which
    leads back to wherever it was read: a tensor, pieces of one (chunk, split), or a value the
    trace did not record."""
    if not isinstance(node, fx.Node):
        return False
    value = node.meta.get(VALUE)
    if isinstance(value, (list, tuple)):
        return not all(isinstance(v, _READ_OFF) for v in value)
    return not isinstance(value, _READ_OFF)


def _per_channel(su: tuple, ss: tuple, c: int | None) -> bool:
    """Whether ``ss`` is one value per channel of a map of shape ``su`` (channels at ``c`` of a
    4-D map; None: a stack of paths, (N, P, C, H, W))."""
    if c is None:
        return len(su) == len(ss) == 5 and ss == (*su[:3], 1, 1) and su[2] > 1 and \
            su[3] * su[4] > 1
    h, w = (d for d in (1, 2, 3) if d != c)
    return len(su) == len(ss) == 4 and ss[c] == su[c] > 1 and ss[h] == ss[w] == 1 and \
        su[h] * su[w] > 1


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


CHANNEL_DIM = {"nchw": 1, "nhwc": 3}  # feature maps: channels first, or last

# The steps of a channel shuffle (ShuffleNet's): an (N, C, H, W) map viewed as (N, G, C/G, H, W)
# ("ngchw": its channels in two dimensions), those two swapped, and viewed back to 4-D.
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "contiguous", "clone"}
_SWAPS = {"transpose", "swapaxes", "swapdims"}


def _op_name(node: fx.Node) -> str:
    """A tensor method's name, or a torch function's (``torch.reshape``: "reshape")."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function" and getattr(node.target, "__module__", None) == "torch":
        return getattr(node.target, "__name__", "")
    return ""


def _source(g: nx.DiGraph, node: fx.Node) -> dict | None:
    """The attributes of the activation an op is called on (its first argument), where its
    shape is known."""
    src = node.args[0] if node.args else None
    if isinstance(src, fx.Node) and src in g and g.nodes[src]["shape"] is not None:
        return g.nodes[src]
    return None


def _grouped_layout(src: dict | None, node: fx.Node, shape: tuple, kind: str,
                    modules: dict[str, nn.Module]) -> str:
    """The layout of a step of a channel shuffle: "ngchw" for a channel-first map's channels
    viewed in two dimensions (its height and width kept last, in place) and for those two
    swapped; "nchw" for them viewed back as one. Anything else is "other"."""
    if src is None or shape is None:
        return "other"
    s, layout, name = src["shape"], src["layout"], _op_name(node)
    if name in _RESHAPES:
        if layout == "nchw" and len(shape) == 5 and shape[0] == s[0] and \
                shape[3:] == s[2:] and shape[1] * shape[2] == s[1]:
            return "ngchw"
        if layout == "ngchw" and tuple(shape) == tuple(s):
            return "ngchw"
        if layout == "ngchw" and len(shape) == 4 and shape[0] == s[0] and \
                shape[2:] == s[3:] and shape[1] == s[1] * s[2]:
            return "nchw"
    elif layout == "ngchw" and (name in _SWAPS or kind == "permute"):
        moved = _moved(node, kind, modules, 5)
        if moved is not None and moved <= {1, 2}:
            return "ngchw"
    return "other"


def _moved(node: fx.Node, kind: str, modules: dict[str, nn.Module], ndim: int) -> set | None:
    """The dimensions a transpose or permute of an ``ndim``-D tensor moves; None where they
    cannot be read."""
    if kind == "permute":
        perm = [d % ndim for d in _permute_dims(node, modules)]
        return {i for i, d in enumerate(perm) if d != i} if len(perm) == ndim else None
    dims = [d % ndim for d in (*node.args[1:], *node.kwargs.values()) if isinstance(d, int)]
    return (set() if dims[0] == dims[1] else set(dims)) if len(dims) == 2 else None


# 3-D tokens: a map's pixels in one dimension, its channels before them (N, C, H·W) or after
# them (N, H·W, C); the nodes keep the map's (H, W) as "hw", to view them back as a map
_TOKENS = ("ncl", "nlc")


def _token_layout(g: nx.DiGraph, src: dict | None, node: fx.Node, inputs: list, shape: tuple,
                  kind: str, modules: dict[str, nn.Module]) -> tuple[str, tuple | None]:
    """(layout, (H, W)) of a step from a map to tokens and back: a channel-first map's pixels
    flattened, (N, C, H·W) "ncl", or a channels-last map's, (N, H·W, C) "nlc"; the two swapped
    into each other; an op that keeps their shape, or a linear layer on "nlc" (it maps
    channels); and tokens viewed back as (N, C, H, W) or (N, H, W, C) maps of the same H and
    W. Anything else is ("other", None)."""
    if src is not None:
        s, layout, hw, name = src["shape"], src["layout"], src.get("hw"), _op_name(node)
        if len(shape) == 3 and len(s) == 4 and name in _RESHAPES:
            if layout == "nchw" and shape == (s[0], s[1], s[2] * s[3]):
                return "ncl", s[2:]
            if layout == "nhwc" and shape == (s[0], s[1] * s[2], s[3]):
                return "nlc", s[1:3]
        if len(shape) == 4 and layout in _TOKENS and name in _RESHAPES:
            if layout == "ncl" and shape == (s[0], s[1], *hw):
                return "nchw", None
            if layout == "nlc" and shape == (s[0], *hw, s[2]):
                return "nhwc", None
        if len(shape) == 3 and layout in _TOKENS and (name in _SWAPS or kind == "permute"):
            moved = _moved(node, kind, modules, 3)  # the last two swapped, or nothing moved
            if moved is None or moved - {1, 2}:
                return "other", None
            return ("nlc" if layout == "ncl" else "ncl") if moved else layout, hw
        if len(shape) == 3 and layout == "nlc" and kind == "linear" and shape[:2] == s[:2]:
            return "nlc", hw
    if len(shape) == 3:  # elementwise, a norm: as the tokens of this shape it reads
        alike = {(g.nodes[i]["layout"], g.nodes[i].get("hw")) for i in inputs
                 if g.nodes[i]["shape"] == shape and g.nodes[i]["layout"] in _TOKENS}
        if len(alike) == 1:
            return alike.pop()
    return "other", None


def einops_pattern(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The pattern of an einops ``rearrange`` (the function, which the tracer records as one
    call, or a ``Rearrange`` layer): ``"b c h w -> b h w c"``; None for any other op."""
    pattern = None
    if node.op == "call_function" and is_rearrange(node.target) and len(node.args) > 1:
        pattern = node.args[1]
    elif node.op == "call_module" and is_rearrange(type(modules.get(node.target))):
        pattern = getattr(modules[node.target], "pattern", None)
    return pattern if isinstance(pattern, str) else None


def _einops_items(side: str) -> list[tuple[str, ...]] | None:
    """The axes of one side of a pattern, each a tuple of names (a group: several); None where
    it holds anything but names and groups of names (an ellipsis, a 1, an empty group)."""
    items, group = [], None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            if group is not None:
                return None
            group = []
        elif token == ")":
            if not group:
                return None
            items.append(tuple(group))
            group = None
        elif token.isidentifier():
            if group is None:
                items.append((token,))
            else:
                group.append(token)
        else:
            return None
    return None if group is not None else items


# the roles of a layout's dimensions: batch, channels, height, width ("hw": one dimension)
_ROLES = {"nchw": ("n", "c", "h", "w"), "nhwc": ("n", "h", "w", "c"),
          "ncl": ("n", "c", "hw"), "nlc": ("n", "hw", "c")}
_FROM_ROLES = {roles: layout for layout, roles in _ROLES.items()}


def _einops_layout(src: dict | None, pattern: str, shape: tuple) -> tuple[str, tuple | None]:
    """(layout, (H, W)) of an einops rearrange of a map or of its tokens that only moves the
    batch, channel and spatial dimensions, or flattens height and width into one (in that
    order) or splits them back at the map's size: ``b c h w -> b h w c``, ``b c h w -> b (h
    w) c``, ``b (h w) c -> b c h w``. Anything else is ("other", None)."""
    if src is None or src["layout"] not in _ROLES or "->" not in pattern:
        return "other", None
    left, _, right = pattern.partition("->")
    left, right = _einops_items(left), _einops_items(right)
    roles, hw = _ROLES[src["layout"]], src.get("hw")
    if left is None or right is None or len(left) != len(roles) or hw is None and \
            len(roles) == 3:
        return "other", None
    if len(roles) == 4:
        hw = height_width(src["shape"], src["layout"])
    role = {}
    for item, r in zip(left, roles):
        if r == "hw" and len(item) == 2:
            role[item[0]], role[item[1]] = "h", "w"
        elif len(item) == 1 and r != "hw":
            role[item[0]] = r
        else:
            return "other", None
    out = []
    for item in right:
        named = tuple(role.get(a) for a in item)
        if named == ("h", "w"):
            out.append("hw")
        elif len(named) == 1 and named[0] is not None:
            out.append(named[0])
        else:
            return "other", None
    layout = _FROM_ROLES.get(tuple(out), "other")
    if layout in CHANNEL_DIM:
        return (layout, None) if height_width(shape, layout) == tuple(hw) else ("other", None)
    return (layout, tuple(hw)) if layout in _TOKENS else ("other", None)


def height_width(shape: tuple, layout: str) -> tuple:
    """A 4-D shape's height and width, channels first (or any other layout) or last."""
    return tuple(shape[1:3]) if CHANNEL_DIM.get(layout) == 3 else tuple(shape[2:])


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
    dim = CHANNEL_DIM.get(layout)
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

    @functools.cached_property
    def preds(self) -> dict:
        """Each node's inputs in the activation graph, as plain lists (walks over large blocks
        read them hundreds of thousands of times; networkx's views cost a call each)."""
        return {n: list(p) for n, p in self.graph.pred.items()}

    @functools.cached_property
    def kinds(self) -> dict:
        """Each node's kind, read as ``preds`` is."""
        return dict(self.graph.nodes(data="kind"))

    @functools.cached_property
    def metadata_readers(self) -> frozenset:
        """The nodes that read an input's shape, dtype or device alone (``x.shape``,
        ``x.new_empty(...)``): only a block that holds one can compute a branch from its
        input's size alone (match._reads_values_of)."""
        return frozenset(n for n, ps in self.preds.items()
                         if any(reads_metadata_only(n, p) for p in ps))

    @functools.cached_property
    def closed_regions(self) -> dict:
        """The matcher's record of each merge it has looked at: (region, entry), every node the
        merge is computed from back to its entry, which walks over enclosing blocks take whole
        (match._branch)."""
        return {}

    def of_kinds(self, *kinds: str) -> frozenset:
        """The nodes of these kinds, to intersect with a block's nodes at C speed."""
        cache = self.__dict__.setdefault("_of_kinds", {})
        if kinds not in cache:
            cache[kinds] = frozenset(n for n, k in self.kinds.items() if k in kinds)
        return cache[kinds]

    def describe(self, node: fx.Node) -> str:
        """A readable name for the tensor a node yields: the module path, or scope.op, numbered
        from a scope's second op of the kind (``layer1.0.add``, ``layer1.0.add_1``)."""
        if node.op == "call_module":
            return called_as(self.modules, node)
        if node.op == "placeholder":
            return f"input:{node.target}"
        label = self._labels.get(node)
        return label if label is not None else _label(self.graph.nodes[node]["frame"], node)

    @functools.cached_property
    def _labels(self) -> dict:
        """describe()'s scope.op of every op in the view, in graph order: one scope's sums are
        ``add``, ``add_1``, ... (an octave block's four sums, the blocks a model writes inline
        in its own forward), each its own name."""
        labels, seen, g = {}, {}, self.graph
        for node in self.fx_graph.nodes:
            if node.op in ("call_function", "call_method") and node in g:
                base = _label(g.nodes[node]["frame"], node)
                k = seen.get(base, 0)
                seen[base] = k + 1
                labels[node] = f"{base}_{k}" if k else base
        return labels


def called_as(modules: dict[str, nn.Module], node: fx.Node) -> str:
    """A called module's path as the calling forward reaches it (``modules``: the model's
    named_modules). fx names a module held under several names by its first, which may sit in
    another block: a default activation that every conv unit of a model shares, as YOLO's
    ``Conv.default_act``, would be ``model.0.act`` in every block."""
    target, scope = str(node.target), node.meta.get(SCOPE, Frame("")).qualname
    caller = modules.get(scope) if scope else None
    if caller is None or target.startswith(scope + "."):
        return target
    module = modules.get(target)
    for name, sub in caller.named_modules(remove_duplicate=False):
        if sub is module and name:
            return f"{scope}.{name}"
    return target


def _label(frame: Frame, node: fx.Node) -> str:
    op = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "op")
    return f"{frame.qualname}.{op}" if frame.qualname else str(op)


def build_view(fx_graph: fx.Graph, model: nn.Module) -> GraphView:
    modules = dict(model.named_modules())
    g = nx.DiGraph()
    g.add_node(ROOT, kind="root", ndim=0, channels=None, layout="other", frame=Frame(""))
    for index, node in enumerate(fx_graph.nodes):
        inputs = [a for a in node.all_input_nodes if a in g]
        if node.op != "placeholder" and not inputs:
            continue  # parameters, buffers and constants are not activations
        value = node.meta.get(VALUE)
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        kind = node_kind(node, modules)
        ndim = len(shape) if shape is not None else -1
        hw = None
        if ndim == -1 and isinstance(value, (list, tuple)) and inputs:
            layout = g.nodes[inputs[0]]["layout"]  # chunk, split: each piece keeps the layout
        elif ndim == -1 and isinstance(value, (list, tuple, dict)) and node.op == "placeholder":
            layout = "nchw"  # an input holding tensors (a list, a dict, *args): each as an input
        elif shape is not None and (pattern := einops_pattern(node, modules)) is not None:
            layout, hw = _einops_layout(_source(g, node), pattern, shape)
        elif ndim == 5:
            layout = _grouped_layout(_source(g, node), node, shape, kind, modules)
        elif ndim == 3:
            layout, hw = _token_layout(g, _source(g, node), node, inputs, shape, kind, modules)
        elif ndim != 4:
            layout = "other"
        elif node.op == "placeholder" or kind in _NCHW_PRODUCERS:
            layout = "nchw"
        elif kind == "pixel_shuffle":  # moves values between channels and pixels, channels first
            layout = "nchw" if inputs and g.nodes[inputs[0]]["layout"] == "nchw" else "other"
        elif kind == "permute" and inputs:
            layout = _permuted_layout(g.nodes[inputs[0]]["layout"], _permute_dims(node, modules))
        else:
            layout, src = "other", _source(g, node)
            if src is not None and src["layout"] == "ngchw":  # a channel shuffle's last step
                layout = _grouped_layout(src, node, shape, kind, modules)
            elif src is not None and src["layout"] in _TOKENS:  # tokens viewed back as a map
                layout = _token_layout(g, src, node, inputs, shape, kind, modules)[0]
            if layout == "other":
                layout = _inherited_layout(g, inputs, shape, kind)
        channels = None
        if shape is not None and layout in CHANNEL_DIM:
            channels = shape[CHANNEL_DIM[layout]]
        g.add_node(node, index=index, kind=kind, ndim=ndim, shape=shape, channels=channels,
                   layout=layout, hw=hw,
                   frame=node.meta.get(SCOPE, Frame("")),
                   module=node.target if node.op == "call_module" else None)
        if node.op == "placeholder":
            g.add_edge(ROOT, node)
        for i in inputs:
            g.add_edge(i, node)
        if kind == "mul" and _is_channel_gate(g, node, modules):
            g.nodes[node]["kind"] = "chgate"
    return GraphView(graph=g, fx_graph=fx_graph, modules=modules)
