"""se-inject rules [list | show NAME | check FILE...]: the built-in rules and your own."""
from __future__ import annotations

import argparse

from ..rules import builtin_rule_names, builtin_rules_dir, load_rule, resolve_rules


def add_parser(sub) -> None:
    p = sub.add_parser("rules", help="list, show or check rule files", description=__doc__)
    p.set_defaults(run=run)
    p.add_argument("action", nargs="?", choices=("list", "show", "check"), default="list")
    p.add_argument("names", nargs="*", metavar="NAME_OR_FILE")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for name in builtin_rule_names():
            r = load_rule(builtin_rules_dir() / f"{name}.yaml")
            print(f"{r.name:<12} {r.summary}")
        return 0
    if not args.names:
        raise SystemExit(f"se-inject rules {args.action}: give at least one rule name or file")
    for rule in resolve_rules(args.names):
        if args.action == "show":
            print(f"# {rule.path}")
            with open(rule.path, encoding="utf-8") as f:
                print(f.read().rstrip())
        else:
            print(f"{rule.path}: ok (rule {rule.name!r}, merge {rule.merge}, gate at {rule.gate_at})")
    return 0
