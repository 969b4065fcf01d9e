"""Model names: timm names, built without downloading weights."""
from __future__ import annotations

import difflib

from torch import nn

from .errors import InvalidArgumentError

__all__ = ["check_name", "create", "in_chans_for", "in_chans_of", "input_width"]


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
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as exc:  # an option the architecture does not take
        if not kwargs:
            raise
        raise InvalidArgumentError(f"timm could not build {name!r} with {kwargs}: {exc}") from None


def in_chans_for(name: str, first: str, width: int) -> int | None:
    """The ``in_chans`` with which timm builds ``name`` so that its first layer (``first``, its
    pretrained_cfg's first_conv) takes ``width`` channels: None where that is the model's
    default; else ``width`` itself for most models, a fraction of it where the stem folds pixels
    into channels before its first convolution (TResNet's space-to-depth: 16 × in_chans);
    ``width`` where no whole number fits or the default model cannot be built to compare with."""
    import timm
    import torch
    cfg = timm.get_pretrained_cfg(name)
    size = getattr(cfg, "input_size", None) if cfg is not None else None
    default = int(size[0]) if size else 3
    if width == default:
        return None
    try:
        with torch.device("meta"):
            ref = create(name).get_submodule(first)
    except Exception:  # a constructor that computes with its tensors, or no such layer
        return width
    taken = input_width(ref)
    if taken is None or taken % default or width % (taken // default):
        return width
    return width // (taken // default)


def input_width(layer: nn.Module) -> int | None:
    """The channels a first layer takes (a convolution's, or a patch embedding's linear)."""
    for attr in ("in_channels", "in_features"):
        if isinstance(getattr(layer, attr, None), int):
            return getattr(layer, attr)
    return None


def in_chans_of(model: nn.Module) -> int | None:
    """The in_chans a timm model was built with, read from its first layer (its config's
    first_conv); None where the config names no such layer of the model."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    first, arch = cfg.get("first_conv"), cfg.get("architecture")
    if not isinstance(first, str) or not arch:
        return None
    try:
        width = input_width(model.get_submodule(first))
    except AttributeError:
        return None
    return None if width is None else in_chans_for(arch, first, width) or width
