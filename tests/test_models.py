"""apply() on timm and torchvision models, checked against timm's SE models, the paper and the
unmodified model."""
import copy
import re
import warnings

import pytest
import timm
import torch
import torch.fx as fx
import torchvision

import se_inject
from conftest import eq5_parameters, gates, n_params, paper_reference, randomize_norms, saturate
from handwritten import BlockNet

RESNET50_PARAMS = 25_557_032          # paper.md; timm and torchvision agree
RESNET50_STAGES = [(3, 256), (4, 512), (6, 1024), (3, 2048)]
RESNET18_STAGES = [(2, 64), (2, 128), (2, 256), (2, 512)]


def _timm(name):
    return lambda: timm.create_model(name, pretrained=False)


def _tv(name, **kw):
    return lambda: getattr(torchvision.models, name)(weights=None, **kw)


def _count(*names, where=lambda m: True):
    return lambda model: sum(1 for m in model.modules() if type(m).__name__ in names and where(m))


def _hrnet_sites(model):
    """Every residual block, each pairwise sum of a multi-branch module's fuse layers, and the
    sums between the head's resolutions."""
    modules = [type(m).__name__ for m in model.modules()]
    fuse = sum(m.num_branches * (m.num_branches - 1) for m in model.modules()
               if type(m).__name__ == "HighResolutionModule" and m.num_branches > 1)
    return modules.count("BasicBlock") + modules.count("Bottleneck") + fuse + \
        len(model.incre_modules) - 1


def _no_se(m):
    return not any(type(x).__name__ in ("SEModule", "SqueezeExcite", "SqueezeExcitation")
                   for x in m.modules())


# name -> (builder, input side, expected gates: a number from the paper and the architecture,
# or a count taken from the unmodified model's own structure)
MODELS = {
    "timm/resnet18": (_timm("resnet18"), 64, 8),
    "timm/resnet50": (_timm("resnet50"), 64, 16),
    "timm/resnext50_32x4d": (_timm("resnext50_32x4d"), 64, 16),
    "timm/inception_v3": (_timm("inception_v3"), 107, 11),
    # blocks called with a default-None shortcut, with a list of tensors, with optional children
    "timm/dla34": (_timm("dla34"), 64, _count("DlaBasic")),  # root concats aggregate a chain
    "timm/hrnet_w18_small": (_timm("hrnet_w18_small"), 64, _hrnet_sites),
    "timm/tresnet_m": (_timm("tresnet_m"), 64, _count("BasicBlock", "Bottleneck", where=_no_se)),
    # training-time re-parameterisable branches (sums of one-conv linear branches) are not
    # blocks: one gate per bottleneck, not one per branch sum
    "timm/ghostnetv3_050": (_timm("ghostnetv3_050"), 64, _count("GhostBottleneckV3", where=_no_se)),
    "torchvision/resnet50": (_tv("resnet50"), 64, 16),
    "torchvision/googlenet": (_tv("googlenet", aux_logits=False, init_weights=True), 64, 9),
    # blocks made of torchvision.ops leaf modules (Conv2dNormActivation, SqueezeExcitation)
    "torchvision/mobilenet_v3_small": (_tv("mobilenet_v3_small"), 64, _count(
        "InvertedResidual", where=lambda m: m.use_res_connect and _no_se(m))),
}


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, side, expected = MODELS[request.param]
    model = build().eval()
    if callable(expected):
        expected = expected(model)
    randomize_norms(model)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        y0 = model(x)
    before = {k: v for k, v in model.state_dict().items()}
    methods = {n for n in dir(type(model)) if callable(getattr(type(model), n, None))}
    with warnings.catch_warnings():  # HRNet's head holds gates in the model's own forward
        warnings.filterwarnings("ignore", message=".*sit in the forward of the model itself")
        se_inject.apply(model, ratio=16)
    return request.param, build, model, x, y0, before, methods, expected


def test_gate_count_and_names(case):
    _, _, model, _, _, before, _, expected = case
    found = gates(model)
    assert len(found) == expected
    assert all(re.fullmatch(r"se_gate(_[1-9][0-9]*)?", n.split(".")[-1]) for n, _ in found)
    new_keys = set(model.state_dict()) - set(before)
    assert new_keys == {f"{n}.{p}" for n, _ in found for p in
                        ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")}


def test_in_place_class_methods_and_weights_kept(case):
    name, build, model, _, _, before, methods, _ = case
    assert type(model) is type(build())
    assert methods <= {n for n in dir(type(model)) if callable(getattr(type(model), n, None))}
    sd = model.state_dict()
    for k, v in before.items():  # same keys, same tensors (not copies)
        assert sd[k].data_ptr() == v.data_ptr(), k
    if name.startswith("timm/"):
        assert model.pretrained_cfg and model.feature_info
        model2 = copy.deepcopy(model)
        model2.reset_classifier(7)
        assert model2.forward_features(torch.randn(1, 3, 96, 96)).dim() == 4
        assert model2(torch.randn(1, 3, 96, 96)).shape == (1, 7)


def test_saturated_gates_give_the_original_output(case):
    _, _, model, x, y0, _, _, _ = case
    m = copy.deepcopy(model)
    with torch.no_grad():
        assert not torch.allclose(m(x), y0)  # the gates do change the function...
        saturate(m)
        assert torch.equal(m(x), y0)         # ...and change nothing else


def test_backward_reaches_every_gate(case):
    _, _, model, x, _, _, _, _ = case
    m = copy.deepcopy(model).train()
    m(x).float().pow(2).mean().backward()
    for n, g in gates(m):
        # every parameter gets a gradient; a gate of C // r = 1 hidden unit may have its ReLU
        # off for this input (then fc1 gets zeros), but fc2's bias always gets a signal
        assert all(p.grad is not None for p in g.parameters()), n
        assert g.fc2.bias.grad.abs().sum() > 0, n


@pytest.mark.filterwarnings("ignore:.*sit in the forward of the model itself")
def test_fx_deepcopy_and_state_dict_round_trip(case):
    _, build, model, x, _, _, _, _ = case
    with torch.no_grad():
        y = model(x)
        # gates in the model's own forward need the model wrapped (apply() warns about this)
        own = any(isinstance(m, se_inject.ChannelGate) for m in model.children())
        traced = fx.symbolic_trace(torch.nn.Sequential(model) if own else model)
        n_traced = sum(1 for n in traced.graph.nodes
                       if re.search(r"(^|\.)se_gate(_[1-9][0-9]*)?\.fc1\.weight$", str(n.target)))
        assert n_traced == len(gates(model))
        torch.testing.assert_close(traced(x), y, rtol=0, atol=0)
        twin = copy.deepcopy(model)
        torch.testing.assert_close(twin(x), y, rtol=0, atol=0)
        assert {id(g) for _, g in gates(twin)}.isdisjoint({id(g) for _, g in gates(model)})
        fresh = se_inject.apply(build().eval())
        fresh.load_state_dict(model.state_dict(), strict=True)
        torch.testing.assert_close(fresh(x), y, rtol=0, atol=0)


def test_second_apply_does_not_stack(case):
    _, _, model, _, _, _, _, expected = case
    m = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="already holds a gate"):
        se_inject.apply(m)
    assert len(gates(m)) == expected
    assert len(se_inject.plan(m)) == 0


@pytest.mark.parametrize("first,then", [("standard", "post"), ("standard", "pre"),
                                         ("standard", "identity"), ("post", "standard"),
                                         ("pre", "post")])
def test_second_apply_at_another_position_does_not_stack(first, then):
    """Before, a second apply() with another position gave every block a second gate (a
    resnet18 gated four times held 21); a block holding one of ours anywhere is skipped."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False).eval()
    se_inject.apply(model, position=first, input_size=(3, 64, 64))
    names = [n for n, _ in gates(model)]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
    with pytest.warns(UserWarning, match="already holds a gate"):
        se_inject.apply(model, position=then, input_size=(3, 64, 64))
    assert [n for n, _ in gates(model)] == names and len(names) == 8
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_remove_restores_keys_and_outputs(case):
    _, _, model, x, y0, before, _, _ = case
    m = copy.deepcopy(model)
    assert se_inject.remove(m) is m
    assert list(m.state_dict()) == list(before)
    assert not any("forward" in mod.__dict__ for mod in m.modules())
    with torch.no_grad():
        assert torch.equal(m(x), y0)


# --- against timm's native SE models and the paper ---------------------------------------

@pytest.mark.parametrize("plain,native", [("resnet50", "seresnet50"),
                                          ("resnext50_32x4d", "seresnext50_32x4d")])
def test_same_weights_compute_what_timm_native_se_computes(plain, native):
    gated = se_inject.apply(timm.create_model(plain).eval(), ratio=16)
    randomize_norms(gated)  # timm zero-initialises each branch's last norm: no gate would act
    ref = timm.create_model(native).eval()
    ours = {k.replace(".se_gate.", ".se."): v for k, v in gated.state_dict().items()}
    assert set(ours) == set(ref.state_dict())          # one gate per block, same places
    ref.load_state_dict(ours, strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        want = ref(x)
        # the excitation's sums run in another order than timm's 1x1 convolutions: 3e-6 here
        torch.testing.assert_close(gated(x), want, rtol=1e-5, atol=1e-5)
        se_inject.remove(gated)
        assert (gated(x) - want).abs().max() > 1e-2     # and the gates do act


@pytest.mark.parametrize("ratio,total", [(16, 28_088_024), (4, 35_635_688)])
def test_resnet50_parameters_follow_eq5(ratio, total):
    model = timm.create_model("resnet50")
    assert n_params(model) == RESNET50_PARAMS
    se_inject.apply(model, ratio=ratio)
    weights, biases = eq5_parameters(RESNET50_STAGES, ratio)
    assert n_params(model) == RESNET50_PARAMS + weights + biases == total
    if ratio == 16:
        assert weights == 2_514_944                           # paper.md, Eq. 5 at r=16
        last = sum(g.fc1.weight.numel() + g.fc2.weight.numel()
                   for n, g in gates(model) if n.startswith("layer4"))
        assert last == 1_572_864                              # the last stage's share


def test_resnet18_and_torchvision_resnet50_follow_eq5():
    r18 = timm.create_model("resnet18")
    base = n_params(r18)
    se_inject.apply(r18)
    assert n_params(r18) - base == sum(eq5_parameters(RESNET18_STAGES, 16))
    tv = torchvision.models.resnet50(weights=None)
    se_inject.apply(tv)
    assert n_params(tv) == 28_088_024


@pytest.mark.parametrize("name,modules", [
    ("timm/inception_v3", [f"Mixed_{s}" for s in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e",
                                                  "7a", "7b", "7c")]),
    ("torchvision/googlenet", [f"inception{s}" for s in ("3a", "3b", "4a", "4b", "4c", "4d", "4e",
                                                         "5a", "5b")]),
])
def test_inception_gate_on_each_module_output(name, modules):
    build, side, _ = MODELS[name]
    base = build().eval()
    gated = copy.deepcopy(base)
    se_inject.apply(gated)
    assert sorted(n for n, _ in gates(gated)) == sorted(f"{m}.se_gate" for m in modules)
    x = torch.randn(2, 3, side, side)
    seen_in, seen_out = {}, {}

    def record(store, key):
        return lambda mod, inp, out: store.__setitem__(key, (inp[0], out))

    for m in modules:
        base.get_submodule(m).register_forward_hook(record(seen_in, m))
        gated.get_submodule(m).register_forward_hook(record(seen_out, m))
    with torch.no_grad():
        base(x)
        gated(x)
        for m in modules:
            # fed the gated model's input, the plain module's output times the gate (Eq. 2-4)
            inp, out = seen_out[m]
            plain = base.get_submodule(m)(inp)
            expected = paper_reference(plain, gated.get_submodule(m).se_gate)
            # conv vs matmul summation order: float32 rounding relative to the activations' size
            torch.testing.assert_close(out, expected, rtol=1e-4,
                                       atol=1e-5 * expected.abs().max().item())


def test_inception_resnet_concat_inside_a_residual_branch_yields_to_the_residual():
    """Inception-ResNet-v2: 10 Block35 + 20 Block17 + 10 Block8 residual blocks, each with a
    concat inside its branch, and the concat modules mixed_5b, mixed_6a, mixed_7a."""
    model = timm.create_model("inception_resnet_v2")
    p = se_inject.plan(model)
    assert p.by_rule() == {"residual": 40, "inception": 3}
    assert {s.block for s in p if s.rule == "inception"} == {"mixed_5b", "mixed_6a", "mixed_7a"}
    residual_blocks = [n for n, m in model.named_modules()
                       if type(m).__name__ in ("Block35", "Block17", "Block8")]
    assert sorted(s.block for s in p if s.rule == "residual") == sorted(residual_blocks)
    nested = [s for s in p.skipped if "nested in a block of rule 'residual'" in s.reason]
    assert len(nested) == 40 and all(s.rule == "inception" for s in nested)


def test_res2net_gets_one_gate_per_block_not_per_scale():
    model = timm.create_model("res2net50_14w_8s")
    blocks = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Bottle2neck")
    p = se_inject.plan(model)
    assert sorted(s.block for s in p) == blocks
    inner = [s for s in p.skipped if "multi-scale block" in s.reason]
    # a block that is not its stage's first sums each of its scales 1..scale-2 into the next
    expected = sum(m.scale - 2 for n, m in model.named_modules()
                   if type(m).__name__ == "Bottle2neck" and not m.is_first)
    assert len(inner) == expected and all(s.rule == "residual" for s in inner)


@pytest.mark.parametrize("name,block", [("cspresnet50", "BottleneckBlock"),
                                        ("cs3darknet_s", "DarkBlock")])
def test_every_block_of_a_csp_stage_gets_its_gate_the_first_too(name, block):
    """A CSP stage splits its input and runs its blocks on one piece: the first block's
    shortcut is that piece. It was taken for a connection between Res2Net's scales (a sum
    with a piece of a split) and left without a gate, in every stage."""
    model = timm.create_model(name, pretrained=False)
    blocks = sorted(n for n, m in model.named_modules() if type(m).__name__ == block)
    p = se_inject.plan(model, input_size=(3, 64, 64))
    assert sorted(s.block for s in p) == blocks and len(blocks) == {"cspresnet50": 13,
                                                                    "cs3darknet_s": 9}[name]
    assert not [s for s in p.skipped if "multi-scale" in s.reason]


def test_timm_notrace_blocks_that_trace_are_opened_and_others_stay_leaves():
    """NormFreeBlock is registered no-trace (for fx's dead-code passes, which se-inject does
    not run): it traces, so each gets its gate. VGG's ConvMlp does not trace: it stays whole."""
    model = timm.create_model("nf_resnet26").eval()
    blocks = sorted(n for n, m in model.named_modules() if type(m).__name__ == "NormFreeBlock")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y0 = model(x)
    se_inject.apply(model)
    assert sorted(n.rsplit(".", 1)[0] for n, _ in gates(model)) == blocks
    saturate(model)
    with torch.no_grad():
        assert torch.equal(model(x), y0)
    with pytest.raises(se_inject.SEInjectError, match="no residual or inception-style block"):
        se_inject.apply(timm.create_model("vgg11"))


@pytest.mark.parametrize("name,kwargs,scaled", [
    ("nf_resnet26", {}, ("conv3.bias", "conv3.gain")),
    ("resnet18", {"norm_layer": "groupnorm"}, ("bn2.bias", "bn2.weight"))],
    ids=["nf_resnet26", "resnet18_groupnorm"])
def test_identity_gates_on_timm_layers_traced_as_functions(name, kwargs, scaled):
    """An NFNet's ScaledStdConv2d and timm's GroupNorm are traced as F.conv2d and
    F.group_norm: an identity gate after each doubles the gain (the norm's weight) and the bias,
    and the gated model computes what it did, bit for bit."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    with torch.no_grad():  # (timm zero-initialises what ends a branch: no gate would act)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    se_inject.apply(model, init="identity", input_size=(3, 64, 64))
    blocks = sorted({n.rsplit(".", 1)[0] for n, _ in gates(model)})
    assert len(blocks) == {"nf_resnet26": 8, "resnet18": 8}[name]
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    before, now = ref.state_dict(), model.state_dict()
    changed = sorted(k for k, v in before.items() if not torch.equal(now[k], v))
    assert changed == sorted(f"{b}.{p}" for b in blocks for p in scaled)


def test_gating_inside_inference_mode_keeps_a_trainable_model_trainable():
    """Gates are made as the model's own tensors were, not in the caller's mode: gated inside
    torch.inference_mode(), a model made for training still trains, gates included."""
    model = BlockNet().eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    with torch.inference_mode():
        se_inject.apply(model, init="identity")
    assert not any(t.is_inference() for t in model.state_dict().values())
    out = model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    out.square().sum().backward()
    assert all(p.grad is not None for _, g in gates(model) for p in g.parameters())


def test_a_model_made_in_inference_mode_is_gated_whole_outside_it():
    """Its tensors can only change in place inside inference mode: identity initialisation
    scales them there (outside it, the scaling failed after the gates were in)."""
    with torch.inference_mode():
        model = BlockNet().eval()
        randomize_norms(model)
        x = torch.randn(2, 3, 16, 16)
        ref = model(x)
    se_inject.apply(model, init="identity")
    assert len(gates(model)) == 3
    assert all(t.is_inference() for t in model.state_dict().values())
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)
    se_inject.remove(model)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-6)


def _flat_key(key: str) -> str:
    """A state_dict key with timm's feature-wrapper naming undone: FeatureHookNet and
    FeatureListNet join the first levels of a module path with '_' ('stem_0.conv')."""
    return key.replace("_", ".")


# (model, the class timm's features_only=True builds: a flattened module list, the model's own
# feature class, forward hooks)
FEATURE_MODELS = [("resnet50", "FeatureListNet"), ("mobilenetv3_large_100", "MobileNetV3Features"),
                  ("xception41", "FeatureHookNet")]


@pytest.mark.parametrize("name,wrapper", FEATURE_MODELS)
def test_features_only_backbones_get_the_classifiers_gates(name, wrapper):
    """A detection backbone (timm.create_model(..., features_only=True)) is gated at the blocks
    the classifier is, and each feature map it returns is what the gated classifier computes at
    that module with the same weights, not what the plain backbone computes."""
    full = timm.create_model(name, pretrained=False).eval()
    n_full = len(se_inject.plan(full).sites)
    se_inject.apply(full)
    randomize_norms(full)
    with torch.no_grad():
        for _, g in gates(full):
            for p in g.parameters():
                p.normal_(0, 0.5)
    backbone = timm.create_model(name, pretrained=False, features_only=True).eval()
    plain = copy.deepcopy(backbone)
    assert type(backbone).__name__ == wrapper
    se_inject.apply(backbone)
    assert type(backbone).__name__ == wrapper
    assert len(gates(backbone)) == n_full
    weights = {_flat_key(k): v for k, v in full.state_dict().items()}
    backbone.load_state_dict({k: weights[_flat_key(k)] for k in backbone.state_dict()})
    plain.load_state_dict({k: weights[_flat_key(k)] for k in plain.state_dict()})
    modules, seen = dict(full.named_modules()), []
    for module in backbone.feature_info.module_name():
        modules[module].register_forward_hook(lambda m, i, o: seen.append(o))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        features, base = backbone(x), plain(x)
        full(x)
    assert len(features) == len(seen) == len(base) >= 4
    for f, want in zip(features, seen):
        torch.testing.assert_close(f, want, rtol=0, atol=0)
    assert max(((f - b).abs().max() / b.abs().max()).item() for f, b in zip(features, base)) > 0.05
    backbone.train()
    sum(f.square().mean() for f in backbone(x)).backward()
    assert all(p.grad is not None for _, g in gates(backbone) for p in g.parameters())


def _recomputes(model, module, x) -> int:
    """How many times ``module`` is called in one forward and backward of ``model`` on ``x``
    (counted as it starts: a non-reentrant checkpoint stops recomputing inside the module that
    makes the last tensor backward needs)."""
    calls = []
    hook = module.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        model(x).square().mean().backward()
    finally:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize("name", ["resnet18", "convnext_atto", "mobilenetv2_050"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_gradient_checkpointing_on_before_or_after_apply(name, when):
    """timm's set_grad_checkpointing() (checkpoint_seq over stages, or per block) on before
    apply() gives the plan it gives off, and either way the gated model checkpoints: a layer
    inside a checkpointed region runs again in backward, and the outputs and gradients are
    those of the gated model without checkpointing."""
    def gated(checkpointing_before):
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, drop_path_rate=0.0).train()
        m.set_grad_checkpointing(checkpointing_before)
        se_inject.apply(m, rules=["residual", "inception", "inverted-residual"])
        return m

    reference = gated(False)
    model = gated(when == "before")
    if when == "after":
        model.set_grad_checkpointing(True)
    model.load_state_dict(reference.state_dict())
    assert [n for n, _ in gates(model)] == [n for n, _ in gates(reference)] and gates(model)
    plan_on = timm.create_model(name, pretrained=False)
    plan_on.set_grad_checkpointing(True)
    assert se_inject.plan(plan_on).sites == se_inject.plan(timm.create_model(name)).sites

    x = torch.randn(2, 3, 64, 64)
    outs = []
    for m in (model, reference):
        torch.manual_seed(1)
        outs.append(m(x))
        outs[-1].square().mean().backward()
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for n, p in reference.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5, msg=n)
    middle = len(gates(model)) // 2  # a gate inside a middle stage
    assert _recomputes(reference, gates(reference)[middle][1], x) == 1
    assert _recomputes(model, gates(model)[middle][1], x) == 2


def test_a_model_made_on_the_meta_device_is_gated_there_and_loads_after_to_empty():
    """Large models are made without memory (`with torch.device("meta")`), gated, then given
    storage and weights: the gates are made on the model's device, and the loaded model computes
    what the gated model it was saved from computes."""
    ref = timm.create_model("resnet18", pretrained=False).eval()
    se_inject.apply(ref)
    randomize_norms(ref)
    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained=False)
    se_inject.apply(model)
    assert {t.device.type for _, g in gates(model) for t in g.parameters()} == {"meta"}
    model.to_empty(device="cpu")
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ref(x), rtol=0, atol=0)


def _meta_gated_then_emptied(name: str, **kw):
    """A model made on the meta device, gated there, then given storage by ``to_empty()``, its
    gates' memory filled with NaN (what uninitialised memory may hold)."""
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    se_inject.apply(model, **kw)
    return _emptied(model)


def _emptied(model):
    model.to_empty(device="cpu")
    with torch.no_grad():
        for _, g in gates(model):
            for p in g.parameters():
                p.fill_(float("nan"))
    return model


@pytest.mark.parametrize("gate", ["se", "eca", "ese"])
def test_a_plain_checkpoint_loaded_into_a_model_gated_on_the_meta_device_initialises_its_gates(gate):
    """Fine-tuning a pretrained backbone made on the meta device: gated there, given storage,
    then the plain model's state_dict loaded (strict=False). The gates hold no values of the
    checkpoint's, so they start as apply() would have made them (PyTorch's default
    initialisation), not as the memory to_empty() left them (here NaN); every other tensor is
    the checkpoint's."""
    plain = timm.create_model("resnet18", pretrained=False).eval()
    randomize_norms(plain)
    model = _meta_gated_then_emptied("resnet18", gate=gate)
    missing = model.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(k.startswith(tuple(n + "." for n, _ in gates(model))) for k in missing)
    own = model.state_dict()
    for k, v in plain.state_dict().items():
        assert torch.equal(own[k], v), k
    for _, g in gates(model):
        for m in g.modules():
            if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
                fan_in = m.weight[0].numel()
                bound = fan_in ** -0.5  # nn.Conv's default: kaiming_uniform(a=sqrt(5)), bias alike
                for p in m.parameters():
                    assert torch.isfinite(p).all() and p.abs().max() <= bound
                    assert p.numel() == 1 or p.std() > bound / 4
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, base = model.eval()(x), plain(x)
    assert torch.isfinite(out).all()
    assert (out - base).abs().max() > 1e-3 * base.abs().max()  # the gates act


def test_a_plain_checkpoint_loaded_into_identity_gates_made_on_the_meta_device_keeps_its_outputs():
    """The same route with init="identity": the gated model computes exactly what the plain
    checkpoint's model computes (the gates start at 0.5, the scaled layers get the checkpoint's
    values doubled), and the gates still learn."""
    plain = timm.create_model("resnet18", pretrained=False).eval()
    randomize_norms(plain)
    model = _meta_gated_then_emptied("resnet18", init="identity")
    model.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), plain(x), rtol=0, atol=0)
    model.train()
    model(x).square().mean().backward()
    assert all(g.fc2.weight.grad.abs().sum() > 0 for _, g in gates(model))


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")
def test_gates_made_on_the_meta_device_keep_the_values_a_checkpoint_gives_them():
    """A checkpoint holding the gates' tensors gives them their values, and a plain checkpoint
    loaded after it does not start them again: only gates that never had values are
    initialised. Loaded into tensors still on the meta device (assign=False), nothing is given,
    and a later load into storage still initialises them."""
    ref = timm.create_model("resnet18", pretrained=False).eval()
    se_inject.apply(ref)
    plain = timm.create_model("resnet18", pretrained=False).eval()
    model = _meta_gated_then_emptied("resnet18")
    model.load_state_dict(ref.state_dict())
    model.load_state_dict(plain.state_dict(), strict=False)
    for (_, g), (_, want) in zip(gates(model), gates(ref)):
        for p, q in zip(g.parameters(), want.parameters()):
            assert torch.equal(p, q)

    with torch.device("meta"):
        model = timm.create_model("resnet18", pretrained=False)
    se_inject.apply(model)
    model.load_state_dict(ref.state_dict())  # copies into meta tensors: no values
    _emptied(model).load_state_dict(plain.state_dict(), strict=False)
    assert all(torch.isfinite(p).all() and p.abs().max() < 1 for _, g in gates(model)
               for p in g.parameters())


def test_mambaout_blocks_are_gated_on_the_channels_of_their_channels_last_maps():
    """MambaOut's GatedConvBlock takes and returns (N, H, W, C) maps and sums them there: each
    block gets a gate on its branch that squeezes H and W and scales C, as Eq. 2-4 on the
    channel-first view; the output keeps the block's layout."""
    model = timm.create_model("test_mambaout", pretrained=False, ls_init_value=0.5).eval()
    plain = copy.deepcopy(model)
    blocks = [n for n, m in model.named_modules() if type(m).__name__ == "GatedConvBlock"]
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == [f"{b}.se_gate" for b in blocks] and len(blocks) == 6
    for name in blocks:
        blk, ref = model.get_submodule(name), plain.get_submodule(name)
        t = torch.randn(2, 5, 6, blk.se_gate.channels)
        seen = []
        hook = ref.drop_path.register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            want = ref(t)
            hook.remove()
            u = seen[0].permute(0, 3, 1, 2)
            expected = t + paper_reference(u, blk.se_gate).permute(0, 2, 3, 1)
            out = blk(t)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        assert out.stride() == want.stride() and not torch.allclose(out - t, want - t)


def test_edgenext_blocks_through_tokens_are_gated_on_their_channels():
    """EdgeNeXt's SplitTransposeBlock runs its branch's attention and MLP on the map's pixels
    as tokens, (N, H·W, C), and views them back as (N, H, W, C) before its sum with the
    shortcut: it is gated as its ConvBlocks are, Eq. 2-4 on the branch, on C."""
    model = timm.create_model("edgenext_xx_small", pretrained=False).eval()
    plain = copy.deepcopy(model)
    kinds = ("ConvBlock", "SplitTransposeBlock")
    blocks = [n for n, m in model.named_modules() if type(m).__name__ in kinds]
    split = [n for n in blocks if type(model.get_submodule(n)).__name__ == kinds[1]]
    se_inject.apply(model)
    assert [n for n, _ in gates(model)] == [f"{b}.se_gate" for b in blocks]
    assert len(blocks) == 12 and len(split) == 3
    for name in split:
        blk, ref = model.get_submodule(name), plain.get_submodule(name)
        x = torch.randn(2, blk.se_gate.channels, 7, 7)
        seen = []
        hook = ref.drop_path.register_forward_hook(lambda m, a, out: seen.append(out))
        with torch.no_grad():
            ref(x)
            hook.remove()
            # (its drop path is called twice: on the attention's tokens, then on the branch)
            torch.testing.assert_close(blk(x), x + paper_reference(seen[-1], blk.se_gate),
                                       rtol=1e-5, atol=1e-6)


def _same_draws_same_outputs(model, plain, x):
    """In training and in eval mode, seeded alike, ``model`` computes exactly what ``plain``
    computes (the same dropout masks drawn)."""
    for train in (True, False):
        model.train(train), plain.train(train)
        torch.manual_seed(1)
        want = plain(x)
        torch.manual_seed(1)
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


@pytest.mark.parametrize("name,n_gates", [("resnet18", 8), ("convnext_atto", 12),
                                          ("rexnet_100", 1), ("tv:convnext_tiny", 18),
                                          ("test_mambaout", 6)])
def test_identity_init_with_drop_path_in_training_mode(name, n_gates):
    """timm's drop path reads its input's shape and makes its mask with ``x.new_empty``: reads
    that scaling does not change; torchvision's StochasticDepth is kept whole and passes a
    factor through. Gated in training mode with ``init="identity"``, the model computes what it
    computed before in both modes, the drop-path masks drawn alike. (ReXNet's partial-channel
    residual was refused outright in training mode: its gate landed inside the drop path.)"""
    if name.startswith("tv:"):
        model = getattr(torchvision.models, name[3:])(weights=None, stochastic_depth_prob=0.3)
    else:
        model = timm.create_model(name, pretrained=False, drop_path_rate=0.3)
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model, init="identity")
    assert len(gates(model)) == n_gates
    _same_draws_same_outputs(model, plain, torch.randn(4, 3, 64, 64))


@pytest.mark.parametrize("apply_in_train", [True, False])
def test_with_drop_path_the_gate_sits_where_timm_puts_se_in_either_mode(apply_in_train):
    """timm's SE blocks run se, then drop path, then the sum. Gated in training mode (drop path
    traced as a random mask) or in eval mode (drop path traced as nothing), the gate goes in
    front of the drop path, and the model computes what seresnet50 computes with the same
    weights and the same masks in both modes; the plan names the same tensors either way."""
    model = timm.create_model("resnet50", pretrained=False, drop_path_rate=0.5)
    randomize_norms(model)
    model.train(apply_in_train)
    plan = se_inject.plan(model)
    assert [s.tensor for s in plan.sites] == \
        [s.tensor for s in se_inject.plan(copy.deepcopy(model).train(not apply_in_train)).sites]
    assert all(s.tensor.endswith(".bn3") for s in plan.sites)
    se_inject.apply(model)
    ref = timm.create_model("seresnet50", pretrained=False, drop_path_rate=0.5)
    ref.load_state_dict({k.replace(".se_gate.", ".se."): v
                         for k, v in model.state_dict().items()}, strict=True)
    x = torch.randn(4, 3, 64, 64)
    for train in (True, False):
        model.train(train), ref.train(train)
        torch.manual_seed(3)
        want = ref(x)
        torch.manual_seed(3)  # summation order differs (up to 2e-5 here); a gate behind the
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)  # drop path: 1e-1


@pytest.mark.parametrize("apply_in_train", [True, False])
def test_with_drop_block_the_model_is_gated_in_either_mode_and_draws_its_blocks(apply_in_train):
    """timm's DropBlock2d cannot be traced in training mode (its mask size is the smaller of
    its block size and the map's, a branch on a traced shape): apply() refused every ResNet
    built with drop_block_rate. It is now one call in either mode. The plan is the eval-mode
    one, and the gated model computes what seresnet50 computes with the same
    weights and the same dropped blocks in both modes."""
    model = timm.create_model("resnet50", pretrained=False, drop_block_rate=0.2)
    randomize_norms(model)
    model.train(apply_in_train)
    plan = se_inject.plan(model)
    assert [s.tensor for s in plan.sites] == \
        [s.tensor for s in se_inject.plan(copy.deepcopy(model).eval()).sites]
    assert len(plan.sites) == 16
    se_inject.apply(model)
    ref = timm.create_model("seresnet50", pretrained=False, drop_block_rate=0.2)
    ref.load_state_dict({k.replace(".se_gate.", ".se."): v
                         for k, v in model.state_dict().items()}, strict=True)
    x = torch.randn(4, 3, 128, 128)
    outs = []
    for train in (True, False, True):
        model.train(train), ref.train(train)
        torch.manual_seed(3)
        want = ref(x)
        torch.manual_seed(3)
        outs.append(model(x))
        torch.testing.assert_close(outs[-1], want, rtol=1e-4, atol=1e-4)
    assert (outs[0] - outs[1]).abs().max() > 1e-2  # blocks were dropped in training


class _DropLast(torch.nn.Module):
    """A residual block whose branch ends in a drop layer."""

    def __init__(self, drop):
        super().__init__()
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c2, self.bn = torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.drop = drop

    def forward(self, x):
        return x + self.drop(self.bn(self.c2(torch.relu(self.c1(x)))))


@pytest.mark.parametrize("drop", ["timm", "torchvision", "dropout2d"])
def test_a_branch_ending_in_a_drop_block_is_gated_alike_in_either_mode(drop):
    """timm's DropBlock2d was traced through: as nothing in eval mode, as a layer fx could not
    trace in training mode (then called whole), so the gate went after the norm or after the
    drop block depending on the mode the model was in. It is one call in either mode, as
    torchvision's DropBlock2d and nn.Dropout2d are, and scales with its input, so identity
    initialisation keeps the outputs, the same blocks dropped."""
    def build():
        layer = {"timm": lambda: timm.layers.DropBlock2d(0.3, 3),
                 "torchvision": lambda: torchvision.ops.DropBlock2d(0.3, 3),
                 "dropout2d": lambda: torch.nn.Dropout2d(0.3)}[drop]()
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _DropLast(layer))

    sites = {train: [s.tensor for s in se_inject.plan(build().train(train),
                                                       input_size=(3, 16, 16)).sites]
             for train in (True, False)}
    assert sites[True] == sites[False] == ["1.drop"]
    model = build()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    _same_draws_same_outputs(model, plain, torch.randn(2, 3, 16, 16))


def test_identity_init_refuses_a_drop_block_that_adds_noise():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1),
                                _DropLast(timm.layers.DropBlock2d(0.3, 3, with_noise=True)))
    with pytest.raises(se_inject.SEInjectError, match=r"`1.drop` \(DropBlock2d\) does not "
                                                      r"scale with its input"):
        se_inject.apply(model, input_size=(3, 16, 16), init="identity")
    assert not gates(model)


def test_torchvision_deeplabv3_gates_its_aspp_and_keeps_its_outputs():
    """Its ASPP head concatenates five branches and projects them with an nn.Sequential: the
    gate on the concatenation was computed and dropped (the projection read the ungated
    tensor), and identity initialisation was refused for the size the pooled branch reads
    from its input's shape."""
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
    model = deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    randomize_norms(model)
    plain = copy.deepcopy(model)
    se_inject.apply(model, input_size=(3, 64, 64), init="identity")
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = plain(x)["out"]
        torch.testing.assert_close(model(x)["out"], want, rtol=0, atol=0)
        model.classifier[0].se_gate.fc2.bias.fill_(-30.0)   # the gate now closes every channel
        assert not torch.allclose(model(x)["out"], want)


def test_torchvision_inception_v3_is_gated_in_training_mode_without_an_input_size():
    """Its auxiliary head runs in training mode and needs its weights' 299 x 299 input: 224 x
    224 made shape propagation fail. Both modes give the same 11 gates."""
    model = torchvision.models.inception_v3(weights=None, init_weights=False)
    assert model.training and model.aux_logits
    sites = [s.tensor for s in se_inject.plan(model).sites]
    assert len(sites) == 11 and sites == [s.tensor for s in se_inject.plan(model.eval()).sites]
    assert se_inject.plan(model).sites[0].spatial == (35, 35)  # Mixed_5b at 299 x 299
