"""Figures for the core: apply() time against timm.create_model, and the gated model's CPU
latency against timm's hand-written SE model. Ratios are measured side by side in one run
(interleaved, median of --repeats), since absolute times on a shared machine mean little.

    python bench/apply_speed.py [--repeats 15] [--latency-rounds 30] [--threads 2]
                                [--out bench/out/apply_speed.md]
    python bench/apply_speed.py --session-ab [--repeats 15]   # the tracing session on and off
    python bench/apply_speed.py --phases resnet50,mobilenetv2_050 [--repeats 15]
                                                  # where a warm apply() spends its time
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


SESSION_MODELS = ("test_resnet", "test_convnext", "mobilenetv2_050", "resnet18", "resnet50")


def session_ab(name: str, repeats: int) -> dict:
    """apply() with the tracing session (se_inject.trace.tracing_session: one patch of the
    model's classes for all of apply's traces) against fx patching nn.Module on every trace,
    interleaved, each on a freshly created model."""
    from se_inject import trace
    times = {True: [], False: []}
    try:
        for i in range(repeats):
            for on in (True, False) if i % 2 else (False, True):
                trace._FX_HOOKS = on
                model = timm.create_model(name, pretrained=False).eval()
                t, _ = _timed(lambda: se_inject.apply(model))
                times[on].append(t)
            print(f"  {name}: round {i + 1}/{repeats}", file=sys.stderr)
    finally:
        trace._FX_HOOKS = True
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"model": name, "session_ms": on * 1e3, "per_trace_ms": off * 1e3, "ratio": on / off}


# apply()'s steps, as api.py and rewrite.py call them: (module, name, label, inside prepare)
_PHASES = (("api", "trace_model", "fx trace of the model", False),
           ("api", "propagate_shapes", "meta shape propagation", False),
           ("api", "build_view", "graph view", False),
           ("api", "find_candidates", "matching the rules", False),
           ("api", "local_keys", "node keys", False),
           ("api", "fingerprints", "block fingerprints", False),
           ("api", "prepare", "preparing the rewrites, in all", False),
           ("rewrite", "trace_block", "of which: standalone block traces", True),
           ("rewrite", "make_gate", "of which: building the gates", True),
           ("rewrite", "_compile", "of which: code generation", True))


def phases(name: str, repeats: int) -> dict:
    """Median time of each step of a warm apply() on freshly created models; the steps are
    timed by wrapping the functions apply() calls, so their sum leaves 'the rest'."""
    import importlib
    spent: dict[str, float] = {}
    originals = []
    for mod_name, fn_name, label, _ in _PHASES:
        mod = importlib.import_module(f"se_inject.{mod_name}")
        fn = getattr(mod, fn_name)

        def timed(*args, _fn=fn, _label=label, **kwargs):
            t = time.perf_counter()
            try:
                return _fn(*args, **kwargs)
            finally:
                spent[_label] = spent.get(_label, 0.0) + time.perf_counter() - t
        originals.append((mod, fn_name, fn))
        setattr(mod, fn_name, timed)
    runs = []
    try:
        se_inject.apply(timm.create_model(name, pretrained=False))
        for i in range(repeats):
            model = timm.create_model(name, pretrained=False)
            spent.clear()
            t, _ = _timed(lambda: se_inject.apply(model))
            top = sum(spent.get(label, 0.0) for _, _, label, inner in _PHASES if not inner)
            runs.append({**spent, "the rest (checks, commit, gc pause, session)": t - top,
                         "apply, total": t})
            print(f"  {name} phases: run {i + 1}/{repeats}", file=sys.stderr)
    finally:
        for mod, fn_name, fn in originals:
            setattr(mod, fn_name, fn)
    return {k: statistics.median(r.get(k, 0.0) for r in runs) * 1e3 for k in runs[0]}


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
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/out/apply_speed.md (--session-ab: apply_session.md)")
    ap.add_argument("--session-ab", action="store_true",
                    help="only time apply() with and without its tracing session")
    ap.add_argument("--phases", default=None, metavar="MODELS",
                    help="only time apply()'s steps on these timm models (comma-separated)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = f"{platform.processor() or platform.machine()}, {args.threads} threads, " \
             f"torch {torch.__version__}, timm {timm.__version__}"
    if args.session_ab:
        se_inject.apply(timm.create_model("resnet18"))  # lazy imports and fx's caches
        rows = [session_ab(n, args.repeats) for n in SESSION_MODELS]
        lines = [f"# apply() with and without its tracing session ({device}; medians of "
                 f"{args.repeats}, interleaved)", "",
                 "| model | apply, one session (ms) | apply, fx's patch per trace (ms) | ratio |",
                 "|---|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['session_ms']:.1f} | {r['per_trace_ms']:.1f} | "
                  f"{r['ratio']:.3f} |" for r in rows]
        return _write("\n".join(lines) + "\n", args.out or Path("bench/out/apply_session.md"))
    if args.phases:
        names = [n for n in args.phases.split(",") if n]
        unknown = [n for n in names if not timm.is_model(n)]
        if unknown or not names:
            ap.error(f"--phases {args.phases!r}: {', '.join(unknown) or 'no model'} is not a timm "
                     "model name; list them with timm.list_models()")
        se_inject.apply(timm.create_model("resnet18"))  # lazy imports and fx's caches
        results = {n: phases(n, args.repeats) for n in names}
        steps = [label for _, _, label, _ in _PHASES] + [k for k in next(iter(results.values()))
                                                          if k not in {p[2] for p in _PHASES}]
        lines = [f"# where a warm apply() spends its time ({device}; medians of {args.repeats}, "
                 "ms)", "", "| step | " + " | ".join(names) + " |",
                 "|---|" + "---:|" * len(names)]
        lines += [f"| {s} | " + " | ".join(f"{results[n].get(s, 0.0):.1f}" for n in names) + " |"
                  for s in steps]
        return _write("\n".join(lines) + "\n", args.out or Path("bench/out/apply_phases.md"))
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
    return _write("\n".join(lines) + "\n", args.out or Path("bench/out/apply_speed.md"))


def _write(text: str, out: Path) -> int:
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
