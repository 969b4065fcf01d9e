"""Figures for the core: apply() time against timm.create_model, and the gated model's CPU
latency against timm's hand-written SE model. Ratios are measured side by side in one run
(interleaved, median of --repeats), since absolute times on a shared machine mean little.

    python bench/apply_speed.py [--repeats 15] [--latency-rounds 30] [--threads 2]
                                [--out bench/out/apply_speed.md]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

import se_inject


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def apply_vs_create(name: str, repeats: int) -> dict:
    first, _ = _timed(lambda: se_inject.apply(timm.create_model(name)))  # includes lazy imports
    creates, applies = [], []
    for i in range(repeats):
        tc, model = _timed(lambda: timm.create_model(name, pretrained=False))
        ta, _ = _timed(lambda: se_inject.apply(model, ratio=16))
        creates.append(tc)
        applies.append(ta)
        print(f"  {name}: run {i + 1}/{repeats} create {tc * 1e3:.0f} ms, apply {ta * 1e3:.0f} ms",
              file=sys.stderr)
    c, a = statistics.median(creates), statistics.median(applies)
    return {"model": name, "create_ms": c * 1e3, "apply_ms": a * 1e3, "ratio": a / c,
            "first_apply_ms": first * 1e3}


@torch.no_grad()
def latency(batch: int, repeats: int, side: int = 224) -> dict:
    """Paired rounds: each round times all three models, in an order that rotates, and the
    ratios are taken within the round; the median of those ratios cancels slow drift."""
    gated = se_inject.apply(timm.create_model("resnet50").eval(), ratio=16)
    models = {"gated": gated, "native": timm.create_model("seresnet50").eval(),
              "plain": timm.create_model("resnet50").eval()}
    x = torch.randn(batch, 3, side, side)
    for m in models.values():  # warm up
        m(x)
    times = {k: [] for k in models}
    names = list(models)
    for i in range(repeats):
        for k in names[i % 3:] + names[:i % 3]:
            t, _ = _timed(lambda: models[k](x))
            times[k].append(t)
        print(f"  latency batch {batch}: round {i + 1}/{repeats}", file=sys.stderr)

    def paired(a, b):
        r = sorted(x / y for x, y in zip(times[a], times[b]))
        q = statistics.quantiles(r, n=4)
        return statistics.median(r), q[0], q[2]

    med = {k: statistics.median(v) for k, v in times.items()}
    return {"batch": batch, "repeats": repeats, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
            "gated/native": paired("gated", "native"), "native/plain": paired("native", "plain"),
            "gated/plain": paired("gated", "plain")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latency-rounds", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("bench/out/apply_speed.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = f"{platform.processor() or platform.machine()}, {args.threads} threads, " \
             f"torch {torch.__version__}, timm {timm.__version__}"
    rows = [apply_vs_create(n, args.repeats) for n in ("resnet50", "resnet152")]
    lat = latency(args.batch, args.latency_rounds)
    lines = [f"# se-inject core figures ({device}; medians of {args.repeats}, interleaved)", "",
             "| model | create (ms) | apply (ms) | apply ÷ create | first apply in process (ms) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['create_ms']:.0f} | {r['apply_ms']:.0f} | {r['ratio']:.3f} | "
              f"{r['first_apply_ms']:.0f} |" for r in rows]
    def ratio(key):
        m, lo, hi = lat[key]
        return f"{m:.3f} ({lo:.3f}–{hi:.3f})"

    lines += ["", f"CPU eager inference, batch {lat['batch']}, 224x224, fp32; ratios are medians of "
              f"{lat['repeats']} paired rounds (interquartile range in brackets):", "",
              "| gated resnet50 (ms) | timm seresnet50 (ms) | timm resnet50 (ms) | gated ÷ seresnet50 "
              "| seresnet50 ÷ resnet50 | gated ÷ resnet50 |", "|---:|---:|---:|---:|---:|---:|",
              f"| {lat['gated_ms']:.1f} | {lat['native_ms']:.1f} | {lat['plain_ms']:.1f} | "
              f"{ratio('gated/native')} | {ratio('native/plain')} | {ratio('gated/plain')} |"]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
