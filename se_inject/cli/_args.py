"""Argument types shared by the subcommands."""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import Callable

__all__ = ["integers", "model_kwargs", "add_model", "add_model_kwargs", "add_input_size",
           "add_part", "model_label", "input_size_of", "part_advice", "RATIO", "RATIOS", "STAGES",
           "add_variant_args", "variant_of", "add_leaf", "leaf_advice"]


def integers(option: str, minimum: int, example: str, *, many: bool,
             words: tuple[str, ...] = ()) -> Callable[[str], object]:
    """An argparse type: one integer (or comma-separated integers) of at least ``minimum``, or
    one of ``words`` as given."""
    what = ("integers separated by commas" if many else "an integer") + \
        (f" of at least {minimum}" if minimum else "")
    also = f"), or {' or '.join(map(repr, words))}" if words else ")"

    def parse(text: str):
        if text in words:
            return text
        try:
            values = [int(v) for v in text.split(",") if v.strip()] if many else [int(text)]
        except ValueError:
            values = []
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"{option} takes {what} (e.g. {example}{also}, "
                                             f"not {text!r}")
        return values if many else values[0]
    return parse


def model_kwargs(text: str) -> dict:
    """--model-kwargs: a JSON object of the model's keyword arguments (timm.create_model's,
    or a torchvision builder's)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        value = exc
    if not isinstance(value, dict):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise argparse.ArgumentTypeError(
            "--model-kwargs takes a JSON object of the model's options, e.g. "
            f"'{{\"global_pool\": \"max\"}}', not {shown!r}")
    return value


_MODEL_KWARGS = ("the model's options (timm.create_model's, or a torchvision builder's), e.g. "
                 "'{\"in_chans\": 1, \"output_stride\": 16}'")


def add_model(p: argparse.ArgumentParser) -> None:
    """The MODEL positional of the commands that build a model by name, with its options."""
    p.add_argument("model", help="a timm model name, e.g. resnet50, or torchvision/NAME for "
                   "torchvision's, e.g. torchvision/mobilenet_v2")
    add_model_kwargs(p)


def add_model_kwargs(p: argparse.ArgumentParser, help: str = _MODEL_KWARGS) -> None:
    p.add_argument("--model-kwargs", type=model_kwargs, default=None, metavar="JSON", help=help)


class _InputSize(argparse.Action):
    """--input-size: C H W for images, C L for 1-D signals, C T H W for video and volumes."""

    def __call__(self, parser, namespace, values, option_string=None):
        if not 2 <= len(values) <= 4 or any(v < 1 for v in values):
            parser.error(f"{option_string} takes C H W (an image), C L (a 1-D signal) or "
                         f"C T H W (video, a volume): 2 to 4 positive integers, not "
                         f"{' '.join(map(str, values))}")
        setattr(namespace, self.dest, tuple(values))


def add_input_size(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--input-size", nargs="+", type=int, default=None, metavar="N",
                   action=_InputSize,
                   help=f"input size {what}, without the batch: C H W (3 224 224), or C L for "
                        "a 1-D network, C T H W for a 3-D one (default: the model's config)")


def add_part(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", default=None, metavar="NAME",
                   help="only this submodule of the model, by its dotted name (a detector's "
                        "backbone, whose own forward takes a list of images)")


def add_leaf(p: argparse.ArgumentParser) -> None:
    p.add_argument("--leaf", nargs="+", default=(), metavar="CLASS",
                   help="module classes whose blocks stay ungated, by name (InceptionB) or "
                        "qualified name: apply()'s leaf_modules")


def leaf_advice(exc, args: argparse.Namespace):
    """An identity refusal that names a class to leave out, with the option that does it."""
    cls = getattr(exc, "leave_out", None)
    if cls is None:
        return exc
    leaves = " ".join([*args.leaf, cls])
    return type(exc)(f"{exc} On the command line: --leaf {leaves}, or --init paper.")


def model_label(args: argparse.Namespace) -> str:
    """The model as the command line named it, with its --part."""
    return args.model + (f" --part {args.part}" if args.part else "")


def input_size_of(args: argparse.Namespace, whole):
    """--input-size; for a --part without it, the size the model (``whole``) hands that
    part."""
    if args.input_size is not None or args.part is None:
        return args.input_size
    from ..api import handed_size
    return handed_size(whole, args.part)


@contextlib.contextmanager
def part_advice(part: str | None):
    """A trace failure of a whole model whose parts could be gated, with --part named."""
    from ..errors import TraceError
    try:
        yield
    except TraceError as exc:
        if part is not None or not exc.parts:
            raise
        raise TraceError(f"{exc} On the command line: --part {exc.parts[0]}.") from None


def _ratio(many: bool) -> Callable[[str], object]:
    """--ratio: an integer (several with commas where ``many``), or one per stage as
    STAGE:R pairs (2:16,3:16,4:8,5:8)."""
    plain = integers("--ratio", 1, "16,8,4" if many else "16", many=many)

    def parse(text: str):
        if ":" not in text:
            return plain(text)
        try:
            pairs = [tuple(int(v) for v in item.split(":")) for item in text.split(",")
                     if item.strip()]
            out = {k: r for k, r in pairs}
        except ValueError:
            out = {}
        if not out or any(k < 0 or r < 1 for k, r in out.items()):
            raise argparse.ArgumentTypeError(f"--ratio per stage takes STAGE:R pairs separated by "
                                             f"commas (e.g. 2:16,3:16,4:8,5:8), not {text!r}")
        return out
    return parse


RATIO = _ratio(many=False)
RATIOS = _ratio(many=True)


def add_variant_args(p: argparse.ArgumentParser) -> None:
    """The gate's options (se_inject.apply's position, gate, squeeze, excite, min_channels,
    divisor)."""
    g = p.add_argument_group("gate variant (paper Tables 11, 12, 14)")
    g.add_argument("--position", choices=("standard", "pre", "post", "identity"),
                   default="standard", help="where a residual block's gate goes (default: "
                   "standard, the residual branch before the sum)")
    g.add_argument("--gate", choices=("se", "eca", "ese"), default="se",
                   help="se (the paper's), eca, or ese (effective SE)")
    g.add_argument("--squeeze", choices=("avg", "max"), default="avg")
    g.add_argument("--excite", choices=("sigmoid", "hard_sigmoid", "tanh"), default=None,
                   help="default: sigmoid (hard_sigmoid for --gate ese)")
    g.add_argument("--min-channels", type=integers("--min-channels", 1, "8", many=False),
                   default=1, help="narrowest bottleneck (default 1)")
    g.add_argument("--divisor", type=integers("--divisor", 1, "8", many=False), default=1,
                   help="round the bottleneck width to a multiple of this (default 1: C // r)")


def variant_of(args: argparse.Namespace) -> dict:
    return {"position": args.position, "gate": args.gate, "squeeze": args.squeeze,
            "excite": args.excite, "min_channels": args.min_channels, "divisor": args.divisor}
STAGES = integers("--stages", 0, "2,3,4", many=True, words=("all", "all-but-last"))
