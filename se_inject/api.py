"""The public calls: plan, apply, remove. Check everything first, then mutate."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import gc
import inspect
import itertools
import math
import operator
import sys
from collections import Counter, abc, defaultdict
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from torch import nn

from .errors import (InvalidArgumentError, NoSitesError, SEInjectError, TraceError,
                     check_module, checks_arguments, warn)
from .frames import block_calls, fingerprints, layer_outputs, local_keys
from .gate import ChannelGate, GateSpec, check_identity, gate_parameters
from .fuse import fuse, fused_settings, unfuse
from .graph import build_view, height_width
from .identity import FACTOR, plan_compensations, scale
from .kinds import layer_kind
from .loads import mark_uninitialised, unwatch_plain_loads, watch_plain_loads
from .match import (A_VOLUME, HOLDS_A_GATE, NOT_A_FEATURE_MAP, OPERAND_NOT_A_FEATURE_MAP,
                    feature_map_merges, find_candidates)
from .plan import Plan, Site, Skipped
from .recipe import forget_recipe, record_step
from .rewrite import (GATE_PREFIX, BlockContext, commit, owner_state, prepare, random_draws,
                      remove_gates)
from .rules import MERGES, RuleSpec, resolve_rules
from .shapes import (forward_arguments, input_leaves, is_shape, make_inputs,
                     propagate_shapes)
from .trace import (SCOPE, VALUES_READ, Frame, TraceOptions, has_forward, is_container,
                    module_code, parts_with_convolutions, python_path, trace_model,
                    tracing_session)

__all__ = ["apply", "plan", "remove"]


def _check_model(model) -> bool:
    """Refuses what cannot be gated; says whether a part of the model is TorchScript."""
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidArgumentError("a TorchScript module cannot be traced by torch.fx: pass the "
                                   "eager nn.Module it was scripted from")
    if not isinstance(model, nn.Module):
        raise InvalidArgumentError(f"model must be a torch.nn.Module, not {type(model).__name__}; "
                                   "for a timm name use timm.create_model(name) first")
    wrapper = _wrapper_kind(model)
    if wrapper is not None:
        raise InvalidArgumentError(wrapper)
    if not has_forward(model):
        parts = parts_with_convolutions(model)
        named = ", ".join(f"se_inject.apply({python_path(model, n)}) ({c})"
                          for n, c, _ in parts[:4])
        raise InvalidArgumentError(
            f"model is a {type(model).__name__}, which has no forward: its owner calls the "
            f"modules in it one by one, and nothing calls it whole. Gate those that hold "
            f"blocks, each in place: " + (named if parts else "it holds no convolution"))
    compiled = getattr(sys.modules.get("torch._dynamo.eval_frame"), "OptimizedModule", None)
    compiled = compiled if isinstance(compiled, type) else ()
    scripted = False
    for name, m in model.named_modules():
        scripted = scripted or isinstance(m, torch.jit.ScriptModule)
        if name and isinstance(m, compiled):
            inner = type(getattr(m, "_orig_mod", m)).__name__
            raise InvalidArgumentError(
                f"{name} is torch.compile's wrapper (OptimizedModule) of a {inner}, which fx "
                f"cannot trace into: compile it in place instead (put back its _orig_mod, "
                f"then call .compile() on it: the module stays itself and se-inject traces "
                f"through it), or gate the model before compiling its parts")
        if _quantized(type(m)):
            raise InvalidArgumentError(
                f"model is quantized: its layer `{name or '(model)'}` is {type(m).__module__}."
                f"{type(m).__name__}, which computes on int8 tensors that shapes cannot be "
                f"worked out on, and a gate cannot be put between such layers. Gate the float "
                f"model, then quantize the gated model with FX graph mode quantization "
                f"(torch.ao.quantization.quantize_fx.prepare_fx, calibrate, convert_fx), which "
                f"quantizes the gates with it")
    return scripted


@functools.lru_cache(maxsize=None)
def _quantized(cls: type) -> bool:
    """Whether ``cls`` is one of torch.ao's statically quantized modules (what
    torch.ao.quantization.convert or convert_fx puts in). Not counted: dynamically quantized
    layers (a quantized Linear head, taking and giving float tensors) and FloatFunctional and
    FXFloatFunctional, the float ops of a model still to be quantized (torchvision's
    quantizable models), which convert turns into QFunctional."""
    where = cls.__module__
    return where.startswith(("torch.ao.nn.quantized.", "torch.ao.nn.intrinsic.quantized.")) \
        and ".dynamic" not in where and cls.__name__ not in ("FloatFunctional",
                                                            "FXFloatFunctional")


def wrapped(model: nn.Module) -> tuple[str, str, nn.Module] | None:
    """Where ``model`` is a wrapper that holds the model as one attribute (torch.compile's
    OptimizedModule, DataParallel, DistributedDataParallel): that attribute's name, what the
    wrapper is, and the model."""
    if _imported_instance(model, "torch._dynamo.eval_frame", "OptimizedModule"):
        inner = getattr(model, "_orig_mod", None)
        what = "torch.compile's wrapper (OptimizedModule)"
        return ("_orig_mod", what, inner) if isinstance(inner, nn.Module) else None
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module", f"a {type(model).__name__} wrapper", model.module
    return None


def _wrapper_kind(model: nn.Module) -> str | None:
    """What to do instead, where ``model`` wraps the model to gate: torch.compile's
    OptimizedModule, DataParallel, DistributedDataParallel, FSDP. A wrapper's forward calls
    the wrapped model through machinery fx cannot trace (or, compiled, not at all), and DDP
    and FSDP fix the parameters they synchronise when they are built. Their modules are only
    looked for where torch has imported them: a model cannot be an instance otherwise."""
    attr, what, inner = wrapped(model) or (None, None, None)
    if attr == "_orig_mod":
        return (f"model is {what} of a {type(inner).__name__}: gate the model it compiled, "
                f"se_inject.apply(model._orig_mod), then compile that again; or gate the "
                f"uncompiled model with apply(..., fused=True), which compiles it in place")
    if isinstance(model, nn.DataParallel):
        return (f"model is {what} of a {type(inner).__name__}: gate the model it wraps, "
                f"se_inject.apply(model.module), or gate it before wrapping it")
    if isinstance(model, nn.parallel.DistributedDataParallel) or _imported_instance(
            model, "torch.distributed.fsdp.fully_sharded_data_parallel",
            "FullyShardedDataParallel") or _imported_instance(
            model, "torch.distributed.fsdp", "FSDPModule"):
        return (f"model is sharded or wrapped for distributed training "
                f"({type(model).__name__}), which fixes the parameters it synchronises when "
                f"it is built: gate the model first (se_inject.apply(model)), then wrap or "
                f"shard it, as examples/finetune.py does")
    return None


def _tensor_mode(model: nn.Module):
    """Inference mode on where the model's tensors were made in it, off otherwise, whatever the
    caller's mode: gates are made as the model's own tensors were, so that a model made for
    training stays trainable when gated inside ``torch.inference_mode()``, and the tensors of
    a model made in that mode can be scaled in place (identity initialisation) outside it."""
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    return torch.inference_mode(first is not None and first.is_inference())


def _imported_instance(obj, module: str, name: str) -> bool:
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and isinstance(obj, cls)


def _positive(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_ratio(ratio) -> int | dict[int, int]:
    """A positive integer, or one per stage: {stage: r} (keys may be digit strings, as JSON
    writes them)."""
    if isinstance(ratio, dict):
        try:
            out = {int(k): v for k, v in ratio.items()}
        except (TypeError, ValueError):
            out = None
        if out and all(k >= 0 and _positive(v) for k, v in out.items()):
            return dict(sorted(out.items()))
        raise InvalidArgumentError(f"a ratio per stage must map stage numbers to positive "
                                   f"integers, e.g. {{2: 16, 3: 16, 4: 8, 5: 8}}; got {ratio!r}")
    if not _positive(ratio):
        raise InvalidArgumentError(f"ratio must be a positive integer (the paper's r, e.g. 16), "
                                   f"or one per stage ({{stage: r}}), not {ratio!r}")
    return ratio


POSITIONS = ("standard", "pre", "post", "identity")


def _check_position(position) -> str:
    if position not in POSITIONS:
        raise InvalidArgumentError(f"position must be one of {', '.join(map(repr, POSITIONS))} "
                                   f"(paper Table 14); got {position!r}")
    return position


def _gate_spec(gate, squeeze, excite, min_channels, divisor) -> GateSpec:
    return GateSpec(kind=gate, squeeze=squeeze, excite=excite, min_channels=min_channels,
                    divisor=divisor)


def _placed(resolved, position: str) -> tuple:
    """The rules with their sums' gates moved to ``position`` ("standard" keeps each rule's)."""
    if position == "standard":
        return tuple(resolved)
    return tuple(dataclasses.replace(r, gate_at=position) if r.merge == "add" else r
                 for r in resolved)


# Models without a timm config whose default input is not 224 x 224: torchvision's
# Inception-v3 (its weights' crop) cannot run its training-mode auxiliary head below 299.
_INPUT_SIZES = {"torchvision.models.inception.Inception3": (3, 299, 299),
                # clips of 16 frames, at the crop torchvision's video weights were trained on
                "torchvision.models.video.resnet.VideoResNet": (3, 16, 112, 112),
                "torchvision.models.video.s3d.S3D": (3, 16, 224, 224)}


def _input_shapes(model: nn.Module, input_size) -> list:
    """One spec per input of the forward, each shape with a batch of 2 in front (batch-norm in
    training mode refuses a batch of 1): a torch.Size for a tensor, or a list, tuple or dict of
    specs for an input that holds several tensors (shapes.input_leaves, shapes.make_inputs)."""
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
        cls = type(model)
        input_size = tuple(cfg.get("input_size", _INPUT_SIZES.get(
            f"{cls.__module__}.{cls.__qualname__}", (3, 224, 224))))
        from ._models import in_chans_of
        c = in_chans_of(model)  # a model built with in_chans=1 keeps the cfg's 3
        if c:
            input_size = (c, *input_size[1:])
    if isinstance(input_size, dict) or is_shape(input_size):
        sizes = [input_size]  # one input: a tensor, or a dict of them
    elif isinstance(input_size, (tuple, list)) and input_size:
        sizes = list(input_size)  # one entry per input
    else:
        raise _bad_input_size(input_size)
    return [_spec(s, input_size) for s in sizes]


def _spec(value, given):
    if type(value) is tuple and not value:
        return torch.Size((2,))  # one number per sample beside a map (a diffusion timestep)
    if is_shape(value):
        if not all(not isinstance(e, bool) and e > 0 for e in value):
            raise _bad_input_size(given)
        if math.prod((2, *value)) >= 2 ** 63:  # a number of elements no tensor can have
            raise InvalidArgumentError(f"input_size {tuple(value)}: a batch of it has "
                                       f"{math.prod((2, *value)):.3g} elements, more than a "
                                       "tensor can hold; pass the size the model takes")
        return torch.Size((2, *value))
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        return {k: _spec(v, given) for k, v in value.items()}
    if isinstance(value, (tuple, list)) and value:
        return type(value)(_spec(v, given) for v in value)
    raise _bad_input_size(given)


def _bad_input_size(given) -> InvalidArgumentError:
    return InvalidArgumentError(
        f"input_size must be (C, H, W) of positive integers, or a list of them for several "
        f"inputs (() for one that is a number per sample: [(3, 32, 32), ()] for a diffusion "
        f"U-Net's image and timestep); an input that is a list or dict of tensors takes a "
        f"list or dict of sizes "
        f"(input_size=[[(3, 224, 224), (1, 224, 224)]] for forward(self, images) given a list "
        f"of two; input_size={{'rgb': (3, 224, 224), 'depth': (1, 224, 224)}} for a dict); got "
        f"{given!r}")


@contextlib.contextmanager
def _on_meta(model: nn.Module):
    """``model`` with a meta tensor in place of each of its parameters and buffers (one for a
    tensor held under two names), its own put back on exit. Each module's own tables are
    swapped, once per module: torch.func.functional_call, which swaps by name, leaves a layer
    that is reachable under two names (CoaT's shared positional convolutions) on the meta
    device."""
    from .trace import _all_modules
    saved, made = [], {}

    def stand_in(t):
        if id(t) not in made:
            meta = torch.empty_like(t, device="meta")
            made[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) \
                else meta
        return made[id(t)]

    for m in _all_modules(model):
        for table in (m._parameters, m._buffers):
            if table:
                saved.append((table, dict(table)))
                for k, t in table.items():
                    if t is not None:
                        table[k] = stand_in(t)
    try:
        yield
    finally:
        for table, before in saved:
            table.clear()
            table.update(before)


class _Reached(Exception):
    """Raised by part_input_size's hook: the forward got to the part."""


@checks_arguments
def part_input_size(model: nn.Module, part: str, *, input_size=None) -> tuple[int, ...]:
    """The size, without the batch, of the tensor that ``model`` hands its submodule ``part``
    (a dotted name: ``"layer2"``, ``"backbone.body"``) when it runs on its input: the
    ``input_size`` to gate that part with, ``apply(model.layer2, input_size=...)``.

    ``input_size``: the model's input, as apply() takes it (default: its timm config's, else
    (3, 224, 224)). The model runs on meta stand-ins of its weights, up to the part and no
    further, in eval mode, and is left as it was (weights, buffers, mode, attributes its
    forward sets).

    Raises:
        InvalidArgumentError: ``model`` has no submodule ``part``.
        TraceError: the forward failed before it reached the part, or handed it other than
            one tensor, or never called it (a container whose children the forward calls one
            by one): pass the part's input_size to apply() yourself.
    """
    from ._models import part_of
    from .trace import _anything, _NothingLeft
    check_module(model, "part_input_size")
    layer = part_of(model, part, type(model).__name__)
    found: list = []

    def reached(_module, args, kwargs):
        found.append(_handed_tensor(layer, args, kwargs))
        raise _Reached

    dtype, specs = _dtype(model), _input_shapes(model, input_size)
    inputs = [make_inputs(spec, lambda z: torch.zeros(z, device="meta", dtype=dtype))
              for spec in specs]
    handle = layer.register_forward_pre_hook(reached, with_kwargs=True)
    sizes = [tuple(z[1:]) for spec in specs for z in input_leaves(spec)]
    what = f"{type(model).__name__}'s input{'s' if len(sizes) > 1 else ''} " \
        f"{', '.join(map(str, sizes))}"
    try:  # (the snapshot, taken with the stand-ins in place, copies none of the real buffers;
        # it puts back what the forward sets, and the modes eval() sets)
        with _on_meta(model), _NothingLeft(model, left=_anything), torch.no_grad():
            model.eval()  # (a detector in training mode wants its targets)
            args, kwargs = forward_arguments(model, inputs)
            model(*args, **kwargs)
    except _Reached:
        pass
    except Exception as exc:  # a forward that cannot run on meta tensors, or not at this size
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise TraceError(f"{what} did not reach `{part}`: {type(exc).__name__}: {first}. Pass "
                         "the part's input_size to apply() yourself, or the model's input_size "
                         "here.") from None
    finally:
        handle.remove()
    if not found:
        raise TraceError(f"{what} ran without calling `{part}` itself (a container whose "
                         "children the forward calls one by one?): gate one of its children, "
                         "or pass the part's input_size to apply() yourself.")
    if isinstance(found[0], _NotOneTensor):
        if found[0].constant:
            raise TraceError(f"{type(model).__name__} hands `{part}` {found[0].what}, and a part "
                             "gated alone is traced with its other arguments at their defaults: "
                             "its gated forward would refuse this call. Gate the module that "
                             "calls it instead, which traces the call as it is made.")
        raise TraceError(f"{type(model).__name__} hands `{part}` {found[0].what}: pass its "
                         "input_size to apply() yourself (a list of sizes for several "
                         "inputs).")
    return tuple(found[0])


class _NotOneTensor(NamedTuple):
    what: str  # what the call hands the part, in words
    constant: bool  # one tensor, and a constant other than the forward's default


def _holds_tensor(value) -> bool:
    if isinstance(value, dict):
        value = list(value.values())
    return isinstance(value, torch.Tensor) or (
        isinstance(value, (list, tuple)) and any(map(_holds_tensor, value)))


def _handed_tensor(layer: nn.Module, args: tuple, kwargs: dict) -> torch.Size | _NotOneTensor:
    """The size of the one tensor a call hands ``layer``, first, where every other argument
    is a constant at its default in the forward (``encoder(x, return_dict=True)``): apply()
    traces a part alone at its defaults."""
    if not (args and isinstance(args[0], torch.Tensor)):
        return _NotOneTensor("other than one tensor", False)
    if len(args) == 1 and not kwargs:
        return args[0].shape[1:]
    sig = inspect.signature(layer.forward)
    try:
        bound = sig.bind(*args, **kwargs).arguments
    except TypeError:
        return _NotOneTensor("arguments its forward does not take", False)
    for name, value in list(bound.items())[1:]:
        param = sig.parameters[name]
        if _holds_tensor(value):
            return _NotOneTensor("other than one tensor", False)
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) and not value:
            continue
        if param.default is param.empty or not _same_constant(value, param.default):
            return _NotOneTensor(f"one tensor and `{name}={value!r}`" + (
                "" if param.default is param.empty else f" (its default: {param.default!r})"),
                True)
    return args[0].shape[1:]


def _same_constant(value, default) -> bool:
    """Whether a generated forward that checks ``default`` (by identity for None and flags,
    by equality for numbers and strings) lets ``value`` through."""
    if value is default:
        return True
    if isinstance(value, (bool, type(None))) or isinstance(default, (bool, type(None))):
        return False
    try:
        return bool(value == default)
    except Exception:  # (a value that does not compare to a bool)
        return False


def handed_size(model: nn.Module, part: str) -> tuple[int, ...] | None:
    """part_input_size, or None where it cannot tell: the caller goes on with its default size
    (and apply()'s own message, should that not fit)."""
    try:
        return part_input_size(model, part)
    except SEInjectError:
        return None


def _listed(value, name: str, example: str) -> tuple:
    """The items of a list-like argument; None gives none."""
    if value is None:
        return ()
    if isinstance(value, (str, bytes, type, torch.Tensor, nn.Module)) or \
            not isinstance(value, abc.Iterable):
        raise InvalidArgumentError(f"{name} must be a list, e.g. {name}={example}; got "
                                   f"{value!r}")
    return tuple(value)


def _trace_options(model: nn.Module, leaf_modules, autowrap_functions) -> TraceOptions:
    """The trace's options; a name in leaf_modules (``"InceptionB"``, or qualified) is the
    class of the model's modules it names, as on the command line (--leaf)."""
    leaves = _listed(leaf_modules, "leaf_modules", "[MyBlock]")
    if any(isinstance(c, str) for c in leaves):
        from ._models import classes_named
        leaves = classes_named(model, leaves, "leaf_modules")
    for c in leaves:
        if not (isinstance(c, type) and issubclass(c, nn.Module)):
            raise InvalidArgumentError(f"leaf_modules holds {c!r}: give nn.Module classes or "
                                       "their names, e.g. leaf_modules=[MyBlock]")
    fns = _listed(autowrap_functions, "autowrap_functions", "[my_function]")
    for f in fns:
        if not callable(f):
            raise InvalidArgumentError(f"autowrap_functions holds {f!r}, which is not callable")
    return TraceOptions(leaf_modules=leaves, autowrap_functions=fns)


def _dtype(model: nn.Module) -> torch.dtype:
    p = next((t for t in model.parameters() if t.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32


def _gate_names(owner: nn.Module, count: int) -> list[str]:
    """se_gate, se_gate_1, ... skipping names the block already uses."""
    state = owner_state(owner)
    taken = set(state.gates) if state else set()
    names, i = [], 0
    while len(names) < count:
        name = GATE_PREFIX if i == 0 else f"{GATE_PREFIX}_{i}"
        i += 1
        if name in taken or hasattr(owner, name):
            continue
        names.append(name)
    return names


def _holds_gate(view, c) -> bool:
    """The site's tensor already goes through one of our gates, before or after ``c.at``; or
    the block holds one of ours at another position (a second apply() with another
    ``position``): in its branches or shortcut, or after its merge and the activation that
    follows it, called in the same forward."""
    gates = view.of_kinds("gate")
    if not gates:  # (a model not gated before)
        return False
    if c.operand is not None:
        if c.gated in gates or c.at in gates:
            return True
    elif not gates.isdisjoint(c.at.users):
        return True
    after = [u for u in c.merge.users if u in view.graph]
    after += [v for u in after if view.attrs(u)["kind"] == "act" for v in u.users
              if v in view.graph]
    return any(view.attrs(n)["frame"] == c.frame
               for n in gates.intersection(itertools.chain(c.region, after)))


def _check_stages(stages) -> frozenset[int] | str | None:
    if stages is None or stages in ("all", "all-but-last"):
        return None if stages in (None, "all") else stages
    if isinstance(stages, (str, bytes)) or not hasattr(stages, "__iter__"):
        raise InvalidArgumentError(f"stages must be a list of stage numbers (e.g. [2, 3, 4]), "
                                   f"'all' or 'all-but-last'; got {stages!r}")
    chosen = list(stages)
    if not chosen or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0
                             for k in chosen):
        raise InvalidArgumentError(f"stages must hold stage numbers (non-negative integers: "
                                   f"k for tensors at 1/2**k of the input's height); got {stages!r}")
    return frozenset(chosen)


def _stage(view, node, input_height: int) -> tuple[tuple[int, ...], int]:
    a = view.attrs(node)
    shape = a.get("shape") or ()
    hw = height_width(shape, a["layout"])
    if not hw or not hw[0]:
        return hw, 0
    return hw, max(0, round(math.log2(input_height / hw[0])))


class _Chosen(NamedTuple):
    block: str
    key: tuple
    candidate: object       # match.Candidate
    spatial: tuple[int, ...]
    stage: int


@contextlib.contextmanager
def _tracing(model: nn.Module):
    """Planning and rewriting trace the model, then each block to rewrite: one
    ``tracing_session`` serves all of those traces (fx's own patch of nn.Module, remade on
    each, costs more than tracing a small block) and patches the model's classes only.

    Tracing also allocates many small objects, which starts the cyclic garbage collector; a
    full collection walks every object in the process (a large model holds hundreds of
    thousands) and can take longer than the trace. It is paused meanwhile; the garbage that
    tracing leaves is collected by later collections as usual."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        with tracing_session(model):
            yield
    finally:
        if enabled:
            gc.enable()


# Layers whose forward the trace may go into (timm's LayerNorm2d, GroupNorm1) but which are no
# place for a gate: a site there belongs to the forward that calls them.
_LAYERS_NOT_BLOCKS = frozenset(("norm", "act"))


def _lifted(c, layer: nn.Module, calls: dict) -> tuple | str:
    """A site inside the forward of a norm or activation layer, on a tensor passed to it (the
    ``pre`` position on a branch that starts with timm's LayerNorm2d), moved to the layer's
    call in its caller's forward: the gate then scales the layer's argument there, which is
    the same tensor. Returns (block, key, candidate), or why it cannot move."""
    name = type(layer).__name__
    call = next((k for k in calls.get(c.frame.qualname, ()) if k.frame == c.frame), None)
    if call is None or c.operand is None or c.gated.meta.get(SCOPE) == c.frame:
        return (f"the gate would sit inside a {layer_kind(layer)} layer ({name}), on a tensor "
                "it makes")
    if c.gated not in call.args:
        return (f"the gated tensor reaches a {layer_kind(layer)} layer ({name}) other than as an "
                "argument of its own")
    parent = call.parent.qualname
    child = c.frame.qualname[len(parent) + 1:] if parent else c.frame.qualname
    k = sum(1 for other in calls[c.frame.qualname] if other.parent == call.parent
            and other.frame.call < c.frame.call)
    moved = dataclasses.replace(c, frame=call.parent, operand=call.args.index(c.gated))
    return parent, ("call_module", child, k), moved


_READS_A_VALUE = ("its forward reads a traced value as a Python number (`if x.shape[1] != ...`, "
                  "`int(x.shape[-1])`): a forward generated from a trace of it would hold the "
                  "number it had at the input size for every size")


def _check_structure(model: nn.Module, graph, shapes: list) -> None:
    """Refuse an input given as one tensor that the forward only indexes (``xs[0]``,
    ``batch["rgb"]``): it takes a list, tuple or dict of tensors, whose sizes input_size must
    give one by one."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for node, spec in zip(placeholders, shapes):
        if not isinstance(spec, torch.Size) or not node.users or \
                (node.target.startswith("*") and not node.target.startswith("**")):
            continue  # (*images holds the inputs that remain, one size each)
        keys = [u.args[1] for u in node.users
                if u.op == "call_function" and u.target is operator.getitem and u.args[0] is node
                and isinstance(u.args[1], (int, str)) and not isinstance(u.args[1], bool)]
        size = tuple(spec[1:])
        if any(isinstance(k, str) for k in keys):
            named = list(dict.fromkeys(k for k in keys if isinstance(k, str)))
            example = "{" + ", ".join(f"{k!r}: (C, H, W)" for k in named) + "}"
            what = "a dict"
        elif len(keys) == len(node.users):
            example = "[[" + ", ".join("(C, H, W)" for _ in range(max(keys) + 1)) + "]]" \
                if min(keys) >= 0 else "[[(C, H, W), ...]]"
            what = "a list or tuple"
        else:
            continue
        used = ", ".join(f"{node.target.lstrip('*')}[{k!r}]" for k in dict.fromkeys(keys))
        raise InvalidArgumentError(
            f"{type(model).__name__}.forward takes `{node.target}` as {what} of tensors ({used}), "
            f"but input_size gives it one tensor of size {size}: give the size of each, "
            f"input_size={example} (nothing was changed).")


# The gates a checkpoint being loaded records (se_inject.load): where this se-inject finds those
# sites and more (a block an earlier version missed), apply() gates those alone, so that the
# checkpoint loads as the model it was saved from.
_RECORDED: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "se_inject_recorded_gates", default=None)


@contextlib.contextmanager
def recorded_gates_only(gates: Sequence[str]):
    token = _RECORDED.set(tuple(gates))
    try:
        yield
    finally:
        _RECORDED.reset(token)


def _make_plan(model, ratio, resolved, input_size, options: TraceOptions,
               stages=None, spec: GateSpec | None = None) -> tuple[Plan, dict, tuple]:
    """The plan; what the model's trace says about each planned block; and the trace itself
    with each planned gate's candidate."""
    shapes = _input_shapes(model, input_size)
    graph = trace_model(model, options, n_inputs=len(shapes), input_shapes=shapes,
                        dtype=_dtype(model))
    _check_structure(model, graph, shapes)
    propagate_shapes(model, graph, shapes, _dtype(model))
    height = input_leaves(shapes[0])[0][-2]  # stages count from the first input tensor's height
    view = build_view(graph, model)
    modules = view.modules
    reads = {f.qualname for f in getattr(graph, VALUES_READ, ())}

    def unusable(c) -> str | None:  # (a sum inside a norm or activation layer goes up a level)
        block = c.frame.qualname
        if block in reads and not (block and layer_kind(modules[block]) in _LAYERS_NOT_BLOCKS):
            return _READS_A_VALUE
        return None

    candidates, rejected = find_candidates(view, resolved, unusable if reads else None)
    keys = local_keys(graph)
    skipped = [Skipped(view.describe(r.merge), r.rule.name, r.reason) for r in rejected]
    chosen = []
    seen = set()
    calls = None
    for c in candidates:
        block = c.frame.qualname
        owner = modules[block]
        local = keys.get(c.at)
        if block and layer_kind(owner) in _LAYERS_NOT_BLOCKS:
            calls = block_calls(graph) if calls is None else calls
            lifted = _lifted(c, owner, calls)
            if isinstance(lifted, str):
                skipped.append(Skipped(view.describe(c.merge), c.rule.name, lifted))
                continue
            block, local, c = lifted
            owner = modules[block]
            if block in reads:  # (the layer's own frame was let through by unusable())
                skipped.append(Skipped(view.describe(c.merge), c.rule.name, _READS_A_VALUE))
                continue
        state = owner_state(owner)
        if state is not None:  # the block runs a rewritten forward: name the node as its class does
            local = state.class_key(local, owner.training)
        # a gate on a channels-last map (MambaOut's) runs on its channel-first view
        nhwc = ("nhwc",) if view.attrs(c.gated)["layout"] == "nhwc" else ()
        key = None if local is None else (*local, c.operand, *nhwc)
        if _holds_gate(view, c) or (state is not None and key in state.gates.values()):
            skipped.append(Skipped(view.describe(c.merge), c.rule.name, "already gated"))
            continue
        if key is None:
            skipped.append(Skipped(view.describe(c.merge), c.rule.name,
                                   "made by se-inject's own rewrite"))
            continue
        if is_container(owner):  # only when the model itself is an nn.Sequential
            skipped.append(Skipped(view.describe(c.merge), c.rule.name,
                                   "sits directly in an nn.Sequential, where a gate would "
                                   "become one of its layers"))
            continue
        if (block, key) in seen:  # a module called more than once: one gate serves every call
            continue
        seen.add((block, key))
        chosen.append(_Chosen(block, key, c, *_stage(view, c.gated, height)))
    spec = spec or GateSpec()
    if isinstance(ratio, dict) and stages is None:
        stages = frozenset(ratio)  # a ratio per stage names the stages to gate
    if stages is not None:
        present = sorted({t.stage for t in chosen})
        keep = set(present[:-1]) if stages == "all-but-last" else stages
        if stages != "all-but-last" and present and not keep & set(present):
            raise InvalidArgumentError(f"stages {sorted(stages)} hold no site of "
                                       f"{type(model).__name__}: its sites lie in stages "
                                       f"{present} (k: tensors at 1/2**k of the input's height)")
        skipped += [Skipped(view.describe(t.candidate.merge), t.candidate.rule.name,
                            f"stage {t.stage} not chosen") for t in chosen if t.stage not in keep]
        chosen = [t for t in chosen if t.stage in keep]
    if isinstance(ratio, dict):
        missing = sorted({t.stage for t in chosen} - set(ratio))
        if missing:
            raise InvalidArgumentError(f"the ratio per stage {ratio} gives none for stage(s) "
                                       f"{missing}, which are gated; add them or leave them "
                                       "out with stages=[...]")
    per_block = defaultdict(list)
    for t in chosen:
        per_block[t.block].append(t.candidate)
    names = {block: iter(_gate_names(modules[block], len(cs))) for block, cs in per_block.items()}
    sites = []
    for block, key, c, spatial, stage in chosen:
        channels = view.attrs(c.gated)["channels"]
        name = next(names[block])
        r = ratio[stage] if isinstance(ratio, dict) else ratio
        sites.append(Site(block=block, tensor=view.describe(c.gated), channels=channels,
                          reduced=spec.reduced(channels, r), rule=c.rule.name,
                          position=c.rule.gate_at, gate=f"{block}.{name}" if block else name,
                          merge=view.describe(c.merge), entry=view.describe(c.entry),
                          spatial=spatial, stage=stage, ratio=r,
                          parameters=gate_parameters(channels, r, spec), key=key))
    blocks = {}
    if per_block:  # only the planned blocks' own frames are summed up
        prints = fingerprints(graph, {Frame(block, 0) for block in per_block})
        calls = block_calls(graph) if calls is None else calls
        outputs = layer_outputs(graph, per_block)
        blocks = {block: BlockContext(prints.get(Frame(block, 0)), tuple(calls.get(block, ())),
                                      outputs[block])
                  for block in per_block}
    only = _RECORDED.get()
    if only is not None and set(only) < {site.gate for site in sites}:
        skipped += [Skipped(site.merge, site.rule, "not gated in the checkpoint being loaded")
                    for site in sites if site.gate not in only]
        kept = [(site, t) for site, t in zip(sites, chosen) if site.gate in only]
        sites, chosen = [site for site, _ in kept], [t for _, t in kept]
        blocks = {block: context for block, context in blocks.items()
                  if any(t.block == block for t in chosen)}
    gated = {site.gate: t.candidate for site, t in zip(sites, chosen)}
    return Plan(sites=tuple(sites), skipped=tuple(skipped), model=type(model).__name__,
                ratio=ratio, unexamined=_unexamined(view, resolved)), blocks, (graph, gated)


def _unexamined(view, resolved) -> tuple[tuple[str, int], ...]:
    """How many merges of 4-D feature maps of each kind no rule in ``resolved`` looks at."""
    kinds = [k for k in MERGES if not any(r.merge == k for r in resolved)]
    if not kinds:
        return ()
    counts = feature_map_merges(view, kinds)
    return tuple((k, counts[k]) for k in kinds if counts[k])


@checks_arguments
def plan(model: nn.Module, ratio: int | dict = 16,
         rules: RuleSpec | Sequence[RuleSpec] | None = None, *, input_size=None, stages=None,
         position: str = "standard", gate: str = "se", squeeze: str = "avg",
         excite: str | None = None, min_channels: int = 1, divisor: int = 1,
         leaf_modules: Iterable[type] = (),
         autowrap_functions: Iterable[Callable] = ()) -> Plan:
    """The sites apply() would gate, with the rule behind each. Changes nothing.

    Args mean what they mean for :func:`apply`.
    """
    _check_model(model)
    ratio = _check_ratio(ratio)
    stages = _check_stages(stages)
    resolved = _placed(resolve_rules(rules), _check_position(position))
    spec = _gate_spec(gate, squeeze, excite, min_channels, divisor)
    options = _trace_options(model, leaf_modules, autowrap_functions)
    with _tracing(model):
        return _make_plan(model, ratio, resolved, input_size, options, stages, spec)[0]


def _check_init(init) -> str:
    if init not in ("paper", "identity"):
        raise InvalidArgumentError(f"init must be 'paper' (gates start as new layers, as in the "
                                   f"paper) or 'identity' (the model's outputs stay exactly as "
                                   f"they were); got {init!r}")
    return init


def held_blocks(p: Plan) -> list[Skipped]:
    """The blocks a plan left out because they hold a gate already (apply() then changes
    nothing and warns, rather than refusing the model)."""
    return [s for s in p.skipped if s.reason in ("already gated", HOLDS_A_GATE)]


def _no_sites_error(model: nn.Module, p: Plan, options: TraceOptions) -> NoSitesError:
    error = _no_sites(model, p)
    wrapped = options.wrapped_ids()
    drawing = sorted({type(m).__name__ for m in model.modules()
                      if random_draws(module_code(m, wrapped))})
    if drawing:  # a block that skips itself at random may have been skipped by the trace
        error = NoSitesError(
            f"{error} Note: {', '.join(drawing)} draw(s) Python's or NumPy's random numbers in "
            "the forward or a function it calls, which the trace ran once: a block that skips "
            "its branch at random may have been traced skipping it. Such a block cannot be "
            "gated (its gated forward would keep one draw); draw with a layer of its own, as "
            "timm's DropPath.")
    scripted = _scripted_parts(model)
    if scripted:
        error = NoSitesError(f"{error} Note: {scripted}")
    return error


def _no_sites(model: nn.Module, p: Plan) -> NoSitesError:
    name = type(model).__name__
    volumes = sum(1 for s in p.skipped if s.reason == A_VOLUME)
    if volumes and all(NOT_A_FEATURE_MAP in s.reason for s in p.skipped):
        return NoSitesError(
            f"{name} has no residual or inception-style block of 2-D feature maps: {volumes} of "
            f"its sums or concatenations are of 5-D tensors, as a 3-D convolutional network's "
            "(video or volumes, (N, C, T, H, W)). se-inject gates 2-D CNNs: its gates, rules "
            "and costs are for (N, C, H, W) maps.")
    layers = {type(m) for m in model.modules()}
    if p.skipped and all(NOT_A_FEATURE_MAP in s.reason for s in p.skipped) and \
            any(issubclass(c, nn.Conv1d) for c in layers) and \
            not any(issubclass(c, nn.Conv2d) for c in layers):
        return NoSitesError(
            f"{name} has no residual or inception-style block of 2-D feature maps: its "
            f"convolutions are 1-D (nn.Conv1d: audio or sequences, (N, C, L)), and none of its "
            f"{len(p.skipped)} sums or concatenations is of (N, C, H, W) maps. se-inject gates "
            "2-D CNNs: its gates, rules and costs are for (N, C, H, W) maps.")
    unexamined = _unexamined_note(p)
    if unexamined and all(NOT_A_FEATURE_MAP in s.reason for s in p.skipped):
        looked = [_MERGE_WORDS[k] for k in MERGES if k not in dict(p.unexamined)]
        others = f" ({len(p.skipped)} of other tensors)" if p.skipped else ""
        return NoSitesError(
            f"no block of {name} matched the rules passed: they look at {looked[0][0]} only, "
            f"and its traced graph holds no {looked[0][2]} of 4-D feature maps{others}."
            f"{unexamined}")
    if all(NOT_A_FEATURE_MAP in s.reason for s in p.skipped):
        n = len(p.skipped)
        sums = f" ({n} {'sum or concatenation' if n == 1 else 'sums or concatenations'} of " \
            "other tensors)" if n else ""
        mixed = sum(1 for s in p.skipped if s.reason == OPERAND_NOT_A_FEATURE_MAP)
        if mixed:  # a merge of maps, one of them made by a reshape: its layout is not known
            sums += (f". {'It joins' if n == 1 else f'{mixed} of them join'} a feature map "
                     "with a 4-D tensor made by a reshape se-inject cannot follow (tokens "
                     "viewed as a map without their channels moved back in front, or at another "
                     "size), in which it cannot tell which dimension holds the channels")
        return NoSitesError(
            f"{name} has no residual or inception-style block: the traced graph holds no add or "
            f"channel concatenation of 4-D convolutional feature maps{sums}. se-inject gates CNN "
            "blocks; transformers and MLPs have none. If its blocks hide inside a module marked "
            "as a leaf, or need a rule of your own, see README.md, 'Rule files'.")
    reads = sum(1 for s in p.skipped if s.reason == _READS_A_VALUE)
    if reads and all(s.reason == _READS_A_VALUE or NOT_A_FEATURE_MAP in s.reason
                     for s in p.skipped):
        return NoSitesError(
            f"{name} has {reads} block(s) the rules match, but the forward that holds each of "
            f"them reads a traced value as a Python number (`if x.shape[1] != 3: raise ...`, "
            "`int(x.shape[-1])`), which a forward generated from a trace cannot do for every "
            "input size. Write such a check as an assert (assert x.shape[1] == 3, '...') or "
            "torch._assert(x.shape[1] == 3, '...'), which the trace records as an op and the "
            "gated forward runs, or move the code that reads the size into a layer of its "
            "own; nothing was changed.")
    reasons = Counter(f"{s.rule}: {s.reason}" for s in p.skipped)
    listed = "; ".join(f"{n} × {r}" for r, n in reasons.most_common(5))
    return NoSitesError(f"no block of {name} matched the rules ({len(p.skipped)} merges looked "
                        f"at: {listed}). Check the rules you passed, or write one that fits "
                        f"(README.md, 'Rule files').{unexamined}")


_MERGE_WORDS = {"add": ("sums", "residual", "sum"),
                "cat": ("channel concatenations", "inception", "channel concatenation")}


def _unexamined_note(p: Plan) -> str:
    """What a plan's merges that no rule passed looks at are, and which rule would."""
    if not p.unexamined:
        return ""
    held = " and ".join(f"{n} {_MERGE_WORDS[k][0]}" for k, n in p.unexamined)
    rules = " and ".join(_MERGE_WORDS[k][1] for k, _ in p.unexamined)
    return (f" It holds {held} of 4-D feature maps, which no rule passed looks at: the "
            f"{rules} rule looks at {'them' if len(p.unexamined) == 1 else 'each'}; pass it "
            "too, or leave rules out for the default rules, residual and inception.")


@checks_arguments
def apply(model: nn.Module, ratio: int | dict = 16,
          rules: RuleSpec | Sequence[RuleSpec] | None = None, *, input_size=None, stages=None,
          init: str = "paper", position: str = "standard", gate: str = "se",
          squeeze: str = "avg", excite: str | None = None, min_channels: int = 1,
          divisor: int = 1, fused: bool = False, leaf_modules: Iterable[type] = (),
          autowrap_functions: Iterable[Callable] = ()) -> nn.Module:
    """Insert SE gates into ``model`` in place and return it (the same object).

    Args:
        model: any nn.Module that torch.fx can trace (timm, torchvision, your own).
        ratio: the paper's reduction ratio r: each gate is C -> C//r -> C; or one per stage,
            ``{stage: r}``, which also names the stages to gate.
        rules: built-in rule names and/or paths to rule files, tried in order
            (default: ``("residual", "inception")``).
        input_size: (C, H, W) used for shape propagation (default: the timm config's, else
            (3, 224, 224), or (3, 299, 299) for torchvision's Inception-v3); a list of them for
            a model with several inputs, ``()`` for one that is a number per sample (a
            diffusion U-Net's timestep); for an input that is a dict or list of tensors, a dict
            or list of their sizes (``{"rgb": (3, 224, 224), "depth": (1, 224, 224)}``;
            ``[[(3, 224, 224), (1, 224, 224)]]``).
        stages: gate only these resolution stages (paper Table 13): stage k holds tensors at
            1/2**k of the input's height, so ResNet-50's are 2, 3, 4, 5 (conv2_x..conv5_x);
            or "all-but-last". Default: every stage.
        init: "paper": each gate starts as a new layer would (PyTorch's default initialisation),
            so outputs change; "identity": the gated model computes exactly what the model did
            and every gate can still learn (README.md, "Function-preserving gates").
        position: where a residual block's gate goes (paper Table 14): "standard" (each
            rule's own place: the residual branch, before the sum), "pre" (in front of the
            residual branch), "post" (after the sum and its activation), "identity" (on the
            shortcut). Concatenation blocks keep their rule's place.
        gate: "se" (the paper's gate), "eca" (ECA) or "ese" (effective SE).
        squeeze: "avg" (the paper's) or "max" (Table 11).
        excite: "sigmoid", "hard_sigmoid" or "tanh" (Table 12); default sigmoid (hard_sigmoid
            for "ese").
        min_channels, divisor: the bottleneck width: C // r at least ``min_channels``; with
            ``divisor > 1``, C / r rounded to a multiple of it as timm's ``make_divisible``.
        fused: compile the gated model in place (``se_inject.fuse``): each gate's squeeze,
            excitation and scale run fused with the norm before and the sum and activation
            after them.
        leaf_modules: extra module classes fx should call without tracing into (or their
            names, ``"InceptionB"`` or qualified: classes of the model's modules).
        autowrap_functions: extra functions fx should record as single calls.

    Raises:
        SEInjectError: for every refusal; the model is then unchanged.
    """
    scripted = _check_model(model)
    if not isinstance(fused, bool):
        raise InvalidArgumentError(f"fused must be True or False, not {fused!r}")
    ratio = _check_ratio(ratio)
    stages = _check_stages(stages)
    init = _check_init(init)
    spec = _gate_spec(gate, squeeze, excite, min_channels, divisor)
    if init == "identity":
        check_identity(spec)
    options = _trace_options(model, leaf_modules, autowrap_functions)
    resolved = _placed(resolve_rules(rules), _check_position(position))
    with _tracing(model):  # the model's trace and every block's
        p, blocks, (graph, gated) = _make_plan(model, ratio, resolved, input_size, options,
                                               stages, spec)
        if not p.sites:
            held = held_blocks(p)
            if held:
                warn(f"every block of {type(model).__name__} that the rules match "
                     f"already holds a gate ({len(held)} blocks); apply() changed "
                     "nothing. A rule with 'existing_gate: allow' gates blocks that "
                     "hold a gate of their own (README.md, 'Rule files').")
                return model
            raise _no_sites_error(model, p, options)
        compensations = []
        if init == "identity":
            compensations = plan_compensations(
                graph, model, [(s.gate, gated[s.gate].gated, gated[s.gate].operand is not None)
                               for s in p.sites])
        with _tensor_mode(model):
            prepared = prepare(model, p.sites, spec, options, blocks)
    with _tensor_mode(model):
        watch = bool(compensations)
        for pr in prepared:
            for g in pr.new_gates.values():
                if init == "identity":
                    g.start_as_identity()
                watch |= mark_uninitialised(g, init)  # made on the meta device: no values yet
        commit(prepared)
        for comp in compensations:  # nothing above failed: scale the producers, note it
            scale(model, comp.parameters, FACTOR)
            gate = model.get_submodule(comp.gate)
            gate.compensated = comp.parameters  # (names in ``model``, where the gate is
            gate.compensated_at = comp.gate       # ``compensated_at``)
        if watch:
            watch_plain_loads(model)
    record_step(model, ratio=ratio, rules=resolved, stages=stages,
                input_size=input_size, init=init, gates=[s.gate for s in p.sites],
                options=options, gate=spec)
    settings = fused_settings(model)
    if settings is not None or fused:  # code compiled before would run without the new gates
        fuse(model, **(settings or {}))  # (fuse() drops what was compiled before)
    own = sum(1 for s in p.sites if not s.block)
    if own:
        cls = type(model).__name__
        also = next((sorted(pr.methods) for pr in prepared if pr.owner is model), [])
        also = f" (its {', '.join(also)} as well, rewritten with its forward)" if also else ""
        warn(f"{own} gate(s) sit in the forward of the model itself ({cls}): calling "
             f"the model runs them{also}, and torch.compile and torch.export see them, "
             f"but torch.fx.symbolic_trace(model) reads {cls}.forward from the class "
             "and would not (trace nn.Sequential(model) instead), and other methods of "
             f"{cls} that hold those sites, called directly, run without them.")
    _warn_left(model, prepared)
    _warn_sequential(model, p.sites)
    said = _scripted_parts(model) if scripted else ""
    if said:
        warn(said)
    reading = [s.merge for s in p.skipped if s.reason == _READS_A_VALUE]
    if reading:
        warn(f"{len(reading)} block(s) of {type(model).__name__} kept without a gate "
             f"({', '.join(f'`{m}`' for m in reading[:3])}"
             f"{', ...' if len(reading) > 3 else ''}): the forward that holds the sum "
             "reads a traced value as a Python number (`if x.shape[-1] % 2:`), which a "
             "forward generated from a trace would keep at the input size for every "
             "size. se_inject.plan(model).skipped lists them.")
    return model


def _warn_sequential(model: nn.Module, sites: Sequence[Site]) -> None:
    """One warning naming the gates that became layers of an nn.Sequential subclass with a
    forward of its own (``x + super().forward(x)``): the block's module, so the gate's owner."""
    owned = [(s.block, s.gate) for s in sites
             if s.block and isinstance(model.get_submodule(s.block), nn.Sequential)]
    if not owned:
        return
    block, more = owned[0][0], len(owned) - 1
    gate = [g for b, g in owned if b == block][-1]
    cls = type(model.get_submodule(block)).__name__
    warn(f"{len(owned)} gate(s) are layers of an nn.Sequential with a forward of its own "
         f"({cls} `{block}`{f' and {more} more' if more else ''}): the block's rewritten forward "
         "calls each gate once where the plan puts it, but len(), indexing and iteration of "
         f"such a block now count its gate (`{block}[-1]` is `{gate}`). se_inject.remove() "
         "takes them out again.")


def _scripted_parts(model: nn.Module) -> str:
    """What to say of the TorchScript parts of an eager model in whose code two tensors are
    added or concatenated: fx calls a scripted module whole (its compiled ``forward``), so a
    block inside one gets no gate. "" where there are none."""
    scripted, inside = [], ()
    for name, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule) and not name.startswith(inside):
            inside += (f"{name}.",)  # (its own parts are scripted with it)
            graph = getattr(m, "inlined_graph", None)
            if graph is not None and _scripted_merge(graph.nodes()):
                scripted.append(f"`{name}`")
    if not scripted:
        return ""
    return (f"{len(scripted)} part(s) of {type(model).__name__} are TorchScript modules that "
            f"add or concatenate tensors ({', '.join(scripted[:3])}"
            f"{', ...' if len(scripted) > 3 else ''}): fx calls a scripted module whole, so "
            "no gate goes inside them. To gate the blocks they hold, build the model with the "
            "eager modules they were scripted from, then apply().")


def _scripted_merge(nodes) -> bool:
    """Whether TorchScript graph nodes (and the blocks of their ifs and loops) add two
    tensors or concatenate two or more."""
    for n in nodes:
        if any(_scripted_merge(b.nodes()) for b in n.blocks()):
            return True
        kind, ins = n.kind(), list(n.inputs())
        if kind in ("aten::add", "aten::add_") and len(ins) >= 2 and \
                all(i.type().kind() == "TensorType" for i in ins[:2]):
            return True
        if kind == "aten::cat" and ins and ins[0].node().kind() == "prim::ListConstruct" and \
                len(list(ins[0].node().inputs())) >= 2:
            return True
    return False


def _warn_left(model: nn.Module, prepared) -> None:
    """One warning naming the forward_* methods of gated blocks left as they are, and why."""
    left: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    names = None
    for pr in prepared:
        for name, why in sorted(pr.left.items()):
            if names is None:
                names = {id(m): n or "(model)" for n, m in model.named_modules()}
            left[(type(pr.owner).__name__, name, why)].append(f"`{names[id(pr.owner)]}`")
    if not left:
        return
    warn(
        f"{sum(map(len, left.values()))} method(s) of gated blocks were left as they are, and "
        "called directly they compute without the gates: " + "; ".join(
            f"{cls}.{name} of {', '.join(blocks[:3])}"
            f"{f' and {len(blocks) - 3} more' if len(blocks) > 3 else ''}: {why}"
            for (cls, name, why), blocks in left.items()) + ". A block's forward_* methods are "
        "rewritten with its forward where they compute what it computes up to every gated "
        "site (README.md, \"Other forward methods\").")


def _compensated(model: nn.Module) -> list[str]:
    """The names in ``model`` of the tensors that its identity-initialised gates had doubled.
    A gate keeps them as they are named in the module apply() was given, with its own name
    there (``compensated_at``): that module may be ``model``, hold it, or be one of its
    parts."""
    out = []
    for here, g in model.named_modules():
        names = getattr(g, "compensated", None) if isinstance(g, ChannelGate) else None
        if not names:
            continue
        there = getattr(g, "compensated_at", here)
        if here == there or here.endswith("." + there):  # apply() was given `model` or a part
            out += [here[:len(here) - len(there)] + n for n in names]
            continue
        above = there[:len(there) - len(here)] if there.endswith("." + here) else None
        outside = next((n for n in names if above is None or not n.startswith(above)), None)
        if outside is not None:
            raise InvalidArgumentError(
                f"remove() on {type(model).__name__}: its gate `{here}` starts as the identity "
                f"through a doubled `{outside}` of the module apply() gated, which lies outside "
                "it; remove the gates from that module instead (nothing was changed)")
        out += [n[len(above):] for n in names]
    return out


@checks_arguments
def remove(model: nn.Module) -> nn.Module:
    """Take every gate out of ``model`` in place: its keys and outputs are the original's again
    (layers scaled for identity-initialised gates are scaled back)."""
    check_module(model, "remove")
    compensated = _compensated(model)
    remove_gates(model)
    with _tensor_mode(model):
        scale(model, compensated, 1 / FACTOR)
    unwatch_plain_loads(model)
    forget_recipe(model)
    for m in model.modules():  # compiled code of the gated model (or of a part of it, fused
        unfuse(m)              # on its own) must not outlive its gates
    return model
