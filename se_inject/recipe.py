"""The recipe: what apply() did to a model, kept on the model so that a saved checkpoint can
rebuild it (se_inject.save / se_inject.load). Plain data only: names, numbers, the rules'
fields, never code."""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any

from torch import nn

from ._models import TORCHVISION, in_chans_of, library_of, torchvision_name
from .errors import InvalidArgumentError
from .rules import Rule

__all__ = ["RECIPE", "SCHEMA", "record_step", "forget_recipe", "recipe_of", "recipes_in",
           "recorded_gates", "rules_from", "base_architecture", "base_of", "name_of"]

RECIPE = "_se_inject_recipe"
SCHEMA = "se-inject.recipe/1"


def record_step(model: nn.Module, *, ratio, rules, stages, input_size, init: str,
                gates: list[str], options, gate) -> None:
    steps = model.__dict__.setdefault(RECIPE, [])
    steps.append({
        "ratio": {str(k): v for k, v in ratio.items()} if isinstance(ratio, dict) else ratio,
        "gate": gate.to_dict(),
        "rules": [_rule_dict(r) for r in rules],
        "stages": sorted(stages) if isinstance(stages, frozenset) else stages,
        "input_size": _listed(input_size),
        "init": init,
        "gates": list(gates),
        "leaf_modules": [f"{c.__module__}.{c.__qualname__}" for c in options.leaf_modules],
        "autowrap_functions": [f"{f.__module__}.{getattr(f, '__qualname__', f)}"
                               for f in options.autowrap_functions],
    })


def _listed(value):
    """``value`` as JSON holds it: tuples as lists (a size, or a structure of them)."""
    if isinstance(value, dict):
        return {k: _listed(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_listed(v) for v in value]
    return value


def forget_recipe(model: nn.Module) -> None:
    """Forget what apply() did to ``model`` and to each of its submodules (remove() took every
    gate under it out)."""
    for m in model.modules():
        m.__dict__.pop(RECIPE, None)


def recipe_of(model: nn.Module) -> list[dict] | None:
    return model.__dict__.get(RECIPE)


def recipes_in(model: nn.Module) -> list[tuple[str, list[dict]]]:
    """(name, steps) of ``model`` ("") and of each submodule that apply() was given
    (``apply(model.backbone)``), in the order of ``named_modules()``."""
    return [(n, m.__dict__[RECIPE]) for n, m in model.named_modules() if m.__dict__.get(RECIPE)]


def recorded_gates(steps: list[dict]) -> list[str]:
    """The names, from the saved model's root, of the gates that recipe ``steps`` place (a
    step's names are its part's)."""
    return [f"{s['part']}.{g}" if s.get("part") else g for s in steps for g in s["gates"]]


def _rule_dict(rule: Rule) -> dict:
    d = asdict(rule)
    d["yield_to"] = list(d["yield_to"])
    return d


def rules_from(step: dict) -> list[Rule]:
    names = {f.name for f in fields(Rule)}
    out = []
    for d in step["rules"]:
        for key in ("reparam_sums", "layer_sums"):
            if isinstance(d, dict) and key not in d:
                # written before rules had the option: such a se-inject gated these sums like
                # any other, and the gates it saved must come back where they were
                d = {**d, key: "allow"}
        if not isinstance(d, dict) or set(d) != names:
            raise InvalidArgumentError(f"the recipe holds a rule with fields {sorted(d)}; this "
                                       f"se-inject expects {sorted(names)}")
        out.append(Rule(**{**d, "yield_to": tuple(d["yield_to"])}))
    return out


def base_of(name: str, kwargs: dict | None) -> dict[str, Any]:
    """The recipe's base for a model name (``torchvision/`` names torchvision's) and its
    kwargs."""
    library, arch = library_of(name)
    return {"library": library, "architecture": arch, "kwargs": dict(kwargs or {})}


def name_of(base: dict) -> str:
    """The model name (``torchvision/NAME`` for torchvision's) of a recipe's base."""
    prefix = TORCHVISION if base.get("library") == "torchvision" else ""
    return prefix + base["architecture"]


# timm's feature wrappers, by the names create_model(..., feature_cls=...) takes
_FEATURE_CLS = {"FeatureListNet": "list", "FeatureDictNet": "dict", "FeatureHookNet": "hook",
                "FeatureGetterNet": "getter", "FeatureGraphNet": "fx"}


def base_architecture(model: nn.Module) -> dict[str, Any]:
    """The timm architecture and the kwargs that rebuild ``model``: its shapes (classes, input
    channels), a features_only wrapper's, and its dropout rates. For a torchvision model, the
    builder that gives its shapes, and its number of classes where that is not the default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture")
    if not arch:
        from .rewrite import GATE_PREFIX
        found = torchvision_name(model, skip=GATE_PREFIX)
        if found is not None:
            return base_of(*found)
        raise InvalidArgumentError(
            f"{type(model).__name__} carries no timm architecture name (pretrained_cfg) and is "
            "not one torchvision builds, so a checkpoint could not rebuild it: pass "
            "arch='name' (timm's, or 'torchvision/name') and model_kwargs={...} to save()")
    kwargs: dict[str, Any] = {}
    if getattr(model, "num_classes", None) is not None:
        kwargs["num_classes"] = int(model.num_classes)
    in_chans = in_chans_of(model)
    if in_chans is not None:
        kwargs["in_chans"] = in_chans
    info = getattr(model, "feature_info", None)  # a classifier's is a list of dicts
    if type(info).__name__ == "FeatureInfo" and hasattr(info, "out_indices"):
        kwargs["features_only"] = True  # (create_model(..., features_only=True))
        kwargs["out_indices"] = [int(i) for i in info.out_indices]
        wrapper = _FEATURE_CLS.get(type(model).__name__)
        if wrapper is not None and type(model).__module__.startswith("timm."):
            kwargs["feature_cls"] = wrapper  # (timm's default differs between models)
    # stochastic depth grows to drop_path_rate at the last block; save() checks the guess
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"
             and isinstance(getattr(m, "drop_prob", None), float)]
    if rates and max(rates) > 0:
        kwargs["drop_path_rate"] = round(max(rates), 6)
    rate = model.__dict__.get("drop_rate")
    if isinstance(rate, float) and rate > 0:
        kwargs["drop_rate"] = rate
    return {"library": "timm", "architecture": arch, "kwargs": kwargs}
