"""Argument types shared by the subcommands."""
from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["integers", "RATIO", "RATIOS", "STAGES"]


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


RATIO = integers("--ratio", 1, "16", many=False)
RATIOS = integers("--ratio", 1, "16,8,4", many=True)
STAGES = integers("--stages", 0, "2,3,4", many=True, words=("all", "all-but-last"))
