"""Gated parts: for each model the coverage sweep gates, gate one part of it and check that the
whole model saves and loads back as itself.

Per model: gate the largest child that apply() gates on its own, at the size the model hands it
(``apply(model.layer3, input_size=se_inject.part_input_size(model, "layer3"))``); save the
whole model (``se_inject.save``), load it (``se_inject.load``) and compare outputs with the
model's. Status: same (outputs bit for bit the model's), no part (no
child that the model calls with one tensor gates on its own: a model that loops over its stages
calls none of them as a child), DIFFERENT or CRASH (a bug).

    python bench/parts.py [--coverage bench/out/coverage.json] [--max-params 60]
                          [--out bench/out/parts.md]

The models are the rows of a coverage sweep (``python bench/coverage.py``) with status gated.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import se_inject
from se_inject._models import TORCHVISION, create
from se_inject.api import _input_shapes


def _first(y):
    return y if isinstance(y, torch.Tensor) else _first(y[0])


def one(name: str, folder: Path, max_params: float) -> dict:
    model = create(name).eval()
    if sum(p.numel() for p in model.parameters()) > max_params * 1e6:
        return {"model": name, "status": "skipped", "part": ""}
    x = torch.randn(1, *_input_shapes(model, None)[0][1:])
    children = sorted(model.named_children(),
                      key=lambda nc: -sum(p.numel() for p in nc[1].parameters()))
    for part, child in children:
        try:
            se_inject.apply(child, input_size=se_inject.part_input_size(model, part))
        except se_inject.SEInjectError:  # not called with one tensor, or no block in it
            continue
        path = se_inject.save(model, folder / f"{name.replace('/', '_')}.safetensors")
        loaded = se_inject.load(path).eval()
        with torch.no_grad():
            a, b = _first(model(x)), _first(loaded(x))
        same = torch.equal(a, b)
        return {"model": name, "part": part, "gates": sum(
            isinstance(m, se_inject.ChannelGate) for m in child.modules()),
            "status": "same" if same else "DIFFERENT",
            "reason": "" if same else f"max difference {float((a - b).abs().max()):.3g}"}
    return {"model": name, "status": "no part", "part": ""}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--coverage", type=Path, default=Path("bench/out/coverage.json"))
    ap.add_argument("--max-params", type=float, default=60, help="skip larger models (millions)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/parts.md"))
    args = ap.parse_args(argv)
    if not args.coverage.exists():
        ap.error(f"{args.coverage}: run python bench/coverage.py first")
    rows = json.loads(args.coverage.read_text())
    names = [(TORCHVISION if r["family"] == "torchvision" else "") + r["model"]
             for r in rows if r["status"] == "gated"]
    warnings.simplefilter("ignore")
    out, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        for i, name in enumerate(names):
            try:
                row = one(name, Path(folder), args.max_params)
            except Exception as exc:  # a bug: reported, and the sweep goes on
                row = {"model": name, "status": "CRASH", "part": "",
                       "reason": f"{type(exc).__name__}: {str(exc)[:200]}"}
            out.append(row)
            print(f"[{i + 1}/{len(names)}] {name}: {row['status']} {row['part']}",
                  file=sys.stderr, flush=True)
    counts = Counter(r["status"] for r in out)
    lines = ["# se-inject: gated parts saved and loaded", "",
             f"- {len(out)} models the coverage sweep gates, in "
             f"{time.perf_counter() - start:.0f} s: "
             + ", ".join(f"{s} {n}" for s, n in counts.items()), "",
             "| model | part | gates | status | reason |", "|---|---|---:|---|---|"]
    lines += [f"| {r['model']} | {r['part']} | {r.get('gates', '')} | {r['status']} | "
              f"{r.get('reason', '')} |" for r in out]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:3]))
    return 0 if not any(r["status"] in ("DIFFERENT", "CRASH") for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
