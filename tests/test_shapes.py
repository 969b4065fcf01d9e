"""Shape propagation on meta tensors agrees with running the real layers."""
import inspect

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from se_inject.shapes import VALUE, _shape_rule, propagate_shapes


@pytest.mark.parametrize("layer,shape", [
    (nn.Conv2d(8, 16, 3, stride=2, padding=1), (2, 8, 17, 15)),
    (nn.Conv2d(8, 16, (3, 5), stride=(2, 1), padding=(0, 2), dilation=(2, 1)), (2, 8, 19, 11)),
    (nn.Conv2d(8, 8, 3, padding="same", groups=8), (1, 8, 9, 10)),
    (nn.Conv2d(8, 4, 4, padding="valid", stride=3), (3, 8, 16, 13)),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (2, 4, 6, 6)),
    (nn.Conv1d(4, 6, 5, stride=2), (2, 4, 21)),
    (nn.Linear(12, 5), (2, 3, 12)),
    (nn.BatchNorm2d(8), (2, 8, 5, 5)),
    (nn.MaxPool2d(3, 2, ceil_mode=True), (2, 8, 10, 10)),
])
def test_meta_shapes_equal_real_shapes(layer, shape):
    model = nn.Sequential(layer).eval()
    graph = fx.Tracer().trace(model)
    propagate_shapes(model, graph, [(2, *shape[1:])])
    out = next(n for n in graph.nodes if n.op == "call_module")
    with torch.no_grad():
        real = model(torch.randn(2, *shape[1:]))
    assert tuple(out.meta[VALUE].shape) == tuple(real.shape)
    assert out.meta[VALUE].device.type == "meta"


def test_rules_only_for_the_stock_forward():
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x)[:, :2]

    assert _shape_rule(nn.Conv2d(1, 1, 1)) is not None
    assert _shape_rule(nn.BatchNorm2d(1)) is not None
    assert _shape_rule(MyConv(1, 4, 1)) is None
    class LeafTracer(fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return True

    model = nn.Sequential(MyConv(3, 4, 1))
    graph = LeafTracer().trace(model)
    propagate_shapes(model, graph, [(2, 3, 8, 8)])
    out = next(n for n in graph.nodes if n.op == "call_module")
    assert tuple(out.meta[VALUE].shape) == (2, 2, 8, 8)


def test_propagation_leaves_weights_where_they_were():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.AdaptiveAvgPool2d(1))
    before = {k: (v.data_ptr(), v.device) for k, v in model.state_dict().items()}
    graph = fx.Tracer().trace(model)
    propagate_shapes(model, graph, [(2, 3, 8, 8)])
    assert {k: (v.data_ptr(), v.device) for k, v in model.state_dict().items()} == before
    assert all(isinstance(p, nn.Parameter) for p in model.parameters())


class _Recorder(fx.Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        self.seen[n] = out
        return out


def _real_values(model, graph, x):
    rec = _Recorder(model, graph=graph)
    rec.seen = {}
    with torch.no_grad():
        rec.run(x)
    return rec.seen


def _models_with_shortcuts():
    timm = pytest.importorskip("timm")
    tv = pytest.importorskip("torchvision")
    # leaf Sequentials of stock layers (Conv2dNormActivation with ReLU6, Hardswish), timm's
    # norm+act leaves (BatchNormAct2d answered by its rule), functional activations, in-place
    # and broadcast binary ops, SE squeezes, concatenations
    return [("torchvision mobilenet_v2", tv.models.mobilenet_v2()),
            ("torchvision mobilenet_v3_small", tv.models.mobilenet_v3_small()),
            ("timm cspnext_tiny", timm.create_model("cspnext_tiny")),
            ("timm mobilenetv2_050", timm.create_model("mobilenetv2_050")),  # BatchNormAct2d
            ("timm efficientnet_b0", timm.create_model("efficientnet_b0")),  # x.mean((2, 3)) in SE
            ("torchvision regnet_y_400mf", tv.models.regnet_y_400mf()),  # scale * input in SE
            ("timm mobilevit_xxs", timm.create_model("mobilevit_xxs")),
            ("timm nf_resnet26", timm.create_model("nf_resnet26"))]


def test_every_node_shape_equals_a_real_run():
    from se_inject.trace import TraceOptions, trace_model

    for label, model in _models_with_shortcuts():
        model.eval()
        graph = trace_model(model, TraceOptions(), n_inputs=1)
        propagate_shapes(model, graph, [(2, 3, 96, 96)])
        real = _real_values(model, graph, torch.randn(2, 3, 96, 96))
        checked = 0
        for n, value in real.items():
            if isinstance(value, torch.Tensor):
                meta = n.meta[VALUE]
                assert tuple(meta.shape) == tuple(value.shape), (label, n.format_node())
                assert meta.dtype == value.dtype, (label, n.format_node())
                checked += 1
        assert checked > 50, label


def test_shortcuts_leave_mixed_operands_to_the_real_kernel():
    class Broadcast(nn.Module):
        def forward(self, x):
            y = x.mean((2, 3), keepdim=True)
            z = torch.relu(x) + y            # broadcast: not the same shape
            w = x.to(torch.float64) * 2      # dtype of its own
            return z.mul_(x[:, :1]), w + x   # in place with broadcast; promotion

    model = Broadcast()
    graph = fx.symbolic_trace(model).graph
    propagate_shapes(model, graph, [(2, 3, 5, 7)])
    real = _real_values(model, graph, torch.randn(2, 3, 5, 7))
    for n, value in real.items():
        if isinstance(value, torch.Tensor):
            assert tuple(n.meta[VALUE].shape) == tuple(value.shape), n.format_node()
            assert n.meta[VALUE].dtype == value.dtype, n.format_node()


class _Resize(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x):
        return nn.functional.interpolate(x, **self.kwargs) + 1


@pytest.mark.parametrize("shape,kwargs", [
    ((2, 3, 7, 9), dict(scale_factor=2, mode="bilinear")),
    ((2, 3, 7, 9), dict(scale_factor=0.5)),
    ((2, 3, 7, 9), dict(scale_factor=(1.7, 0.3), mode="nearest")),
    ((2, 3, 7, 9), dict(scale_factor=2.3, recompute_scale_factor=True, mode="bicubic")),
    ((2, 3, 7, 9), dict(size=5)),
    ((2, 3, 7, 9), dict(size=(4, 11), mode="bilinear", align_corners=True)),
    ((2, 3, 11), dict(scale_factor=1.5, mode="linear")),
    ((1, 2, 3, 4, 5), dict(size=(6, 2, 3), mode="trilinear")),
])
def test_interpolate_shapes_equal_real_shapes(shape, kwargs):
    model = nn.Sequential(_Resize(**kwargs), nn.Upsample(scale_factor=2))
    graph = fx.Tracer().trace(model)
    propagate_shapes(model, graph, [shape])
    real = _real_values(model, graph, torch.randn(shape))
    resized = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
    assert len(resized) == 3
    for n in resized:
        assert tuple(n.meta[VALUE].shape) == tuple(real[n].shape), n.format_node()


def test_device_moves_keep_meta_tensors_and_apply_dtypes():
    """A device read while tracing is recorded as a constant (`.to(device=cpu)`): shapes stay on
    meta, and the dtype asked for is still applied, as in a real run."""
    class Moves(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(6.0))

        def forward(self, x):
            t = self.table.to(device=self.table.device, dtype=torch.float64)
            u = x.to(self.table.device).to(torch.float16).cpu()
            return t * 2, u.to(x), x.to("cpu", torch.bfloat16), x.to(device="cpu")

    model = Moves()
    graph = fx.symbolic_trace(model).graph
    assert any(n.kwargs.get("device") == "cpu" for n in graph.nodes)  # a constant
    propagate_shapes(model, graph, [(2, 3, 5, 7)])
    real = _real_values(model, graph, torch.randn(2, 3, 5, 7))
    checked = 0
    for n, value in real.items():
        if isinstance(value, torch.Tensor):
            assert n.meta[VALUE].device.type == "meta", n.format_node()
            assert tuple(n.meta[VALUE].shape) == tuple(value.shape), n.format_node()
            assert n.meta[VALUE].dtype == value.dtype, n.format_node()
            checked += 1
    assert checked >= 8


def _propagated_through(layer: nn.Module, x: torch.Tensor):
    """What shape propagation gives for ``layer`` called as a leaf on a tensor like ``x``."""
    tracer = fx.Tracer()
    tracer.is_leaf_module = lambda m, qualname: m is layer
    model = nn.Sequential(layer)
    graph = tracer.trace(model)
    propagate_shapes(model, graph, [tuple(x.shape)])
    return next(n for n in graph.nodes if n.op == "call_module").meta[VALUE]


def _layout(t: torch.Tensor) -> tuple:
    """What a shortcut must reproduce of the kernel's output."""
    return t.shape, t.stride(), t.dtype


def _broadcast_cases():
    """(x, y): x of rank 2 to 5, dense, channels-last or a view; y one of x's shapes with sizes
    set to 1 or leading dimensions dropped, dense, a view or expanded; and y larger than x."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for _ in range(300):
        rank = int(torch.randint(2, 6, (1,), generator=g))
        shape = [int(v) for v in torch.randint(1, 5, (rank,), generator=g)]
        if torch.rand(1, generator=g) < 0.6:
            shape = [max(v, 2) for v in shape]
        x = torch.empty(shape, device="meta")
        kind = int(torch.randint(0, 3, (1,), generator=g))
        if kind == 1 and rank == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif kind == 2:
            x = torch.empty(shape[::-1], device="meta").permute(*reversed(range(rank)))
        small = [1 if torch.rand(1, generator=g) < 0.5 else v for v in shape]
        small = small[int(torch.randint(0, rank, (1,), generator=g)):]
        y = torch.empty(small, device="meta")
        if torch.rand(1, generator=g) < 0.3 and len(small) >= 2:
            y = torch.empty(small[::-1], device="meta").t() if len(small) == 2 else \
                torch.empty(small, device="meta").transpose(0, -1).contiguous().transpose(0, -1)
        if torch.rand(1, generator=g) < 0.2:
            y = torch.empty([1] * len(small), device="meta").expand(small)
        cases.append((x, y))
        cases.append((y, x))  # the larger second: broadcast the other way
    return cases


def test_broadcast_shortcuts_give_the_kernels_shape_strides_and_dtype():
    # strides too: later shortcuts compare them, and a leaf module may read its input's layout
    from se_inject.shapes import _BINARY, _shortcut

    taken = 0
    for x, y in _broadcast_cases():
        for func, in_place in _BINARY.items():
            try:
                want = func(x, y)  # on meta, in place only checks and returns x
            except RuntimeError:  # an in-place op whose output would need y's larger shape
                continue
            got = _shortcut(func, (x, y), {})
            if got is None:
                continue
            taken += 1
            assert _layout(got) == _layout(want), \
                (func, tuple(x.shape), x.stride(), tuple(y.shape), y.stride())
            if in_place:
                assert got is x
    assert taken > 2000  # the shortcut answered most cases; the kernel answered the rest


def _laid_out(shape, dtype, kind: str, g: torch.Generator) -> torch.Tensor:
    """A meta tensor of this shape and dtype laid out as ``kind`` says: "contiguous",
    "channels_last" (4-D; contiguous otherwise), "permuted" (a random order of dimensions in
    memory) or "sliced" (a view that skips the first element of each row)."""
    if kind == "permuted":
        perm = torch.randperm(len(shape), generator=g).tolist()
        return torch.empty([shape[p] for p in perm], dtype=dtype, device="meta").permute(
            *[perm.index(d) for d in range(len(shape))])
    if kind == "sliced":
        return torch.empty([*shape[:-1], shape[-1] + 1], dtype=dtype, device="meta")[..., 1:]
    x = torch.empty(shape, dtype=dtype, device="meta")
    if kind == "channels_last" and len(shape) == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _pooled_inputs():
    """4-D meta tensors: contiguous, channels-last, permuted, sliced and expanded, sizes 1 to 4
    (ambiguous layouts included), four floating dtypes and an integer one."""
    g = torch.Generator().manual_seed(1)
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64)
    out = []
    for i in range(200):
        shape = [int(v) for v in torch.randint(1, 5, (4,), generator=g)]
        dtype = dtypes[i % len(dtypes)]
        kind = i % 5
        if kind == 3:
            x = torch.empty([*shape[:3], shape[3] + 2], dtype=dtype, device="meta")[..., 1:-1]
        elif kind == 4:
            x = torch.empty([shape[0], shape[1], 1, 1], dtype=dtype, device="meta").expand(shape)
        else:
            x = _laid_out(shape, dtype, _KINDS[kind], g)
        out.append(x)
    return out


def test_squeeze_shortcuts_give_the_kernels_shape_strides_and_dtype():
    """The spatial mean (timm's SE) and adaptive average pooling (torchvision's SE, classifier
    heads) answered from the input's shape match their meta kernels, or leave it to them."""
    from se_inject.shapes import _shortcut

    T = torch.Tensor
    calls = [(T.mean, ((2, 3),), {"keepdim": True}), (T.mean, ([3, 2],), {}),
             (torch.mean, ((-2, -1), True), {}), (T.mean, (), {"dim": (2, 3), "keepdim": False}),
             (T.mean, ((1, 2),), {"keepdim": True}),  # not spatial: left to the kernel
             (torch.mean, ((2, 3),), {"dtype": torch.float64}),
             (F.adaptive_avg_pool2d, (1,), {}), (F.adaptive_avg_pool2d, ((2, 3),), {}),
             (F.adaptive_avg_pool2d, ((None, 1),), {}), (F.adaptive_avg_pool2d, (5,), {})]
    taken = 0
    for x in _pooled_inputs():
        for func, args, kwargs in calls:
            try:
                want = func(x, *args, **kwargs)
            except RuntimeError:  # the mean of integers
                assert _shortcut(func, (x, *args), kwargs) is None
                continue
            got = _shortcut(func, (x, *args), kwargs)
            if got is None:
                continue
            taken += 1
            assert _layout(got) == _layout(want), (func, args, kwargs, tuple(x.shape), x.stride())
    assert taken > 800


_KINDS = ("contiguous", "channels_last", "permuted", "sliced")


def _cat_cases():
    """Lists of 1 to 3 meta tensors of rank 1 to 5 that agree off the concatenated dimension,
    each contiguous, channels-last, permuted or sliced; sizes 1 to 4; dtypes mostly shared."""
    g = torch.Generator().manual_seed(2)
    dtypes = (torch.float32, torch.float16, torch.int64)
    cases = []
    for i in range(400):
        rank = int(torch.randint(1, 6, (1,), generator=g))
        dim = int(torch.randint(-rank, rank, (1,), generator=g))
        base = [int(v) for v in torch.randint(1 if i % 3 == 0 else 2, 5, (rank,), generator=g)]
        tensors = []
        for k in range(int(torch.randint(1, 4, (1,), generator=g))):
            shape = list(base)
            shape[dim] = int(torch.randint(1, 5, (1,), generator=g))
            dtype = dtypes[int(torch.randint(0, 3, (1,), generator=g))] if i % 7 == 0 else \
                torch.float32
            kind = int(torch.randint(0, 4, (1,), generator=g))
            tensors.append(_laid_out(shape, dtype, _KINDS[kind], g))
        cases.append((tensors, dim))
    return cases


def test_cat_shortcut_gives_the_kernels_shape_strides_and_dtype():
    from se_inject.shapes import _shortcut

    taken = 0
    for tensors, dim in _cat_cases():
        for func in (torch.cat, torch.concat):
            want = func(tensors, dim)
            for args, kwargs in (((tensors, dim), {}), ((tensors,), {"dim": dim})):
                got = _shortcut(func, args, kwargs)
                if got is None:
                    continue
                taken += 1
                assert _layout(got) == _layout(want), ([_layout(t) for t in tensors], dim)
    assert taken > 500


def _norm_acts():
    from timm.layers import BatchNormAct2d, GroupNormAct

    class Clamp(nn.Module):  # an activation with no rule: the layer must run
        def forward(self, x):
            return x.clamp(0, 1)[:, :2]

    odd = BatchNormAct2d(8)
    odd.act = Clamp()
    from timm.layers.activations import GELU
    return [BatchNormAct2d(8, act_layer=nn.SiLU), BatchNormAct2d(8, act_layer=nn.ReLU6),
            BatchNormAct2d(8, act_layer=GELU), BatchNormAct2d(8, drop_layer=nn.Dropout2d),
            GroupNormAct(8, num_groups=4), odd]


def _timm_activations():
    from timm.layers import activations
    from se_inject.shapes import _TIMM_ACTIVATIONS
    out = []
    for name in _TIMM_ACTIVATIONS:
        cls = getattr(activations, name)
        out.append(cls())
        if "inplace" in inspect.signature(cls).parameters:
            out.append(cls(inplace=True))
    return out


@pytest.mark.parametrize("layer", _timm_activations(),
                         ids=lambda m: f"{type(m).__name__}-{getattr(m, 'inplace', False)}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_timm_activations_are_answered_with_their_real_shape_strides_and_dtype(layer, layout):
    """timm's own activation modules keep their input's shape, strides and dtype, as the rule
    that answers them says; a subclass with a forward of its own is run instead."""
    from se_inject.shapes import _same
    g = torch.Generator().manual_seed(6)
    x = _laid_out((2, 8, 5, 7), torch.float32, layout, g)
    real = layer(torch.empty_strided(x.shape, x.stride()).normal_(generator=g))
    assert _shape_rule(layer) is _same
    assert _layout(real) == _layout(x)

    class Narrower(type(layer)):
        def forward(self, x):
            return super().forward(x)[:, :2]

    assert _shape_rule(Narrower()) is None


@pytest.mark.parametrize("layer", _norm_acts(), ids=lambda m: f"{type(m).__name__}-"
                         f"{type(m.drop).__name__}-{type(m.act).__name__}")
@pytest.mark.parametrize("channels_last", [False, True])
def test_timm_norm_act_layers_give_their_real_shape_strides_and_dtype(layer, channels_last):
    from se_inject.shapes import _norm_act
    layer.eval()
    x = torch.randn(2, 8, 5, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        real = layer(x)
    assert _shape_rule(layer) is _norm_act
    got = _norm_act(layer, x.to("meta"))
    if type(layer.act).__name__ == "Clamp":
        assert got is None  # its activation has no rule: the layer runs
    else:
        assert _layout(got) == _layout(real)
    assert _norm_act(layer, torch.empty(2, 6, 5, 7, device="meta")) is None  # wrong channels
    # in a graph, rule or run, the shape is the real one
    out = _propagated_through(layer, x)
    assert (out.shape, out.dtype) == (real.shape, real.dtype)


def _reduced_inputs(n: int = 120):
    """Meta tensors of rank 1 to 5: contiguous, channels-last, permuted, sliced, expanded and
    contiguous but for the strides of dimensions of size 1; sizes 1 to 4; four floating dtypes
    and an integer one."""
    g = torch.Generator().manual_seed(3)
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64)
    out = []
    for i in range(n):
        rank = int(torch.randint(1, 6, (1,), generator=g))
        shape = [int(v) for v in torch.randint(1, 5, (rank,), generator=g)]
        dtype = dtypes[i % len(dtypes)]
        kind = i % 6
        if kind == 4:
            x = torch.empty([1] * rank, dtype=dtype, device="meta").expand(shape)
        elif kind == 5:
            x = torch.empty([*shape[:-1], shape[-1] + 2], dtype=dtype, device="meta")[..., 2:]
            x = x[:1] if x.dim() > 1 else x  # a leading size of 1 with the old stride
        else:
            x = _laid_out(shape, dtype, _KINDS[kind], g)
        out.append(x)
    # sizes of 1 with strides out of order: a norm over them keeps the input's strides
    out += [torch.empty_strided((4, 3, 1, 1), (3, 1, 1, 12), device="meta"),
            torch.empty(2, 1, 3, device="meta").permute(2, 0, 1)]
    return out


def test_reduction_normalize_and_matmul_shortcuts_give_the_kernels_shape_strides_and_dtype():
    """Attention and norm code (means, sums, maxima and vector norms over given dimensions,
    F.normalize, matrix products) answered from the inputs' shapes match the kernels, or leave
    it to them."""
    from se_inject.shapes import _shortcut

    T = torch.Tensor
    taken = 0

    def check(func, args, kwargs):
        nonlocal taken
        try:
            want = func(*args, **kwargs)
        except (RuntimeError, TypeError, ValueError, IndexError):
            assert _shortcut(func, args, kwargs) is None, (func, args, kwargs)
            return
        got = _shortcut(func, args, kwargs)
        if got is not None:
            taken += 1
            assert _layout(got) == _layout(want), \
                (func, [(_layout(a) if isinstance(a, torch.Tensor) else a) for a in args], kwargs)

    for x in _reduced_inputs():
        r = x.dim()
        dims = [*range(-r, r), (0, -1), [r - 1], (0, 0), ()]
        for d in dims:
            for keep in (True, False):
                check(T.mean, (x, d), {"keepdim": keep})
                check(torch.sum, (x, d, keep), {})
                check(T.amax, (x,), {"dim": d, "keepdim": keep})
                check(T.norm, (x,), {"dim": d, "keepdim": keep})
                check(T.norm, (x, 1, d, keep), {})
                check(T.norm, (x,), {"p": 2, "dim": d, "keepdim": keep, "dtype": None})
                check(torch.norm, (x, "fro", d), {})
                check(torch.linalg.vector_norm, (x, float("inf"), d, keep), {})
                check(torch.linalg.vector_norm, (x,), {"dim": d, "keepdim": keep})
            check(T.mean, (x, d), {"dtype": torch.float64})  # left to the kernel
            check(F.normalize, (x,), {"dim": d} if isinstance(d, int) else {})
            check(F.normalize, (x, 1.0, d if isinstance(d, int) else -1), {})
    # one of several tensors interleaved in memory in a random order of dimensions (attention's
    # q, k and v after unbind): the normalized tensor is laid out by the input's strides alone
    # where every size is over 1
    g = torch.Generator().manual_seed(5)
    before = taken
    for i in range(200):
        rank = int(torch.randint(2, 5, (1,), generator=g))
        shape = [int(v) for v in torch.randint(1 if i % 4 == 0 else 2, 5, (rank,), generator=g)]
        at = int(torch.randint(0, rank + 1, (1,), generator=g))
        whole = _laid_out([*shape[:at], 3, *shape[at:]], torch.float32, "permuted", g)
        x = whole.select(at, i % 3)
        for d in range(-rank, rank):
            check(F.normalize, (x,), {"dim": d})
    assert taken - before > 500
    inputs = _reduced_inputs(300)
    g = torch.Generator().manual_seed(4)
    for i, a in enumerate(inputs):
        rank = int(torch.randint(1, 5, (1,), generator=g))
        shape = [int(v) for v in torch.randint(1, 4, (rank,), generator=g)]
        if rank >= 2:
            shape[-2] = a.shape[-1]
        elif i % 2:
            shape[-1] = a.shape[-1]
        b = torch.empty(shape, dtype=a.dtype if i % 9 else torch.float32, device="meta")
        if i % 3 == 1 and rank >= 2:
            b = b.transpose(-1, -2).contiguous().transpose(-1, -2)
        for func in (T.matmul, torch.matmul, T.__matmul__):
            check(func, (a, b), {})
    assert taken > 7000


@pytest.mark.parametrize("name", ["efficientvit_m0", "tiny_vit_5m_224"])
def test_attention_bias_caches_of_timm_models_stay_empty(name):
    # in eval mode their attention (a leaf for EfficientViT) caches its biases per device on
    # its first run: shape propagation's run on meta tensors must not leave a meta entry
    timm = pytest.importorskip("timm")
    import se_inject
    model = timm.create_model(name).eval()
    caches = [m.attention_bias_cache for m in model.modules()
              if isinstance(getattr(m, "attention_bias_cache", None), dict)]
    assert len(caches) >= 3
    se_inject.plan(model)
    assert all(c == {} for c in caches)
    with torch.no_grad():
        model(torch.randn(1, *model.pretrained_cfg["input_size"]))
    assert any(c for c in caches) and all(k == "cpu" for c in caches for k in c)


class _OutputOnly(nn.LSTM):
    def forward(self, x):  # a forward of its own: no shape rule, it runs on meta tensors
        return super().forward(x)[0]


class _Recurrent(nn.Module):
    """A residual block, then an LSTM over the pixels (a leaf: it runs on meta tensors)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a, self.b = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.rnn = _OutputOnly(8, 8, batch_first=True)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.b(F.relu(self.a(x)))
        return self.rnn(x.flatten(2).transpose(1, 2)).mean(1)


def test_a_module_run_on_meta_tensors_keeps_every_attribute_it_had():
    import se_inject
    model = _Recurrent().eval()
    before = dict(model.rnn.__dict__)
    refs = [r() for r in model.rnn._flat_weight_refs]
    se_inject.plan(model, input_size=(3, 8, 8), leaf_modules=[_OutputOnly])
    assert all(model.rnn.__dict__[k] is v for k, v in before.items())
    assert [r() for r in model.rnn._flat_weight_refs] == refs
    assert all(w is getattr(model.rnn, n) and w.device.type == "cpu"
               for w, n in zip(model.rnn._flat_weights, model.rnn._flat_weights_names))


@pytest.mark.parametrize("layer", [
    nn.LSTM(8, 6), nn.LSTM(8, 6, num_layers=2, batch_first=True, bidirectional=True),
    nn.LSTM(8, 6, batch_first=True, proj_size=4), nn.GRU(8, 6, bidirectional=True),
    nn.RNN(8, 6, num_layers=3, batch_first=True),
], ids=lambda m: repr(m).replace(" ", ""))
@pytest.mark.parametrize("batched", [True, False])
def test_recurrent_layers_give_their_real_shapes_strides_and_dtypes(layer, batched):
    # answered from the input's shape (batched): on meta tensors their kernels step through
    # the sequence in Python; unbatched, the module runs
    from se_inject.shapes import _recurrent
    layer.eval()
    x = torch.randn(3, 5, 8) if batched else torch.randn(5, 8)
    with torch.no_grad():
        real = layer(x)
    assert _shape_rule(layer) is _recurrent
    if not batched:
        assert _recurrent(layer, x.to("meta")) is None
    got = _propagated_through(layer, x)
    flat = torch.utils._pytree.tree_leaves
    assert [_layout(t) for t in flat(got)] == [_layout(t) for t in flat(real)]
    assert all(t.device.type == "meta" for t in flat(got))


class _Clip(nn.Module):
    """Reads a value of its input (fx cannot trace it: a leaf, as the error advises, which
    cannot run on meta tensors either), holds a norm in training mode and counts its calls."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(c)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if x.abs().max().item() > 1e4:
            x = x.clamp(-1e4, 1e4)
        return self.norm(x)


class _ClipNet(nn.Module):
    def __init__(self):
        super().__init__()
        from handwritten import BlockNet
        self.net = BlockNet()
        self.clip = _Clip(64)
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        net = self.net
        y = net.blocks(F.relu(net.stem(x)))
        return self.fc(self.clip(y).flatten(2).mean(-1) * y.abs().amax().item())


def test_an_op_that_reads_values_is_run_on_random_tensors_and_changes_nothing():
    """A layer whose forward reads a value (``.item()``), and an ``.item()`` in the model's own
    forward, cannot run on meta tensors; shape propagation runs them on random tensors of the
    shapes they get, the layer holding copies of its weights and buffers. Before, apply()
    refused the model."""
    import copy

    import se_inject
    from conftest import gates, saturate
    from se_inject.errors import TraceError
    model = _ClipNet().train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plain = copy.deepcopy(model)
    # the values drawn for those runs leave the caller's random numbers as they were: after
    # apply(), the generator is where it is after gating the same blocks without them (the
    # gates' initialisation draws the same numbers)
    from handwritten import BlockNet
    other = BlockNet()
    torch.manual_seed(5)
    se_inject.apply(model, input_size=(3, 16, 16), leaf_modules=[_Clip])
    after = torch.rand(3)
    torch.manual_seed(5)
    se_inject.apply(other, input_size=(3, 16, 16))
    assert torch.equal(torch.rand(3), after)
    assert len(gates(model)) == 3
    # the layer's running statistics and call count are the model's own, untouched
    assert model.clip.calls == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items() if k in state)
    x = torch.randn(2, 3, 16, 16)
    saturate(model)  # gates passing everything: the plain model's outputs
    torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)
    assert model.clip.calls == 1
    # a model whose weights are on the meta device has no values to run: the op is named
    meta = _ClipNet().to("meta")
    with pytest.raises(TraceError, match=r"clip.*Tensor.item\(\) cannot be called on "
                       r"meta tensors.*weights are on the meta device"):
        se_inject.apply(meta, input_size=(3, 16, 16), leaf_modules=[_Clip])
    assert not gates(meta)
