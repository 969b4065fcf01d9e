"""How a block is called, so that its forward can be traced alone exactly as its parent uses it.

A block's forward often takes more than one tensor: a ``shortcut=None`` its parent leaves out
(DLA), a list of tensors (HRNet), a flag. Traced alone with a placeholder for every parameter,
such a forward would take the wrong branch. So the arguments the parent passed in the model's
trace are replayed: each tensor becomes a placeholder, everything else stays the constant it
was. The traced body is then wrapped in a forward with the block's own signature, which checks
that later calls pass the same constants and hands the tensors to the body.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch.fx as fx

from .errors import RewriteError
from .trace import Call

__all__ = ["Leaf", "Inputs", "inputs_of", "with_placeholders", "wrap_body"]


RECIPE = "_se_inject_recipe"  # on each generated forward: how to make it again (rewrite.py)


@dataclass(frozen=True)
class Leaf:
    """Where the parent passed a tensor: the placeholder's name."""

    name: str


@dataclass(frozen=True)
class Inputs:
    """A recorded call: ``args``/``kwargs`` hold a Leaf at each tensor and constants elsewhere."""

    args: tuple
    kwargs: dict
    leaves: tuple[str, ...]


def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(inspect.unwrap(cls.forward))


def _is_plain(call: Call, cls: type) -> bool:
    """Every parameter passed positionally as a tensor: fx's own placeholders are exact."""
    params = list(_signature(cls).parameters.values())[1:]
    return (not call.kwargs and len(call.args) == len(params)
            and all(isinstance(a, fx.Node) for a in call.args)
            and all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params))


def inputs_of(call: Call, cls: type) -> Inputs | None:
    """The call with Leaves for its tensors, or None when fx's own placeholders are exact."""
    if _is_plain(call, cls):
        return None
    sig = _signature(cls)
    try:
        bound = sig.bind(None, *call.args, **call.kwargs)
    except TypeError as exc:
        raise RewriteError(f"{cls.__name__}.forward{sig} does not take the arguments its parent "
                           f"passes: {exc}") from None
    del bound  # binding only checks that the call fits the signature
    positional = [p.name for p in list(sig.parameters.values())[1:]
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    leaves: list[str] = []

    def mark(value: Any, name: str) -> Any:
        if isinstance(value, fx.Node):
            while name in leaves:
                name += "_"
            leaves.append(name)
            return Leaf(name)
        if isinstance(value, (list, tuple)):
            return type(value)(mark(v, f"{name}_{i}") for i, v in enumerate(value))
        if isinstance(value, dict):
            return {k: mark(v, f"{name}_{k}") for k, v in value.items()}
        return value

    args = tuple(mark(a, positional[i] if i < len(positional) else f"arg{i}")
                 for i, a in enumerate(call.args))
    kwargs = {k: mark(v, k) for k, v in call.kwargs.items()}
    return Inputs(args=args, kwargs=kwargs, leaves=tuple(leaves))


def with_placeholders(inputs: Inputs, make: Callable[[str], Any]) -> tuple[tuple, dict]:
    """``inputs`` with each Leaf replaced by ``make(name)`` (a placeholder Proxy)."""
    def fill(value):
        if isinstance(value, Leaf):
            return make(value.name)
        if isinstance(value, (list, tuple)):
            return type(value)(fill(v) for v in value)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value
    return fill(inputs.args), fill(inputs.kwargs)


def _mismatch(cls_name: str, what: str):
    raise RewriteError(f"{cls_name}.forward holds se-inject gates traced for calls with {what}; "
                       "this call passed something else. Remove the gates (se_inject.remove) "
                       "before calling the block differently.")


def wrap_body(cls: type, inputs: Inputs, body: Callable) -> Callable:
    """A forward with ``cls.forward``'s signature that checks the constants and calls ``body``
    (``body(self, *tensors)``, the traced graph's code) with the tensors in placeholder order."""
    sig = _signature(cls)
    params = list(sig.parameters.values())
    bound = sig.bind(None, *inputs.args, **inputs.kwargs).arguments
    # (names no parameter of a forward takes: the generated code reads them as globals)
    env: dict[str, Any] = {"_se_inject_body": body, "_se_inject_mismatch": _mismatch,
                           "_se_inject_cls": cls.__name__}
    head, checks, leaves = [params[0].name], [], {}

    def const(value) -> str:
        key = f"_se_inject_c{len(env)}"
        env[key] = value
        return key

    def check(test: str, what: str) -> None:
        checks.append(f"if {test}: _se_inject_mismatch(_se_inject_cls, {what!r})")

    def walk(expr: str, value: Any) -> None:
        if isinstance(value, Leaf):
            leaves[value.name] = expr
        elif isinstance(value, (list, tuple)):
            check(f"len({expr}) != {len(value)}", f"{expr} of length {len(value)}")
            for i, v in enumerate(value):
                walk(f"{expr}[{i}]", v)
        elif isinstance(value, dict):  # the same keys in the same order: the trace followed them
            check(f"list({expr}) != {const(list(value))}", f"{expr} with the keys {list(value)!r}")
            for k, v in value.items():
                walk(f"{expr}[{repr(k) if type(k) in (str, int) else const(k)}]", v)
        elif value is None or isinstance(value, bool):
            check(f"{expr} is not {value!r}", f"{expr} = {value!r}")
        elif isinstance(value, (int, float, str)):
            check(f"{expr} != {const(value)}", f"{expr} = {value!r}")
        else:
            check(f"{expr} is not {const(value)}", f"{expr} as traced")

    star = False
    for p in params[1:]:
        if p.kind == p.VAR_POSITIONAL:  # checked as the tuple of what was passed there
            head.append(f"*{p.name}")
            star = True
            walk(p.name, tuple(bound.get(p.name, ())))
            continue
        if p.kind == p.VAR_KEYWORD:
            head.append(f"**{p.name}")
            walk(p.name, dict(bound.get(p.name, {})))
            continue
        if p.kind == p.KEYWORD_ONLY and not star:
            head.append("*")
            star = True
        head.append(p.name if p.default is p.empty else f"{p.name}={const(p.default)}")
        walk(p.name, bound[p.name] if p.name in bound else p.default)
    call = ", ".join([params[0].name, *(leaves[n] for n in inputs.leaves)])
    src = "\n    ".join([f"def forward({', '.join(head)}):", *checks,
                          f"return _se_inject_body({call})"])
    exec(compile(src + "\n", f"<se-inject {cls.__qualname__}.forward signature>", "exec"), env)
    fn = env["forward"]
    fn.__qualname__ = f"{cls.__qualname__}.forward"
    fn.__dict__[RECIPE] = ("signature", cls, inputs, body)
    return fn
