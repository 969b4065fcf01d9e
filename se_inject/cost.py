"""What SE gates would cost a model, before anyone fine-tunes: parameters and compute, totals,
per gate and per resolution stage, for one or several ratios.

Compute is counted by fvcore's ``FlopCountAnalysis`` (a multiply-add counts as one op, as fvcore
counts it), with handles for the ops fvcore leaves out and a gate is made of: the squeeze's mean
(or max), the ReLU, the sigmoid (or hard sigmoid, or tanh), the channel-wise scale, and the
residual sum (one op per element; the squeeze one per input element, as fvcore counts average
pooling). Ops fvcore has no handle for are
listed in the report, never counted as zero without saying so.

The base model is analysed once. Each gate is analysed alone, at its site's shape: the gated
model runs exactly the base model's ops plus its gates' (tests check this against an analysis of
the gated model and of timm's ``seresnet50``), so one fvcore pass serves every ratio and stage
choice.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math
import time
import warnings
from collections import abc
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from .errors import (ArgumentNameError, InvalidArgumentError, SEInjectError, misfit,
                     checks_arguments)
from .gate import GateSpec, make_gate
from .plan import Plan
from .shapes import forward_arguments, input_leaves, make_inputs

__all__ = ["cost", "CostReport", "RatioCost", "StageCost", "GateCost", "SCHEMA", "UNIT",
           "count_ops"]

SCHEMA = "se-inject.cost/1"
UNIT = ("ops: fvcore's count, one multiply-add = one op (convolutions, linear layers, matrix "
        "products); norms and pooling as fvcore counts them; means, ReLUs, sigmoids, products "
        "and sums one op per element")


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _per_output_element(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape
    return _numel(get_shape(outputs[0]))


def _per_input_element(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape
    return _numel(get_shape(inputs[0]))


# aten op -> handle, added to fvcore's own: what a gate and a residual block are made of.
EXTRA_HANDLES: dict[str, Callable] = {
    **dict.fromkeys(("aten::mean", "aten::amax"), _per_input_element),
    **dict.fromkeys(("aten::add", "aten::add_", "aten::mul", "aten::mul_", "aten::sigmoid",
                     "aten::sigmoid_", "aten::hardsigmoid", "aten::tanh", "aten::relu",
                     "aten::relu_"), _per_output_element),
}


@dataclass(frozen=True)
class Counted:
    total: int
    by_operator: dict[str, int]
    uncounted: dict[str, int]  # aten op -> how many calls had no handle


@contextlib.contextmanager
def _in_eval(model: nn.Module):
    """``model`` in eval mode for the block; every module's training flag put back after."""
    modes = {m: m.training for m in model.modules()}
    try:
        yield model.eval()
    finally:
        for m, flag in modes.items():
            m.training = flag


class _ByPosition(nn.Module):
    """``model`` called with its keyword arguments given by position, last (fvcore traces with
    positional inputs only)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        n = len(args) - len(self.names)
        return self.model(*args[:n], **dict(zip(self.names, args[n:])))


def count_ops(model: nn.Module, inputs: tuple) -> Counted:
    """fvcore's count of ``model`` on ``inputs`` (one per input, as forward_arguments takes
    them) with the handles above, in eval mode and without gradients; the model's training
    flags are put back afterwards."""
    from fvcore.nn import FlopCountAnalysis
    args, kwargs = forward_arguments(model, inputs)
    counted = _ByPosition(model, list(kwargs)) if kwargs else model
    try:
        with _in_eval(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(counted, (*args, *kwargs.values()))
            fca = fca.set_op_handle(**EXTRA_HANDLES)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            fca.tracer_warnings("none")
            total = fca.total()
            return Counted(total, dict(fca.by_operator()), dict(fca.unsupported_ops()))
    except SEInjectError:
        raise
    except Exception as exc:
        raise SEInjectError(f"fvcore could not analyse {type(model).__name__}: "
                            f"{type(exc).__name__}: {exc}. Check input_size; a model that "
                            "torch.jit.trace cannot run has no fvcore count.") from exc


@dataclass(frozen=True)
class GateCost:
    gate: str
    block: str
    rule: str
    stage: int
    channels: int
    reduced: int | None     # None for gates without a bottleneck (ECA, effective SE)
    spatial: tuple[int, ...]
    parameters: int
    ops: int


@dataclass(frozen=True)
class StageCost:
    stage: int
    spatial: tuple[int, ...]
    gates: int
    parameters: int
    ops: int


@dataclass(frozen=True)
class RatioCost:
    """The gated model at one ratio: totals, and what the gates add per gate and per stage."""

    ratio: int
    parameters: int
    ops: int
    added_parameters: int
    added_ops: int
    relative_parameters: float  # added / base
    relative_ops: float
    gates: tuple[GateCost, ...]
    stages: tuple[StageCost, ...]
    measured: dict | None = None  # {"device", "base_ms", "gated_ms", "ratio", ...}


@dataclass(frozen=True)
class CostReport:
    model: str
    input_size: tuple[int, ...]
    stages: str  # which stages were gated: "all", "all-but-last", or "2,3"
    base_parameters: int
    base_ops: int
    base_ops_by_operator: dict[str, int]
    uncounted: dict[str, int]
    ratios: tuple[RatioCost, ...]
    unit: str = UNIT
    schema: str = SCHEMA

    def __getitem__(self, ratio: int) -> RatioCost:
        for r in self.ratios:
            if r.ratio == ratio:
                return r
        raise KeyError(ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"schema": d.pop("schema"), **d}

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def table(self, width: int = 110) -> str:
        from . import report_format
        return report_format.rich_text(self, width)

    def markdown(self) -> str:
        from . import report_format
        return report_format.markdown(self)

    def plot(self, path) -> Path:
        from . import report_format
        return report_format.plot(self, Path(path))

    def __str__(self) -> str:
        return self.table()


def _resolve_model(model_or_name) -> tuple[nn.Module, str]:
    if isinstance(model_or_name, str):
        from ._models import create
        return create(model_or_name), model_or_name
    if not isinstance(model_or_name, nn.Module):
        raise InvalidArgumentError(f"model_or_name must be an nn.Module or a timm model name "
                                   f"(torchvision/NAME for torchvision's), not "
                                   f"{type(model_or_name).__name__}")
    return model_or_name, type(model_or_name).__name__


_VARIANT = {"position", "gate", "squeeze", "excite", "min_channels", "divisor"}


def _ratios(ratio) -> tuple[int, ...]:
    if isinstance(ratio, dict):
        from .api import _check_ratio
        return (_check_ratio(ratio),)
    values = [ratio] if isinstance(ratio, int) else list(ratio) \
        if isinstance(ratio, abc.Iterable) and not isinstance(ratio, (str, bytes)) else []
    if not values or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1
                             for r in values):
        raise InvalidArgumentError(f"ratio must be a positive integer or a list of them "
                                   f"(e.g. [16, 8, 4]); got {ratio!r}")
    return tuple(dict.fromkeys(values))


def _stage_label(stages) -> str:
    if stages is None or stages == "all":
        return "all"
    if isinstance(stages, str):
        return stages
    return ",".join(str(k) for k in sorted(set(stages)))


class _GateCounter:
    """fvcore counts of a lone gate at a site's shape, and its parameters; one per shape."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.cache: dict[tuple, tuple[int, int]] = {}

    def __call__(self, channels: int, spatial: tuple[int, ...], ratio: int,
                 spec: GateSpec) -> tuple[int, int]:
        key = (channels, spatial, ratio, spec)
        if key not in self.cache:
            gate = make_gate(channels, ratio, spec, dtype=self.dtype)
            params = sum(p.numel() for p in gate.parameters())
            x = torch.zeros(1, channels, *spatial, dtype=self.dtype)
            counted = count_ops(gate, (x,))
            if counted.uncounted:
                raise SEInjectError(f"fvcore left ops of a gate uncounted: {counted.uncounted}")
            self.cache[key] = (params, counted.total)
        return self.cache[key]


def _measure(model: nn.Module, gated: nn.Module, inputs_on: Callable, rounds: int) -> dict:
    """Forward passes of both models on the current device, alternated round by round, on the
    inputs ``inputs_on(device)`` makes (one image each)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # the caller's model runs where it is; on another device, a copy runs there
    base = model if device.type == "cpu" else copy.deepcopy(model).to(device)
    other = gated.to(device).eval()
    xs, kws = forward_arguments(model, inputs_on(device))

    def once(m) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        m(*xs, **kws)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    with _in_eval(base), torch.no_grad():
        for _ in range(3):
            once(base), once(other)
        pairs = [(once(base), once(other)) for _ in range(rounds)]
    ratios = sorted(g / b for b, g in pairs)
    bases, gateds = sorted(b for b, _ in pairs), sorted(g for _, g in pairs)
    mid = len(pairs) // 2
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "batch": 1, "rounds": rounds, "base_ms": bases[mid] * 1e3,
            "gated_ms": gateds[mid] * 1e3, "ratio": ratios[mid],
            "ratio_iqr": (ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4])}


@checks_arguments
def cost(model_or_name: nn.Module | str, ratio: int | Sequence[int] | dict = 16, *,
         input_size=None, rules=None, stages=None, measure: bool = False,
         measure_rounds: int = 20, leaf_modules: Iterable[type] = (),
         autowrap_functions: Iterable[Callable] = (), **variant) -> CostReport:
    """What SE gates would add to a model, counted with fvcore. The model is not changed.

    Args:
        model_or_name: an nn.Module, or a timm model name (``torchvision/NAME`` for
            torchvision's), built with random weights.
        ratio: the reduction ratio r, or several (one column per ratio, as the paper's Table 10).
        input_size: (C, H, W) for the count (default: as for apply()).
            ``{stage: r}`` counts one ratio per stage.
        rules, stages, leaf_modules, autowrap_functions: as for :func:`se_inject.apply`
            (``stages=[2, 3, 4]`` or ``"all-but-last"``: the paper's Table 13).
        variant: the gate's options as for :func:`se_inject.apply`: position, gate, squeeze,
            excite, min_channels, divisor.
        measure: also time forward passes of the base and the gated model on the current device
            (CUDA if available), side by side, and report the ratio.
    """
    from .api import _dtype, _gate_spec, _input_shapes, _no_sites_error, _trace_options, plan
    ratios = _ratios(ratio)
    if not isinstance(measure, bool):
        raise InvalidArgumentError(f"measure must be True or False, not {measure!r:.60}")
    if isinstance(measure_rounds, bool) or not isinstance(measure_rounds, int) or \
            measure_rounds < 1:
        raise InvalidArgumentError(f"measure_rounds must be a positive integer (e.g. 20), not "
                                   f"{measure_rounds!r:.60}")
    unknown = set(variant) - _VARIANT
    if unknown:
        names = [n for n in inspect.signature(cost).parameters if n != "variant"]
        raise ArgumentNameError(misfit(
            "cost", f"got unexpected keyword argument(s) {sorted(unknown)}",
            {k: None for k in sorted(unknown)}, names + sorted(_VARIANT)))
    spec = _gate_spec(variant.get("gate", "se"), variant.get("squeeze", "avg"),
                      variant.get("excite"), variant.get("min_channels", 1),
                      variant.get("divisor", 1))
    model, name = _resolve_model(model_or_name)
    shapes = _input_shapes(model, input_size)
    p: Plan = plan(model, ratios[0], rules, input_size=input_size, stages=stages,
                   leaf_modules=leaf_modules, autowrap_functions=autowrap_functions, **variant)
    if not len(p):
        raise _no_sites_error(model, p, _trace_options(model, leaf_modules,
                                                         autowrap_functions))
    dtype = _dtype(model)

    def inputs_on(device):  # one image: the counts are per image
        return tuple(make_inputs(s, lambda z: torch.zeros(1, *z[1:], dtype=dtype, device=device))
                     for s in shapes)
    base = count_ops(model, inputs_on("cpu"))
    base_params = sum(t.numel() for t in model.parameters())
    gate_counter = _GateCounter(dtype)
    results = []
    for r in ratios:
        gates = []
        for s in p:
            rs = r[s.stage] if isinstance(r, dict) else r
            params, ops = gate_counter(s.channels, s.spatial, rs, spec)
            gates.append(GateCost(gate=s.gate, block=s.block, rule=s.rule, stage=s.stage,
                                  channels=s.channels, reduced=spec.reduced(s.channels, rs),
                                  spatial=tuple(s.spatial), parameters=params, ops=ops))
        results.append(_ratio_cost(r, gates, base_params, base.total))
    if measure:
        from .api import apply
        measured = []
        for rc in results:
            gated = copy.deepcopy(model)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                apply(gated, rc.ratio, rules, input_size=input_size, stages=stages,
                      leaf_modules=leaf_modules, autowrap_functions=autowrap_functions,
                      **variant)
            measured.append(replace(rc, measured=_measure(model, gated, inputs_on, measure_rounds)))
        results = measured
    return CostReport(model=name, input_size=tuple(input_leaves(shapes[0])[0][1:]),
                      stages=_stage_label(stages),
                      base_parameters=base_params, base_ops=base.total,
                      base_ops_by_operator=base.by_operator, uncounted=base.uncounted,
                      ratios=tuple(results))


def _ratio_cost(r: int, gates: list[GateCost], base_params: int, base_ops: int) -> RatioCost:
    by_stage: dict[int, list[GateCost]] = {}
    for g in gates:
        by_stage.setdefault(g.stage, []).append(g)
    stages = tuple(StageCost(stage=k, spatial=gs[0].spatial, gates=len(gs),
                             parameters=sum(g.parameters for g in gs), ops=sum(g.ops for g in gs))
                   for k, gs in sorted(by_stage.items()))
    added_p = sum(g.parameters for g in gates)
    added_o = sum(g.ops for g in gates)
    return RatioCost(ratio=r, parameters=base_params + added_p, ops=base_ops + added_o,
                     added_parameters=added_p, added_ops=added_o,
                     relative_parameters=added_p / base_params if base_params else 0.0,
                     relative_ops=added_o / base_ops if base_ops else 0.0,
                     gates=tuple(gates), stages=stages)
