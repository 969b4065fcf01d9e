"""se-inject convert SRC -o OUT: a plain checkpoint -> an SE checkpoint that se_inject.load()
rebuilds from the file alone. se-inject strip SRC -o OUT: the way back."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoint import convert, strip
from ..identity import IdentityInitError
from ._args import (RATIO, STAGES, add_input_size, add_leaf, add_model_kwargs, add_part,
                    add_variant_args, leaf_advice, part_advice, variant_of)


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a plain checkpoint into an SE checkpoint",
                       description=__doc__)
    p.set_defaults(run=run)
    p.add_argument("src", type=Path, help="state_dict (.pth/.pt/.bin), .safetensors, training "
                   "checkpoint, or a folder with config.json and model weights")
    p.add_argument("-o", "--output", type=Path, required=True, help="the SE checkpoint to write")
    p.add_argument("--model", default=None, help="timm architecture, or torchvision/NAME for "
                   "torchvision's (default: the checkpoint's own 'arch', config.json, or the "
                   "command line torchvision's reference scripts keep)")
    add_model_kwargs(p, "options the checkpoint's model was made with that its tensors do not "
                     "show, e.g. '{\"global_pool\": \"max\"}' (num_classes and in_chans are "
                     "read from the file)")
    add_part(p)
    p.add_argument("--ratio", type=RATIO, default=16, metavar="R|K:R,...",
                   help="reduction ratio r (default 16), or one per stage: 2:16,3:16,4:8,5:8")
    p.add_argument("--rules", nargs="+", default=None, metavar="RULE")
    p.add_argument("--stages", type=STAGES, default=None, metavar="K[,K...]")
    add_input_size(p, "for shape propagation (with --part, the part's; default: the size the "
                   "model hands it)")
    p.add_argument("--init", choices=("identity", "paper"), default="identity",
                   help="identity (default): the converted model computes what the original did; "
                        "paper: gates start as new layers")
    add_leaf(p)
    p.add_argument("--format", choices=("safetensors", "pth"), default="safetensors")
    p.add_argument("--ema", action="store_true", help="take state_dict_ema from a training "
                   "checkpoint")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--remove", action="store_true", help="the way back: write the plain model "
                   "of an SE checkpoint (as se-inject strip)")
    add_variant_args(p)


def add_strip_parser(sub) -> None:
    p = sub.add_parser("strip", help="write the plain model of an SE checkpoint",
                       description=__doc__)
    p.set_defaults(run=run)
    p.add_argument("src", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--format", choices=("safetensors", "pth"), default="safetensors")
    p.add_argument("--force", action="store_true")
    p.set_defaults(remove=True)


def run(args: argparse.Namespace) -> int:
    if args.remove:
        out = strip(args.src, args.output, format=args.format, force=args.force)
        print(f"wrote {out} (plain model, no gates)")
        return 0
    try:
        with part_advice(args.part):
            out = convert(args.src, args.output, model=args.model, ratio=args.ratio,
                          rules=args.rules, stages=args.stages, input_size=args.input_size,
                          init=args.init, format=args.format, force=args.force, ema=args.ema,
                          model_kwargs=args.model_kwargs, part=args.part,
                          leaf_modules=args.leaf, **variant_of(args))
    except IdentityInitError as exc:
        raise leaf_advice(exc, args) from None
    print(f"wrote {out}; load it with se_inject.load({str(out)!r})")
    return 0
