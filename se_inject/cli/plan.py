"""se-inject plan MODEL: which blocks get a gate, by which rule. Changes nothing."""
from __future__ import annotations

import argparse

from .. import api
from .._models import classes_named, create, part_of
from ._args import (RATIO, STAGES, add_input_size, add_leaf, add_model, add_part,
                    add_variant_args, input_size_of, model_label, part_advice, variant_of)


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="list the blocks that would get a gate (changes nothing)",
                       description=__doc__)
    p.set_defaults(run=run)
    add_model(p)
    add_part(p)
    p.add_argument("--ratio", type=RATIO, default=16, metavar="R|K:R,...",
                   help="reduction ratio r (default 16), or one per stage: 2:16,3:16,4:8,5:8")
    p.add_argument("--rules", nargs="+", default=None, metavar="RULE",
                   help="built-in rule names or rule files (default: residual inception)")
    add_input_size(p, "for shape propagation")
    p.add_argument("--stages", type=STAGES, default=None, metavar="K[,K...]",
                   help="gate only these resolution stages, or all-but-last (paper Table 13)")
    add_leaf(p)
    add_variant_args(p)


def run(args: argparse.Namespace) -> int:
    label = model_label(args)
    whole = create(args.model, **(args.model_kwargs or {}))
    model = part_of(whole, args.part, args.model, " (--part)")
    size = input_size_of(args, whole)
    leaves = classes_named(model, args.leaf, "--leaf")
    with part_advice(args.part):
        p = api.plan(model, ratio=args.ratio, rules=args.rules, stages=args.stages,
                     input_size=size, leaf_modules=leaves, **variant_of(args))
    base = sum(t.numel() for t in model.parameters())
    handed = f", input {tuple(size)} as the model hands it" if size != args.input_size else ""
    print(f"se-inject plan for {label} ({type(model).__name__}, {base:,} parameters{handed})")
    print(p.table())
    if not len(p):
        held = api.held_blocks(p)
        if held:
            print(f"every block the rules match already holds a gate ({len(held)} blocks): "
                  "apply() would change nothing. A rule with 'existing_gate: allow' gates them "
                  "(README.md, 'Rule files').")
            return 0
        # what apply() would refuse the model with, on stderr with its exit status
        raise api._no_sites_error(model, p, api._trace_options(model, leaves, None))
    return 0
