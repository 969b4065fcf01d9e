"""se-inject report MODEL: what SE gates would cost, counted with fvcore. Changes nothing."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..cost import cost
from ._args import (RATIOS, STAGES, add_input_size, add_leaf, add_model, add_part,
                    add_variant_args, input_size_of, model_label, part_advice, variant_of)


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="parameters and compute SE gates would add (fvcore)",
                       description=__doc__)
    p.set_defaults(run=run)
    add_model(p)
    add_part(p)
    p.add_argument("--ratio", type=RATIOS, default=[16], metavar="R[,R...]|K:R,...",
                   help="reduction ratio(s), e.g. 16,8,4 (default 16), or one per stage: "
                        "2:16,3:16,4:8,5:8")
    add_input_size(p, "for the count")
    p.add_argument("--stages", type=STAGES, default=None, metavar="K[,K...]",
                   help="gate only these resolution stages (k: tensors at 1/2**k of the input's "
                        "height; ResNet-50 has 2-5), or all-but-last")
    p.add_argument("--rules", nargs="+", default=None, metavar="RULE",
                   help="built-in rule names or rule files (default: residual inception)")
    add_leaf(p)
    p.add_argument("--format", choices=("table", "json", "markdown"), default="table")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="write added parameters and ops per stage to FILE (.png or .svg)")
    p.add_argument("--measure", action="store_true",
                   help="also time base and gated forward passes on this device, side by side")
    add_variant_args(p)


def run(args: argparse.Namespace) -> int:
    if args.plot is not None:  # a bad plot path fails before the analysis, not after
        from ..report_format import check_plot_path
        check_plot_path(args.plot)
    if args.measure:
        print("measuring forward passes of the base and the gated model...", file=sys.stderr)
    model = whole = args.model
    leaves = ()
    if args.model_kwargs or args.part or args.leaf:
        from .._models import classes_named, create, part_of
        whole = create(args.model, **(args.model_kwargs or {}))
        model = part_of(whole, args.part, args.model, " (--part)")
        leaves = classes_named(model, args.leaf, "--leaf")
    with part_advice(args.part):
        rep = cost(model, ratio=args.ratio, stages=args.stages, rules=args.rules,
                   input_size=input_size_of(args, whole), measure=args.measure,
                   leaf_modules=leaves, **variant_of(args))
    if args.model_kwargs or args.part or args.leaf:
        rep = dataclasses.replace(rep, model=model_label(args))
    text = {"table": rep.table, "json": rep.to_json, "markdown": rep.markdown}[args.format]()
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if args.plot is not None:
        rep.plot(args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return 0
