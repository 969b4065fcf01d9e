"""Rules against the graph view: blocks found by structure, not by names.

A block ends in a merge node (an add, or a concatenation along channels); its entry is the
merge's immediate dominator, and each operand's branch is the set of nodes on the paths from
the entry to that operand. Because the entry dominates every operand, a backward walk from an
operand that stops at the entry stays inside the block, so finding all blocks costs time
proportional to the sum of their sizes: the size of the graph where blocks follow each other,
more where blocks span others (HRNet's fusions, whose entry lies before a whole stage).
"""
from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import networkx as nx
import torch
import torch.fx as fx

from .graph import CHANNEL_DIM, EXPANDS, ROOT, GraphView, height_width
from .kinds import drop_path_input, layer_kind, reads_metadata_only, value_readers
from .rules import Rule
from .trace import Frame

__all__ = ["Candidate", "Rejection", "find_candidates"]

_CONV_KINDS = {"conv", "dwconv"}
NOT_A_FEATURE_MAP = "not a 4-D channel-first feature map"
OPERAND_NOT_A_FEATURE_MAP = "an operand is not a 4-D channel-first feature map"
ONE_CHANNEL = ("a map of one channel (a spatial attention's), with no channels for a gate to "
               "weigh")
A_VOLUME = NOT_A_FEATURE_MAP + " (5-D, as a 3-D convolution makes: video, volumes)"
HOLDS_A_GATE = "the block already holds a channel gate (SE, ECA...)"
SPLIT_PIECES = ("its branches convolve different pieces of one split tensor (a mixed convolution, "
                "as MixNet's: one layer), not one input in parallel")
GATED_NOT_A_FEATURE_MAP = ("the tensor the rule would gate is not a 4-D channel-first feature map "
                           "(a token sequence reshaped, say)")
SHARED_LAYERS = "its branches share layers (a channel split, not parallel branches)"
NO_ENTRY = "no single entry (the merge depends on more than one model input)"
DESCRIPTORS = ("a merge of one value per channel taken by global pooling (the channel attention of "
               "CBAM: an MLP of the mean plus the MLP of the maximum), not of feature maps")
SUMMED_BRANCHES = ("a sum of a residual block's branches, the residual branch its gate scales "
                   "(x + (a + b), as ResNeXt's aggregated branches: one gate per block)")
REPARAM_SUM = ("a sum of parallel branches with at most one convolution each and nothing "
               "nonlinear: one convolution in re-parameterisable form (RepVGG, MobileOne), not a "
               "block")

BROADCAST = ("an operand broadcasts one value per channel or per pixel to the map's size (an "
             "attention map's logits, as BAM sums its channel and spatial attention), not a "
             "feature map")
SQUEEZE_ONLY = ("a sum read only by the squeeze of channel gates that scale other tensors (a "
                "selective-kernel unit's sum of its branches, pooled into the attention that "
                "weighs them): part of those gates, whose block keeps just them")
SIZE_ONLY = ("its other operand is made from the input's size alone, not its values (a "
             "position encoding), and is no branch")
SPLIT_LAYER = ("a sum of single convolutions of parallel streams, none of them the block's "
               "input (an octave convolution; a two-stream block's cross-stream sum): one layer "
               "written in pieces, not a block")


@dataclass
class Candidate:
    merge: fx.Node
    entry: fx.Node
    rule: Rule
    gated: fx.Node            # the tensor that gets scaled
    at: fx.Node               # the node the gate goes in front of (operand) or behind (None)
    operand: int | None       # which of ``at``'s arguments is ``gated``; None: ``at``'s output
    region: set               # nodes strictly after the entry, up to and including the merge
    frame: Frame              # the module invocation whose forward holds ``at``
    shortcut: bool = False    # a sum, one of whose operands the entry reaches with no conv
    # in such a sum, the sum that its residual branch ends in, pointwise layers aside
    # (x + relu(a + b)): its gate would scale that sum's gated branch a second time
    summed: fx.Node | None = None


@dataclass(frozen=True)
class Rejection:
    merge: fx.Node
    rule: Rule
    reason: str


def _operands(node: fx.Node, kind: str) -> tuple[list, int | None]:
    """The merge's tensor operands as (positions in args, values) and the concat dim."""
    if kind == "add":
        return [(i, a) for i, a in enumerate(node.args[:2])], None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return [(i, a) for i, a in enumerate(tensors)], dim


def _branch(preds: dict, operand, entry, closed: dict | None = None) -> set:
    """Every node ``operand`` is computed from, back to ``entry`` (not included).

    ``closed`` maps a merge already looked at to its region and entry: every node its value is
    computed from back to its entry, a set closed under inputs but for that entry. A walk
    that reaches such a merge takes its region whole and goes on from its entry, instead of
    walking it again: a sum that spans a network (a U-Net's outer skip) encloses the sums
    inside it, and walking each anew made the matcher quadratic in the nesting depth."""
    if operand is entry:
        return set()
    seen, stack = {operand}, [operand]
    while stack:
        n = stack.pop()
        hop = closed.get(n) if closed else None
        if hop is not None and entry not in hop[0]:
            region, inner_entry = hop
            seen |= region
            if inner_entry is not entry and inner_entry not in seen:
                seen.add(inner_entry)
                stack.append(inner_entry)
            continue
        for p in preds[n]:
            if p is not entry and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _without_conditioning(view: GraphView) -> tuple[GraphView, dict]:
    """The view without the edges by which a tensor of one value per channel (or a vector)
    from elsewhere scales or shifts a feature map (``h + emb[:, :, None, None]``, FiLM's
    ``h * (1 + scale) + shift``), and its dominators. A diffusion U-Net's residual blocks take
    a time embedding so: every sum depends on two model inputs and had no single entry,
    though the feature map flows from one. The view itself where no edge is such."""
    g, shapes = view.graph, dict(view.graph.nodes(data="shape"))
    side = set()
    for v in view.of_kinds("add", "mul", "sub"):
        out = shapes.get(v)
        if out is None or len(out) != 4 or out[2] * out[3] == 1:
            continue
        for u in view.preds[v]:
            s = shapes.get(u)
            if s is not None and (len(s) < 4 or (len(s) == 4 and s[2] * s[3] == 1)):
                side.add((u, v))
    if not side:
        return view, {}
    reduced = copy.copy(view)
    reduced.__dict__["preds"] = {n: [p for p in ps if (p, n) not in side]
                                 for n, ps in view.preds.items()}
    reduced.__dict__["closed_regions"] = {}  # (regions differ without those edges)
    return reduced, nx.immediate_dominators(nx.restricted_view(g, [], side), ROOT)


def _convs(view: GraphView, nodes: set) -> int:
    return len(view.of_kinds(*_CONV_KINDS).intersection(nodes))


def _reaches_without_conv(view: GraphView, operand, entry, branch: set) -> bool:
    """Whether a path from the block's entry to ``operand`` through ``branch`` (the nodes
    between them) passes no convolution: the shortcut's does, and that of a partial sum that
    holds it (``x + a`` in ``x + a + b``, which Python sums as ``(x + a) + b``). The walk
    stops at convolutions, so it reads the few nodes after the branch's last ones."""
    return _reads_values_of(view, operand, entry, branch, stop=view.of_kinds(*_CONV_KINDS))


def _reads_values_of(view: GraphView, operand, entry, branch: set,
                     stop: frozenset = frozenset()) -> bool:
    """Whether ``operand`` is computed from the values of the block's ``entry`` through
    ``branch``, on a path through none of ``stop``: a read of a tensor's shape, dtype or
    device alone is no path."""
    seen, stack = {operand}, [operand]
    while stack:
        n = stack.pop()
        if n is entry:
            return True
        if n in stop:
            continue
        for p in view.preds[n]:
            if p not in seen and (p is entry or p in branch) and not reads_metadata_only(n, p):
                seen.add(p)
                stack.append(p)
    return False


def _convolved_volume(g, merge: fx.Node) -> bool:
    """Whether a 5-D merge sums volumes a convolution made (a 3-D CNN's), not 5-D tensors of
    another kind (a window attention's scores): a convolution reached through 5-D tensors."""
    seen, todo = {merge}, [merge]
    while todo:
        for p in g.predecessors(todo.pop()):
            a = g.nodes[p]
            if p in seen or a.get("ndim") != 5:
                continue
            if a["kind"] in _CONV_KINDS:
                return True
            seen.add(p)
            todo.append(p)
    return False


def _match(view: GraphView, merge: fx.Node, kind: str, rule: Rule,
           idom: dict) -> Candidate | str:
    """A Candidate, or the reason the rule does not match this merge."""
    g = view.graph
    a = g.nodes[merge]
    layout = a["layout"]
    if a["ndim"] != 4 or layout not in CHANNEL_DIM:
        return A_VOLUME if _convolved_volume(g, merge) else NOT_A_FEATURE_MAP
    if a["channels"] is not None and a["channels"] < 2:
        return ONE_CHANNEL
    pairs, dim = _operands(merge, kind)
    acts = [(i, o) for i, o in pairs if isinstance(o, fx.Node) and o in g]
    n = len(acts)
    if n < rule.min_operands or (rule.max_operands is not None and n > rule.max_operands):
        return f"{n} feature-map operand(s) where the rule takes {rule.min_operands}" + \
            (f" to {rule.max_operands}" if rule.max_operands != rule.min_operands else "")
    if any(g.nodes[o]["ndim"] != 4 or g.nodes[o]["layout"] != layout for _, o in acts):
        return OPERAND_NOT_A_FEATURE_MAP if layout == "nchw" else \
            NOT_A_FEATURE_MAP + " (channels-last, with operands that are not)"
    if kind == "cat" and (not isinstance(dim, int) or dim % 4 != CHANNEL_DIM[layout]):
        return "not a concatenation along channels"
    if any(_broadcast(g, o) for _, o in acts):
        return BROADCAST
    if rule.equal_shapes and len({g.nodes[o]["shape"] for _, o in acts}) > 1:
        return "operands differ in shape"
    entry = idom.get(merge)
    if entry is None or entry is ROOT:
        return NO_ENTRY
    if rule.entry_as_operand == "forbid" and any(o is entry for _, o in acts):
        return "the block's entry is itself an operand (a dense connection)"
    closed = view.closed_regions
    branches = [(i, o, _branch(view.preds, o, entry, closed)) for i, o in acts]
    with_conv = [(_convs(view, b), len(b), -k, i, o) for k, (i, o, b) in enumerate(branches)]
    # a convolution of what is made from the entry's size alone (coordinates added to a map)
    # computes nothing from the block's input: no branch
    blind = [k for k, (_, o, b) in enumerate(branches) if with_conv[k][0] and
             not view.metadata_readers.isdisjoint(b) and not _reads_values_of(view, o, entry, b)]
    for k in blind:
        with_conv[k] = (0, *with_conv[k][1:])
    if layout == "nhwc" and not any(c[0] for c in with_conv):
        return NOT_A_FEATURE_MAP + (" (channels-last tokens, as a transformer's, no "
                                    "convolution in its branches)")
    if sum(1 for c in with_conv if c[0] > 0) < rule.min_branches_with_conv:
        n = rule.min_branches_with_conv
        return SIZE_ONLY if blind else "no branch with a convolution" if n == 1 else \
            f"fewer than {n} branches with a convolution"
    if rule.disjoint_branches and _overlap(branches):
        shared = _shared_trunk(view, branches)
        if shared is not None:
            return shared
    if rule.disjoint_branches and entry.op in ("call_function", "call_method") \
            and entry.target in _SPLITS:
        return SPLIT_PIECES
    region = set().union(*(b for _, _, b in branches)) | {merge}
    if merge not in closed and all(p is entry or p in region for p in view.preds[merge]):
        closed[merge] = (frozenset(region), entry)  # (no other input left unwalked)
    if a["shape"] is not None and height_width(a["shape"], layout) == (1, 1) and \
            any(_global_pool(view, n) for n in region):
        return DESCRIPTORS
    if kind == "add" and rule.reparam_sums == "skip" and _is_reparam_sum(view, region, entry,
                                                                         merge):
        return REPARAM_SUM
    if kind == "add" and rule.layer_sums == "skip" and _is_split_layer(
            view, [o for _, o in acts], entry, region):
        return SPLIT_LAYER
    if rule.existing_gate == "skip" and not view.of_kinds("chgate").isdisjoint(region):
        return HOLDS_A_GATE
    if rule.existing_gate == "skip" and _squeezed_only(view, merge):
        return SQUEEZE_ONLY
    if rule.existing_gate == "skip" and rule.gate_at in ("output", "post") and \
            _gated_output(view, merge):
        return HOLDS_A_GATE
    # the residual branch: an operand with a convolution on every path from the entry (not
    # the shortcut, nor a partial sum holding it, as ``x + a`` in ``x + a + b``), then the one
    # with most convolutions, then most nodes, then the first
    ranked = sorted((not _reaches_without_conv(view, o, entry, b), *c)
                    for c, (_, o, b) in zip(with_conv, branches))
    operand, gated = ranked[-1][-2:]
    branch = next(b for i, o, b in branches if o is gated)
    shortcut = kind == "add" and ranked[-1][0] and not ranked[0][0]
    summed = _summed_before(view, gated, branch) if shortcut else None
    # a piece of a split as the other operand: Res2Net's sum of one scale's output and the
    # next piece; not where the piece is the block's entry, the shortcut of a block on it
    # (the first block of a CSP stage, of YOLOv8's C2f)
    if rule.gate_at != "output" and any(o is not gated and o is not entry and _is_split_piece(o)
                                        for _, o, _ in branches):
        return "a connection between the scales of a multi-scale block (Res2Net), not a block"
    if rule.depthwise_branch and not any(view.kinds[n] == "dwconv" for n in branch):
        return "no depthwise convolution in the branch"
    at = merge
    source = _channel_slice_source(_before_drop_path(view, gated, branch), branch) \
        if layout == "nchw" else None
    if rule.gate_at == "branch" and source is not None:
        # a partial-channel residual (ReXNet): the sum takes a slice of the branch's output;
        # gate that whole output, so every channel the block produces is scaled
        source = _before_drop_path(view, source, branch)
        if not _feature_map(g, source):
            return GATED_NOT_A_FEATURE_MAP
        return Candidate(merge=merge, entry=entry, rule=rule, gated=source, at=source,
                         operand=None, region=region, frame=g.nodes[source]["frame"])
    if rule.gate_at == "output":
        operand, gated = None, merge
    elif rule.gate_at in ("pre", "post", "identity"):
        found = _integration(g, rule.gate_at, merge, kind, entry, acts, gated, branch)
        if isinstance(found, str):
            return found
        gated, at, operand = found
    elif rule.gate_at == "after_depthwise":
        found = _after_depthwise(g, branch, view.modules)
        if isinstance(found, str):
            return found
        gated, at, operand = found
    else:  # in front of the merge; the rewrite puts the gate before the branch's drop path
        gated = _before_drop_path(view, gated, branch)
    if not _feature_map(g, gated):
        return GATED_NOT_A_FEATURE_MAP
    return Candidate(merge=merge, entry=entry, rule=rule, gated=gated, at=at, operand=operand,
                     region=region, frame=g.nodes[at]["frame"], shortcut=shortcut,
                     summed=summed)


def _feature_map(g: nx.DiGraph, node: fx.Node) -> bool:
    a = g.nodes[node]
    return a["ndim"] == 4 and a["layout"] in CHANNEL_DIM and a["channels"] is not None


def _summed_before(view: GraphView, node: fx.Node, branch: set) -> fx.Node | None:
    """The sum a residual branch ends in, through drop path, norms, activations, identities
    and scales (``x + relu(a + b)``, ``x + 0.5 * (a + b)``, Shake-Shake's mean of its two
    branches in eval mode), or None: a branch ending in a convolution. A product of the sum
    with another tensor of the branch (a gate of its own) is not a scale."""
    while True:
        node = _before_drop_path(view, node, branch)
        if view.kinds[node] == "add":
            return node
        ins = [p for p in view.preds[node] if p in branch]
        if view.kinds[node] not in _SUM_PASSES or len(ins) != 1:
            return None
        node = ins[0]


def _before_drop_path(view: GraphView, node: fx.Node, branch: set) -> fx.Node:
    """What the branch's stochastic depth (drop path) drops, where ``node`` is its output: a
    branch gate sits before it, as in timm's own SE blocks, so that its squeeze reads the
    same values in training as in eval (not values scaled by 1 / keep probability)."""
    while True:
        inner = drop_path_input(node, lambda n: view.modules.get(n.target))
        if inner is None or inner not in branch:
            return node
        node = inner


_PASS_THROUGH = {"norm", "act", "identity"}
_SUM_PASSES = _PASS_THROUGH | {"mul"}  # (a product by a number or a weight: one input here)
_LINEAR_KINDS = {"conv", "dwconv", "norm", "identity", "add", "sub"}
_MAYBE_LINEAR = _CONV_KINDS | _LINEAR_KINDS | {"mul"}  # the kinds _linear can accept
_MAYBE_LINEAR_OR_DROP = _MAYBE_LINEAR | {"module", "other"}  # and a drop path's nodes


def _is_reparam_sum(view: GraphView, region: set, entry, merge) -> bool:
    """Whether the block is one linear layer written as parallel branches (RepVGG, MobileOne,
    GhostNetV3's training-time branches, ``x + dwconv(x)``): the region holds only
    convolutions (with their padding, written apart or not), batch norms without an
    activation of their own, identities, sums, differences and scales by a weight, and no path
    from the entry to the sum passes through more than one convolution. Stochastic depth counts as an identity, and the nodes that draw
    its mask from the branch's shape (in training mode) as nothing, so that a block is one in
    both modes or in neither."""
    kinds = view.kinds
    if not region <= view.of_kinds(*_MAYBE_LINEAR_OR_DROP):
        return False  # most blocks: settled by kind alone
    drops = {}
    for n in region:
        if kinds[n] not in _LINEAR_KINDS:
            x = drop_path_input(n, lambda m: view.modules.get(m.target))
            if x is not None:
                drops[n] = x
    if drops:
        region = _value_region(view, region, merge, drops)
    pads = {n for n in region if kinds[n] not in _MAYBE_LINEAR and _conv_padding(view, n)}
    if any(kinds[n] not in _MAYBE_LINEAR and n not in drops and n not in pads for n in region):
        return False
    g = view.graph
    depth = {entry: 0}
    for n in sorted(region, key=lambda x: g.nodes[x]["index"]):
        kind = kinds[n]
        if n in drops:
            depth[n] = depth.get(drops[n], 0)
            continue
        if n in pads:
            depth[n] = max(depth.get(p, 0) for p in view.preds[n])
            continue
        if not _linear(view, n, kind):
            return False
        d = max(depth.get(p, 0) for p in view.preds[n]) + (kind in _CONV_KINDS)
        if d > 1:
            return False
        depth[n] = d
    return True


def _is_split_layer(view: GraphView, operands: list, entry, region: set) -> bool:
    """Whether a sum is one layer written in pieces: each operand a single convolution, or a
    sum of such, that the sum alone reads, behind only norms that fold into it, identities,
    resampling and scales by a weight, each convolution reading a stream (a tensor it shares
    with other layers, or a merge) rather than the last layer of a branch of its own, and
    none a tensor the block's entry reaches without a convolution (an octave convolution: its four
    convolutions between its two resolutions, summed in pairs; ResNet in ResNet's
    cross-stream sums). A residual block's shortcut reads its entry, through a pooling at
    most (a projection shortcut, ``bn(conv(avg_pool(x)))`` beside a branch on x)."""
    inputs: list = []
    for o in operands:
        if not _conv_pieces(view, o, region, inputs):
            return False
    return len(inputs) > 1 and not any(
        _reaches_without_conv(view, i, entry, region) for i in inputs)


_RESAMPLES = (torch.nn.functional.interpolate, torch.nn.functional.avg_pool2d)
_RESAMPLE_LAYERS = (torch.nn.Upsample, torch.nn.AvgPool2d)


def _conv_pieces(view: GraphView, node, region: set, inputs: list) -> bool:
    """Add to ``inputs`` the input of the convolution ``node`` comes from (through the layers
    _is_split_layer names), or of each convolution a sum of such pieces adds; False if
    ``node`` is neither, or if a layer besides the sum reads it or anything on its way."""
    kinds = view.kinds
    while node in region:
        if len(value_readers(node)) != 1:
            return False  # a tensor other layers read too: a stream, not a piece of a layer
        kind = kinds[node]
        if kind == "add":
            return all(_conv_pieces(view, p, region, inputs) for p in view.preds[node])
        if kind in _CONV_KINDS:
            if not _is_conv(view, node) or not node.args or \
                    not isinstance(node.args[0], fx.Node):
                return False
            if _convolved(view, node.args[0], region):
                return False  # the last layer of a branch of several
            inputs.append(node.args[0])
            return True
        m = view.modules.get(node.target) if node.op == "call_module" else None
        if not (kind == "identity" or (kind == "norm" and _folds(view, node))
                or (kind == "mul" and _linear(view, node, kind))
                or isinstance(m, _RESAMPLE_LAYERS)
                or (node.op == "call_function" and node.target in _RESAMPLES)):
            return False
        tensors = [a for a in node.args if isinstance(a, fx.Node) and a in view.graph]
        if len(tensors) != 1:
            return False
        node = tensors[0]
    return False


def _convolved(view: GraphView, node, region: set) -> bool:
    """Whether a convolution made ``node`` in a chain of layers that nothing else reads: walked
    back from ``node`` to the tensor it was forked from (one that other layers read too) or a
    merge, through layers of one input each. The convolutions of a layer written in pieces
    read their streams; the last convolution of a branch of several layers (NASNet's
    separable convolutions; HRNet's fourfold downsampling, two strided convolutions) reads
    its branch's own layers."""
    while node in region:
        if view.kinds[node] in _CONV_KINDS:
            return True
        ins = [p for p in view.preds[node] if not reads_metadata_only(node, p)]
        if len(value_readers(node)) != 1 or len(ins) != 1:
            return False
        node = ins[0]
    return False


def _value_region(view: GraphView, region: set, merge, drops: dict) -> set:
    """The nodes of ``region`` that the merge's values come from, a drop path's mask left out."""
    seen, stack = {merge}, [merge]
    while stack:
        n = stack.pop()
        for p in ([drops[n]] if n in drops else view.preds[n]):
            if p in region and p not in seen:
                seen.add(p)
                stack.append(p)
    return seen


def _linear(view: GraphView, node: fx.Node, kind: str) -> bool:
    """A convolution, a foldable batch norm, an identity, a sum or difference, or a scale by a
    weight (a layer scale): what a re-parameterisation folds into one convolution."""
    if kind in _CONV_KINDS:
        return _is_conv(view, node)
    if kind == "norm":
        return _folds(view, node)
    if kind == "mul":  # by a weight or a constant, not by another activation (a gate)
        g = view.graph
        return sum(isinstance(a, fx.Node) and a in g for a in node.args) == 1
    return kind in _LINEAR_KINDS


_PADS = (torch.nn.functional.pad, torch._C._nn.pad, torch.constant_pad_nd)
_PAD_LAYERS = (torch.nn.modules.padding._ReflectionPadNd,
               torch.nn.modules.padding._ReplicationPadNd, torch.nn.modules.padding._CircularPadNd)


def _conv_padding(view: GraphView, node: fx.Node) -> bool:
    """Padding a convolution could do itself (``nn.Conv2d``'s padding modes: zeros, reflect,
    replicate, circular), written apart: ``F.pad`` or a padding layer, as TensorFlow's "same"
    padding is. A constant other than zero is not."""
    if node.op == "call_module":
        m = view.modules.get(node.target)
        return isinstance(m, _PAD_LAYERS) or (
            isinstance(m, torch.nn.modules.padding._ConstantPadNd) and m.value == 0)
    if node.op != "call_function" or node.target not in _PADS:
        return False
    args, kwargs = node.args, node.kwargs
    if node.target is torch.constant_pad_nd:
        return kwargs.get("value", args[2] if len(args) > 2 else 0) == 0
    mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
    value = kwargs.get("value", args[3] if len(args) > 3 else None)
    return mode in ("reflect", "replicate", "circular") or (
        mode == "constant" and value in (None, 0))


def _is_conv(view: GraphView, node: fx.Node) -> bool:
    """A convolution itself, not a leaf module that holds one among other layers."""
    if node.op != "call_module":
        return True
    return isinstance(view.modules.get(node.target), torch.nn.modules.conv._ConvNd)


def _folds(view: GraphView, node: fx.Node) -> bool:
    """A batch norm with no activation of its own (timm's BatchNormAct2d may hold one): it
    folds into the convolution before it."""
    if node.op == "call_function":
        return node.target is torch.nn.functional.batch_norm
    m = view.modules.get(node.target) if node.op == "call_module" else None
    act = getattr(m, "act", None)
    return isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and (
        act is None or isinstance(act, torch.nn.Identity))


def _integration(g: nx.DiGraph, where: str, merge, kind: str, entry, acts, gated, branch):
    """(tensor, node, operand) for the paper's other integrations of SE into a residual block
    (Table 14): "pre", in front of the residual branch, where it reads the block's input;
    "post", after the sum and the activation that follows it; "identity", on the shortcut."""
    if kind != "add":
        return f"'{where}' places a gate in a residual block (a sum), not a concatenation"
    if where == "identity":
        others = [(i, o) for i, o in acts if o is not gated]
        if len(others) != 1:
            return "no single shortcut operand"
        i, o = others[0]
        return o, merge, i
    if where == "post":
        users = list(g.successors(merge))
        if len(users) == 1 and g.nodes[users[0]]["kind"] == "act" \
                and g.nodes[users[0]]["frame"] == g.nodes[merge]["frame"]:
            return users[0], users[0], None
        return merge, merge, None
    readers = [u for u in g.successors(entry) if u in branch]
    if len(readers) != 1:
        return f"the residual branch reads the block's input in {len(readers)} places"
    at = readers[0]
    position = next((i for i, a in enumerate(at.args) if a is entry), None)
    if position is None:
        return "the residual branch reads the block's input inside a container"
    return entry, at, position


def _overlap(branches) -> bool:
    seen: set = set()
    for _, _, b in branches:
        if seen & b:
            return True
        seen |= b
    return False


def _shared_trunk(view: GraphView, branches) -> str | None:
    """None where branches that share nodes share a trunk of whole tensors, from which each
    two part at one tensor and stay apart up to the concatenation: SSH's context module
    (``cat([conv3(x), conv5(t), conv7(t)])`` with ``t = conv(x)``, Inception-v3's module E
    written without its inner concatenation). Otherwise why they are no parallel branches: an
    operand is on another's way (a dense connection); they share pieces of one tensor (a
    split, a chunk, a slice: a channel split, MixNet's mixed convolution, slices put back
    together); or two of them part at more than one tensor (streams that cross, as ResNet in
    ResNet's residual and transient streams do in every block)."""
    for k, (_, o, _) in enumerate(branches):
        if any(o in b for j, (_, _, b) in enumerate(branches) if j != k):
            return ("one of its operands is computed on the way to another (a dense "
                    "connection, not parallel branches)")
    if any(n.op in ("call_function", "call_method") and (n.target in _SPLITS or
                                                         n.target in _PIECES)
           for _, _, b in branches for n in b):
        return SHARED_LAYERS
    g = view.graph
    for k, (_, _, a) in enumerate(branches):
        for _, _, b in branches[k + 1:]:
            shared = a & b
            apart = (a | b) - shared
            if len({n for n in shared for u in g.successors(n)
                    if u in apart and not reads_metadata_only(u, n)}) > 1:
                return SHARED_LAYERS
    return None


_SPLITS = {"chunk", "split", "tensor_split", torch.chunk, torch.split, torch.tensor_split}
_PIECES = {operator.getitem, "unbind", torch.unbind, "narrow", torch.narrow, "split_with_sizes"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp",
               "adaptive_avg_pool2d", "adaptive_max_pool2d"}


def _global_pool(view: GraphView, node: fx.Node) -> bool:
    """Whether ``node`` takes a map of several pixels to one value per channel: a global
    pooling (``AdaptiveAvgPool2d(1)``, ``x.mean((2, 3), keepdim=True)``, ``x.amax((2, 3))``).
    A strided convolution or pooling window that leaves one pixel of a small map is not one."""
    g = view.graph
    out = g.nodes[node].get("shape")
    if out is None or not (len(out) in (2, 3) or (len(out) == 4 and out[2] == out[3] == 1)):
        return False
    if not any(len(s) == 4 and s[2] * s[3] > 1 for s in
               (g.nodes[p].get("shape") for p in view.preds[node]) if s is not None):
        return False
    if node.op == "call_module":
        name = type(view.modules[node.target]).__name__  # (timm's SelectAdaptivePool2d too)
        return "Adaptive" in name and "Pool" in name
    target = node.target
    if target is operator.getitem and isinstance(node.args[0], fx.Node):  # x.max((2, 3))[0]
        target = node.args[0].target
    return getattr(target, "__name__", target) in _REDUCTIONS


def _broadcast(g: nx.DiGraph, node: fx.Node) -> bool:
    """Whether ``node`` expands (``expand``, ``expand_as``) a tensor of one channel or one
    pixel to a map's size: an attention map (BAM's ``channel(x).expand_as(x) +
    spatial(x).expand_as(x)``), not a map of features."""
    if node.op != "call_method" or node.target not in EXPANDS:
        return False
    src = node.args[0]
    a = g.nodes[src] if src in g else {}
    s = a.get("shape")
    if s is None or len(s) != 4:
        return False
    if a.get("layout") == "nhwc":
        return s[3] == 1 or s[1] == s[2] == 1
    return s[1] == 1 or s[2] == s[3] == 1


def _squeezed_only(view: GraphView, merge, reach: int = 64) -> bool:
    """Whether the values of ``merge`` reach nothing but the scales of channel gates: every
    op that reads it pools it to one value per channel, and everything computed from those
    values (never a map of several pixels) ends in the scale of a channel gate's product
    (SKNet's selective kernel: ``u = a + b`` is pooled into the attention that weighs a and
    b). A sum whose pooled values reach a classifier's output is a block."""
    g = view.graph
    seen, stack, gates = {merge}, [merge], 0
    while stack:
        n = stack.pop()
        for u in value_readers(n):
            if u in seen:
                continue
            a = g.nodes[u] if u in g else None
            if a is None or u.op == "output":
                return False
            if n is merge and not _global_pool(view, u):
                return False
            if a["kind"] == "chgate":  # (reached from a pooled value: as the scale)
                gates += 1
                continue
            shape = a.get("shape")
            if shape is not None and len(shape) == 4 and \
                    height_width(shape, a["layout"]) != (1, 1):
                return False
            seen.add(u)
            stack.append(u)
            if len(seen) > reach:
                return False
    return gates > 0


def _gated_output(view: GraphView, merge: fx.Node, reach: int = 8) -> bool:
    """Whether a channel gate scales ``merge``'s output, through norms and activations only:
    the place a gate on the output would take is taken (the paper's SE-Inception module, an
    inception module followed by its gate; CGNet's context guided block)."""
    node = merge
    for _ in range(reach):
        readers = value_readers(node)
        if any(view.kinds.get(u) == "chgate" and node in u.args for u in readers):
            return True
        if len(readers) != 1 or view.kinds.get(readers[0]) not in _PASS_THROUGH:
            return False
        node = readers[0]
    return False


def _is_split_piece(node: fx.Node) -> bool:
    """One piece of ``torch.split(t, ...)`` / ``t.chunk(...)``: the scales of a Res2Net block.
    (A shortcut sliced from a block's input, ``x[:, :n]`` as in DPN, is not one.)"""
    if node.op != "call_function" or node.target is not operator.getitem:
        return False
    src, index = node.args
    return isinstance(index, int) and isinstance(src, fx.Node) and src.target in _SPLITS


def _channel_slice_source(node: fx.Node, branch: set):
    """``t`` when ``node`` is ``t[:, a:b]`` (a slice of channels) and ``t`` is in the branch."""
    if node.op != "call_function" or node.target is not operator.getitem:
        return None
    src, index = node.args
    if not (isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None)
            and isinstance(index[1], slice)):
        return None
    return src if src in branch else None


def _after_depthwise(g: nx.DiGraph, branch: set, modules: dict):
    """(tensor, consumer, operand): the depthwise conv nearest the merge, followed through
    the norm and activation layers after it, and the one op that consumes the result. Not
    where that op is inside a norm or activation layer that the trace went into (timm's
    LayerNorm2d permutes to channels-last first): its forward is no place for a gate."""
    dws = [n for n in branch if g.nodes[n]["kind"] == "dwconv"]
    if not dws:
        return "no depthwise convolution in the branch"
    n = max(dws, key=lambda x: g.nodes[x]["index"])
    while True:
        users = list(g.successors(n))
        if len(users) == 1 and users[0] in branch and g.nodes[users[0]]["kind"] in _PASS_THROUGH:
            n = users[0]
            continue
        break
    users = list(g.successors(n))
    if len(users) != 1 or users[0] not in branch:
        return "the depthwise output feeds more than one op"
    consumer = users[0]
    frame = g.nodes[consumer]["frame"]
    layer = modules.get(frame.qualname) if frame.qualname else None
    if layer is not None and layer_kind(layer) in _PASS_THROUGH:
        return (f"the depthwise output goes on inside a {layer_kind(layer)} layer "
                f"({type(layer).__name__}), where no gate goes")
    position = next((i for i, a in enumerate(consumer.args) if a is n), None)
    if position is None:
        return "the depthwise output reaches its consumer inside a container"
    return n, consumer, position


def feature_map_merges(view: GraphView, kinds: Sequence[str]) -> Counter:
    """How many merges of each of ``kinds`` join two or more 4-D feature maps (a concatenation:
    along their channels), whatever a rule would make of them."""
    g = view.graph
    counts: Counter = Counter()
    for node, a in g.nodes(data=True):
        kind = a["kind"]
        if kind not in kinds or a["ndim"] != 4 or a["layout"] not in CHANNEL_DIM:
            continue
        pairs, dim = _operands(node, kind)
        if sum(1 for _, o in pairs if isinstance(o, fx.Node) and o in g) < 2:
            continue
        if kind == "cat" and (not isinstance(dim, int) or dim % 4 != CHANNEL_DIM[a["layout"]]):
            continue
        counts[kind] += 1
    return counts


def find_candidates(view: GraphView, rules: tuple[Rule, ...],
                    unusable: Callable[[Candidate], str | None] | None = None,
                    ) -> tuple[list[Candidate], list[Rejection]]:
    """Every merge the first fitting rule matches, minus those that yield to an enclosing block.
    A match ``unusable`` gives a reason for is rejected with it, and what it encloses yields
    to it no more (a block that cannot be gated leaves its nested blocks their gates)."""
    g = view.graph
    idom = nx.immediate_dominators(g, ROOT)
    conditioned = None  # (view, idom) without the inputs that only scale or shift a map
    found: list[Candidate] = []
    rejected: list[Rejection] = []
    for node in view.fx_graph.nodes:
        if node not in g:
            continue
        kind = g.nodes[node]["kind"]
        reasons = []
        live = None
        for rule in rules:
            if rule.merge != kind:
                continue
            if live is None:
                live = sum(1 for _, o in _operands(node, kind)[0]
                           if isinstance(o, fx.Node) and o in g)
            if live < 2 and live < rule.min_operands:
                continue  # one map and a constant or parameter (``x + 3``, a norm's shift)
            result = _match(view, node, kind, rule, idom)
            if result == NO_ENTRY:
                conditioned = conditioned or _without_conditioning(view)
                if conditioned[0] is not view:
                    result = _match(conditioned[0], node, kind, rule, conditioned[1])
            if isinstance(result, Candidate):
                found.append(result)
                break
            reasons.append(Rejection(node, rule, result))
        else:
            rejected += reasons
    if unusable is not None:
        usable = []
        for c in found:
            why = unusable(c)
            if why is None:
                usable.append(c)
            else:
                rejected.append(Rejection(c.merge, c.rule, why))
        found = usable
    by_merge = {c.merge: c for c in found}
    suppressed: dict[fx.Node, Candidate] = {}
    merges = by_merge.keys()
    summed: dict[fx.Node, Candidate] = {}
    for outer in found:
        for n in merges & outer.region:
            inner = by_merge[n]
            if inner is not outer and outer.rule.name in inner.rule.yield_to:
                suppressed.setdefault(n, outer)
        # the sum of a residual block's branches, x + (a + b), is its residual branch, not a
        # block; a sum with a shortcut of its own is one. So are the partial sums of more
        # branches, x + ((a + b) + c): every sum it is made of, down to the branches
        todo = [outer.summed] if outer.summed is not None else []
        while todo:
            n = todo.pop()
            inner = by_merge.get(n)
            if inner is None or inner.entry is not outer.entry or inner.shortcut or \
                    summed.setdefault(n, outer) is not outer:
                continue
            todo += [p for p in view.preds[n] if p in by_merge and view.kinds[p] == "add"]
    kept = [c for c in found if c.merge not in suppressed and c.merge not in summed]
    for merge, outer in suppressed.items():
        inner = by_merge[merge]
        rejected.append(Rejection(merge, inner.rule,
                                  f"nested in a block of rule {outer.rule.name!r} (one gate per block)"))
    for merge in summed.keys() - suppressed.keys():
        rejected.append(Rejection(merge, by_merge[merge].rule, SUMMED_BRANCHES))
    return kept, rejected
