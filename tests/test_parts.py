"""A model gated in a part (``apply(model.backbone)``): saved, loaded, converted and stripped
as the whole model, with the gates in that part only."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import se_inject
from se_inject.checkpoint import CheckpointError, convert, read_checkpoint, strip
from se_inject.cli import main
from se_inject.errors import NoSitesError, TraceError
from torchvision.models.mobilenetv3 import InvertedResidual
from torchvision.ops.misc import SqueezeExcitation

from conftest import gates, randomize_norms

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_spec = importlib.util.spec_from_file_location(
    "parts_bench", Path(__file__).resolve().parent.parent / "bench" / "parts.py")
parts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(parts)

LAYER2 = (64, 56, 56)  # what resnet18's layer2 takes at 224 x 224


def _resnet18():
    model = timm.create_model("resnet18", pretrained=False).eval()
    randomize_norms(model)  # timm starts each block's last norm at zero
    return model


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _recipe(path) -> dict:
    return json.loads(read_checkpoint(path)[1]["recipe"])


@torch.no_grad()
def test_a_model_gated_in_a_part_saves_and_loads_back_as_itself(tmp_path):
    model = _resnet18()
    plain_keys = set(model.state_dict())
    se_inject.apply(model.layer2, input_size=LAYER2)  # gates start as new layers: outputs move
    names = [n for n, _ in gates(model)]
    assert names and all(n.startswith("layer2.") for n in names)
    path = se_inject.save(model, tmp_path / "r18.safetensors")
    (step,) = _recipe(path)["steps"]
    assert step["part"] == "layer2" and step["input_size"] == list(LAYER2)
    loaded = se_inject.load(path).eval()
    assert type(loaded) is type(model)
    assert [n for n, _ in gates(loaded)] == names
    assert plain_keys < set(loaded.state_dict())
    _same_state(loaded, model)
    x = torch.randn(2, 3, 224, 224)
    assert torch.equal(loaded(x), model(x))


@torch.no_grad()
def test_two_parts_save_load_and_come_out_again_with_remove(tmp_path):
    model = _resnet18()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 224, 224)
    y = model(x)
    se_inject.apply(model.layer2, input_size=LAYER2, init="identity")
    se_inject.apply(model.layer3, input_size=(128, 28, 28), init="identity")
    assert torch.equal(model(x), y)  # identity gates: the plain model's outputs, exactly
    path = se_inject.save(model, tmp_path / "r18.pth")
    assert [s["part"] for s in _recipe(path)["steps"]] == ["layer2", "layer3"]
    loaded = se_inject.load(path).eval()
    _same_state(loaded, model)
    assert {n.split(".")[0] for n, _ in gates(loaded)} == {"layer2", "layer3"}

    se_inject.remove(model)
    assert set(model.state_dict()) == set(plain)
    # the parts' load hooks went with their gates: a plain state_dict loads as it is (a hook
    # left on a part would double the layers it had scaled for its identity gates)
    model.load_state_dict(plain)
    for k, v in model.state_dict().items():
        assert torch.equal(v, plain[k]), k
    with pytest.raises(CheckpointError, match="holds no gates"):
        se_inject.save(model, tmp_path / "again.pth")
    assert not (tmp_path / "again.pth").exists()


def test_a_recipe_naming_a_part_the_rebuilt_model_lacks_is_refused(tmp_path):
    model = _resnet18()
    se_inject.apply(model.layer2, input_size=LAYER2)
    path = se_inject.save(model, tmp_path / "r18.pth")
    held = torch.load(path, weights_only=True)
    recipe = json.loads(held["se_inject.recipe"])
    recipe["steps"][0]["part"] = "layer9"
    torch.save({**held, "se_inject.recipe": json.dumps(recipe)}, path)
    with pytest.raises(CheckpointError, match=r"rebuilt ResNet has no submodule 'layer9' "
                                              r"\(its recipe's part\); its children: conv1"):
        se_inject.load(path)


def test_gates_placed_on_a_module_and_on_a_part_inside_it_are_refused(tmp_path):
    model = _resnet18()
    se_inject.apply(model.layer2, input_size=LAYER2)
    se_inject.apply(model)  # layer2's blocks hold gates already: the others get theirs
    assert {n.split(".")[0] for n, _ in gates(model)} == {"layer1", "layer2", "layer3", "layer4"}
    with pytest.raises(CheckpointError, match=r"on the model and on `layer2` inside it"):
        se_inject.save(model, tmp_path / "r18.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_gates_taken_out_of_a_part_of_the_gated_module_are_refused(tmp_path):
    model = _resnet18()
    se_inject.apply(model)
    se_inject.remove(model.layer1)  # the model's recipe still places gates there
    assert not any(n.startswith("layer1.") for n, _ in gates(model))
    with pytest.raises(CheckpointError, match=r"`layer1\.0\.se_gate` was placed by apply\(\) "
                                              "and is not there"):
        se_inject.save(model, tmp_path / "r18.safetensors")
    assert list(tmp_path.iterdir()) == []


@torch.no_grad()
def test_convert_gates_only_the_named_part(tmp_path):
    model = _resnet18()
    src = tmp_path / "plain.pth"
    torch.save(model.state_dict(), src)
    out = convert(src, tmp_path / "se.safetensors", model="resnet18", part="layer3")
    # at the size the model hands its layer3: layer2's 128 channels at 224 / 8
    assert _recipe(out)["steps"][0]["input_size"] == [128, 28, 28]
    loaded = se_inject.load(out).eval()
    names = [n for n, _ in gates(loaded)]
    assert names == [f"layer3.{i}.se_gate" for i in range(2)]
    x = torch.randn(2, 3, 224, 224)
    y = model(x)
    assert torch.equal(loaded(x), y)  # identity gates: the plain model's outputs, exactly
    back = strip(out, tmp_path / "back.safetensors")
    state = read_checkpoint(back)[0]
    assert state.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k


def test_convert_names_a_part_the_model_lacks_and_writes_nothing(tmp_path, capsys):
    src = tmp_path / "plain.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), src)
    with pytest.raises(se_inject.SEInjectError, match=r"no submodule 'layer9'.*layer1, layer2"):
        convert(src, tmp_path / "se.safetensors", model="resnet18", part="layer9")
    code = main(["convert", str(src), "-o", str(tmp_path / "se.safetensors"), "--model",
                 "resnet18", "--part", "layer9"])
    assert code != 0 and "no submodule 'layer9'" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.pth"]


@torch.no_grad()
def test_a_detector_s_backbone_converts_on_the_command_line_and_loads(tmp_path, capsys):
    build = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn
    detector = build(weights=None, weights_backbone=None).eval()
    randomize_norms(detector.backbone)
    src = tmp_path / "detector.pth"
    torch.save(detector.state_dict(), src)
    out = tmp_path / "se.safetensors"
    args = ["convert", str(src), "-o", str(out), "--model",
            "torchvision/fasterrcnn_mobilenet_v3_large_320_fpn"]
    assert main(args) != 0  # its own forward takes a list of images
    assert "--part backbone" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--part", "backbone.body"]) == 0
    # as the detector hands its backbone an image: resized to its transform's 320 pixels
    assert detector.transform.min_size == (320,)
    assert _recipe(out)["steps"][0]["input_size"] == [3, 320, 320]
    loaded = se_inject.load(out).eval()
    assert type(loaded) is type(detector)
    # a gate in each residual block of the backbone that holds no SE of its own
    residual = {f"backbone.body.{n}.se_gate" for n, m in detector.backbone.body.named_children()
                if isinstance(m, InvertedResidual) and m.use_res_connect
                and not any(isinstance(s, SqueezeExcitation) for s in m.modules())}
    assert len(residual) == 5 and {n for n, _ in gates(loaded)} == residual
    x = torch.rand(1, 3, 320, 320)
    a, b = detector.backbone(x), loaded.backbone(x)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # identity gates: the plain backbone's, exactly


def test_save_tells_a_detector_from_its_twin_of_the_same_weights(tmp_path):
    # fasterrcnn_mobilenet_v3_large_fpn and its _320_ twin hold tensors of the same names and
    # shapes; only their settings (input sizes) tell them apart
    for arch in ("fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn"):
        detector = torchvision.models.get_model(arch, weights=None, weights_backbone=None)
        se_inject.apply(detector.backbone.body)
        path = se_inject.save(detector, tmp_path / f"{arch}.safetensors")
        assert _recipe(path)["base"]["architecture"] == arch
        loaded = se_inject.load(path)
        assert loaded.transform.min_size == detector.transform.min_size


@torch.no_grad()
def test_remove_on_a_part_scales_back_what_its_identity_gates_doubled():
    model = _resnet18()
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    se_inject.apply(model, init="identity")
    doubled = [k for k, v in model.state_dict().items()
               if k in plain and not torch.equal(v, plain[k])]
    assert {k.split(".")[0] for k in doubled} == {"layer1", "layer2", "layer3", "layer4"}
    se_inject.remove(model.layer1)
    for k, v in model.state_dict().items():
        if k.startswith("layer1."):
            assert torch.equal(v, plain[k]), k  # its gates out, its layers as they were
        elif k in plain and k in doubled:
            assert torch.equal(v, 2 * plain[k]), k  # the other gates' layers still doubled
    assert not any(n.startswith("layer1.") for n, _ in gates(model))
    assert any(n.startswith("layer2.") for n, _ in gates(model))


@pytest.mark.parametrize("name", ["resnet10t", "mobilenetv3_small_050", "convnext_atto",
                                  "torchvision/mobilenet_v2"])
def test_the_largest_part_that_gates_alone_saves_and_loads_as_the_model(name, tmp_path):
    row = parts.one(name, tmp_path, max_params=60)  # bench/parts.py, over every gated model
    assert row["status"] == "same" and row["gates"] > 0, row


def test_plan_and_report_take_a_part_at_the_size_the_model_hands_it(capsys):
    assert main(["plan", "resnet18", "--part", "layer2"]) == 0
    out = capsys.readouterr().out
    assert "input (64, 56, 56) as the model hands it" in out
    assert "0.se_gate" in out and "1.se_gate" in out
    assert main(["report", "resnet18", "--part", "layer4", "--format", "json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["input_size"] == [256, 14, 14]
    # its two gates, 512 -> 32 -> 512 with biases, as the paper's formula counts them
    assert rep["ratios"][0]["added_parameters"] == 2 * (2 * 512 * 32 + 32 + 512)
    # a size given is the part's: the model's input is not looked for
    assert main(["plan", "resnet18", "--part", "layer2", "--input-size", "64", "32", "32"]) == 0
    assert "as the model hands it" not in capsys.readouterr().out


_DENSE = (torchvision.models.list_models(module=torchvision.models.detection)
          + torchvision.models.list_models(module=torchvision.models.segmentation))


@pytest.mark.slow
@pytest.mark.parametrize("name", _DENSE)
@torch.no_grad()
def test_every_torchvision_detector_and_segmenter_converts_its_backbone(name, tmp_path):
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None).eval()
    if sum(p.numel() for p in model.parameters()) > 60e6:
        pytest.skip("over 60 M parameters")
    randomize_norms(model.backbone)
    part = "backbone.body" if hasattr(model.backbone, "body") else "backbone"
    src = tmp_path / "plain.pth"
    torch.save(model.state_dict(), src)
    out = tmp_path / "se.safetensors"
    if name == "ssd300_vgg16":  # VGG: no residual or inception-style block
        with pytest.raises(NoSitesError):
            convert(src, out, model=f"torchvision/{name}", part=part)
        assert not out.exists()
        return
    convert(src, out, model=f"torchvision/{name}", part=part)
    loaded = se_inject.load(out).eval()
    assert type(loaded) is type(model)
    assert gates(loaded) and all(n.startswith(part + ".") for n, _ in gates(loaded))
    x = torch.rand(1, 3, 224, 224)
    a, b = model.get_submodule(part)(x), loaded.get_submodule(part)(x)
    a, b = (list(a.values()), list(b.values())) if isinstance(a, dict) else (a, b)
    for u, v in zip(*((a, b) if isinstance(a, list) else ([a], [b]))):
        assert torch.equal(u, v)  # identity gates: the plain backbone's outputs, bit for bit


def test_remove_unfuses_a_part_fused_on_its_own():
    model = _resnet18()
    se_inject.apply(model.layer2, input_size=LAYER2)
    se_inject.fuse(model.layer2)
    assert model.layer2._compiled_call_impl is not None
    se_inject.remove(model)
    assert model.layer2._compiled_call_impl is None  # eager again, as before apply()
    assert not any("_se_inject_fused" in m.__dict__ for m in model.modules())


@torch.no_grad()
def test_part_input_size_is_what_the_model_hands_its_part_and_changes_nothing():
    model = _resnet18().train()  # its norms would count batches
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # ResNet's stages take the stem's 64 channels at 1/4 of the input, then halve it
    assert se_inject.part_input_size(model, "layer2") == (64, 56, 56)
    assert se_inject.part_input_size(model, "layer4", input_size=(3, 160, 160)) == (256, 10, 10)
    assert all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    size = se_inject.part_input_size(model, "layer3")
    se_inject.apply(model.layer3, input_size=size)
    assert [n for n, _ in gates(model)] == ["layer3.0.se_gate", "layer3.1.se_gate"]

    detector = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None)
    # its transform resizes the image to its min_size before the backbone
    assert se_inject.part_input_size(detector, "backbone.body") == \
        (3, *2 * detector.transform.min_size)
    assert detector.training

    # a model that caches a tensor on its modules in eval mode keeps no meta tensor there
    former = timm.create_model("efficientformerv2_s0", pretrained=False).eval()
    info = former.feature_info[2]  # what stage 2 gives stage 3, as timm describes it
    assert se_inject.part_input_size(former, "stages.3") == \
        (info["num_chs"], 224 // info["reduction"], 224 // info["reduction"])
    assert all(not m.attention_bias_cache for m in former.modules()
               if hasattr(m, "attention_bias_cache"))


def test_part_input_size_says_why_it_cannot_tell():
    fastvit = timm.create_model("fastvit_t8", pretrained=False)
    with pytest.raises(se_inject.SEInjectError, match="no submodule 'nope'; its children: stem"):
        se_inject.part_input_size(fastvit, "nope")
    # its forward runs its stages one by one, never the container
    with pytest.raises(TraceError, match="without calling `stages` itself"):
        se_inject.part_input_size(fastvit, "stages")
    with pytest.raises(TraceError, match="did not reach `layer2`"):
        se_inject.part_input_size(_resnet18(), "layer2", input_size=(5, 224, 224))


class _Scaled(torch.nn.Module):
    """A residual block its parent calls with a constant beside the tensor."""

    def __init__(self):
        super().__init__()
        from handwritten import branch
        self.branch = branch(16)

    def forward(self, x, scale: float = 1.0, **extra):
        return torch.relu(x + scale * self.branch(x))


class _CallsWith(torch.nn.Module):
    def __init__(self, **given):
        super().__init__()
        self.stem, self.block, self.given = torch.nn.Conv2d(3, 16, 3, padding=1), _Scaled(), given

    def forward(self, x):
        return self.block(self.stem(x), **self.given)


@pytest.mark.parametrize("given,told", [
    ({"scale": 1.0}, None), ({"scale": 1}, None),
    ({"scale": 0.5}, r"one tensor and `scale=0.5` \(its default: 1.0\), and a part gated alone"),
    ({"mode": "fast"}, r"one tensor and `extra=\{'mode': 'fast'\}`, and a part gated alone"),
])
def test_part_input_size_takes_constants_at_their_defaults_and_names_others(given, told):
    """A part handed its tensor and constants its forward takes by default has that tensor's
    size; another constant would make the part, gated alone (traced at its defaults), refuse
    the model's call, and is named."""
    model = _CallsWith(**given).eval()
    if told is not None:
        with pytest.raises(TraceError, match=told):
            se_inject.part_input_size(model, "block", input_size=(3, 8, 8))
        se_inject.apply(model.block, input_size=(16, 8, 8))  # what the message warns of
        with pytest.raises(se_inject.SEInjectError, match="traced for calls with"):
            model(torch.randn(1, 3, 8, 8))
        return
    size = se_inject.part_input_size(model, "block", input_size=(3, 8, 8))
    assert size == (16, 8, 8)
    randomize_norms(model)
    twin = _CallsWith(**given).eval()
    twin.load_state_dict(model.state_dict())
    se_inject.apply(model.block, input_size=size, init="identity")
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert len(gates(model)) == 1 and torch.equal(model(x), twin(x))


class _Tied(torch.nn.Module):
    """Two layers sharing one weight, and a layer held under two names (as CoaT holds its
    positional convolutions), before a part."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(3, 8, 3)
        self.b.weight = self.a.weight
        self.c = torch.nn.Conv2d(8, 8, 1)
        self.stage = torch.nn.Sequential(self.c)  # `c` and `stage.0`
        self.body = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3))

    def forward(self, x):
        return self.body(self.stage(self.a(x) + self.b(x)))


def test_part_input_size_runs_a_model_that_holds_a_weight_or_a_layer_twice():
    model = _Tied()
    held = dict(model.state_dict(keep_vars=True))
    # a 3 x 3 convolution without padding takes 2 pixels off each side
    assert se_inject.part_input_size(model, "body", input_size=(3, 32, 32)) == (8, 30, 30)
    assert model.b.weight is model.a.weight and model.stage[0] is model.c
    for k, v in model.state_dict(keep_vars=True).items():
        assert v is held[k] and not v.is_meta, k  # the model's own tensors, back in place
