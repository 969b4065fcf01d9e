"""A cost report's time ÷ one fvcore analysis of the base model (target: at most 3).

Both are timed side by side, alternating, on the same model object; the report includes its
plan (an fx trace), the base model's fvcore analysis, and the gates' own analyses.

    python bench/report_speed.py [--models resnet50,...] [--ratios 16 | 16,8,4] [--rounds 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import timm
import torch
from fvcore.nn import FlopCountAnalysis

import se_inject

torch.set_num_threads(2)


def fvcore_once(model, x) -> float:
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fca = FlopCountAnalysis(model.eval(), x)
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        fca.total()
    return time.perf_counter() - t


def report_once(model, ratios) -> float:
    t = time.perf_counter()
    se_inject.cost(model, ratio=ratios)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="resnet50,inception_v3,mobilenetv2_100")
    ap.add_argument("--ratios", default="16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/out/report_speed.md"))
    args = ap.parse_args(argv)
    ratios = [int(r) for r in args.ratios.split(",")]
    unknown = [m for m in args.models.split(",") if not timm.is_model(m)]
    if unknown:
        ap.error(f"--models: {', '.join(unknown)} is not a timm model name; list them with "
                 "timm.list_models()")
    lines = []

    def out(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    out("| model | ratios | fvcore (s) | report (s) | report ÷ fvcore |\n|---|---|---:|---:|---:|")
    worst = 0.0
    for name in args.models.split(","):
        model = timm.create_model(name, pretrained=False)
        size = model.pretrained_cfg.get("input_size", (3, 224, 224))
        x = torch.zeros(1, *size)
        fvcore_once(model, x), report_once(model, ratios)  # warm both
        pairs = []
        for i in range(args.rounds):
            pairs.append((fvcore_once(model, x), report_once(model, ratios)))
            print(f"  {name} round {i + 1}/{args.rounds}", file=sys.stderr, flush=True)
        f = statistics.median(p[0] for p in pairs)
        r = statistics.median(p[1] for p in pairs)
        ratio = statistics.median(b / a for a, b in pairs)
        worst = max(worst, ratio)
        out(f"| {name} | {args.ratios} | {f:.2f} | {r:.2f} | {ratio:.2f} |")
    out(f"\nworst report ÷ fvcore: {worst:.2f} (target ≤ 3)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
