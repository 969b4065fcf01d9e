"""The se-inject command: results on stdout, errors on stderr with exit code 2."""
import subprocess
import sys

import pytest

from se_inject.cli import main


def test_plan_prints_the_sites(capsys):
    assert main(["plan", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0.se_gate" in out and "layer4.1.bn2" in out
    assert "8 gates (8 residual) at ratio 16" in out


def test_plan_with_ratio_and_rules(capsys):
    assert main(["plan", "inception_v3", "--ratio", "8", "--rules", "inception"]) == 0
    out = capsys.readouterr().out
    assert "11 gates (11 inception) at ratio 8" in out
    assert "Mixed_7c.se_gate" in out and "  2048  256  " in out


def test_unknown_model_suggests_names_without_traceback(capsys):
    assert main(["plan", "resnet5"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet5'" in err and "resnet50" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ["hf-hub:timm/resnet50.a1_in1k", "timm/resnet50.a1_in1k"])
def test_a_hub_name_is_pointed_to_its_architecture_name(capsys, name):
    """A Hugging Face Hub name (as timm.create_model takes it, to download) is refused with the
    architecture's name, which works, and how to bring the weights."""
    assert main(["plan", name]) == 2
    err = capsys.readouterr().err
    assert "name it resnet50.a1_in1k" in err and "se-inject convert CHECKPOINT" in err
    assert main(["plan", "resnet50.a1_in1k"]) == 0


def test_bad_rule_file_exit_code_and_location(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema: 1\nname: x\nsummary: s\nmatch:\n  merge: mul\ngate:\n  at: output\n")
    assert main(["rules", "check", str(bad)]) == 2
    assert f"{bad}:5: match.merge: expected one of add, cat" in capsys.readouterr().err


def test_rules_list(capsys):
    assert main(["rules"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("inception") and "\nresidual" in out


@pytest.mark.parametrize("argv", [["plan", "resnet18", "--ratio", "0"],
                                  ["plan", "resnet18", "--ratio", "x"], ["frobnicate"]])
def test_bad_arguments_exit_2(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.mark.parametrize("size", [["3"], ["3", "0", "64"], ["1", "2", "3", "4", "5"]])
def test_bad_input_size_exits_2_naming_the_forms(size, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "resnet18", "--input-size", *size])
    assert exc.value.code == 2
    assert "C H W (an image), C L (a 1-D signal) or C T H W" in capsys.readouterr().err


def test_input_size_of_a_video_network_reaches_it(capsys):
    """C T H W: torchvision's R3D-18 runs on a clip and is refused for its 5-D maps, where a
    size without T fails in its first 3-D convolution, which says what it takes. Without a
    size, a torchvision video network runs on a clip of the size its weights were trained on."""
    for size in (["--input-size", "3", "4", "32", "32"], []):
        assert main(["plan", "torchvision/r3d_18", *size]) == 2
        err = capsys.readouterr().err
        assert "8 of its sums or concatenations are of 5-D tensors" in err, err
    assert main(["plan", "torchvision/r3d_18", "--input-size", "3", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert "shapes could not be propagated through `self.stem.0(x)`" in err
    assert "`stem.0` is a Conv3d, which takes a 5-D input (N, C, D, H, W), and was handed a " \
           "4-D one: pass input_size=(C, D, H, W)" in err


def test_module_entry_point():
    r = subprocess.run([sys.executable, "-m", "se_inject", "plan", "no-such-model"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown model" in r.stderr and not r.stdout


def test_plan_of_a_model_apply_refuses_exits_with_apply_s_refusal(capsys):
    """A dry run says what apply() does: before, it exited 0 and said apply() would refuse
    even a model whose blocks all hold a gate, which apply() leaves as it is with a warning."""
    import timm
    import se_inject
    assert main(["plan", "test_vit"]) == 2
    out, err = capsys.readouterr()
    assert "0 gates (none)" in out
    with pytest.raises(se_inject.SEInjectError) as refusal:
        se_inject.apply(timm.create_model("test_vit", pretrained=False))
    assert err.strip() == f"se-inject plan: error: {refusal.value}"


def test_plan_of_a_model_whose_blocks_hold_gates_says_apply_changes_nothing(capsys):
    import timm
    import se_inject
    assert main(["plan", "efficientnet_b0"]) == 0
    out = capsys.readouterr().out
    assert "already holds a gate (9 blocks): apply() would change nothing" in out
    model = timm.create_model("efficientnet_b0", pretrained=False)
    keys = list(model.state_dict())
    with pytest.warns(UserWarning, match=r"already holds a gate \(9 blocks\); apply\(\) changed "
                                         r"nothing"):
        se_inject.apply(model)
    assert list(model.state_dict()) == keys


def _plain_residual_blocks(module) -> int:
    """MobileNetV3's inverted residuals with a sum and no SE of their own (what se-inject
    gates), as torchvision marks them."""
    return sum(1 for m in module.modules() if getattr(m, "use_res_connect", False) and not any(
        type(c).__name__ == "SqueezeExcitation" for c in m.modules()))


def test_part_gates_a_detector_s_backbone(capsys):
    """A detector's own forward takes a list of images and cannot be traced: the refusal names
    --part, and --part backbone plans its backbone's blocks."""
    from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn
    name = "torchvision/fasterrcnn_mobilenet_v3_large_fpn"
    assert main(["plan", name]) == 2
    assert "On the command line: --part backbone." in capsys.readouterr().err
    assert main(["plan", name, "--part", "backbone"]) == 0
    out = capsys.readouterr().out
    expected = _plain_residual_blocks(
        fasterrcnn_mobilenet_v3_large_fpn(weights_backbone=None).backbone)
    assert expected > 0 and f"\n{expected} gates (" in out
    assert out.startswith(f"se-inject plan for {name} --part backbone (BackboneWithFPN")
    assert main(["plan", name, "--part", "backbon"]) == 2
    assert "no submodule 'backbon' (--part); its children: transform, backbone, rpn, roi_heads" \
        in capsys.readouterr().err
