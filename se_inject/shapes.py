"""Shape propagation on meta tensors: analysis computes nothing and copies no weights.

Each leaf module runs with its parameters and buffers swapped for meta tensors of the same
shape for the length of the call (restored in ``finally``); modules whose output has the
shape of their input by definition (norms, activations, dropout) are not run at all.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import TraceError

__all__ = ["propagate_shapes", "VALUE"]

VALUE = "se_inject.value"  # node.meta key: the meta tensor (or structure of them) a node produced

# Module classes whose stock forward returns a tensor shaped like its input.
_SHAPE_PRESERVING: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus,
    nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d, nn.Dropout3d, nn.AlphaDropout,
)


def _preserves_shape(m: nn.Module) -> bool:
    if not isinstance(m, _SHAPE_PRESERVING):
        return False
    # Only the stock forward is known to preserve shape: a subclass may override it.
    for base in type(m).__mro__:
        if "forward" in base.__dict__:
            return base.__module__.startswith("torch.nn.")
    return False


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
        if _preserves_shape(mod) and args and isinstance(args[0], torch.Tensor):
            return torch.empty_like(args[0])
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
