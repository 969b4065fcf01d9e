"""The tracer names parameters and buffers, and unpacks proxies, as torch.fx does."""
import collections
import math
import operator
import types

import pytest
import timm
import torch
import torch.fx as fx
from torch import nn

from se_inject.trace import (_FX_HOOKS, _UNPACKS, CONSTANT_PREFIX, CONSTANTS, TraceOptions,
                             _by_position, trace_block, trace_model)

# tests of what a tracing session patches; where this torch's fx lacks what sessions need,
# they do nothing and every trace patches as fx does (se_inject.trace._FX_HOOKS)
needs_sessions = pytest.mark.skipif(not _FX_HOOKS, reason="tracing sessions are off on this "
                                    "torch: its fx keeps its tracing flag process-wide")


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 3, 1)
        self.b = nn.Conv2d(3, 3, 1)
        self.b.weight = self.a.weight  # one parameter under two names
        self.gamma = nn.Parameter(torch.ones(3, 1, 1))
        self.register_buffer("scale", torch.full((3, 1, 1), 2.0))
        self.register_buffer("step", torch.zeros(()))

    def forward(self, x):
        self.step = self.step + 1  # a buffer replaced by a new tensor while running
        y = self.a(x) * self.gamma + self.b(x) * self.scale
        return y * self.gamma + self.step


def _get_attrs(graph: fx.Graph) -> list[str]:
    return [n.target for n in graph.nodes if n.op == "get_attr"]


@pytest.mark.parametrize("trace", [
    lambda m: trace_model(m, TraceOptions(), n_inputs=1),
    lambda m: trace_block(m, TraceOptions(), training=m.training),
], ids=["model", "block"])
def test_get_attr_nodes_match_plain_fx(trace):
    # both tracers look parameters and buffers up by identity, where fx walks them all
    model = _Shared()
    ours = _get_attrs(trace(model))
    theirs = _get_attrs(fx.symbolic_trace(_Shared()).graph)
    assert ours == theirs
    assert ours.count("gamma") == 1  # one node, used twice
    assert "scale" in ours and "step" in ours


class _Counted(nn.Module):
    """A layer holding a tensor as a plain attribute (neither parameter nor buffer), which
    counts the walks over its children."""
    walks = 0

    def __init__(self, t):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.t = t

    def named_children(self):
        type(self).walks += 1
        return super().named_children()

    def forward(self, x):
        return self.conv(x) * self.t


class _Attributes(nn.Module):
    def __init__(self):
        super().__init__()
        shared = torch.full((3, 1, 1), 3.0)
        self.a, self.b = _Counted(shared), _Counted(shared)  # one tensor under two names
        self.mask = torch.full((1, 3, 1, 1), 2.0)

    def forward(self, x):
        return self.a(x) + self.b(x) * self.mask + self.a.t


class _ChildrenWhole(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return "." not in qualname or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("ours, fx_tracer", [
    (lambda m: trace_model(m, TraceOptions(), n_inputs=1), fx.Tracer),
    (lambda m: trace_block(m, TraceOptions(), training=m.training), _ChildrenWhole),
], ids=["model", "block"])
def test_plain_tensor_attributes_are_named_as_fx_names_them(ours, fx_tracer):
    # the table of tensor attributes is filled when first read, by fx's walk in fx's order:
    # the tensor held as a.t and b.t is b.t in both graphs (a block's trace calls its
    # children whole)
    names = _get_attrs(ours(_Attributes()))
    assert names == _get_attrs(fx_tracer().trace(_Attributes()))
    assert "b.t" in names and "a.t" not in names and "mask" in names


def test_a_forward_reading_no_plain_tensor_attribute_is_traced_without_walking_them():
    # fx walks every module's attributes before each trace; a forward that reads only
    # parameters and buffers never needs the table, and the walk is not made
    model = nn.Sequential(_Counted(torch.ones(3, 1, 1)))
    model[0].forward = types.MethodType(lambda self, x: self.conv(x), model[0])
    _Counted.walks = 0
    trace_model(model, TraceOptions(), n_inputs=1)
    assert _Counted.walks == 0
    fx.symbolic_trace(model)
    assert _Counted.walks == 1  # (fx's own tracer walks it)


def test_planning_leaves_every_buffer_as_it_was():
    # Inception-v3's BatchNormAct2d is traced alone once to see whether it hides a block; its
    # forward counts batches in place on its own buffer, which fx does not turn into a proxy
    import timm
    import se_inject
    from se_inject import trace
    trace._OPENS.clear()            # each class is tried once per process
    model = timm.create_model("inception_v3").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    se_inject.plan(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _CountingNorm(nn.BatchNorm2d):
    """A norm whose forward copies torch's BatchNorm2d's: it counts batches in place, on a
    buffer that fx leaves a real tensor. Not torch.nn's own, so fx traces through it."""

    def forward(self, x):
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight,
                                        self.bias, self.training, self.momentum, self.eps)


class _CountingBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1), _CountingNorm(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1), _CountingNorm(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def test_applying_leaves_the_buffers_of_layers_traced_through_as_they_were():
    import se_inject
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), _CountingNorm(16), nn.ReLU(),
                          _CountingBlock(16), _CountingBlock(16)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    se_inject.apply(model, input_size=(3, 16, 16))
    assert sum(isinstance(m, se_inject.ChannelGate) for m in model.modules()) == 2
    after = model.state_dict()
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []


class _Unpacks(nn.Module):
    """Every way a forward can unpack a traced value."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        a, b = x.chunk(2, dim=1)                      # a call's result
        n, c, h, w = x.shape                          # an attribute of a proxy
        (p, q), r = (a.split(1, dim=1), b)            # nested, in one statement
        s = [t * 2 for t in (p, q)]                   # a real tuple: no unpacking of a proxy
        y = torch.cat([p, q, r, *s], dim=1)
        y = y[:, :c] + self._half(self.conv(x))
        return y.view(n, c, h * w).mean(-1)

    def _half(self, x):
        first, second = torch.split(x, 2, dim=1)      # in another function of the module
        return torch.cat([second, first], dim=1)


def _ops(graph: fx.Graph) -> list[tuple]:
    # fx stores a tensor made while tracing on the module as _tensor_constantN; se-inject
    # keeps it with the graph as _se_inject_constantN (test_constants_stay_off_the_model);
    # and records a concatenation's dim=1 by position (trace._by_position)
    def named(text):
        return text.replace("_tensor_constant", CONSTANT_PREFIX)

    def positional(n):
        return _by_position(n.op, n.target, n.args, n.kwargs) if n.op == "call_function" \
            else (n.args, n.kwargs)
    return [(n.op, named(str(n.target)), named(str(positional(n)))) for n in graph.nodes]


def test_unpacking_gives_the_graph_plain_fx_gives():
    _UNPACKS.clear()
    ours = trace_model(_Unpacks(), TraceOptions(), n_inputs=1)
    theirs = fx.symbolic_trace(_Unpacks()).graph
    assert _ops(ours) == _ops(theirs)
    getitems = [n for n in ours.nodes if n.target is operator.getitem]
    assert len(getitems) == 2 + 4 + 2 + 2 + 1  # chunk, shape, split, torch.split; y[:, :c]
    # read from the table, not by fx's disassembly: forward's and _half's code were looked up
    assert {c.co_name for c in _UNPACKS} >= {"forward", "_half"}
    model = _Unpacks()
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(fx.GraphModule(model, ours)(x), model(x))


_Pair = collections.namedtuple("_Pair", "a b")  # fx's create_arg makes a node that builds it


def _pair_sum(pair):
    return pair.a + pair.b


fx.wrap("_pair_sum")


class _ArgKinds(nn.Module):
    """A forward whose calls take every kind of argument fx turns into a graph argument."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.w = nn.Parameter(torch.randn(4, 1, 3, 3))
        self.table = torch.arange(4.0).view(1, 4, 1, 1)  # neither a parameter nor a buffer

    def forward(self, x):
        y = self.conv(x) + self.conv(x * 0.5)                  # one module called twice
        y = nn.functional.conv2d(y, self.w, None, 1, 1, 1, 4)  # a parameter, None, ints
        y = y[..., 1:-1, ::2]                                  # Ellipsis and slices
        y = y.to(torch.float32, memory_format=torch.contiguous_format)
        y = torch.cat((y, y * self.table), 1)[:, :4]           # a constant tensor, a tuple
        y = self.norm(y).permute([0, 2, 3, 1])                 # a list
        y = nn.functional.layer_norm(y, (4,), eps=1e-5).permute(0, 3, 1, 2)
        y = _pair_sum(_Pair(y, y + 1))                         # a named tuple
        return y.flatten(1).mean(dim=-1, keepdim=True)


def test_every_kind_of_argument_gives_the_graph_plain_fx_gives():
    ours = trace_model(_ArgKinds(), TraceOptions(), n_inputs=1)
    theirs = fx.symbolic_trace(_ArgKinds()).graph
    assert [(n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in ours.nodes] == \
        [(n.op, str(n.target), repr(n.args), repr(n.kwargs)) for n in theirs.nodes]
    assert [type(a) for n in ours.nodes for a in n.args] == \
        [type(a) for n in theirs.nodes for a in n.args]
    pair = next(n for n in ours.nodes if n.target is _pair_sum).args[0]
    assert pair.op == "call_function" and pair.target is _Pair
    model = _ArgKinds()
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(fx.GraphModule(model, ours)(x), model(x))


@pytest.mark.parametrize("body", ["star", "loop"])
def test_an_unpacking_fx_cannot_trace_fails_as_in_fx(body):
    class M(nn.Module):
        def forward(self, x):
            if body == "star":
                a, *rest = x.chunk(3, dim=1)  # a count fx cannot know
                return a
            return sum(t for t in x.chunk(2, dim=1))

    with pytest.raises(Exception) as theirs:
        fx.symbolic_trace(M())
    with pytest.raises(Exception) as ours:
        trace_model(M(), TraceOptions(), n_inputs=1)
    assert "iter" in str(theirs.value).lower()
    assert str(theirs.value).split(".")[0] in str(ours.value)


# A tracing session: one patch of module calls for every trace in it


def _scaled(x, n):
    return x / n


fx.wrap("_scaled")  # a function fx records as one call, as timm registers its own


class _Wrapped(nn.Module):
    """Calls a function registered with torch.fx.wrap and one of math's (fx's autowrap module)
    on traced values: fx puts a wrapper in place of each for every trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        return _scaled(y, math.sqrt(y.shape[1])) + x.mean((1,), keepdim=True)


def _snapshot(graph: fx.Graph) -> list[tuple]:
    from se_inject.trace import SCOPE
    return [(*op, n.meta.get(SCOPE)) for op, n in zip(_ops(graph), graph.nodes)]


def _module_patched() -> bool:
    from torch.fx import _symbolic_trace as fx_impl
    return nn.Module.__call__ is not fx_impl._orig_module_call \
        or nn.Module.__getattr__ is not fx_impl._orig_module_getattr


def _state(model: nn.Module | list) -> tuple:
    """What a session patches: nn.Module's and the model's classes' own call and attribute
    methods (or those of the listed modules'), the flag fx reads on nn.Module's, and torch's
    global forward pre-hooks."""
    from torch.fx import _symbolic_trace as fx_impl
    from torch.nn.modules import module
    modules = model.modules() if isinstance(model, nn.Module) else model
    classes = sorted({type(m) for m in modules} | {nn.Module}, key=str)
    return ([(c, n, c.__dict__.get(n)) for c in classes for n in ("__call__", "__getattr__")],
            hasattr(fx_impl._orig_module_call, "__fx_already_patched"),
            dict(module._global_forward_pre_hooks), fx_impl._create_wrapped_func,
            math.sqrt, _scaled)


@needs_sessions
@pytest.mark.parametrize("name", ["resnet18", "test_convnext", "inception_v3", "wrapped"])
@pytest.mark.parametrize("per_class", [True, False])
def test_a_session_traces_what_fx_patching_each_trace_traces(name, per_class):
    import timm
    from se_inject.trace import trace_block, tracing_session
    if name == "wrapped":  # the second trace in the session reuses the first's wrappers
        model = nn.Sequential(_Wrapped(), _Wrapped())
        block = model[1]
        assert {n.target for n in fx.symbolic_trace(block).graph.nodes} >= {_scaled, math.sqrt}
    else:
        model = timm.create_model(name).eval()
        block = next(m for m in model.modules() if type(m).__name__ in
                     ("BasicBlock", "ConvNeXtBlock", "InceptionA"))
    before = _state(model)
    alone = (trace_model(model, TraceOptions(), n_inputs=1),
             trace_block(block, TraceOptions(), training=True))
    assert _state(model) == before
    with tracing_session(model if per_class else None):
        # else both sides would be traced alike, by fx's own patch
        assert _module_patched() != per_class
        assert ("__call__" in type(block).__dict__) == per_class
        within = (trace_model(model, TraceOptions(), n_inputs=1),
                  trace_block(block, TraceOptions(), training=True))
    assert _state(model) == before
    for a, b in zip(alone, within):
        assert _snapshot(a) == _snapshot(b)
        assert a.python_code("self").src == b.python_code("self").src


def test_parameters_reached_through_attributes_stay_nodes_in_a_session():
    # fx's patched __getattr__ is what turns `self.step` into a node rather than a constant
    from se_inject.trace import tracing_session
    model = _Shared()
    before = _state(model)
    with tracing_session(model):
        graph = trace_model(model, TraceOptions(), n_inputs=1)
    assert _state(model) == before
    assert _get_attrs(graph) == _get_attrs(fx.symbolic_trace(_Shared()).graph)
    assert not [n for n in graph.nodes if n.op == "get_attr" and "tensor_constant" in n.target]


class _OwnGetattr(nn.Module):
    """Looks attributes up its own way, then as nn.Module does."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("scale", torch.full((3, 1, 1), 2.0))

    def __getattr__(self, name):
        if name == "alias":
            return self.conv
        return super().__getattr__(name)

    def forward(self, x):
        return self.alias(x) * (self.scale + 1)


@needs_sessions
def test_a_class_with_its_own_getattr_is_traced_as_fx_traces_it():
    # its super().__getattr__ must still reach the tracer: nn.Module itself is patched
    from se_inject.trace import tracing_session
    model = _OwnGetattr()
    before = _state(model)
    with tracing_session(model):
        assert _module_patched()
        graph = trace_model(model, TraceOptions(), n_inputs=1)
    assert _state(model) == before
    assert _ops(graph) == _ops(fx.symbolic_trace(_OwnGetattr()).graph)


class _Unregistered(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.hidden = [nn.BatchNorm2d(3)]  # a plain list: not a submodule, not in the state_dict

    def forward(self, x):
        return self.hidden[0](self.conv(x))


def test_a_module_the_model_does_not_register_is_refused_as_fx_refuses_it():
    from se_inject.errors import TraceError
    from se_inject.trace import tracing_session
    with pytest.raises(NameError, match="not installed as a submodule"):
        fx.symbolic_trace(_Unregistered())
    model = _Unregistered()
    before = _state(model)
    with tracing_session(model):
        assert not _module_patched()  # BatchNorm2d's calls are not routed by its class
        with pytest.raises(TraceError, match="not installed as a submodule"):
            trace_model(model, TraceOptions(), n_inputs=1)
    assert _state(model) == before


@needs_sessions
def test_sessions_nest_and_put_everything_back():
    from se_inject.trace import tracing_session
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    x = torch.randn(1, 3, 8, 8)
    expected = model(x)
    before = _state(model), _state(other)
    with tracing_session(model):
        with tracing_session(other):
            assert "__call__" in nn.BatchNorm2d.__dict__  # the inner model's class too
        assert "__call__" in nn.ReLU.__dict__  # the outer session still holds its patch
        assert torch.equal(model(x), expected)  # a call that no trace is making runs as usual
    assert (_state(model), _state(other)) == before
    with pytest.raises(KeyError):
        with tracing_session(model):
            raise KeyError("x")
    assert _state(model) == before[0]


@needs_sessions
@pytest.mark.parametrize("per_class", [True, False])
def test_a_foreign_fx_tracer_in_a_session_fails_instead_of_tracing_a_wrong_graph(per_class):
    from se_inject.trace import tracing_session
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    before = _state(model)
    with tracing_session(model if per_class else None):
        with pytest.raises(RuntimeError, match="not se-inject's"):
            fx.symbolic_trace(model)
    assert _state(model) == before


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_apply_leaves_nn_module_as_it_was(name):
    import timm
    import se_inject
    model = timm.create_model(name)
    modules = list(model.modules())
    before = _state(modules)
    try:
        se_inject.apply(model)
    except se_inject.SEInjectError:
        assert name.startswith("vit")  # refused: no CNN block
    else:
        assert not name.startswith("vit")
    assert _state(modules) == before


class _Makes(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n = self.n + 1  # a buffer replaced while running: still named as the buffer
        return self.conv(x)[:, torch.tensor([2, 0, 1])] * torch.full((3, 1, 1), 2.0) + self.n


def test_constants_stay_off_the_model():
    # fx stores each tensor made while tracing on the module (_tensor_constantN); se-inject's
    # tracer keeps them with the graph, under the same get_attr nodes
    model = _Makes()
    attrs = set(model.__dict__)
    graph = trace_model(model, TraceOptions(), n_inputs=1)
    assert set(model.__dict__) == attrs
    made = getattr(graph, CONSTANTS)
    assert [n.target for n in graph.nodes if n.op == "get_attr"] == [*made, "n"]
    assert made[f"{CONSTANT_PREFIX}0"].tolist() == [2, 0, 1]
    assert torch.equal(made[f"{CONSTANT_PREFIX}1"], torch.full((3, 1, 1), 2.0))
    root = _Makes()
    assert _ops(graph) == _ops(fx.Tracer().trace(root))
    assert {k for k in root.__dict__ if k.startswith("_tensor_constant")} == \
        {"_tensor_constant0", "_tensor_constant1"}  # what fx leaves on the module it traced


def test_the_module_walk_of_a_snapshot_finds_what_modules_finds():
    """Shared submodules once, empty slots (None) skipped, every module reached."""
    from se_inject.trace import _all_modules
    shared = torch.nn.Conv2d(3, 3, 1)
    model = torch.nn.Sequential(shared, torch.nn.Sequential(shared, torch.nn.ReLU()),
                                timm.create_model("resnet18"))
    model.register_module("empty", None)
    model[1].again = model[2].layer1
    walked = _all_modules(model)
    assert len(walked) == len({id(m) for m in walked})
    assert {id(m) for m in walked} == {id(m) for m in model.modules()}


@pytest.mark.parametrize("name", ["resnet18", "test_convnext", "mobilenetv2_050"])
def test_fingerprints_of_some_frames_are_theirs_in_the_whole(name):
    """apply() sums up only the planned blocks' frames: each must come out as it does when
    every frame is summed up (a frame's fingerprint reads its own events only), and equal
    blocks must still match and unequal ones differ."""
    import random
    from se_inject.frames import fingerprints
    from se_inject.trace import Frame
    model = timm.create_model(name, pretrained=False)
    graph = trace_model(model, TraceOptions(), n_inputs=1)
    whole = fingerprints(graph)
    frames = sorted(whole, key=lambda f: (f.qualname, f.call))
    assert len(frames) >= 9  # the model and its blocks
    for seed in range(3):
        some = set(random.Random(seed).sample(frames, len(frames) // 3))
        assert fingerprints(graph, some) == {f: whole[f] for f in some}
    if name == "resnet18":  # layer1's two blocks run one graph; layer2.0 has its downsample
        some = {Frame("layer1.0"), Frame("layer1.1"), Frame("layer2.0")}
        prints = fingerprints(graph, some)
        assert prints[Frame("layer1.0")] == prints[Frame("layer1.1")] != prints[Frame("layer2.0")]


@pytest.mark.parametrize("sessions", [True, False], ids=["sessions", "no-sessions"])
def test_apply_in_several_threads_at_once_gates_each_model_as_alone(sessions, monkeypatch):
    """Applies in four threads at once, eight times over: fx keeps the patcher of the trace in
    progress in one global, and traces that overlapped failed about one round in eight
    (trace._TRACE_LOCK). Each model gets the gates a lone apply() gives it, computes what it
    computed with its gates passing everything, and no patch of nn.Module is left behind.

    Where sessions are off (a torch whose fx patches nn.Module for the whole process while it
    traces), the applies run one at a time, and the models run once every thread is done: a
    model called in another thread during a trace would be traced into it, fx's own doing.
    ``no-sessions`` turns sessions off on any torch."""
    import copy
    import threading
    import traceback

    import se_inject
    from conftest import gates, saturate
    if not sessions:
        monkeypatch.setattr(se_inject.trace, "_FX_HOOKS", False)
    concurrent_runs = se_inject.trace._FX_HOOKS
    names = ["resnet18", "mobilenetv2_050", "convnext_atto", "dla34"]
    alone = {}
    for name in names:
        alone[name] = [n for n, _ in gates(se_inject.apply(timm.create_model(name).eval()))]
    assert all(alone.values())
    call, getattr_ = nn.Module.__call__, nn.Module.__getattr__
    x = torch.randn(1, 3, 64, 64)
    for _ in range(8):
        start, results, errors, made = threading.Barrier(len(names)), {}, [], {}

        def run(name):
            model, plain = made[name]
            with torch.no_grad():
                results[name] = ([n for n, _ in gates(model)], torch.equal(model(x), plain(x)))

        def gate(name):
            try:
                model = timm.create_model(name).eval()
                plain = copy.deepcopy(model)
                start.wait(30)
                se_inject.apply(model)
                saturate(model)
                made[name] = model, plain
                if concurrent_runs:
                    run(name)
            except Exception:  # reported below, with the model's name
                errors.append((name, traceback.format_exc()))

        threads = [threading.Thread(target=gate, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        if not concurrent_runs:
            for name in names:
                run(name)
        assert results == {name: (alone[name], True) for name in names}
        assert nn.Module.__call__ is call and nn.Module.__getattr__ is getattr_
