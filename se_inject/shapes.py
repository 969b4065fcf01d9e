"""Shape propagation on meta tensors: analysis computes nothing and copies no weights.

Modules whose output shape follows from their input by a known rule (norms, activations,
convolutions, linear layers) are not run at all; every other leaf module runs with its
parameters and buffers swapped for meta tensors of the same shape for the length of the call
(restored in ``finally``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

__all__ = ["propagate_shapes", "VALUE"]

VALUE = "se_inject.value"  # node.meta key: the meta tensor (or structure of them) a node produced

def _same(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x  # a meta tensor only describes a shape: the input's describes the output too


def _conv(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor | None:
    spatial = x.shape[2:]
    if x.dim() != 2 + len(m.kernel_size):
        return None  # unbatched input: let the module itself decide
    if m.padding == "same":
        out = list(spatial)
    else:
        pad = (0,) * len(spatial) if m.padding == "valid" else m.padding
        out = [(s + 2 * p - d * (k - 1) - 1) // st + 1
               for s, p, d, k, st in zip(spatial, pad, m.dilation, m.kernel_size, m.stride)]
    return x.new_empty((x.shape[0], m.out_channels, *out))


def _linear(m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], m.out_features))


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
}


def _shape_rule(m: nn.Module) -> Callable | None:
    """The rule for ``m``'s class, if the forward it runs is the one the rule describes."""
    owner_of_forward = next(c for c in type(m).__mro__ if "forward" in c.__dict__)
    for cls in type(m).__mro__:
        rule = _SHAPE_RULES.get(cls)
        if rule is not None:
            stock = owner_of_forward.__module__.startswith("torch.nn.")
            return rule if stock and issubclass(owner_of_forward, cls) else None
    return None


def _to_meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor) and x.device.type != "meta":
        return torch.empty_like(x, device="meta")
    if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
        return type(x)(_to_meta(v) for v in x)
    return x


class _MetaInterpreter(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            value = _to_meta(super().run_node(n))
        except TraceError:
            raise
        except Exception as exc:
            where = n.meta.get("se_inject.frame")
            scope = f" in `{where.label}`" if where is not None else ""
            raise TraceError(
                f"shapes could not be propagated through op `{n.format_node()}`{scope}: "
                f"{type(exc).__name__}: {exc}. If this module or function cannot run on meta "
                "tensors, pass it as a leaf (leaf_modules=[...]) or check input_size.") from exc
        n.meta[VALUE] = value
        return value

    def get_attr(self, target, args, kwargs):
        return _to_meta(super().get_attr(target, args, kwargs))

    def call_module(self, target, args, kwargs):
        mod = self.fetch_attr(target)
        rule = _shape_rule(mod)
        if rule is not None and len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor):
            out = rule(mod, args[0])
            if out is not None:
                return out
        saved = []
        try:
            for sub in mod.modules():
                for store in (sub._parameters, sub._buffers):
                    for k, v in store.items():
                        if v is not None and v.device.type != "meta":
                            saved.append((store, k, v))
                            store[k] = _as_meta_like(v)
            with torch.no_grad():
                return mod(*args, **kwargs)
        finally:
            for store, k, v in reversed(saved):
                store[k] = v


def _as_meta_like(v: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(v, device="meta")
    return nn.Parameter(meta, requires_grad=v.requires_grad) if isinstance(v, nn.Parameter) else meta


def propagate_shapes(model: nn.Module, graph: fx.Graph, input_shapes: Sequence[Sequence[int]],
                     dtype: torch.dtype = torch.float32) -> None:
    """Store on every node (``meta[VALUE]``) the meta tensor it yields for inputs of these shapes."""
    inputs = [torch.empty(tuple(s), device="meta", dtype=dtype) for s in input_shapes]
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    required = [n for n in placeholders if not n.args]  # no default value
    if len(inputs) < len(required):
        names = ", ".join(n.target for n in required)
        raise TraceError(f"{type(model).__name__}.forward takes {len(required)} tensor inputs "
                         f"({names}) but {len(inputs)} input size(s) were given: pass one per input "
                         "with input_size=[(C, H, W), ...].")
    inputs += [n.args[0] for n in placeholders[len(inputs):]]
    _MetaInterpreter(model, graph=graph).run(*inputs)
