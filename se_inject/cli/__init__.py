"""The se-inject command line: ``main(argv) -> int``, one module per subcommand."""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from ..errors import SEInjectError
from . import convert as convert_cmd
from . import plan as plan_cmd
from . import report as report_cmd
from . import rules as rules_cmd

__all__ = ["main"]

# each registers its subcommand(s), with the function that runs them as the parser's default
_PARSERS = (plan_cmd.add_parser, report_cmd.add_parser, convert_cmd.add_parser,
            convert_cmd.add_strip_parser, rules_cmd.add_parser)


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(prog="se-inject", description="Squeeze-and-Excitation gates for "
                                "CNNs that already exist.")
    p.add_argument("--version", action="version", version=f"se-inject {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # timm's import scripts a few helpers, which this torch announces as deprecated: not ours
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning)
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except SEInjectError as exc:
        print(f"se-inject {args.command}: error: {exc}", file=sys.stderr)
        return 2
