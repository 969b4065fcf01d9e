"""torchvision's models by name (``torchvision/NAME``): convert, save and load, plan and report,
as for timm's."""
from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from torchvision import models

import se_inject
from se_inject.checkpoint import CheckpointError, convert, strip
from se_inject.cli import main
from se_inject._models import create as create_by_name
from se_inject.errors import InvalidArgumentError

from conftest import gates


@torch.no_grad()
def _trained_like(model):
    """Norm statistics and affine terms as training leaves them, so that a gate that changed
    what a block computes would show in its output."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
            m.bias.normal_(0, 0.1)
    return model.eval()


def _recipe(path) -> dict:
    with safe_open(str(path), "pt") as f:
        return json.loads(f.metadata()["se_inject.recipe"])


def _residual_blocks(model) -> int:
    """MobileNetV2's inverted residuals with a sum, as torchvision marks them."""
    return sum(bool(getattr(m, "use_res_connect", False)) for m in model.modules())


def test_a_torchvision_checkpoint_converts_loads_and_strips_back(tmp_path):
    torch.manual_seed(0)
    plain = _trained_like(models.mobilenet_v2(num_classes=10))
    src = tmp_path / "mobilenet_v2.pth"
    torch.save(plain.state_dict(), src)
    out = tmp_path / "se.safetensors"
    assert main(["convert", str(src), "--model", "torchvision/mobilenet_v2", "-o", str(out)]) == 0
    assert _recipe(out)["base"] == {"library": "torchvision", "architecture": "mobilenet_v2",
                                    "kwargs": {"num_classes": 10}}
    model = se_inject.load(out).eval()
    assert type(model) is models.MobileNetV2
    assert len(gates(model)) == _residual_blocks(plain) == 10
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        y0, y1 = plain(x), model(x)
    assert (y1 - y0).abs().max() <= 1e-5 * y0.abs().max()
    back = tmp_path / "plain.safetensors"
    strip(out, back)
    from safetensors.torch import load_file
    again = load_file(str(back))
    assert sorted(again) == sorted(plain.state_dict())  # safetensors sorts its keys
    for k, v in plain.state_dict().items():
        assert torch.allclose(again[k].to(v.dtype), v, rtol=1e-6, atol=1e-7), k


def test_torchvision_reference_checkpoint_names_its_model_and_its_ema(tmp_path):
    """torchvision's reference train.py saves {"model", "model_ema", "args"}: the architecture
    is read from args.model, and --ema takes the AveragedModel's weights (under `module.`,
    beside its count of averages)."""
    torch.manual_seed(0)
    plain = _trained_like(models.resnet18(num_classes=7))
    ema = _trained_like(models.resnet18(num_classes=7))
    averaged = {"n_averaged": torch.tensor(12),
                **{f"module.{k}": v for k, v in ema.state_dict().items()}}
    src = tmp_path / "checkpoint.pth"
    torch.save({"model": plain.state_dict(), "model_ema": averaged, "optimizer": {"state": {}},
                "epoch": 3, "args": argparse.Namespace(model="resnet18", lr=0.5)}, src)
    x = torch.randn(2, 3, 64, 64)
    for use_ema, reference in ((False, plain), (True, ema)):
        out = tmp_path / f"se_{use_ema}.safetensors"
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            convert(src, out, ema=use_ema)
        assert not [w for w in said if "not part of the model" in str(w.message)]
        assert _recipe(out)["base"]["library"] == "torchvision"
        model = se_inject.load(out).eval()
        assert type(model) is models.ResNet and len(gates(model)) == 8  # 2 blocks × 4 stages
        with torch.no_grad():
            y0, y1 = reference(x), model(x)
        assert (y1 - y0).abs().max() <= 1e-5 * y0.abs().max()


@pytest.mark.parametrize("build,name", [
    (lambda: models.regnet_x_400mf(num_classes=3), "regnet_x_400mf"),  # sized with arange
    (lambda: models.mnasnet0_5(dropout=0.5), "mnasnet0_5"),
    (lambda: models.resnet34(), "resnet34"),
])
def test_save_finds_the_torchvision_builder(tmp_path, build, name):
    """save() needs no arch for a torchvision model: the builder whose shapes it has is
    recorded, with its number of classes and a dropout rate that is not the default."""
    torch.manual_seed(0)
    model = _trained_like(build())
    se_inject.apply(model, init="identity")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        path = se_inject.save(model, tmp_path / "se.safetensors")
    assert not [w for w in said if "dropout layer" in str(w.message)]  # rates all rebuilt
    base = _recipe(path)["base"]
    assert (base["library"], base["architecture"]) == ("torchvision", name)
    loaded = se_inject.load(path).eval()
    assert type(loaded) is type(model)
    assert [type(m).__name__ + repr(getattr(m, "p", "")) for m in loaded.modules()] == \
        [type(m).__name__ + repr(getattr(m, "p", "")) for m in model.modules()]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_a_torchvision_model_changed_by_hand_needs_its_arch(tmp_path):
    model = models.resnet18()
    model.fc = torch.nn.Sequential(torch.nn.Linear(512, 64), torch.nn.ReLU(),
                                   torch.nn.Linear(64, 5))
    se_inject.apply(model)
    out = tmp_path / "se.safetensors"
    with pytest.raises(se_inject.SEInjectError, match="torchvision/name"):
        se_inject.save(model, out)
    with pytest.raises(CheckpointError, match="would not load back as itself: its layer `fc`"):
        se_inject.save(model, out, arch="torchvision/resnet18")
    assert not out.exists()


def test_torchvision_names_are_checked_with_close_matches(capsys):
    with pytest.raises(InvalidArgumentError, match="Did you mean: torchvision/resnet50"):
        se_inject.cost("torchvision/resnt50")
    with pytest.raises(InvalidArgumentError, match="name it torchvision/googlenet"):
        se_inject.cost("googlenet")  # timm has none of that name
    assert main(["plan", "torchvision/mobilenet_v3_smal"]) == 2
    assert "torchvision/mobilenet_v3_small" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchvision_names_download_nothing(monkeypatch, capsys):
    """A builder that would fetch its backbone's weights by default (segmentation, detection)
    is built with none, and neither are the model's own fetched."""
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    report = se_inject.cost("torchvision/lraspp_mobilenet_v3_large", input_size=(3, 64, 64))
    backbone = models.mobilenet_v3_large()
    # LR-ASPP's backbone is MobileNetV3-Large's features: its residual blocks, all with SE but
    # the first stages' (which have none), are what can be gated
    plain = sum(1 for m in backbone.features.modules()
                if getattr(m, "use_res_connect", False) and not any(
                    type(c).__name__ == "SqueezeExcitation" for c in m.modules()))
    assert len(report[16].gates) == plain > 0
    with pytest.raises(InvalidArgumentError, match="random weights"):
        create_by_name("torchvision/resnet18", weights="DEFAULT")


def test_auxiliary_heads_are_read_from_the_checkpoint_and_the_model(tmp_path):
    """A segmentation checkpoint with its aux_classifier converts with aux_loss=True; an
    Inception-v3 without its auxiliary classifier, saved gated, is recorded with
    aux_logits=False: each loads back as the model it was."""
    from torchvision.models import inception_v3
    from torchvision.models.segmentation import deeplabv3_mobilenet_v3_large
    torch.manual_seed(0)
    seg = _trained_like(deeplabv3_mobilenet_v3_large(num_classes=5, aux_loss=True,
                                                     weights_backbone=None))
    src, out = tmp_path / "seg.pth", tmp_path / "seg.safetensors"
    torch.save(seg.state_dict(), src)
    convert(src, out, model="torchvision/deeplabv3_mobilenet_v3_large")
    assert _recipe(out)["base"]["kwargs"] == {"num_classes": 5, "aux_loss": True}
    loaded = se_inject.load(out).eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        y0, y1 = seg(x), loaded(x)
    assert set(y1) == {"out", "aux"}
    for k in y0:
        assert (y1[k] - y0[k]).abs().max() <= 1e-5 * y0[k].abs().max(), k
    net = inception_v3(aux_logits=False, init_weights=False, num_classes=7)
    se_inject.apply(net)
    path = se_inject.save(net, tmp_path / "inception.safetensors")
    assert _recipe(path)["base"]["kwargs"] == {"aux_logits": False, "num_classes": 7}
    again = se_inject.load(path)
    assert again.AuxLogits is None and len(gates(again)) == len(gates(net))


def test_a_torchvision_checkpoint_given_timm_s_name_is_pointed_to_torchvision_s(tmp_path):
    """timm and torchvision both have an efficientnet_b0, with other tensor names: converting
    torchvision's under timm's name fails to fit, and says which name fits."""
    src = tmp_path / "efficientnet_b0.pth"
    torch.save(models.efficientnet_b0(num_classes=4).state_dict(), src)
    with pytest.raises(CheckpointError, match="pass --model torchvision/efficientnet_b0$"):
        convert(src, tmp_path / "se.safetensors", model="efficientnet_b0")
    timm_src = tmp_path / "timm.pth"
    import timm
    torch.save(timm.create_model("efficientnet_b0", num_classes=4).state_dict(), timm_src)
    with pytest.raises(CheckpointError, match="Check --model") as info:
        convert(timm_src, tmp_path / "se.safetensors", model="torchvision/efficientnet_b0")
    assert "Its tensors are named" not in str(info.value)
    assert not (tmp_path / "se.safetensors").exists()


@pytest.mark.parametrize("library", ["timm", "torchvision"])
def test_a_checkpoint_of_another_depth_is_not_pointed_to_torchvision_s_twin(tmp_path, library):
    """timm's and torchvision's ResNets name their tensors alike: a ResNet-18 checkpoint
    converted as resnet34 fits neither ResNet-34, so the refusal does not send the user to
    torchvision's (which was named: its names hold the file's)."""
    import timm
    src = tmp_path / "resnet18.pth"
    net = timm.create_model("resnet18", num_classes=7) if library == "timm" else \
        models.resnet18(num_classes=7)
    torch.save(net.state_dict(), src)
    with pytest.raises(CheckpointError, match=r"96 missing.*Check --model \(the architecture\)\.$"):
        convert(src, tmp_path / "se.safetensors", model="resnet34")
    assert not (tmp_path / "se.safetensors").exists()


def test_a_skeleton_built_on_the_cpu_leaves_other_threads_models_their_weights():
    """A skeleton whose constructor computes with tensors (torchvision's RegNets) is built on
    the CPU with each registration moved to the meta device; a model another thread builds
    meanwhile keeps real weights, and the patch is gone once the skeleton is built."""
    import threading

    from se_inject import _models

    inside, built = threading.Event(), threading.Event()
    create, seen = _models.create, {}
    registration = (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer)

    def held_create(name, **kwargs):  # the skeleton's thread waits inside the patch
        if torch.nn.Module.register_parameter is not registration[0]:
            inside.set()
            built.wait(30)
        return create(name, **kwargs)

    def build_skeleton():
        seen["skeleton"] = _models.skeleton("torchvision/regnet_y_400mf")

    _models.create = held_create
    try:
        worker = threading.Thread(target=build_skeleton, name="skeleton")
        worker.start()
        assert inside.wait(60), "the skeleton never got to its CPU build"
        other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        built.set()
        worker.join(60)
    finally:
        _models.create = create
        built.set()
    assert {t.device.type for t in (*other.parameters(), *other.buffers())} == {"cpu"}
    assert {t.device.type for t in (*seen["skeleton"].parameters(),
                                    *seen["skeleton"].buffers())} == {"meta"}
    assert (torch.nn.Module.register_parameter, torch.nn.Module.register_buffer) == registration
