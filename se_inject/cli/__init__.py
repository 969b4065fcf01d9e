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

_COMMANDS = {"plan": plan_cmd, "report": report_cmd, "convert": convert_cmd,
             "strip": convert_cmd, "rules": rules_cmd}


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(prog="se-inject", description="Squeeze-and-Excitation gates for "
                                "CNNs that already exist.")
    p.add_argument("--version", action="version", version=f"se-inject {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in _COMMANDS.items():
        if name == "strip":
            mod.add_strip_parser(sub)
        else:
            mod.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # timm's import scripts a few helpers, which this torch announces as deprecated: not ours
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                            category=FutureWarning)
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command].run(args)
    except SEInjectError as exc:
        print(f"se-inject {args.command}: error: {exc}", file=sys.stderr)
        return 2
