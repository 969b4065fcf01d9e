"""apply() time against graph size: synthetic ResNets of 50 to 1,000 residual blocks.

Prints, per depth, the fx graph's node count, apply() time and time per node; the spread of
time per node (max ÷ min) says whether the cost grows linearly.

    python bench/scale.py [--depths 50,100,250,500,1000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.fx as fx
from torch import nn

import se_inject


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


def resnet(blocks: int, c: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), *(Block(c) for _ in range(blocks)),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="50,100,250,500,1000")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    se_inject.apply(resnet(4))  # imports and caches
    rows = []
    for depth in map(int, args.depths.split(",")):
        nodes = len(fx.symbolic_trace(resnet(depth)).graph.nodes)
        best = float("inf")
        for r in range(args.repeats):
            model = resnet(depth)
            t = time.perf_counter()
            se_inject.apply(model, input_size=(3, 32, 32))
            best = min(best, time.perf_counter() - t)
            print(f"  {depth} blocks: run {r + 1}/{args.repeats} {best:.3f} s", file=sys.stderr)
        rows.append((depth, nodes, best, best / nodes * 1e6))
    per_node = [r[3] for r in rows]
    print("| blocks | fx nodes | apply (s, best of %d) | µs per node |" % args.repeats)
    print("|---:|---:|---:|---:|")
    for depth, nodes, t, us in rows:
        print(f"| {depth} | {nodes} | {t:.3f} | {us:.1f} |")
    print(f"\ntime per node, max ÷ min: {max(per_node) / min(per_node):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
