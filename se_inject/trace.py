"""Tracing with torch.fx: the whole model (with module scopes) or one block alone.

The global trace goes through every module that timm and torchvision do not mark as a leaf,
and records on each node the module invocation (``Frame``) whose forward created it, so
that a site found anywhere in the graph can be realised in the module that owns it.
"""
from __future__ import annotations

import bisect
import contextlib
import dis
import functools
import inspect
import linecache
import math
import operator
import os
import sys
import threading
import types
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .errors import BlockChangedError, TraceError
from .gate import ChannelGate
from .kinds import MERGE_KINDS, flat, node_kind

__all__ = ["Call", "Frame", "TraceOptions", "UnpackingTracer", "trace_model", "trace_block"]

SCOPE = "se_inject.frame"  # node.meta key: the Frame whose forward created the node
RETURNS = "_se_inject_returns"  # graph attribute: Frame -> what its forward returned
LOG = "_se_inject_log"  # graph attribute: Nodes and Calls, in the order tracing made them
CONTAINERS = "_se_inject_containers"  # a block's graph attribute: its ContainerCalls
CONSTANTS = "_se_inject_constants"  # graph attribute: name -> tensor made while tracing
STATE_CHANGES = "_se_inject_state_changes"  # a block's graph attribute: what its forward changed
# a block's graph attribute: the modes (grad, inference, saved-tensor hooks, autocast) part of
# its forward ran in, other than the caller's, each with the first node made in it
MODE_CHANGES = "_se_inject_mode_changes"
# node.meta key in a block's graph: True on a node made with gradients off and in the caller's
# other modes, as under ``with torch.no_grad():`` (the generated forward runs it so again)
GRAD_OFF = "se_inject.grad_off"
# node.meta key in a block's graph: the settings of the torch.utils.checkpoint.checkpoint call
# that ran this layer (a call_module node), for the generated forward to make the same call
CHECKPOINTED = "se_inject.checkpoint"
CONSTANT_PREFIX = "_se_inject_constant"  # their get_attr targets; a gated block holds them
# a block's graph attribute: whether its trace drew random numbers (a tensor the forward made
# itself, ``torch.rand(1)``: drawn once, a constant of the graph)
DREW_RANDOM = "_se_inject_drew_random"
# graph attribute: the Frames whose forward read a traced value as a Python one (see
# _ShapedTracer); a forward generated from a trace of one of them could not do that
VALUES_READ = "_se_inject_values_read"


@dataclass(frozen=True)
class Frame:
    """One call of a module's forward during tracing: ``qualname`` ("" is the model)."""

    qualname: str
    call: int = 0

    @property
    def label(self) -> str:
        return self.qualname or "(model)"


@dataclass(frozen=True)
class Call:
    """A module's forward called from its parent's: with Nodes where Proxies were passed."""

    parent: Frame
    frame: Frame
    args: tuple
    kwargs: dict


_OPERATORS = {operator.add: "+", operator.iadd: "+=", operator.sub: "-", operator.mul: "*",
              operator.truediv: "/", operator.floordiv: "//", operator.matmul: "@",
              operator.pow: "**", operator.mod: "%", operator.eq: "==", operator.ne: "!=",
              operator.lt: "<", operator.le: "<=", operator.gt: ">", operator.ge: ">=",
              operator.and_: "&", operator.or_: "|"}


def _arg_text(a: Any) -> str:
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(map(_arg_text, a[:6])) + (", ..." if len(a) > 6 else "")
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' * (len(a) == 1)})"
    text = repr(a)
    return text if len(text) <= 40 else text[:37] + "..."


def op_text(node: fx.Node) -> str:
    """A node written as the code it records (``torch.where(gt, y, mul)``, ``x.view(2, -1)``,
    ``add + mul``, ``self.layer1.0.conv1(x)``), values named as in the graph, and where the
    trace met it (in `layer1.0`), for messages: fx's ``format_node`` prints its graph notation."""
    args = [_arg_text(a) for a in node.args]
    args += [f"{k}={_arg_text(v)}" for k, v in node.kwargs.items()]
    target = node.target
    if node.op == "call_function" and target in _OPERATORS and len(args) == 2:
        text = f" {_OPERATORS[target]} ".join(args)
    elif node.op == "call_function" and target is operator.getitem and len(args) == 2:
        text = f"{args[0]}[{args[1]}]"
    elif node.op == "call_function" and target is getattr and len(node.args) == 2:
        text = f"{args[0]}.{node.args[1]}"
    elif node.op == "call_function":
        name = fx.node._get_qualified_name(target) if callable(target) else str(target)
        text = f"{name.replace('_operator.', 'operator.')}({', '.join(args)})"
    elif node.op == "call_method" and args:
        text = f"{args[0]}.{target}({', '.join(args[1:])})"
    elif node.op == "call_module":
        text = f"self.{target}({', '.join(args)})"
    elif node.op == "get_attr":
        text = f"self.{target}"
    else:
        text = f"{node.op} {target}"
    frame = node.meta.get(SCOPE)
    where = "" if frame is None else \
        f" in `{frame.qualname}`" if frame.qualname else " in the model's own forward"
    return f"`{text}`{where}"


def is_container(m: nn.Module) -> bool:
    """An nn.Sequential (or a subclass keeping its forward): it only calls its children in
    turn. It owns no site of its own: what happens in it belongs to the module that calls it,
    and a gate registered on it would become one of its layers."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def _holds_no_state(m: nn.Module) -> bool:
    """A layer with no parameters or buffers, in it or in its layers: what it computes is
    what its forward's code does with its input."""
    return next(m.parameters(), None) is None and next(m.buffers(), None) is None


def _registry_leaf_modules() -> list[type]:
    """Module classes that timm and torchvision keep out of fx traces."""
    leaves: list[type] = [ChannelGate]
    try:
        from timm.layers import get_notrace_modules
        leaves += list(get_notrace_modules())
        # as torchvision's own DropBlock2d (below) and torch's dropout layers: one call in
        # either mode (traced through, it vanishes in eval mode and cannot be traced in
        # training mode), so a gate after it sits in the same place in both
        from timm.layers import DropBlock2d
        leaves.append(DropBlock2d)
    except ImportError:  # timm is optional for hand-written models
        pass
    return leaves + _torchvision_leaf_modules() + _einops_leaf_modules()


# einops (imported by the model's code, never by se-inject): its functions parse a pattern
# against the tensor's shape, which a traced value has none of, so fx fails inside them. Each
# is one call in the graph, as its layers are (``Rearrange``, ``Reduce``, ``EinMix``).
_EINOPS_FUNCTIONS = ("rearrange", "reduce", "repeat", "einsum", "pack", "unpack")
_EINOPS_LAYERS = ("Rearrange", "Reduce", "EinMix")


def _einops_leaf_modules() -> list[type]:
    layers = sys.modules.get("einops.layers.torch")
    return [c for c in (getattr(layers, n, None) for n in _EINOPS_LAYERS)
            if isinstance(c, type) and issubclass(c, nn.Module)] if layers else []


def _einops_functions() -> list[Callable]:
    einops = sys.modules.get("einops")
    return [f for f in (getattr(einops, n, None) for n in _EINOPS_FUNCTIONS)
            if callable(f)] if einops else []


@functools.lru_cache(maxsize=None)
def _torchvision_leaf_modules() -> list[type]:
    """torchvision.ops' module classes, as torchvision's own feature extraction leaves them
    (computed once: the module's contents do not change; timm's registry may, so it is read
    on every call)."""
    try:
        import torchvision.ops as tv_ops
    except ImportError:
        return []
    return [obj for _, obj in inspect.getmembers(tv_ops)
            if inspect.isclass(obj) and issubclass(obj, nn.Module)]


def _registry_autowrap() -> tuple[tuple[Callable, ...], tuple[Any, ...]]:
    functions: list[Callable] = []
    modules: list[Any] = [math]
    try:
        from timm.layers import get_notrace_functions
        functions += [f for f in get_notrace_functions() if callable(f)]
    except ImportError:
        pass
    functions += _einops_functions()
    try:
        import torchvision.ops as tv_ops
        modules.append(tv_ops)
    except ImportError:
        pass
    return tuple(functions), tuple(modules)


@dataclass(frozen=True)
class TraceOptions:
    """What the user adds to the registries: extra leaf module classes and functions."""

    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple[Callable, ...] = ()

    def tracer_args(self) -> tuple[tuple[type, ...], dict]:
        functions, modules = _registry_autowrap()
        leaves = tuple(_registry_leaf_modules()) + tuple(self.leaf_modules)
        kwargs = dict(autowrap_modules=modules,
                      autowrap_functions=functions + tuple(self.autowrap_functions))
        return leaves, kwargs

    def wrapped_ids(self) -> frozenset[int]:
        """The ids of the functions a tracer with these options records as one call, as fx
        collects them: its autowrap functions and the public callables of its modules.
        Taken once per options (apply() makes its own for each call)."""
        found = self.__dict__.get("_wrapped_ids")
        if found is None:
            _, kwargs = self.tracer_args()
            ids = {id(f) for f in kwargs["autowrap_functions"]}
            for module in kwargs["autowrap_modules"]:
                ids.update(id(v) for k, v in vars(module).items()
                           if not k.startswith("_") and callable(v))
            found = frozenset(ids)
            object.__setattr__(self, "_wrapped_ids", found)  # frozen: not a field
        return found

    def size_lengths(self) -> dict:
        """The lengths of the sizes the model's forwards unpack into a call (``x.view(n, c,
        *x.shape[2:])``), per code location, as the model's trace at its input shapes found
        them (see _ShapedTracer.rank_length), for the traces of its blocks; None where
        one location saw two lengths. One table per options (apply() makes its own)."""
        table = self.__dict__.get("_size_lengths")
        if table is None:
            table = {}
            object.__setattr__(self, "_size_lengths", table)
        return table


_UNPACKS: dict = {}  # code object -> (instruction offsets, UNPACK_SEQUENCE counts or None)


def _unpack_counts(code) -> tuple[tuple[int, ...], tuple[int | None, ...]]:
    """Each instruction's offset in ``code``, and for an UNPACK_SEQUENCE its count."""
    table = _UNPACKS.get(code)
    if table is None:
        if len(_UNPACKS) > 4096:
            _UNPACKS.clear()
        insts = list(dis.get_instructions(code))
        table = _UNPACKS[code] = (
            tuple(i.offset for i in insts),
            tuple(i.argval if i.opname == "UNPACK_SEQUENCE" else None for i in insts))
    return table


class _FastUnpack:
    """fx's ``Proxy.__iter__`` answers ``a, b = proxy`` by disassembling the calling function
    on every unpacking (a sixth of a ShuffleNet's trace); the same answer, read from a table
    built once per code object. Attributes (``x.shape``) get the same iteration."""

    def __iter__(self):
        caller = sys._getframe(1)
        offsets, counts = _unpack_counts(caller.f_code)
        if sys.version_info >= (3, 11):
            i = bisect.bisect_left(offsets, caller.f_lasti)
        else:
            i = caller.f_lasti // 2
        n = counts[i] if i < len(counts) else None
        if n is not None:
            return (self[k] for k in range(n))
        return self.tracer.iter_at(self, caller)

    def __getattr__(self, k: str):
        return _Attribute(self, k)

    def __len__(self):
        """The length of a size its tracer knows at the caller's code location (see
        UnpackingTracer.rank_length); elsewhere fx's refusal."""
        n = self.tracer.rank_length(self, sys._getframe(1))
        return fx.Proxy.__len__(self) if n is None else n


class _Proxy(_FastUnpack, fx.Proxy):
    pass


class _Attribute(_FastUnpack, fx.proxy.Attribute):
    pass


def _rank_sized(node: fx.Node) -> bool:
    """Whether a traced value is ``x.size()`` or ``x.shape``, or a slice of one with constant
    bounds (``x.shape[2:]``): a tuple as long as ``x`` has dimensions, whatever its sizes."""
    while node.op == "call_function" and node.target is operator.getitem:
        bounds = node.args[1]
        if type(bounds) is not slice or not isinstance(node.args[0], fx.Node) or any(
                b is not None and type(b) is not int
                for b in (bounds.start, bounds.stop, bounds.step)):
            return False
        node = node.args[0]
    if node.op == "call_method":
        return node.target == "size" and len(node.args) == 1 and not node.kwargs
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


# what a traced op gives that is no tensor: sizes, counts, Python values, tuples of pieces
_NOT_TENSOR_METHODS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "element_size", "stride", "item",
    "tolist", "split", "chunk", "unbind", "tensor_split", "split_with_sizes", "__len__"})
_NOT_TENSOR_FUNCTIONS = frozenset({
    getattr, len, torch.split, torch.chunk, torch.unbind, torch.tensor_split, torch.numel})
_PIECES = frozenset({"split", "chunk", "unbind", "tensor_split", "split_with_sizes",
                     torch.split, torch.chunk, torch.unbind, torch.tensor_split})


def _stands_for_tensor(node: fx.Node, memo: dict) -> bool:
    """Whether a traced value is a tensor: a module's output, an input, a parameter, a tensor
    op's result or a piece of a split tensor; not a size read off one (``x.shape[2] // 2``)."""
    known = memo.get(node)
    if known is None:
        known = memo[node] = _tensor_op(node, memo)
    return known


def _tensor_op(node: fx.Node, memo: dict) -> bool:
    op, target, args = node.op, node.target, node.args
    if op != "call_function" and op != "call_method":
        return True  # a module's output, an input, a parameter or buffer
    first = args[0] if args and isinstance(args[0], fx.Node) else None
    if op == "call_method":
        return target not in _NOT_TENSOR_METHODS and (
            first is None or _stands_for_tensor(first, memo))
    if target in _NOT_TENSOR_FUNCTIONS:
        return False
    if target is operator.getitem and first is not None:
        return first.target in _PIECES or _stands_for_tensor(first, memo)
    if getattr(target, "__module__", None) == "_operator":  # ``h // 2`` on sizes: no tensor
        return any(isinstance(a, fx.Node) and _stands_for_tensor(a, memo) for a in args)
    return True


_BUILTIN_ISINSTANCE = isinstance
_JIT_ISINSTANCE = torch.jit.isinstance
_IS_TENSOR = torch.is_tensor


def _names_tensor(cls) -> bool:
    if type(cls) is tuple:
        return any(_names_tensor(c) for c in cls)
    return cls is torch.Tensor or cls is torch._C.TensorBase


def _traced_tensor(obj) -> bool:
    return type(obj) in _PROXIES and _stands_for_tensor(obj.node, obj.tracer.tensor_nodes)


def _isinstance(obj, cls):
    """isinstance, where a proxy that stands for a tensor is a torch.Tensor (_TensorChecks)."""
    if _names_tensor(cls) and _traced_tensor(obj):
        return True
    return _BUILTIN_ISINSTANCE(obj, cls)


def _jit_isinstance(obj, target_type):
    if _names_tensor(target_type) and _traced_tensor(obj):
        return True
    return _JIT_ISINSTANCE(obj, target_type)


def _is_tensor(obj) -> bool:
    return _traced_tensor(obj) or _IS_TENSOR(obj)


class _TensorChecks:
    """While a trace runs, ``isinstance(x, torch.Tensor)`` in the forwards it goes into
    (their modules' globals; torch's own are left alone), ``torch.jit.isinstance(x,
    torch.Tensor)`` and ``torch.is_tensor(x)`` answer True for a proxy that stands for a
    tensor, as for the tensor it traces. fx's proxies are no tensors: a forward that checks an
    optional argument (``if isinstance(skip, torch.Tensor): y = y + skip``, MONAI's U-Net
    decoders) was traced down the other branch, and the forward generated from that trace left
    the sum out. Entered and left by traces, which hold _TRACE_LOCK; a count per patched
    globals, for a trace inside another."""

    scopes: dict[int, list] = {}  # id(globals) -> [globals, traces holding it]
    torch_checks = 0  # traces holding torch.jit.isinstance and torch.is_tensor

    @classmethod
    def enter(cls, scope) -> int | None:
        if not isinstance(scope, dict) or scope.get("isinstance", _isinstance) is not _isinstance \
                or str(scope.get("__name__", "")).startswith("torch."):
            return None  # (a module with an isinstance of its own keeps it)
        held = cls.scopes.setdefault(id(scope), [scope, 0])
        held[1] += 1
        scope["isinstance"] = _isinstance
        cls.torch_checks += 1
        torch.jit.isinstance = _jit_isinstance
        torch.is_tensor = _is_tensor
        return id(scope)

    @classmethod
    def leave(cls, key: int | None) -> None:
        if key is None:
            return
        held = cls.scopes[key]
        held[1] -= 1
        if held[1] == 0:
            del cls.scopes[key]
            held[0].pop("isinstance", None)
        cls.torch_checks -= 1
        if cls.torch_checks == 0:
            torch.jit.isinstance = _JIT_ISINSTANCE
            torch.is_tensor = _IS_TENSOR


# the methods behind augmented assignments (``y += x`` calls ``y.__iadd__(x)``)
_AUGMENTED = frozenset(f"__i{op}__" for op in (
    "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "lshift", "rshift",
    "and", "or", "xor"))


def _in_place(kind: str, target, kwargs: dict) -> bool:
    """Whether the op changes its first argument in place and returns it: a tensor method
    ending in one underscore (``add_``), torch's in-place functions (``torch.relu_``), or a
    functional layer called with ``inplace=True``, or an augmented assignment's method called
    by name (``y.__iadd__(x)``, which a tensor runs in place). (fx traces ``y += x`` as ``y + x``
    bound to the name ``y``, as Python does for a value without ``__iadd__``.)"""
    if kind == "call_method":
        return isinstance(target, str) and (
            target.endswith("_") and not target.startswith("_") or target in _AUGMENTED)
    if kind != "call_function":
        return False
    module = getattr(target, "__module__", None) or ""
    if not (module == "torch" or module.startswith("torch.nn.functional")
            or module.startswith("torch._C")):
        return False
    name = getattr(target, "__name__", "")
    return (name.endswith("_") and not name.startswith("_")) or kwargs.get("inplace") is True


# A tracing session needs these fx internals. Where fx keeps its tracing flag for the whole
# process rather than per thread (no _get_is_fx_tracing: torch 2.11 among others), a session
# could not tell a trace in another thread from a foreign tracer, so sessions stay off there.
try:
    from torch.fx import _symbolic_trace as _fx_impl
    _FX_HOOKS = all(hasattr(_fx_impl, n) for n in (
        "_orig_module_call", "_orig_module_getattr", "_autowrap_check", "CURRENT_PATCHER",
        "_get_is_fx_tracing", "_create_wrapped_func"))
except ImportError:  # pragma: no cover - every supported torch has the module
    _fx_impl, _FX_HOOKS = None, False

_ACTIVE = threading.local()  # .stack: [(tracer, parameter proxy cache)], innermost last;
# .entering: the module a session's __call__ is about to run (see _unrouted_call)
_SESSION: dict = {"depth": 0, "active": False, "classes": {}, "module": False, "hook": None,
                  "wrap": None}
_SESSION_LOCK = threading.Lock()
# fx keeps the patcher of the trace in progress in one global (CURRENT_PATCHER), which a
# trace in another thread replaces, and outside a session patches nn.Module for the whole
# process: traces in two threads at once failed ("CURRENT_PATCHER is None"). Every se-inject
# trace holds this lock (re-entrant); what apply() does between its traces runs in parallel.
_TRACE_LOCK = threading.RLock()
_FX_FLAG = "__fx_already_patched"  # fx's patcher leaves a method alone that carries this


def _active_tracer():
    stack = getattr(_ACTIVE, "stack", None)
    return stack[-1] if stack else None


def _no_foreign_tracer() -> None:
    if _fx_impl._get_is_fx_tracing():
        raise RuntimeError("an fx tracer that is not se-inject's ran inside se-inject's tracing "
                           "session, where nn.Module's calls and attributes reach only "
                           "se-inject's tracers; it would have traced a wrong graph")


def compiled_in_place(mod: nn.Module) -> bool:
    """Whether ``mod.compile()`` (not torch.compile's wrapper) compiled the module: its calls
    then run the compiled code, which fx cannot trace; ``mod._call_impl`` is its Python."""
    return mod.__dict__.get("_compiled_call_impl") is not None


def _uncompiled(mod: nn.Module, forward):
    """The ``forward`` a tracer's call_module is handed for ``mod``, or, for a module compiled
    in place outside a tracing session, its Python: fx's own patch of nn.Module hands a
    forward that calls nn.Module.__call__, which runs the compiled code (a session's forward
    runs the Python itself, _session_call)."""
    if _SESSION["active"] or not compiled_in_place(mod):
        return forward
    return mod._call_impl


def _session_call(mod, *args, **kwargs):
    """A module's __call__ during a tracing session: what fx's own wrapper does for the
    tracer tracing in this thread, the module's plain call otherwise."""
    active = _active_tracer()
    if active is None:
        _no_foreign_tracer()
        _ACTIVE.entering = mod
        return _fx_impl._orig_module_call(mod, *args, **kwargs)
    tracer = active[0]

    def forward(*args, **kwargs):
        _ACTIVE.entering = mod
        if compiled_in_place(mod):
            return mod._call_impl(*args, **kwargs)  # trace what it compiled
        return _fx_impl._orig_module_call(mod, *args, **kwargs)

    _fx_impl._autowrap_check(_fx_impl.CURRENT_PATCHER,
                             getattr(getattr(mod, "forward", mod), "__globals__", {}),
                             tracer._autowrap_function_ids)
    return tracer.call_module(mod, forward, args, kwargs)


def _session_getattr(mod, attr):
    value = _fx_impl._orig_module_getattr(mod, attr)
    active = _active_tracer()
    if active is None:
        _no_foreign_tracer()
        return value
    return active[0].getattr(attr, value, active[1])


for _fn in (_session_call, _session_getattr):
    setattr(_fn, _FX_FLAG, True)


def _unrouted_call(mod, args):
    """Global forward pre-hook of a session that patches classes: a module call that did not
    come through a patched __call__ (a module of a class the model does not register) is
    refused as fx refuses it, rather than traced through with its weights as constants."""
    entering, _ACTIVE.entering = getattr(_ACTIVE, "entering", None), None
    if entering is mod or _SESSION["module"]:  # nn.Module's own __call__ routes every call
        return None
    if _active_tracer() is not None:
        if _holds_no_state(mod):  # a layer made in a forward: its code (_ScopeTracer.call_module)
            return None
        raise NameError(f"a {type(mod).__name__} module is called that is not installed as a "
                        "submodule of the traced model")
    _no_foreign_tracer()
    return None


_NN_MODULE_METHODS = ("__call__", "__getattr__", "_call_impl", "_wrapped_call_impl")


def _plain(cls: type) -> bool:
    """Whether the class calls and looks up attributes exactly as nn.Module does."""
    return all(getattr(cls, n) is getattr(nn.Module, n) for n in _NN_MODULE_METHODS)


def _session_patch(model: nn.Module | None) -> None:
    """Route module calls and attribute misses to se-inject's tracers (lock held).

    Setting ``__call__`` or ``__getattr__`` on nn.Module updates the call and attribute slots
    of every one of its subclasses (more than a thousand with timm imported): about 2 ms
    each, as fx does four times a trace, and each class's method cache then refills. Set on
    the model's own classes instead, each has few subclasses: microseconds. nn.Module itself
    is patched only when the model has a class that calls or looks up attributes its own
    way, or a compiled module, or none was named."""
    modules = list(model.modules()) if model is not None else []
    classes = {type(m) for m in modules}
    plain = model is not None and all(map(_plain, classes)) and not any(
        compiled_in_place(m) or "__call__" in m.__dict__
        for m in modules)
    if not plain and not _SESSION["module"]:
        nn.Module.__call__ = _session_call
        nn.Module.__getattr__ = _session_getattr
        _SESSION["module"] = True
    for cls in classes - set(_SESSION["classes"]):
        if _plain(cls):
            _SESSION["classes"][cls] = {n: cls.__dict__[n] for n in ("__call__", "__getattr__")
                                        if n in cls.__dict__}
            cls.__call__ = _session_call
            cls.__getattr__ = _session_getattr
    if _SESSION["hook"] is None:
        for fn in (_fx_impl._orig_module_call, _fx_impl._orig_module_getattr):
            setattr(fn, _FX_FLAG, True)  # fx's own trace now leaves nn.Module unpatched
        _SESSION["hook"] = nn.modules.module.register_module_forward_pre_hook(_unrouted_call)
    if _SESSION["wrap"] is None:
        _SESSION["wrap"] = _fx_impl._create_wrapped_func
        _fx_impl._create_wrapped_func = _reused_wrapper(_SESSION["wrap"])


def _reused_wrapper(make: Callable) -> Callable:
    """fx's ``_create_wrapped_func``, making each function's wrapper once per session.

    On every trace fx puts a wrapper in place of each function registered with
    ``torch.fx.wrap`` and each function of its autowrap modules (``math``, torchvision.ops):
    some 100 per trace here, each made anew with ``functools.wraps`` (~10 us), then taken out
    again. The wrapper looks for a proxy among its arguments and asks that proxy's tracer for
    the node, so one wrapper serves every trace; fx still puts it in place and takes it out."""
    made: dict[int, tuple] = {}

    def wrapper_of(orig_fn):
        hit = made.get(id(orig_fn))
        if hit is None:
            hit = made[id(orig_fn)] = (orig_fn, make(orig_fn))  # orig_fn kept: its id stays
        return hit[1]
    return wrapper_of


def _session_unpatch() -> None:
    for cls, saved in _SESSION["classes"].items():
        for n in ("__call__", "__getattr__"):
            if n in saved:
                setattr(cls, n, saved[n])
            else:
                delattr(cls, n)
    _SESSION["classes"] = {}
    if _SESSION["module"]:
        nn.Module.__call__ = _fx_impl._orig_module_call
        nn.Module.__getattr__ = _fx_impl._orig_module_getattr
        _SESSION["module"] = False
    if _SESSION["wrap"] is not None:
        _fx_impl._create_wrapped_func = _SESSION["wrap"]
        _SESSION["wrap"] = None
    if _SESSION["hook"] is not None:
        _SESSION["hook"].remove()
        _SESSION["hook"] = None
        for fn in (_fx_impl._orig_module_call, _fx_impl._orig_module_getattr):
            if _FX_FLAG in fn.__dict__:
                delattr(fn, _FX_FLAG)


@contextlib.contextmanager
def tracing_session(model: nn.Module | None = None):
    """One patch of module calls and attribute misses for every trace of ``model`` (and its
    submodules) within it, where fx patches nn.Module anew on every trace (see
    _session_patch). Each module call goes to the se-inject tracer tracing in that thread,
    or runs as usual where none is. Re-entrant. Where this torch lacks the fx internals it
    relies on, or nn.Module is patched already, every trace patches as fx does, for the whole
    process: a module called in another thread would reach this thread's tracer, so the
    session then holds _TRACE_LOCK throughout, and sessions in several threads run one at a
    time."""
    with _SESSION_LOCK:
        if _SESSION["depth"] == 0:
            _SESSION["active"] = (_FX_HOOKS
                                  and nn.Module.__call__ is _fx_impl._orig_module_call
                                  and nn.Module.__getattr__ is _fx_impl._orig_module_getattr)
        if _SESSION["active"]:
            try:
                _session_patch(model)
            except BaseException:
                if _SESSION["depth"] == 0:
                    _session_unpatch()
                raise
        _SESSION["depth"] += 1
        serial = not _SESSION["active"]
    held = False
    try:
        if serial:
            held = _TRACE_LOCK.acquire()
        yield
    finally:
        if held:
            _TRACE_LOCK.release()
        with _SESSION_LOCK:
            _SESSION["depth"] -= 1
            if _SESSION["depth"] == 0 and _SESSION["active"]:
                _session_unpatch()
                _SESSION["active"] = False


# Arguments fx stores as they are, and containers it rebuilds around its nodes: exact types
# only (a Tensor, a Parameter, a named tuple or a subclass takes fx's own path).
_AS_IS = frozenset({int, float, bool, complex, str, type(None), type(...), torch.dtype,
                    torch.device, torch.memory_format, torch.layout})


# fx's Tracer.trace collects every tensor-valued attribute of every module under the root, by
# walking each module's __dict__, before it traces a node: about 5 µs a module, for a table
# that only a forward reading a plain tensor attribute (not a parameter or buffer) ever looks
# in. UnpackingTracer fills that table when it is first read instead (see its ``root``).
_FX_TRACE_CODE = getattr(fx.Tracer.trace, "__code__", None)
try:
    from torch.fx._symbolic_trace import _constant_attribute_types as _ATTRIBUTE_TYPES
except ImportError:  # pragma: no cover - an fx before the name: the types it looked for
    _ATTRIBUTE_TYPES = (torch.Tensor, torch._C.ScriptObject)
_NO_MODULES = nn.Module()  # what fx's own walk is handed instead: nothing to collect


def _called_by_fx_walk(frame: types.FrameType) -> bool:
    """Whether ``frame``, reading a tracer's root, is fx's Tracer.trace about to hand it to
    its attribute walk (defined in that frame just before the read)."""
    return frame.f_code is _FX_TRACE_CODE and "collect_tensor_attrs" in frame.f_locals


def _collect(m: nn.Module, prefix: list[str], table: dict) -> None:
    for k, v in m.__dict__.items():
        if isinstance(v, _ATTRIBUTE_TYPES):
            table[v] = ".".join(prefix + [k])
    for k, v in m.named_children():
        _collect(v, prefix + [k], table)


_MERGE_PARAMETERS = {torch.add: ("input", "other"), "add": ("self", "other"),
                     "add_": ("self", "other"), torch.cat: ("tensors", "dim axis"),
                     torch.concat: ("tensors", "dim axis"),
                     torch.concatenate: ("tensors", "axis dim")}  # (names a position takes)


def _by_position(kind: str, target, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The operands of a sum or concatenation given by name (``torch.add(x, other=y)``,
    ``x.add(other=y)``, ``torch.cat(tensors=[a, b], dim=1)``, ``torch.concatenate([a, b],
    axis=1)``) moved to their positions, as the same call made by position records them:
    the rules, the identity initialisation and the rewrite read a merge's operands there."""
    names = _MERGE_PARAMETERS.get(target) if (kind == "call_method") == isinstance(target, str) \
        else None
    if names is None:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for accepted in names[len(args):]:
        key = next((k for k in accepted.split() if k in kwargs), None)
        if key is None:
            break
        args.append(kwargs.pop(key))
    return tuple(args), kwargs


_PROXY_BOOL = fx.Proxy.__bool__.__code__
_JUMPS = {"POP_JUMP_IF_TRUE": True, "POP_JUMP_FORWARD_IF_TRUE": True,  # (Python 3.11's names)
          "POP_JUMP_IF_FALSE": False, "POP_JUMP_FORWARD_IF_FALSE": False}


@functools.lru_cache(maxsize=256)
def _instructions(code: types.CodeType) -> tuple[list[int], list[dis.Instruction]]:
    insts = list(dis.get_instructions(code))
    return [i.offset for i in insts], insts


_COMPARED = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le,
             ">": operator.gt, ">=": operator.ge}


def _asserted_truth(frame: types.FrameType, node: fx.Node) -> bool | None:
    """Where ``frame`` asks for the truth of ``node``'s value to decide an ``assert``
    statement, the truth that lets it pass; else None. Python jumps over the statement's raise
    when the value is true (``assert c``), false (``assert not c``), or, for the first operand
    of ``and``, jumps to the raise when it is false; only assert statements load
    AssertionError so. From Python 3.13 a comparison makes its result a bool itself, and a
    comparison of tuples asks for the truth of their items' comparisons there too: taken only
    where ``node`` is the comparison the instruction makes (``(h, w) == (4, 4)`` holds where
    each item's does; ``!=`` and orderings ask for items' equality, and are not taken)."""
    offsets, insts = _instructions(frame.f_code)
    i = bisect.bisect_left(offsets, frame.f_lasti)
    if i < len(insts) and insts[i].opname == "TO_BOOL":  # (Python 3.13's own step)
        i += 1
    elif i < len(insts) and insts[i].opname == "COMPARE_OP" and \
            insts[i].argrepr.startswith("bool("):
        if node.op != "call_function" or _COMPARED.get(insts[i].argrepr[5:-1]) is not node.target:
            return None
        i += 1
    if i + 1 >= len(insts) or insts[i].opname not in _JUMPS:
        return None
    jumps_if = _JUMPS[insts[i].opname]
    if insts[i + 1].opname == "LOAD_ASSERTION_ERROR":  # the raise follows: it must jump
        return jumps_if
    target = bisect.bisect_left(offsets, insts[i].argval)
    if target < len(insts) and insts[target].opname == "LOAD_ASSERTION_ERROR":
        return not jumps_if  # the jump goes to the raise: it must not jump
    return None


def _user_frame() -> types.FrameType | None:
    """The frame whose code asked for a proxy's truth (through fx's Proxy.__bool__)."""
    frame = sys._getframe(2)
    for _ in range(4):
        if frame is None or frame.f_code is _PROXY_BOOL:
            return None if frame is None else frame.f_back
        frame = frame.f_back
    return None


def _sizes_as_one(fn: Callable) -> Callable:
    """``fn`` (a torch factory that takes its size as numbers one by one or as one sequence)
    taking sizes given one by one, the first a traced value, as one tuple: torch reads a
    first size that is not a number as the whole size and fails ("zeros() takes 1 positional
    argument but 3 were given"), where the same sizes in a tuple reach fx as one call."""
    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if len(args) > 1 and isinstance(args[0], fx.Proxy) and all(
                isinstance(a, (int, fx.Proxy)) for a in args):
            args = (args,)
        return fn(*args, **kwargs)
    return factory


_FACTORIES = {name: (getattr(torch, name), _sizes_as_one(getattr(torch, name)))
              for name in ("zeros", "ones", "empty", "rand", "randn")}
_FACTORIES_PATCHED = [0]  # traces under way that put _sizes_as_one in place (_TRACE_LOCK)


@contextlib.contextmanager
def _factories_taking_traced_sizes():
    """torch's factories as _sizes_as_one while a trace runs (in every thread: only calls
    given a traced size change); put back as they were when the outermost trace ends."""
    if _FACTORIES_PATCHED[0] == 0:
        for name, (plain, wrapped) in _FACTORIES.items():
            if getattr(torch, name) is plain:
                setattr(torch, name, wrapped)
    _FACTORIES_PATCHED[0] += 1
    try:
        yield
    finally:
        _FACTORIES_PATCHED[0] -= 1
        if _FACTORIES_PATCHED[0] == 0:
            for name, (plain, wrapped) in _FACTORIES.items():
                if getattr(torch, name) is wrapped:
                    setattr(torch, name, plain)


class UnpackingTracer(fx.Tracer):
    """torch.fx's tracer handing out se-inject's proxies (see _FastUnpack); within a
    ``tracing_session`` it takes the session's module patch instead of making its own.

    Per node, fx also does work se-inject has no use for: a copy of its module stack into
    the node's meta (se-inject records each node's Frame instead), a copy of its scope on
    every module call, and a row of isinstance checks before it turns a proxy or an int into
    an argument; and it names a parameter or buffer a forward reads by walking all of the
    model's (see ``getattr``). Skipping them gives the same graph, sooner (README, "Figures").

    A tensor the forward makes while it is traced (``torch.arange(16)``, ``torch.tensor(...)``)
    is a constant of the graph. fx stores each on the traced module as ``_tensor_constantN``,
    which would leave them on the user's model after a plan and make a forward generated for
    one block read another's; here they stay in ``constants`` (the graph's CONSTANTS), named
    ``_se_inject_constantN``, and a gated block gets its own when its forward goes in."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # einops' functions called through its namespace (``einops.rearrange(...)``): fx
        # wraps a function where it finds it under a public name, in the calling module's
        # globals and in the modules it searches, and einops is searched only from here
        einops, search = sys.modules.get("einops"), getattr(self, "_autowrap_search", None)
        if einops is not None and isinstance(search, list) and einops not in search:
            search.append(einops)

    # where a trace puts its constants, shared by the traces of one block (unique names)
    _constants_into: dict[str, torch.Tensor] | None = None
    # the lengths of sizes unpacked at each code location (TraceOptions.size_lengths)
    _lengths: dict | None = None

    def iter_at(self, obj, caller):
        """fx's iteration of a proxy, ``caller`` iterating it where fx cannot tell how many
        items to make; a size whose length the tracer knows there gives that many."""
        n = self.rank_length(obj, caller)
        return self.iter(obj) if n is None else iter([obj[i] for i in range(n)])

    def rank_length(self, obj, caller) -> int | None:
        """The length of a size (_rank_sized) at the caller's code location, as the model's
        trace at its input shapes found it there (_ShapedTracer.rank_length), or None."""
        table = self._lengths
        n = table.get((caller.f_code, caller.f_lasti)) if table else None
        return n if n is not None and _rank_sized(obj.node) else None

    # fx's trace sets ``root``, then ``tensor_attrs = {}``, then walks the root's modules to
    # fill the table. Here the table is filled when it is first read, by the same walk in
    # fx's order (a tensor held under two names gets the last, as in fx's table); fx's own
    # walk is handed a module with nothing in it: only the first read of the root in fx's
    # trace after it reset the table there, with its walk defined. A torch whose trace reads
    # the root otherwise gets the walk twice, and the same graph.
    @property
    def root(self) -> nn.Module:
        d = self.__dict__
        if d.pop("_se_inject_skip_walk", False) and _called_by_fx_walk(sys._getframe(1)):
            return _NO_MODULES
        return d["_se_inject_root"]

    @root.setter
    def root(self, value: nn.Module) -> None:
        self.__dict__["_se_inject_root"] = value

    @property
    def tensor_attrs(self) -> dict:
        d = self.__dict__
        if d.pop("_se_inject_unfilled", False):  # (every write to the table reads it first)
            _collect(d["_se_inject_root"], [], d["_se_inject_tensor_attrs"])
        return d["_se_inject_tensor_attrs"]

    @tensor_attrs.setter
    def tensor_attrs(self, value: dict) -> None:
        d = self.__dict__
        d["_se_inject_tensor_attrs"] = value
        fresh = type(value) is dict and not value and "_se_inject_root" in d
        d["_se_inject_unfilled"] = fresh
        d["_se_inject_skip_walk"] = fresh and sys._getframe(1).f_code is _FX_TRACE_CODE

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _Proxy(node, self)

    def to_bool(self, obj) -> bool:
        passes = self.asserted(obj)
        return super().to_bool(obj) if passes is None else passes

    def asserted(self, obj) -> bool | None:
        """Where Python asks for the truth of a traced value to decide an ``assert`` (``assert
        x.dim() == 4``, ``assert c % groups == 0``, ``assert torch.isfinite(y).all()``), the
        check goes into the graph as ``torch._assert``, which the forwards generated from it
        run on whatever they are given, and the trace goes on as if it passed (fx records
        asserts so only when asked to, and reads only older Pythons' bytecode for them).
        None where the question is not an assert's."""
        frame = _user_frame()
        if frame is None or not isinstance(obj, fx.Proxy):
            return None
        passes = _asserted_truth(frame, obj.node)
        if passes is None:
            return None
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
        where = f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"
        check = obj
        if not passes:  # (``assert not c``: a tensor's values, or a Python flag)
            tensor = _stands_for_tensor(obj.node, self.__dict__.setdefault("tensor_nodes", {}))
            check = self.create_proxy("call_function", torch.logical_not if tensor
                                      else operator.not_, (obj,), {})
        self.create_proxy("call_function", torch._assert, (check, f"{where}: {line}"), {})
        return passes

    def create_proxy(self, kind, target, args, kwargs, *rest, **more):
        """fx's create_proxy; where the op changes a traced tensor in place (``y.add_(x)``,
        ``torch.relu_(y)``, ``F.relu(y, inplace=True)``), the proxy that stood for that tensor
        stands for the op's result from then on. fx leaves it on the value before the op:
        ``y.add_(x); return torch.relu(y)`` was traced as the ReLU of the sum's first operand,
        so a gate placed on that operand scaled a tensor nothing read, and the sum was lost."""
        proxy = super().create_proxy(kind, target, args, kwargs, *rest, **more)
        receiver = args[0] if args else None
        if type(receiver) in _PROXIES and _in_place(kind, target, kwargs):
            receiver.node = proxy.node
        return proxy

    def create_arg(self, a: Any):
        t = type(a)
        if t in _PROXIES or t in _ATTRIBUTES:
            return a.node
        if t in _AS_IS:
            return a
        if t is tuple:
            return tuple([self.create_arg(e) for e in a])
        if t is list:
            return [self.create_arg(e) for e in a]
        if t is dict and all(type(k) is str for k in a):
            return {k: self.create_arg(v) for k, v in a.items()}
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter) \
                and isinstance(self.root, nn.Module):
            name = self._tensor_index().get(id(a), (None,))[0]  # a buffer
            if name is None:  # a plain tensor attribute of a module, or a constant made before
                name = self.tensor_attrs.get(a)
            if name is None:  # a buffer the forward assigned while traced (self.n = self.n + 1)
                name = next((n for n, b in self.root.named_buffers() if b is a), None)
            if name is None:
                name = f"{CONSTANT_PREFIX}{len(self.constants)}"
                self.constants[name] = a
                self.tensor_attrs[a] = name
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        """fx's create_node, with the arguments attached once the node exists: fx's graph
        walks every argument of a call through pytree to warn of raw symbolic integers,
        which a trace with proxies never passes (a twentieth of a small model's apply).
        A sum's or concatenation's operands given by name are recorded by position
        (_by_position)."""
        if kwargs and kind in ("call_function", "call_method"):
            args, kwargs = _by_position(kind, target, args, kwargs)
        if not (args or kwargs) or self.check_mutable_operations:
            return super().create_node(kind, target, args, kwargs, name, type_expr)
        node = super().create_node(kind, target, (), {}, name, type_expr)
        node.args = args
        if kwargs:
            node.kwargs = kwargs
        return node

    def call_module(self, m, forward, args, kwargs):
        """fx's call_module, without the scope and module-stack bookkeeping: the module
        stack stays empty, so no node gets ``meta["nn_module_stack"]``.

        A container the model is not holding (a slice such as ``self.body[:2]``, made in a
        forward as timm's models do with gradient checkpointing on) only calls children the
        model holds, and a layer made in a forward that holds no state (``nn.ZeroPad2d((1, 0,
        1, 0))(x)``, as NASNet-A Mobile pads) computes what its code does: each is traced
        through, with no name or frame of its own."""
        forward = _uncompiled(m, forward)
        if self.submodule_paths and m not in self.submodule_paths and (
                is_container(m) or _holds_no_state(m)):
            return forward(*args, **kwargs)
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return self.create_proxy("call_module", qualname, args, kwargs)
        self._check_tensors_in(m.forward)
        return self.trace_through(m, qualname, forward, args, kwargs)

    def trace_through(self, m, qualname, forward, args, kwargs):
        """Runs the forward of a module that is not a leaf, tracing what it does."""
        return forward(*args, **kwargs)

    def trace(self, root, concrete_args=None):
        """fx's trace, one thread at a time (_TRACE_LOCK), with _TensorChecks and torch's
        factories taking traced sizes one by one (_sizes_as_one)."""
        self._tensor_names: dict[int, tuple[str, bool, torch.Tensor]] | None = None
        self.constants = {} if self._constants_into is None else self._constants_into
        self._checked: dict[int, int | None] = {}  # id(globals) -> _TensorChecks' key
        self.tensor_nodes: dict[fx.Node, bool] = {}  # _stands_for_tensor's answers
        with _TRACE_LOCK, _factories_taking_traced_sizes():
            try:
                self._check_tensors_in(type(root).forward if isinstance(root, nn.Module)
                                       else root)
                if not _SESSION["active"]:
                    return super().trace(root, concrete_args)
                stack = _ACTIVE.__dict__.setdefault("stack", [])
                stack.append((self, {}))
                try:
                    return super().trace(root, concrete_args)
                finally:
                    stack.pop()
            finally:
                for key in self._checked.values():
                    _TensorChecks.leave(key)

    def _check_tensors_in(self, fn) -> None:
        """_TensorChecks in the globals of a forward the trace goes into, until it ends."""
        scope = getattr(getattr(fn, "__func__", fn), "__globals__", None)
        if scope is not None and id(scope) not in self._checked:
            self._checked[id(scope)] = _TensorChecks.enter(scope)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        """fx finds the name of a parameter or buffer by walking all of the model's
        parameters on every access, which is quadratic in model size; look it up instead.
        A tensor the index does not know (one the forward assigned) takes fx's own path."""
        if not isinstance(attr_val, torch.Tensor) or not isinstance(self.root, nn.Module):
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        name, is_param, _ = self._tensor_index().get(id(attr_val), (None, False, None))
        wanted = is_param if isinstance(attr_val, nn.Parameter) else self.proxy_buffer_attributes
        if name is None or not wanted:
            return super().getattr(attr, attr_val, parameter_proxy_cache)
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def _tensor_index(self) -> dict[int, tuple[str, bool, torch.Tensor]]:
        """id -> (name, is a parameter, the tensor) for the root's parameters and buffers as
        the trace began (holding them keeps their ids from being reused by a new tensor)."""
        if self._tensor_names is None:
            index = {id(b): (n, False, b) for n, b in self.root.named_buffers()}
            index.update((id(p), (n, True, p)) for n, p in self.root.named_parameters())
            self._tensor_names = index
        return self._tensor_names


class _ScopeTracer(UnpackingTracer):
    """Records the module invocation that creates every node; remembers where tracing failed."""

    def __init__(self, leaves: tuple[type, ...], n_inputs: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self._leaves = leaves
        self._n_inputs = n_inputs
        self._frames: list[Frame] = [Frame("")]
        self._calls: dict[str, int] = {}
        self.returns: dict[Frame, object] = {}
        self.log: list = []
        self.failed_in: Frame | None = None
        self.failed_module: nn.Module | None = None
        self.last_node: fx.Node | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        """Placeholders for the inputs the model is given; every other parameter keeps its
        default, as when the model is called as ``model(x)``. Recorded as the model's Call."""
        fn, args = super().create_args_for_root(root_fn, is_module, concrete_args)
        params = list(inspect.signature(inspect.unwrap(root_fn)).parameters.values())[1:]
        n = self._n_inputs
        if n is None or not is_module or len(args) != len(params) + 1 or n >= len(params) \
                or any(p.kind != p.POSITIONAL_OR_KEYWORD for p in params[:n]) \
                or any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
                       for p in params[n:]):
            return fn, args
        extra = args[1 + n:]
        for proxy in extra:  # placeholders fx made for parameters the caller leaves out
            if isinstance(proxy, fx.Proxy):
                self.graph.erase_node(proxy.node)
        given = args[:1 + n]
        self.log.append(Call(Frame(""), Frame(""), tuple(p.node for p in given[1:]), {}))
        # the forward as written, not fx's copy with every parameter positional (made where
        # there are keyword-only ones, *args or **kwargs): those keep their defaults
        return root_fn, given

    def trace_through(self, m, qualname, forward, args, kwargs):
        if is_container(m):  # no frame of its own
            return forward(*args, **kwargs)
        n = self._calls.get(qualname, 0)
        self._calls[qualname] = n + 1
        frame = Frame(qualname, n)
        self.log.append(Call(self._frames[-1], frame, _nodes_of(args), _nodes_of(kwargs)))
        self._frames.append(frame)
        try:
            out = forward(*args, **kwargs)
            self.returns[frame] = _nodes_of(out)
            return out
        except Exception:
            if self.failed_in is None:
                self.failed_in, self.failed_module = self._frames[-1], m
            raise
        finally:
            self._frames.pop()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        node.meta[SCOPE] = self._frames[-1]
        self.log.append(node)
        self.last_node = node
        return node


class _ShapedProxy(_Proxy):
    """A proxy of a _ShapedTracer: where Python needs a value of it (``if``, ``int()``,
    ``len()``, a loop), the value it has for the input's shape, when that value is a number,
    flag or size rather than a tensor."""

    def __getattr__(self, k: str):
        return _ShapedAttribute(self, k)

    def __int__(self):
        return int(self.tracer.value(self))

    def __index__(self):
        return operator.index(self.tracer.value(self))

    def __float__(self):
        return float(self.tracer.value(self))

    def __len__(self):
        n = self.tracer.rank_length(self, sys._getframe(1))
        return len(self.tracer.value(self, held=True)) if n is None else n


class _ShapedAttribute(_Attribute):
    __int__, __index__, __float__, __len__ = (_ShapedProxy.__int__, _ShapedProxy.__index__,
                                              _ShapedProxy.__float__, _ShapedProxy.__len__)


_PROXIES = frozenset((_Proxy, _ShapedProxy))  # exact types: a subclass takes fx's own path
_ATTRIBUTES = frozenset((_Attribute, _ShapedAttribute))
_CONCRETE = (bool, int, float, torch.Size)


def _concrete(v) -> bool:
    """A number, flag or size, or a list or tuple of numbers."""
    return isinstance(v, _CONCRETE) or (type(v) in (tuple, list) and bool(v) and all(
        type(e) in (bool, int, float) for e in v))


class _ShapedTracer(_ScopeTracer):
    """A _ScopeTracer for a forward that reads its input's shape as Python values: HF
    transformers' CNNs check the number of channels (``if pixel_values.shape[1] !=
    self.num_channels: raise``) and pad as TensorFlow does (``int(x.shape[-2]) % stride``),
    which torch.fx refuses ("symbolically traced variables cannot be used as inputs to control
    flow"). Where the trace needs such a value, the graph traced so far runs on meta tensors
    of the input shapes apply() propagates anyway, up to the node that holds it, and the trace
    goes on with the number (as HF's own fx tracer does). Only a number, flag or size is
    answered so; a tensor's values stay unknown, and asking for them fails as in fx.

    The graph is the model's at those input shapes, which is what apply() analyses; the
    forwards it generates for gated blocks come from their own traces, in fx's plain tracer,
    so that nothing the model computes is fixed to one shape."""

    def __init__(self, leaves: tuple[type, ...], n_inputs: int | None,
                 input_shapes: Sequence[Sequence[int]], dtype: torch.dtype,
                 lengths: dict | None = None, **kwargs):
        super().__init__(leaves, n_inputs, **kwargs)
        self._shapes = input_shapes
        self._dtype = dtype
        self._interpreter = None
        self._last: fx.Node | None = None  # the last node run so far
        self._running = False
        self.values_read: set[Frame] = set()
        self._lengths = {} if lengths is None else lengths  # (see rank_length)
        self._unpacked_in: dict[tuple, list[Frame]] = {}

    def rank_length(self, obj, caller) -> int | None:
        """The length of a size (see _rank_sized) that the forward unpacks into a call
        (``x.view(n, c, *x.shape[2:])``, where fx cannot tell how many items to make) or
        takes the len() of: its tensor's number of dimensions, whatever the input's size.
        The size's items stay traced values, no number is read, and the length is noted at
        the caller's code location for the traces of the model's blocks (TraceOptions.
        size_lengths). Where one location sees two lengths, every forward that took one
        there reads a value after all (values_read). None: not such a size."""
        if not _rank_sized(obj.node):
            return None
        v = self._run_to(obj.node)
        if type(v) not in (tuple, torch.Size) or not _concrete(v):
            return None
        where = (caller.f_code, caller.f_lasti)
        frames = self._unpacked_in.setdefault(where, [])
        frames.append(self._frames[-1])
        if self._lengths.setdefault(where, len(v)) != len(v):
            self._lengths[where] = None
        if self._lengths[where] is None:
            self.values_read.update(frames)
        return len(v)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def trace(self, root, concrete_args=None):
        with _SizesAsData(self):
            return super().trace(root, concrete_args)

    def to_bool(self, obj) -> bool:
        passes = self.asserted(obj)
        return bool(self.value(obj, fx.Tracer.to_bool.__get__(self))) if passes is None \
            else passes

    def iter(self, obj):
        v = self.value(obj, super().iter, held=True)
        if type(v) in (tuple, list) and not _concrete(v):  # tensors (an input given so)
            return iter([obj[i] for i in range(len(v))])
        return iter(v)  # numbers, or a dict's keys

    def value(self, obj, refuse: Callable | None = None, held: bool = False):
        """The Python value of ``obj`` at the input shapes; where it is a tensor or
        unknown, fx's refusal (``refuse(obj)``) or a TypeError. ``held``: a list, tuple or
        dict of anything (whose length or keys are known) is answered too."""
        node = obj.node
        self.values_read.add(self._frames[-1])
        v = self._run_to(node)
        if _concrete(v) or (held and type(v) in (tuple, list, dict)):
            return v
        if refuse is not None:
            return refuse(obj)
        raise TypeError(f"the value of {op_text(node)} is not known while tracing: it "
                        "is a tensor's, or one computed from a tensor's values")

    def _run_to(self, node: fx.Node):
        from .shapes import _MetaInterpreter, make_inputs  # (trace -> kinds -> shapes)
        if self._interpreter is None:
            inputs = [make_inputs(s, lambda z: torch.empty(z, device="meta", dtype=self._dtype))
                      for s in self._shapes]
            self._interpreter = _MetaInterpreter(self.root, graph=self.graph,
                                                 garbage_collect_values=False)
            self._interpreter._made = self.constants
            self._interpreter.args_iter = iter(inputs)
            self._last = self.graph._root
        interpreter, env = self._interpreter, self._interpreter.env
        if node in env:
            return env[node]
        self._running = True
        try:
            n = self._last.next
            while n is not self.graph._root:
                try:
                    env[n] = interpreter.run_node(n)
                except Exception:
                    env[n] = _UNKNOWN
                self._last = n
                if n is node:
                    break
                n = n.next
        finally:
            self._running = False
        return env.get(node, _UNKNOWN)

    def call_module(self, m, forward, args, kwargs):
        if self._running:  # a layer running on meta tensors, not traced
            return _uncompiled(m, forward)(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._running:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)


_UNKNOWN = object()
_FROM_DATA = frozenset((torch.tensor, torch.as_tensor))


class _SizesAsData(TorchFunctionMode):
    """While a _ShapedTracer traces: ``torch.tensor(n)`` or ``torch.as_tensor([n, ...])`` of
    numbers read off a size (RAFT's correlation: ``torch.sqrt(torch.tensor(num_channels))``)
    makes the tensor of their values at the input's shape, which fx cannot (it hands torch a
    proxy where torch looks for data: "`__cuda_array_interface__` must be a dict"). A tensor's
    values stay unknown (_ShapedTracer.value refuses them)."""

    def __init__(self, tracer: _ShapedTracer):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _FROM_DATA and args and not self.tracer._running:
            args = (self._known(args[0]),) + tuple(args[1:])
        return func(*args, **(kwargs or {}))

    def _known(self, data):
        if isinstance(data, fx.Proxy):
            return self.tracer.value(data)
        if type(data) in (list, tuple):
            return type(data)(self._known(d) for d in data)
        return data


_MODULE_STATE = frozenset(("_modules", "_parameters", "_buffers"))
PLAIN = (bool, int, float, str, type(None))  # values a forward reads as constants
# What nn.Module.__init__ sets: torch's own bookkeeping (its dicts of parameters, buffers and
# submodules, ordered dicts of hooks, flags), never a forward's cache
_BASE_STATE = frozenset(nn.Module().__dict__)
_NO_COPIES: dict = {}
_ABSENT = object()


def _all_modules(model: nn.Module) -> list[nn.Module]:
    """``model.modules()``, each once, in a list: a walk without generators, in a third of
    the time (1,500 modules: 0.4 against 0.9 ms)."""
    out, seen, i = [model], {id(model)}, 0
    while i < len(out):
        for c in out[i]._modules.values():
            if c is not None and id(c) not in seen:
                seen.add(id(c))
                out.append(c)
        i += 1
    return out


def _hook_owners(modules: list[nn.Module]) -> list:
    """The objects (not modules) whose bound methods the modules' forward hooks are, each once:
    through ``functools.partial``, as timm's FeatureHooks registers its collector."""
    out, seen = [], set()
    for m in modules:
        if not (m._forward_hooks or m._forward_pre_hooks):
            continue
        for hook in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()):
            while isinstance(hook, functools.partial):
                hook = hook.func
            owner = getattr(hook, "__self__", None)
            if owner is not None and not isinstance(owner, nn.Module) and \
                    hasattr(owner, "__dict__") and id(owner) not in seen:
                seen.add(id(owner))
                out.append(owner)
    return out


def _is_proxy(value) -> bool:
    return isinstance(value, fx.Proxy)


def _anything(value) -> bool:
    return True


def _holds(value, test: Callable[[Any], bool], depth: int = 3) -> bool:
    if test(value):
        return True
    if depth and isinstance(value, (list, tuple)):
        return any(_holds(v, test, depth - 1) for v in value)
    if depth and isinstance(value, dict):
        return any(_holds(v, test, depth - 1) for v in value.values())
    return False


# Ops whose tensor arguments after the first give the result their dtype or device alone
# (``c.type_as(x)``, ``c.to(x)``, ``c.to(x.dtype)``), and the reads of a tensor's type: a value
# they make from a constant holds none of the input's values. (Narrower than
# kinds.reads_metadata_only: a tensor made at the input's shape, ``torch.zeros(x.shape)``,
# and kept is a forward's state, a buffer it fills.)
_CASTS_BY_EXAMPLE = frozenset(("type_as", "to"))
_TYPE_ATTRS = frozenset(("dtype", "device"))


def _value_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose values ``node``'s value is computed from: all its inputs, but the
    examples a cast takes its dtype and device from, and none for a read of a dtype or a
    device."""
    if node.op == "call_function" and node.target is getattr and len(node.args) == 2 \
            and node.args[1] in _TYPE_ATTRS:
        return []
    if node.op == "call_method" and node.target in _CASTS_BY_EXAMPLE and node.args \
            and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return node.all_input_nodes


def _from_an_input(value) -> bool:
    """Whether ``value`` is a traced value computed from a placeholder (an input): from its
    values, not only its dtype or device (EDSR's ``self.mean = self.mean.type_as(x)`` is a
    constant in the input's type, which a generated forward makes again at every call)."""
    if not isinstance(value, fx.Proxy):
        return False
    seen, todo = set(), [value.node]
    while todo:
        node = todo.pop()
        if node.op == "placeholder":
            return True
        for n in _value_inputs(node):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return False


class _NothingLeft:
    """Tracing runs the model's Python, which may cache a traced value on a module (timm's
    LeViT, EfficientViT and TinyViT cache their attention biases in eval mode). Undo every
    change to a module's attributes that leaves such a value (``left`` says which: a proxy
    by default; anything at all for a run on meta tensors, none of whose changes are real)
    on exit.

    fx hands out proxies for parameters but buffers are the real tensors: an in-place update
    in a forward that is traced through (a norm layer counting its batches, as torch's
    BatchNorm does and subclasses that copy its forward do) would change them. Each such
    buffer whose version counter moved gets its value back. torch.nn's own layers are
    leaves, never traced through, except the root; inference tensors have no version counter,
    and outside inference mode nothing can change them in place. A number, flag or string a
    forward sets (a counter of its calls) gets its value back too.

    ``changed`` lists, after exit, each buffer updated in place and each such attribute set:
    state a forward keeps, which a graph made from its trace would not. With ``keeps=True``
    it lists as well each attribute left holding a traced value computed from the forward's
    inputs (``self.last = y``, a list or dict filled with one): a forward that records what
    it computed, for its caller to read, which a graph made from its trace would not do
    either. A value computed from weights and constants alone is a cache (EfficientFormerV2's
    attention biases, cached per device in eval mode), which the graph computes again."""

    def __init__(self, model: nn.Module, left: Callable[[Any], bool] = _is_proxy,
                 keeps: bool = False):
        self._left = left
        self._keeps = keeps
        self._buffers = []
        self._before = []
        self.changed: list[tuple[nn.Module, str]] = []
        modules = _all_modules(model)
        for m in modules:  # (a copy of __dict__ whole: half the time of filtering it)
            attrs = m.__dict__.copy()
            copies = None  # plain dicts and lists a forward may fill in place (a cache)
            for k in attrs.keys() - _BASE_STATE:
                v = attrs[k]
                if type(v) is dict or type(v) is list:
                    if copies is None:
                        copies = {}
                    copies[k] = v.copy()
            self._before.append((m, attrs, copies or _NO_COPIES))
            if m._buffers and (m is model or not type(m).__module__.startswith("torch.nn.")):
                self._buffers += [(m, k, b, b._version, b.clone()) for k, b in m._buffers.items()
                                  if isinstance(b, torch.Tensor) and not b.is_inference()]
        # the objects the modules' hooks are methods of, whose state the hooks fill as the
        # forward runs (timm's FeatureHooks keeps each hooked module's output in a dict of
        # dicts, keyed by device): put back as they were, any dict or list in them too
        self._owners = [(o, o.__dict__.copy(), {k: v.copy() for k, v in o.__dict__.items()
                                                 if isinstance(v, (dict, list))})
                        for o in _hook_owners(modules)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with torch.no_grad():
            for m, k, b, version, saved in self._buffers:
                if b._version != version:
                    b.copy_(saved)
                    self.changed.append((m, k))
        for o, attrs, copies in self._owners:
            o.__dict__.clear()
            o.__dict__.update(attrs)
            for k, v in copies.items():
                attrs[k].clear()
                attrs[k].update(v) if isinstance(v, dict) else attrs[k].extend(v)
        for m, attrs, copies in self._before:
            now = m.__dict__
            if not copies and len(now) == len(attrs) and all(map(operator.is_, now.values(),
                                                                 attrs.values())) \
                    and now.keys() == attrs.keys():
                continue  # the module as it was: the common case, checked at C speed
            for k, v in list(now.items()):
                if (attrs.get(k, _ABSENT) is v and k not in copies) or k in _MODULE_STATE:
                    continue  # the value it had before tracing
                old = attrs.get(k, _ABSENT)
                if type(v) in PLAIN and (type(old) not in PLAIN or old != v):
                    self.changed.append((m, k))
                elif not _holds(v, self._left):
                    continue
                elif self._keeps and _holds(v, _from_an_input):
                    self.changed.append((m, k))
                if k not in attrs:
                    del m.__dict__[k]
                elif v is not attrs[k]:
                    m.__dict__[k] = attrs[k]
                elif k in copies:  # the same dict or list, filled while tracing
                    v.clear()
                    v.update(copies[k]) if isinstance(v, dict) else v.extend(copies[k])
        return False


def _code_of(fn) -> Any:
    """The code object a hook runs: through partials, bound methods and callable objects."""
    for _ in range(8):
        if isinstance(fn, functools.partial):
            fn = fn.func
            continue
        fn = getattr(fn, "__func__", fn)
        code = getattr(fn, "__code__", None)
        if code is not None:
            return code
        call = getattr(type(fn), "__call__", None)
        if call is None or call is fn:
            return None
        fn = call
    return None


def _failing_hook(model: nn.Module, exc: BaseException) -> tuple[str, Any] | None:
    """Where ``exc`` was raised inside a forward hook or pre-hook of one of ``model``'s
    modules, or a global one: what the hook is registered on, and its code. (fx does not run
    the hooks of the model itself: it calls its forward.)"""
    hooks: dict[Any, str] = {}
    g = nn.modules.module
    for kind, table in (("global forward hook", g._global_forward_hooks),
                        ("global forward pre-hook", g._global_forward_pre_hooks)):
        for h in table.values():
            if not getattr(h, "__module__", "").startswith("se_inject"):
                hooks.setdefault(_code_of(h), kind)
    names = {}
    for name, m in model.named_modules():
        names[id(m)] = name
        if not name:
            continue
        for kind, table in (("forward hook", m._forward_hooks),
                            ("forward pre-hook", m._forward_pre_hooks)):
            for h in table.values():
                hooks.setdefault(_code_of(h), kind)
    hooks.pop(None, None)
    found = None
    tb = exc.__traceback__
    while tb is not None:  # the innermost hook frame is the one that failed
        if tb.tb_frame.f_code in hooks:
            found = tb.tb_frame
        tb = tb.tb_next
    if found is None:
        return None
    code = found.f_code
    on = next((names[id(v)] for v in found.f_locals.values()  # the module it was called for
               if isinstance(v, nn.Module) and names.get(id(v))), None)
    return (f"a {hooks[code]}" + (f" on `{on}`" if on else ""), code)


def _trace_failure(model: nn.Module, tracer: _ScopeTracer, exc: Exception) -> TraceError:
    hook = _failing_hook(model, exc)
    if hook is not None:
        where, code = hook
        return TraceError(
            f"torch.fx could not trace {type(model).__name__}: it failed in {where} "
            f"({code.co_name}, {code.co_filename}:{code.co_firstlineno}): "
            f"{type(exc).__name__}: {exc}. fx runs the hooks of the modules it traces through, "
            "on traced values (torch.fx.Proxy), not tensors. Remove the hook while gating "
            "(call remove() on the handle that registering it returned, gate the model, then "
            "register it again), or have it return at once when the value it is given is a "
            "torch.fx.Proxy.")
    frame = tracer.failed_in
    mod = tracer.failed_module
    where = "the model's own forward" if frame is None or not frame.qualname else \
        f"module `{frame.qualname}` ({type(mod).__name__})"
    after = ""
    if tracer.last_node is not None and tracer.last_node.op != "placeholder":
        after = f", just after {op_text(tracer.last_node)}"
    cls = type(mod).__name__ if mod is not None and frame and frame.qualname else None
    parts = [] if cls else parts_with_convolutions(model)
    if cls:
        hint = ("Mark the module as a leaf so that fx calls it without looking inside: "
                f"se_inject.apply(model, leaf_modules=[{cls}]) or "
                f"timm.layers.register_notrace_module({cls}); blocks inside a leaf get no gate. ")
    elif parts:
        named = ", ".join(f"`{n}` ({c}, {k / 1e6:.1f} M parameters)" for n, c, k in parts[:3])
        hint = ("Where the model's own forward cannot be traced (it takes a list of images, or "
                "branches on values), gate the modules that hold its CNN blocks instead, in "
                f"place: se_inject.apply({python_path(model, parts[0][0])}); its parts with "
                "convolutions: "
                f"{named}. Or make the forward traceable. ")
    else:
        hint = "Make the model's own forward traceable (no branching on tensor values). "
    hint += ("A plain function that fx cannot trace can be kept whole with "
             "se_inject.apply(model, autowrap_functions=[fn]).")
    said = f"{type(exc).__name__}: {exc}"
    if _MADE_FROM_PROXY in str(exc):
        said = ("torch.tensor() or torch.as_tensor() of a traced value, which fx cannot make "
                "a tensor of (a tensor's values, or a size where the input's is not known)")
    error = TraceError(f"torch.fx could not trace {type(model).__name__}: it failed in "
                       f"{where}{after}: {said}. {hint}")
    error.parts = tuple(n for n, _, _ in parts)
    return error


def has_forward(m: nn.Module) -> bool:
    """Whether the module can be called: a ModuleList or ModuleDict has no forward, only items."""
    return type(m).forward is not nn.Module.forward or "forward" in m.__dict__


def _callable_children(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The model's children, with the items of a child that has no forward (a ModuleList or
    ModuleDict: diffusers' UNet2DModel keeps its up and down blocks in them) in its place."""
    out = []
    for name, child in model.named_children():
        if has_forward(child):
            out.append((prefix + name, child))
        else:
            out += _callable_children(child, f"{prefix}{name}.")
    return out


def parts_with_convolutions(model: nn.Module) -> list[tuple[str, str, int]]:
    """(name, class name, parameters) of the model's children that hold convolutions, largest
    first: what to gate where the model's own forward cannot be traced (a detector's, which
    takes a list of images and branches on them)."""
    parts = [(name, type(child).__name__, sum(p.numel() for p in child.parameters()))
             for name, child in _callable_children(model)
             if not isinstance(child, nn.modules.conv._ConvNd) and
             any(isinstance(m, nn.modules.conv._ConvNd) for m in child.modules())]
    return sorted(parts, key=lambda p: -p[2])


def python_path(model: nn.Module, name: str, root: str = "model") -> str:
    """How Python names a submodule: ``model.up_blocks[0]`` for "up_blocks.0" in a
    ModuleList, ``model.heads["cls"]`` in a ModuleDict, ``model.get_submodule(...)`` where an
    attribute's name is no identifier."""
    out, m = root, model
    for part in name.split(".") if name else ():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and part.isdigit():
            out += f"[{part}]"
        elif isinstance(m, nn.ModuleDict):
            out += f"[{part!r}]"
        elif part.isidentifier():
            out += f".{part}"
        else:
            return f"{root}.get_submodule({name!r})"
        m = m._modules[part]
    return out


_OPENS: dict[type, bool] = {}  # timm no-trace class -> whether fx traces it cleanly here


def _openable(model: nn.Module, leaves: tuple[type, ...], options: TraceOptions,
              kwargs: dict) -> set[type]:
    """timm's no-trace classes in this model that fx traces without error when tried alone.

    timm keeps some blocks out of fx for feature extraction's sake (NormFreeBlock: fx 'drops'
    its in-place mul_, which only matters to passes that remove dead code; se-inject removes
    none). Each such class is tried once, on one instance; user-given leaves stay leaves."""
    try:
        from timm.layers import get_notrace_modules
        registered = set(get_notrace_modules())
    except ImportError:
        return set()
    found = {}
    for m in model.modules():
        cls = type(m)
        if cls in registered and cls not in options.leaf_modules and cls not in found:
            found[cls] = m
    out = set()
    for cls, instance in found.items():
        if cls not in _OPENS:
            trial = _ScopeTracer(tuple(c for c in leaves if c is not cls), **kwargs)
            try:
                with _NothingLeft(instance):
                    _OPENS[cls] = _holds_merge(trial.trace(instance))
            except Exception:  # stays a leaf, as timm registered it
                _OPENS[cls] = False
        if _OPENS[cls]:
            out.add(cls)
    return out


def _holds_merge(graph: fx.Graph) -> bool:
    """Whether a sum or concatenation of two or more values computed from the inputs happens
    in it: only then can a block hide inside (a norm+activation layer stays whole, and so does
    a frozen norm's ``x * scale + bias``, whose statistics fx folds into constants)."""
    live = {n for n in graph.nodes if n.op == "placeholder"}
    for n in graph.nodes:
        if n.op != "placeholder" and any(a in live for a in n.all_input_nodes):
            live.add(n)
            if n.op != "call_module" and node_kind(n, {}) in MERGE_KINDS and \
                    sum(1 for a in flat((*n.args, *n.kwargs.values())) if a in live) >= 2:
                return True
    return False


def trace_model(model: nn.Module, options: TraceOptions, n_inputs: int | None = None,
                input_shapes: Sequence[Sequence[int]] | None = None,
                dtype: torch.dtype = torch.float32) -> fx.Graph:
    """fx graph of the whole model called with ``n_inputs`` tensors (its other parameters at
    their defaults), each node's ``meta[SCOPE]`` naming its module invocation. Given the
    inputs' shapes, a forward that fx cannot trace because it reads a shape as a Python
    value is traced again at those shapes (see _ShapedTracer)."""
    leaves, kwargs = options.tracer_args()
    shaped = (input_shapes, dtype, options.size_lengths()) if input_shapes is not None \
        else None
    opened = _openable(model, leaves, options, kwargs)
    if opened:
        try:
            return _trace_called_whole(model, tuple(c for c in leaves if c not in opened),
                                       n_inputs, kwargs, shaped)
        except TraceError:
            pass  # traced alone but not in place: keep timm's registry as it is
    return _trace_called_whole(model, leaves, n_inputs, kwargs, shaped)


def _trace_called_whole(model: nn.Module, leaves: tuple[type, ...], n_inputs: int | None,
                        kwargs: dict, shaped: tuple | None = None) -> fx.Graph:
    """_trace_model, where a layer fx cannot trace that holds nothing to gate (no parameters,
    buffers or layers of its own, in any of its class's instances in the model: timm's
    DropBlock2d in training mode, whose mask size is the smaller of its block and the map) is
    called whole, as a leaf, and the model traced again. The layer runs as before."""
    while True:
        try:
            return _trace_model(model, leaves, n_inputs, kwargs, shaped)
        except TraceError as exc:
            cls = _holds_nothing_to_gate(model, getattr(exc, "failed_module", None))
            if cls is None or cls in leaves:
                raise
            leaves += (cls,)


def _holds_nothing_to_gate(model: nn.Module, failed: nn.Module | None) -> type | None:
    """The class of ``failed`` (the layer a trace of ``model`` failed in) if no instance of
    it in ``model`` has parameters, buffers or layers of its own."""
    if failed is None or failed is model or is_container(failed):
        return None
    cls = type(failed)
    for m in model.modules():
        if type(m) is cls and (m._modules or m._parameters or m._buffers):
            return None
    return cls


def _trace_model(model: nn.Module, leaves: tuple[type, ...], n_inputs: int | None,
                 kwargs: dict, shaped: tuple | None = None) -> fx.Graph:
    """The model's trace; where fx fails because the forward needs a traced value as a Python
    one, and ``shaped`` gives the input shapes and dtype, traced again at them (_ShapedTracer).
    If that fails too, the first failure is the one raised: it says where fx stopped."""
    try:
        return _trace_model_with(_ScopeTracer(leaves, n_inputs, **kwargs), model)
    except TraceError as exc:
        if shaped is None or not _reads_a_value(exc):
            raise
        first = exc
    tracer = _ShapedTracer(leaves, n_inputs, *shaped, **kwargs)
    try:  # on meta tensors: every change a layer makes to itself is undone
        return _trace_model_with(tracer, model, left=_anything)
    except TraceError:
        raise first from first.__cause__


def _reads_a_value(exc: TraceError) -> bool:
    """Whether fx failed where the forward needed a traced value as a Python one (``if``,
    ``int()``, ``len()``, iteration): a number it may know at the input's shape."""
    cause = exc.__cause__
    if isinstance(cause, fx.proxy.TraceError):
        return "control flow" in str(cause) or "iterated" in str(cause)
    return isinstance(cause, (TypeError, RuntimeError)) and (
        "Proxy" in str(cause) or "symbolic tracing" in str(cause)
        or _MADE_FROM_PROXY in str(cause))


# torch's words where torch.tensor() or torch.as_tensor() is handed a proxy as its data
_MADE_FROM_PROXY = "`__cuda_array_interface__` must be a dict"


def _trace_model_with(tracer: _ScopeTracer, model: nn.Module,
                      left: Callable[[Any], bool] = _is_proxy) -> fx.Graph:
    fn = _instance_forward(model)
    try:
        with _NothingLeft(model, left=left):
            if fn is None:
                graph = tracer.trace(model)
            else:  # the model's own forward was replaced on the instance; fx reads the class's
                graph = _trace_instance_forward(tracer, model, fn)
        setattr(graph, RETURNS, tracer.returns)
        setattr(graph, LOG, tracer.log)
        setattr(graph, CONSTANTS, tracer.constants)
        setattr(graph, VALUES_READ, frozenset(getattr(tracer, "values_read", ())))
        return graph
    except (TraceError, BlockChangedError):  # the latter: a gated block changed since
        raise
    except Exception as exc:  # fx raises many types; all mean "cannot trace"
        error = _trace_failure(model, tracer, exc)
        error.failed_module = tracer.failed_module
        raise error from exc


def _nodes_of(value):
    """``value`` with every Proxy replaced by its Node (lists, tuples and dicts followed)."""
    if isinstance(value, fx.Proxy):
        return value.node
    if isinstance(value, (list, tuple)):
        items = [_nodes_of(v) for v in value]
        return type(value)(items) if not hasattr(value, "_fields") else tuple(items)
    if isinstance(value, dict):
        return {k: _nodes_of(v) for k, v in value.items()}
    return value


def _instance_forward(module: nn.Module):
    return module.__dict__.get("forward")


def _trace_instance_forward(tracer: fx.Tracer, module: nn.Module, bound) -> fx.Graph:
    """Trace ``module`` through the forward bound on the instance rather than its class's."""
    func = getattr(bound, "__func__", None)
    if func is None:
        raise TraceError(f"{type(module).__name__} has a forward set on the instance that is not "
                         "a method; se-inject cannot trace it.")
    shim = type(type(module).__name__, (type(module),), {"forward": func})
    original = module.__class__
    try:
        module.__class__ = shim  # only for the duration of the trace; restored below
        return tracer.trace(module)
    finally:
        module.__class__ = original


@dataclass(frozen=True)
class ContainerCall:
    """A container's call in a block's trace: its name, its input, the node it returned and
    every node its layers made, the last made first (the returned one among them)."""

    qualname: str
    arg: fx.Node
    out: fx.Node
    nodes: tuple[fx.Node, ...]
    checkpoint: dict | None = None  # the settings of the checkpoint() call that ran it


def _autocast_devices() -> tuple[str, ...]:
    out = []
    for d in ("cpu", "cuda"):
        try:
            torch.get_autocast_dtype(d)
        except Exception:  # a build without the device's autocast: nothing can enter it
            continue
        out.append(d)
    return tuple(out)


_AUTOCAST_DEVICES = _autocast_devices()


def _saved_tensor_hooks():
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return None if hooks is None else hooks[0]


def _modes() -> tuple:
    """The modes ops run in that a ``with`` block in a forward can change and fx does not
    record: grad mode (``torch.no_grad()``, ``torch.enable_grad()``), inference mode, the
    saved-tensor hooks autograd packs what it keeps with (``torch.utils.checkpoint`` without
    re-entry, ``torch.autograd.graph.save_on_cpu()``), and autocast per device."""
    return (torch.is_grad_enabled(), torch.is_inference_mode_enabled(), _saved_tensor_hooks(),
            *((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
              for d in _AUTOCAST_DEVICES))


def _mode_change(entry: tuple, now: tuple) -> str:
    if now[0] != entry[0]:
        return "gradients " + ("on, as torch.enable_grad() sets" if now[0] else
                               "off, as torch.no_grad() sets")
    if now[1] != entry[1]:
        return "in inference mode" if now[1] else "outside inference mode"
    if now[2] is not entry[2]:
        return ("inside torch.utils.checkpoint (without re-entry) or another context of "
                "saved-tensor hooks (torch.autograd.graph.save_on_cpu); the trace keeps its ops, "
                "not the checkpointing or the hooks")
    for d, was, is_ in zip(_AUTOCAST_DEVICES, entry[3:], now[3:]):
        if was != is_:
            return (f"{d} autocast to {str(is_[1]).replace('torch.', '')}" if is_[0]
                    else f"{d} autocast off")
    return "in another mode"


def _autograd_function_running() -> str | None:
    """The qualified name of the torch.autograd.Function whose forward is running in this
    thread's Python stack, if one is (its first argument is autograd's context)."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "forward" and code.co_argcount:
            ctx = frame.f_locals.get(code.co_varnames[0])
            if isinstance(ctx, torch.autograd.function.FunctionCtx):
                qualname = getattr(code, "co_qualname", None)  # Python 3.11 on
                return (qualname.rsplit(".forward", 1)[0] if qualname else
                        type(ctx).__name__.removesuffix("Backward"))
        frame = frame.f_back
    return None


@contextlib.contextmanager
def _known_modes():
    """Gradients on, inference mode off, and autocast on for every device in _AUTOCAST_DEVICES
    with float32 as its type (what no forward asks for): a ``with`` in a traced forward that
    turns gradients off, or autocast off or to a half type, changes what ``_modes`` reads,
    whatever mode the caller of apply() is in. Nothing runs on data in a trace but the
    constants a forward makes, which float32 leaves as they are."""
    saved = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
             for d in _AUTOCAST_DEVICES]
    try:
        with torch.enable_grad(), torch.inference_mode(False):
            for d in _AUTOCAST_DEVICES:
                torch.set_autocast_enabled(d, True)
                torch.set_autocast_dtype(d, torch.float32)
            yield
    finally:
        for d, enabled, dtype in saved:
            torch.set_autocast_enabled(d, enabled)
            torch.set_autocast_dtype(d, dtype)


def _checkpoint_functions():
    """The code of torch.utils.checkpoint.checkpoint and of the function it calls a layer from
    (in some versions a helper it hands its arguments to), the code of its re-entrant autograd
    Function's forward, and checkpoint()'s signature; empty where this torch has none."""
    try:
        from torch.utils import checkpoint as ck
        fn = inspect.unwrap(ck.checkpoint)
        codes = {fn.__code__}
        if hasattr(ck, "_checkpoint_impl"):
            codes.add(inspect.unwrap(ck._checkpoint_impl).__code__)
        return (frozenset(codes), ck.CheckpointFunction.forward.__code__, inspect.signature(fn),
                ck.noop_context_fn)
    except Exception:  # another torch: no checkpoint to recognise
        return frozenset(), None, None, None


_CHECKPOINT, _CHECKPOINT_FUNCTION, _CHECKPOINT_SIGNATURE, _NO_CONTEXT = _checkpoint_functions()
# checkpoint()'s settings a generated call passes on where they are not the default
_CHECKPOINT_SETTINGS = ("preserve_rng_state", "determinism_check", "debug", "early_stop",
                        "respect_saved_tensors_hooks")
# settings some torch releases (2.11 among them) take through checkpoint()'s **kwargs, with the
# local each is popped into and its default
_CHECKPOINT_KWARGS = {"preserve_rng_state": ("preserve", True)}
# frames between a module's call and the code that made it, while a trace runs
_CALL_MACHINERY = frozenset((__file__, fx._symbolic_trace.__file__,
                             sys.modules[nn.Module.__module__].__file__))


def _checkpoint_calling(m: nn.Module) -> dict | None:
    """The settings of the torch.utils.checkpoint.checkpoint call that calls ``m`` itself (as
    ``checkpoint(self.layer, x, use_reentrant=False)``, or timm's ``checkpoint(block, x)``):
    ``use_reentrant`` and every other setting that is not the default; None where ``m`` is
    not called so, or with a ``context_fn``, which a generated call could not name."""
    if not _CHECKPOINT:
        return None
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename in _CALL_MACHINERY:
        frame = frame.f_back
    if frame is None or (frame.f_code not in _CHECKPOINT
                         and frame.f_code is not _CHECKPOINT_FUNCTION):
        return None
    depth = 0
    while frame is not None and frame.f_code not in _CHECKPOINT and depth < 8:
        frame, depth = frame.f_back, depth + 1  # re-entrant: checkpoint() called apply()
    if frame is None or frame.f_code not in _CHECKPOINT:
        return None
    local = frame.f_locals
    if local.get("function") is not m or local.get("context_fn", _NO_CONTEXT) is not _NO_CONTEXT:
        return None
    settings = {"use_reentrant": bool(local.get("use_reentrant", True))}
    for name in _CHECKPOINT_SETTINGS:
        param = _CHECKPOINT_SIGNATURE.parameters.get(name)
        if param is not None and name in local and local[name] != param.default:
            settings[name] = local[name]
        elif param is None and name in _CHECKPOINT_KWARGS:  # taken from **kwargs
            local_name, default = _CHECKPOINT_KWARGS[name]
            if local.get(local_name, default) != default:
                settings[name] = local[local_name]
    return settings


@dataclass
class _Checkpointed:
    """A layer torch.utils.checkpoint is calling in a block's trace: its path, the call's
    settings, and whether the trace recorded them (on its node, or its ContainerCall)."""

    layer: nn.Module
    path: str
    settings: dict
    recorded: bool = False


class _BlockTracer(UnpackingTracer):
    """Traces one module's own forward: every child module stays a single call.

    Given ``inputs`` (the call's arguments with a placeholder name at each tensor, see
    calls.py), the forward is called with exactly those: constants stay constants.

    ``mode_changes``: each mode (see ``_modes``) that part of the forward ran in, other than
    the one the trace began in, with the first node made in it. fx records the ops made under
    ``with torch.no_grad():`` or ``with torch.autocast(...):`` but not the ``with``. Where
    gradients alone are off, the nodes are marked instead (GRAD_OFF), for the generated forward
    to turn them off there again.
    """

    def __init__(self, root: nn.Module, inputs=None, constants=None,
                 leaves: tuple[type, ...] = (), lengths: dict | None = None,
                 outputs: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self._root = root
        self._outputs = outputs or {}
        self._called: dict[str, int] = defaultdict(int)
        self._leaves = leaves
        self._inputs = inputs
        self._constants_into = constants
        self._lengths = lengths
        self.containers: list[ContainerCall] = []
        self.mode_changes: dict[str, str] = {}
        self.entry = _modes()  # the modes the trace begins in (set by trace_block)
        # the layers torch.utils.checkpoint is calling, innermost last
        self._checkpoints: list[_Checkpointed] = []

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        now = _modes()
        if now != self.entry:
            if self._checkpoints:  # a checkpointed layer's call, or its container's layers
                call = self._checkpoints[-1]
                if node.op == "call_module" and node.target == call.path:
                    node.meta[CHECKPOINTED] = call.settings
                    call.recorded = True
                return node
            fn = _autograd_function_running()
            if fn is None and not now[0] and now[1:] == self.entry[1:]:
                node.meta[GRAD_OFF] = True  # (see rewrite._grad_off_blocks)
                return node
            what = (f"inside `{fn}`, the forward of a torch.autograd.Function, which autograd "
                    "runs with gradients off; the trace keeps its ops, not its backward"
                    if fn else _mode_change(self.entry, now))
            self.mode_changes.setdefault(what, node.target if node.op == "call_module"
                                         else node.name)
        return node

    def call_module(self, m, forward, args, kwargs):
        """A layer that torch.utils.checkpoint calls stays one call (its node records the
        settings, CHECKPOINTED), or a container of such layers a ContainerCall that records
        them, for the generated forward to checkpoint it as this one does; where it is neither
        (traced through), its part of the forward is one the trace cannot reproduce."""
        settings = _checkpoint_calling(m) if _modes() != self.entry else None
        if settings is None:
            out = super().call_module(m, forward, args, kwargs)
            return self._as_in_model(m, out) if self._outputs else out
        call = _Checkpointed(m, self.path_of_module(m), settings)
        self._checkpoints.append(call)
        try:
            return super().call_module(m, forward, args, kwargs)
        finally:
            self._checkpoints.pop()
            if not call.recorded:
                self.mode_changes.setdefault(
                    "inside torch.utils.checkpoint, which calls a layer whose forward the trace "
                    "goes into: it keeps that layer's ops, not the checkpointing", call.path)

    def _as_in_model(self, m: nn.Module, out):
        """A layer's output as the model's trace saw it, where that held None, a flag or a
        number (an octave convolution's missing low-frequency half, a skip that returns None):
        a forward that branches on it takes the branch it took in the model."""
        if not isinstance(out, fx.Proxy) or out.node.op != "call_module":
            return out
        name = out.node.target
        calls = self._outputs.get(name, ())
        k = self._called[name]
        self._called[name] += 1
        shape = calls[k] if k < len(calls) else "other"
        return _mirrored(out, shape) if _holds_constant(shape) else out

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """Every child, but a container, as the model's trace saw it: one that is a leaf there
        (torchvision's Conv2dNormActivation, an nn.Sequential) is one here too, so that a
        site on its call names a node this trace has."""
        return m is not self._root and (not is_container(m) or isinstance(m, self._leaves))

    def trace_through(self, m, qualname, forward, args, kwargs):
        """Traces a container's layers, recording which nodes its call made (see
        ContainerCall)."""
        if m is self._root or kwargs or len(args) != 1 or not isinstance(args[0], fx.Proxy):
            return super().trace_through(m, qualname, forward, args, kwargs)
        last = next(iter(reversed(self.graph.nodes)), None)
        out = super().trace_through(m, qualname, forward, args, kwargs)
        made = []
        for node in reversed(self.graph.nodes):
            if node is last:
                break
            made.append(node)
        if isinstance(out, fx.Proxy) and made and out.node is made[0]:
            checkpoint = None
            if self._checkpoints and self._checkpoints[-1].layer is m:
                checkpoint = self._checkpoints[-1].settings
                self._checkpoints[-1].recorded = True
            self.containers.append(ContainerCall(qualname, args[0].node, out.node, tuple(made),
                                                 checkpoint))
        return out

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        if self._inputs is None:
            return super().create_args_for_root(root_fn, is_module, concrete_args)
        from .calls import with_placeholders
        args, kwargs = with_placeholders(self._inputs, lambda name: self.create_proxy(
            "placeholder", name, (), {}))
        return (lambda: root_fn(self.root, *args, **kwargs)), []


def trace_block(block: nn.Module, options: TraceOptions, training: bool,
                inputs=None, constants: dict[str, torch.Tensor] | None = None,
                method: str = "forward", hide: Sequence[str] = (),
                outputs: dict | None = None) -> fx.Graph:
    """fx graph of ``block.forward`` (or another ``method``) of the class (not an instance
    override), in one mode; the containers it called, their layers traced, are listed in its
    CONTAINERS attribute. The tensors the forward made are added to ``constants`` (a new dict
    where None), its CONSTANTS attribute, under names no earlier trace into the same dict
    took. The instance attributes named in ``hide`` (methods apply() set on it before) are
    out of the way meanwhile: a forward that calls ``self.forward_features`` runs the class's.
    ``outputs``: what the layers the model's trace went into returned (frames.layer_outputs);
    one that returned None, a flag or a number there returns it here too."""
    leaves, kwargs = options.tracer_args()
    tracer = _BlockTracer(block, inputs, {} if constants is None else constants, leaves,
                          options.size_lengths(), outputs=outputs, **kwargs)
    tracer.traced_func_name = method
    was = block.training
    hidden = {k: block.__dict__.pop(k) for k in hide if k in block.__dict__}
    object.__setattr__(block, "training", training)  # the block's own flag only, restored below
    left = _NothingLeft(block, keeps=True)
    draws = _RandomDraws()
    try:
        with left, _known_modes(), draws:
            tracer.entry = _modes()
            graph = tracer.trace(block)
    finally:
        object.__setattr__(block, "training", was)
        block.__dict__.update(hidden)
    setattr(graph, DREW_RANDOM, draws.drew)
    setattr(graph, CONTAINERS, tracer.containers)
    setattr(graph, CONSTANTS, tracer.constants)
    setattr(graph, STATE_CHANGES, _named(block, left.changed))
    setattr(graph, MODE_CHANGES, tracer.mode_changes)
    return graph


def _holds_constant(shape) -> bool:
    """Whether a layer output's structure (frames.layer_outputs) holds a constant."""
    if not isinstance(shape, tuple):  # "tensor", "other"
        return False
    kind, *items = shape
    return kind == "c" or any(_holds_constant(e[1] if kind == "dict" else e) for e in items)


def _mirrored(proxy: fx.Proxy, shape):
    """``proxy`` given ``shape``'s structure: its items (indexed) where that has tensors,
    the constants where it has constants."""
    if shape == "tensor" or shape == "other":
        return proxy
    kind, *items = shape
    if kind == "c":
        return items[0]
    if kind == "dict":
        return {k: _mirrored(proxy[k], e) if _holds_tensor(e) else _mirrored(None, e)
                for k, e in items}
    made = [_mirrored(proxy[i], e) if _holds_tensor(e) else _mirrored(None, e)
            for i, e in enumerate(items)]
    return made if kind == "list" else tuple(made)


def _holds_tensor(shape) -> bool:
    """Whether a layer output's structure holds a tensor (or a value of unknown kind)."""
    if not isinstance(shape, tuple):  # "tensor", "other"
        return True
    kind, *items = shape
    return kind != "c" and any(_holds_tensor(e[1] if kind == "dict" else e) for e in items)


class _RandomDraws(TorchDispatchMode):
    """Notes whether an op that draws random numbers runs on real tensors in this thread (the
    mode is the thread's own): in a trace, only on a tensor the forward made itself, as proxies
    never reach the dispatcher."""

    def __init__(self):
        super().__init__()
        self.drew = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.drew = True
        return func(*args, **(kwargs or {}))


def _named(root: nn.Module, changed: list[tuple[nn.Module, str]]) -> list[str]:
    if not changed:
        return []
    names = {id(m): n for n, m in root.named_modules(remove_duplicate=False)}
    return sorted({f"{names[id(m)]}.{k}".lstrip(".") for m, k in changed})


def _function(member):
    if isinstance(member, property):
        member = member.fget
    return getattr(member, "__func__", member)


@functools.lru_cache(maxsize=None)
def _methods(cls: type, entry: str = "forward") -> tuple[Callable, ...]:
    """The class's forward (or ``entry``) and the methods and properties its code reaches on
    self."""
    seen: set[str] = set()
    out: list[Callable] = []
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        fn = _function(inspect.getattr_static(cls, name, None))
        code = getattr(fn, "__code__", None)
        if code is None:
            continue
        out.append(fn)
        for n in code_names(code) - seen:
            member = inspect.getattr_static(cls, n, None)
            if callable(member) or isinstance(member, property):
                todo.append(n)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def forward_names(cls: type, entry: str = "forward") -> frozenset[str]:
    """Every name the class's forward (or ``entry``), and the methods and properties it
    reaches on self, look up (attributes, globals and methods alike)."""
    return frozenset().union(*(code_names(fn.__code__) for fn in _methods(cls, entry)))


def other_forwards(cls: type) -> tuple[str, ...]:
    """The methods of ``cls`` named ``forward_*`` (timm's ``forward_features``, xception's
    ``forward_with_tap``): by convention, other ways to run what the forward runs, which a
    caller may call directly. Plain functions only (not properties, static or class methods);
    nn.Module's and torch's own classes' are left out."""
    names = set()
    for base in cls.__mro__:
        if base is nn.Module or _torch_own(base):
            break
        names.update(k for k, v in vars(base).items()
                     if k.startswith("forward_") and type(v) is types.FunctionType)
    return tuple(sorted(names))


def _torch_own(fn) -> bool:
    module = getattr(fn, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


def _traced_into(fn, scope: dict, name: str, wrapped: frozenset[int]) -> bool:
    """Whether a trace runs the Python of ``fn``, called as the global ``name`` of ``scope``:
    not torch's own, nor a function fx records as one call: registered with ``torch.fx.wrap``
    there, or an autowrap function (fx patches those under public names only)."""
    return not (_torch_own(fn) or (id(fn) in wrapped and not name.startswith("_"))
                or (id(scope), name) in getattr(_fx_impl, "_wrapped_fns_to_patch", {}))


def _follow(start: list[tuple[str, Callable]], wrapped: frozenset[int]
            ) -> tuple[tuple[str, Callable], ...]:
    """``start`` and the module-level functions its functions call by a global name, and
    those call in turn, that a trace runs (see _traced_into)."""
    out = list(start)
    seen = {id(fn) for _, fn in out}
    i = 0
    while i < len(out):
        fn = out[i][1]
        i += 1
        scope = getattr(fn, "__globals__", {})
        for n in sorted(code_names(fn.__code__)):
            g = scope.get(n)
            if (type(g) is types.FunctionType and id(g) not in seen
                    and _traced_into(g, scope, n, wrapped)):
                seen.add(id(g))
                out.append((f"{g.__module__}.{g.__qualname__}", g))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def reached_code(cls: type, wrapped: frozenset[int] = frozenset(),
                 entry: str = "forward") -> tuple[tuple[str, Callable], ...]:
    """The functions whose Python a trace of the class's forward runs, read from their code,
    each with the name a message shows: the forward, the methods and properties it reaches on
    self, and the module-level functions any of these calls by a global name (and those call
    in turn). torch's own functions are not followed, nor those fx records as one call
    (registered with ``torch.fx.wrap`` where they are called, or with their id in
    ``wrapped``: the tracer's autowrap functions, TraceOptions.wrapped_ids)."""
    return _follow([(f"{cls.__name__}.{fn.__name__}", fn) for fn in _methods(cls, entry)],
                   wrapped)


def module_code(module: nn.Module, wrapped: frozenset[int] = frozenset(),
                entry: str = "forward") -> tuple[tuple[str, Callable], ...]:
    """reached_code of the module's class, and the Python functions (or partials of them)
    its forward reads from the module's own attributes (``self.drop = my_drop``), and the
    methods of plain objects held so (``self.dropper = Dropper(p)``, see _held_methods),
    with what they reach: fx traces into them, and never wraps them."""
    cls = type(module)
    names = forward_names(cls, entry)
    held = []
    for k, v in module.__dict__.items():
        if k not in names:
            continue
        fn = v.func if isinstance(v, functools.partial) else v
        if type(fn) is types.FunctionType:
            if not _torch_own(fn):
                held.append((f"{cls.__name__}.{k} ({fn.__module__}.{fn.__qualname__})", fn))
        else:
            held += [(f"{cls.__name__}.{k} ({type(v).__qualname__}.{m})", f)
                     for m, f in _held_methods(v, names)]
    code = reached_code(cls, wrapped, entry)
    if not held:
        return code
    known = {id(fn) for _, fn in code}
    return code + tuple((label, fn) for label, fn in _follow(held, wrapped)
                        if id(fn) not in known)


def plain_object(obj) -> bool:
    """A Python object of a class of its own (``Dropper(p)``, a config): not a module,
    tensor, class or value, nor one of the builtins' or torch's objects."""
    cls = type(obj)
    return not (isinstance(obj, (nn.Module, torch.Tensor, type, *PLAIN))
                or not hasattr(obj, "__dict__") or cls.__module__ == "builtins"
                or _torch_own(cls))


def _held_methods(obj, names: frozenset[str]) -> list[tuple[str, Callable]]:
    """The Python methods of a plain object a module holds (``self.dropper = Dropper(p)``)
    that a trace of its forward may run: its ``__call__`` and the methods the forward names
    (``self.dropper.drop(y)``), with the methods those name in turn. Not for modules,
    tensors, classes, values, or torch's and the builtins' objects."""
    if not plain_object(obj):
        return []
    cls = type(obj)
    members = {}
    for base in reversed(cls.__mro__[:-1]):  # object's own are C
        for k, v in vars(base).items():
            f = v.fget if isinstance(v, property) else getattr(v, "__func__", v)
            if type(f) is types.FunctionType:
                members[k] = f
    out: dict[str, Callable] = {}
    todo = [k for k in members if k in names or k == "__call__"]
    while todo:
        k = todo.pop()
        if k not in out:
            out[k] = members[k]
            todo += [n for n in code_names(members[k].__code__) if n in members]
    return sorted(out.items())


def autograd_functions(code: Sequence[tuple[str, Callable]]) -> list[str]:
    """The torch.autograd.Function classes that ``code`` (reached_code, module_code) names
    as globals: a trace records what their forwards compute, never their backwards."""
    found = set()
    for _, fn in code:
        scope = getattr(fn, "__globals__", {})
        found.update(n for n in code_names(fn.__code__) if isinstance(scope.get(n), type)
                     and issubclass(scope[n], torch.autograd.Function))
    return sorted(found)


@functools.lru_cache(maxsize=4096)
def code_names(code) -> frozenset[str]:
    """Every name ``code`` and the functions defined in it look up (read by each check of a
    block's code, several per gated block)."""
    names = set(code.co_names)
    for const in code.co_consts:
        if inspect.iscode(const):
            names |= code_names(const)
    return frozenset(names)
