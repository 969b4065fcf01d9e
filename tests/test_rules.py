"""Rule files: validated whole, errors naming file, line and key; nothing in them runs."""
import re
from pathlib import Path

import pytest

import se_inject
from se_inject.errors import RuleError, SEInjectError
from se_inject.rules import builtin_rule_names, load_rule, resolve_rules
from handwritten import BlockNet, FunctionalInceptionNet

README = Path(__file__).resolve().parent.parent / "README.md"

GOOD = """\
schema: 1
name: my-residual
summary: residual blocks, my way
match:
  merge: add
  operands: 2
  equal_shapes: true
  min_branches_with_conv: 1
gate:
  at: branch
"""


def _write(tmp_path, text, name="rule.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_builtin_rules_are_found_and_valid():
    assert {"residual", "inception"} <= set(builtin_rule_names())
    residual, inception = resolve_rules(["residual", "inception"])
    assert (residual.merge, residual.gate_at) == ("add", "branch")
    assert (inception.merge, inception.gate_at, inception.entry_as_operand) == \
        ("cat", "output", "forbid")


def test_user_rule_file_by_path(tmp_path):
    path = _write(tmp_path, GOOD)
    model = se_inject.apply(BlockNet(), rules=[str(path)])
    p = se_inject.plan(BlockNet(), rules=[path])
    assert len(p) == 3 and {s.rule for s in p} == {"my-residual"}
    assert sum(1 for m in model.modules() if isinstance(m, se_inject.SEGate)) == 3


def test_rules_choose_what_gets_gated():
    assert len(se_inject.plan(FunctionalInceptionNet(), rules=["residual", "inception"])) == 2
    with pytest.raises(se_inject.SEInjectError):
        se_inject.apply(FunctionalInceptionNet(), rules=["residual"])


@pytest.mark.parametrize("text,line,key,words", [
    (GOOD.replace("merge: add", "merge: sum"), 5, "match.merge", "expected one of add, cat"),
    (GOOD.replace("  operands: 2\n", "  operand: 2\n"), 6, "match.operand", "did you mean 'operands'"),
    (GOOD.replace("gate:\n  at: branch\n", "gate: {}\n"), 9, "gate.at", "required key is missing"),
    (GOOD.replace("schema: 1", "schema: 7"), 1, "schema", "schema 7 is not supported"),
    (GOOD.replace("equal_shapes: true", "equal_shapes: 3"), 7, "match.equal_shapes",
     "expected true or false"),
    (GOOD + "yield_to: residual\n", 11, "yield_to", "expected a list of rule names"),
    (GOOD + "name: again\n", 11, "name", "key given twice"),
    (GOOD.replace("name: my-residual", "name: My Rule"), 2, "name", "not a valid rule name"),
])
def test_schema_errors_name_file_line_and_key(tmp_path, text, line, key, words):
    path = _write(tmp_path, text)
    with pytest.raises(RuleError) as err:
        load_rule(path)
    assert str(err.value).startswith(f"{path}:{line}: {key}: ")
    assert words in str(err.value)
    assert (err.value.line, err.value.key) == (line, key)


def test_malformed_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, GOOD.replace("  at: branch", "  at: [branch"))
    with pytest.raises(RuleError, match=re.escape(f"{path}:") + r"\d+: not valid YAML"):
        load_rule(path)


def test_a_rule_file_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    payload = f"!!python/object/apply:os.system ['touch {marker}']"
    path = _write(tmp_path, GOOD.replace("summary: residual blocks, my way", f"summary: {payload}"))
    with pytest.raises(RuleError, match="tag 'tag:yaml.org,2002:python/object/apply:os.system' "
                                        "is not allowed"):
        load_rule(path)
    assert not marker.exists()


def test_unknown_rule_name_suggests_close_ones():
    with pytest.raises(RuleError, match="unknown rule 'residul'. Did you mean 'residual'"):
        resolve_rules(["residul"])
    with pytest.raises(RuleError, match="no such rule file"):
        resolve_rules(["./missing.yaml"])


def test_a_bad_rule_is_refused_before_the_model_is_touched(tmp_path):
    model = BlockNet()
    keys = list(model.state_dict())
    bad = _write(tmp_path, GOOD.replace("at: branch", "at: middle"))
    with pytest.raises(SEInjectError):
        se_inject.apply(model, rules=["residual", str(bad)])
    assert list(model.state_dict()) == keys
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_duplicate_rule_names_are_refused(tmp_path):
    with pytest.raises(RuleError, match="two rules are named 'residual'"):
        resolve_rules(["residual", _write(tmp_path, GOOD.replace("my-residual", "residual"))])


def test_readme_rule_example_loads_and_works(tmp_path):
    text = README.read_text()
    block = re.search(r"<!-- rule-example -->\s*```yaml\n(.*?)```", text, re.S)
    assert block, "README.md lost its rule example"
    rule = load_rule(_write(tmp_path, block.group(1)))
    model = se_inject.apply(BlockNet(), rules=[rule])
    # the example gates only blocks with a projection shortcut: blocks 0 and 2, not identity 1
    assert [n for n, m in model.named_modules() if isinstance(m, se_inject.SEGate)] == \
        ["blocks.0.se_gate", "blocks.2.se_gate"]
