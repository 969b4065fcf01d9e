"""Model names: timm's (``resnet50``) and torchvision's (``torchvision/resnet50``), built
without downloading weights."""
from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import re
import threading

from torch import nn

from .errors import InvalidArgumentError

__all__ = ["TORCHVISION", "aux_kwargs", "check_name", "check_part", "classes_named", "create",
           "describe", "in_chans_for", "in_chans_of", "input_width", "last_layer", "layout",
           "library_of", "part_of", "skeleton", "torchvision_name"]

TORCHVISION = "torchvision/"  # a name in torchvision.models.list_models() behind this prefix


def library_of(name: str) -> tuple[str, str]:
    """("torchvision", "resnet50") for "torchvision/resnet50"; ("timm", name) otherwise."""
    if name.startswith(TORCHVISION):
        return "torchvision", name[len(TORCHVISION):]
    return "timm", name


def describe(name: str) -> str:
    """"timm's resnet50" or "torchvision's resnet50", for messages."""
    library, arch = library_of(name)
    return f"{library}'s {arch}"


def _torchvision_names() -> list[str]:
    from torchvision import models
    return list(models.list_models())


def check_name(name: str) -> None:
    """Raise InvalidArgumentError, with close matches, unless timm (or, behind the
    ``torchvision/`` prefix, torchvision) knows ``name``."""
    library, arch = library_of(name)
    if library == "torchvision":
        known = _torchvision_names()
        if arch not in known:
            close = difflib.get_close_matches(arch, known, n=4, cutoff=0.6)
            hint = f" Did you mean: {', '.join(TORCHVISION + c for c in close)}?" if close else \
                " See torchvision.models.list_models() for the names."
            raise InvalidArgumentError(f"unknown torchvision model {arch!r}.{hint}")
        return
    import timm
    if not timm.is_model(name):
        hub = re.match(r"^(?:hf[-_]hub:)?[\w.-]+/([\w.-]+)$", name)
        if hub and timm.is_model(hub.group(1)):  # "hf-hub:timm/resnet50.a1_in1k"
            raise InvalidArgumentError(
                f"unknown model {name!r}: se-inject builds models by architecture name, with "
                f"random weights, and reads nothing from the Hugging Face Hub; name it "
                f"{hub.group(1)}, then load the weights from a checkpoint (se-inject convert "
                f"CHECKPOINT --model {hub.group(1)})")
        close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else \
            " See timm.list_models() for the names."
        if name in _torchvision_names():
            hint = f" For torchvision's, name it {TORCHVISION}{name}." + (hint if close else "")
        raise InvalidArgumentError(f"unknown model {name!r}.{hint}")


# timm.create_model's options that load weights (from the hub, a URL or a file)
_TIMM_LOADS = ("pretrained", "checkpoint_path")


def create(name: str, **kwargs) -> nn.Module:
    """A timm or torchvision model by name with random weights (nothing is downloaded: for
    torchvision's, neither the model's weights nor its backbone's)."""
    check_name(name)
    library, arch = library_of(name)
    try:
        if library == "torchvision":
            from torchvision import models
            builder = models.get_model_builder(arch)
            if "weights_backbone" in inspect.signature(builder).parameters:
                kwargs = {"weights_backbone": None, **kwargs}
            if kwargs.get("weights") is not None or kwargs.get("weights_backbone") is not None:
                raise InvalidArgumentError(f"{name}: se-inject builds models with random "
                                           "weights; load trained ones from a checkpoint")
            return builder(**{**kwargs, "weights": None})
        loads = [k for k in _TIMM_LOADS if kwargs.get(k) not in (None, False, "")]
        if loads:  # (a recipe in a file could otherwise name any file on the machine)
            raise InvalidArgumentError(f"{name}: se-inject builds models with random weights, "
                                       f"so {loads[0]}={kwargs[loads[0]]!r} is not taken; load "
                                       "trained ones from a checkpoint")
        import timm
        return timm.create_model(name, **{**kwargs, "pretrained": False})
    except (TypeError, ValueError) as exc:  # an option the architecture does not take
        if not kwargs or isinstance(exc, InvalidArgumentError):
            raise
        raise InvalidArgumentError(f"{library} could not build {arch!r} with {kwargs}: "
                                   f"{exc}") from None


def check_part(name) -> None:
    """Refuse a part name that is not a submodule's dotted name."""
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"part must be a submodule's dotted name ('layer2', "
                                   f"'backbone.body'), not {name!r}")


def part_of(model: nn.Module, name: str | None, label: str, option: str = "") -> nn.Module:
    """The submodule ``name`` of ``model`` (the model itself for None), or an
    InvalidArgumentError that lists the model's children (and names the ``option`` that gave
    ``name``)."""
    if name is None:
        return model
    check_part(name)
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = ", ".join(n for n, _ in model.named_children()) or "none"
        raise InvalidArgumentError(f"{label} has no submodule {name!r}{option}; its "
                                   f"children: {children}") from None


def qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def classes_named(model: nn.Module, names, option: str) -> tuple[type, ...]:
    """The classes of ``model``'s modules that ``names`` name, by class name (``InceptionB``)
    or qualified name (``timm.models.inception_v3.InceptionB``); classes given as classes pass
    as they are. Nothing is imported: a name must be the class of one of the model's modules.
    ``option`` names the argument in messages."""
    if isinstance(names, (str, type)):
        names = [names]
    held = {type(m) for m in model.modules()}
    out = []
    for name in names:
        if isinstance(name, type):
            out.append(name)
            continue
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"{option} takes module classes or their names, not "
                                       f"{name!r}")
        found = sorted((c for c in held if name in (c.__name__, qualified(c))), key=qualified)
        if len(found) > 1:
            raise InvalidArgumentError(
                f"{option} {name!r} names {len(found)} classes of the model: "
                f"{', '.join(map(qualified, found))}; give the one meant by its qualified name")
        if not found:
            own = sorted({c.__name__ for c in held if not c.__module__.startswith("torch.")})
            close = difflib.get_close_matches(name, own, n=4, cutoff=0.6)
            hint = f" Did you mean: {', '.join(close)}?" if close else \
                f" Its module classes: {', '.join(own[:12])}{', ...' if len(own) > 12 else ''}."
            raise InvalidArgumentError(f"{option} {name!r}: no module of "
                                       f"{type(model).__name__} is of that class.{hint}")
        out.append(found[0])
    return tuple(out)


def skeleton(name: str, **kwargs) -> nn.Module:
    """The model ``name`` with its parameters and buffers on the meta device, to compare names,
    shapes and layers (never to run): built on the meta device; where the constructor computes
    with tensors it makes (torchvision's RegNets size their stages with ``torch.arange``), built
    on the CPU with each parameter and buffer moved to the meta device as it is registered, so
    that nothing is initialised or kept (_registered_on_meta: only this thread's registrations
    move). Raises what the constructor raises."""
    import torch
    try:
        with torch.device("meta"):
            return create(name, **kwargs)
    except InvalidArgumentError:
        raise
    except Exception:  # a constructor that computes with its tensors
        pass
    with _registered_on_meta():
        return create(name, **kwargs)


_ON_META: dict[int, int] = {}  # thread id -> depth of _registered_on_meta in that thread
_ON_META_LOCK = threading.Lock()
_REGISTER: list = []  # nn.Module's registration methods as the first thread in found them


def _register_parameter(self, name, param):
    if param is not None and not param.is_meta and threading.get_ident() in _ON_META:
        param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
    _REGISTER[0](self, name, param)


def _register_buffer(self, name, tensor, persistent=True):
    if tensor is not None and not tensor.is_meta and threading.get_ident() in _ON_META:
        tensor = tensor.to("meta")
    _REGISTER[1](self, name, tensor, persistent)


@contextlib.contextmanager
def _registered_on_meta():
    """While it lasts, every parameter and buffer a module registers in this thread goes to
    the meta device. nn.Module's registration is patched process-wide, from the first thread
    that enters to the last that leaves, but the patch moves only the registrations of the
    threads inside: a model another thread builds meanwhile keeps its weights."""
    me = threading.get_ident()
    with _ON_META_LOCK:
        if not _ON_META:
            _REGISTER[:] = nn.Module.register_parameter, nn.Module.register_buffer
            nn.Module.register_parameter = _register_parameter
            nn.Module.register_buffer = _register_buffer
        _ON_META[me] = _ON_META.get(me, 0) + 1
    try:
        yield
    finally:
        with _ON_META_LOCK:
            _ON_META[me] -= 1
            if not _ON_META[me]:
                del _ON_META[me]
            if not _ON_META:
                nn.Module.register_parameter, nn.Module.register_buffer = _REGISTER


def aux_kwargs(ref: nn.Module, present: set[str]) -> dict:
    """The options that give a torchvision model ``ref`` (built as its builder does by default)
    the auxiliary heads whose top-level names are ``present``: ``aux_loss=True`` for a
    segmentation model's ``aux_classifier``, ``aux_logits=False`` for an Inception-v3 or
    GoogLeNet without its auxiliary classifiers."""
    return _aux_from_heads(_heads(ref), present)


def _heads(model: nn.Module) -> frozenset[str]:
    """The names of ``model``'s children that hold parameters."""
    return frozenset(n for n, c in model.named_children() if any(True for _ in c.parameters()))


@functools.lru_cache(maxsize=256)
def _layout_of(name: str, kwargs: tuple) -> tuple[type, dict, frozenset] | None:
    """The class, parameter and buffer shapes and heads (_heads) of the model ``name`` built
    with ``kwargs`` (on the meta device), or None where it cannot be built so. Kept: save()
    looks for a torchvision model's builder at every call, and a training loop saves often."""
    try:
        ref = skeleton(name, **dict(kwargs))
    except Exception:  # a builder that needs other options
        return None
    return type(ref), {k: tuple(v.shape) for k, v in ref.state_dict().items()}, _heads(ref)


def _aux_from_heads(own: frozenset[str], present: set[str]) -> dict:
    """aux_kwargs, from the heads (_heads) of the default model."""
    out = {}
    if "aux_classifier" in present and "aux_classifier" not in own:
        out["aux_loss"] = True
    aux = [n for n in own if n.lower().startswith("aux")]
    if aux and not any(n in present for n in aux):
        out["aux_logits"] = False
    return out


def layout(m: nn.Module) -> str:
    """What a layer's class and settings say of it (a layer's repr without its children's)."""
    if not m._modules:
        return repr(m)
    extra = m.extra_repr()
    return f"{type(m).__name__}({extra})" if extra else type(m).__name__


@functools.lru_cache(maxsize=64)
def _layouts_of(name: str, kwargs: tuple) -> dict[str, str]:
    """Each module's layout (see ``layout``) in the model ``name`` built with ``kwargs``."""
    return {n: layout(m) for n, m in skeleton(name, **dict(kwargs)).named_modules()}


def last_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The name and module of ``model``'s last linear or 2-D convolution: a torchvision
    model's classifier (its width is the number of classes)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1] if layers else None


def torchvision_name(model: nn.Module, skip: str = "\0") -> tuple[str, dict] | None:
    """(``torchvision/NAME``, kwargs) for a model built by one of torchvision's builders,
    found by building each builder of the model's class on the meta device (as it is, or with
    the model's number of classes: ``num_classes`` in kwargs) and comparing parameter and
    buffer shapes; None where no builder or several give them. Keys containing ``skip`` (a
    gate's) are left out of the comparison."""
    cls = type(model)
    if not cls.__module__.startswith("torchvision.models."):
        return None
    from torchvision import models
    own = {k: tuple(v.shape) for k, v in model.state_dict().items() if skip not in k}
    present = _heads(model)
    last = last_layer(model)
    width = last[1].weight.shape[0] if last else None
    found = []
    for arch in _torchvision_names():
        builder = models.get_model_builder(arch)
        if builder.__module__ != cls.__module__:
            continue
        default = _layout_of(TORCHVISION + arch, ())
        if default is None:  # a builder that needs options
            continue
        aux = _aux_from_heads(default[2], present)
        for kwargs in ({**aux}, {**aux, "num_classes": width}) if width else ({**aux},):
            built = _layout_of(TORCHVISION + arch, tuple(sorted(kwargs.items())))
            if built is not None and built[0] is cls and built[1] == own:
                found.append((TORCHVISION + arch, kwargs))
                break
    if len(found) > 1:  # builders of one layout of weights with other settings (a detector's
        # input sizes: fasterrcnn_mobilenet_v3_large_fpn and its _320_ twin): by the layers'
        mine = {n: layout(m) for n, m in model.named_modules() if skip not in n}
        found = [(arch, kwargs) for arch, kwargs in found
                 if _layouts_of(arch, tuple(sorted(kwargs.items()))) == mine]
    return found[0] if len(found) == 1 else None


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
