"""Gate variants (paper Tables 11-14, ECA, effective SE), each against its equations written out
directly, and the options that choose them on apply(), plan(), cost(), save/load and the CLI."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torchvision
from timm.layers import EcaModule, EffectiveSEModule, SEModule, make_divisible

import se_inject
from se_inject.cli import main
from se_inject.gate import (ECAGate, EffectiveSEGate, GateSpec, SEGate, gate_parameters,
                            make_gate, reduced_channels)

from conftest import gates, paper_reference

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# ---------------------------------------------------------------- the equations, written out

_EXCITE = {"sigmoid": lambda v: 1 / (1 + torch.exp(-v)),
           "hard_sigmoid": lambda v: torch.clamp(v + 3, 0, 6) / 6,
           "tanh": lambda v: (torch.exp(v) - torch.exp(-v)) / (torch.exp(v) + torch.exp(-v))}


def _squeeze(u, how):  # Eq. 2, or its max-pooling ablation (Table 11): one value per channel
    n, c = u.shape[:2]
    flat = u.reshape(n, c, -1)
    return flat.sum(-1) / flat.shape[-1] if how == "avg" else flat.max(-1).values


def se_reference(u, w1, b1, w2, b2, squeeze, excite):
    z = _squeeze(u, squeeze)
    s = _EXCITE[excite](torch.clamp(z @ w1.T + b1, min=0) @ w2.T + b2)   # Eq. 3
    return u * s[:, :, None, None]                                      # Eq. 4


def eca_reference(u, w, squeeze, excite):
    """ECA: channel c is excited by sum_j w_j z_{c+j-p}, zero outside the channels."""
    z = _squeeze(u, squeeze)
    n, c = z.shape
    k = w.numel()
    p = (k - 1) // 2
    s = torch.zeros(n, c, dtype=u.dtype)
    for ch in range(c):
        for j in range(k):
            src = ch + j - p
            if 0 <= src < c:
                s[:, ch] += w[j] * z[:, src]
    return u * _EXCITE[excite](s)[:, :, None, None]


def ese_reference(u, w, b, squeeze, excite):
    z = _squeeze(u, squeeze)
    return u * _EXCITE[excite](z @ w.T + b)[:, :, None, None]


@pytest.mark.parametrize("squeeze", ["avg", "max"])
@pytest.mark.parametrize("excite", ["sigmoid", "hard_sigmoid", "tanh"])
def test_se_gate_variants_follow_their_equations(squeeze, excite):
    torch.manual_seed(0)
    g = SEGate(24, 4, spec=GateSpec(squeeze=squeeze, excite=excite)).double()
    u = torch.randn(3, 24, 5, 7, dtype=torch.double)
    ref = se_reference(u, g.fc1.weight[:, :, 0, 0], g.fc1.bias, g.fc2.weight[:, :, 0, 0],
                       g.fc2.bias, squeeze, excite)
    torch.testing.assert_close(g(u), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("squeeze", ["avg", "max"])
@pytest.mark.parametrize("excite", ["sigmoid", "hard_sigmoid"])
@pytest.mark.parametrize("channels", [16, 100, 512])
def test_eca_gate_follows_its_equation(channels, squeeze, excite):
    torch.manual_seed(1)
    g = ECAGate(channels, spec=GateSpec(kind="eca", squeeze=squeeze, excite=excite)).double()
    g.conv.weight.data.normal_()
    u = torch.randn(2, channels, 4, 3, dtype=torch.double)
    ref = eca_reference(u, g.conv.weight.flatten(), squeeze, excite)
    torch.testing.assert_close(g(u), ref, rtol=1e-12, atol=1e-12)
    # ECA's paper: k = odd nearest |log2(C) + 1| / 2, at least 3
    t = int(abs(math.log2(channels) + 1) / 2)
    assert g.conv.weight.numel() == max(t if t % 2 else t + 1, 3)


@pytest.mark.parametrize("squeeze", ["avg", "max"])
@pytest.mark.parametrize("excite", [None, "sigmoid"])
def test_effective_se_gate_follows_its_equation(squeeze, excite):
    torch.manual_seed(2)
    spec = GateSpec(kind="ese", squeeze=squeeze, excite=excite)
    g = EffectiveSEGate(20, spec=spec).double()
    u = torch.randn(2, 20, 6, 6, dtype=torch.double)
    ref = ese_reference(u, g.fc.weight[:, :, 0, 0], g.fc.bias, squeeze,
                        excite or "hard_sigmoid")    # effective SE's own gate: a hard sigmoid
    torch.testing.assert_close(g(u), ref, rtol=1e-12, atol=1e-12)


def test_eca_and_effective_se_compute_what_timm_layers_do():
    torch.manual_seed(3)
    u = torch.randn(2, 64, 7, 7)
    ours, theirs = ECAGate(64), EcaModule(channels=64)
    ours.load_state_dict(theirs.state_dict())       # same parameter names and shapes
    torch.testing.assert_close(ours(u), theirs(u), rtol=0, atol=0)
    ours, theirs = EffectiveSEGate(64), EffectiveSEModule(64)
    ours.load_state_dict(theirs.state_dict())
    # the same sums; a matrix product instead of a 1x1 convolution may order them differently
    torch.testing.assert_close(ours(u), theirs(u), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels,ratio,min_channels,divisor", [
    (64, 16, 1, 8), (96, 16, 8, 8), (40, 4, 1, 8), (1000, 24, 1, 8), (72, 4, 16, 4),
    (184, 16, 1, 8), (16, 16, 1, 8), (24, 16, 8, 1), (7, 16, 1, 1)])
def test_bottleneck_width_rounds_as_timm(channels, ratio, min_channels, divisor):
    got = reduced_channels(channels, ratio, min_channels, divisor)
    if divisor == 1:
        assert got == max(min_channels, channels // ratio)   # the paper's C/r, floored
    else:
        assert got == make_divisible(channels / ratio, divisor,
                                     min_value=max(min_channels, divisor), round_limit=0.)
    if divisor == 8 and min_channels == 1:                   # timm's own SE module
        assert got == SEModule(channels, rd_ratio=1 / ratio).fc1.out_channels


@pytest.mark.parametrize("spec", [GateSpec(), GateSpec(divisor=8, min_channels=8),
                                  GateSpec(kind="eca"), GateSpec(kind="ese")])
@pytest.mark.parametrize("channels", [32, 200])
def test_parameter_formula_matches_the_modules(spec, channels):
    g = make_gate(channels, 16, spec)
    assert sum(p.numel() for p in g.parameters()) == gate_parameters(channels, 16, spec)


def test_bad_variant_options_are_refused_before_anything_changes():
    model = timm.create_model("resnet18")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for kwargs, words in [({"gate": "cbam"}, "gate must be one of"),
                          ({"squeeze": "median"}, "squeeze must be one of"),
                          ({"excite": "relu"}, "excite must be one of"),
                          ({"position": "middle"}, "position must be one of"),
                          ({"divisor": 0}, "divisor must be a positive integer"),
                          ({"ratio": {2: 0}}, "ratio per stage"),
                          ({"ratio": {2: 16}}, "gives none for stage"),
                          ({"excite": "tanh", "init": "identity"}, "tanh gives 0")]:
        if "ratio" in kwargs and "gives none" in words:
            kwargs = {**kwargs, "stages": [2, 3]}
        with pytest.raises(se_inject.SEInjectError, match=words):
            se_inject.apply(model, **kwargs)
        assert model.state_dict().keys() == before.keys()
        assert not gates(model)


# ---------------------------------------------------------------- positions (Table 14)

def _branch(blk, x):
    x = blk.act1(blk.bn1(blk.conv1(x)))
    return blk.bn2(blk.conv2(blk.aa(blk.drop_block(x))))


def _shortcut(blk, x):
    return blk.downsample(x) if blk.downsample is not None else x


_POSITIONS = {
    "standard": lambda b, g, x: b.act2(g(_branch(b, x)) + _shortcut(b, x)),
    "pre": lambda b, g, x: b.act2(_branch(b, g(x)) + _shortcut(b, x)),
    "post": lambda b, g, x: g(b.act2(_branch(b, x) + _shortcut(b, x))),
    "identity": lambda b, g, x: b.act2(_branch(b, x) + g(_shortcut(b, x))),
}


@pytest.mark.parametrize("position", list(_POSITIONS))
@pytest.mark.parametrize("block", ["layer1.0", "layer2.0"])   # identity and projection shortcut
def test_positions_place_the_gate_as_the_paper_draws_them(position, block):
    torch.manual_seed(4)
    model = timm.create_model("resnet18").eval()
    se_inject.apply(model, position=position, input_size=(3, 64, 64))
    blk = model.get_submodule(block)
    g = blk.se_gate
    x = torch.randn(2, blk.conv1.in_channels, 16, 16)
    want_channels = {"pre": blk.conv1.in_channels}.get(position, blk.conv2.out_channels)
    assert g.channels == want_channels
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _POSITIONS[position](blk, g, x), rtol=0, atol=0)
    assert len(gates(model)) == 8
    assert {s.position for s in se_inject.plan(timm.create_model("resnet18"),
                                               position=position)} == \
        {"branch" if position == "standard" else position}


class _ChannelsLastNorm(torch.nn.LayerNorm):
    """timm's LayerNorm2d, written out: a norm layer whose forward the trace goes into."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class _PreNormBlock(torch.nn.Module):
    """A MetaFormer-style block: its branch starts with that norm (CAFormer, FocalNet)."""

    def __init__(self, c):
        super().__init__()
        self.norm = _ChannelsLastNorm(c)
        self.conv = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.relu(self.norm(x)))


def test_pre_position_gates_the_input_of_a_branch_that_starts_with_a_traced_norm():
    """Before, the 'pre' gate was planned inside the norm's forward (its first op), and apply()
    refused six timm models for the norm's own code (LayerNorm2d reading autocast's mode); now
    it sits in the block, in front of the norm's call, where the paper draws it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _PreNormBlock(8),
                                _PreNormBlock(8)).eval()
    se_inject.apply(model, position="pre", input_size=(3, 16, 16))
    assert [n for n, _ in gates(model)] == ["1.se_gate", "2.se_gate"]
    blk = model[1]
    x = torch.randn(2, 8, 16, 16)
    with torch.no_grad():
        want = x + blk.conv(torch.relu(blk.norm(paper_reference(x, blk.se_gate))))
        torch.testing.assert_close(blk(x), want, rtol=1e-5, atol=1e-6)
    caformer = timm.create_model("caformer_s18", pretrained=False)
    se_inject.apply(caformer, position="pre")
    assert not any(type(caformer.get_submodule(n.rsplit(".", 1)[0])).__name__.startswith(
        "LayerNorm") for n, _ in gates(caformer))
    assert len(gates(caformer)) == 12


def test_pre_position_on_a_branch_that_starts_with_a_leaf_the_model_trace_kept_whole():
    """torchvision's MobileNetV2 starts each branch with a Conv2dNormActivation, an
    nn.Sequential that the model's trace keeps whole (a torchvision.ops leaf) but a block's own
    trace went into: the 'pre' site named a call the block's trace did not have, and apply()
    refused the model (RegNet's and EfficientNetV2's likewise)."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    se_inject.apply(model, position="pre", input_size=(3, 64, 64))
    assert len(gates(model)) == 10
    blk = model.features[3]
    x = torch.randn(2, blk.conv[0][0].in_channels, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(blk(x), x + blk.conv(paper_reference(x, blk.se_gate)),
                                   rtol=1e-5, atol=1e-6)


def test_a_site_a_blocks_own_trace_lacks_is_refused_not_a_crash(monkeypatch):
    """The error apply() gives where the model's trace and a block's own disagree (as they
    did above, before): a refusal naming the block, the model untouched; a ValueError
    escaped from the check of the block's other forward methods before."""
    from se_inject import trace
    monkeypatch.setattr(trace._BlockTracer, "is_leaf_module",
                        lambda self, m, q: m is not self._root and not trace.is_container(m))
    model = torchvision.models.mobilenet_v2(weights=None).eval()
    keys = list(model.state_dict())
    with pytest.raises(se_inject.SEInjectError, match=r"`features.3`: the merge `conv.0` \(#0\) "
                                                      r"seen in the model's trace is not in a "
                                                      r"trace of the block alone"):
        se_inject.apply(model, position="pre", input_size=(3, 64, 64))
    assert list(model.state_dict()) == keys and not gates(model)


def test_positions_leave_concatenation_blocks_at_their_rule():
    model = timm.create_model("inception_v3")
    p = se_inject.plan(model, position="identity", input_size=(3, 299, 299))
    assert len(p) == 11 and {s.position for s in p} == {"output"}


# ---------------------------------------------------------------- stages and ratios

def test_ratio_per_stage():
    model = timm.create_model("resnet50")
    ratio = {2: 16, 3: 16, 4: 8, 5: 8}
    se_inject.apply(model, ratio=ratio)
    for name, g in gates(model):
        stage = 2 + int(name.split(".")[0][-1]) - 1      # layer1..layer4 are stages 2..5
        assert g.fc1.out_channels == g.channels // ratio[stage], name
    se_inject.remove(model)
    se_inject.apply(model, ratio={4: 8, 5: 4})          # the stages named are the ones gated
    assert {n.split(".")[0] for n, _ in gates(model)} == {"layer3", "layer4"}


def test_options_reach_every_gate_and_survive_save_and_load(tmp_path):
    torch.manual_seed(5)
    model = timm.create_model("resnet18", num_classes=5).eval()
    se_inject.apply(model, ratio={2: 4, 3: 8, 4: 8, 5: 16}, position="pre", gate="se",
                    squeeze="max", excite="hard_sigmoid", divisor=8, min_channels=8)
    for _, g in gates(model):
        assert isinstance(g.gate, torch.nn.Hardsigmoid) and g.spec.squeeze == "max"
        assert g.fc1.out_channels % 8 == 0 and g.fc1.out_channels >= 8
    back = se_inject.load(se_inject.save(model, tmp_path / "m.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))
    eca = timm.create_model("resnet18").eval()
    se_inject.apply(eca, gate="eca", init="identity")
    assert all(isinstance(g, ECAGate) for _, g in gates(eca)) and len(gates(eca)) == 8
    back = se_inject.load(se_inject.save(eca, tmp_path / "eca.safetensors"))
    with torch.no_grad():
        assert torch.equal(back.eval()(x), eca(x))


@pytest.mark.parametrize("gate", ["eca", "ese"])
def test_identity_init_for_other_gates_keeps_outputs(gate):
    torch.manual_seed(6)
    model = timm.create_model("resnet18").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y0 = model(x)
        se_inject.apply(model, gate=gate, init="identity")
        assert torch.equal(model(x), y0)


def test_cost_counts_the_chosen_gate():
    rep = se_inject.cost("resnet18", gate="eca")
    p = se_inject.plan(timm.create_model("resnet18"))
    want = sum(max(int(abs(math.log2(s.channels) + 1) / 2) | 1, 3) for s in p)
    assert rep.ratios[0].added_parameters == want


@pytest.mark.parametrize("options", [
    {"ratio": {2: 16, 3: 16, 4: 8, 5: 8}}, {"excite": "hard_sigmoid"}, {"excite": "tanh"},
    {"squeeze": "max"}, {"gate": "ese"}, {"gate": "eca"}, {"position": "pre"},
    {"divisor": 8, "min_channels": 8}])
def test_cost_of_each_variant_equals_the_gated_model(options):
    # the report against the model apply() gates with the same options, counted by fvcore
    from se_inject.cost import count_ops
    x = torch.zeros(1, 3, 64, 64)
    base = timm.create_model("resnet18")
    rep = se_inject.cost(base, input_size=(3, 64, 64), **options).ratios[0]
    gated = se_inject.apply(timm.create_model("resnet18"), input_size=(3, 64, 64), **options)
    assert rep.parameters == sum(p.numel() for p in gated.parameters())
    assert rep.added_parameters == rep.parameters - sum(p.numel() for p in base.parameters())
    assert rep.ops == count_ops(gated, (x,)).total


def test_cli_takes_the_variant_options(tmp_path, capsys):
    assert main(["plan", "resnet18", "--position", "identity", "--gate", "eca"]) == 0
    out = capsys.readouterr().out
    assert "8 gates (8 residual) at ratio 16, +36 parameters" in out   # ECA: k = 3,3,5,...,5
    assert "layer4.0.act2" in out     # layer4.1's identity shortcut: the previous block's output
    assert main(["report", "resnet50", "--ratio", "2:16,3:16,4:8,5:8", "--format", "json"]) == 0
    import json
    rep = json.loads(capsys.readouterr().out)
    assert rep["ratios"][0]["ratio"] == {"2": 16, "3": 16, "4": 8, "5": 8}
    m = timm.create_model("resnet18").eval()
    torch.save(m.state_dict(), tmp_path / "r.pth")
    assert main(["convert", str(tmp_path / "r.pth"), "--model", "resnet18", "-o",
                 str(tmp_path / "o.safetensors"), "--excite", "hard_sigmoid"]) == 0
    g = se_inject.load(tmp_path / "o.safetensors")
    assert all(isinstance(x.gate, torch.nn.Hardsigmoid) for _, x in gates(g))
    with pytest.raises(SystemExit) as e:
        main(["plan", "resnet18", "--ratio", "2:x"])
    assert e.value.code == 2
    assert main(["convert", str(tmp_path / "r.pth"), "--model", "resnet18", "-o",
                 str(tmp_path / "t.safetensors"), "--excite", "tanh"]) != 0
    assert not (tmp_path / "t.safetensors").exists()


def test_report_shows_no_bottleneck_for_eca(capsys):
    assert main(["report", "resnet18", "--gate", "eca", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    rows = [r for r in out.splitlines() if "se_gate" in r]
    assert len(rows) == 8 and all("| - |" in r for r in rows) and "None" not in out
