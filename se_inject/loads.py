"""What a gated model does with a state_dict that holds none of a gate's tensors: the plain
model's checkpoint, loaded with ``strict=False`` after ``apply()`` (fine-tuning a pretrained
backbone with new gates).

- A gate made on the meta device (``with torch.device("meta")``, then ``to_empty()``) has no
  values: ``to_empty()`` gives it uninitialised memory. Such a gate keeps the initialisation
  ``apply()`` was asked for (``pending_init``) until a state_dict gives it values; one that
  holds none of its tensors gets that initialisation as it loads.
- Identity-initialised gates (see se_inject.identity): the layers scaled for a gate hold twice
  the plain model's values; a checkpoint without that gate's tensors has its values for those
  layers doubled as they load, so that the model computes what the checkpoint's plain model
  does.

A checkpoint that holds a gate's tensors (one saved from the gated model) loads as it is. Both
run in one load_state_dict pre-hook on the model (kept through deepcopy and pickling, taken off
by ``remove()``); the caller's dict is not changed (load_state_dict hands hooks a copy).
"""
from __future__ import annotations

import torch
from torch import nn

from .gate import ChannelGate
from .identity import FACTOR

__all__ = ["mark_uninitialised", "watch_plain_loads", "unwatch_plain_loads"]


def mark_uninitialised(gate: ChannelGate, init: str) -> bool:
    """Record that ``gate`` (made on the meta device) still needs its ``init``; whether it
    does."""
    if any(t.is_meta for t in gate.parameters()):
        gate.pending_init = init
        return True
    return False


def _plain_loads(model: nn.Module, state_dict: dict, prefix: str, local_metadata: dict,
                 *args) -> None:
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    for name, gate in model.named_modules():
        if not isinstance(gate, ChannelGate):
            continue
        pending = getattr(gate, "pending_init", None)
        compensated = getattr(gate, "compensated", None)
        if not pending and not compensated:
            continue
        own = f"{prefix}{name}."
        if any(k.startswith(own) for k in state_dict):
            if pending and (assign or not any(t.is_meta for t in gate.parameters())):
                del gate.pending_init  # the checkpoint's values replace the gate's
            continue
        if pending and not any(t.is_meta for t in gate.parameters()):
            gate.initialise(pending)
            del gate.pending_init
        for p in compensated or ():
            v = state_dict.get(prefix + p)
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                state_dict[prefix + p] = v * FACTOR


def _ours(hook) -> bool:
    return getattr(hook, "hook", hook) is _plain_loads


def watch_plain_loads(model: nn.Module) -> None:
    if not any(map(_ours, model._load_state_dict_pre_hooks.values())):
        model.register_load_state_dict_pre_hook(_plain_loads)


def unwatch_plain_loads(model: nn.Module) -> None:
    """Take the hook off ``model`` and off each submodule that apply() was given."""
    for m in model.modules():
        for k in [k for k, h in m._load_state_dict_pre_hooks.items() if _ours(h)]:
            del m._load_state_dict_pre_hooks[k]
