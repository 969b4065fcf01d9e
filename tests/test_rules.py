"""Rule files: validated whole, errors naming file, line and key; nothing in them runs."""
import re
from pathlib import Path

import pytest
import torch

import se_inject
from se_inject.errors import NoSitesError, RuleError, SEInjectError
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
    _refused_at(_write(tmp_path, text), line, key, words)


def _refused_at(path, line, key, words):
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
    twin = re.search(r"<!-- rule-example-toml -->\s*```toml\n(.*?)```", text, re.S)
    assert twin, "README.md lost the TOML form of its rule example"
    from dataclasses import replace
    assert replace(load_rule(_write(tmp_path, twin.group(1), "example.toml")),
                   path=rule.path) == rule


GOOD_TOML = """\
# the same rule as GOOD, in TOML
schema = 1
name = "my-residual"
summary = "residual blocks, my way"

[match]
merge = "add"
operands = 2
equal_shapes = true
min_branches_with_conv = 1

[gate]
at = "branch"
"""


def test_a_toml_rule_file_is_the_same_rule_as_its_yaml_twin(tmp_path, monkeypatch):
    """A rule written in TOML reads as the YAML rule with the same values, and gates what it
    gates; so do a dotted key and an inline table."""
    from dataclasses import replace
    yaml_rule = load_rule(_write(tmp_path, GOOD))
    toml_path = _write(tmp_path, GOOD_TOML, "rule.toml")
    toml_rule = resolve_rules([str(toml_path)])[0]
    assert replace(toml_rule, path=yaml_rule.path) == yaml_rule
    _write(tmp_path, GOOD_TOML, "RULE.TOML")  # a name in capitals, in the working folder
    monkeypatch.chdir(tmp_path)
    assert replace(resolve_rules(["RULE.TOML"])[0], path=yaml_rule.path) == yaml_rule
    dotted = _write(tmp_path, 'schema = 1\nname = "my-residual"\nsummary = "residual blocks, '
                    'my way"\nmatch = { merge = "add", operands = 2, equal_shapes = true }\n'
                    'gate.at = "branch"\n', "dotted.toml")
    assert replace(load_rule(dotted), path=yaml_rule.path) == yaml_rule
    twin = _write(tmp_path, GOOD, "twin.yaml")
    sites = [(s.block, s.rule) for s in se_inject.plan(BlockNet(), rules=[toml_path])]
    assert sites == [(s.block, s.rule) for s in se_inject.plan(BlockNet(), rules=[twin])]
    assert len(sites) == 3


@pytest.mark.parametrize("text,line,key,words", [
    (GOOD_TOML.replace('merge = "add"', 'merge = "sum"'), 7, "match.merge",
     "expected one of add, cat"),
    (GOOD_TOML.replace("operands = 2", "operand = 2"), 8, "match.operand",
     "did you mean 'operands'"),
    (GOOD_TOML.replace('at = "branch"', 'where = "branch"'), 13, "gate.where", "unknown key"),
    (GOOD_TOML.replace('\n[gate]\nat = "branch"\n', ""), 1, "gate", "required key is missing"),
    (GOOD_TOML.replace("equal_shapes = true", "equal_shapes = 3"), 9, "match.equal_shapes",
     "expected true or false"),
    (GOOD_TOML.replace("operands = 2", "operands = { min = 3, max = 2 }"), 8, "match.operands",
     "max is smaller than min"),
    (GOOD_TOML.replace("operands = 2", "operands = 2.0"), 8, "match.operands",
     "expected an integer, got 2.0"),
    (GOOD_TOML.replace('summary = "residual blocks, my way"', "summary = 1979-05-27"), 4,
     "summary", "not a TOML date"),
    # lines of a multi-line string that read as a table and a key are the string's
    (GOOD_TOML.replace('summary = "residual blocks, my way"',
                       'summary = """\n[gate]\nwhere = 1\n"""').replace('at = "branch"',
                                                                        'where = "branch"'),
     16, "gate.where", "unknown key"),
    # a key after a table's header is the table's: TOML's top-level keys come first
    (GOOD_TOML + 'yield_to = []\n', 14, "gate.yield_to", "unknown key"),
])
def test_toml_schema_errors_name_file_line_and_key(tmp_path, text, line, key, words):
    _refused_at(_write(tmp_path, text, "rule.toml"), line, key, words)


def test_malformed_or_empty_toml_is_refused_naming_the_line(tmp_path):
    path = _write(tmp_path, GOOD_TOML.replace("[gate]", "[gate"), "rule.toml")
    with pytest.raises(RuleError, match=re.escape(f"{path}:12: not valid TOML")):
        load_rule(path)
    twice = GOOD_TOML.replace('name = "my-residual"\n', 'name = "my-residual"\nname = "again"\n')
    path = _write(tmp_path, twice, "twice.toml")
    with pytest.raises(RuleError, match=re.escape(f"{path}:4: not valid TOML")):
        load_rule(path)
    with pytest.raises(RuleError, match="the file is empty"):
        load_rule(_write(tmp_path, "# nothing\n", "empty.toml"))


class _Nested(torch.nn.Module):
    """A U-Net's skips at one resolution: each sum adds a 1x1 convolution of its mirror's input
    to the layers inside it, so every sum's region holds the sums within it."""

    def __init__(self, levels: int = 6, c: int = 8):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, c, 3, padding=1)
        self.enc = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 3, padding=1) for _ in range(levels))
        self.skip = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 1) for _ in range(levels))
        self.dec = torch.nn.ModuleList(torch.nn.Conv2d(c, c, 3, padding=1) for _ in range(levels))

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for e in self.enc:
            skips.append(x)
            x = torch.relu(e(x))
        for d, k, s in zip(self.dec, reversed(skips), reversed(self.skip)):
            x = torch.relu(d(x)) + s(k)
        return x


class _CountingRegions(dict):
    """The matcher's regions of merges looked at, counting the walks that took one whole."""

    hops = 0

    def get(self, key, default=None):
        found = super().get(key, default)
        self.hops += found is not None
        return found


@pytest.mark.parametrize("name", ["nested", "hrnet_w18_small", "dla34", "cspresnet50",
                                  "inception_v3", "densenet121"])
def test_the_matcher_taking_enclosed_regions_whole_finds_what_walking_them_finds(name,
                                                                                 monkeypatch):
    """Walking back from a sum's operands, the matcher takes the region of a sum it has already
    looked at whole; candidates (their regions too) and rejections equal those of walking
    every node."""
    import timm
    from se_inject import match
    from se_inject.graph import build_view
    from se_inject.shapes import propagate_shapes
    from se_inject.trace import TraceOptions, trace_model
    model = _Nested() if name == "nested" else timm.create_model(name, pretrained=False)
    size = (3, 32, 32) if name == "nested" else (3, 128, 128)

    def found(reuse: bool):
        graph = trace_model(model, TraceOptions(), n_inputs=1)
        propagate_shapes(model, graph, [(2, *size)], torch.float32)
        view = build_view(graph, model)
        regions = view.__dict__["closed_regions"] = _CountingRegions()  # (the cached value)
        if not reuse:
            monkeypatch.setattr(match, "_branch", lambda p, o, e, closed=None: plain(p, o, e))
        candidates, rejected = match.find_candidates(view, resolve_rules(None))
        monkeypatch.undo()
        return ({(c.merge.name, c.rule.name, c.gated.name, c.at.name,
                  frozenset(n.name for n in c.region)) for c in candidates},
                sorted((r.merge.name, r.rule.name, r.reason) for r in rejected), regions.hops)

    plain = match._branch
    with_hops, walked = found(True), found(False)
    assert with_hops[:2] == walked[:2] and (with_hops[0] or with_hops[1])
    assert walked[2] == 0
    if name in ("nested", "hrnet_w18_small", "dla34"):
        assert with_hops[2] > 0                  # regions were taken whole


class _Shifted(torch.nn.Module):
    """A residual block whose maps are also shifted by a constant and a parameter, and
    summed with Python's sum (which starts from 0)."""

    def __init__(self, c=8):
        super().__init__()
        self.c1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.c2 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.shift = torch.nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)) + 3)
        return sum([x, y]) + self.shift


class _ShiftedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.block = torch.nn.Conv2d(3, 8, 3), _Shifted()

    def forward(self, x):
        return self.block(self.stem(x))


class _Shift(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.bias = torch.nn.Parameter(torch.zeros(1, 8, 1, 1))

    def forward(self, x):
        return self.conv(x) + self.bias


def test_a_map_plus_a_constant_or_parameter_is_no_merge(tmp_path):
    """``x + 3``, a norm's shift by a parameter, the 0 Python's sum starts from: one feature
    map, nothing merged. They were matched against the rules and listed among the blocks not
    gated ("1 feature-map operand(s) where the rule takes 2": 78 of them in timm's
    mobilenetv5_base), and a model with nothing else was refused as if it had merges no rule
    matched. A rule that takes one operand still sees them."""
    p = se_inject.plan(_ShiftedNet())
    assert [(s.block, s.rule) for s in p.sites] == [("block", "residual")]
    assert p.skipped == () and "not gated" not in str(p)
    with pytest.raises(NoSitesError, match="has no residual or inception-style block"):
        se_inject.apply(_Shift())
    one = _write(tmp_path, GOOD.replace("my-residual", "one").replace("operands: 2",
                                                                        "operands: 1")
                 .replace("at: branch", "at: output").replace("  equal_shapes: true\n", ""))
    looked_at = {s.merge for s in se_inject.plan(_ShiftedNet(), rules=[one]).skipped}
    assert {"block.add", "block.add_2"} <= looked_at  # (`+ 3` and `+ self.shift`)
