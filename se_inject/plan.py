"""What apply() would do: Site records, collected in a Plan that prints as a table."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Sequence

__all__ = ["Site", "Skipped", "Plan", "LocalKey"]

# Where a site sits inside its block's own forward, independent of how the model was traced:
# (fx op, fx target, index among the block's nodes with that op and target, operand or None),
# then "nhwc" where the gated tensor is a channels-last map (N, H, W, C), gated on its channels.
LocalKey = tuple


@dataclass(frozen=True)
class Site:
    """One gate to insert.

    block:    qualified name of the module whose forward holds the merge ("" is the model)
    tensor:   the tensor the gate scales (the path of the module that makes it, as the block's
              forward calls it, or ``block.op`` for a function)
    channels: channels of that tensor (C); reduced: width of the gate's bottleneck (C // r;
              None for gates without one: ECA, effective SE)
    rule:     the rule that matched; position: where the rule puts the gate ("branch": before
              the merge, "output": after it, "pre", "post", "identity": paper Table 14...)
    gate:     qualified name the gate module gets (``block.se_gate``, ``block.se_gate_1``, ...)
    merge:    the add or concatenation the block ends in; entry: the block's entry tensor
    spatial:  height and width of the gated tensor for the plan's input size
    stage:    the network's resolution stage there: k where the tensor is 1/2**k of the input's
              height (rounded), so ResNet-50's stages are 2 to 5, as the paper's conv2_x-conv5_x
    ratio:    the reduction ratio r of this gate (one per stage may be chosen)
    parameters: the gate's weights and biases
    """

    block: str
    tensor: str
    channels: int
    reduced: int | None
    rule: str
    position: str
    gate: str
    merge: str
    entry: str
    spatial: tuple[int, ...] = ()
    stage: int = 0
    ratio: int = 16
    parameters: int = 0
    key: LocalKey = field(repr=False, compare=False, default=())


@dataclass(frozen=True)
class Skipped:
    """A merge a rule matched but no gate was planned for, and why."""

    merge: str
    rule: str
    reason: str


@dataclass(frozen=True)
class Plan(Sequence[Site]):
    """The sites apply() gates, in graph order; ``len(plan)`` is the number of gates."""

    sites: tuple[Site, ...]
    skipped: tuple[Skipped, ...] = ()
    model: str = ""
    ratio: int | dict = 16
    # merges of 4-D feature maps that no chosen rule looks at, by kind: (("add", 8),) for
    # ResNet-18 planned with the inception rule alone
    unexamined: tuple[tuple[str, int], ...] = ()

    def __len__(self) -> int:
        return len(self.sites)

    def __getitem__(self, i):
        return self.sites[i]

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def by_rule(self) -> dict[str, int]:
        return dict(Counter(s.rule for s in self.sites))

    def stages(self) -> tuple[int, ...]:
        """The resolution stages that hold a site, in order."""
        return tuple(sorted({s.stage for s in self.sites}))

    def added_parameters(self) -> int:
        """Weights and biases of the planned gates (for SE: 2·C·C/r + C/r + C per gate)."""
        return sum(s.parameters for s in self.sites)

    def table(self) -> str:
        head = ("#", "block", "rule", "gated tensor", "C", "C/r", "stage", "gate")
        rows = [(str(i), s.block or "(model)", s.rule, s.tensor, str(s.channels), str(s.reduced or "-"),
                 str(s.stage), s.gate) for i, s in enumerate(self.sites)]
        widths = [max(len(r[c]) for r in [head, *rows]) for c in range(len(head))]
        right = {0, 4, 5, 6}

        def line(r):
            return "  ".join(v.rjust(w) if c in right else v.ljust(w)
                             for c, (v, w) in enumerate(zip(r, widths))).rstrip()

        out = [line(head), line(tuple("-" * w for w in widths)), *map(line, rows)]
        rules = ", ".join(f"{n} {r}" for r, n in self.by_rule().items()) or "none"
        out.append(f"{len(self.sites)} gates ({rules}) at ratio {self.ratio}, "
                   f"+{self.added_parameters():,} parameters")
        reasons = Counter(s.reason for s in self.skipped)
        for reason, n in sorted(reasons.items()):
            out.append(f"not gated: {n} × {reason}")
        return "\n".join(out)

    def __str__(self) -> str:
        title = f"se-inject plan for {self.model}" if self.model else "se-inject plan"
        return title + "\n" + self.table()
