"""Bad input: a clear SEInjectError, and the model left exactly as it was."""
import pytest
import torch
from torch import nn

import se_inject
from se_inject.errors import (InvalidArgumentError, NotGatedError, SEInjectError, TraceError)
from conftest import gates
from handwritten import BlockNet


def _untouched(model, keys):
    assert list(model.state_dict()) == keys
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not any(isinstance(m, se_inject.SEGate) for m in model.modules())


@pytest.mark.parametrize("ratio", [0, -4, 1.5, True, "16", None])
def test_ratio_must_be_a_positive_integer(ratio):
    model = BlockNet()
    keys = list(model.state_dict())
    with pytest.raises(InvalidArgumentError, match="ratio must be a positive integer"):
        se_inject.apply(model, ratio=ratio)
    _untouched(model, keys)


@pytest.mark.parametrize("thing", ["resnet50", None, {"weight": torch.zeros(1)}])
def test_model_must_be_a_module(thing):
    with pytest.raises(InvalidArgumentError, match="model must be a torch.nn.Module"):
        se_inject.apply(thing)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_is_refused():
    scripted = torch.jit.script(nn.Sequential(nn.Conv2d(3, 3, 1)))
    with pytest.raises(InvalidArgumentError, match="TorchScript"):
        se_inject.plan(scripted)


@pytest.mark.parametrize("kwargs,words", [
    ({"input_size": (3, 0, 32)}, "input_size must be"),
    ({"input_size": "224"}, "input_size must be"),
    ({"leaf_modules": [nn.Conv2d(1, 1, 1)]}, "give nn.Module classes"),
    ({"autowrap_functions": [3]}, "not callable"),
    ({"rules": 5}, "rules must be"),
    ({"rules": []}, "no rules given"),
])
def test_bad_options_are_refused(kwargs, words):
    model = BlockNet()
    keys = list(model.state_dict())
    with pytest.raises(SEInjectError, match=words):
        se_inject.apply(model, **kwargs)
    _untouched(model, keys)


def test_too_few_input_sizes_for_a_two_input_model():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, a, b):
            return self.c(a) + b

    with pytest.raises(TraceError, match="takes 2 tensor inputs"):
        se_inject.apply(TwoInputs())


def test_remove_on_a_plain_model():
    with pytest.raises(NotGatedError, match="holds no se-inject gates"):
        se_inject.remove(BlockNet())


def test_every_error_class_is_an_seinjecterror():
    import se_inject.errors as e
    for name in e.__all__:
        assert issubclass(getattr(e, name), SEInjectError)


@pytest.fixture
def process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group("gloo", rank=0, world_size=1,
                            store=dist.FileStore(str(tmp_path / "store"), 1))
    yield
    dist.destroy_process_group()


def _wrapped(kind):
    model = BlockNet()
    if kind == "compile":
        return model, torch.compile(model), "_orig_mod"
    if kind == "dp":
        return model, nn.DataParallel(model), "model.module"
    if kind == "ddp":
        return model, nn.parallel.DistributedDataParallel(model), "then wrap or shard it"
    from torch.distributed.fsdp import fully_shard
    return model, fully_shard(model), "then wrap or shard it"


@pytest.mark.parametrize("kind", ["compile", "dp", "ddp", "fsdp2"])
def test_a_wrapped_model_is_refused_with_what_to_do(kind, request):
    if kind in ("ddp", "fsdp2"):
        request.getfixturevalue("process_group")
    model, wrapper, advice = _wrapped(kind)
    keys = list(wrapper.state_dict())
    for call in (se_inject.apply, se_inject.plan):
        with pytest.raises(InvalidArgumentError, match="wrap") as info:
            call(wrapper)
        assert advice in str(info.value)
        assert list(wrapper.state_dict()) == keys
        assert not gates(wrapper)
    if kind in ("compile", "dp"):  # the advice works: the model inside gets its gates
        se_inject.apply(model)
        assert len(gates(wrapper)) == 3
        assert wrapper(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def _big(module, args, output):
    if output.abs().max() > 100:  # control flow on a traced value
        raise AssertionError("unreachable")


def _big_input(module, args):
    _big(module, None, args[0])


@pytest.mark.parametrize("where", ["blocks.1", "blocks", "global", "pre", "partial"])
def test_a_hook_that_cannot_run_on_traced_values_is_named(where):
    import functools
    model = BlockNet()
    keys = list(model.state_dict())
    g = nn.modules.module
    if where == "global":
        handle = g.register_module_forward_hook(_big)
        named = "a global forward hook on `stem` (_big, "  # the first module it ran on
    elif where == "pre":
        handle = model.blocks.register_forward_pre_hook(_big_input)
        named = "a forward pre-hook on `blocks` (_big_input, "
    elif where == "partial":
        handle = model.blocks[2].register_forward_hook(functools.partial(_big))
        named = "a forward hook on `blocks.2` (_big, "
    else:
        handle = model.get_submodule(where).register_forward_hook(_big)
        named = f"a forward hook on `{where}` (_big, "
    try:
        with pytest.raises(TraceError) as info:
            se_inject.apply(model)
        assert named in str(info.value) and __file__ in str(info.value)
        assert "control flow" in str(info.value)
        _untouched(model, keys)
    finally:
        handle.remove()


def test_a_hook_that_returns_on_traced_values_leaves_apply_working():
    """The advice in the error works: the hook passes traced values by, apply gates the
    model, and the hook still sees every real call."""
    model = BlockNet().eval()
    seen = []

    def hook(module, args, output):
        if isinstance(output, torch.fx.Proxy):
            return
        seen.append(output.shape)
        _big(module, args, output)

    model.blocks[1].register_forward_hook(hook)
    se_inject.apply(model)
    assert seen == []  # the hook ran on traced values only, and passed them by
    seen.clear()
    model(torch.randn(2, 3, 16, 16))
    assert seen == [torch.Size([2, 32, 16, 16])]
    assert len(gates(model)) == 3


def test_a_hook_on_a_layer_that_cannot_run_on_meta_tensors_is_named():
    """fx does not run a leaf layer's hooks; shape propagation runs them on meta tensors, and a
    hook reading a value there is named as one reading a traced value is, not taken for the
    layer; its own advice works."""
    model = BlockNet().eval()
    keys = list(model.state_dict())
    conv = model.blocks[1].body[2][0]
    assert isinstance(conv, nn.Conv2d)
    handle = conv.register_forward_hook(_big)
    with pytest.raises(TraceError) as info:
        se_inject.apply(model)
    message = str(info.value)
    assert "a forward hook on `blocks.1.body.2.0` (_big, " in message and __file__ in message
    assert "meta tensor" in message and "leaf_modules" not in message
    _untouched(model, keys)
    handle.remove()
    seen = []

    def hook(module, args, output):
        if output.is_meta:
            return
        seen.append(output.shape)
        _big(module, args, output)

    conv.register_forward_hook(hook)
    se_inject.apply(model)
    assert len(gates(model)) == 3 and seen == []
    model(torch.randn(2, 3, 16, 16))
    assert seen == [torch.Size([2, 8, 16, 16])]


def test_one_hook_on_several_modules_is_named_with_the_module_it_failed_on():
    model = BlockNet()
    def hook(module, args, output):  # fine on the first two blocks, fails on the third
        if module is model.blocks[2] and output.abs().max() > 100:
            raise AssertionError("unreachable")

    handles = [b.register_forward_hook(hook) for b in model.blocks]
    try:
        with pytest.raises(TraceError, match=r"a forward hook on `blocks\.2` \(hook, "):
            se_inject.apply(model)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("call,kwargs,meant", [
    ("apply", {"ration": 8}, "ratio"),
    ("apply", {"stage": [2]}, "stages"),
    ("plan", {"postion": "pre"}, "position"),
    ("cost", {"squeze": "max"}, "squeeze"),  # one of cost()'s gate options, taken as **variant
    ("cost", {"ratoi": 4}, "ratio"),
    ("fuse", {"freez": True}, "freeze"),
])
def test_misspelt_keyword_names_the_option(call, kwargs, meant):
    """A misspelt keyword is an SEInjectError (and a TypeError, as Python's own), suggests the
    option meant, and the model is untouched: fuse() would otherwise compile it in place."""
    model = BlockNet()
    keys = list(model.state_dict())
    with pytest.raises(se_inject.SEInjectError, match=f"did you mean '{meant}'") as info:
        getattr(se_inject, call)(model, **kwargs)
    assert isinstance(info.value, TypeError)
    _untouched(model, keys)
    assert model._compiled_call_impl is None


@pytest.mark.parametrize("call,args", [
    ("apply", ()), ("plan", ()), ("remove", ()), ("cost", ()), ("fuse", ()), ("unfuse", ()),
    ("save", ("unwritten.safetensors",)), ("part_input_size", ("blocks",)),
])
def test_every_call_on_a_model_refuses_an_unknown_keyword_before_it_runs(call, args):
    model = BlockNet()
    keys = list(model.state_dict())
    with pytest.raises(se_inject.SEInjectError, match=r"nonsense") as info:
        getattr(se_inject, call)(model, *args, nonsense=1)
    assert isinstance(info.value, TypeError)  # as Python's own, which it replaces
    _untouched(model, keys)
    with pytest.raises(se_inject.SEInjectError, match=r"nonsense"):
        se_inject.load("unread.safetensors", nonsense=1)


def test_misplaced_arguments_name_the_call():
    model = BlockNet()
    keys = list(model.state_dict())
    with pytest.raises(TypeError, match=r"apply\(\): too many positional arguments") as info:
        se_inject.apply(model, 16, None, (3, 32, 32))  # input_size is keyword-only
    assert isinstance(info.value, se_inject.SEInjectError)
    with pytest.raises(se_inject.SEInjectError, match="missing a required argument: 'path'"):
        se_inject.save(model)
    _untouched(model, keys)


_ODD_VALUES = [None, 1.5, -1, "", b"x", object(), nn.Conv2d, torch.zeros(2), True, {"a": 1},
               lambda x: x, 10 ** 12]
_OPTIONS = {"apply": ["ratio", "rules", "input_size", "stages", "init", "position", "gate",
                      "squeeze", "excite", "min_channels", "divisor", "fused", "leaf_modules",
                      "autowrap_functions"],
            "plan": ["ratio", "input_size", "leaf_modules", "autowrap_functions"],
            "cost": ["ratio", "input_size", "stages", "min_channels"],
            "fuse": ["freeze", "mode", "dynamic", "backend", "options"]}


@pytest.mark.parametrize("call,option", [(c, o) for c, opts in _OPTIONS.items() for o in opts])
def test_an_argument_of_any_type_is_refused_or_taken(call, option):
    """Whatever an option is given, the call refuses it with an SEInjectError, naming it, and
    leaves the model as it was, or takes it: never another exception (a TypeError from deep
    inside, torch.compile's refusal, a failed allocation of a gate 10**12 channels wide)."""
    for value in _ODD_VALUES:
        model = BlockNet()
        keys = list(model.state_dict())
        if call == "fuse":
            se_inject.apply(model)
            keys = list(model.state_dict())
        try:
            result = getattr(se_inject, call)(model, **{option: value})
        except SEInjectError as exc:
            said = str(exc).lower()
            assert option.rstrip("s") in said or "torch.compile" in said or \
                "bottleneck" in said, (value, str(exc))
            assert list(model.state_dict()) == keys, value
            if call == "fuse":
                assert model._compiled_call_impl is None
                assert not any(k.startswith("_se_inject_frozen") for g in gates(model)
                               for k in g[1].__dict__)
            elif call == "apply":
                _untouched(model, keys)
        else:  # taken: the call did its work
            if call == "apply":
                assert result is model and gates(model), value
            elif call == "plan":
                assert len(result.sites) > 0, value
            elif call == "cost":
                assert all(r.gates for r in result.ratios), value
            else:
                assert result is model and model._compiled_call_impl is not None, value
        finally:
            torch._dynamo.reset()


@pytest.mark.parametrize("call", ["remove", "unfuse", "fuse", "save", "load", "plan", "cost"])
def test_what_is_not_a_model_or_a_path_is_refused(call, tmp_path):
    for value in _ODD_VALUES + [{"weight": torch.zeros(1)}]:
        if call in ("load", "cost") and value is None:
            continue
        args = (value, tmp_path / "x.safetensors") if call == "save" else (value,)
        with pytest.raises(SEInjectError):
            getattr(se_inject, call)(*args)
    gated = se_inject.apply(BlockNet())
    for value in (b"x.safetensors", 3, None, torch.zeros(1)):
        with pytest.raises(SEInjectError, match="path must be a file name"):
            se_inject.save(gated, value)
    assert not list(tmp_path.iterdir())


def _eager_quantized():
    from torchvision.models.quantization import resnet18
    model = resnet18(weights=None, quantize=False).eval()
    model.fuse_model()
    model.qconfig = torch.ao.quantization.get_default_qconfig("fbgemm")
    torch.ao.quantization.prepare(model, inplace=True)
    model(torch.randn(4, 3, 32, 32))
    return torch.ao.quantization.convert(model, inplace=True)


def _fx_quantized(model, x):
    from torch.ao.quantization import get_default_qconfig_mapping, quantize_fx
    prepared = quantize_fx.prepare_fx(model, get_default_qconfig_mapping("fbgemm"), (x,))
    prepared(x)
    return quantize_fx.convert_fx(prepared)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")
def test_a_quantized_model_is_refused_with_the_way_that_works():
    """A model quantized with int8 layers cannot be gated (no shapes on meta, no place for a
    gate between int8 layers); the advice, gating the float model and quantizing it in FX
    graph mode, gives a quantized model with its gates."""
    from torchvision.models import resnet18
    x = torch.randn(8, 3, 64, 64)  # (torch's quantized mean fails on layer4's maps at 1 x 1)
    for model in (_eager_quantized(), _fx_quantized(resnet18().eval(), x)):
        keys = list(model.state_dict())
        with pytest.raises(InvalidArgumentError, match="quantize_fx.prepare_fx") as info:
            se_inject.apply(model, input_size=(3, 64, 64))
        assert "model is quantized" in str(info.value)
        assert list(model.state_dict()) == keys
    from torchvision.models.quantization import resnet18 as quantizable
    to_quantize = quantizable(weights=None, quantize=False).eval()  # FloatFunctional sums
    with torch.no_grad():
        y0 = to_quantize(x)
        assert torch.equal(se_inject.apply(to_quantize, init="identity")(x), y0)
    assert len(gates(to_quantize)) == 8
    gated = se_inject.apply(resnet18().eval(), init="identity")
    quantized = _fx_quantized(gated, x)
    assert sum(".se_gate" in name for name, _ in quantized.named_modules()) >= 8
    with torch.no_grad():
        y0, y1 = gated(x), quantized(x)
    assert (y1 - y0).abs().max() <= 0.1 * y0.abs().max()  # int8, against float


def test_a_layer_that_makes_quantized_tensors_gives_a_trace_error():
    """A layer fx does not look into whose output has no meta twin (a quantized tensor): the
    shapes cannot be propagated, said as a TraceError rather than torch's NotImplementedError."""
    class Quantizing(nn.Module):  # as torch.ao's Quantize: its scale read as a number
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.tensor(0.1))

        def forward(self, x):
            return torch.quantize_per_tensor(x, float(self.scale), 0, torch.quint8)

    class Net(BlockNet):
        def __init__(self):
            super().__init__()
            self.q = Quantizing()

        def forward(self, x):
            return super().forward(self.q(x).dequantize())

    model = Net()
    keys = list(model.state_dict())
    with pytest.raises(TraceError, match=r"shapes could not be propagated through "
                                         r"`self.q\(x\)` in the model's own forward"):
        se_inject.apply(model, leaf_modules=[Quantizing])
    _untouched(model, keys)


def test_warnings_are_attributed_to_the_line_that_called_se_inject(tmp_path):
    """A warning shows the user's call of apply() or convert(), not a line inside se-inject
    (apply()'s argument check, or the convert() that applies), so that it points at their code
    and their filters by module see it."""
    import warnings

    import timm
    from handwritten import InlineResidualNet
    from se_inject.checkpoint import convert
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        se_inject.apply(InlineResidualNet())    # gates in the model's own forward: it warns
    assert [w.filename for w in caught] == [__file__]
    state = {f"model.{k}": v for k, v in timm.create_model("resnet18").state_dict().items()}
    torch.save({**state, "teacher.weight": torch.zeros(3)}, tmp_path / "plain.pth")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        convert(tmp_path / "plain.pth", tmp_path / "se.safetensors", model="resnet18")
    said = [w for w in caught if "not part of the model" in str(w.message)]
    assert said and {w.filename for w in said} == {__file__}


def test_leaf_modules_by_name_are_the_classes_they_name():
    """leaf_modules takes class names (plain or qualified) as the command line's --leaf and
    convert() do: the same blocks stay whole as with the classes; a name no module of the model
    has is refused with the close ones, and the model is untouched."""
    import timm
    from timm.models.inception_v3 import InceptionB, InceptionD

    def sites(**kw):
        return [s.block for s in se_inject.plan(timm.create_model("inception_v3"), **kw)]

    by_class = sites(leaf_modules=[InceptionB, InceptionD])
    assert len(by_class) == len(sites()) - 2 and not {"Mixed_6a", "Mixed_7a"} & set(by_class)
    assert sites(leaf_modules=["InceptionB", "timm.models.inception_v3.InceptionD"]) == by_class
    model = timm.create_model("inception_v3")
    keys = list(model.state_dict())
    with pytest.raises(InvalidArgumentError, match="'InceptonB'.*Did you mean: InceptionB"):
        se_inject.apply(model, leaf_modules=["InceptonB"])
    _untouched(model, keys)
