"""The se-inject command line: ``main(argv) -> int``, one module per subcommand."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from ..errors import SEInjectError
from . import plan as plan_cmd
from . import rules as rules_cmd

__all__ = ["main"]

_COMMANDS = {"plan": plan_cmd, "rules": rules_cmd}


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(prog="se-inject", description="Squeeze-and-Excitation gates for "
                                "CNNs that already exist.")
    p.add_argument("--version", action="version", version=f"se-inject {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, mod in _COMMANDS.items():
        mod.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _COMMANDS[args.command].run(args)
    except SEInjectError as exc:
        print(f"se-inject {args.command}: error: {exc}", file=sys.stderr)
        return 2
