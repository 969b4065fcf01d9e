"""apply() time against graph size: synthetic ResNets of 50 to 1,000 residual blocks.

Prints, per depth, the fx graph's node count, apply() time and time per node; the spread of
time per node (max ÷ min) says whether the cost grows linearly.

    python bench/scale.py [--depths 50,100,250,500,1000] [--repeats 3]
    python bench/scale.py --nested --depths 25,50,100,200,400
        # sums that span the network: a U-Net's skips at one resolution, a 1x1 convolution on
        # each, every sum's branch holding all the levels inside it
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


class Nested(nn.Module):
    """``levels`` encoder layers, then as many decoder layers, each adding a 1x1 convolution of
    its mirror's input: the k-th sum from the inside encloses 2k layers."""

    def __init__(self, levels: int, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        layer = lambda: nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU())  # noqa: E731
        self.enc = nn.ModuleList(layer() for _ in range(levels))
        self.skip = nn.ModuleList(nn.Conv2d(c, c, 1) for _ in range(levels))
        self.dec = nn.ModuleList(layer() for _ in range(levels))

    def forward(self, x):
        x = self.stem(x)
        skips = []
        for e in self.enc:
            skips.append(x)
            x = e(x)
        for d, k, s in zip(self.dec, reversed(skips), reversed(self.skip)):
            x = d(x) + s(k)
        return x


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--depths", default="50,100,250,500,1000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--nested", action="store_true",
                    help="U-Net-like sums that span the network instead of ResNet blocks")
    args = ap.parse_args(argv)
    build = Nested if args.nested else resnet
    torch.set_num_threads(2)
    se_inject.apply(resnet(4))  # imports and caches
    rows = []
    for depth in map(int, args.depths.split(",")):
        nodes = len(fx.symbolic_trace(build(depth)).graph.nodes)
        best = float("inf")
        for r in range(args.repeats):
            model = build(depth)
            t = time.perf_counter()
            se_inject.apply(model, input_size=(3, 32, 32))
            best = min(best, time.perf_counter() - t)
            print(f"  {depth} {'levels' if args.nested else 'blocks'}: run {r + 1}/{args.repeats} {best:.3f} s", file=sys.stderr)
        rows.append((depth, nodes, best, best / nodes * 1e6))
    per_node = [r[3] for r in rows]
    unit = "levels" if args.nested else "blocks"
    print(f"| {unit} | fx nodes | apply (s, best of {args.repeats}) | µs per node |")
    print("|---:|---:|---:|---:|")
    for depth, nodes, t, us in rows:
        print(f"| {depth} | {nodes} | {t:.3f} | {us:.1f} |")
    print(f"\ntime per node, max ÷ min: {max(per_node) / min(per_node):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
