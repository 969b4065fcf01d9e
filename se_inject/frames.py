"""What a module invocation (a Frame) did in the model's trace, independent of the model.

``local_keys`` names each node by where it sits in its own frame; ``fingerprints`` sums up a
frame's own nodes so that blocks whose forwards produced the same graph are rewritten with
one trace of the block instead of one trace each.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

import torch.fx as fx

from .trace import LOG, RETURNS, SCOPE, Call, Frame

__all__ = ["local_keys", "fingerprints", "block_calls", "layer_outputs"]

_CALLS = ("call_function", "call_method", "call_module")


def _relative(frame: Frame, node: fx.Node) -> Any:
    """The target of a node, relative to its frame (a block alone sees its child's name)."""
    if node.op == "call_module" and frame.qualname and node.target.startswith(frame.qualname + "."):
        return node.target[len(frame.qualname) + 1:]
    return node.target


def local_keys(graph: fx.Graph, rename: dict | None = None) -> dict[fx.Node, tuple]:
    """Each call node's (op, target, k): the k-th node with that op and target in its frame.

    The same key names the same node in a trace of the frame's module alone, whatever its
    children do, because a module's forward creates its own nodes in the same order.
    ``rename`` maps an (op, target) to the one it is counted as.
    """
    counts: dict[tuple, int] = defaultdict(int)
    keys = {}
    for node in graph.nodes:
        if node.op in _CALLS:
            frame = node.meta.get(SCOPE, Frame(""))
            ident = (node.op, _relative(frame, node))
            ident = rename.get(ident, ident) if rename else ident
            keys[node] = (*ident, counts[(frame, *ident)])
            counts[(frame, *ident)] += 1
    return keys


def block_calls(graph: fx.Graph) -> dict[str, list[Call]]:
    """Every recorded call of each (non-leaf) module, by qualified name."""
    out: dict[str, list[Call]] = defaultdict(list)
    for event in getattr(graph, LOG, ()):
        if isinstance(event, Call):
            out[event.frame.qualname].append(event)
    return out


_PLAIN = (bool, int, float, str, type(None))


def _output_leaf(value: Any, _) -> Any:
    if isinstance(value, fx.Node):
        return "tensor"
    return ("c", value) if isinstance(value, _PLAIN) else "other"


def layer_outputs(graph: fx.Graph, blocks: Iterable[str]) -> dict[str, dict[str, tuple]]:
    """For each of ``blocks``: what each layer its first call went into returned, by the
    layer's name relative to the block, one entry per call in order: the value's structure
    (see _shape), "tensor" at a traced value, ``("c", value)`` at None, a flag, a number or a
    string, "other" elsewhere. A trace of the block alone calls those layers whole, and sees
    their outputs as tensors. (One pass over the trace: each call counts for the innermost of
    ``blocks`` it is made in.)"""
    returns = getattr(graph, RETURNS, {})
    owner = {Frame(b, 0): b for b in blocks}
    out: dict[str, dict[str, list]] = {b: defaultdict(list) for b in owner.values()}
    for event in getattr(graph, LOG, ()):
        if not isinstance(event, Call):
            continue
        block = owner.get(event.parent)
        if block is None:
            continue
        if event.frame not in owner:
            owner[event.frame] = block
        prefix = block + "." if block else ""
        value = returns.get(event.frame, _output_leaf)  # (a layer that returned no record)
        out[block][event.frame.qualname[len(prefix):]].append(
            "other" if value is _output_leaf else _shape(value, _output_leaf))
    return {b: {name: tuple(calls) for name, calls in made.items()} for b, made in out.items()}


def _shape(value: Any, leaf, path: tuple = ()) -> Any:
    """``value``'s structure (lists, tuples, dicts) as nested tuples, ``leaf(x, path)`` at
    everything else."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_shape(v, leaf, (*path, i)) for i, v in enumerate(value)))
    if isinstance(value, dict):
        return ("dict", *((k, _shape(v, leaf, (*path, k))) for k, v in value.items()))
    return leaf(value, path)


def fingerprints(graph: fx.Graph, frames: set[Frame] | None = None) -> dict[Frame, tuple]:
    """For each frame (each of ``frames`` that ran, if given): how it was called, what it did,
    in order, and what it returned.

    A frame's events are its own call nodes (op, relative target, arguments) and the calls of
    its children (relative name, arguments). An argument made in the same frame is named by
    position, one made by a child by the child's relative name, one passed in by where it sits
    among the frame's own inputs; constants by their repr. Two invocations with equal
    fingerprints ran the same forward code on the same constants.
    """
    index: dict[fx.Node, int] = {}
    inputs: dict[Frame, dict[fx.Node, tuple]] = defaultdict(dict)
    called_with: dict[Frame, Any] = {}
    events: dict[Frame, list] = defaultdict(list)

    def token(frame: Frame, value: Any) -> Any:
        def leaf(a, _):
            if not isinstance(a, fx.Node):
                return ("c", repr(a))
            f = a.meta.get(SCOPE, Frame(""))
            if f == frame and a in index:
                return ("n", index[a])
            prefix = frame.qualname + "." if frame.qualname else ""
            if f.qualname.startswith(prefix) and f.qualname != frame.qualname:
                return ("child", f.qualname[len(prefix):])
            return ("in", inputs[frame].get(a))
        return _shape(value, leaf)

    def positions(value: Any, into: dict) -> Any:
        """Record where each Node sits in a call's arguments; return the call's shape."""
        def leaf(a, path):
            if isinstance(a, fx.Node):
                into.setdefault(a, path)
                return "tensor"
            return ("c", repr(a))
        return _shape(value, leaf)

    def wanted(frame: Frame) -> bool:  # a frame's fingerprint reads its own events only
        return frames is None or frame in frames

    for event in getattr(graph, LOG, ()):
        if isinstance(event, Call):
            parent = event.parent
            prefix = parent.qualname + "." if parent.qualname else ""
            if event.frame != parent and wanted(parent):  # the model's call has no parent
                events[parent].append(("call", event.frame.qualname[len(prefix):],
                                       token(parent, event.args), token(parent, event.kwargs)))
            if wanted(event.frame):
                called_with[event.frame] = positions((event.args, event.kwargs),
                                                     inputs[event.frame])
            continue
        node = event
        if node.op not in _CALLS:
            continue
        frame = node.meta.get(SCOPE, Frame(""))
        if not wanted(frame):
            continue
        index[node] = len(events[frame])
        events[frame].append((node.op, _relative(frame, node), token(frame, node.args),
                              token(frame, node.kwargs)))
    returns = getattr(graph, RETURNS, {})
    return {frame: (called_with.get(frame), tuple(ev), token(frame, returns.get(frame)))
            for frame, ev in events.items()}
