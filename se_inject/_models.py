"""Model names: timm names, built without downloading weights."""
from __future__ import annotations

import difflib

from torch import nn

from .errors import InvalidArgumentError

__all__ = ["check_name", "create"]


def check_name(name: str) -> None:
    """Raise InvalidArgumentError, with close matches, unless timm knows ``name``."""
    import timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else \
            " See timm.list_models() for the names."
        raise InvalidArgumentError(f"unknown model {name!r}.{hint}")


def create(name: str, **kwargs) -> nn.Module:
    """A timm model by name with random weights (nothing is downloaded)."""
    import timm
    check_name(name)
    return timm.create_model(name, pretrained=False, **kwargs)
