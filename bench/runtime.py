"""Run time of SE gates: the plain model, the gated model and timm's own SE model, eager and fused
(se_inject.fuse: torch.compile with Inductor), in inference and in a training step, timed side
by side so that each figure is a ratio from one run.

Targets: gated ÷ timm's native SE model in the same mode ≤ 1.00; the gates' overhead over the
plain model with the fused path ≤ +3% for CPU batch-1 inference, ≤ +3% for a GPU training step,
≤ +2% for GPU inference.

CPU: fp32, batches 1 and 8. GPU (when there is one): bf16 autocast, channels_last, batches 1
and 32. Each round times every variant once, in turn (a few iterations each, after warm-up and
compilation); a ratio is the median over rounds of the per-round ratios, with its interquartile
range. The fused variants are also checked against the eager ones (largest difference of the
outputs, relative to their largest value).

    python bench/runtime.py [--models resnet50,mobilenetv2_100,inception_v3] [--rounds 10]
                            [--modes infer,train] [--batches 1,8] [--no-fused]
                            [--no-freeze] [--options '{"cpp_wrapper": true}'] [--out FILE]
    python bench/runtime.py --split [--models ...] [--rounds 40]

--split (CPU) says where the fused batch-1 overhead goes instead: plain and gated models, both
frozen, profiled call by call (torch.profiler, with Inductor's kernels recording themselves),
split into convolutions, matrix products, Inductor's generated kernels and the rest (Python
between the calls, allocation, Dynamo's guards; the profiler's own cost lands here too), with
the whole call also timed without the profiler in each round.

A --models entry may name the rule to gate with: ``mobilenetv2_100:inverted-residual`` (the
paper's placement, after the projection) against the default ``inverted-residual-dw``.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

import se_inject

# model -> (apply() options, timm's model with SE built in, or None)
MODELS = {
    "resnet50": ({}, "seresnet50"),
    "mobilenetv2_100": ({"rules": ["inverted-residual-dw"]}, None),
    "inception_v3": ({}, None),
}


def model_spec(entry: str) -> tuple[str, dict, str | None]:
    """(timm name, apply() options, native model) for a --models entry: a timm name (options
    from MODELS), or ``name:rule`` to gate it with that rule instead (``+`` joins several)."""
    name, _, rules = entry.partition(":")
    opts, native = MODELS.get(name, ({}, None))
    if rules:
        opts = {**opts, "rules": rules.split("+")}
    return name, opts, native


def build(entry: str, device, channels_last: bool) -> dict[str, torch.nn.Module]:
    name, opts, native = model_spec(entry)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = timm.create_model(name, pretrained=False)
        gated = se_inject.apply(copy.deepcopy(base), **opts)
        models = {"base": base, "gated": gated}
        if native:
            models["native"] = timm.create_model(native, pretrained=False)
    for m in models.values():
        m.to(device)
        if channels_last:
            m.to(memory_format=torch.channels_last)
    return models


def step_fn(model, mode: str, x, autocast):
    if mode == "infer":
        model.eval()

        def run():
            with torch.no_grad(), autocast():
                return model(x)
    else:
        model.train()

        def run():
            with autocast():
                out = model(x)
            out.float().square().mean().backward()
            for p in model.parameters():
                p.grad = None
    return run


def measure(name: str, mode: str, batch: int, device, rounds: int, fused: bool,
            say, freeze: bool = True, options: dict | None = None) -> dict:
    cuda = device.type == "cuda"
    # Every configuration compiles fresh models of the same classes. Dynamo keeps compiled
    # code per Python function (here the model class's forward), up to 8 entries, and past
    # that runs the function eagerly: a "fused" column would then time eager code. Earlier
    # configurations' entries are dropped here, and main() makes hitting the limit an error.
    torch._dynamo.reset()
    models = build(name, device, channels_last=cuda)
    cfg = models["base"].pretrained_cfg
    x = torch.randn(batch, *cfg["input_size"], device=device)
    if cuda:
        x = x.to(memory_format=torch.channels_last)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else \
            torch.autocast("cpu", enabled=False)

    variants = {f"{k} eager": m for k, m in models.items()}
    if fused:
        for k, m in models.items():
            variants[f"{k} fused"] = se_inject.fuse(copy.deepcopy(m).eval()
                                                    if mode == "infer" else copy.deepcopy(m),
                                                    freeze=freeze and mode == "infer",
                                                    options=options)
    runs = {}
    diffs = {}
    for label, m in variants.items():
        t = time.perf_counter()
        runs[label] = step_fn(m, mode, x, autocast)
        for _ in range(2):       # compile (fused) and warm up
            runs[label]()
        if cuda:
            torch.cuda.synchronize()
        say(f"  {label}: ready in {time.perf_counter() - t:.1f} s")
        if label.endswith("fused") and mode == "infer":
            eager = variants[label.replace("fused", "eager")]
            with torch.no_grad(), autocast():
                a, b = eager.eval()(x).float(), m.eval()(x).float()
            diffs[label.split()[0]] = ((a - b).abs().max() / a.abs().max()).item()
    # iterations per timing: about 0.2 s of the slowest variant
    t = time.perf_counter()
    runs["gated eager"]()
    if cuda:
        torch.cuda.synchronize()
    iters = max(1, min(50, int(0.2 / max(1e-4, time.perf_counter() - t))))
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for label in order:
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(iters):
                runs[label]()
            if cuda:
                torch.cuda.synchronize()
            times[label].append((time.perf_counter() - t) / iters)
    return {"model": name, "mode": mode, "batch": batch, "times": times, "diffs": diffs,
            "native": model_spec(name)[2]}


def ratio(times, a: str, b: str) -> str:
    if a not in times or b not in times:
        return "—"
    rs = sorted(x / y for x, y in zip(times[a], times[b]))
    q1, med, q3 = rs[len(rs) // 4], statistics.median(rs), rs[(3 * len(rs)) // 4]
    return f"{med:.3f} ({q1:.3f}–{q3:.3f})"


def table(results: list[dict], device_name: str, rounds: int) -> str:
    lines = [f"# se-inject runtime on {device_name}", "",
             f"Ratios of time per call, median over {rounds} rounds (interquartile range); "
             "'native' is timm's hand-built SE model.", "",
             "| model | mode | batch | base ms | gated ÷ base, eager | gated ÷ base, fused "
             "| gated ÷ native, eager | gated ÷ native, fused | fused ÷ eager, gated |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        t = r["times"]
        base_ms = statistics.median(t["base eager"]) * 1e3
        model = r["model"] + (f" (vs {r['native']})" if r["native"] else "")
        lines.append(f"| {model} | {r['mode']} | {r['batch']} | {base_ms:.1f} "
                     f"| {ratio(t, 'gated eager', 'base eager')} "
                     f"| {ratio(t, 'gated fused', 'base fused')} "
                     f"| {ratio(t, 'gated eager', 'native eager')} "
                     f"| {ratio(t, 'gated fused', 'native fused')} "
                     f"| {ratio(t, 'gated fused', 'gated eager')} |")
    diffs = [(r["model"], k, v) for r in results for k, v in r["diffs"].items()]
    if diffs:
        worst = {}
        for model, k, v in diffs:
            worst[(model, k)] = max(v, worst.get((model, k), 0.0))
        lines += ["", "Fused vs eager outputs, inference, max |difference| ÷ max |output|: " +
                  ", ".join(f"{m} {k} {v:.1e}" for (m, k), v in worst.items())]
    return "\n".join(lines) + "\n"


# What a profiled call is split into, by the name of the profiler's event.
_PARTS = ("convolutions", "matrix products", "generated kernels")


def _part(event: str) -> str | None:
    if "convolution" in event:
        return "convolutions"
    if event.startswith("mkl::") or event in ("aten::addmm", "aten::mm", "aten::linear"):
        return "matrix products"
    if "cpp_fused" in event:
        return "generated kernels"
    return None


def split(name: str, rounds: int, say, calls: int = 4) -> dict:
    """Where the time of a frozen, fused batch-1 inference call goes, plain against gated.
    Each round profiles ``calls`` calls of each model in turn, then times as many without the
    profiler; per call, in µs (split_table takes the medians over rounds)."""
    from torch._inductor import config as inductor_config
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    models = build(name, torch.device("cpu"), channels_last=False)
    models.pop("native", None)
    x = torch.randn(1, *models["base"].pretrained_cfg["input_size"])
    fused = {k: se_inject.fuse(m.eval(), freeze=True) for k, m in models.items()}
    with torch.no_grad(), inductor_config.patch({"cpp.enable_kernel_profile": True}):
        for k, m in fused.items():
            t = time.perf_counter()
            for _ in range(2):  # compile and warm up
                m(x)
            say(f"  {k} fused: ready in {time.perf_counter() - t:.1f} s")
    parts: dict[str, list[dict]] = {k: [] for k in fused}
    with torch.no_grad():
        for r in range(rounds):
            for k in (fused if r % 2 == 0 else reversed(list(fused))):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    t = time.perf_counter()
                    for _ in range(calls):
                        fused[k](x)
                    wall = (time.perf_counter() - t) / calls * 1e6
                got = dict.fromkeys(_PARTS, 0.0)
                for e in prof.key_averages():
                    part = _part(e.key)
                    if part:
                        got[part] += e.self_cpu_time_total / calls
                got["the rest"] = wall - sum(got[p] for p in _PARTS)
                got["call"] = wall
                t = time.perf_counter()
                for _ in range(calls):
                    fused[k](x)
                got["call, not profiled"] = (time.perf_counter() - t) / calls * 1e6
                parts[k].append(got)
            say(f"  round {r + 1}/{rounds}")
    return {"model": name, "parts": parts}


def split_table(results: list[dict], device_name: str, rounds: int) -> str:
    lines = [f"# Where the fused batch-1 overhead goes, {device_name}", "",
             "Frozen inference (`fuse(freeze=True)`), profiled with torch.profiler (Inductor's "
             f"kernels recording themselves); µs per call, medians over {rounds} rounds. A "
             "share is the median over rounds of the part's difference divided by the plain "
             "model's call in the same round; the difference in µs is that share of the median "
             "plain call. Times include the profiler's own cost, most of it in 'the rest' (the "
             "gated model records more events); the last row times the same calls without the "
             "profiler, in the same rounds.", "",
             "| model | part | plain µs | gated µs | gated − plain µs | share of the plain call |",
             "|---|---|---:|---:|---:|---:|"]
    for r in results:
        p = r["parts"]
        for part in _PARTS + ("the rest", "call", "call, not profiled"):
            a = statistics.median(g[part] for g in p["base"])
            b = statistics.median(g[part] for g in p["gated"])
            # each round's difference as a share of that round's plain call, so that the
            # machine's speed drifting between rounds moves both alike
            ref = "call, not profiled" if part == "call, not profiled" else "call"
            share = statistics.median((y[part] - x[part]) / x[ref]
                                      for x, y in zip(p["base"], p["gated"]))
            label = {"call": "whole call", "call, not profiled": "whole call, not profiled"
                     }.get(part, part)
            d = share * statistics.median(g[ref] for g in p["base"])
            lines.append(f"| {r['model']} | {label} | {a:.0f} | {b:.0f} | {d:+.0f} "
                         f"| {share:+.1%} |")
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    """The processor's model name (Linux), or just "CPU"."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return "CPU"


def main() -> None:
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # see measure()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--modes", default="infer,train")
    ap.add_argument("--batches", default=None, help="default: 1,8 on CPU, 1,32 on GPU")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-fused", action="store_true")
    ap.add_argument("--no-freeze", action="store_true",
                    help="fused inference without Inductor's freezing (norms stay separate)")
    ap.add_argument("--options", type=json.loads, default=None,
                    help='Inductor options for the fused models, JSON: {"cpp_wrapper": true}')
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--split", action="store_true",
                    help="CPU: where the fused batch-1 inference overhead goes (see above)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()

    cpu_name = f"{_cpu_name()} ({torch.get_num_threads()} threads), fp32"

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    def emit(text: str, default: str) -> None:
        out = args.out or Path("bench/out") / default
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(text)
    if args.split:
        if cuda:
            ap.error("--split profiles CPU runs only")
        results = []
        names = args.models.split(",")
        for i, m in enumerate(names, 1):
            say(f"[{i}/{len(names)}] {m}: split")
            results.append(split(m, args.rounds, say))
        emit(split_table(results, cpu_name, args.rounds), "runtime_split_cpu.md")
        return
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else cpu_name
    if cuda:
        device_name += ", bf16 autocast, channels_last"
    device_name += "; fused inference " + ("without" if args.no_freeze else "with") + " freezing"
    if args.options:
        device_name += f", Inductor options {json.dumps(args.options)}"
    batches = [int(b) for b in (args.batches or ("1,32" if cuda else "1,8")).split(",")]
    jobs = [(m, mode, b) for m in args.models.split(",") for mode in args.modes.split(",")
            for b in batches]
    results = []
    for i, (m, mode, b) in enumerate(jobs, 1):
        say(f"[{i}/{len(jobs)}] {m} {mode} batch {b}")
        results.append(measure(m, mode, b, device, args.rounds, not args.no_fused, say,
                               freeze=not args.no_freeze, options=args.options))
    emit(table(results, device_name, args.rounds), f"runtime_{'gpu' if cuda else 'cpu'}.md")


if __name__ == "__main__":
    main()
