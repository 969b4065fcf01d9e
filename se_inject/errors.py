"""The errors se-inject raises on purpose: one base class, one subclass per cause."""
from __future__ import annotations

import pickle

__all__ = [
    "SEInjectError",
    "InvalidArgumentError",
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
    """torch.fx could not trace the model, or shapes could not be propagated through it."""


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
