"""Rule files: YAML or TOML data, validated whole against a schema before anything is touched.

A YAML rule file is composed (never constructed) with PyYAML's safe loader, so no tag can make
it run code; a TOML one is read with tomllib (plain data by design) and turned into the same
nodes, each marked with the line its key is on. Every error names the file, the line and the
key. See README.md, "Rule files".
"""
from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

import yaml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

from .errors import RuleError

__all__ = ["Rule", "load_rule", "resolve_rules", "builtin_rules_dir", "builtin_rule_names",
           "DEFAULT_RULES", "SCHEMA_VERSION"]

SCHEMA_VERSION = 1
DEFAULT_RULES = ("residual", "inception")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_PLAIN_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "bool", "map", "seq", "null")}


@dataclass(frozen=True)
class Rule:
    """One parsed, validated rule. See README.md for what each field means."""

    name: str
    summary: str
    merge: str                      # "add" or "cat"
    min_operands: int
    max_operands: int | None
    equal_shapes: bool
    entry_as_operand: str           # "allow" or "forbid"
    min_branches_with_conv: int
    gate_at: str                    # "branch", "output", "after_depthwise" (any merge) or
                                    # "pre", "post", "identity" (sums only: paper Table 14)
    existing_gate: str              # "skip" or "allow": a block that already holds a channel gate
    depthwise_branch: bool          # the gated branch must hold a depthwise convolution
    disjoint_branches: bool         # the operands' branches share no layer (parallel branches)
    reparam_sums: str               # "skip" or "allow": a sum of one-convolution linear branches
    layer_sums: str                 # "skip" or "allow": convolutions of separate tensors summed
    yield_to: tuple[str, ...]
    path: str


RuleSpec = Union[str, os.PathLike, Rule]


@functools.lru_cache(maxsize=1)
def builtin_rules_dir() -> Path:
    """Where the built-in rules are: inside the installed package, or beside it in a checkout
    (found once: apply() resolves its rules at every call)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "rules", here.parent / "rules"):
        if (candidate / "residual.yaml").is_file():
            return candidate
    raise RuleError("the built-in rules are missing: reinstall se-inject (pip install se-inject)")


@functools.lru_cache(maxsize=1)
def _builtin_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in builtin_rules_dir().glob("*.yaml")))


def builtin_rule_names() -> list[str]:
    return list(_builtin_names())


# --- schema -----------------------------------------------------------------------------
# key -> (required, checker, default); a checker turns a yaml node into a value or raises.

def _scalar(node: yaml.Node, path: str, key: str) -> Any:
    if not isinstance(node, yaml.ScalarNode):
        raise RuleError("expected a single value", path, _line(node), key)
    return yaml.safe_load(yaml.serialize(node))  # plain scalar: str, int, bool or None


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _of_type(t: type, what: str) -> Callable:
    def check(node, path, key):
        v = _scalar(node, path, key)
        if not isinstance(v, t) or (t is int and isinstance(v, bool)):
            raise RuleError(f"expected {what}, got {v!r}", path, _line(node), key)
        return v
    return check


def _choice(*options: Any) -> Callable:
    def check(node, path, key):
        v = _scalar(node, path, key)
        if v not in options:
            raise RuleError(f"expected one of {', '.join(map(str, options))}; got {v!r}",
                            path, _line(node), key)
        return v
    return check


def _count(node, path, key) -> int:
    v = _of_type(int, "an integer")(node, path, key)
    if v < 0:
        raise RuleError(f"expected a count of 0 or more, got {v}", path, _line(node), key)
    return v


def _operands(node, path, key) -> tuple[int, int | None]:
    if isinstance(node, yaml.ScalarNode):
        n = _count(node, path, key)
        return n, n
    fields = _mapping(node, path, key, {"min": (False, _count, 2), "max": (False, _count, None)})
    if fields["max"] is not None and fields["max"] < fields["min"]:
        raise RuleError("max is smaller than min", path, _line(node), key)
    return fields["min"], fields["max"]


def _names(node, path, key) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise RuleError("expected a list of rule names", path, _line(node), key)
    out = []
    for item in node.value:
        v = _scalar(item, path, key)
        if not isinstance(v, str) or not _NAME.match(v):
            raise RuleError(f"expected a rule name, got {v!r}", path, _line(item), key)
        out.append(v)
    return tuple(out)


def _name(node, path, key) -> str:
    v = _of_type(str, "a string")(node, path, key)
    if not _NAME.match(v):
        raise RuleError(f"{v!r} is not a valid rule name (lower case letters, digits, - and _)",
                        path, _line(node), key)
    return v


def _schema_version(node, path, key) -> int:
    v = _of_type(int, "an integer")(node, path, key)
    if v != SCHEMA_VERSION:
        raise RuleError(f"schema {v} is not supported by this se-inject (it reads schema "
                        f"{SCHEMA_VERSION}); upgrade se-inject or rewrite the rule",
                        path, _line(node), key)
    return v


MERGES = ("add", "cat")  # the merges a rule may look at: sums, channel concatenations

_MATCH_SCHEMA = {
    "merge": (True, _choice(*MERGES), None),
    "operands": (False, _operands, (2, None)),
    "equal_shapes": (False, _of_type(bool, "true or false"), False),
    "entry_as_operand": (False, _choice("allow", "forbid"), "allow"),
    "min_branches_with_conv": (False, _count, 1),
    "existing_gate": (False, _choice("skip", "allow"), "skip"),
    "depthwise_branch": (False, _of_type(bool, "true or false"), False),
    "disjoint_branches": (False, _of_type(bool, "true or false"), False),
    "reparam_sums": (False, _choice("skip", "allow"), "skip"),
    "layer_sums": (False, _choice("skip", "allow"), "skip"),
}
_GATE_SCHEMA = {"at": (True, _choice("branch", "output", "after_depthwise", "pre", "post",
                                     "identity"), None)}


def _sub(schema):
    return lambda node, path, key: _mapping(node, path, key, schema)


_RULE_SCHEMA = {
    "schema": (True, _schema_version, None),
    "name": (True, _name, None),
    "summary": (True, _of_type(str, "a string"), None),
    "match": (True, _sub(_MATCH_SCHEMA), None),
    "gate": (True, _sub(_GATE_SCHEMA), None),
    "yield_to": (False, _names, ()),
}


def _mapping(node: yaml.Node, path: str, where: str | None, schema: dict) -> dict[str, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise RuleError("expected a mapping of keys to values", path, _line(node), where)
    out: dict[str, Any] = {}
    for key_node, value_node in node.value:
        key = _scalar(key_node, path, where)
        full = f"{where}.{key}" if where else str(key)
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RuleError(f"unknown key{hint}; allowed here: {', '.join(schema)}",
                            path, _line(key_node), full)
        if key in out:
            raise RuleError("key given twice", path, _line(key_node), full)
        out[key] = schema[key][1](value_node, path, full)
    for key, (required, _, default) in schema.items():
        if key not in out:
            if required:
                full = f"{where}.{key}" if where else key
                raise RuleError("required key is missing", path, _line(node), full)
            out[key] = default
    return out


def _check_tags(root: yaml.Node, path: str) -> None:
    # Each node once: an alias (*a) is the anchored node itself, so a file of nested aliases
    # ("billion laughs") is a small graph that a walk of every path through it would never end.
    seen: set[int] = set()
    todo = [root]
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.tag not in _PLAIN_TAGS:
            raise RuleError(f"tag {node.tag!r} is not allowed: rule files hold plain data only",
                            path, _line(node))
        if isinstance(node, yaml.MappingNode):
            todo += [n for kv in reversed(node.value) for n in reversed(kv)]
        elif isinstance(node, yaml.SequenceNode):
            todo += reversed(node.value)


def _compose_yaml(text: str, path: str) -> yaml.Node | None:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RuleError(f"not valid YAML: {getattr(exc, 'problem', exc)}", path,
                        mark.line + 1 if mark else None) from None
    except RecursionError:  # PyYAML composes nested collections by recursion
        raise RuleError("collections nested deeper than a rule file's (thousands of levels)",
                        path) from None
    if root is not None:
        _check_tags(root, path)
    return root


# --- TOML: the parsed document as YAML nodes, each marked with the line of its key ----------

_KEY_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""  # bare, "quoted", 'literal'
_TOML_KEY = re.compile(_KEY_PART)
_TOML_TABLE = re.compile(r"^\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
_TOML_PAIR = re.compile(rf"^((?:\s*{_KEY_PART}\s*\.)*\s*{_KEY_PART})\s*=")


def _toml_key(text: str) -> tuple[str, ...]:
    """A dotted TOML key's parts (``a."b.c"`` -> ``("a", "b.c")``)."""
    parts = []
    for p in _TOML_KEY.findall(text):
        parts.append(p[1:-1] if p[:1] in "\"'" else p)
    return tuple(parts)


def _toml_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line (1-based) of each table header and each key in a TOML text, by its full path.
    A key inside an inline table has no line of its own: errors there name the line of the key
    that holds it. The lines of a multi-line string are its value's, never keys."""
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    open_quote = None  # the delimiter of a multi-line string still open
    for i, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if open_quote is not None:
            if raw.count(open_quote) % 2:
                open_quote = None
            continue
        open_quote = next((q for q in ('"""', "'''") if raw.count(q) % 2), None)
        m = _TOML_TABLE.match(line)
        if m:
            table = _toml_key(m.group(1))
            lines.setdefault(table, i)
            continue
        m = _TOML_PAIR.match(line)
        if m:
            lines.setdefault(table + _toml_key(m.group(1)), i)
    return lines


class _Mark:
    def __init__(self, line: int):
        self.line = line - 1  # (0-based, as PyYAML's marks)


def _toml_node(value: Any, where: tuple[str, ...], lines: dict, line: int,
               path: str) -> yaml.Node:
    mark = _Mark(line)
    if isinstance(value, dict):
        pairs = []
        for k, v in value.items():
            at = lines.get(where + (k,), line)
            pairs.append((yaml.ScalarNode("tag:yaml.org,2002:str", k, _Mark(at), _Mark(at)),
                          _toml_node(v, where + (k,), lines, at, path)))
        return yaml.MappingNode("tag:yaml.org,2002:map", pairs, mark, mark)
    if isinstance(value, list):
        return yaml.SequenceNode("tag:yaml.org,2002:seq",
                                 [_toml_node(v, where, lines, line, path) for v in value],
                                 mark, mark)
    if isinstance(value, bool):
        tag, text = "bool", "true" if value else "false"
    elif isinstance(value, int):
        tag, text = "int", str(value)
    elif isinstance(value, float):
        tag, text = "float", repr(value)
    elif isinstance(value, str):
        tag, text = "str", value
    else:  # a date or a time
        raise RuleError(f"a rule file holds strings, numbers, booleans, lists and tables, not a "
                        f"TOML {type(value).__name__} ({value})", path, line, ".".join(where))
    return yaml.ScalarNode(f"tag:yaml.org,2002:{tag}", text, mark, mark)


def _compose_toml(text: str, path: str) -> yaml.Node | None:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+)", str(exc))
        raise RuleError(f"not valid TOML: {re.sub(r' [(]at line .*$', '', str(exc))}", path,
                        int(m.group(1)) if m else None) from None
    except RecursionError:  # (arrays nested past the stack)
        raise RuleError("collections nested deeper than a rule file's (thousands of levels)",
                        path) from None
    if not data:
        return None
    try:
        return _toml_node(data, (), _toml_lines(text), 1, path)
    except RecursionError:
        raise RuleError("collections nested deeper than a rule file's (thousands of levels)",
                        path) from None


def _parse(text: str, path: str) -> Rule:
    root = (_compose_toml if path.lower().endswith(".toml") else _compose_yaml)(text, path)
    if root is None:
        raise RuleError("the file is empty; a rule file holds one rule (see README.md)", path)
    f = _mapping(root, path, None, _RULE_SCHEMA)
    m, gate = f["match"], f["gate"]
    if gate["at"] != "output" and m["operands"][0] < 2:
        raise RuleError("a rule that gates a branch needs at least 2 operands", path, _line(root),
                        "match.operands")
    return Rule(name=f["name"], summary=" ".join(f["summary"].split()), merge=m["merge"],
                min_operands=m["operands"][0], max_operands=m["operands"][1],
                equal_shapes=m["equal_shapes"], entry_as_operand=m["entry_as_operand"],
                min_branches_with_conv=m["min_branches_with_conv"], gate_at=gate["at"],
                existing_gate=m["existing_gate"], depthwise_branch=m["depthwise_branch"],
                disjoint_branches=m["disjoint_branches"], reparam_sums=m["reparam_sums"],
                layer_sums=m["layer_sums"], yield_to=f["yield_to"], path=path)


@functools.lru_cache(maxsize=64)
def _load_cached(path: str, mtime_ns: int, size: int) -> Rule:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"cannot read the rule file: {exc}", path) from None
    return _parse(text, path)


def load_rule(path: Union[str, os.PathLike]) -> Rule:
    """Parse and validate one rule file."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise RuleError("no such rule file; built-in rules are "
                        f"{', '.join(builtin_rule_names())}", str(path)) from None
    return _load_cached(str(p), st.st_mtime_ns, st.st_size)


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith((".yaml", ".yml", ".toml")) or os.sep in spec or "/" in spec


def resolve_rules(specs: RuleSpec | Sequence[RuleSpec] | None) -> tuple[Rule, ...]:
    """Built-in names, paths to rule files or Rule objects -> validated rules, in order."""
    if specs is None:
        specs = DEFAULT_RULES
    if isinstance(specs, (str, os.PathLike, Rule)):
        specs = [specs]
    if not isinstance(specs, Iterable):
        raise RuleError(f"rules must be a rule name, a path or a list of them, not "
                        f"{type(specs).__name__}")
    rules: list[Rule] = []
    for spec in specs:
        if isinstance(spec, Rule):
            rules.append(spec)
        elif isinstance(spec, os.PathLike) or (isinstance(spec, str) and _looks_like_path(spec)):
            rules.append(load_rule(spec))
        elif isinstance(spec, str):
            if spec not in _builtin_names():
                names = builtin_rule_names()
                close = difflib.get_close_matches(spec, names, n=2)
                hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
                raise RuleError(f"unknown rule {spec!r}.{hint} Built-in rules: {', '.join(names)}; "
                                "a path to your own rule file (.yaml or .toml) works too.")
            rules.append(load_rule(builtin_rules_dir() / f"{spec}.yaml"))
        else:
            raise RuleError(f"a rule is a built-in name, a path or a Rule, not {type(spec).__name__}")
    if not rules:
        raise RuleError("no rules given: pass at least one (built-in: "
                        f"{', '.join(builtin_rule_names())})")
    seen: dict[str, str] = {}
    for r in rules:
        if r.name in seen:
            raise RuleError(f"two rules are named {r.name!r} ({seen[r.name]} and {r.path}); "
                            "rule names must be unique", r.path)
        seen[r.name] = r.path
    return tuple(rules)
