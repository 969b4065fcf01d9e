"""Function-preserving gates (``init="identity"``).

A gate whose last layer starts at zero (weight and bias) excites every channel with
sigmoid(0) = 0.5 exactly. The layer that produces the gated tensor is scaled by 2 to make up for
it: its weight and bias if it is a convolution, a linear layer or an affine norm (parameters, or
a frozen layer's buffers), reached from the gated tensor back through ops that commute with a
positive factor (ReLU, pooling, dropout, concatenation, sums, reshapes); of a weight that weight
normalisation computes, its magnitude g; of a pruned weight, the unpruned one. Layers traced as
functions (``F.group_norm``, ``F.conv2d``...) scale with their weight and bias; a convolution's
weight computed in the forward scales with the parameter a product brings in (the gain of
timm's ScaledStdConv2d), and ``scale * x + bias`` with both parameters. Both factors are
powers of two, so every product is exact in floating point, and the gated model computes bit
for bit what the model computed before. The gate still learns: its last layer gets a gradient on
the first backward pass (its first layer on the next ones, once the last is no longer zero), as
a zero-initialised residual branch does.

Sites where no such producer is found, or where the producer or a tensor on the way is read by
anything else (reads of its shape, dtype or device aside), are refused before anything changes.
"""
from __future__ import annotations

import operator
import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune
from torch.nn.utils.weight_norm import WeightNorm

from .errors import SEInjectError
from .graph import called_as
from .kinds import flat, is_rearrange, value_readers
from .shapes import VALUE
from .trace import is_container, op_text

__all__ = ["FACTOR", "Compensation", "plan_compensations", "IdentityInitError", "scale"]

FACTOR = 2.0  # 1 / sigmoid(0)


class IdentityInitError(SEInjectError):
    """A site whose gate cannot start as the identity."""


@dataclass(frozen=True)
class Compensation:
    gate: str
    parameters: tuple[str, ...]  # qualified names of parameters (or a frozen layer's buffers),
    #                              scaled by FACTOR


_PASS_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
                 nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample,
                 nn.PixelShuffle, nn.PixelUnshuffle)
# drop-block layers: a mask made from the input's shape alone (and, scaled by what it keeps,
# from the mask alone); timm's with_noise=True adds noise, which does not scale
_DROP_BLOCKS = (("timm.layers.drop", "DropBlock2d"), ("torchvision.ops.drop_block", "DropBlock2d"))


def _passes(m: nn.Module) -> bool:
    """Whether ``m``'s output scales with its input, whatever its parameters."""
    cls = type(m)
    return isinstance(m, _PASS_MODULES) or is_rearrange(cls) or (  # (values moved, not changed)
        (cls.__module__, cls.__name__) in _DROP_BLOCKS and not getattr(m, "with_noise", False))


_PASS_FUNCTIONS = {F.interpolate, F.relu, torch.relu, F.leaky_relu, F.max_pool2d, F.avg_pool2d,
                   F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.dropout, torch.flatten,
                   torch.permute, torch.reshape, torch.pixel_shuffle, torch.pixel_unshuffle,
                   # values moved, not changed: a crop (``y[..., :h, :w]``, its bounds sizes or
                   # numbers; an index that is a tensor is a second input, refused), a transpose
                   operator.getitem, torch.transpose, torch.narrow, torch.flip, torch.roll}
_PASS_METHODS = {"relu", "relu_", "contiguous", "permute", "reshape", "view", "flatten",
                 "reshape_as", "view_as", "transpose", "narrow", "flip", "roll"}
# a copy, or a cast to a floating-point type (its other arguments a dtype, a device, or a
# tensor whose type it takes): rounding to any float format commutes with a factor of 2, so
# doubling the input doubles the output exactly. (A cast to integers truncates: refused.)
_CAST_METHODS = {"float", "half", "bfloat16", "double", "to", "type", "type_as", "clone"}


def _float_cast(node: fx.Node) -> bool:
    value = node.meta.get(VALUE)
    return isinstance(node.args[0] if node.args else None, fx.Node) and \
        isinstance(value, torch.Tensor) and value.is_floating_point()


# ops whose every tensor operand must be scaled (a sum or concatenation of scaled tensors)
_EACH_OPERAND = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat,
                 torch.concatenate}
_AFFINE = (nn.modules.conv._ConvNd, nn.Linear)
# layers called as functions, (position, name) of their weight and bias: a convolution's output
# scales with both (its weight may be computed: timm's ScaledStdConv2d standardizes it, then
# multiplies by a gain), a norm's with its affine weight and bias whatever its input
_FUNCTIONAL_AFFINE = {f: ((1, "weight"), (2, "bias")) for f in (
    F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear)}
_FUNCTIONAL_NORMS = {F.batch_norm: ((3, "weight"), (4, "bias")),
                     F.instance_norm: ((3, "weight"), (4, "bias")),
                     F.group_norm: ((2, "weight"), (3, "bias")),
                     F.layer_norm: ((2, "weight"), (3, "bias"))}
_FUNCTIONAL_LAYERS = {**_FUNCTIONAL_AFFINE, **_FUNCTIONAL_NORMS}
# what torch.nn.utils.parametrizations.weight_norm registers (a private class: none if it moves)
_WEIGHT_NORM_PARAMETRIZATION = getattr(parametrizations, "_WeightNorm", ())
# the same as tensor methods (``y.add_(x)``; ``y.__iadd__(x)`` called by name, which fx
# records as a method: ``y.__add__(x)`` it records as ``y + x``)
_SUM_METHODS = {"add", "add_", "__iadd__"}
_PRODUCTS = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__imul__"}
_VIEWS = {"view", "reshape", "unsqueeze", "to", "type_as", "expand_as", torch.reshape,
          torch.unsqueeze}


def _parameter_behind(node: fx.Node) -> str | None:
    """The parameter a factor is a view of (ConvNeXt's layer scale: ``x * gamma.reshape(...)``),
    if nothing else reads it."""
    while node.op in ("call_method", "call_function") and node.target in _VIEWS:
        if len(node.users) != 1:
            return None
        node = node.args[0]
    if node.op == "get_attr" and len(node.users) == 1:
        return node.target
    return None


# Batch norms with their statistics and affine terms frozen as buffers (torchvision's, in its
# detection backbones, and timm's, from timm.layers.freeze_batch_norm_2d): ``x * scale + bias``
# with ``scale = weight / sqrt(var + eps)`` and ``bias = b - mean * scale``, which doubling
# ``weight`` and ``b`` doubles exactly. Looked for where their modules are imported only.
_FROZEN_NORMS = (("torchvision.ops.misc", "FrozenBatchNorm2d"),
                 ("timm.layers.norm_act", "FrozenBatchNorm2d"),
                 ("timm.layers.norm_act", "FrozenBatchNormAct2d"))


def _frozen_norm(m: nn.Module) -> bool:
    return any(isinstance(cls, type) and isinstance(m, cls)
               for cls in (getattr(sys.modules.get(mod), name, None)
                           for mod, name in _FROZEN_NORMS))


def _scalable(m: nn.Module) -> tuple[str, ...] | None:
    """Parameter (or frozen norm's buffer) names that scale ``m``'s output by a factor, if
    scaling them does."""
    if isinstance(m, _AFFINE):
        return tuple(n for n in ("weight", "bias") if getattr(m, n, None) is not None)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                      nn.GroupNorm, nn.LayerNorm)) or _frozen_norm(m):
        act = getattr(m, "act", None)  # timm's BatchNormAct2d: a norm with its activation
        drop = getattr(m, "drop", None)
        if act is not None and not _passes(act):
            return None
        if drop is not None and not _passes(drop):
            return None
        if getattr(m, "weight", None) is None:  # not affine: nothing to scale
            return None
        return tuple(n for n in ("weight", "bias") if getattr(m, n, None) is not None)
    return None


def _sequential_params(m: nn.Sequential) -> tuple[str, ...] | None:
    """A leaf Sequential (torchvision's Conv2dNormActivation): its last scalable layer, after
    which only layers that commute with the factor run."""
    for name, layer in reversed(list(m.named_children())):
        if _passes(layer):
            continue
        own = _scalable(layer)
        return tuple(f"{name}.{p}" for p in own) if own else None
    return None


def plan_compensations(graph: fx.Graph, model: nn.Module,
                       sites: list[tuple[str, fx.Node, bool]]) -> list[Compensation]:
    """For each (gate name, gated node, gate on a branch operand?): the parameters to scale so
    that a zero-initialised gate there changes nothing. Raises before anything changes."""
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op in ("call_module", "get_attr"))
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    shared = _shared(model)
    return [_compensation(modules, calls, shared, params.keys(), buffers.keys(), *site)
            for site in sites]


def _compensation(modules: dict[str, nn.Module], calls: Counter, shared: set[str],
                  params: set[str], buffers: set[str], gate: str, gated: fx.Node,
                  branch: bool) -> Compensation:
    found: list[str] = []

    owner = gate.rpartition(".")[0]
    block = modules.get(owner) if owner else None  # (a gate on the model itself: no class)
    cls = type(block).__name__ if block is not None and not is_container(block) else None
    leave = (f"or leave the blocks of its class out (leaf_modules=[{cls}]: every {cls} stays as "
             "it is, ungated)" if cls else "or leave this block out (stages=[...])")

    def refuse(why: str) -> IdentityInitError:
        error = IdentityInitError(
            f"gate `{gate}` cannot start as the identity: {why}. Use init='paper' (the gate "
            f"starts as a new layer, and the model's outputs change) {leave}.")
        error.leave_out = cls
        return error

    def walk(node: fx.Node, first: bool) -> None:
        # every reader of a gated output goes through the gate; any other tensor on the way
        # must have one reader, or scaling what makes it would change the others
        readers = value_readers(node)
        if not (first and not branch) and len(readers) != 1:
            raise refuse(f"{op_text(node)} is used by {len(readers)} ops; scaling what makes "
                         "it would change the others")
        if node.op == "call_module":
            m = modules[node.target]
            own = _scalable(m)
            if own is None and type(m).forward is nn.Sequential.forward:
                own = _sequential_params(m)
            if own:
                if calls[node.target] != 1:
                    raise refuse(f"`{called_as(modules, node)}` is called {calls[node.target]} "
                                 "times")
                found.extend(_tensor_to_scale(modules, params, buffers, f"{node.target}.{p}",
                                              refuse) for p in own)
                return
            if _passes(m):
                return walk(_only_tensor_input(node, refuse), False)
            raise refuse(f"`{called_as(modules, node)}` ({type(m).__name__}) does not scale "
                         "with its input")
        if node.op == "get_attr":  # a tensor the op reads as it is: a parameter scales
            if node.target not in params:
                raise refuse(f"`{node.target}` is a buffer or a constant, not a parameter")
            found.append(node.target)  # (read nowhere else: checked below)
            return
        if node.op == "call_function" and node.target in _FUNCTIONAL_LAYERS:
            (wi, wk), (bi, bk) = _FUNCTIONAL_LAYERS[node.target]
            weight, bias = (node.args[i] if len(node.args) > i else node.kwargs.get(k)
                            for i, k in ((wi, wk), (bi, bk)))
            if not isinstance(weight, fx.Node):
                raise refuse(f"{op_text(node)} has no affine weight to scale (a weight "
                             "standardized without a gain, as timm's StdConv2d's, is one)"
                             if weight is None else f"{op_text(node)} has a constant weight")
            if bias is not None and not isinstance(bias, fx.Node):
                raise refuse(f"{op_text(node)} adds a constant")
            for t in (weight, bias):
                if t is not None:
                    walk(t, False)
            return
        if node.op in ("call_function", "call_method"):
            target = node.target
            if target in _EACH_OPERAND or target in _SUM_METHODS:
                is_cat = target in (torch.cat, torch.concat, torch.concatenate)
                operands = list(flat(node.args[:1])) if is_cat else list(node.args)
                if not operands:  # (the trace records them by position: trace._by_position)
                    raise refuse(f"{op_text(node)} takes its operands in a form "
                                 "se-inject does not follow")
                if not is_cat:  # a 0 added (Python's sum() starts from it) scales as it is
                    operands = [a for a in operands if type(a) not in (int, float) or a != 0]
                if any(not isinstance(a, fx.Node) for a in operands) or \
                        node.kwargs.get("alpha", 1) != 1:
                    raise refuse(f"{op_text(node)} adds a constant")
                for a in operands:
                    walk(a, False)
                return
            if target in _PRODUCTS:  # a product scales with either factor: a parameter first
                factors = [a for a in node.args if isinstance(a, fx.Node)]
                for a in factors:
                    param = _parameter_behind(a)
                    if param in params:  # (not a buffer, nor a tensor made in the forward)
                        found.append(param)
                        return
                if factors:  # one made by an op first: a buffer or constant scales nothing
                    computed = [a for a in factors if a.op != "get_attr"]
                    return walk((computed or factors)[0], False)
            if target is operator.getitem and not isinstance(
                    node.args[0].meta.get(VALUE) if isinstance(node.args[0], fx.Node) else None,
                    torch.Tensor):
                pass  # an item of a layer's tuple, or of a split
            elif target in _PASS_FUNCTIONS or target in _PASS_METHODS or is_rearrange(target) \
                    or (target is F.pad and not _pads_with(node)):
                return walk(_only_tensor_input(node, refuse), False)
            if target in _CAST_METHODS and _float_cast(node):
                return walk(node.args[0], False)
        raise refuse(f"{op_text(node)} does not scale with its input")

    walk(gated, True)
    if not found:  # (the walk ended without a layer: nothing would make up for the 0.5)
        raise refuse("no layer before it can be scaled to make up for it")
    for name in found:  # read once: by the layer scaled, or as the tensor itself
        parts = name.split(".")
        reads = sum(calls[".".join(parts[:i])] for i in range(1, len(parts) + 1))
        if reads > 1:
            raise refuse(f"`{name}` is read {reads} times in the forward (by its layer, or as "
                         "a tensor); scaling it would change the others")
    clash = [p for p in found if p in shared]
    if clash:
        raise refuse(f"parameter `{clash[0]}` is shared with another layer")
    if len(set(found)) != len(found):
        raise refuse("one layer reaches the gated tensor by two paths")
    return Compensation(gate, tuple(found))


def _tensor_to_scale(modules: dict[str, nn.Module], params: set[str], buffers: set[str],
                     name: str, refuse) -> str:
    """What to scale by the factor to scale the layer's tensor ``name``: the tensor itself
    where it is a parameter or a buffer (a frozen layer's); its magnitude where weight
    normalisation computes it from one (``W = g · v / ‖v‖``:
    ``torch.nn.utils.parametrizations.weight_norm``, or the older ``torch.nn.utils.weight_norm``);
    the unpruned weight where ``torch.nn.utils.prune`` masks it (``W = W_orig · mask``). A tensor
    any other parametrization or hook computes (spectral normalisation divides out any factor)
    is refused."""
    if name in params or name in buffers:
        return name
    owner, _, attr = name.rpartition(".")
    m = modules[owner]
    plist = m.parametrizations[attr] if attr in getattr(m, "parametrizations", {}) else None
    if plist is not None:
        g = f"{owner}.parametrizations.{attr}.original0"  # weight_norm's g (original1: v)
        if len(plist) == 1 and isinstance(plist[0], _WEIGHT_NORM_PARAMETRIZATION) and g in params:
            return g
        how = " then ".join(type(p).__name__ for p in plist)
        raise refuse(f"`{name}` is computed by a parametrization ({how}), which scaling what it "
                     "is computed from does not scale by 2; only weight_norm's magnitude does")
    for hook in m._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == attr and f"{owner}.{attr}_g" in params:
            return f"{owner}.{attr}_g"
        if isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == attr and \
                type(hook).apply_mask is prune.BasePruningMethod.apply_mask and \
                f"{owner}.{attr}_orig" in params:  # torch.nn.utils.prune: W = W_orig * mask
            return f"{owner}.{attr}_orig"
    makers = [type(h).__name__ for h in m._forward_pre_hooks.values()
              if attr in (getattr(h, "name", None), getattr(h, "_tensor_name", None))]
    if makers:
        raise refuse(f"`{name}` is computed by a forward pre-hook ({makers[0]}), which scaling "
                     "what it is computed from need not scale by 2")
    raise refuse(f"`{name}` is computed in the forward, neither a parameter nor a buffer")


def _pads_with(node: fx.Node) -> float:
    """The value F.pad fills with (0 for every mode but "constant": the padding is made of the
    input's own values)."""
    mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
    value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
    return (value or 0) if mode == "constant" else 0


def _only_tensor_input(node: fx.Node, refuse) -> fx.Node:
    # not a size read from a tensor's shape (F.interpolate(y, size=x.shape[-2:]), as
    # torchvision's DeepLabV3 pools and scales back one branch of its ASPP module)
    tensors = [a for a in node.all_input_nodes if a.op != "get_attr"
               and isinstance(a.meta.get(VALUE, node), (torch.Tensor, fx.Node))]
    if len(tensors) != 1:
        raise refuse(f"{op_text(node)} has {len(tensors)} tensor inputs")
    return tensors[0]


def _shared(model: nn.Module) -> set[str]:
    """The names of a parameter or buffer that another layer holds too (tied weights). A layer
    held under two names holds its tensors once: nnU-Net's convolution blocks keep their
    convolution, norm and nonlinearity as attributes and again in a Sequential that runs them
    (``conv2.norm`` is ``conv2.all_modules.1``). Its calls under either name are counted
    together, the trace naming a layer one way."""
    holders: dict[int, dict[tuple[int, str], list[str]]] = {}
    for prefix, m in model.named_modules(remove_duplicate=False):
        for attr, t in (*m._parameters.items(), *m._buffers.items()):
            if t is not None:
                name = f"{prefix}.{attr}" if prefix else attr
                holders.setdefault(id(t), {}).setdefault((id(m), attr), []).append(name)
    return {n for held in holders.values() if len(held) > 1
            for names in held.values() for n in names}


@torch.no_grad()
def scale(model: nn.Module, names, factor: float) -> None:
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
    for n in names:
        tensors[n].mul_(factor)
