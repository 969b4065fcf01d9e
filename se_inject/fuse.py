"""The fused fast path: the gated model compiled in place with torch.compile (Inductor: C++ on
CPU, Triton on GPU). Inductor turns each gate into two passes over the gated tensor: the squeeze
(a mean: in the pass of the norm before it, or a pass of its own where freezing has folded that
norm into its convolution) and one kernel that applies the excitation, scales, adds the shortcut
and runs the block's activation. Frozen on the CPU, a gate on a 1x1 convolution and a norm takes
that mean from the convolution's input where that reads fewer bytes
(se_inject.gate.mean_through_linear): one pass over the gated tensor (on a GPU its extra kernels
cost more than that saves). The excitation's two small layers are generated code rather than
calls to a matrix library (se_inject.gate._excitation_fc): on the CPU, C++ inside those kernels;
on a GPU, Triton reductions. Frozen on the CPU, a gate sums its pixels in chunks
(se_inject.gate.squeeze_in_chunks), one parallel loop over whole pixels rather than one per
block of channels."""
from __future__ import annotations

import functools

from torch import nn

from .errors import InvalidArgumentError, check_module, checks_arguments
from .gate import FROZEN, ChannelGate
from .trace import compiled_in_place

__all__ = ["fuse", "unfuse", "fused_settings"]

_FUSED = "_se_inject_fused"


@checks_arguments
def fuse(model: nn.Module, *, freeze: bool = False, mode: str | None = None,
         dynamic: bool | None = None, backend: str = "inductor",
         options: dict | None = None) -> nn.Module:
    """Compile ``model`` in place (``nn.Module.compile``) and return it: the same object, its
    class, methods and state_dict keys unchanged (no ``_orig_mod.`` prefix). The first call
    for each input shape compiles (seconds to minutes); later calls run the compiled code.

    freeze: for inference (eval mode, under ``torch.no_grad()``): Inductor's freezing treats
        the weights as constants, folds each norm into its convolution (and a residual sum
        into the convolution before it where no gate scales that branch) and lays weights out
        once instead of at every call; Inductor's channels-last layout optimisation stays off
        (see below). On the CPU, a gate on ``norm(conv1x1(h))`` averages ``h`` through the
        two layers where that reads less than the gated tensor (gate.mean_through_linear), and
        the squeeze sums equal chunks of pixels, then the chunks (gate.squeeze_in_chunks).
        The compiled code keeps the weights it saw: call ``fuse(model, freeze=True)`` again
        after loading new weights. Dynamo would reuse the code compiled before for the same
        model object, as its guards check the weights' identity, not their values; so
        freezing drops what Dynamo has compiled for the forward functions of the model's
        module classes, and other models of those classes compile again on their next call.
        Training steps are compiled as without it.
    Other args are torch.compile's. ``mode="max-autotune"`` searches kernel settings on GPU;
    ``options={"cpp_wrapper": True}`` calls the kernels from C++ rather than Python, which
    matters at batch 1, where each call costs about as much as a small kernel (compiling
    takes longer).
    Outputs equal the eager model's up to floating-point reassociation in the fused kernels
    (README.md, "Fused fast path", gives the measured differences).
    """
    check_module(model, "fuse")
    if not isinstance(freeze, bool):
        raise InvalidArgumentError(f"freeze must be True or False, not {freeze!r}")
    if mode is not None and (options is not None or freeze):
        raise InvalidArgumentError("torch.compile takes mode or options (freeze is one), not "
                                   "both")
    if options is not None and not isinstance(options, dict):
        raise InvalidArgumentError(f"options must be a dict of Inductor's settings, e.g. "
                                   f"{{'cpp_wrapper': True}}; got {options!r}")
    # Inductor's layout optimisation (feature maps turned channels-last): on a gated
    # Inception-v3 at batch 8 (torch 2.15, CPU) frozen outputs were 8e-5 off with it and 2e-5
    # without; it gave ResNet-50 no speed here.
    frozen = {"freezing": True, "layout_optimization": False} if freeze else {}
    compile_options = {**frozen, **(options or {})} or None
    _check_compile_arguments(backend, mode, dynamic, compile_options)
    unfuse(model)
    if freeze:
        _drop_compiled_code(model)
        for gate in _gates(model):
            gate.__dict__[FROZEN] = True
    model.compile(backend=backend, mode=mode, dynamic=dynamic, options=compile_options)
    if freeze:
        model._compiled_call_impl = _with_freezing(model._compiled_call_impl)
    model.__dict__[_FUSED] = {"freeze": freeze, "backend": backend, "mode": mode,
                              "dynamic": dynamic, "options": options}
    return model


def _nothing() -> None:
    """What torch.compile is given to check its arguments with (never called)."""


def _check_compile_arguments(backend, mode, dynamic, options) -> None:
    """torch.compile's own checks of its arguments, which it makes when it is called (an
    unknown mode, backend or Inductor option), made on a function of nothing, before the
    model changes."""
    import torch

    if dynamic is not None and not isinstance(dynamic, bool):
        raise InvalidArgumentError(f"dynamic must be True, False or None, not {dynamic!r}")
    try:
        torch.compile(_nothing, backend=backend, mode=mode, dynamic=dynamic, options=options)
    except Exception as exc:  # torch's own refusal, in its words
        raise InvalidArgumentError(f"torch.compile refused backend={backend!r}, mode={mode!r}, "
                                   f"options={options!r}: {type(exc).__name__}: "
                                   f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _drop_compiled_code(model: nn.Module) -> None:
    """Forget Dynamo's compiled code for the forward functions of ``model``'s modules, and for
    the functions Dynamo generated to resume them after a graph break. Where this torch lacks
    the Dynamo internals used, all compiled code is forgotten (torch.compiler.reset())."""
    try:
        from torch._dynamo.eval_frame import reset_code
        from torch._dynamo.resume_execution import ContinueExecutionCache
    except ImportError:
        import torch

        torch.compiler.reset()
        return
    codes = {getattr(getattr(m.forward, "__func__", m.forward), "__code__", None)
             for m in model.modules()} - {None}
    todo = list(codes)
    while todo:
        for resumed in ContinueExecutionCache.cache.get(todo.pop(), {}).values():
            if resumed not in codes:
                codes.add(resumed)
                todo.append(resumed)
    for code in codes:
        reset_code(code)


def _with_freezing(compiled):
    """``compiled``, called with Inductor's ``freezing`` setting on.

    torch.compile's ``options`` reach Inductor only when it compiles a graph, but Dynamo reads
    ``freezing`` earlier, while it traces (inside the first call): only then does it keep the
    weights as attributes of the graph, which freezing turns into constants. Without this the
    weights stay graph inputs and nothing is frozen or folded."""
    from torch._inductor import config

    @functools.wraps(compiled)
    def call(*args, **kwargs):
        with config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


def fused_settings(model: nn.Module) -> dict | None:
    """The arguments fuse() was called with, or None for a model it did not compile. A model
    loaded from a pickle of a fused one is not compiled: nn.Module leaves its compiled call
    out of a pickle (call fuse() again)."""
    if not compiled_in_place(model):
        return None
    return model.__dict__.get(_FUSED)


@checks_arguments
def unfuse(model: nn.Module) -> nn.Module:
    """Back to eager execution (what fuse() did, undone)."""
    check_module(model, "unfuse")
    if model.__dict__.pop(_FUSED, None) is not None:
        model._compiled_call_impl = None
        for gate in _gates(model):
            gate.__dict__.pop(FROZEN, None)
    return model


def _gates(model: nn.Module):
    return (m for m in model.modules() if isinstance(m, ChannelGate))
