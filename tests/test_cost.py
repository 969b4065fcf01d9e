"""se_inject.cost / se-inject report: checked against Eq. 5, the paper's Tables 10 and 13,
timm's seresnet50 counted by fvcore, and the gate's ops written out per element."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from fvcore.nn import FlopCountAnalysis

import se_inject
from se_inject.cli import main
from se_inject.cost import count_ops

from conftest import eq5_parameters, n_params
from handwritten import BlockNet

GOLDEN = Path(__file__).parent / "golden"
RESNET50_STAGES = [(3, 256), (4, 512), (6, 1024), (3, 2048)]  # (N_s, C_s), paper Table 1


@pytest.fixture(scope="module")
def r50():
    return timm.create_model("resnet50", pretrained=False)


@pytest.fixture(scope="module")
def r50_report(r50):
    return se_inject.cost(r50, ratio=[16, 8, 4])


def test_parameters_match_eq5_and_table10(r50, r50_report):
    base = n_params(r50)
    assert r50_report.base_parameters == base == 25_557_032
    for r in (16, 8, 4):
        weights, biases = eq5_parameters(RESNET50_STAGES, r)
        assert r50_report[r].added_parameters == weights + biases
        assert r50_report[r].parameters == base + weights + biases
    assert r50_report[16].parameters == 28_088_024
    assert r50_report[4].parameters == 35_635_688
    # Table 10 prints 35.7M and 30.7M: its rounding is within 0.1M of Eq. 5's counts
    assert abs(r50_report[4].parameters / 1e6 - 35.7) <= 0.1
    assert abs(r50_report[8].parameters / 1e6 - 30.7) <= 0.1


def test_parameters_equal_timm_seresnet50(r50_report):
    assert r50_report[16].parameters == n_params(timm.create_model("seresnet50"))


def test_last_stage_holds_about_62_percent(r50_report):
    rc = r50_report[16]
    last = rc.stages[-1]
    assert [s.stage for s in rc.stages] == [2, 3, 4, 5]                 # conv2_x .. conv5_x
    weights, biases = eq5_parameters(RESNET50_STAGES[-1:], 16)
    assert weights == 1_572_864                                          # the paper's figure
    assert last.parameters == weights + biases
    assert 0.61 < last.parameters / rc.added_parameters < 0.63


def _gate_ops_by_hand(c, h, w, r):
    """One gate's ops, op by op: mean (one add per input element), fc1 and fc2 (multiply-adds,
    fvcore's convention), ReLU on C/r, sigmoid on C, and the scale (one product per element)."""
    rd = c // r
    return c * h * w + c * rd + rd + rd * c + c + c * h * w


def test_added_ops_follow_the_gate_op_by_op(r50_report):
    sizes = {256: 56, 512: 28, 1024: 14, 2048: 7}
    for r in (16, 8, 4):
        expected = sum(n * _gate_ops_by_hand(c, sizes[c], sizes[c], r) for n, c in RESNET50_STAGES)
        assert r50_report[r].added_ops == expected
    assert 0.002 < r50_report[16].relative_ops < 0.004                   # paper: +0.26%


def test_gated_total_equals_fvcore_on_gated_models(r50, r50_report):
    x = torch.zeros(1, 3, 224, 224)
    assert count_ops(r50, (x,)).total == r50_report.base_ops
    # timm's own SE-ResNet-50, counted by fvcore with the same handles
    assert count_ops(timm.create_model("seresnet50"), (x,)).total == r50_report[16].ops
    # and the model se-inject gates
    gated = timm.create_model("resnet50")
    se_inject.apply(gated, ratio=4)
    assert count_ops(gated, (x,)).total == r50_report[4].ops


def test_fvcore_alone_sees_only_the_two_convolutions(r50):
    """Why the handles exist: plain fvcore adds 2,514,944 for SE (Eq. 5's weights), nothing for
    the mean and the scale, which are 5,519,360 ops each."""
    x = torch.zeros(1, 3, 224, 224)
    plain = FlopCountAnalysis(r50.eval(), x)
    plain.unsupported_ops_warnings(False)
    se = FlopCountAnalysis(timm.create_model("seresnet50").eval(), x)
    se.unsupported_ops_warnings(False)
    assert se.total() - plain.total() == eq5_parameters(RESNET50_STAGES, 16)[0] == 2_514_944
    assert "aten::mean" in se.unsupported_ops() and "aten::mul" in se.unsupported_ops()
    per_element = sum(n * c * (224 // (2 ** s)) ** 2
                      for s, (n, c) in zip((2, 3, 4, 5), RESNET50_STAGES))
    assert per_element == 5_519_360


def test_uncounted_ops_are_listed(r50_report):
    assert r50_report.uncounted == {"aten::max_pool2d": 1}
    assert "aten::max_pool2d × 1" in r50_report.markdown()


def test_table13_stage_choices(r50):
    base = n_params(r50)
    one = {k: se_inject.cost(r50, stages=[k])[16].parameters for k in (2, 3, 4)}
    table13 = {2: 25.6, 3: 25.7, 4: 26.4}                                 # millions, rounded
    assert all(abs(one[k] / 1e6 - table13[k]) <= 0.1 for k in one)
    for k, (n, c) in zip((2, 3, 4), RESNET50_STAGES):
        assert one[k] - base == sum(eq5_parameters([(n, c)], 16))
    but_last = se_inject.cost(r50, stages="all-but-last")
    assert [s.stage for s in but_last[16].stages] == [2, 3, 4]
    assert 0.035 < but_last[16].relative_parameters < 0.045              # "about 4%"
    assert one[2] - base + one[3] - base + one[4] - base == but_last[16].added_parameters


def test_model_object_is_left_as_it_was():
    model = BlockNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rep = se_inject.cost(model, input_size=(3, 32, 32))
    assert len(rep[16].gates) == 3 and model.training
    assert not any(isinstance(m, se_inject.SEGate) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)         # BN stats untouched


def _blocknet_report():
    return se_inject.cost(BlockNet(), ratio=[16, 4], input_size=(3, 32, 32))


def test_golden_table_and_markdown():
    rep = _blocknet_report()
    assert rep.table() == (GOLDEN / "cost_blocknet.txt").read_text()
    assert rep.markdown() == (GOLDEN / "cost_blocknet.md").read_text()


def _md_tables(text):
    tables, cur = {}, None
    for line in text.splitlines():
        if line.startswith("### "):
            cur = tables.setdefault(line[4:], [])
        elif line.startswith("|") and cur is not None and not line.startswith("|---"):
            cur.append([c.strip() for c in line.strip("|").split("|")])
    return tables


def _num(s):
    return int(s.replace(",", ""))


@pytest.mark.parametrize("build", [_blocknet_report,
                                   lambda: se_inject.cost("resnet18", ratio=[16, 2])])
def test_columns_sum_to_totals(build):
    rep = build()
    t = _md_tables(rep.markdown())
    totals = {row[0]: row for row in t["totals"][1:]}
    stage_head, *stage_rows = t["added per stage"]
    gate_head, *gate_rows = t["added per gate"]
    body, total_row = stage_rows[:-1], stage_rows[-1]
    for r in rep.ratios:
        for what, col in (("params", 3), ("ops", 6)):
            name = f"+{what} r={r.ratio}"
            si, gi = stage_head.index(name), gate_head.index(name)
            by_stage = sum(_num(row[si]) for row in body)
            by_gate = sum(_num(row[gi]) for row in gate_rows)
            assert by_stage == by_gate == _num(total_row[si]) == _num(totals[str(r.ratio)][col])
        base = totals["base"]
        assert _num(totals[str(r.ratio)][2]) == _num(base[2]) + _num(totals[str(r.ratio)][3])
        assert _num(totals[str(r.ratio)][5]) == _num(base[5]) + _num(totals[str(r.ratio)][6])
    assert sum(int(row[2]) for row in body) == len(gate_rows)


def test_json_schema():
    rep = _blocknet_report()
    d = json.loads(rep.to_json())
    assert d["schema"] == "se-inject.cost/1"
    assert set(d) >= {"model", "input_size", "stages", "base_parameters", "base_ops",
                      "base_ops_by_operator", "uncounted", "ratios", "unit"}
    assert [r["ratio"] for r in d["ratios"]] == [16, 4]
    r16 = d["ratios"][0]
    assert r16["parameters"] == d["base_parameters"] + r16["added_parameters"]
    assert sum(g["parameters"] for g in r16["gates"]) == r16["added_parameters"]
    assert set(r16["gates"][0]) == {"gate", "block", "rule", "stage", "channels", "reduced",
                                    "spatial", "parameters", "ops"}


@pytest.mark.parametrize("suffix,magic", [(".png", b"\x89PNG"), (".svg", b"<?xml")])
def test_plot(tmp_path, suffix, magic):
    rep = _blocknet_report()
    out = rep.plot(tmp_path / f"cost{suffix}")
    assert out.read_bytes()[:len(magic)] == magic
    if suffix == ".svg":
        text = out.read_text()
        assert "r=16" in text and "r=4" in text                        # one series per ratio
    assert [p.name for p in tmp_path.iterdir()] == [f"cost{suffix}"]   # no temporary left


def test_measure_times_both_models_side_by_side():
    rep = se_inject.cost(BlockNet(), input_size=(3, 32, 32), measure=True, measure_rounds=5)
    m = rep[16].measured
    assert m["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    assert m["rounds"] == 5 and m["base_ms"] > 0 and m["gated_ms"] > 0
    assert m["ratio_iqr"][0] <= m["ratio"] <= m["ratio_iqr"][1]
    assert "time ÷ base" in rep.table()


def test_cli_report_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "stages.svg"
    assert main(["report", "resnet18", "--ratio", "16,4", "--format", "json",
                 "--plot", str(plot)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [r["ratio"] for r in d["ratios"]] == [16, 4]
    assert d["base_parameters"] == n_params(timm.create_model("resnet18"))
    assert plot.exists()


def test_cli_report_and_plan_build_the_model_with_its_options(capsys):
    kwargs = {"in_chans": 1, "num_classes": 10}
    assert main(["report", "resnet18", "--format", "json", "--input-size", "1", "64", "64",
                 "--model-kwargs", json.dumps(kwargs)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["model"] == "resnet18" and d["input_size"] == [1, 64, 64]
    assert d["base_parameters"] == n_params(timm.create_model("resnet18", **kwargs))
    assert main(["plan", "resnet18", "--model-kwargs", '{"num_classes": 10}']) == 0
    assert f"{n_params(timm.create_model('resnet18', num_classes=10)):,} parameters" in \
        capsys.readouterr().out
    assert main(["report", "resnet18", "--model-kwargs", '{"no_such_option": 1}']) == 2
    err = capsys.readouterr().err
    assert "could not build 'resnet18'" in err and "no_such_option" in err and "Traceback" not in err


def test_cli_report_errors(tmp_path, capsys):
    assert main(["report", "resnet5"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet5'" in err and "resnet50" in err and "Traceback" not in err
    assert main(["report", "resnet18", "--plot", str(tmp_path / "x.pdf")]) == 2
    assert ".png or .svg" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        main(["report", "resnet18", "--ratio", "16,x"])
    assert exc.value.code == 2
    assert main(["report", "resnet18", "--stages", "9"]) == 2
    assert "stages [9] hold no site" in capsys.readouterr().err


def test_bad_arguments():
    with pytest.raises(se_inject.SEInjectError, match="ratio"):
        se_inject.cost(BlockNet(), ratio=[16, 0], input_size=(3, 32, 32))
    with pytest.raises(se_inject.SEInjectError, match="nn.Module or a timm model name"):
        se_inject.cost(42)
    with pytest.raises(se_inject.SEInjectError, match="stages"):
        se_inject.cost(BlockNet(), stages="last", input_size=(3, 32, 32))
