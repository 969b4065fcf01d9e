"""Coverage sweep: apply() on one architecture of every timm model module (--all: every timm
architecture) and on every torchvision classification model.

Per model: create (timed), the original output, plan, apply (timed), the output shape again,
and a backward pass that must reach every gate; with --save, a gated model saved with
se_inject.save and read back with se_inject.load must come back of its class with its
state_dict equal, bit for bit. Writes a Markdown table and summary.
Status: gated; kept (every block already holds a channel gate: apply() changes nothing);
refused (an SEInjectError, with its reason); base-fails (the unmodified model fails);
CRASH or broken (a bug in se-inject: any other exception, a changed output shape, a gate no
gradient reaches, a model that does not come back whole from a checkpoint).

    python bench/coverage.py [--all] [--only resnet,convnext] [--skip-torchvision]
                             [--max-params MILLIONS] [--repeats N] [--save]
                             [--out bench/out/coverage.md]
                             [--resume FILE.jsonl] [--minutes M]

--all takes the architectures smallest first (by parameter count). --resume appends each
model's row to FILE.jsonl as it finishes and skips the models already there, so a sweep of
many hours can run in pieces; --minutes stops starting new models after M minutes and reports
what was swept (the summary says how many of how many).

Times are the best of --repeats runs. Beside apply ÷ create, each model's bare torch.fx trace
÷ create is reported: the part of the cost no fx-based pass can avoid.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import timm
import torch
import torchvision

import se_inject
from se_inject.trace import TraceOptions, UnpackingTracer, _NothingLeft, tracing_session

torch.set_num_threads(2)
# torchvision models carry no input size; these need more than 224 (Inception-v3's auxiliary
# head, run in training mode, needs 299).
TV_SIZES = {"inception_v3": (3, 299, 299)}


def _meta_params(name: str) -> int | None:
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters())
    except Exception:  # a model that cannot be built on meta is just not a candidate
        return None


def timm_representatives(modules: list[str] | None) -> list[tuple[str, str]]:
    """(family, model): the smallest of the few shortest-named architectures of each module."""
    out = []
    for family in modules or timm.list_modules():
        names = timm.list_models(module=family)
        if not names:
            continue
        candidates = sorted(names, key=lambda n: (len(n), n))[:6]
        sized = [(p, n) for n in candidates if (p := _meta_params(n)) is not None]
        out.append((family, min(sized)[1] if sized else candidates[0]))
        print(f"  picked {out[-1][1]} for {family}", file=sys.stderr)
    return out


def _input_size(model, name: str) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("input_size", TV_SIZES.get(name, (3, 224, 224))))


def _train_step(model, x) -> None:
    model.train()
    sum(o.float().mean() for o in _tensors(model(x))).backward()


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    return []


def _first_sentence(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) < 300 else text[:297] + "..."


class _BareTracer(UnpackingTracer):
    """torch.fx's tracer with the leaf modules and functions timm and torchvision register,
    and se-inject's proxies, argument handling and parameter lookup (which unpack ``a, b =
    x.chunk(2)`` without disassembling the caller, skip fx's per-node bookkeeping, and find a
    parameter's name by its identity where fx walks every parameter of the model on each
    access): the least any fx pass spends on a model before it has looked at a single node."""

    def __init__(self):
        self.leaves, kwargs = TraceOptions().tracer_args()  # what se-inject's tracer starts from
        super().__init__(**kwargs)

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def _fx_floor(model) -> float | None:
    """Seconds for one bare fx trace of the model, or None where fx alone cannot trace it.

    Timed within a tracing session, as apply() traces, session included: fx's own patch of
    nn.Module on every trace costs several milliseconds with timm imported (see
    se_inject.trace._session_patch), which apply() does not pay and a floor must not count."""
    tracer = _BareTracer()
    try:
        with _NothingLeft(model):  # timm caches (attention biases) would keep fx's proxies
            t = time.perf_counter()
            with tracing_session(model):
                tracer.trace(model)
            return time.perf_counter() - t
    except Exception:  # fx needs se-inject's help (leaf retries, instance forwards) here
        return None


def _class_path(m) -> str:
    return f"{type(m).__module__}.{type(m).__qualname__}"


def _round_trip(model) -> str | None:
    """None where se_inject.save, then se_inject.load, give back a model of the same class whose
    state_dict equals the model's, key for key and bit for bit; else what differed."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gated.safetensors"
        se_inject.save(model, path)
        back = se_inject.load(path)
    if type(back) is not type(model):
        return f"loaded back as {_class_path(back)}, not {_class_path(model)}"
    mine, theirs = model.state_dict(), back.state_dict()
    if list(mine) != list(theirs):
        return f"loaded back with other state_dict keys ({len(theirs)} against {len(mine)})"
    differ = next((k for k in mine if not torch.equal(mine[k], theirs[k])), None)
    return None if differ is None else f"loaded back with another `{differ}`"


def check(family: str, name: str, build, max_params: float | None = None,
          repeats: int = 1, round_trip: bool = False) -> dict:
    """One model's row. ``round_trip``: a gated model must also come back whole from
    se_inject.save and se_inject.load (_round_trip), or its status is "broken"."""
    row = {"model": name, "family": family, "sites": {}, "status": "", "reason": ""}
    if max_params is not None and family != "torchvision":
        n = _meta_params(name)
        if n is not None and n > max_params:
            row.update(status="skipped", reason=f"{n / 1e6:.0f} M parameters: over --max-params "
                                                f"{max_params / 1e6:.0f} M on this machine")
            return row
    try:
        times = []
        for _ in range(repeats):  # the best of each: this machine is shared and noisy
            t = time.perf_counter()
            model = build()
            times.append(time.perf_counter() - t)
        row["create_s"] = min(times)
        model.eval()
        size = _input_size(model, name)
        x = torch.randn(2, *size)
        with torch.no_grad():
            before = [o.shape for o in _tensors(model(x))]
    except Exception as exc:
        row.update(status="base-fails", reason=_first_sentence(f"{type(exc).__name__}: {exc}"))
        return row
    try:
        plan = se_inject.plan(model)
        row["sites"] = plan.by_rule()
        floors = [_fx_floor(model) for _ in range(repeats)]
        if None not in floors:
            row["fx_floor_s"] = min(floors)
        times = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(repeats):  # on fresh copies; the last on the model checked below
                target = model if i == repeats - 1 else build().eval()
                t = time.perf_counter()
                se_inject.apply(target)
                times.append(time.perf_counter() - t)
                del target
        row["apply_s"] = min(times)
    except se_inject.SEInjectError as exc:
        row.update(status="refused", reason=_first_sentence(f"{type(exc).__name__}: {exc}"))
        return row
    except Exception as exc:
        row.update(status="CRASH", reason=_first_sentence(f"{type(exc).__name__}: {exc}"),
                   trace=traceback.format_exc(limit=-4))
        return row
    row["ratio"] = row["apply_s"] / row["create_s"]
    if "fx_floor_s" in row:
        row["floor_ratio"] = row["fx_floor_s"] / row["create_s"]
    if not plan.sites:  # apply() warned and changed nothing: every block holds a gate
        held = Counter(s.reason for s in plan.skipped if "gate" in s.reason)
        row.update(status="kept", reason="; ".join(f"{n} × {r}" for r, n in held.items()))
        return row
    gates = [(n, g) for n, g in model.named_modules() if isinstance(g, se_inject.ChannelGate)]
    try:
        with torch.no_grad():
            after = [o.shape for o in _tensors(model(x))]
        if after != before:
            row.update(status="broken", reason=f"output shapes {before} became {after}")
            return row
        _train_step(model, x)
        missing = [n for n, g in gates if any(p.grad is None for p in g.parameters())]
        if missing:
            row.update(status="broken", reason=f"no gradient reaches {len(missing)} gate(s), "
                                               f"e.g. {missing[0]}")
            return row
    except Exception as exc:
        try:  # the same step on the unmodified model: whose failure is it?
            _train_step(build(), x)
        except Exception as base_exc:
            row.update(status="base-fails", reason=_first_sentence(
                f"training step of the unmodified model: {type(base_exc).__name__}: {base_exc}"))
            return row
        row.update(status="CRASH", reason=_first_sentence(f"after apply: {type(exc).__name__}: {exc}"),
                   trace=traceback.format_exc(limit=-4))
        return row
    if round_trip:
        try:
            why = _round_trip(model)
        except Exception as exc:  # a gated model se_inject cannot save or load back is a bug
            why = _first_sentence(f"{type(exc).__name__}: {exc}")
        if why is not None:
            row.update(status="broken", reason=f"save and load: {why}")
            return row
    row["status"] = "gated"
    return row


def _sites(row) -> str:
    return ", ".join(f"{r} {n}" for r, n in sorted(row["sites"].items())) or "-"


def report(rows: list[dict], planned: int | None = None) -> str:
    fams = sorted({r["family"] for r in rows if r["family"] != "torchvision"})
    gated_fams = sorted({r["family"] for r in rows if r["family"] != "torchvision"
                         and r["status"] in ("gated", "kept")})
    status = Counter(r["status"] for r in rows)
    tv = [r for r in rows if r["family"] == "torchvision"]
    ratios = [r["ratio"] for r in rows if "ratio" in r]
    worst = max(rows, key=lambda r: r.get("ratio", 0)) if ratios else None
    lines = ["# se-inject coverage", ""]
    if planned is not None and planned > len(rows):
        lines.append(f"- partial sweep: {len(rows)} of {planned} models (the rest not yet run; "
                     "--resume continues it).")
    lines += [f"- timm: {len(gated_fams)} of {len(fams)} model modules gated or already gated "
             f"(one architecture each unless --all).",
             f"- torchvision: {sum(r['status'] == 'gated' for r in tv)} of {len(tv)} "
             "classification models gated.",
             "- status counts: " + ", ".join(f"{k or '?'} {v}" for k, v in sorted(status.items())),
             ]
    if worst is not None:
        within = ", ".join(f"≤ {c}: {sum(x <= c for x in ratios)}" for c in (0.5, 1, 2))
        lines.append(f"- apply ÷ create over {len(ratios)} models: median "
                     f"{statistics.median(ratios):.3f}, worst {worst['ratio']:.3f} "
                     f"({worst['model']}); {within}")
        over = [r for r in rows if r.get("ratio", 0) > 0.5]
        floored = [r for r in over if r.get("floor_ratio", 0) > 0.5]
        lines.append(f"- over 0.5×: {len(over)}; of these, {len(floored)} where a bare torch.fx "
                     "trace alone (no shapes, matching or rewriting) takes over 0.5× create: "
                     + (", ".join(f"{r['model']} {r['floor_ratio']:.2f}" for r in floored) or "-"))
        lines += ["", "| model | create ms | bare fx trace ÷ create | apply ÷ create |",
                  "|---|---:|---:|---:|"]
        for r in sorted(over, key=lambda r: -r["ratio"]):
            floor = f"{r['floor_ratio']:.2f}" if "floor_ratio" in r else "-"
            lines.append(f"| {r['model']} | {r['create_s'] * 1e3:.0f} | {floor} | {r['ratio']:.2f} |")
    skipped = [r for r in rows if r["status"] == "skipped"]
    if skipped:
        lines.append(f"- skipped (over --max-params): {len(skipped)}")
    lines += ["", "| model | family | sites per rule | status | reason |", "|---|---|---|---|---|"]
    for r in rows:
        reason = r["reason"].replace("|", "\\|")
        lines.append(f"| {r['model']} | {r['family']} | {_sites(r)} | {r['status']} | {reason} |")
    return "\n".join(lines) + "\n"


def _read_rows(path: Path) -> dict[tuple[str, str], dict]:
    """The rows a resumed sweep already has, by (family, model); a line cut short by a killed
    run is dropped (that model runs again)."""
    rows = {}
    if path.exists():
        text = path.read_text()
        if text and not text.endswith("\n"):  # new rows start on a line of their own
            with path.open("a") as f:
                f.write("\n")
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["family"], row["model"]] = row
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--all", action="store_true", help="every timm architecture")
    ap.add_argument("--only", default="", help="comma-separated timm modules")
    ap.add_argument("--skip-torchvision", action="store_true")
    ap.add_argument("--max-params", type=float, default=None,
                    help="skip timm models with more parameters (millions); default: none, "
                         "300 with --all (a training step of a larger one needs more memory "
                         "than a 24 GiB machine has)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="time create, a bare fx trace and apply this many times each and keep "
                         "the best (default 3, 1 with --all)")
    ap.add_argument("--out", type=Path, default=Path("bench/out/coverage.md"),
                    help="the Markdown table to write; the rows go beside it as .json")
    ap.add_argument("--resume", type=Path, default=None,
                    help="JSON-lines file: rows already there are kept, new rows appended")
    ap.add_argument("--save", action="store_true",
                    help="also save each gated model with se_inject.save and load it back: "
                         "it must come back of its class, its state_dict equal bit for bit")
    ap.add_argument("--minutes", type=float, default=None,
                    help="start no new model after this many minutes; report what was swept")
    args = ap.parse_args(argv)
    if args.out.is_dir():  # found now, not after a sweep of an hour
        ap.error(f"--out {args.out} is a folder: give the Markdown file to write "
                 f"(e.g. {args.out / 'coverage.md'})")
    only = [m for m in args.only.split(",") if m] or None
    if args.all:
        todo = [(f, n) for f in (only or timm.list_modules()) for n in timm.list_models(module=f)]
        print(f"  ordering {len(todo)} architectures by size", file=sys.stderr, flush=True)
        size = {n: _meta_params(n) for _, n in todo}
        todo.sort(key=lambda fn: (size[fn[1]] is None, size[fn[1]] or 0, fn[1]))
    else:
        todo = timm_representatives(only)
    jobs = [(f, n, (lambda n=n: timm.create_model(n, pretrained=False))) for f, n in todo]
    if not args.skip_torchvision:
        jobs += [("torchvision", n, (lambda n=n: torchvision.models.get_model(n, weights=None)))
                 for n in torchvision.models.list_models(module=torchvision.models)]
    repeats = args.repeats or (1 if args.all else 3)
    limit = args.max_params if args.max_params is not None else (300 if args.all else None)
    done = _read_rows(args.resume) if args.resume else {}
    rows = []
    start = time.perf_counter()
    for i, (family, name, build) in enumerate(jobs, 1):
        if (family, name) in done:
            rows.append(done[family, name])
            continue
        if args.minutes is not None and time.perf_counter() - start > args.minutes * 60:
            print(f"  --minutes {args.minutes:g} reached: {len(jobs) - i + 1} models not run",
                  file=sys.stderr, flush=True)
            break
        t = time.perf_counter()
        row = check(family, name, build, None if limit is None else limit * 1e6, repeats,
                    round_trip=args.save)
        rows.append(row)
        if args.resume:
            with args.resume.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")
        print(f"[{i}/{len(jobs)}] {family}/{name}: {row['status']} {_sites(row)} "
              f"({time.perf_counter() - t:.1f} s) {row['reason'][:120]}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = report(rows, planned=len(jobs))
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(text)
    return 1 if any(r["status"] in ("CRASH", "broken") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
