"""What `se-inject convert` costs next to the least any conversion must do: read the weights and
write them as safetensors.

Targets: peak memory at most 1.5 × the checkpoint + the model; time at most 2 × a plain
``torch.load`` + ``safetensors.torch.save_file`` of the same weights.

A checkpoint of a large timm model (wide_resnet50_2: ~275 MB) is written once; then, in rounds
that alternate, a fresh process reads it and writes safetensors ("plain"), and a fresh process
runs ``se_inject.convert`` on it ("convert"). Each process resets its peak-RSS counter after its
imports, so the peak is what the work itself added.

    python bench/convert_cost.py [--model wide_resnet50_2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

CHILD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, timm, safetensors.torch, se_inject
from se_inject.checkpoint import convert
torch.set_num_threads(2)
job, src, out, model = sys.argv[1:5]

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

base = rss("VmRSS")
with open("/proc/self/clear_refs", "w") as fh:  # reset VmHWM to the current RSS
    fh.write("5")
t = time.perf_counter()
if job == "plain":
    state = torch.load(src, map_location="cpu", weights_only=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, out)
else:
    convert(src, out, model=model)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "peak": rss("VmHWM") - base}))
"""


def run(job: str, src: Path, out: Path, model: str) -> dict:
    out.unlink(missing_ok=True)
    r = subprocess.run([sys.executable, "-c", CHILD, job, str(src), str(out), model],
                       capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"{job} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="wide_resnet50_2")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/out/convert_cost.md"))
    args = ap.parse_args()
    import timm
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = timm.create_model(args.model, pretrained=False)
    model_bytes = sum(t.numel() * t.element_size()
                      for t in (*net.parameters(), *net.buffers()))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"{args.model}.pth"
        torch.save(net.state_dict(), src)
        del net
        ckpt = src.stat().st_size
        mib = 2 ** 20
        print(f"{args.model}: checkpoint {ckpt / mib:.0f} MiB, model {model_bytes / mib:.0f} MiB",
              file=sys.stderr)
        results: dict[str, list[dict]] = {"plain": [], "convert": []}
        for i in range(args.rounds):
            for job in ("plain", "convert") if i % 2 == 0 else ("convert", "plain"):
                r = run(job, src, Path(tmp) / f"{job}.safetensors", args.model)
                results[job].append(r)
                print(f"[round {i + 1}/{args.rounds}] {job}: {r['seconds']:.2f} s, "
                      f"peak +{r['peak'] / mib:.0f} MiB", file=sys.stderr)
    med = {j: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak")}
           for j, rs in results.items()}
    budget = 1.5 * ckpt + model_bytes
    time_ratio = statistics.median(c["seconds"] / p["seconds"]
                                   for c, p in zip(results["convert"], results["plain"]))
    lines = [
        f"# se-inject convert: cost ({args.model}, {args.rounds} alternating rounds, medians)",
        "",
        f"- checkpoint {ckpt / mib:.0f} MiB (torch.save of the state_dict); "
        f"model {model_bytes / mib:.0f} MiB",
        "",
        "| | time | peak memory added |",
        "|---|---:|---:|",
        f"| torch.load + save_file | {med['plain']['seconds']:.2f} s "
        f"| {med['plain']['peak'] / mib:.0f} MiB |",
        f"| se_inject.convert | {med['convert']['seconds']:.2f} s "
        f"| {med['convert']['peak'] / mib:.0f} MiB |",
        "",
        f"- time: convert ÷ plain = **{time_ratio:.2f}** (target ≤ 2)",
        f"- memory: convert's peak ÷ (1.5 × checkpoint + model) = "
        f"**{med['convert']['peak'] / budget:.2f}** (target ≤ 1); convert's peak is "
        f"{med['convert']['peak'] / ckpt:.2f} × the checkpoint",
    ]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
