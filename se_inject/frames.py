"""What a module invocation (a Frame) did in the model's trace, independent of the model.

``local_keys`` names each node by where it sits in its own frame; ``fingerprints`` sums up a
frame's own nodes so that blocks whose forwards produced the same graph are rewritten with
one trace of the block instead of one trace each.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch.fx as fx

from .trace import RETURNS, SCOPE, Frame

__all__ = ["local_keys", "fingerprints"]

_CALLS = ("call_function", "call_method", "call_module")


def _relative(frame: Frame, node: fx.Node) -> Any:
    """The target of a node, relative to its frame (a block alone sees its child's name)."""
    if node.op == "call_module" and frame.qualname and node.target.startswith(frame.qualname + "."):
        return node.target[len(frame.qualname) + 1:]
    return node.target


def local_keys(graph: fx.Graph) -> dict[fx.Node, tuple]:
    """Each call node's (op, target, k): the k-th node with that op and target in its frame.

    The same key names the same node in a trace of the frame's module alone, whatever its
    children do, because a module's forward creates its own nodes in the same order.
    """
    counts: dict[tuple, int] = defaultdict(int)
    keys = {}
    for node in graph.nodes:
        if node.op in _CALLS:
            frame = node.meta.get(SCOPE, Frame(""))
            ident = (node.op, _relative(frame, node))
            keys[node] = (*ident, counts[(frame, *ident)])
            counts[(frame, *ident)] += 1
    return keys


def fingerprints(graph: fx.Graph) -> dict[Frame, tuple]:
    """For each frame: its own call nodes (op, relative target, arguments) and what it returns.

    Arguments made in the same frame are named by position, those made by a child by the
    child's relative name, the rest as inputs; constants by their repr. Two invocations with
    equal fingerprints ran the same forward code on the same constants.
    """
    index: dict[fx.Node, int] = {}
    events: dict[Frame, list] = defaultdict(list)

    def token(frame: Frame, a: Any) -> Any:
        if isinstance(a, fx.Node):
            f = a.meta.get(SCOPE, Frame(""))
            if f == frame and a in index:
                return ("n", index[a])
            prefix = frame.qualname + "." if frame.qualname else ""
            if f.qualname.startswith(prefix) and f.qualname != frame.qualname:
                return ("child", f.qualname[len(prefix):])
            return ("in",)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, *(token(frame, v) for v in a))
        if isinstance(a, dict):
            return ("dict", *((k, token(frame, v)) for k, v in a.items()))
        return ("c", repr(a))

    for node in graph.nodes:
        if node.op not in _CALLS:
            continue
        frame = node.meta.get(SCOPE, Frame(""))
        index[node] = len(events[frame])
        events[frame].append((node.op, _relative(frame, node), token(frame, node.args),
                              token(frame, node.kwargs)))
    returns = getattr(graph, RETURNS, {})
    out = {}
    for frame, ev in events.items():
        out[frame] = (tuple(ev), token(frame, returns.get(frame)))
    return out
