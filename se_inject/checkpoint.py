"""Checkpoints: read plain ones safely, convert them into SE checkpoints that carry their recipe,
save and load those, and strip the gates again.

Reading never runs pickled code: safetensors first, ``torch.load(weights_only=True)`` otherwise.
Writing goes to a temporary file in the target's folder that is renamed into place only when
complete, never over the input, and never over an existing file unless ``force``.
"""
from __future__ import annotations

import argparse
import errno
import json
import os
import pickle
import re
import struct
import sys
import time
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._files import atomic_write
from ._models import (TORCHVISION, aux_kwargs, check_name, check_part, classes_named, create,
                      describe, in_chans_for, last_layer, layout, library_of, part_of,
                      qualified, skeleton)
from .errors import (InvalidArgumentError, SEInjectError, check_module, checks_arguments,
                     warn)
from .gate import ChannelGate
from .recipe import (SCHEMA, base_architecture, base_of, name_of, recipe_of, recipes_in,
                     recorded_gates, rules_from)

__all__ = ["CheckpointError", "read_checkpoint", "save", "load", "convert", "strip",
           "METADATA_KEY"]

METADATA_KEY = "se_inject.recipe"
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_PREFIXES = ("module.", "_orig_mod.")
_PROGRESS_BYTES = 100 * 2 ** 20


class CheckpointError(SEInjectError):
    """A checkpoint that cannot be read, does not fit, or cannot be written."""


# ---------------------------------------------------------------------------- reading

# plain data that training scripts pickle beside the weights (torchvision's references keep
# their command line as an argparse.Namespace): made without running any code of the file's
_PLAIN_DATA = (argparse.Namespace,)


def _load_pickle(path: Path) -> Any:
    try:
        with torch.serialization.safe_globals(list(_PLAIN_DATA)):
            if os.fspath(path).endswith(".safetensors"):  # a torch.save file named so, which
                with open(path, "rb") as fh:              # torch.load reads by its name
                    return torch.load(fh, map_location="cpu", weights_only=True)
            return torch.load(path, map_location="cpu", weights_only=True,
                              mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            raise CheckpointError(
                f"{path}: refused: unpickling it would import or run code "
                f"({_pickled_global(text)}). se-inject reads only tensors and plain containers; "
                "re-save the weights as a state_dict or safetensors from code you trust.") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or "
                              f"truncated?): {_first_line(text)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt or "
                              f"truncated?): {type(exc).__name__}: {_first_line(str(exc))}") from None


def _pickled_global(text: str) -> str:
    """What torch.load's refusal says the file would import (the whole model object, when it
    names a module class), else its first line."""
    found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
    if found is None:
        return _first_line(text)
    return f"it holds a pickled {found.group(1)}, not only tensors"


def _first_line(text: str) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # terminal bold, as torch.load writes it
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else text)[:300]


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            return {k: _aligned(f.get_tensor(k)) for k in f.keys()}, meta
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated?): "
                              f"{_first_line(str(exc))}") from None


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory aligned as torch allocates it (64 bytes). safetensors hands tensors out at
    any offset, and CPU kernels (oneDNN's convolutions) take another path on memory that is not
    aligned and round differently: a model loaded so would not compute, bit for bit, what the
    model it was saved from computed."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and state:
        changed = False
        for prefix in _PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def _state_of(obj: Any, path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """The state_dict inside a plain or training checkpoint, and what it says about itself."""
    info: dict[str, Any] = {}
    if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if isinstance(obj.get("arch"), str):
            info["architecture"] = obj["arch"]
        elif isinstance(obj.get("args"), argparse.Namespace) and \
                isinstance(getattr(obj["args"], "model", None), str):
            # torchvision's reference scripts: {"model": ..., "model_ema": ..., "args": ...}
            info["architecture"] = TORCHVISION + obj["args"].model
        if isinstance(obj.get(METADATA_KEY), str):
            info["recipe"] = obj[METADATA_KEY]
        keys = ("state_dict_ema", "model_ema", "state_dict", "model") if ema else \
            ("state_dict", "model")
        key = next((k for k in keys if isinstance(obj.get(k), dict)), None)
        inner = obj[key] if key is not None else None
        if key == "model_ema":  # torchvision's AveragedModel: the weights (under `module.`, taken
            inner = {k: v for k, v in inner.items() if k != "n_averaged"}  # off) and a count
        if inner is None:
            wanted = "'state_dict_ema' or 'model_ema'" if ema else "'state_dict' or 'model'"
            raise CheckpointError(f"{path}: a dict without tensors at its top level and no "
                                  f"{wanted} key (keys: {sorted(map(str, obj))[:8]})")
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: holds {type(obj).__name__}, not a state_dict")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: the state_dict holds non-tensor values, e.g. {bad[0]!r}")
    return _strip_prefixes(dict(obj)), info


def _path(value, name: str) -> Path:
    """``value`` as a Path, or a CheckpointError naming the argument."""
    if isinstance(value, (str, os.PathLike)):
        try:
            return Path(value)
        except TypeError:  # a PathLike that gives bytes
            pass
    raise CheckpointError(f"{name} must be a file name (str or pathlib.Path), not "
                          f"{type(value).__name__} {value!r:.60}")


def read_checkpoint(path, *, ema: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, info) from a state_dict file, a safetensors file, a training checkpoint, or a
    Hugging Face-style folder; info may hold "architecture", "kwargs" and "recipe"."""
    path = _path(path, "path")
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    if _is_safetensors(path, path.suffix not in _PICKLE_SUFFIXES):
        state, meta = _load_safetensors(path)
        info = {"recipe": meta[METADATA_KEY]} if METADATA_KEY in meta else {}
        return _strip_prefixes(state), info
    return _state_of(_load_pickle(path), path, ema)


def _is_safetensors(path: Path, by_name: bool) -> bool:
    """Whether to read ``path`` as safetensors: by its first bytes where they say (a safetensors
    header's length, then its JSON; a zip archive or a pickle, as torch.save writes them), so a
    file named for the other format reads; by its name (``by_name``) where they do not."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and \
            int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return True
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # zip archive; pickle protocol 2+
        return False
    return by_name


def _read_folder(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config = path / "config.json"
    info: dict[str, Any] = {}
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"{config}: not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{config}: holds {type(cfg).__name__}, not a JSON object "
                                  "of the model's settings")
        if isinstance(cfg.get("architecture"), str):
            info["architecture"] = cfg["architecture"]
        if isinstance(cfg.get("num_classes"), int):
            info["kwargs"] = {"num_classes": cfg["num_classes"]}
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            state, more = read_checkpoint(path / name)
            return state, {**info, **more}
        if (path / f"{name}.index.json").is_file():
            return _read_shards(path / f"{name}.index.json"), info
    raise CheckpointError(f"{path}: a folder needs model.safetensors or pytorch_model.bin, "
                          "or their shards with model.safetensors.index.json or "
                          "pytorch_model.bin.index.json (and config.json naming the "
                          "architecture)")


def _read_shards(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint saved in shards (Hugging Face's ``max_shard_size``): each
    shard the index's ``weight_map`` names, read as a file of its own, and every tensor the
    index names found in the shard it names."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as exc:
        raise CheckpointError(f"{index}: not a valid shard index: {str(exc)[:200]}") from None
    if not isinstance(weight_map, dict) or not weight_map or \
            not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CheckpointError(f"{index}: its weight_map must name each tensor's shard file")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        file = index.parent / shard
        if Path(shard).name != shard or not file.is_file():
            raise CheckpointError(f"{index}: shard {shard!r} is not a file in {index.parent}")
        held, _ = read_checkpoint(file)
        wanted = [k for k, v in weight_map.items() if v == shard]
        missing = [k for k in wanted if k not in held]
        if missing:
            raise CheckpointError(f"{file}: the index puts {len(missing)} tensor(s) in it that "
                                  f"it does not hold, e.g. {missing[0]}")
        state.update((k, held[k]) for k in wanted)
    return _strip_prefixes(state)


# ---------------------------------------------------------------------------- writing

def _check_output(path: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, to write over an input, or over a file without ``force``."""
    for src in inputs:
        if path.exists() and src.exists() and os.path.samefile(src, path):
            raise CheckpointError(f"{path}: the output would overwrite the input; choose "
                                  "another name")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; name the file to write in it, e.g. "
                              f"{path / 'model.safetensors'}")
    if path.exists() and not force:
        raise CheckpointError(f"{path} exists; pass --force (force=True) to replace it")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: folder {path.parent} does not exist")


# a failed write's advice, by its cause (by name: not every system has every code)
_WRITE_ADVICE = {getattr(errno, name): advice
                 for names, advice in ((("ENOSPC", "EDQUOT"), "free some space, or write it "
                                        "elsewhere"),
                                       (("EACCES", "EPERM", "EROFS"), "write it where you may"))
                 for name in names if hasattr(errno, name)}


def _write(path: Path, write: Callable[[str], None], force: bool,
           inputs: tuple[Path, ...]) -> None:
    _check_output(path, force, inputs)
    try:
        atomic_write(path, write, replace=force)
    except FileExistsError:  # it appeared while we wrote
        raise CheckpointError(f"{path} exists; pass --force (force=True) to replace it") from None
    except OSError as exc:  # no room, no permission, a read-only file system...
        hint = _WRITE_ADVICE.get(exc.errno)
        raise CheckpointError(f"{path}: could not write it: {exc.strerror or exc}. Nothing was "
                              f"written{'; ' + hint if hint else ''}.") from exc


def _sort_header(path: str) -> None:
    """safetensors writes its header's keys in a per-process order: sort them, in place (the
    header keeps its length, so no tensor moves), so that equal inputs give equal bytes."""
    with open(path, "r+b") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        if len(text) > n:
            raise CheckpointError(f"{path}: cannot normalise the safetensors header")
        fh.seek(8)
        fh.write(text + b" " * (n - len(text)))


def _recipe_json(model: nn.Module, arch: str | None, model_kwargs: dict | None) -> str | None:
    from . import __version__
    steps = _steps_of(model)
    if not steps:
        return None
    base = base_architecture(model) if arch is None else base_of(arch, model_kwargs)
    if arch is None and model_kwargs:
        base["kwargs"].update(model_kwargs)
    return _dumps({"schema": SCHEMA, "se_inject": __version__, "base": base, "steps": steps})


def _steps_of(model: nn.Module) -> list[dict]:
    """The apply() steps recorded on ``model`` and on its parts (``apply(model.backbone)``),
    each part's with its name (``"part"``). Refuses a model whose gates a checkpoint could
    not rebuild: gated by apply() on a module and on a part of it (which went first is not
    recorded), or holding gates other than the recorded ones."""
    held = recipes_in(model)
    names = [n for n, _ in held]
    cls = type(model).__name__
    for outer in names:
        inner = next((n for n in names if n != outer and (not outer or n.startswith(outer + "."))),
                     None)
        if inner is not None:
            where = f"its part `{outer}`" if outer else "the model"
            raise CheckpointError(
                f"{cls} was gated by apply() on {where} and on `{inner}` inside it; a checkpoint "
                "rebuilds gates that apply() placed on one module or on parts that do not hold "
                "one another. Take them out (se_inject.remove(model)) and gate it once "
                "(nothing was written).")
    steps = [{**s, "part": n} if n else s for n, recorded in held for s in recorded]
    recorded = set(recorded_gates(steps))
    there = {n for n, m in model.named_modules() if isinstance(m, ChannelGate)}
    if steps and recorded != there:
        odd = sorted(recorded - there)
        what = (f"`{odd[0]}` was placed by apply() and is not there (taken out by remove() on "
                "a part of the module apply() gated?)") if odd else (
            f"`{sorted(there - recorded)[0]}` is a gate that apply() did not record (added "
            "by hand, or moved from another model?)")
        raise CheckpointError(f"{cls} holds other gates than the ones its recipe records: "
                              f"{what}. A checkpoint of it would not load back; take the gates "
                              "out (se_inject.remove(model)) and gate it again (nothing was "
                              "written).")
    return steps


def _dumps(recipe: dict) -> str:
    """A recipe as the file holds it: the same bytes for the same recipe."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def _plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def _shared(state: dict[str, torch.Tensor]) -> tuple[str, str] | None:
    """The first two keys whose tensors overlap in memory, if any (views of one storage that
    do not overlap are two tensors to safetensors, as here)."""
    spans: dict[tuple, list[tuple[int, int, str]]] = {}
    for k, v in state.items():
        if v.numel() == 0:
            continue
        start = v.data_ptr()
        end = start + v.numel() * v.element_size()  # (contiguous: _plain_state makes them so)
        for s, e, other in spans.setdefault((v.device, v.untyped_storage().data_ptr()), []):
            if s < end and start < e:
                return other, k
        spans[(v.device, v.untyped_storage().data_ptr())].append((start, end, k))
    return None


def _write_state(state: dict[str, torch.Tensor], path: Path, fmt: str, recipe: str | None,
                 force: bool, inputs: tuple[Path, ...] = ()) -> Path:
    path = Path(path)
    if fmt not in ("safetensors", "pth"):
        raise CheckpointError(f"format must be 'safetensors' or 'pth', not {fmt!r}")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        shared = _shared(state)
        if shared:
            raise CheckpointError(
                f"{path}: `{shared[0]}` and `{shared[1]}` are one tensor under two names, which "
                "a safetensors file cannot hold; write a .pth instead (format='pth', "
                "--format pth), which keeps them one tensor (nothing was written)")
        meta = {"format": "pt", **({METADATA_KEY: recipe} if recipe else {})}

        def write(tmp: str) -> None:
            save_file(state, tmp, metadata=meta)
            _sort_header(tmp)
        _write(path, write, force, inputs)
    else:
        obj = {"state_dict": state, **({METADATA_KEY: recipe} if recipe else {})}
        _write(path, lambda tmp: torch.save(obj, tmp), force, inputs)
    return path


@checks_arguments
def save(model: nn.Module, path, *, format: str | None = None, force: bool = False,
         arch: str | None = None, model_kwargs: dict | None = None) -> Path:
    """Write a gated model's weights with its recipe (safetensors unless the name ends in .pth or
    .pt, or ``format="pth"``). ``se_inject.load(path)`` rebuilds it from the file alone."""
    check_module(model, "save", CheckpointError)
    from .api import wrapped
    wrapper = wrapped(model)
    if wrapper is not None:
        attr, what, inner = wrapper
        raise CheckpointError(f"model is {what} of a {type(inner).__name__}: save the model it "
                              f"wraps, se_inject.save(model.{attr}, path), which holds the same "
                              "weights (a checkpoint of the wrapper would not load back as it; "
                              "nothing was written)")
    path = _path(path, "path")
    if arch is not None and not isinstance(arch, str):
        raise CheckpointError(f"arch must be a model name (timm's, or 'torchvision/NAME'), not "
                              f"{arch!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise CheckpointError(f"model_kwargs must be a dict of the model's options, not "
                              f"{model_kwargs!r}")
    text = _recipe_json(model, arch, model_kwargs)
    if text is None:
        raise CheckpointError(f"{type(model).__name__} holds no gates added by se_inject.apply; "
                              "save a plain model with torch.save or safetensors instead")
    recipe = json.loads(text)  # (as load() will read it: tuples become lists)
    rates = _check_rebuilds(model, recipe)
    base = recipe["base"]
    library = base["library"]
    if rates:  # try the round rates a schedule may have come from
        for guess in _rate_guesses(model, base["kwargs"], library):
            again = {**recipe, "base": {
                **base, "kwargs": {**base["kwargs"], **guess, **(model_kwargs or {})}}}
            try:
                if not _check_rebuilds(model, again):
                    recipe, rates = again, []
                    break
            except SEInjectError:  # an option the architecture does not take, or another model
                continue
    if rates:
        kwargs = recipe["base"]["kwargs"]
        warn(f"{len(rates)} dropout layer(s) of {type(model).__name__} have rates that "
             f"{kwargs} do not rebuild, e.g. {rates[0]}: a loaded model computes the "
             "same in eval mode but trains with other rates; pass "
             f"model_kwargs={{{', '.join(repr(k) + ': ...' for k in _RATES[library])}}} "
             "to keep them.")
    fmt = format or ("pth" if path.suffix in (".pth", ".pt") else "safetensors")
    return _write_state(_plain_state(model), path, fmt, _dumps(recipe), force)


# layers that compute nothing in eval mode: a rate of theirs that load() cannot know is warned of
_TRAIN_ONLY = ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "DropPath",
               "DropBlock2d", "StochasticDepth")
# each library's options for those rates: stochastic depth, dropout, drop block
_RATES = {"timm": ("drop_path_rate", "drop_rate", "drop_block_rate"),
          "torchvision": ("stochastic_depth_prob", "dropout")}


def _train_only(m: nn.Module) -> bool:
    return type(m).__name__ in _TRAIN_ONLY


def _check_rebuilds(model: nn.Module, recipe: dict) -> list[str]:
    """Refuse to write a checkpoint that load() would rebuild as another model: one whose layers
    (their classes and settings, gates aside) differ from what timm or torchvision builds from
    the recorded name and kwargs, as after create_model(..., global_pool="max") or a layer
    replaced by hand. Returns the dropout layers whose rates differ (nothing in eval mode),
    described."""
    arch, kwargs = name_of(recipe["base"]), recipe["base"]["kwargs"]
    gated = set(recorded_gates(recipe["steps"]))
    try:
        ref = skeleton(arch, **kwargs)
    except SEInjectError:
        raise
    except Exception:  # a constructor that computes with its tensors: nothing to compare
        return []
    # every name a module is held under: a layer the model also holds under a second name (a
    # hand-made alias, `model.head = model.fc`) is a state_dict key the rebuilt model lacks
    theirs = dict(ref.named_modules(remove_duplicate=False))
    rates, synced = [], []
    for name, m in model.named_modules(remove_duplicate=False):
        if name in gated or any(name.startswith(g + ".") for g in gated):
            continue
        r = theirs.pop(name, None)
        if r is not None and type(r) is type(m) and layout(r) == layout(m):
            continue
        if r is not None and _synced(m, r):
            synced.append(name)
            continue
        if _train_only(m) and (r is None or type(r) is type(m) or isinstance(r, nn.Identity)):
            rates.append(f"`{name}` {layout(m)} (rebuilt: "
                         f"{'none' if r is None else layout(r)})")
            continue
        label = name or "(model)"
        if parametrize.is_parametrized(m) and r is not None:
            names = ", ".join(f"'{t}'" for t in m.parametrizations)
            raise CheckpointError(
                f"{type(model).__name__} would not load back as itself: its layer `{label}` "
                f"computes {names} through torch.nn.utils.parametrize (weight_norm, "
                f"spectral_norm, ...), which {describe(arch)} does not. Take the "
                "parametrizations off first, torch.nn.utils.parametrize.remove_parametrizations"
                "(layer, 'weight') on each such layer, which keeps the weight it computes; or "
                "save its state_dict (nothing was written).")
        now = f"is {layout(r)}" if r is not None else "does not exist"
        raise CheckpointError(
            f"{type(model).__name__} would not load back as itself: its layer `{label}` is "
            f"{layout(m)}, where {describe(arch)} built with {kwargs} {now}. It was made with "
            "options the model does not record (create_model(..., global_pool=...), "
            "output_stride=..., act_layer=...) or changed after it was made. Pass its options: "
            "se_inject.save(model, path, model_kwargs={...}); a model changed by hand cannot be "
            "rebuilt from a name: save its state_dict (nothing was written).")
    extra = [n for n in theirs if not _train_only(theirs[n])
             and n not in gated and not any(n.startswith(g + ".") for g in gated)]
    if extra:
        raise CheckpointError(
            f"{type(model).__name__} would not load back as itself: {describe(arch)} built with "
            f"{kwargs} has a layer `{extra[0]}` ({type(theirs[extra[0]]).__name__}) that the "
            "model lacks. Pass the options it was made with: se_inject.save(model, path, "
            "model_kwargs={...}) (nothing was written).")
    # a weight kept in other tensors by a hook (pruning's weight_orig and weight_mask, the old
    # weight_norm's weight_g and weight_v, spectral_norm's) changes the keys but no layer
    own = {k for k in model.state_dict() if not any(k.startswith(g + ".") for g in gated)}
    ref_keys = set(ref.state_dict())  # (the rebuilt architecture holds no gate)
    missing, unexpected = sorted(ref_keys - own), sorted(own - ref_keys)
    if missing or unexpected:
        raise CheckpointError(
            f"{type(model).__name__} would not load back as itself: its state_dict has "
            f"{len(unexpected)} key(s) that {describe(arch)} built with {kwargs} lacks"
            f"{_some(unexpected)}, and lacks {len(missing)} that it has{_some(missing)}."
            f"{_reparametrized(missing, unexpected)} (Nothing was written.)")
    if synced:
        warn(f"{len(synced)} SyncBatchNorm layer(s) of {type(model).__name__} (e.g. "
             f"`{synced[0]}`) are saved as the batch norms {describe(arch)} is built with, "
             "which hold the same tensors: load() rebuilds those, which compute the same in "
             "one process; convert them again for distributed training "
             "(nn.SyncBatchNorm.convert_sync_batchnorm, timm.layers.convert_sync_batchnorm).")
    return rates


def _synced(m: nn.Module, r: nn.Module) -> bool:
    """``m`` is the SyncBatchNorm that convert_sync_batchnorm (torch's or timm's) made of the
    batch norm ``r``, with its settings."""
    return isinstance(m, nn.SyncBatchNorm) and \
        isinstance(r, nn.modules.batchnorm._BatchNorm) and \
        not isinstance(r, nn.SyncBatchNorm) and m.extra_repr() == r.extra_repr()


def _some(keys: list) -> str:
    return f" ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})" if keys else ""


# what a hook-based reparametrization keeps a weight NAME as (NAME + each suffix), and what
# makes the weight plain again; the more specific first (spectral norm's NAME_orig is not
# pruning's)
_REPARAMETRIZED = (
    (("_orig", "_u", "_v"), "torch.nn.utils.spectral_norm keeps a weight as NAME_orig, NAME_u and "
     "NAME_v: take it off first, torch.nn.utils.remove_spectral_norm(layer) on each such layer"),
    (("_orig", "_mask"), "torch.nn.utils.prune keeps a pruned weight as NAME_orig and NAME_mask: "
     "make the pruning permanent first, torch.nn.utils.prune.remove(layer, 'weight') on each "
     "pruned layer"),
    (("_g", "_v"), "torch.nn.utils.weight_norm keeps a weight as NAME_g and NAME_v: take it off "
     "first, torch.nn.utils.remove_weight_norm(layer) on each such layer"),
)


def _reparametrized(missing: list, unexpected: list) -> str:
    """A hint where the keys that differ are a weight kept in other tensors by a hook."""
    extra = set(unexpected)
    for suffixes, hint in _REPARAMETRIZED:
        if any(all(k + s in extra for s in suffixes) for k in missing):
            return f" {hint}."
    return ""


def _rate_guesses(model: nn.Module, kwargs: dict, library: str = "timm") -> list[dict]:
    """drop_rate, drop_path_rate and drop_block_rate values (torchvision's models:
    stochastic_depth_prob and dropout) that may rebuild the model's dropout layers: the
    largest rate each kind of layer has, rounded, and the stochastic-depth rate of a schedule
    that stops one block short of it (timm's and torchvision's EfficientNets: rate · i / n).
    A drop-block rate is guessed only where the model has drop blocks (timm's ResNets)."""
    names = _RATES[library]
    path_name, drop_name = names[:2]
    block_name = names[2] if len(names) > 2 else None
    paths = [getattr(m, "drop_prob", getattr(m, "p", 0.0)) for m in model.modules()
             if type(m).__name__ in ("DropPath", "StochasticDepth")]
    drops = [m.p for m in model.modules() if type(m).__name__.startswith("Dropout")]
    blocks = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropBlock2d"] \
        if block_name else []
    path_options = [kwargs.get(path_name)]
    if paths:
        top = max(paths)
        short = round(top * len(paths) / max(len(paths) - 1, 1), 3)
        path_options += [round(top, 1), round(top, 2), short]
    drop_options = [kwargs.get(drop_name)] + ([round(max(drops), 3)] if drops else [])
    block_options = [kwargs.get(block_name) if block_name else None] + \
        ([round(max(blocks), 3)] if blocks else [])
    out = []
    for dp in dict.fromkeys(path_options):
        for dr in dict.fromkeys(drop_options):
            for db in dict.fromkeys(block_options):
                guess = {k: v for k, v in ((path_name, dp), (drop_name, dr),
                                           (block_name, db)) if v}
                if guess and guess not in out:
                    out.append(guess)
    return out


# ---------------------------------------------------------------------------- building

def _create(arch: str, kwargs: dict) -> nn.Module:
    try:
        return create(arch, **kwargs)
    except InvalidArgumentError as exc:  # an unknown name, or an option it does not take
        raise CheckpointError(str(exc)) from None


def _from_state(arch: str, kwargs: dict, state: dict[str, torch.Tensor], where: str,
                gate: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """The model built around the checkpoint's own tensors: made on the meta device (no random
    initialisation, no memory), gated by ``gate`` where the file holds gates, then given the
    file's tensors as its parameters and buffers, so that the weights exist once. A model that
    cannot be made or gated on the meta device, or that keeps a buffer outside its state_dict,
    is built as usual and the weights copied in."""
    try:
        with torch.device("meta"):
            net = _create(arch, kwargs)
        if gate is not None:
            gate(net)
    except SEInjectError:
        raise
    except Exception:  # a constructor or forward that computes with its tensors
        net = None
    if net is not None:
        own = net.state_dict()
        _check_fits(net, own, state, where)
        cast = {k: v.to(own[k].dtype) if v.dtype != own[k].dtype else v for k, v in state.items()}
        net.load_state_dict(_versioned(cast, own), strict=True, assign=True)
        if not any(t.is_meta for t in (*net.parameters(), *net.buffers())):
            return net
    net = _create(arch, kwargs)
    if gate is not None:
        gate(net)
    _load_into(net, state, where)
    return net


def _under_prefix(state: dict[str, torch.Tensor], arch: str, src: Path) -> dict[str, torch.Tensor]:
    """The weights of a model saved inside another module (a LightningModule's ``model.``, a
    training wrapper's ``net.backbone.``): where no name in the file is one of the
    architecture's, the tensors under the one prefix whose names are, the prefix taken off."""
    try:
        names = set(skeleton(arch).state_dict())
    except SEInjectError:
        raise
    except Exception:  # a constructor that computes with its tensors: names as they are
        return state
    if names & state.keys():
        return state
    found: dict[str, int] = {}
    for k in state:
        parts = k.split(".")
        for i in range(1, min(len(parts), 4)):
            prefix = ".".join(parts[:i]) + "."
            if k[len(prefix):] in names:
                found[prefix] = found.get(prefix, 0) + 1
    if not found:
        return state
    best = sorted(found, key=found.get, reverse=True)
    if len(best) > 1 and found[best[0]] == found[best[1]]:
        raise CheckpointError(f"{src}: two sets of {arch}'s weights in it, under `{best[0]}` and "
                              f"`{best[1]}` (a model and its EMA?); save the one to convert as a "
                              "state_dict of its own (nothing was written)")
    prefix = best[0]
    under = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    other = [k for k in state if not k.startswith(prefix)]
    if other:
        warn(f"{src}: converting the {len(under)} tensors under `{prefix}`; the other "
             f"{len(other)} (e.g. `{other[0]}`) are not part of the model")
    return under


def _shape_kwargs(arch: str, state: dict[str, torch.Tensor]) -> dict:
    """num_classes from the classifier's weight in the checkpoint (0 where it has none) and
    in_chans from its first layer's, where timm names them; for torchvision's models,
    num_classes from the model's last layer, and aux_logits=False where the checkpoint holds
    none of the auxiliary classifiers the model has by default (Inception-v3, GoogLeNet)."""
    if library_of(arch)[0] == "torchvision":
        return _torchvision_shape_kwargs(arch, state)
    import timm
    cfg = timm.get_pretrained_cfg(arch)
    out = {}
    name = getattr(cfg, "classifier", None) if cfg is not None else None
    w = state.get(f"{name}.weight") if isinstance(name, str) else None
    if w is not None and w.dim() >= 1:
        out["num_classes"] = int(w.shape[0])
    elif isinstance(name, str) and not any(k.startswith(name + ".") for k in state):
        out["num_classes"] = 0  # a backbone saved without its classifier
    first = getattr(cfg, "first_conv", None) if cfg is not None else None
    w = state.get(f"{first}.weight") if isinstance(first, str) else None
    in_chans = in_chans_for(arch, first, int(w.shape[1])) if w is not None and w.dim() >= 2 \
        else None
    if in_chans is not None:
        out["in_chans"] = in_chans
    return out


def _torchvision_shape_kwargs(arch: str, state: dict[str, torch.Tensor]) -> dict:
    try:
        ref = skeleton(arch)
    except SEInjectError:
        raise
    except Exception:  # a builder that cannot be made without options: as the file says
        return {}
    out: dict = {}
    last = last_layer(ref)
    if last:
        name, layer = last
        w = state.get(f"{name}.weight")
        if w is not None and w.dim() >= 1 and w.shape[0] != layer.weight.shape[0]:
            out["num_classes"] = int(w.shape[0])
    return {**out, **aux_kwargs(ref, {k.split(".")[0] for k in state})}


def _torchvision_twin(arch: str, state: dict[str, torch.Tensor],
                      kwargs: dict) -> str | None:
    """``torchvision/ARCH`` where ``arch`` is a timm name that torchvision also has and the
    checkpoint's tensor names are that torchvision model's and not timm's (a torchvision
    checkpoint converted with a timm name: timm's efficientnet_b0 is another model than
    torchvision's). Where the two name their tensors alike (ResNets), torchvision's would not
    fit the file either, and is not named."""
    if library_of(arch)[0] != "timm":
        return None
    try:
        check_name(TORCHVISION + arch)
        names = set(skeleton(TORCHVISION + arch).state_dict())
    except Exception:  # no such torchvision model, or one that cannot be built so
        return None
    # every tensor is one of the model's, and most of the model's are there (a head may not be)
    fits = set(state) <= names and 2 * len(state) >= len(names)
    try:
        fits = fits and not set(state) <= set(skeleton(arch, **kwargs).state_dict())
    except Exception:  # timm's model cannot be built so: as the names say
        pass
    return TORCHVISION + arch if fits else None


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    _check_fits(model, model.state_dict(), state, where)
    model.load_state_dict(_versioned(state, model.state_dict()), strict=True)


def _versioned(state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """``state`` with the module versions of the model's own state_dict: a file's dict has
    none (safetensors keeps no such thing, and prefixes are taken off the names), and a layer
    that reads its version to load (torchvision's MNASNet) refuses a dict without it."""
    out = OrderedDict(state)
    meta = getattr(own, "_metadata", None)
    if meta is not None:
        out._metadata = meta  # type: ignore[attr-defined]
    return out


def _check_fits(model: nn.Module, own: dict, state: dict[str, torch.Tensor], where: str) -> None:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected),
                             ("of another shape (file vs model)", shapes)):
            if items:
                parts.append(f"{len(items)} {label}, e.g. {', '.join(items[:3])}")
        hint = _reparametrized(missing, unexpected) or " Check --model (the architecture)."
        raise CheckpointError(f"{where} does not fit {type(model).__name__} "
                              f"({len(own)} keys in the model, {len(state)} in the file): "
                              + "; ".join(parts) + "." + hint)


def _parse_recipe(text: str, where: str) -> dict:
    try:
        recipe = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:  # (arrays nested past the stack)
        raise CheckpointError(f"{where}: its se-inject recipe is not valid JSON: "
                              f"{str(exc)[:200]}") from None
    if not isinstance(recipe, dict):
        raise CheckpointError(f"{where}: its se-inject recipe is not a JSON object")
    if recipe.get("schema") != SCHEMA:
        raise CheckpointError(f"{where}: recipe schema {recipe.get('schema')!r} is not "
                              f"{SCHEMA!r}; use the se-inject version that wrote it "
                              f"({recipe.get('se_inject', '?')})")
    wrong = _malformed(recipe)
    if wrong:
        raise CheckpointError(f"{where}: its se-inject recipe is malformed ({wrong}); it was "
                              "changed after se-inject wrote it. Convert the plain checkpoint "
                              "again, or strip the recipe and load the weights yourself")
    return recipe


def _malformed(recipe: dict) -> str | None:
    """What in a recipe of this schema is not of the shape se-inject writes, or None (the
    values themselves are checked where they are used, as apply() checks its arguments)."""
    base = recipe.get("base")
    if not isinstance(base, dict):
        return "'base' is not an object"
    if not isinstance(base.get("kwargs") or {}, dict):
        return "'base.kwargs' is not an object"
    steps = recipe.get("steps")
    if not isinstance(steps, list) or not steps:
        return "'steps' is not a list of apply() steps"
    for i, step in enumerate(steps):
        if not isinstance(step, dict):
            return f"step {i} is not an object"
        for key, kind in (("gates", str), ("rules", dict)):
            if not isinstance(step.get(key), list) or \
                    not all(isinstance(v, kind) for v in step[key]):
                return f"step {i}: '{key}' is not a list of {kind.__name__} values"
        if "ratio" not in step:
            return f"step {i} has no 'ratio'"
        for key, kind in (("part", str), ("gate", dict), ("leaf_modules", list),
                          ("autowrap_functions", list), ("init", str)):
            if step.get(key) is not None and not isinstance(step[key], kind):
                return f"step {i}: '{key}' is not a {kind.__name__}"
    return None


def _apply_seeded(model: nn.Module, *args, **kwargs) -> None:
    """apply() with new gates drawn from a fixed seed (equal inputs give equal bytes), without
    touching the caller's random state, and without apply()'s advice about fx."""
    from .api import apply
    with warnings.catch_warnings(), torch.random.fork_rng():
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        apply(model, *args, **kwargs)


def _base(recipe: dict, where: str) -> tuple[str, dict]:
    base = recipe.get("base") or {}
    if base.get("library") not in ("timm", "torchvision") or \
            not isinstance(base.get("architecture"), str):
        raise CheckpointError(f"{where}: the recipe names no timm or torchvision architecture")
    return name_of(base), dict(base.get("kwargs") or {})


def _recorded_leaves(model: nn.Module, names: list) -> tuple[type, ...]:
    """The leaf classes a recipe names, where each is the class of one of the rebuilt model's
    modules (timm's InceptionB in an inception_v3): nothing is imported. () otherwise."""
    held = {qualified(type(m)): type(m) for m in model.modules()}
    if not names or not all(isinstance(n, str) and n in held for n in names):
        return ()
    return tuple(held[n] for n in names)


def _gate_as_recorded(model: nn.Module, recipe: dict, where: str, leaf_modules=(),
                      autowrap_functions=()) -> None:
    """Repeat the recipe's apply() steps on ``model`` (each on its part); the gates must land
    where they did."""
    for i, step in enumerate(recipe["steps"]):
        try:
            target = part_of(model, step.get("part") or None,
                             f"{where}: the rebuilt {type(model).__name__}", " (its recipe's part)")
        except InvalidArgumentError as exc:
            raise CheckpointError(str(exc)) from None
        leaves = leaf_modules or _recorded_leaves(target, step.get("leaf_modules") or [])
        needs = step.get("leaf_modules") or step.get("autowrap_functions")
        if needs and not (leaves or autowrap_functions):
            raise CheckpointError(f"{where}: it was gated with leaf_modules/autowrap_functions "
                                  f"{needs}; code is never imported from a checkpoint, so pass "
                                  "them to se_inject.load(..., leaf_modules=[...])")
        spec = step.get("gate") or {}
        from .api import recorded_gates_only
        try:
            with recorded_gates_only(step["gates"]):
                _apply_seeded(target, step["ratio"], rules_from(step), stages=step.get("stages"),
                              input_size=step.get("input_size") or None,
                              init=step.get("init", "paper"), leaf_modules=leaves,
                              autowrap_functions=autowrap_functions, gate=spec.get("kind", "se"),
                              **{k: spec[k] for k in ("squeeze", "excite", "min_channels",
                                                      "divisor") if k in spec})
        except InvalidArgumentError as exc:  # a value in the file that apply() refuses
            raise CheckpointError(f"{where}: its se-inject recipe's step {i} holds what "
                                  f"apply() refuses: {exc}") from None
        got = (recipe_of(target) or [{}])[-1].get("gates", [])
        if got != step["gates"]:
            raise CheckpointError(f"{where}: this se-inject places gates {got[:3]}... where the "
                                  f"file has {step['gates'][:3]}...; use the se-inject version "
                                  f"that wrote it ({recipe.get('se_inject')})")


@checks_arguments
def load(path, *, leaf_modules=(), autowrap_functions=()) -> nn.Module:
    """A gated model rebuilt from an se-inject checkpoint (written by save() or convert)."""
    state, info = read_checkpoint(path)
    if "recipe" not in info:
        raise CheckpointError(f"{path}: no se-inject recipe in it: a plain checkpoint. Convert it "
                              "first: se-inject convert FILE --model ARCH -o OUT")
    where = str(path)
    recipe = _parse_recipe(info["recipe"], where)
    arch, kwargs = _base(recipe, where)
    return _from_state(arch, kwargs, state, where, gate=lambda net: _gate_as_recorded(
        net, recipe, where, leaf_modules, autowrap_functions))


# ---------------------------------------------------------------------------- converting

def _progress(size: int) -> Callable[[str], None]:
    start = time.perf_counter()
    if size <= _PROGRESS_BYTES:
        return lambda msg: None
    return lambda msg: print(f"[{time.perf_counter() - start:6.1f} s] {msg}", file=sys.stderr,
                             flush=True)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() \
        else path.stat().st_size


def convert(src, out, *, model: str | None = None, ratio: int = 16, rules=None, stages=None,
            input_size=None, init: str = "identity", format: str = "safetensors",
            force: bool = False, ema: bool = False, model_kwargs: dict | None = None,
            part: str | None = None, leaf_modules=(), **variant) -> Path:
    """A plain checkpoint -> an SE checkpoint with its recipe. By default the converted model
    computes what the original did (init="identity"). ``model_kwargs``: timm.create_model
    options the checkpoint's tensors do not show (global_pool, output_stride, act_layer...).
    ``part``: gate only this submodule, by its dotted name (a detector's ``backbone.body``);
    without ``input_size``, at the size the model hands it. ``leaf_modules``: classes of the
    model's modules (or their names, ``"InceptionB"``) whose blocks stay ungated; recorded, so
    load() finds them in the model it rebuilds.
    ``variant``: the gate's options, as for se_inject.apply (position, gate, squeeze, excite,
    min_channels, divisor)."""
    src, out = _path(src, "src"), _path(out, "out")
    if part is not None:
        check_part(part)  # before any file is read
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or folder")
    _check_output(out, force, (src,))
    say = _progress(_size(src))
    say(f"reading {src} ({_size(src) / 2 ** 20:.0f} MiB)")
    state, info = read_checkpoint(src, ema=ema)
    if "recipe" in info:
        raise CheckpointError(f"{src} already holds SE gates (an se-inject recipe); load it with "
                              "se_inject.load, or strip it first")
    arch = model or info.get("architecture")
    if not arch:
        raise CheckpointError(f"{src} does not name its architecture: pass --model NAME "
                              "(a timm model name, or torchvision/NAME for torchvision's)")
    state = _under_prefix(state, arch, src)
    kwargs = {**_shape_kwargs(arch, state), **info.get("kwargs", {}), **(model_kwargs or {})}
    say(f"building {arch} {kwargs}")
    try:
        net = _from_state(arch, kwargs, state, str(src))
    except CheckpointError as exc:
        other = _torchvision_twin(arch, state, kwargs)
        if other is None:
            raise
        raise CheckpointError(f"{exc} Its tensors are named as those of torchvision's "
                              f"{arch}: pass --model {other}") from None
    dtype = _file_dtype(state)
    del state
    say("placing gates")
    target = part_of(net, part, describe(arch), " (part)")
    if part is not None and input_size is None:  # the size the model hands its part
        from .api import handed_size
        input_size = handed_size(net, part)
    leaves = classes_named(target, leaf_modules, "leaf_modules (--leaf)")
    _apply_seeded(target, ratio, rules, stages=stages, input_size=input_size, init=init,
                  leaf_modules=leaves, **variant)
    if not recipes_in(net):
        raise CheckpointError(f"{src}: every block of {arch}{f' `{part}`' if part else ''} "
                              "that the rules match already holds "
                              "a channel gate of its own, so there is nothing to convert "
                              "(nothing was written). A rule with 'existing_gate: allow' "
                              "(--rules FILE) gates them anyway: README.md, 'Rule files'.")
    say(f"writing {out}")
    # timm's models record what rebuilds them; torchvision's are named as they were built
    recipe = _recipe_json(net, arch, kwargs) if library_of(arch)[0] == "torchvision" else \
        _recipe_json(net, None, model_kwargs)
    _write_state(_as_file(_plain_state(net), dtype, src), out, format, recipe, force, (src,))
    say("done")
    return out


def strip(src, out, *, format: str = "safetensors", force: bool = False) -> Path:
    """An SE checkpoint -> the plain model's weights (the gates taken out, layers scaled for
    identity-initialised gates scaled back)."""
    from .api import remove
    src, out = _path(src, "src"), _path(out, "out")
    _check_output(out, force, (src,))
    state, _ = read_checkpoint(src)
    dtype = _file_dtype(state)
    del state
    net = load(src)
    remove(net)
    return _write_state(_as_file(_plain_state(net), dtype, src), out, format, None, force, (src,))


def _file_dtype(state: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The one floating dtype of a checkpoint's tensors (half-precision files), or None."""
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _as_file(state: dict[str, torch.Tensor], dtype: torch.dtype | None,
             src: Path) -> dict[str, torch.Tensor]:
    """The written tensors in the dtype the source file kept them in (the model computed in
    its own): a float16 checkpoint stays float16, gates included. Doubling a weight for an
    identity gate is exact in any float format, unless it leaves the format's range."""
    if dtype is None:
        return state
    out = {}
    for k, v in state.items():
        if v.is_floating_point() and v.dtype != dtype:
            cast = v.to(dtype)
            if not torch.isfinite(cast).all() and torch.isfinite(v).all():
                raise CheckpointError(f"{src}: `{k}` does not fit {dtype} once its layer is "
                                      "scaled for an identity gate (values past the format's "
                                      "range); convert with --init paper, or from a float32 "
                                      "copy (nothing was written)")
            v = cast
        out[k] = v
    return out
