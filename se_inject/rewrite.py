"""Gates realised in place, in the module that owns each site; and taken out again.

A block that receives a gate gets a new ``forward`` bound on the instance: its class's forward,
traced alone by fx (children stay calls), with a call of each gate inserted at its site. The
class, every other module and every original parameter stay as they were. Everything that can
fail happens in ``prepare``; ``commit`` only assigns attributes.
"""
from __future__ import annotations

import contextlib
import copy
import copyreg
import functools
import hashlib
import importlib
import itertools
import linecache
import operator
import random
import types
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from .errors import BlockChangedError, NotGatedError, NotPicklableError, RewriteError
from .calls import RECIPE, Inputs, inputs_of, wrap_body
from .frames import local_keys
from .gate import ChannelGate, GateSpec, linear_producer, make_gate, mean_through_linear
from .plan import LocalKey, Site
from .kinds import drop_path_input
from .trace import (CHECKPOINTED, CONSTANT_PREFIX, CONTAINERS, DREW_RANDOM, GRAD_OFF,
                    MODE_CHANGES, PLAIN, STATE_CHANGES, Call, TraceOptions, UnpackingTracer,
                    _NothingLeft, autograd_functions, code_names, module_code, op_text,
                    other_forwards, plain_object, trace_block)

__all__ = ["BlockContext", "OwnerState", "owner_state", "prepare", "commit", "remove_gates",
           "GATE_PREFIX"]

STATE = "_se_inject_state"
# what a forward calls to read the grad, inference or autocast mode it runs in
MODE_READS = frozenset(("is_grad_enabled", "is_inference_mode_enabled", "is_autocast_enabled",
                        "is_autocast_cpu_enabled", "get_autocast_dtype", "get_autocast_gpu_dtype",
                        "get_autocast_cpu_dtype"))
# what a forward calls to ask whether torch.fx is tracing it: true while apply() traces, false
# at every later call
FX_READS = frozenset(("is_fx_tracing", "is_fx_symbolic_tracing", "_get_is_fx_tracing"))
# what a forward names to draw random numbers a trace does not record (``random.random()``,
# ``np.random.rand()``); torch's draws are recorded, or seen drawing while the block is traced
# (trace.DREW_RANDOM)
RANDOM_DRAWS = frozenset(("random",))
GATE_PREFIX = "se_gate"


@dataclass
class OwnerState:
    """Kept on each block that holds gates.

    gates:  gate attribute name -> where it sits in the class's forward.
    traced: per training mode, how a trace of the rewritten forward names each node
            ((op, target, k), see frames.local_keys) -> its key in the class's forward.
    """

    gates: dict[str, LocalKey] = field(default_factory=dict)
    traced: dict[bool, dict[tuple, tuple]] = field(default_factory=dict)
    methods: tuple[str, ...] = ()  # the block's forward_* methods rewritten with its forward

    def class_key(self, traced_key: tuple, training: bool) -> tuple | None:
        table = self.traced.get(training) or next(iter(self.traced.values()), {})
        return table.get(traced_key)

    def __reduce__(self):
        # A key's target may be a function pickle cannot find by its qualified name
        # (torch.nn.functional.max_pool2d is boolean_dispatch.<locals>.fn): keys travel with
        # such targets as the module and name they are found under.
        gates = {k: _keys_out(v) for k, v in self.gates.items()}
        traced = {mode: {_keys_out(a): _keys_out(b) for a, b in table.items()}
                  for mode, table in self.traced.items()}
        return _owner_state, (gates, traced, self.methods)


@dataclass(frozen=True)
class _Named:
    """A function as the module and attribute name it is found under."""

    module: str
    name: str

    def resolve(self):
        return _lookup(self.module, self.name)


def _lookup(module: str, name: str):
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _found(fn, name: str) -> bool:
    try:
        return _lookup(fn.__module__, name) is fn
    except (ImportError, AttributeError, TypeError):
        return False


def _target_out(x):
    """``x``, or the module and name it is found under where pickle would not find it by its
    qualified name. A function found under no name is left to pickle, which refuses it; the
    block's generated forward, pickled before this record, calls it too and is refused first
    (_portable), with a NotPicklableError."""
    if isinstance(x, types.FunctionType) and not _found(x, x.__qualname__) \
            and _found(x, x.__name__):
        return _Named(x.__module__, x.__name__)
    return x


def _keys_out(key: tuple) -> tuple:
    return tuple(_target_out(x) for x in key)


def _keys_in(key: tuple) -> tuple:
    return tuple(x.resolve() if isinstance(x, _Named) else x for x in key)


def _owner_state(gates: dict, traced: dict, methods: tuple[str, ...] = ()) -> OwnerState:
    return OwnerState(gates={k: _keys_in(v) for k, v in gates.items()},
                      traced={mode: {_keys_in(a): _keys_in(b) for a, b in table.items()}
                              for mode, table in traced.items()}, methods=tuple(methods))


def owner_state(module: nn.Module) -> OwnerState | None:
    return module.__dict__.get(STATE)


@dataclass(frozen=True)
class BlockContext:
    """What the model's trace says about a block: its fingerprint and how its parent calls it."""

    fingerprint: tuple | None = None
    calls: tuple[Call, ...] = ()
    outputs: dict | None = None  # what the layers it went into returned (frames.layer_outputs)


def _inputs(owner: nn.Module, block: str, calls: Sequence[Call]) -> Inputs | None:
    """How every call passes its arguments (None: plain tensors); all calls must agree."""
    specs = [inputs_of(c, type(owner)) for c in calls]
    if len({repr(s) for s in specs}) > 1:
        raise RewriteError(f"`{block}` ({type(owner).__name__}) is called from {len(specs)} places "
                           "with different arguments, and its forward depends on them; one "
                           "rewritten forward cannot serve every call. Leave it out with a rule "
                           "of your own, or mark it as a leaf.")
    return specs[0] if specs else None


@dataclass
class Prepared:
    owner: nn.Module
    new_gates: dict[str, ChannelGate]
    state: OwnerState
    forward: Callable
    constants: dict[str, torch.Tensor] = field(default_factory=dict)  # what forward reads
    methods: dict[str, Callable] = field(default_factory=dict)  # forward_* rewritten too
    left: dict[str, str] = field(default_factory=dict)  # forward_* left as they are: why


# How fx records an op when it traces the code generated for it, where that differs.
_AS_TRACED = {("call_function", operator.iadd): ("call_function", operator.add)}


def _traced_keys(graph: fx.Graph, class_keys: dict[fx.Node, tuple]) -> dict[tuple, tuple]:
    """Key each node gets in a trace of the code generated from ``graph`` -> its class key."""
    traced = local_keys(graph, rename=_AS_TRACED)
    return {traced[node]: key for node, key in class_keys.items() if node in traced}


def _insert(graph: fx.Graph, gates: dict[str, LocalKey], block: str,
            owner: nn.Module, renamed: dict[tuple, tuple] | None = None) -> dict[tuple, tuple]:
    """Put each gate's call in the block's graph; returns the graph's traced -> class keys.
    ``renamed``: this trace's key of a merge -> its key in the mode the gates were planned in
    (see _in_mode)."""
    class_keys = local_keys(graph)  # a block traced alone is one frame
    nodes = {key: node for node, key in class_keys.items()}
    for name, (op, target, k, operand, *layout) in gates.items():
        merge = nodes.get((op, target, k))
        if merge is None:
            raise RewriteError(f"`{block}`: the merge `{target}` (#{k}) seen in the model's trace "
                               "is not in a trace of the block alone; its forward depends on "
                               "something its caller passes. Leave this block out with a rule, "
                               "or mark its parent as a leaf.")
        nhwc = layout == ["nhwc"]
        if operand is None:
            gate, out = _gate_call(graph, name, merge, nhwc, after=True)
            reader = gate.args[0] if nhwc else gate
            merge.replace_all_uses_with(out, delete_user_cb=lambda user: user is not reader)
            _squeeze_through_linear(graph, gate, owner)
            continue
        args = list(merge.args)
        if operand >= len(args) or not isinstance(args[operand], fx.Node):
            raise RewriteError(f"`{block}`: operand {operand} of {op_text(merge)} is not a "
                               "tensor in a trace of the block alone.")
        drop = args[operand]
        x = (drop_path_input(drop, lambda n: owner.get_submodule(n.target))
             or _drop_module_input(drop, owner)) if len(drop.users) == 1 else None
        if x is not None:  # the gate goes in front of the branch's stochastic depth
            # (which reads x itself, or x divided by the keep probability)
            reader = drop if x in drop.args else next(
                a for a in drop.args if isinstance(a, fx.Node) and a.args[:1] == (x,))
            if len(reader.users) != 1:
                reader, x = drop, None
        if x is not None:
            with graph.inserting_before(reader):
                gate, out = _gate_call(graph, name, x, nhwc)
            reader.args = tuple(out if a is x else a for a in reader.args)
        else:
            with graph.inserting_before(merge):
                gate, args[operand] = _gate_call(graph, name, args[operand], nhwc)
            merge.args = tuple(args)
            _sum_into_gate_output(merge, args[operand])
        _squeeze_through_linear(graph, gate, owner)
    graph.lint()
    if renamed:
        class_keys = {n: renamed.get(k, k) for n, k in class_keys.items()}
    return _traced_keys(graph, class_keys)


def _drop_module_input(node: fx.Node, owner: nn.Module) -> fx.Node | None:
    """``x`` where ``node`` calls one of the block's layers on ``x`` and that layer is
    stochastic depth of a class se-inject does not know by name (mmcv's DropPath, and the
    copies of timm's early one that model code carries): the model's trace went through it,
    the block's calls it whole, and the gate goes in front of it there too."""
    if node.op != "call_module" or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    return node.args[0] if _drops_paths(owner.get_submodule(node.target)) else None


def _drops_paths(layer: nn.Module) -> bool:
    """Whether ``layer`` (holding no state, not torch's) traced alone in training mode is a
    drop path over its input (kinds.drop_path_input). Its mode is set on a shallow copy, and
    what the trace leaves in the dicts and lists the copy shares with it is taken out."""
    if layer._parameters or layer._buffers or layer._modules \
            or type(layer).__module__.split(".")[0] == "torch":
        return False
    alone = copy.copy(layer)
    alone.training = True
    try:
        with _NothingLeft(alone):
            graph = UnpackingTracer().trace(alone)
    except Exception:  # (any failure: not a drop path se-inject can see into)
        return False
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return bool(inputs) and isinstance(out, fx.Node) \
        and drop_path_input(out, lambda n: None) is inputs[0]


def _gate_call(graph: fx.Graph, name: str, x: fx.Node, nhwc: bool,
               after: bool = False) -> tuple[fx.Node, fx.Node]:
    """The gate's call on ``x`` (right after it with ``after``, else at the graph's insertion
    point) and the node that stands for its output. A channels-last map (N, H, W, C) is gated
    through its channel-first view, and the result viewed back: no copy either way."""
    steps = [("call_module", name, ())]
    if nhwc:
        steps = [("call_method", "permute", (0, 3, 1, 2)), *steps,
                 ("call_method", "permute", (0, 2, 3, 1))]
    out = x
    for op, target, dims in steps:
        with graph.inserting_after(out) if after else contextlib.nullcontext():
            out = graph.create_node(op, target, (out, *dims))
        if op == "call_module":
            gate = out
    return gate, out


def _call_containers_whole(graph: fx.Graph) -> set[str]:
    """Each container (an nn.Sequential) whose layers hold no gate and feed nothing but each
    other becomes one call of the container again, as in the class's forward. The generated
    forward then keeps working when the container is replaced by a module that computes the
    same (timm's reparameterize_model fuses a conv-norm Sequential into one convolution).
    Returns the names of the containers whose layers the generated code still names (a gate
    among them, or a squeeze taken through them)."""
    containers = getattr(graph, CONTAINERS, ())
    erased: set[fx.Node] = set()
    # Latest finished first: an outer container before the ones inside it, and a container
    # before any that feeds it (whose output, made whole later, is then passed on to it).
    for call in reversed(containers):
        made = set(call.nodes)
        if made & erased or any(user not in made for n in call.nodes if n is not call.out
                                for user in n.users):
            continue
        off = {bool(n.meta.get(GRAD_OFF)) for n in call.nodes}
        if len(off) != 1:  # (partly under a ``with torch.no_grad():``)
            continue
        # what its layers read now: a gate on the container's input stands in for the input
        # the trace recorded (torchvision's DeepLabV3 gated its ASPP's concatenation, and the
        # projection after it, made whole again, read the ungated one)
        read = {a for n in call.nodes for a in n.all_input_nodes
                if a not in made and a.op != "get_attr"}
        if len(read) != 1:
            continue
        with graph.inserting_after(call.out):
            whole = graph.call_module(call.qualname, (read.pop(),))
        if call.checkpoint is not None:
            whole.meta[CHECKPOINTED] = call.checkpoint
        if off.pop():
            whole.meta[GRAD_OFF] = True
        call.out.replace_all_uses_with(whole, delete_user_cb=lambda user: user is not whole)
        for node in call.nodes:  # users before what they use
            graph.erase_node(node)
        erased |= made
    graph.lint()
    named: set[str] = set()  # every module path the code goes through to reach a layer
    for n in graph.nodes:
        if n.op in ("call_module", "get_attr"):
            parts = n.target.split(".")
            named.update(".".join(parts[:k]) for k in range(1, len(parts)))
    return {c.qualname for c in containers if c.qualname in named}


def _checkpoint_calls(graph: fx.Graph) -> None:
    """Each layer the traced forward called through torch.utils.checkpoint (CHECKPOINTED) is
    called so again, with the same settings: ``torch.utils.checkpoint.checkpoint(self.layer,
    x, use_reentrant=False)``."""
    from torch.utils.checkpoint import checkpoint

    for node in list(graph.nodes):
        settings = node.meta.get(CHECKPOINTED) if node.op == "call_module" else None
        if settings is None:
            continue
        with graph.inserting_before(node):
            layer = graph.get_attr(node.target)
        node.op, node.target = "call_function", checkpoint
        node.args, node.kwargs = (layer, *node.args), {**node.kwargs, **settings}


def _linear_chain(node: fx.Node, owner: nn.Module) -> tuple[fx.Node, str, str | None] | None:
    """``(h, conv, norm)`` where ``node`` is ``self.norm(self.conv(h))`` or ``self.conv(h)``
    with a 1x1 convolution and a BatchNorm2d (see gate.linear_producer)."""
    def call(n):
        if n.op != "call_module" or len(n.args) != 1 or n.kwargs \
                or not isinstance(n.args[0], fx.Node):
            return None
        try:
            return owner.get_submodule(n.target)
        except AttributeError:
            return None

    norm = None
    if type(call(node)) is nn.BatchNorm2d:
        norm, node = node.target, node.args[0]
    conv = call(node)
    if conv is None or not linear_producer(conv, None):
        return None
    return node.args[0], node.target, norm


def _squeeze_through_linear(graph: fx.Graph, gate: fx.Node, owner: nn.Module) -> None:
    """Before a gate on ``norm(conv(h))``, a call that lets it take its squeeze from ``h``
    once fuse(freeze=True) has compiled the model (gate.mean_through_linear; None, and the
    usual squeeze, otherwise)."""
    chain = _linear_chain(gate.args[0], owner)
    if chain is None:
        return
    h, conv, norm = chain
    with graph.inserting_before(gate):
        attrs = [graph.get_attr(gate.target), h, graph.get_attr(conv),
                 None if norm is None else graph.get_attr(norm)]
        squeezed = graph.call_function(mean_through_linear, tuple(attrs))
    gate.args = (gate.args[0], squeezed)


_PLAIN_ADDS = {("call_function", operator.add), ("call_function", torch.add),
               ("call_method", "add")}


def _sum_into_gate_output(merge: fx.Node, gate: fx.Node) -> None:
    """``gate(u) + shortcut`` -> ``gate(u) += shortcut``: the gate's output is a fresh product
    that nothing else reads and that autograd does not keep, so the sum needs no new tensor
    (timm's hand-written blocks use ``+=`` for the same reason). Only where the gate's output
    is the first operand: a sum lays its result out as its first operand is laid out where the
    two differ, and ``shortcut + gate(u)`` on a branch whose last convolution read a permuted
    view (channels-last strides) gives a channel-first result, which ``+=`` would not, and a
    reduction after it would sum in another order (outputs no longer bit for bit)."""
    if (merge.op, merge.target) not in _PLAIN_ADDS or merge.kwargs or len(merge.args) != 2 \
            or merge.args[0] is not gate:
        return
    merge.op, merge.target, merge.args = "call_function", operator.iadd, (gate, merge.args[1])


_COMPILED: dict[tuple, Callable] = {}


def _compile(graph: fx.Graph, cls: type, method: str = "forward") -> tuple[str, Callable]:
    """The graph's code as a function ``forward(self, ...)``, each run of its nodes made with
    gradients off (see _grad_off_blocks) inside ``with torch.no_grad():``; identical code
    compiles once."""
    blocks = _grad_off_blocks(graph)
    code = graph.python_code(root_module="self")
    src, names = code.src, dict(code.globals)
    if blocks:
        src = _with_no_grad(src, blocks)
        names = {k: v for k, v in names.items() if v is not _grad_off_mark}
    return src, _forward_from_code(src, names, cls.__qualname__, method)


def _grad_off_mark() -> None:
    """Where a ``with torch.no_grad():`` begins or ends in a generated forward: a node whose
    line of code _with_no_grad replaces."""


def _grad_off_blocks(graph: fx.Graph) -> list[tuple[str, str]]:
    """Each run of nodes the trace made with gradients off (GRAD_OFF: a forward's ``with
    torch.no_grad():`` block, which fx does not record), between two marks put in the graph
    (get_attr nodes, which compute nothing, go with either side); their names."""
    runs: list[list[fx.Node]] = []
    run = None
    for node in graph.nodes:
        if node.meta.get(GRAD_OFF):
            if run is None:
                run = [node, node]
                runs.append(run)
            run[1] = node
        elif node.op != "get_attr":
            run = None
    marks = []
    for first, last in runs:
        with graph.inserting_before(first):
            begin = graph.call_function(_grad_off_mark)
        with graph.inserting_after(last):
            end = graph.call_function(_grad_off_mark)
        marks.append((begin.name, end.name))
    return marks


def _with_no_grad(src: str, blocks: list[tuple[str, str]]) -> str:
    """fx's code of a forward (one line a node) with the lines between each pair of marks
    (_grad_off_blocks) in a ``with torch.no_grad():`` block, which gives gradients back as
    they were however the block is left."""
    lines = src.split("\n")

    def line_of(name: str) -> int:
        at = [i for i, line in enumerate(lines) if line.lstrip().startswith(f"{name} = ")]
        if len(at) != 1:
            raise RewriteError(f"a generated forward has the mark `{name}` on {len(at)} lines: "
                               f"this is a bug in se-inject; please report it with the model "
                               f"(nothing was changed). The code:\n{src}")
        return at[0]

    for begin, end in blocks:
        i, j = line_of(begin), line_of(end)
        indent = lines[i][:len(lines[i]) - len(lines[i].lstrip())]
        body = lines[i + 1:j]
        if j <= i or any(not line.startswith(indent) or line[len(indent):][:1].isspace()
                         for line in body):
            raise RewriteError(f"a generated forward's marks `{begin}` and `{end}` do not hold "
                               "the lines of one block: this is a bug in se-inject; please "
                               f"report it with the model (nothing was changed). The code:\n{src}")
        lines[i:j + 1] = [f"{indent}with torch.no_grad():",
                          *(f"{indent}    {line.lstrip()}" for line in body or ["pass"])]
    return "\n".join(lines)


def _forward_from_code(src: str, names: dict, qualname: str,
                       method: str = "forward") -> Callable:
    key = (src, tuple(sorted((k, id(v)) for k, v in names.items())), method)
    fn = _COMPILED.get(key)
    if fn is None:
        digest = hashlib.sha1(src.encode()).hexdigest()[:10]
        filename = f"<se-inject {qualname}.{method} {digest}>"
        linecache.cache[filename] = (len(src), None, src.splitlines(True), filename)
        namespace = dict(names)
        exec(compile(src, filename, "exec"), namespace)  # code fx generated from the graph
        fn = namespace["forward"]
        fn.__qualname__ = f"{qualname}.{method}"
        fn.__dict__[RECIPE] = ("code", src, dict(names), qualname, method)
        _COMPILED[key] = fn
    return fn


def _dispatch(train_fn: Callable, eval_fn: Callable) -> Callable:
    def forward(self, *args, **kwargs):
        return (train_fn if self.training else eval_fn)(self, *args, **kwargs)
    forward.__qualname__ = train_fn.__qualname__
    forward.__dict__[RECIPE] = ("dispatch", train_fn, eval_fn)
    forward.__wrapped__ = train_fn  # its signature (see _guarded)
    return forward


# Pickling a gated block whole (torch.save(model), multiprocessing): its forward is a function
# generated at apply time, bound on the instance, which pickle would store as a name to look
# up on the block when loading, where no such attribute exists. Each generated function
# carries how it was made (RECIPE: fx's code and the names it uses, or a wrapper and what it
# wraps), so the pickle holds that instead, and loading makes the same function again.

@dataclass(frozen=True)
class _Portable:
    """A generated forward as pickle stores it: ``kind`` and its arguments, functions among
    them as _Portable too; fx's code with the import lines of the names it uses."""

    kind: str
    args: tuple


def _portable(fn: Callable, label: str) -> _Portable:
    kind, *args = fn.__dict__[RECIPE]
    if kind == "code":
        src, names, qualname, *method = args
        from torch.fx.graph_module import _format_import_block
        from torch.package import sys_importer
        try:
            imports = _format_import_block(names, sys_importer)
        except Exception as exc:
            raise NotPicklableError(
                f"{label}: its gated forward calls a function that cannot be imported by name "
                f"({type(exc).__name__}: {exc}), so a pickle of the model could not be loaded. "
                "Save the state_dict instead (se_inject.save, or torch.save(model.state_dict()))"
                ", or define the function at the top level of a module.") from exc
        return _Portable(kind, (src, imports, qualname, *method))
    return _Portable(kind, tuple(_portable(a, label) if _generated(a) else a for a in args))


def _generated(fn) -> bool:
    return isinstance(fn, types.FunctionType) and RECIPE in fn.__dict__


def _rebuilt(p: _Portable) -> Callable:
    if p.kind == "code":
        src, imports, qualname, *method = p.args
        names: dict = {}
        exec(compile(imports, f"<se-inject {qualname}.forward imports>", "exec"), names)
        names.pop("__builtins__", None)
        return _forward_from_code(src, names, qualname, *method)
    args = [_rebuilt(a) if isinstance(a, _Portable) else a for a in p.args]
    make = {"dispatch": _dispatch, "guard": _guarded, "signature": wrap_body}[p.kind]
    return make(*args)


def _bound_forward(owner: nn.Module, forward: _Portable) -> types.MethodType:
    return types.MethodType(_rebuilt(forward), owner)


def _method_reduction(default: Callable) -> Callable:
    """A reduction for bound methods: a generated forward as _Portable, any other method as
    ``default`` would store it."""
    def reduce_method(method: types.MethodType):
        if _generated(method.__func__) and isinstance(method.__self__, nn.Module):
            label = f"a {type(method.__self__).__name__} block"
            return _bound_forward, (method.__self__, _portable(method.__func__, label))
        return default(method)
    return reduce_method


def _register_method_reductions() -> None:
    """pickle (torch.save) reads copyreg's table; multiprocessing's pickler (torch's too, for
    processes it spawns) keeps a reduction for bound methods of its own, which wins there."""
    plain = copyreg.dispatch_table.get(types.MethodType, types.MethodType.__reduce__)
    copyreg.pickle(types.MethodType, _method_reduction(plain))
    from multiprocessing.reduction import ForkingPickler
    own = getattr(ForkingPickler, "_extra_reducers", {}).get(types.MethodType, plain)
    ForkingPickler.register(types.MethodType, _method_reduction(own))


_register_method_reductions()


def _gate_factory(owner: nn.Module, spec: GateSpec):
    # (lazily: a block such as an HRNet stage holds thousands of tensors, and the first will do)
    ref = next((t for t in itertools.chain(owner.parameters(), owner.buffers())
                if t.is_floating_point()), None)
    device = ref.device if ref is not None else None
    dtype = ref.dtype if ref is not None else None
    return lambda channels, ratio: make_gate(channels, ratio, spec, device=device, dtype=dtype)


def _draws(value) -> bool:
    """Whether a global is one of Python's or NumPy's random generators or their draws
    (``from random import uniform``, ``rng = np.random.default_rng()``)."""
    for v in (value, getattr(value, "__self__", None), type(value)):
        module = getattr(v, "__module__", None) or ""
        if (isinstance(v, random.Random) or module == "random"
                or module == "numpy.random" or module.startswith("numpy.random.")):
            return True
    return False


def random_draws(code: Sequence[tuple[str, Callable]]) -> list[str]:
    """The functions of ``code`` (reached_code, module_code: what a trace of a forward runs)
    that draw Python's or NumPy's random numbers: by name (``random.random()``,
    ``np.random.rand()``) or through a global that is a generator or one of its draws."""
    out = []
    for label, fn in code:
        scope = getattr(fn, "__globals__", {})
        names = code_names(fn.__code__)
        if names & RANDOM_DRAWS or any(n in scope and _draws(scope[n]) for n in names):
            out.append(label)
    return out


def _unrecorded(code: Sequence[tuple[str, Callable]]) -> str | None:
    """What a block's forward, or a function it runs (``code``: module_code), does that a
    trace runs once and does not record, seen in their code before tracing: calls to an
    autograd Function, reads of the grad or autocast mode, Python's or NumPy's random draws."""
    functions = autograd_functions(code)
    if functions:
        return (f"calls a torch.autograd.Function ({', '.join(f'`{f}`' for f in functions)}) "
                "in its forward: a trace records the ops its forward computes, and a forward "
                "generated from it would run them without the Function's backward")
    fx_reads = [label for label, fn in code if code_names(fn.__code__) & FX_READS]
    if fx_reads:
        return ("asks whether torch.fx is tracing it (`torch.fx._symbolic_trace.is_fx_tracing()` "
                f"in {', '.join(f'`{label}`' for label in fx_reads)}): a trace takes the branch "
                "for tracing, and a forward generated from it would take that branch at every "
                "call")
    reads = [(label, sorted(r)) for label, fn in code
             if (r := code_names(fn.__code__) & MODE_READS)]
    draws = random_draws(code)
    if not reads and not draws:
        return None
    if reads:
        what = "reads the mode it runs in ({})".format("; ".join(
            f"{', '.join(f'`torch.{r}()`' for r in names)} in `{label}`"
            for label, names in reads))
    else:
        what = ("draws Python's or NumPy's random numbers (in "
                f"{', '.join(f'`{label}`' for label in draws)})")
    return (f"{what} in its forward: a trace runs that once, and a forward generated from "
            "it would take the branch the trace took at every call")


def _not_regenerable(label: str, owner: nn.Module, what: str, part: str,
                     example: str = " (a module that is called, not traced through)"
                     ) -> RewriteError:
    cls = type(owner).__name__
    return RewriteError(f"`{label}` ({cls}) {what}. Move {part} into a layer of its own{example}, "
                        f"or pass the class as a leaf (leaf_modules=[{cls}]) to leave the blocks "
                        "it holds ungated (nothing was changed).")


@dataclass
class _Built:
    """What _build_forward makes for a block: its forward with the gates' calls in it, its
    traced -> class keys per mode, the containers whose layers the code names (see
    _call_containers_whole), the tensors its forward made while traced (which the code reads
    as attributes of the block), its other ``forward_*`` methods rewritten the same way, and
    those left as they are with why."""

    forward: Callable
    traced: dict
    inlined: frozenset[str]
    constants: dict[str, torch.Tensor]
    methods: dict[str, tuple[Callable, frozenset[str]]] = field(default_factory=dict)
    left: dict[str, str] = field(default_factory=dict)


def _build_forward(owner: nn.Module, label: str, gates: dict[str, LocalKey],
                   inputs: Inputs | None, options: TraceOptions,
                   context: BlockContext | None = None) -> _Built:
    """The block's class forward with the gates' calls in it, and its ``forward_*`` methods
    that compute what the forward computes up to every gate (see _build_method)."""
    code = module_code(owner, options.wrapped_ids())
    unrecorded = _unrecorded(code)
    if unrecorded:
        raise _not_regenerable(label, owner, unrecorded, "that part",
                               " (a module that is called, not traced through, as timm's "
                               "DropPath)")
    constants: dict[str, torch.Tensor] = {}
    context = context or BlockContext()
    # what the model's trace saw the block's forward do (not comparable once it was rewritten)
    seen = None if owner_state(owner) else _own_ops(context.fingerprint)
    compiled, traced, inlined, reference = _generate(owner, label, gates, inputs, options,
                                                     _modes_of(owner, code), constants,
                                                     seen=seen, outputs=context.outputs)
    made = _Built(_one(compiled), traced, frozenset(inlined), constants)
    if inputs is not None:
        made.forward = wrap_body(type(owner), inputs, made.forward)
    state = owner_state(owner)
    ours = state.methods if state else ()
    for name in other_forwards(type(owner)):
        if name in owner.__dict__ and name not in ours:
            continue  # set on the instance: the caller's own, not the class's
        try:
            built = _build_method(owner, label, gates, options, name, reference, constants)
        except _Left as why:
            made.left[name] = str(why)
            continue
        if built is not None:
            made.methods[name] = built
    return made


def _modes_of(owner: nn.Module, code) -> tuple[bool, ...]:
    # a forward that reads a training flag (its own, or a function's it runs, as
    # ``F.dropout(y, block.p, block.training)``) is traced in both modes
    return (True, False) if "training" in _names(code) else (owner.training,)


def _one(compiled: dict[bool, tuple[str, Callable]]) -> Callable:
    if len(compiled) == 1 or compiled[True][0] == compiled[False][0]:
        return next(iter(compiled.values()))[1]
    return _dispatch(compiled[True][1], compiled[False][1])


def _generate(owner: nn.Module, label: str, gates: dict[str, LocalKey], inputs: Inputs | None,
              options: TraceOptions, modes: tuple[bool, ...], constants: dict,
              method: str = "forward", reference: dict | None = None,
              seen: Counter | None = None, outputs: dict | None = None):
    """Per mode, ``method`` traced with the gates' calls in it, compiled; its traced -> class
    keys, the containers its code names, and its nodes as _steps gives them before the gates
    went in, with how many lead up to the last gated site and the layers those read (see
    _until_gates). Given the forward's (``reference``), raises _NotThere where the method
    reaches none of the gated sites, _Left unless it reaches every one and its steps up to
    the last of them are the forward's, or where it cannot be rewritten as the forward
    can."""
    compiled, traced, inlined, steps = {}, {}, set(), {}
    where = "" if method == "forward" else f".{method}"

    def refuse(what: str, part: str = "that part"):
        """A method is left as it is (_Left); the forward is refused."""
        if reference is not None:
            raise _Left(what)
        raise _not_regenerable(label, owner, what, part)

    planned = None  # each gate's merge as the mode the plan traced computes it
    for training in sorted(modes, key=lambda t: t != owner.training):
        if reference is not None and training not in reference:
            raise _Left("it reads the block's training flag, and the forward does not")
        try:
            graph = trace_block(owner, options, training, inputs, constants, method,
                                hide=state.methods if (state := owner_state(owner)) else (),
                                outputs=outputs if training == owner.training else None)
        except Exception as exc:
            if reference is not None:  # (one naming no layer before a gate was passed by)
                raise _Left(f"torch.fx could not trace it alone ({type(exc).__name__}: {exc})")
            if training != owner.training:  # the model's trace did not run this mode
                mode = "training" if training else "eval"
                raise _not_regenerable(
                    label, owner, f"could not be traced in {mode} mode, which its forward reads "
                    f"(self.training) and the model's trace, in the mode the model is in, did "
                    f"not run: {type(exc).__name__}: {exc}", f"the part that runs in {mode} "
                    "mode") from exc
            raise RewriteError(f"`{label}` ({type(owner).__name__}) could not be traced on its "
                               f"own: {type(exc).__name__}: {exc}. Its forward needs arguments "
                               "only its caller knows; mark its parent as a leaf "
                               "(leaf_modules=[...]) to leave it out.") from exc
        changes = getattr(graph, STATE_CHANGES)
        if changes:
            what = ("changes its own state when it runs "
                    f"({', '.join(f'`{c}`' for c in changes[:4])}"
                    f"{', ...' if len(changes) > 4 else ''}): a forward generated from a trace "
                    "of it would compute its output but would not make those changes")
            refuse(what, "the update")
        if getattr(graph, DREW_RANDOM):
            what = ("draws random numbers from a tensor it makes itself (`torch.rand(1)`, where "
                    "`torch.rand(1, device=x.device)` or `torch.rand_like(x)` would be traced): a "
                    "trace draws them once, and a forward generated from it would use those "
                    "numbers at every call")
            refuse(what)
        own_modes = getattr(graph, MODE_CHANGES)
        if own_modes:
            refuse(_own_mode_text(own_modes))
        ops = _own_ops_of(graph) if seen and training == owner.training else seen
        if ops != seen:
            extra = sorted(map(_op_name, (ops - seen).elements()))
            lacks = sorted(map(_op_name, (seen - ops).elements()))
            diff = f"with {', '.join(extra[:3])}" if extra else f"without {', '.join(lacks[:3])}"
            refuse(f"computes otherwise traced alone than in the model (alone: {diff}): a "
                   "layer it calls returns something other than tensors (None, a number, a "
                   "flag) that its forward branches on, and a trace of the block alone sees the "
                   "layer's output as a tensor, so a forward generated from it would compute "
                   "otherwise", "the branching")
        keyed, renamed = gates, None
        if len(modes) > 1:
            if planned is None:
                planned = _merges(graph, gates)
            else:
                keyed, renamed = _in_mode(graph, gates, planned, training, refuse)
        off = _grad_off_refused(graph, keyed, owner, options, method)
        if off is not None:
            refuse(_own_mode_text({"gradients off, as torch.no_grad() sets": off}))
        steps[training] = _steps(graph), *_until_gates(graph, keyed, reference is not None)
        if reference is not None:
            _same_until_gates(steps[training][0], steps[training][1], reference[training][0])
        traced[training] = _insert(graph, keyed, label + where, owner, renamed)
        named = _call_containers_whole(graph)
        inlined |= named
        checkpointed = [c.qualname for c in getattr(graph, CONTAINERS, ())
                        if c.checkpoint is not None and c.qualname in named]
        if checkpointed:
            what = (f"checkpoints `{checkpointed[0]}` (torch.utils.checkpoint), whose layers the "
                    "gated forward would have to call one by one, without the checkpointing")
            refuse(what)
        _checkpoint_calls(graph)
        _check_gates_used(graph, keyed, label, owner)
        compiled[training] = _compile(graph, type(owner), method)
    return compiled, traced, inlined, steps


def _own_mode_text(modes: dict[str, str]) -> str:
    at = "; ".join(f"from `{n}` on: {m}" for m, n in modes.items())
    return (f"runs part of its forward in a mode of its own ({at}): fx records those ops but "
            "not what set the mode (a `with` block, or an autograd Function, whose backward it "
            "leaves out too), so a forward generated from a trace of it would run them in the "
            "caller's mode")


# what a forward names to turn gradients on (again) part of the way through
_GRAD_ON = frozenset(("enable_grad", "set_grad_enabled"))


def _grad_off_refused(graph: fx.Graph, gates: dict[str, LocalKey], owner: nn.Module,
                      options: TraceOptions, method: str) -> str | None:
    """Where the nodes a forward made with gradients off (GRAD_OFF) cannot be put in a
    ``with torch.no_grad():`` block of the generated forward, the first of them, as the
    refusal names it: a gate would go on a tensor made so, or inside such a block (its merge
    is made so); the forward returns with gradients off (``torch.set_grad_enabled(False)``
    called, not entered); or it names ``torch.enable_grad`` or ``set_grad_enabled``, and a
    part run with gradients on inside such a block looks to a trace like the caller's. A
    gate on what such a block made, after it, trains as any other; the block's own ops run
    as in the model."""
    off = [n for n in graph.nodes if n.meta.get(GRAD_OFF)]
    if not off:
        return None
    first = off[0].target if off[0].op == "call_module" else off[0].name
    if off[-1].op == "output" or _names(module_code(owner, options.wrapped_ids(), method)) \
            & _GRAD_ON:
        return first
    nodes = {key: node for node, key in local_keys(graph).items()}
    for op, target, k, operand, *_ in gates.values():
        merge = nodes.get((op, target, k))
        if merge is None:
            continue  # (_insert says so)
        read = merge if operand is None or operand >= len(merge.args) else merge.args[operand]
        if merge.meta.get(GRAD_OFF) or (isinstance(read, fx.Node) and read.meta.get(GRAD_OFF)):
            return first
    return None


_OWN_OPS = ("call_function", "call_method")
# reading an item or attribute of a layer's output: a node in a trace of the block alone, where
# the layer's output is one traced value, and Python's own in the model's (a tuple, an object)
_ACCESS = (operator.getitem, getattr)


def _own_ops(fingerprint: tuple | None) -> Counter | None:
    """The functions and methods a block's forward called in the model's trace (from its
    frame's fingerprint, frames.fingerprints), but reading items and attributes."""
    if fingerprint is None:
        return None
    return Counter((e[0], e[1]) for e in fingerprint[1]
                   if e[0] in _OWN_OPS and e[1] not in _ACCESS)


def _own_ops_of(graph: fx.Graph) -> Counter:
    """The same of a block traced alone."""
    return Counter((n.op, n.target) for n in graph.nodes
                   if n.op in _OWN_OPS and n.target not in _ACCESS)


def _op_name(op: tuple) -> str:
    return f"`{getattr(op[1], '__name__', op[1])}`"


def _operands_from(node: fx.Node) -> tuple:
    """What each operand of ``node`` is computed from: the layers, parameters and inputs of
    the block it reads (a constant: its value)."""
    out = []
    for a in node.args:
        if not isinstance(a, fx.Node):
            out.append(("constant", repr(a)))
            continue
        seen, todo, read = {a}, [a], set()
        while todo:
            n = todo.pop()
            if n.op in ("call_module", "get_attr", "placeholder"):
                read.add((n.op, n.target))
            for p in n.all_input_nodes:
                if p not in seen:
                    seen.add(p)
                    todo.append(p)
        out.append(frozenset(read))
    return tuple(out)


def _merges(graph: fx.Graph, gates: dict[str, LocalKey]) -> dict[str, tuple]:
    """Each gate's merge in ``graph`` (a trace in the mode the plan was made in) as
    _operands_from gives it."""
    nodes = {key: node for node, key in local_keys(graph).items()}
    return {name: _operands_from(nodes[key[:3]]) for name, key in gates.items()
            if key[:3] in nodes}


def _fits(planned: tuple, other: tuple, reads: bool) -> bool:
    """Whether a merge of the other training mode has the planned one's form: the same
    constants where it has constants, tensors where it has tensors; with ``reads``, each
    tensor also computed from what the planned one is (and maybe more: a layer that runs in
    training only, as a dropout)."""
    return len(planned) == len(other) and all(
        a == b if isinstance(a, tuple) or isinstance(b, tuple) else not reads or a <= b
        for a, b in zip(planned, other))


def _in_mode(graph: fx.Graph, gates: dict[str, LocalKey], planned: dict[str, tuple],
             training: bool, refuse: Callable) -> tuple[dict[str, LocalKey], dict[tuple, tuple]]:
    """The gates' keys in a trace of the block in the training mode the plan was not made in,
    and that trace's key of each moved merge -> its planned key. A forward that computes more
    ops of the merge's kind in one mode than in the other before it (efficientnet_pytorch's
    drop connect adds a number to random ones in training) numbers the merge otherwise."""
    keys = local_keys(graph)
    nodes = {key: node for node, key in keys.items()}
    keyed, renamed = {}, {}
    for name, key in gates.items():
        want = planned.get(name)
        node = nodes.get(key[:3])
        found = []
        for reads in (True, False):  # the same op by what it reads, else by its form
            if want is None or (node is not None and _fits(want, _operands_from(node), reads)):
                found = [node]
                break
            found = [n for k, n in nodes.items() if k[:2] == key[:2]
                     and _fits(want, _operands_from(n), reads)]
            if len(found) == 1:
                break
        if len(found) == 1 and found[0] is node:
            keyed[name] = key
            continue
        if len(found) != 1:
            refuse(f"computes otherwise in training and in eval mode (it reads self.training): "
                   f"its merge `{getattr(key[1], '__name__', key[1])}` (#{key[2]}), gated in "
                   f"the mode the model was in, matches {len(found) or 'no'} op(s) in "
                   f"{'training' if training else 'eval'} mode, so its gate has no one place in "
                   "both modes", "the part that differs")
        keyed[name] = (*keys[found[0]], *key[3:])
        renamed[keys[found[0]]] = key[:3]
    return keyed, renamed


class _Left(Exception):
    """Why a ``forward_*`` method of a gated block is left as it is."""


class _NotThere(Exception):
    """A ``forward_*`` method that reaches none of the gated sites: nothing to rewrite."""


# Ways code reaches a module's layers without naming them: a method naming any of these is
# traced whatever names it holds.
_BY_NAME = frozenset({"getattr", "__getattr__", "__getattribute__", "__dict__", "vars",
                      "_modules", "_parameters", "_buffers", "children", "named_children",
                      "modules", "named_modules", "get_submodule", "get_parameter",
                      "get_buffer", "parameters", "named_parameters", "buffers",
                      "named_buffers", "state_dict"})


def _share(owner: nn.Module, names: frozenset[str], region: frozenset[str]) -> bool:
    """Whether the layers and tensors ``owner`` holds under ``names`` and under ``region``
    have any module, parameter or buffer in common (``self.first = self.body[0]``: a trace
    names the layer by the first name it has)."""
    def held(keys):
        out = set()
        for k in keys:
            for store in (owner._modules, owner._parameters, owner._buffers):
                v = store.get(k)
                if isinstance(v, nn.Module):
                    for m in v.modules():
                        out.add(id(m))
                        out.update(id(t) for t in itertools.chain(
                            m._parameters.values(), m._buffers.values()) if t is not None)
                elif isinstance(v, torch.Tensor):
                    out.add(id(v))
        return out
    return not held(names).isdisjoint(held(region))


def _build_method(owner: nn.Module, label: str, gates: dict[str, LocalKey],
                  options: TraceOptions, method: str, reference: dict, constants: dict
                  ) -> tuple[Callable, frozenset[str]] | None:
    """``method`` (a ``forward_*`` of the block's class, called with tensors) with the gates'
    calls in it, and the containers its code names; None where it reaches none of the gated
    sites (timm's ``forward_head``). Only a method that computes what the forward computes,
    node for node, up to the last gated site is rewritten (xception's ``forward_with_tap``,
    which also returns a tensor from inside the block; a model's ``forward_features``, where
    the model's own forward holds the gates); _Left says why another is left as it is."""
    code = module_code(owner, options.wrapped_ids(), method)
    names = _names(code)
    region = frozenset().union(*(r[2] for r in reference.values()))
    if region and not names & (region | _BY_NAME) and not _share(owner, names, region):
        return None  # it names no layer the forward reads up to its gates: nothing to trace
    unrecorded = _unrecorded(code)
    if unrecorded:
        raise _Left(unrecorded)
    try:
        compiled, _, inlined, _ = _generate(owner, label, gates, None, options,
                                            _modes_of(owner, code), constants, method, reference)
    except _NotThere:
        return None
    except RewriteError as exc:
        raise _Left(str(exc)) from None
    return _one(compiled), frozenset(inlined)


def _steps(graph: fx.Graph) -> list[tuple]:
    """Each node of ``graph`` as what it computes from which earlier node (by position):
    equal lists compute the same, whatever the nodes and placeholders are named."""
    position = {n: i for i, n in enumerate(graph.nodes)}
    out = []
    for n in graph.nodes:
        if n.op == "placeholder":
            out.append((n.op,))
            continue
        args = fx.node.map_arg(n.args, lambda a: ("node", position[a]))
        kwargs = fx.node.map_arg(n.kwargs, lambda a: ("node", position[a]))
        out.append((n.op, n.target, repr(args), repr(kwargs)))
    return out


def _until_gates(graph: fx.Graph, gates: dict[str, LocalKey], other: bool
                 ) -> tuple[int, frozenset[str]]:
    """How many nodes of ``graph`` lead up to its last gated site, and the attributes of the
    block that those read (the first part of each layer's name). For ``other`` than the
    forward, raises _NotThere where none of the sites is in the graph, _Left where some are
    not."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    at = {key: position[node] for node, key in local_keys(graph).items()}
    found = [at.get(key[:3]) for key in gates.values()]
    if other and all(i is None for i in found):
        raise _NotThere()
    if other and any(i is None for i in found):
        raise _Left("it reaches some of the block's gated sites, not all")
    # (a site the forward's own trace lacks is _insert's to report)
    last = max((i for i in found if i is not None), default=-1) + 1
    region = frozenset(n.target.split(".")[0] for n in itertools.islice(graph.nodes, last)
                       if n.op in ("call_module", "get_attr"))
    return last, region


def _same_until_gates(steps: list[tuple], last: int, reference: list[tuple]) -> None:
    """Raise _Left unless ``steps`` compute what the forward's (``reference``) compute up to
    the last gated site."""
    if steps[:last] != reference[:last]:
        raise _Left("it computes otherwise than the forward before the gated sites")


def _check_gates_used(graph: fx.Graph, gates: dict[str, LocalKey], label: str,
                      owner: nn.Module) -> None:
    """Every gate's output is read in the generated forward: a gate computed and then passed
    by (its input read in its place) would leave the model as it was, with a gate that
    trains nothing. Raised before anything changes."""
    for node in graph.nodes:
        if node.op == "call_module" and node.target in gates and not node.users:
            raise RewriteError(
                f"`{label}` ({type(owner).__name__}): the forward generated for its gate "
                f"`{node.target}` does not read the gate's output. This is a bug in se-inject; "
                "please report it with the model. Pass the class as a leaf "
                f"(leaf_modules=[{type(owner).__name__}]) to leave it ungated (nothing was "
                "changed).")


_MODULE_OWN = frozenset(nn.Module().__dict__) | {"forward", STATE}
_MISSING = object()


def _names(code: Sequence[tuple[str, Callable]]) -> frozenset[str]:
    """Every name the functions of ``code`` (module_code) look up."""
    return frozenset().union(*(code_names(fn.__code__) for _, fn in code))


def _attributes_read(owner: nn.Module, wrapped: frozenset[int], method: str = "forward"
                     ) -> tuple[tuple[str, object], ...]:
    """The plain attributes (flags, numbers, strings, None) and the functions held in
    attributes (``self.act = torch.relu``, which fx records or traces into) of ``owner``
    that its forward (or ``method``) or a function it runs reads, with their values: tracing
    took them as they are now. Not the ``forward_*`` methods apply() sets on the block."""
    names = _names(module_code(owner, wrapped, method))
    state = owner_state(owner)
    own = _MODULE_OWN.union(state.methods if state else ())
    reads = []
    for k, v in owner.__dict__.items():
        if k not in names or k in own:
            continue
        if type(v) in PLAIN or callable(v) and not isinstance(v, type):
            reads.append((k, v))
        if _held_object(v):  # ``self.cfg = Config(...)``, read as ``self.cfg.scale``
            if not callable(v):
                reads.append((k, v))
            reads += [(f"{k}.{a}", x) for a, x in vars(v).items()
                      if a in names and type(x) in PLAIN]
    return tuple(sorted(reads, key=lambda kv: kv[0]))


def _held_object(v) -> bool:
    """A plain object a block holds (a config, a helper with settings; see trace.plain_object),
    not a function."""
    return plain_object(v) and not isinstance(v, (types.FunctionType, types.MethodType,
                                                  types.BuiltinFunctionType,
                                                  functools.partial))


def _containers(owner: nn.Module, names: frozenset[str], label: str
                ) -> tuple[tuple[str, type, int], ...]:
    """Each container whose layers the generated forward names: its class and length. Raises
    RewriteError where one holds hooks: the generated forward never calls it, so they would
    not run (and a trace runs a forward hook's code once, into the forward)."""
    out = []
    for name in sorted(names):
        c = owner.get_submodule(name)
        if _hooks(c):
            raise RewriteError(_hooked(owner, label, name, c, after=False))
        out.append((name, type(c), len(c)))
    return tuple(out)


def _hooks(m: nn.Module) -> bool:
    return bool(m._forward_pre_hooks or m._forward_hooks or m._backward_pre_hooks
                or m._backward_hooks)


def _hooked(block: nn.Module, label: str, name: str, container: nn.Module, after: bool) -> str:
    what = (f"a hook was registered on `{name}` ({type(container).__name__}) after "
            "se_inject.apply" if after else
            f"a hook is registered on `{name}` ({type(container).__name__})")
    then = ("Register it on the block or on one of those layers instead, or take the gates "
            "out first (se_inject.remove)." if after else
            "Register it on the block or on one of those layers instead (nothing was changed).")
    return (f"`{label}` ({type(block).__name__}): {what}. The gated forward calls its layers "
            "one by one (a gate sits among them, or takes its squeeze through them) and never "
            f"calls `{name}` itself: the hook would not run. {then}")


def _guarded(forward: Callable, label: str, reads: tuple[tuple[str, object], ...],
             containers: tuple[tuple[str, type, int], ...]) -> Callable:
    """``forward``, after a check that the attributes it was traced with still hold the values
    it was traced with, and that the containers whose layers it names are still of the class
    and length they had, with no hooks (a few attribute reads per call)."""
    if not reads and not containers:
        return forward
    paths = tuple((name, name.split("."), value) for name, value in reads)

    def guarded(self, *args, **kwargs):
        for name, path, value in paths:
            now = self
            for part in path:  # (one step but for the settings of a held object)
                now = getattr(now, part, _MISSING)
            if now is not value and (type(now) is not type(value) or now != value):
                _changed(self, label, name,
                         _a(type(value).__name__) if _held_object(value) else repr(value), now)
        for name, cls, n in containers:
            try:
                now = self.get_submodule(name)
            except AttributeError:
                now = _MISSING
            if type(now) is not cls or len(now) != n:
                _changed(self, label, name, f"{_a(cls.__name__)} of {n} layers", now)
            if _hooks(now):
                raise BlockChangedError(_hooked(self, label, name, now, after=True))
        return forward(self, *args, **kwargs)
    guarded.__qualname__ = forward.__qualname__
    guarded.__dict__[RECIPE] = ("guard", forward, label, reads, containers)
    # inspect.signature and fx's trace of a model whose own forward this is (plan() or apply()
    # again) read the parameters of the wrapped forward, not (*args, **kwargs)
    guarded.__wrapped__ = forward
    return guarded


def _a(noun: str) -> str:
    return ("an " if noun[:1] in "AEIOU" else "a ") + noun


def _changed(block: nn.Module, label: str, name: str, was: str, now: object):
    if now is _MISSING:
        now = "nothing (deleted)"
    elif isinstance(now, nn.Sequential):
        now = f"{_a(type(now).__name__)} of {len(now)} layers"
    else:
        now = repr(now) if type(now) in PLAIN else _a(type(now).__name__)
    raise BlockChangedError(
        f"`{label}` ({type(block).__name__}) changed after se_inject.apply: its forward reads "
        f"`{name}`, which was {was} when the gates went in and is {now} now (a "
        "re-parameterisation such as timm's reparameterize_model, or a setting changed by "
        "hand). Its gated forward was generated from the block as it was and would compute "
        "something else. Change blocks before se_inject.apply, or re-gate after the change "
        "keeping the trained gates: README.md, \"Changing a gated model\".")


def prepare(model: nn.Module, sites: Sequence[Site], spec: GateSpec, options: TraceOptions,
            contexts: dict[str, BlockContext] | None = None) -> list[Prepared]:
    """Build every new forward and gate without touching the model.

    Blocks of one class whose forwards made the same nodes in the model's trace (equal
    fingerprints), are called alike and get gates at the same places share one forward.
    """
    contexts = contexts or {}
    built: dict[tuple, tuple[Callable, dict]] = {}
    modules = dict(model.named_modules())
    by_block: dict[str, list[Site]] = defaultdict(list)
    for s in sites:
        by_block[s.block].append(s)
    out = []
    for block, block_sites in by_block.items():
        owner, label = modules[block], block or "(model)"
        old = owner_state(owner)
        if old is None and "forward" in owner.__dict__:
            raise RewriteError(f"`{label}` ({type(owner).__name__}) has a forward set on the "
                               "instance; se-inject rewrites the class's forward and would lose "
                               "it. Remove the override or mark the module as a leaf.")
        gates = dict(old.gates) if old else {}
        make = _gate_factory(owner, spec)
        new_gates = {}
        for s in block_sites:
            name = s.gate.rsplit(".", 1)[-1]
            gates[name] = s.key
            new_gates[name] = make(s.channels, s.ratio)
        context = contexts.get(block, BlockContext())
        inputs = _inputs(owner, label, context.calls)
        group = None if context.fingerprint is None else (
            type(owner), owner.training, context.fingerprint, repr(inputs),
            tuple(sorted(gates.items())))
        if group is None or group not in built:
            made = _build_forward(owner, label, gates, inputs, options, context)
            if group is not None and not made.constants:  # (a block's constants are its own)
                built[group] = made
        else:
            made = built[group]
        forward = _guarded(made.forward, label, _attributes_read(owner, options.wrapped_ids()),
                           _containers(owner, made.inlined, label))
        out.append(Prepared(owner=owner, new_gates=new_gates,
                            state=OwnerState(gates=gates, traced=dict(made.traced),
                                             methods=tuple(sorted(made.methods))),
                            forward=forward, constants=made.constants,
                            methods={name: _guarded(fn, label, _attributes_read(
                                owner, options.wrapped_ids(), name), _containers(owner, names, label))
                                for name, (fn, names) in made.methods.items()},
                            left=dict(made.left)))
    return out


def commit(prepared: Sequence[Prepared]) -> None:
    """Attach gates and forwards. Only attribute assignments: nothing here can fail halfway."""
    for p in prepared:
        for name, gate in p.new_gates.items():
            p.owner._modules[name] = gate
        _drop_constants(p.owner)  # of a forward generated before, with fewer gates
        old = owner_state(p.owner)
        for name in old.methods if old else ():
            p.owner.__dict__.pop(name, None)
        p.owner.__dict__.update(p.constants)
        p.owner.__dict__["forward"] = types.MethodType(p.forward, p.owner)
        for name, fn in p.methods.items():
            p.owner.__dict__[name] = types.MethodType(fn, p.owner)
        p.owner.__dict__[STATE] = p.state


def _drop_constants(owner: nn.Module) -> None:
    for k in [k for k in owner.__dict__ if k.startswith(CONSTANT_PREFIX)]:
        del owner.__dict__[k]


def remove_gates(model: nn.Module) -> int:
    """Take every gate out; each block gets its class's forward back. Returns the gate count.
    (remove() has checked that ``model`` is a module.)"""
    owners = [m for m in model.modules() if owner_state(m) is not None]
    if not owners:
        raise NotGatedError(f"{type(model).__name__} holds no se-inject gates: nothing to remove "
                            "(gates are added by se_inject.apply)")
    n = 0
    for m in owners:
        state = m.__dict__.pop(STATE)
        for name in state.gates:
            del m._modules[name]
            n += 1
        m.__dict__.pop("forward", None)
        for name in state.methods:
            m.__dict__.pop(name, None)
        _drop_constants(m)
    return n
