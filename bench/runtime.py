"""Run time of SE gates: the plain model, the gated model and timm's own SE model, eager and fused
(se_inject.fuse: torch.compile with Inductor), in inference and in a training step, timed side
by side so that each figure is a ratio from one run.

Targets: gated ÷ timm's native SE model in the same mode ≤ 1.00; the gates' overhead over the
plain model with the fused path ≤ +3% for CPU batch-1 inference, ≤ +3% for a GPU training step,
≤ +2% for GPU inference.

CPU: fp32, batches 1 and 8. GPU (when there is one): bf16 autocast, channels_last, batches 1
and 32. Each round times every variant once, in turn (a few iterations each, after warm-up and
compilation); a ratio is the median over rounds of the per-round ratios, with its interquartile
range. Fused inference outputs are also checked against the eager model's in fp32 (largest
difference relative to the largest output), beside the eager model's own under bf16 autocast.

    python bench/runtime.py [--models resnet50,mobilenetv2_100,inception_v3] [--rounds 10]
                            [--modes infer,train] [--batches 1,8] [--no-fused]
                            [--no-freeze] [--options '{"cpp_wrapper": true}'] [--out FILE]
                            [--excitation-matmul]
    python bench/runtime.py --jobs 12 [--until $(( $(date +%s) + 600 ))] [...]
    python bench/runtime.py --split [--models ...] [--rounds 40]

--jobs N prepares (builds and compiles) N configurations at once, each in a process of its own,
and times them one at a time while the others are paused: on a machine with many cores the
compiles, which take most of a GPU run, overlap, and no timing shares the machine with one.
--until stops waiting for compiles when only the time to time what is ready is left, and
names in the table what was left out.

--excitation-matmul adds a variant, "gated-mm", compiled with its gates' two layers as matrix
products (calls to MKL or cuBLAS) instead of a multiply and a sum that Inductor generates
(se_inject.gate.EXCITATION_AS_SUM), timed in the same rounds.

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
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import timm
import torch

import se_inject
from se_inject import gate as gate_module

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


def step_fn(model, mode: str, x, autocast, cuda_graphs: bool = False):
    # Inductor's CUDA graphs (option "triton.cudagraphs") replay into memory of their own:
    # each call is a new step, whose outputs may overwrite the last one's
    mark = torch.compiler.cudagraph_mark_step_begin if cuda_graphs else (lambda: None)
    if mode == "infer":
        model.eval()

        def run():
            mark()
            with torch.no_grad(), autocast():
                return model(x)
    else:
        model.train()

        def run():
            mark()
            with autocast():
                out = model(x)
            out.float().square().mean().backward()
            for p in model.parameters():
                p.grad = None
    return run


def _as_matmul(run):
    """``run`` with the gates' two layers compiled as matrix products instead of a multiply and
    a sum (se_inject.gate.EXCITATION_AS_SUM off), set around every call: Dynamo guards on the
    setting, so the two forms keep compiled code of their own."""
    def wrapped():
        before, gate_module.EXCITATION_AS_SUM = gate_module.EXCITATION_AS_SUM, False
        try:
            return run()
        finally:
            gate_module.EXCITATION_AS_SUM = before
    return wrapped


def prepare(name: str, mode: str, batch: int, device, fused: bool, say,
            freeze: bool = True, options: dict | None = None,
            excitation_matmul: bool = False) -> dict:
    """Build the models of one configuration, compile the fused ones and warm every variant up:
    what time_rounds() then times. ``excitation_matmul``: a further variant, "gated-mm fused",
    whose gates' layers are compiled as matrix products (_as_matmul)."""
    cuda = device.type == "cuda"
    # Every configuration compiles fresh models of the same classes. Dynamo keeps compiled
    # code per Python function (here the model class's forward), up to 8 entries, and past
    # that runs the function eagerly: a "fused" column would then time eager code. Earlier
    # configurations' entries are dropped here, and _setup() makes hitting the limit an error.
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
    graphs = cuda and bool((options or {}).get("triton.cudagraphs"))
    if fused:
        compiled = dict(models)
        if excitation_matmul:  # the same gated model, its own compiled copy
            compiled["gated-mm"] = models["gated"]
        for k, m in compiled.items():
            variants[f"{k} fused"] = se_inject.fuse(copy.deepcopy(m).eval()
                                                    if mode == "infer" else copy.deepcopy(m),
                                                    freeze=freeze and mode == "infer",
                                                    options=options)
    runs = {}
    diffs = {}
    for label, m in variants.items():
        t = time.perf_counter()
        runs[label] = step_fn(m, mode, x, autocast, cuda_graphs=graphs and "fused" in label)
        if label == "gated-mm fused":
            runs[label] = _as_matmul(runs[label])
        for _ in range(2):       # compile (fused) and warm up
            runs[label]()
        if cuda:
            torch.cuda.synchronize()
        say(f"  {label}: ready in {time.perf_counter() - t:.1f} s")
        if label.endswith("fused") and mode == "infer":
            kind = label.split()[0]
            eager = variants[f"{kind.removesuffix('-mm')} eager"]
            check = lambda: _errors(eager, m, x, autocast, graphs)  # noqa: E731
            diffs[kind] = _as_matmul(check)() if kind == "gated-mm" else check()
    return {"model": name, "mode": mode, "batch": batch, "runs": runs, "diffs": diffs,
            "cuda": cuda}


def _errors(eager, fused, x, autocast, graphs: bool) -> tuple[float, float]:
    """The fused model's output against the eager model's in fp32, and the eager model's own
    under autocast against that (0 on the CPU, which runs fp32): max |difference| ÷ max
    |reference|. Under bf16 the second is the yardstick for the first; a randomly initialised
    Inception-v3 in eval mode has outputs near 1e12 and bf16 moves them by 3-20%."""
    def rel(a, ref):
        return ((a - ref).abs().max() / ref.abs().max()).item()
    with torch.no_grad():
        tf32 = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False  # (matrix products: off by default)
        try:
            ref = eager.eval()(x).float()
        finally:
            torch.backends.cudnn.allow_tf32 = tf32
        with autocast():
            low = eager(x).float()
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            out = fused.eval()(x).float()
    return rel(out, ref), rel(low, ref)


def time_rounds(prep: dict, rounds: int) -> dict:
    """Time every variant of a prepare()d configuration once per round, in turn (the order
    reversed every other round)."""
    runs, cuda = prep["runs"], prep["cuda"]
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
    name = prep["model"]
    return {"model": name, "mode": prep["mode"], "batch": prep["batch"], "times": times,
            "diffs": prep["diffs"], "native": model_spec(name)[2]}


def measure(name: str, mode: str, batch: int, device, rounds: int, fused: bool,
            say, freeze: bool = True, options: dict | None = None,
            excitation_matmul: bool = False) -> dict:
    return time_rounds(prepare(name, mode, batch, device, fused, say, freeze, options,
                               excitation_matmul), rounds)


def _setup() -> None:
    """Settings of every process that times."""
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # see prepare()


def _worker(job: tuple, device_type: str, kw: dict, rounds: int, conn) -> None:
    """One configuration in its own process (run_parallel): prepare, say so, wait for the
    driver's word, time, send the result."""
    os.setpgrp()  # a process group of its own, which Inductor's compile workers join
    _setup()
    name, mode, batch = job

    def say(msg):
        print(f"[{name} {mode} {batch}]{msg}", file=sys.stderr, flush=True)
    try:
        prep = prepare(name, mode, batch, torch.device(device_type), say=say, **kw)
        conn.send(("ready", None))
        conn.recv()
        conn.send(("done", time_rounds(prep, rounds)))
    except Exception as e:  # the driver reports it beside the table
        conn.send(("failed", f"{type(e).__name__}: {e}"))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):  # not yet in a group of its own, or gone
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def run_parallel(jobs: list[tuple], device, kw: dict, rounds: int, n: int, until: float,
                 say, done) -> dict[tuple, str]:
    """Prepare (build and compile) up to ``n`` configurations at once, each in a process of
    its own, and time them one at a time while the others are paused (SIGSTOP, with their
    compile workers), so that no timing shares the machine with a compile. A configuration
    is timed once there is no time left to wait for the others, or none is left compiling.
    ``until`` (time.time()) is when the last timing must end: what cannot be prepared and
    timed by then is left out. ``done(result)`` is called as each is timed. Returns why each
    configuration left out was left out."""
    import multiprocessing as mp
    import signal

    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked process
    # Inductor compiles kernels in a pool of processes, one per core by default, in each
    # configuration's process: share the cores out instead.
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS",
                          str(max(2, min(8, 4 * (os.cpu_count() or 1) // min(n, len(jobs))))))
    waiting = list(jobs)
    compiling: dict[tuple, tuple] = {}
    ready: list[tuple] = []
    left_out: dict[tuple, str] = {}
    per_job = 20.0  # seconds one timing takes: a guess until one has been timed

    def start_more():
        while waiting and len(compiling) + len(ready) < n:
            job = waiting.pop(0)
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_worker, args=(job, device.type, kw, rounds, there),
                               daemon=True)
            proc.start()
            compiling[job] = procs[job] = (proc, here)
            say(f"[{job[0]} {job[1]} {job[2]}] preparing")

    def poll():
        for job, (proc, conn) in list(compiling.items()):
            if conn.poll():
                kind, what = conn.recv()
                if kind == "ready":
                    ready.append(job)
                    del compiling[job]
                    say(f"[{job[0]} {job[1]} {job[2]}] ready")
                    continue
                left_out[job] = what
            elif proc.is_alive():
                continue
            else:
                left_out[job] = f"its process ended (exit code {proc.exitcode})"
            del compiling[job]
            say(f"[{job[0]} {job[1]} {job[2]}] left out: {left_out[job]}")

    procs: dict[tuple, tuple] = {}
    timed = 0
    start_more()
    while compiling or ready or waiting:
        # wait for compiles while there would still be time to time every one of them
        while compiling and (time.time() < until - per_job * (len(ready) + len(compiling))
                             or (not ready and time.time() < until - per_job)):
            time.sleep(0.5)
            poll()
        poll()
        if not ready and not compiling:  # every one of them failed: start the next ones
            start_more()
            continue
        if not ready:  # no time left for those still compiling
            for job, (proc, _) in compiling.items():
                _signal_group(proc.pid, signal.SIGKILL)
                left_out[job] = "not prepared in time"
            compiling.clear()
            for job in waiting:
                left_out[job] = "not started in time"
            waiting.clear()
            break
        for proc, _ in compiling.values():
            _signal_group(proc.pid, signal.SIGSTOP)
        ready.sort(key=jobs.index)
        while ready:
            job = ready.pop(0)
            proc, conn = procs[job]
            if time.time() + per_job > until:
                _signal_group(proc.pid, signal.SIGKILL)
                left_out[job] = "not timed in time"
                continue
            t = time.time()
            conn.send("go")
            kind, what = conn.recv()
            took = time.time() - t
            per_job = 1.2 * took if timed == 0 else max(per_job, 1.2 * took)
            timed += 1
            proc.join()
            if kind == "done":
                done(what)
                say(f"[{job[0]} {job[1]} {job[2]}] timed in {took:.0f} s")
            else:
                left_out[job] = what
        for proc, _ in compiling.values():
            _signal_group(proc.pid, signal.SIGCONT)
        start_more()
    return left_out


def ratio(times, a: str, b: str) -> str:
    if a not in times or b not in times:
        return "—"
    rs = sorted(x / y for x, y in zip(times[a], times[b]))
    q1, med, q3 = rs[len(rs) // 4], statistics.median(rs), rs[(3 * len(rs)) // 4]
    return f"{med:.3f} ({q1:.3f}–{q3:.3f})"


def table(results: list[dict], device_name: str, rounds: int,
          left_out: dict[tuple, str] | None = None) -> str:
    # --excitation-matmul: the gated model compiled with its gates' layers as matrix products,
    # beside the same model compiled as it is by default (a multiply and a sum)
    mms = any("gated-mm fused" in r["times"] for r in results)
    lines = [f"# se-inject runtime on {device_name}", "",
             f"Ratios of time per call, median over {rounds} rounds (interquartile range); "
             "'native' is timm's hand-built SE model.", "",
             "| model | mode | batch | base ms | gated ÷ base, eager | gated ÷ base, fused "
             "| gated ÷ native, eager | gated ÷ native, fused | fused ÷ eager, gated |"
             + (" gated-mm ÷ base, fused | gated-mm ÷ native, fused "
                "| gated ÷ gated-mm, fused |" if mms else ""),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 3 if mms else "")]
    for r in results:
        t = r["times"]
        base_ms = statistics.median(t["base eager"]) * 1e3
        model = r["model"] + (f" (vs {r['native']})" if r["native"] else "")
        lines.append(f"| {model} | {r['mode']} | {r['batch']} | {base_ms:.1f} "
                     f"| {ratio(t, 'gated eager', 'base eager')} "
                     f"| {ratio(t, 'gated fused', 'base fused')} "
                     f"| {ratio(t, 'gated eager', 'native eager')} "
                     f"| {ratio(t, 'gated fused', 'native fused')} "
                     f"| {ratio(t, 'gated fused', 'gated eager')} |"
                     + (f" {ratio(t, 'gated-mm fused', 'base fused')} "
                        f"| {ratio(t, 'gated-mm fused', 'native fused')} "
                        f"| {ratio(t, 'gated fused', 'gated-mm fused')} |" if mms else ""))
    worst: dict[tuple, tuple] = {}
    for r in results:
        for k, (fused, eager) in r["diffs"].items():
            old = worst.get((r["model"], k), (0.0, 0.0))
            worst[(r["model"], k)] = (max(fused, old[0]), max(eager, old[1]))
    if worst:
        low = any(e for _, e in worst.values())
        lines += ["", "Fused inference outputs against the eager model's in fp32, max "
                  "|difference| ÷ max |output|" + (" (in brackets, the eager model's own "
                                                   "under autocast)" if low else "") + ": " +
                  ", ".join(f"{m} {k} {f:.1e}" + (f" ({e:.1e})" if low else "")
                            for (m, k), (f, e) in worst.items())]
    if left_out:
        lines += ["", "Not measured: " + "; ".join(f"{m} {mode} batch {b} ({why})"
                                                 for (m, mode, b), why in left_out.items())]
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
    _setup()
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
    ap.add_argument("--jobs", type=int, default=1,
                    help="prepare (build and compile) this many configurations at once, each "
                         "in a process of its own, and time them one at a time")
    ap.add_argument("--until", type=float, default=None,
                    help="when (seconds since the epoch, as `date +%%s`) the last timing must "
                         "end: configurations that cannot be timed by then are left out")
    ap.add_argument("--excitation-matmul", action="store_true",
                    help="also time the gated model compiled with its gates' two layers as "
                         "matrix products, beside the default (a multiply and a sum)")
    ap.add_argument("--split", action="store_true",
                    help="CPU: where the fused batch-1 inference overhead goes (see above)")
    args = ap.parse_args()
    unknown = [m for m in args.models.split(",") if not timm.is_model(m.split(":")[0])]
    if unknown:
        ap.error(f"--models: {', '.join(unknown)} is not a timm model name (a name may end in "
                 "':RULE', the rule to gate it with); list them with timm.list_models()")
    cuda = torch.cuda.is_available()
    cpu_name = f"{_cpu_name()} ({torch.get_num_threads()} threads), fp32"

    def say(msg):
        print(msg, file=sys.stderr, flush=True)

    def emit(text: str, default: str, show: bool = True) -> None:
        out = args.out or Path("bench/out") / default
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        if show:
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
    default_out = f"runtime_{'gpu' if cuda else 'cpu'}.md"
    results = []
    if args.jobs == 1 and args.until is None:
        for i, (m, mode, b) in enumerate(jobs, 1):
            say(f"[{i}/{len(jobs)}] {m} {mode} batch {b}")
            results.append(measure(m, mode, b, device, args.rounds, not args.no_fused, say,
                                   freeze=not args.no_freeze, options=args.options,
                                   excitation_matmul=args.excitation_matmul))
        emit(table(results, device_name, args.rounds), default_out)
        return

    def done(result: dict) -> None:  # the table so far, written as each is timed
        results.append(result)
        results.sort(key=lambda r: jobs.index((r["model"], r["mode"], r["batch"])))
        emit(table(results, device_name, args.rounds), default_out, show=False)
    kw = {"fused": not args.no_fused, "freeze": not args.no_freeze, "options": args.options,
          "excitation_matmul": args.excitation_matmul}
    left_out = run_parallel(jobs, device, kw, args.rounds, max(1, args.jobs),
                            args.until if args.until is not None else float("inf"), say, done)
    emit(table(results, device_name, args.rounds, left_out), default_out)


if __name__ == "__main__":
    main()
