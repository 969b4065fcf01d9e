"""A gate's layers, made without the cost of their constructors.

An SE gate holds two ``nn.Conv2d`` and two activation modules. Each constructor costs about
50 µs here, most of it assignments through ``nn.Module.__setattr__`` (13 for a convolution,
each checking its value against the module's tables of parameters, buffers and submodules):
0.15 ms a gate, 26 ms for HRNet-W18's 177. ``fresh(cls, ...)`` gives a module of ``cls``
with the attributes its constructor gave a template made once with the same arguments, and
containers (buffers, submodules, hooks) of its own; ``conv1x1`` gives a convolution made so new
parameters, initialised as ``nn.Conv2d`` initialises its own (``reset_parameters``).

Where something watches modules being made, the constructors run as usual: torch's global
registration hooks, or a constructor or ``register_parameter`` that is not the one this
module saw at import (a library that replaced it to place parameters itself).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module

__all__ = ["fresh", "conv1x1"]

_CONSTRUCTORS = {cls: cls.__init__ for cls in
                 (nn.Module, nn.Conv2d, nn.ReLU, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)}
_REGISTER = nn.Module.register_parameter
_HOOKS = ("_global_module_registration_hooks", "_global_parameter_registration_hooks",
          "_global_buffer_registration_hooks")
# (class, arguments) -> the template's attributes, and the names of those that are containers
_TEMPLATES: dict[tuple, tuple[dict, tuple[str, ...]]] = {}


def _watched(cls: type) -> bool:
    return (any(getattr(_module, h, None) for h in _HOOKS)
            or nn.Module.register_parameter is not _REGISTER
            or nn.Module.__init__ is not _CONSTRUCTORS[nn.Module]
            or cls.__init__ is not _CONSTRUCTORS[cls])


def _copy(cls: type[nn.Module], args: tuple, kwargs: dict) -> nn.Module:
    key = (cls, args, tuple(sorted(kwargs.items())))
    made = _TEMPLATES.get(key)
    if made is None:
        attrs = cls(*args, **kwargs).__dict__
        made = _TEMPLATES[key] = attrs, tuple(k for k, v in attrs.items()
                                               if isinstance(v, (dict, set, list)))
    attrs, containers = made
    new = object.__new__(cls)
    d = attrs.copy()
    for k in containers:
        d[k] = d[k].copy()
    object.__setattr__(new, "__dict__", d)
    return new


_WITHOUT_PARAMETERS = (nn.ReLU, nn.Sigmoid, nn.Hardsigmoid, nn.Tanh)


def fresh(cls: type[nn.Module], *args, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` for one of the parameter-free layers a gate holds (``nn.ReLU``,
    ``nn.Sigmoid``, ``nn.Hardsigmoid``, ``nn.Tanh``); any other class is constructed (a copy
    would share the template's parameters: ``conv1x1`` gives a convolution its own)."""
    if cls not in _WITHOUT_PARAMETERS or _watched(cls):
        return cls(*args, **kwargs)
    return _copy(cls, args, kwargs)


def conv1x1(in_channels: int, out_channels: int, *, device=None,
            dtype=None) -> nn.Conv2d:
    """``nn.Conv2d(in_channels, out_channels, kernel_size=1)``: the same attributes, and weights
    drawn as its constructor draws them, from the same random numbers."""
    if _watched(nn.Conv2d):
        return nn.Conv2d(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype)
    # (its template made on the meta device, which draws no random numbers: a gate made first
    # in a process draws the same numbers as every later one)
    conv = _copy(nn.Conv2d, (1, 1), {"kernel_size": 1, "device": "meta"})
    d = conv.__dict__
    d["in_channels"], d["out_channels"] = in_channels, out_channels
    params = d["_parameters"]
    params["weight"] = nn.Parameter(torch.empty((out_channels, in_channels, 1, 1),
                                                device=device, dtype=dtype))
    params["bias"] = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype))
    conv.reset_parameters()
    return conv
