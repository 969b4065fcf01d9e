"""The errors se-inject raises on purpose: one base class, one subclass per cause."""
from __future__ import annotations

import difflib
import functools
import inspect
import os
import pickle
import sys
import warnings
from typing import Callable, TypeVar

__all__ = [
    "SEInjectError",
    "InvalidArgumentError",
    "ArgumentNameError",
    "RuleError",
    "TraceError",
    "NoSitesError",
    "RewriteError",
    "NotGatedError",
    "BlockChangedError",
    "NotPicklableError",
]


class SEInjectError(Exception):
    """Base class of every error se-inject raises deliberately.

    Catch this one to handle any refusal of the library; the model or file involved is
    left exactly as it was whenever one is raised.
    """


class InvalidArgumentError(SEInjectError, ValueError):
    """An argument of a public call has the wrong type or value."""


class ArgumentNameError(InvalidArgumentError, TypeError):
    """A public call got an argument it does not take (a misspelt keyword, a positional
    argument too many) or lacks one it needs. Also a TypeError, which Python itself raises
    for such calls."""


_F = TypeVar("_F", bound=Callable)
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """warnings.warn, attributed to the first caller outside se-inject: the line of the user's
    code that called apply(), load() or convert(), however deep inside se-inject (and its
    argument checks) the warning arises, so that it shows there and filters by that module."""
    level, frame = 2, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def checks_arguments(fn: _F) -> _F:
    """``fn`` raising ArgumentNameError, which names close matches, instead of Python's
    TypeError when a call's arguments do not fit its signature. Arguments are bound before
    ``fn`` runs, so nothing has happened when it is raised."""
    sig = inspect.signature(fn)
    names = [p.name for p in sig.parameters.values()
             if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise ArgumentNameError(misfit(fn.__name__, str(exc), kwargs, names)) from None
        return fn(*args, **kwargs)
    return call  # type: ignore[return-value]


def check_module(value, call: str, error: type | None = None) -> None:
    """Raise ``error`` (InvalidArgumentError by default) unless ``value``, the model given to
    ``call``, is an nn.Module."""
    from torch import nn
    if not isinstance(value, nn.Module):
        raise (error or InvalidArgumentError)(f"{call}() takes an nn.Module, not "
                                              f"{type(value).__name__}")


def misfit(name: str, why: str, kwargs: dict, names: list[str]) -> str:
    """The message for a call of ``name`` whose arguments do not fit (``why``, Python's
    words): the options closest to each keyword it does not take, and the ones it does."""
    hints = []
    for key in kwargs:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2, cutoff=0.6)
            if close:
                hints.append(f"{key!r}: did you mean {' or '.join(map(repr, close))}?")
    return (f"{name}(): {why}. " + (" ".join(hints) + " " if hints else "") +
            f"{name}() takes: {', '.join(names)}")


class RuleError(SEInjectError, ValueError):
    """A rule file is malformed, unknown or fails the schema.

    ``path``, ``line`` (1-based, or None) and ``key`` say where.
    """

    def __init__(self, message: str, path: str | None = None, line: int | None = None,
                 key: str | None = None):
        where = ""
        if path is not None:
            where = str(path) + (f":{line}" if line is not None else "")
            where += f": {key}: " if key else ": "
        super().__init__(where + message)
        self.path, self.line, self.key = path, line, key


class TraceError(SEInjectError):
    """torch.fx could not trace the model, or shapes could not be propagated through it.

    ``parts``: where the model's own forward failed, the names of its children that hold
    convolutions, largest first (a detector's backbone), to gate instead; else empty.
    """

    parts: tuple[str, ...] = ()


class NoSitesError(SEInjectError):
    """The rules matched no block of the model."""


class RewriteError(SEInjectError):
    """A block's forward could not be rewritten to hold its gate."""


class NotGatedError(SEInjectError):
    """remove() was asked to take gates out of a model that holds none."""


class BlockChangedError(SEInjectError):
    """A gated block was called after an attribute its forward reads had changed (a
    re-parameterisation, a flag set by hand): its gated forward no longer matches it."""


class NotPicklableError(SEInjectError, pickle.PicklingError):
    """A gated model could not be pickled whole (``torch.save(model)``): a function its
    generated forward calls cannot be imported by name where the pickle is loaded."""
