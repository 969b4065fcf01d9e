"""Shape propagation on meta tensors: analysis computes nothing and copies no weights.

Modules whose output shape follows from their input by a known rule (norms, activations,
convolutions, linear layers, timm's norm+activation layers) are not run at all; every other
leaf module runs with its parameters and buffers swapped for meta tensors of the same shape for
the length of the call (restored in ``finally``). Functions likewise (``_shortcut``): norms,
activations, elementwise arithmetic, SE's squeezes, concatenations and a few others are answered
from their inputs where the answer (shape, strides, dtype) is the meta kernel's, and run
otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .errors import TraceError

__all__ = ["propagate_shapes", "VALUE", "input_leaves", "make_inputs", "forward_arguments",
           "is_shape"]

VALUE = "se_inject.value"  # node.meta key: the meta tensor (or structure of them) a node produced


def is_shape(spec) -> bool:
    """A shape (a tuple or list of integers, torch.Size among them), not a list, tuple or dict
    of specs."""
    return isinstance(spec, (tuple, list)) and bool(spec) and all(isinstance(e, int) for e in spec)


def input_leaves(spec) -> list[torch.Size]:
    """The shapes in one input's spec (api._input_shapes): the shape of a tensor input, or
    those in a list, tuple or dict of them (nested), in order."""
    if is_shape(spec):
        return [torch.Size(spec)]
    values = spec.values() if isinstance(spec, dict) else spec
    return [leaf for v in values for leaf in input_leaves(v)]


def forward_arguments(model: nn.Module, inputs: Sequence) -> tuple[tuple, dict]:
    """``inputs`` (one per input, in the order of the forward's parameters, as fx makes its
    placeholders) as the arguments to call ``model`` with: keyword-only parameters by name,
    a ``**kwargs`` parameter's input (a dict) spread."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # no signature to read: every input by position
        return tuple(inputs), {}
    args, kwargs, rest = [], {}, list(inputs)
    for p in params:
        if not rest:
            break
        if p.kind is p.VAR_POSITIONAL:
            args += rest
            rest = []
        elif p.kind is p.VAR_KEYWORD:
            kwargs.update(rest.pop(0))
        elif p.kind is p.KEYWORD_ONLY:
            kwargs[p.name] = rest.pop(0)
        else:
            args.append(rest.pop(0))
    return tuple(args) + tuple(rest), kwargs


def make_inputs(spec, make: Callable[[torch.Size], Any]) -> Any:
    """One input built from its spec: ``make(shape)`` for each shape, in the spec's lists,
    tuples and dicts."""
    if is_shape(spec):
        return make(torch.Size(spec))
    if isinstance(spec, dict):
        return {k: make_inputs(v, make) for k, v in spec.items()}
    return type(spec)(make_inputs(v, make) for v in spec)


def _new(x: torch.Tensor, shape) -> torch.Tensor:
    """A dense meta tensor of ``x``'s dtype (``x.new_empty`` on meta goes through a Python
    decomposition, three times slower)."""
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _same(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x  # a meta tensor only describes a shape: the input's describes the output too


def _conv(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor | None:
    spatial = x.shape[2:]
    if x.dim() != 2 + len(m.kernel_size):
        return None  # unbatched input: let the module itself decide
    if x.shape[1] != m.in_channels:  # (meta's own message: "Invalid channel dimensions")
        raise RuntimeError(f"{type(m).__name__} takes {m.in_channels} channels, and would get "
                           f"{x.shape[1]}")
    if m.padding == "same":
        out = list(spatial)
    else:
        pad = (0,) * len(spatial) if m.padding == "valid" else m.padding
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
               for s, p, d, k, st in zip(spatial, pad, m.dilation, m.kernel_size, m.stride)]
    if min(out) < 1:
        return None  # an input smaller than the kernel: the module's own error says so
    return _new(x, (x.shape[0], m.out_channels, *out))


def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    if x.dim() == 0 or x.shape[-1] != m.in_features:
        return None
    return _new(x, (*x.shape[:-1], m.out_features))


def _recurrent(m: nn.RNNBase, x: torch.Tensor) -> tuple | None:
    """nn.RNN, nn.GRU, nn.LSTM on a batched sequence: the output and the last hidden (and cell)
    states. On meta tensors their kernels step through the sequence in Python: an LSTM over
    the 50,176 pixels of a 224 x 224 map took over four minutes."""
    if x.dim() != 3 or x.shape[2] != m.input_size:
        return None  # unbatched, or a size the module itself should refuse
    n, steps = (x.shape[0], x.shape[1]) if m.batch_first else (x.shape[1], x.shape[0])
    d = 2 if m.bidirectional else 1
    out_size = m.proj_size if getattr(m, "proj_size", 0) > 0 else m.hidden_size
    out = _new(x, (steps, n, d * out_size))  # batch-first: the same steps-first tensor, viewed
    out = out.transpose(0, 1) if m.batch_first else out
    h = _new(x, (d * m.num_layers, n, out_size))
    if isinstance(m, nn.LSTM):
        return out, (h, _new(x, (d * m.num_layers, n, m.hidden_size)))
    return out, h


# Module class -> output from input, without running the module, for classes whose stock
# forward is known (norms and activations keep the shape; convolutions follow the formula).
# Looked up along the class's MRO; a subclass with its own forward is run instead.
_SHAPE_RULES: dict[type, Callable] = {
    **dict.fromkeys((
        nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
        nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
        nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
        nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.AlphaDropout,
    ), _same),
    nn.Conv1d: _conv, nn.Conv2d: _conv, nn.Conv3d: _conv,
    nn.Linear: _linear,
    nn.RNN: _recurrent, nn.GRU: _recurrent, nn.LSTM: _recurrent,
}


def _norm_act(m: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """timm's BatchNormAct2d and GroupNormAct: a norm of a 4-D tensor, then the layer's own
    dropout and activation modules; like the input when those two have the ``_same`` rule
    (stock layers: a custom activation is run instead)."""
    channels = getattr(m, "num_features", getattr(m, "num_channels", None))
    if x.dim() != 4 or x.shape[1] != channels:
        return None  # let the module itself refuse it
    for sub in (getattr(m, "drop", None), getattr(m, "act", None)):
        if not isinstance(sub, nn.Module) or _shape_rule(sub) is not _same:
            return None
    return _empty_as(x)


# timm.layers.activations' modules whose forward is an elementwise function of the input
_TIMM_ACTIVATIONS = ("GELU", "GELUTanh", "QuickGELU", "Sigmoid", "Tanh", "Swish", "Mish",
                     "HardSigmoid", "HardSwish", "HardMish")


@functools.cache
def _foreign_rules() -> dict[type, Callable]:
    """Rules for forwards defined outside torch.nn (timm's, where timm is installed): its
    norm+activation layers, and its own activation modules (elementwise, as torch's: timm's
    "gelu" is one of them), which run on meta tensors otherwise, some 50 us each."""
    try:
        from timm.layers import activations, norm_act
    except ImportError:
        return {}
    rules = {getattr(norm_act, n, None): _norm_act for n in ("BatchNormAct2d", "GroupNormAct")}
    rules.update({getattr(activations, n, None): _same for n in _TIMM_ACTIVATIONS})
    return {c: r for c, r in rules.items() if isinstance(c, type) and "forward" in c.__dict__}


def _shape_rule(m: nn.Module) -> Callable | None:
    """The rule for ``m``'s class, if the forward it runs is the one the rule describes."""
    if "forward" in m.__dict__ or m._forward_hooks or m._forward_pre_hooks:
        return None  # a forward bound on the instance, or hooks that may change the output
    owner_of_forward = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
    if owner_of_forward is nn.Sequential:
        return _sequential  # a leaf Sequential (torchvision's Conv2dNormActivation): its layers
    foreign = _foreign_rules().get(owner_of_forward)
    if foreign is not None:
        return foreign
    if not owner_of_forward.__module__.startswith("torch.nn."):
        return None  # a forward of its own: run it
    # the stock forward it runs (ReLU6 runs Hardtanh's) is the one a rule describes
    return next((_SHAPE_RULES[c] for c in owner_of_forward.__mro__ if c in _SHAPE_RULES), None)


def _sequential(m: nn.Sequential, x: torch.Tensor) -> torch.Tensor | None:
    for layer in m:
        rule = _shape_rule(layer)
        if rule is None:
            return None  # a layer without a rule: run the whole Sequential instead
        x = rule(layer, x)
        if x is None:
            return None
    return x


T = torch.Tensor
# Functions whose output has their first argument's shape, dtype and layout (norms,
# activations, dropout): their meta kernels run as Python decompositions, slow enough to
# dominate the analysis of a small model, so the input describes the output.
_LIKE_INPUT = {
    F.batch_norm, F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm,
    F.relu, torch.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.hardtanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.sigmoid, torch.sigmoid, F.tanh,
    torch.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.softmax, T.softmax, torch.softmax, T.relu, T.sigmoid, T.tanh, T.clone, T.__neg__, T.neg,
}
# The same, in place: the output is the input.
_IN_PLACE = {F.relu_, torch.relu_, F.hardtanh_, F.leaky_relu_, F.elu_, torch.sigmoid_,
             T.relu_, T.sigmoid_, T.tanh_}
# Elementwise binary ops: with two tensors of one shape, dtype and layout, or a floating-point
# tensor and a Python number, the output is like the first tensor; so it is, in place, when
# the second broadcasts to the first (see _shortcut for out of place). (True: in place.)
_BINARY = {**dict.fromkeys((T.__add__, T.__radd__, T.__mul__, T.__rmul__, T.__sub__,
                            T.__truediv__, T.add, T.mul, T.sub, T.div, torch.add, torch.mul,
                            torch.sub), False),
           **dict.fromkeys((T.__iadd__, T.__imul__, T.__isub__, T.add_, T.mul_, T.sub_), True)}


def _like(x: torch.Tensor, in_place: bool) -> torch.Tensor:
    return x if in_place else _empty_as(x)


def _empty_strided_as(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _empty_as(x: torch.Tensor) -> torch.Tensor:
    """A meta tensor of ``x``'s shape, strides and dtype (``torch.empty_like`` on meta runs a
    Python decomposition some 30 times slower). Like ``empty_like``, strides are kept only for
    a dense layout; anything else (an expanded view) gets contiguous ones."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return _empty_strided_as(x)
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _interpolate(x: torch.Tensor, size=None, scale_factor=None, *rest, **kwargs):
    """F.interpolate's output for a contiguous input (its meta kernel takes milliseconds)."""
    n = x.dim() - 2
    if n < 1 or not x.is_contiguous() or (size is None) == (scale_factor is None):
        return None
    if size is not None:
        out = [size] * n if isinstance(size, int) else list(size)
    else:
        scales = [scale_factor] * n if isinstance(scale_factor, (int, float)) else list(scale_factor)
        if len(scales) != n:
            return None
        out = [math.floor(float(s) * float(f)) for s, f in zip(x.shape[2:], scales)]
    if len(out) != n or not all(isinstance(v, int) and v > 0 for v in out):
        return None
    return _new(x, (*x.shape[:2], *out))


def _spatial_mean(x: torch.Tensor, dim=None, keepdim: bool = False, *more, **rest):
    """``x.mean((2, 3), keepdim=...)`` of a floating-point NCHW tensor (SE's squeeze, timm's
    spelling): contiguous, as the mean's meta kernel (a Python decomposition) lays it out."""
    if more or rest or x.dim() != 4 or not x.is_floating_point() or not isinstance(keepdim, bool) \
            or not isinstance(dim, (tuple, list)) or len(dim) != 2 \
            or not all(isinstance(d, int) and not isinstance(d, bool) for d in dim) \
            or sorted(d % 4 for d in dim) != [2, 3]:
        return None
    return torch.empty((*x.shape[:2], 1, 1) if keepdim else x.shape[:2], dtype=x.dtype,
                       device="meta")


# Reductions over given dimensions, with the names their parameters after the input take.
_REDUCTIONS = {T.mean: ("dim", "keepdim"), torch.mean: ("dim", "keepdim"),
               T.sum: ("dim", "keepdim"), torch.sum: ("dim", "keepdim"),
               T.amax: ("dim", "keepdim"), torch.amax: ("dim", "keepdim"),
               T.norm: ("p", "dim", "keepdim"), torch.norm: ("p", "dim", "keepdim"),
               torch.linalg.vector_norm: ("ord", "dim", "keepdim")}


def _contiguous_strides(shape) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _reduction(func, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | None:
    """A mean, sum, max or vector norm of a floating-point tensor over dimensions of more than
    one element each (attention's and LayerNorm-style code): contiguous whatever the input's
    layout, as the kernels lay it out. A reduction over a dimension of size 1 (a norm's output
    then keeps the input's strides), a dtype or an output argument are left to the kernel."""
    names = _REDUCTIONS[func]
    if "dtype" in kwargs and kwargs["dtype"] is None:  # Tensor.norm passes its default on
        kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    if len(args) > len(names) or any(k not in names for k in kwargs) \
            or any(k in kwargs for k in names[:len(args)]) or not x.is_floating_point():
        return None
    bound = {**dict(zip(names, args)), **kwargs}
    order = bound.get("p", bound.get("ord", 2))
    if not (isinstance(order, str) and order == "fro" and "p" in names) and \
            (isinstance(order, bool) or not isinstance(order, (int, float))):
        return None
    dim, keepdim = bound.get("dim"), bound.get("keepdim", False)
    dims = (dim,) if isinstance(dim, int) else dim
    rank = x.dim()
    if not isinstance(keepdim, bool) or not isinstance(dims, (tuple, list)) or not dims \
            or not all(isinstance(d, int) and not isinstance(d, bool) and -rank <= d < rank
                       for d in dims):
        return None
    reduced = {d % rank for d in dims}
    if len(reduced) != len(dims) or any(x.shape[d] < 2 for d in reduced):
        return None
    shape = [1 if d in reduced else n for d, n in enumerate(x.shape)
             if keepdim or d not in reduced]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _dense_in_order(x: torch.Tensor) -> tuple[int, ...] | None:
    """The strides of a dense tensor of ``x``'s shape whose dimensions lie in memory in the
    order of ``x``'s strides: what an elementwise kernel gives where ``x`` is its first operand
    and orders every pair of dimensions (every size over 1, every stride distinct and not 0),
    dense or not (a slice of attention's interleaved q, k, v). None otherwise."""
    strides = x.stride()
    if any(n < 2 for n in x.shape) or 0 in strides or len(set(strides)) < len(strides):
        return None
    out, step = [0] * x.dim(), 1
    for d in sorted(range(x.dim()), key=strides.__getitem__):
        out[d] = step
        step *= x.shape[d]
    return tuple(out)


def _normalize(x: torch.Tensor, p=2.0, dim=1, eps=1e-12, out=None, *more, **rest
               ) -> torch.Tensor | None:
    """F.normalize of a floating-point tensor, ``x / norm(x).expand_as(x)``: contiguous for a
    contiguous ``x``; where ``x`` orders every pair of dimensions by itself, dense in its order
    (``_dense_in_order``); other layouts are left to the kernel."""
    rank = x.dim()
    if more or rest or out is not None or not x.is_floating_point() or rank == 0 \
            or isinstance(p, bool) or not isinstance(p, (int, float)) \
            or not isinstance(dim, int) or isinstance(dim, bool) or not -rank <= dim < rank:
        return None
    if x.stride() == _contiguous_strides(x.shape):
        return _empty_strided_as(x)
    strides = _dense_in_order(x)
    if strides is None:
        return None
    return torch.empty_strided(x.shape, strides, dtype=x.dtype, device="meta")


def _matmul(a: torch.Tensor, b=None, *more, **rest) -> torch.Tensor | None:
    """A product of two floating-point tensors of rank 2 or more and one dtype (attention):
    contiguous, with the batch dimensions broadcast, as the kernels lay it out."""
    if more or rest or not isinstance(b, torch.Tensor) or b.device.type != "meta" \
            or a.dim() < 2 or b.dim() < 2 or a.dtype != b.dtype or not a.is_floating_point() \
            or a.shape[-1] != b.shape[-2]:
        return None
    try:
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        return None  # the kernel's own message
    return torch.empty((*batch, a.shape[-2], b.shape[-1]), dtype=a.dtype, device="meta")


def _adaptive_avg_pool2d(x: torch.Tensor, output_size=None, *more, **rest):
    """F.adaptive_avg_pool2d of a floating-point NCHW tensor (torchvision's SE squeezes with
    it): contiguous, or channels-last for a channels-last input, as its kernels lay it out;
    other layouts are left to the kernel."""
    if more or rest or x.dim() != 4 or not x.is_floating_point():
        return None
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    if not isinstance(size, (tuple, list)) or len(size) != 2:
        return None
    size = [x.shape[2 + i] if v is None else v for i, v in enumerate(size)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size):
        return None
    if x.is_contiguous():
        layout = torch.contiguous_format
    elif x.is_contiguous(memory_format=torch.channels_last) and min(x.shape) > 1:
        layout = torch.channels_last  # (with a size of 1 the kernel may read it as contiguous)
    else:
        return None
    return torch.empty((*x.shape[:2], *size), dtype=x.dtype, device="meta", memory_format=layout)


def _cat(tensors=None, dim=0, *more, **rest):
    """torch.cat of meta tensors of one dtype and rank (inception blocks, CSP and shuffle
    merges): contiguous, or channels-last when every input is, as its meta kernel lays it out.
    Ambiguous layouts (a 4-D input with a size of 1) and 5-D inputs are left to the kernel."""
    if more or rest or not isinstance(tensors, (list, tuple)) or not tensors \
            or not all(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in tensors):
        return None
    first = tensors[0]
    rank = first.dim()
    if rank == 0 or rank == 5 or not isinstance(dim, int) or isinstance(dim, bool) \
            or not -rank <= dim < rank:
        return None
    dim %= rank
    kept = first.shape[:dim] + first.shape[dim + 1:]
    if any(t.dim() != rank or t.dtype != first.dtype or t.shape[:dim] + t.shape[dim + 1:] != kept
           for t in tensors):
        return None
    layout = torch.contiguous_format
    if rank == 4:
        if any(min(t.shape) < 2 for t in tensors):
            return None
        if not any(t.is_contiguous() for t in tensors):
            if not all(t.is_contiguous(memory_format=torch.channels_last) for t in tensors):
                return None
            layout = torch.channels_last
    shape = list(first.shape)
    shape[dim] = sum(t.shape[dim] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta", memory_format=layout)


_DEVICE_MOVES = {T.to, T.cpu, T.cuda}
_CATS = {torch.cat, torch.concat, torch.concatenate}
_MATMULS = {T.matmul, torch.matmul, T.__matmul__}
_SPATIAL = {T.mean: _spatial_mean, torch.mean: _spatial_mean,
            F.adaptive_avg_pool2d: _adaptive_avg_pool2d}


def _stay_on_meta(func, x: torch.Tensor, rest: tuple, kwargs: dict) -> torch.Tensor:
    """A move to another device leaves a meta tensor where it is (a meta tensor cannot be copied
    out, and a device read while tracing is recorded as a constant); a dtype change applies."""
    if func is not T.to:
        return x
    dtype = kwargs.get("dtype")
    for a in rest:
        if isinstance(a, torch.dtype):
            dtype = a
        elif isinstance(a, torch.Tensor):
            dtype = a.dtype
    return x if dtype is None or dtype == x.dtype else x.to(dtype)


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x`` covers its storage without gaps or overlaps, in some order of dimensions
    (a contiguous, channels-last or permuted tensor, not an expanded or sliced one)."""
    expected = 1
    for size, stride in sorted(zip(x.shape, x.stride()), key=lambda d: d[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _broadcasts_into(small: torch.Size, big: torch.Size) -> bool:
    """Whether a tensor of shape ``small`` broadcasts to ``big`` without changing it."""
    return len(small) <= len(big) and all(a == 1 or a == b for a, b in
                                          zip(reversed(small), reversed(big)))


def _orders_alike(small: torch.Tensor, big: torch.Tensor) -> bool:
    """Whether ``small``, broadcast to ``big``'s shape, leaves the order of dimensions in an
    elementwise output to ``big``. The kernel orders two dimensions by the first operand whose
    strides differ there, skipping broadcast ones (stride 0); so every pair of ``small``'s own
    dimensions (size over 1, stride not 0) must have distinct strides ordered as ``big``'s."""
    offset = big.dim() - small.dim()
    own = [(s, big.stride(d + offset)) for d, (n, s) in
           enumerate(zip(small.shape, small.stride())) if n > 1 and s != 0]
    if len({s for s, _ in own}) < len(own):
        return False
    return sorted(own) == sorted(own, key=lambda p: p[1])


def _shortcut(func, args: tuple, kwargs: dict) -> torch.Tensor | None:
    if func in _CATS:
        return _cat(*args, **kwargs)
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.device.type != "meta":
        return None
    if func in _DEVICE_MOVES:
        return _stay_on_meta(func, x, args[1:], kwargs)
    if func in _LIKE_INPUT or func in _IN_PLACE:
        return _like(x, func in _IN_PLACE)
    if func is F.interpolate:
        return _interpolate(*args, **kwargs)
    spatial = _SPATIAL.get(func)
    if spatial is not None:
        out = spatial(*args, **kwargs)
        if out is not None:
            return out
    if func in _REDUCTIONS:
        return _reduction(func, *args, **kwargs)
    if func is F.normalize:
        return _normalize(*args, **kwargs)
    if func in _MATMULS:
        return _matmul(*args, **kwargs)
    if func is F.linear and len(args) >= 2 and not kwargs and x.dim() >= 1:
        w = args[1]
        if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == x.shape[-1]:
            return _new(x, (*x.shape[:-1], w.shape[0]))
    if func is F.scaled_dot_product_attention and len(args) >= 3:
        q, k, v = args[:3]  # (..., L, E) with values (..., S, Ev) -> (..., L, Ev)
        if all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (k, v)) \
                and q.dim() == v.dim() and k.shape[-1] == q.shape[-1]:
            return _new(q, (*torch.broadcast_shapes(q.shape[:-2], v.shape[:-2]),
                            q.shape[-2], v.shape[-1]))
    in_place = _BINARY.get(func)
    if in_place is None or len(args) != 2 or kwargs:
        return None
    y = args[1]
    if isinstance(y, torch.Tensor):
        if y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride():
            return _like(x, in_place)
        if y.dtype != x.dtype or y.device.type != "meta":
            return None
        if _broadcasts_into(y.shape, x.shape):
            if in_place:  # into a dense tensor (an expanded one is refused by the kernel)
                return x if _dense(x) else None
            # a layer scale or a gate (x * gamma): with a dense input whose every size is over
            # 1 (so no two strides are equal), its strides alone order the output's
            # dimensions, and the output is laid out as it is
            if all(n > 1 for n in x.shape) and _dense(x):
                return _empty_strided_as(x)
        if not in_place and _broadcasts_into(x.shape, y.shape) and all(n > 1 for n in y.shape) \
                and _dense(y) and _orders_alike(x, y):
            # the other way round (torchvision's SE: scale * input): the output is laid out as
            # the larger operand wherever the smaller one does not order dimensions otherwise
            return _empty_strided_as(y)
    elif isinstance(y, (int, float)) and not isinstance(y, bool) and x.is_floating_point():
        return _like(x, in_place)
    return None


class _ShapeMode(TorchFunctionMode):
    """Answers the ops in the tables above from their input's shape; runs every other op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = _shortcut(func, args, kwargs)
        return out if out is not None else func(*args, **kwargs)


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        return _empty_as(x)
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_to_meta(v) for v in x)
    return x


_ABSENT = object()



_SIZE_NAMES = {1: "(C, L)", 2: "(C, H, W)", 3: "(C, D, H, W)"}


def _rank_hint(submodules: dict, n: fx.Node, args: tuple) -> str:
    """What a convolution that failed on an input of the wrong rank takes: a video or audio
    model's first layer (Conv3d, Conv1d) meets apply's default image input this way."""
    layer = submodules.get(n.target) if n.op == "call_module" else None
    other = "If the model takes another size, pass it as input_size=(C, H, W); "
    if not isinstance(layer, nn.modules.conv._ConvNd) or not args or \
            not isinstance(args[0], torch.Tensor):
        return other
    dims = len(layer.kernel_size)
    if args[0].dim() == dims + 2 or dims not in _SIZE_NAMES:
        return other
    return (f"`{n.target}` is a {type(layer).__name__}, which takes a {dims + 2}-D input "
            f"(N, {_SIZE_NAMES[dims][1:]}, and was handed a {args[0].dim()}-D one: pass "
            f"input_size={_SIZE_NAMES[dims]}; ")


class _MetaInterpreter(fx.Interpreter):
    """Runs the graph on meta tensors. The shortcuts' mode is entered only around the graph's
    own ops and the modules that run: outside it, reading a tensor's shape or device costs a
    fraction of a microsecond, inside it some 7 (every read is dispatched to the mode), and the
    rules and bookkeeping here read them at every node."""

    def __init__(self, *args, inputs: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._inputs = inputs  # the input shapes, for errors
        self.extra_traceback = False  # the error already names the op; no "While executing"
        self._mode = _ShapeMode()
        from .trace import CONSTANTS, compiled_in_place  # (trace -> kinds -> shapes)
        self._compiled_in_place = compiled_in_place
        self._made = getattr(self.graph, CONSTANTS, None) or {}

    def placeholder(self, target, args, kwargs):
        if isinstance(target, str) and target.startswith("**"):  # forward(self, **batch): the
            return next(self.args_iter, {})  # input given for it is the dict (fx: a list)
        return super().placeholder(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if target is torch._assert and args and isinstance(args[0], torch.Tensor):
            return None  # a check of a tensor's values, which meta tensors have none of
        with self._mode:
            return target(*args, **kwargs)

    def call_method(self, target, args, kwargs):
        with self._mode:
            return super().call_method(target, args, kwargs)

    def run_node(self, n: fx.Node) -> Any:
        # fx's run_node also enters two context managers that record the node as the one
        # running, for tracers that run under an interpreter; nothing traces here, and they
        # cost as much as a shortcut op itself
        try:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            value = _to_meta(getattr(self, n.op)(n.target, args, kwargs))
        except TraceError:
            raise
        except Exception as exc:
            lazy = self.submodules.get(n.target) if n.op == "call_module" else None
            if isinstance(lazy, nn.modules.lazy.LazyModuleMixin) and \
                    lazy.has_uninitialized_params():
                raise TraceError(
                    f"`{n.target}` ({type(lazy).__name__}) has not made its weights yet: a lazy "
                    "layer makes them from the first input it sees. Run the model once on an "
                    "input of the size it takes (model(torch.randn(1, C, H, W))), then apply() "
                    "(nothing was changed).") from exc
            from .trace import _failing_hook, op_text
            hook = _failing_hook(self.module, exc)
            if hook is not None:
                named, code = hook
                raise TraceError(
                    f"shapes could not be propagated through {op_text(n)}: it "
                    f"failed in {named} ({code.co_name}, {code.co_filename}:"
                    f"{code.co_firstlineno}): {type(exc).__name__}: {exc}. apply() runs the "
                    "model's layers, and their hooks, on meta tensors, which have shapes but no "
                    "values. Remove the hook while gating (call remove() on the handle that "
                    "registering it returned, gate the model, then register it again), or have "
                    "it return at once when the tensor it is given is a meta tensor "
                    "(output.is_meta); nothing was changed.") from exc
            try:
                value = self.run_for_real(n, args, kwargs)
                if value is not NotImplemented:
                    value = _to_meta(value)  # (a quantized tensor has no meta twin)
            except Exception:
                value = _FAILED  # the same error, or one that says less than the op's own
            if value is not NotImplemented and value is not _FAILED:
                n.meta[VALUE] = value
                return value
            meta = (" The model's weights are on the meta device, so the op could not run on "
                    "tensors with values instead: gate the model once it has its weights, or "
                    "have the code that reads a value pass meta tensors by (x.is_meta)."
                    if value is NotImplemented else "")
            raise TraceError(
                f"shapes could not be propagated through {op_text(n)}: "
                f"{type(exc).__name__}: {exc}. The model ran on {self._inputs} (batch 2, then "
                f"input_size). {_rank_hint(self.submodules, n, args)}for a part of a model "
                "(model.layer2), the size the model hands it: "
                "se_inject.part_input_size(model, 'layer2')."
                f"{meta}") from exc
        n.meta[VALUE] = value
        return value

    def get_attr(self, target, args, kwargs):
        """A parameter, buffer or tensor attribute of one of the model's modules, looked up on
        that module (fx's own lookup walks the path one attribute at a time, each a module
        attribute miss: 28 µs for a parameter five modules deep, against 2)."""
        if target in self._made:  # a tensor the forward made while traced
            return _to_meta(self._made[target])
        owner, _, name = target.rpartition(".")
        module = self.submodules.get(owner)
        value = _ABSENT if module is None else getattr(module, name, _ABSENT)
        if value is _ABSENT:  # (a path through other objects, or fx's own error)
            value = super().get_attr(target, args, kwargs)
        return _to_meta(value)

    def _module(self, target) -> nn.Module:
        mod = self.submodules.get(target)
        return self.fetch_attr(target) if mod is None else mod  # (one registered twice)

    def call_module(self, target, args, kwargs):
        mod = self._module(target)
        rule = _shape_rule(mod)
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            out = rule(mod, args[0])
            if out is not None:
                return out
        return _run_swapped(mod, args, kwargs, _as_meta_like, self._mode,
                            self._compiled_in_place(mod))

    def run_for_real(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        """The node run on tensors with values, for an op that cannot run on meta tensors (a
        layer whose forward reads a value, ``x.abs().max().item()``): random inputs of the
        shapes it gets, on the model's device, the layer holding copies of its weights and
        buffers (so that nothing it updates is the model's), its output's shape kept.
        NotImplemented where the model's own tensors are on the meta device."""
        first = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        device = first.device if first is not None else torch.device("cpu")
        if device.type == "meta" or n.op not in ("call_module", "call_function", "call_method"):
            return NotImplemented
        mod = self._module(n.target) if n.op == "call_module" else None
        if mod is not None and any(t.device.type == "meta"
                                   for t in itertools.chain(mod.parameters(), mod.buffers())):
            return NotImplemented
        # the random numbers drawn here (inputs, a dropout) leave the caller's generators as
        # they were
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(0)
            args, kwargs = fx.node.map_aggregate((args, kwargs),
                                                 lambda v: _with_values(v, device))
            if mod is None:
                with torch.no_grad():
                    return getattr(self, n.op)(n.target, args, kwargs)
            return _run_swapped(mod, args, kwargs, _copy_of, contextlib.nullcontext(),
                                self._compiled_in_place(mod))


_FAILED = object()


def _run_swapped(mod: nn.Module, args: tuple, kwargs: dict, swap: Callable, mode,
                 compiled_in_place: bool) -> Any:
    """``mod`` called with each of its parameters and buffers replaced by ``swap`` of it
    (a meta tensor like it, or a copy), then put back."""
    saved = []
    try:
        for sub in mod.modules():
            for store in (sub._parameters, sub._buffers):
                for k, v in store.items():
                    if v is not None and v.device.type != "meta":
                        saved.append((store, k, v))
                        store[k] = swap(v)
        # a module compiled in place runs its Python: compiling it for meta tensors
        # would cost a compilation (and one of Dynamo's versions) for a shape
        call = mod._call_impl if compiled_in_place else mod
        with torch.no_grad(), mode:
            return call(*args, **kwargs)
    finally:
        for store, k, v in reversed(saved):
            store[k] = v


def _copy_of(v: torch.Tensor) -> torch.Tensor:
    return _held_as(v, v.detach().clone())


def _with_values(v: Any, device: torch.device) -> Any:
    """A meta tensor as one with values (standard normal; zeros for integers and flags)."""
    if not isinstance(v, torch.Tensor) or v.device.type != "meta":
        return v
    out = torch.empty(v.shape, dtype=v.dtype, device=device)
    return out.normal_() if v.is_floating_point() else out.zero_()


def _as_meta_like(v: torch.Tensor) -> torch.Tensor:
    return _held_as(v, _empty_as(v))


def _held_as(v: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """``new`` in ``v``'s place in a module: a parameter where ``v`` is one."""
    return nn.Parameter(new, requires_grad=v.requires_grad) if isinstance(v, nn.Parameter) else new


def propagate_shapes(model: nn.Module, graph: fx.Graph, input_shapes: Sequence[Sequence[int]],
                     dtype: torch.dtype = torch.float32) -> None:
    """Store on every node (``meta[VALUE]``) the meta tensor it yields for inputs of these shapes.

    A module that runs here (a leaf) and caches a tensor on itself, as timm's EfficientViT
    attention caches its biases in eval mode, would keep a meta tensor that its next real run
    takes up; every change a module's attributes undergo here is undone (an LSTM's record of
    its weights as well)."""
    inputs = [make_inputs(s, lambda z: torch.empty(z, device="meta", dtype=dtype))
              for s in input_shapes]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # no default value
    if len(inputs) < len(required):
        names = ", ".join(n.target for n in required)
        raise TraceError(f"{type(model).__name__}.forward takes {len(required)} tensor inputs "
                         f"({names}) but {len(inputs)} input size(s) were given: pass one per input "
                         "with input_size=[(C, H, W), ...].")
    inputs += [n.args[0] for n in placeholders[len(inputs):]]
    from .trace import _anything, _NothingLeft  # (trace -> kinds -> shapes)
    with _NothingLeft(model, left=_anything):
        shapes = [str(tuple(z)) for spec in input_shapes for z in input_leaves(spec)]
        ran_on = (f"an input of shape {shapes[0]}" if len(shapes) == 1 else
                  f"inputs of shapes {', '.join(shapes)}")
        _MetaInterpreter(model, graph=graph, inputs=ran_on).run(*inputs)
