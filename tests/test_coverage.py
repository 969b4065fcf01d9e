"""The coverage sweep's per-model check, over the registries: a subset of families in CI,
every timm family and torchvision model behind the `slow` marker (bench/coverage.py)."""
import importlib.util
import json
from pathlib import Path

import pytest
import timm
import torch
import torchvision

import se_inject

_spec = importlib.util.spec_from_file_location(
    "coverage_bench", Path(__file__).resolve().parent.parent / "bench" / "coverage.py")
coverage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(coverage)

# (timm model, what must happen): one small architecture from each family the sweep covers
CI_SUBSET = [
    ("resnet10t", "gated"), ("efficientnet_lite0", "gated"), ("convnext_atto", "gated"),
    ("regnetx_002", "gated"), ("mobilenetv3_small_050", "gated"), ("rexnet_100", "gated"),
    ("dla34", "gated"), ("cspresnet50", "gated"), ("ghostnet_050", "gated"),
    ("nf_resnet26", "gated"),              # its blocks are timm no-trace modules that trace
    ("densenet121", "refused"),            # dense connections only
    ("vit_tiny_patch16_224", "refused"),   # no CNN block
    ("repvgg_a0", "refused"),              # sums of one-conv branches: a plain net once fused
    ("mobileone_s0", "refused"),
    ("seresnet18", "kept"),                # every block holds its own SE
]


@pytest.mark.parametrize("name,expected", CI_SUBSET, ids=[n for n, _ in CI_SUBSET])
def test_family_subset(name, expected):
    row = coverage.check("ci", name, lambda: timm.create_model(name, pretrained=False),
                         round_trip=True)
    assert row["status"] == expected, row["reason"]
    if expected == "gated":
        assert sum(row["sites"].values()) > 0


@pytest.mark.slow
@pytest.mark.parametrize("family", timm.list_modules())
def test_every_timm_family(family):
    (_, name), = coverage.timm_representatives([family])
    row = coverage.check(family, name, lambda: timm.create_model(name, pretrained=False),
                         round_trip=True)
    assert row["status"] in ("gated", "kept", "refused", "base-fails"), row


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier(name):
    row = coverage.check("torchvision", name,
                         lambda: torchvision.models.get_model(name, weights=None), round_trip=True)
    assert row["status"] in ("gated", "kept", "refused", "base-fails"), row


def _load_changed(change):
    """se_inject.load, with ``change`` applied to the model it loads."""
    load = se_inject.load

    def changed(path, *args, **kwargs):
        return change(load(path, *args, **kwargs))
    return changed


def _one_weight_nudged(model):
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] += 1e-6
    return model


@pytest.mark.parametrize("change,said", [
    (lambda m: m, None),
    (_one_weight_nudged, "loaded back with another `conv1.0.weight`"),
    (lambda m: torchvision.models.resnet18(),
     "loaded back as torchvision.models.resnet.ResNet, not timm.models.resnet.ResNet"),
    (lambda m: se_inject.remove(m), "other state_dict keys"),
])
def test_the_round_trip_marks_a_model_that_does_not_come_back_whole(monkeypatch, change, said):
    monkeypatch.setattr(se_inject, "load", _load_changed(change))
    row = coverage.check("ci", "resnet10t",
                         lambda: timm.create_model("resnet10t", pretrained=False), round_trip=True)
    if said is None:
        assert row["status"] == "gated", row["reason"]
    else:
        assert row["status"] == "broken" and said in row["reason"], row["reason"]


def _with_drop_path(build_plain, build_dropping):
    try:
        return build_dropping()
    except TypeError:  # the architecture takes no drop path
        return build_plain()


def _sites(model, train: bool):
    try:
        return [(s.block, s.tensor, s.rule) for s in se_inject.plan(model.train(train)).sites]
    except se_inject.SEInjectError as exc:
        return f"{type(exc).__name__}: {exc}"


def _plans_alike(model):
    """In training mode a drop path is traced as a random mask, in eval mode as nothing: the
    plan must not depend on it."""
    assert _sites(model, True) == _sites(model, False)


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto", "efficientnet_lite0",
                                  "rexnet_100", "efficientvim_m1"])
def test_drop_path_subset_plans_alike_in_training_and_eval(name):
    _plans_alike(timm.create_model(name, pretrained=False, drop_path_rate=0.1))


@pytest.mark.slow
@pytest.mark.parametrize("family", timm.list_modules())
def test_every_timm_family_plans_alike_in_training_and_eval_with_drop_path(family):
    (_, name), = coverage.timm_representatives([family])
    _plans_alike(_with_drop_path(lambda: timm.create_model(name, pretrained=False),
                                 lambda: timm.create_model(name, pretrained=False,
                                                           drop_path_rate=0.1)))


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision.models.list_models(module=torchvision.models))
def test_every_torchvision_classifier_plans_alike_in_training_and_eval(name):
    get = torchvision.models.get_model
    _plans_alike(_with_drop_path(lambda: get(name, weights=None),
                                 lambda: get(name, weights=None, stochastic_depth_prob=0.1)))


def _plans_alike_with_grad_checkpointing(name):
    """timm's gradient checkpointing runs the same layers through torch.utils.checkpoint (and
    TResNet through a slice of its body, an nn.Sequential the model does not hold): the plan
    must not depend on it."""
    if name == "densenet121":
        pytest.xfail("DenseNet's checkpointed layers test `tensor.requires_grad`, which fx "
                     "cannot decide: a TraceError instead of NoSitesError (dense connections "
                     "get no gate either way)")
    model = timm.create_model(name, pretrained=False)
    plain = _sites(model, True)
    try:
        model.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError):
        pytest.skip(f"{name} has no gradient checkpointing")
    assert _sites(model, True) == plain


@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto", "tresnet_m"])
def test_grad_checkpointing_subset_plans_alike(name):
    _plans_alike_with_grad_checkpointing(name)


@pytest.mark.slow
@pytest.mark.parametrize("family", timm.list_modules())
def test_every_timm_family_plans_alike_with_grad_checkpointing(family):
    (_, name), = coverage.timm_representatives([family])
    _plans_alike_with_grad_checkpointing(name)


def test_a_resumed_sweep_keeps_finished_rows_and_drops_a_cut_one(tmp_path):
    done = tmp_path / "rows.jsonl"
    row = {"family": "resnet", "model": "resnet10t", "status": "gated", "sites": {"residual": 4},
           "reason": ""}
    done.write_text(json.dumps(row) + "\n" + '{"family": "vgg", "model": "vg')  # killed mid-write
    rows = coverage._read_rows(done)
    assert rows == {("resnet", "resnet10t"): row}
    assert done.read_text().endswith("\n")        # the next row starts on a line of its own
    text = coverage.report(list(rows.values()), planned=3)
    assert "partial sweep: 1 of 3 models" in text
    assert "partial" not in coverage.report(list(rows.values()), planned=1)


def test_the_sweep_refuses_a_folder_for_its_table_before_it_starts(tmp_path, capsys):
    # a folder given as --out failed when the table was written, after the whole sweep
    with pytest.raises(SystemExit) as exc:
        coverage.main(["--out", str(tmp_path), "--only", "resnet", "--skip-torchvision"])
    assert exc.value.code == 2 and "is a folder" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
