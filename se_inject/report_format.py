"""A CostReport as a terminal table (rich), as Markdown, and as a plot (matplotlib).

Both text formats show the same four parts: the totals per ratio, the added cost per stage, the
added cost per gate, and what could not be counted.
"""
from __future__ import annotations

import io
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from ._files import atomic_write
from .errors import InvalidArgumentError

if TYPE_CHECKING:
    from .cost import CostReport

__all__ = ["rich_text", "markdown", "plot", "sections", "check_plot_path"]


def _pct(x: float) -> str:
    return f"+{100 * x:.2f}%"


def _size(spatial) -> str:
    return "×".join(str(v) for v in spatial) or "-"


def sections(rep: "CostReport") -> list[tuple[str, list[str], list[list[str]], set[int]]]:
    """(title, header, rows, right-aligned columns) for each table of the report."""
    measured = any(r.measured for r in rep.ratios)
    head = ["ratio", "gates", "parameters", "added", "rel.", "ops", "added", "rel."]
    if measured:
        head += ["time ÷ base", "ops ÷ base"]
    totals = []
    for r in rep.ratios:
        row = [str(r.ratio), str(len(r.gates)), f"{r.parameters:,}", f"{r.added_parameters:,}",
               _pct(r.relative_parameters), f"{r.ops:,}", f"{r.added_ops:,}",
               _pct(r.relative_ops)]
        if measured:
            m = r.measured or {}
            row += [f"{m['ratio']:.3f}" if m else "-", f"{1 + r.relative_ops:.4f}"]
        totals.append(row)
    base = ["base", "0", f"{rep.base_parameters:,}", "0", "", f"{rep.base_ops:,}", "0", ""]
    if measured:
        base += ["", ""]
    totals.insert(0, base)

    stage_head = ["stage", "size", "gates"]
    for r in rep.ratios:
        stage_head += [f"+params r={r.ratio}", "share", f"+ops r={r.ratio}", "share"]
    stage_rows = []
    for i, st in enumerate(rep.ratios[0].stages):
        row = [str(st.stage), _size(st.spatial), str(st.gates)]
        for r in rep.ratios:
            s = r.stages[i]
            row += [f"{s.parameters:,}", f"{100 * s.parameters / max(1, r.added_parameters):.1f}%",
                    f"{s.ops:,}", f"{100 * s.ops / max(1, r.added_ops):.1f}%"]
        stage_rows.append(row)
    stage_rows.append(["total", "", str(len(rep.ratios[0].gates))]
                      + [v for r in rep.ratios for v in (f"{r.added_parameters:,}", "100.0%",
                                                         f"{r.added_ops:,}", "100.0%")])

    gate_head = ["#", "gate", "stage", "C", "size"]
    for r in rep.ratios:
        gate_head += [f"C/{r.ratio}", f"+params r={r.ratio}", f"+ops r={r.ratio}"]
    gate_rows = []
    for i, g in enumerate(rep.ratios[0].gates):
        row = [str(i), g.gate, str(g.stage), str(g.channels), _size(g.spatial)]
        for r in rep.ratios:
            x = r.gates[i]
            row += [str(x.reduced) if x.reduced is not None else "-", f"{x.parameters:,}",
                    f"{x.ops:,}"]
        gate_rows.append(row)
    n = len(rep.ratios)
    return [
        ("totals", head, totals, set(range(1, len(head)))),
        ("added per stage", stage_head, stage_rows, set(range(2, len(stage_head)))),
        ("added per gate", gate_head, gate_rows, {0, 2, 3} | set(range(5, 5 + 3 * n))),
    ]


def _title(rep: "CostReport") -> str:
    return (f"se-inject cost report: {rep.model}, input {_size(rep.input_size)} (batch 1), "
            f"stages {rep.stages}")


def _notes(rep: "CostReport") -> list[str]:
    notes = [f"Unit: {rep.unit}."]
    if rep.uncounted:
        listed = ", ".join(f"{op} × {n}" for op, n in sorted(rep.uncounted.items()))
        notes.append(f"Not counted (fvcore has no handle; not in the totals): {listed}.")
    else:
        notes.append("Every op of the model was counted.")
    for r in rep.ratios:
        if r.measured:
            m = r.measured
            notes.append(f"Measured at r={r.ratio} on {m['device']}, batch {m['batch']}, median of "
                         f"{m['rounds']} paired rounds: base {m['base_ms']:.2f} ms, gated "
                         f"{m['gated_ms']:.2f} ms, ratio {m['ratio']:.3f} (IQR "
                         f"{m['ratio_iqr'][0]:.3f}-{m['ratio_iqr'][1]:.3f}).")
    return notes


def rich_text(rep: "CostReport", width: int = 100) -> str:
    """The tables at their natural width (never folded); notes wrapped at ``width``."""
    from rich.console import Console
    from rich.table import Table
    console = Console(file=io.StringIO(), width=4000, color_system=None, record=True,
                      force_terminal=False, legacy_windows=False)
    console.print(_title(rep), highlight=False)
    for title, head, rows, right in sections(rep):
        table = Table(title=title, title_justify="left", show_lines=False, highlight=False)
        for c, h in enumerate(head):
            table.add_column(h, justify="right" if c in right else "left", no_wrap=True)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    text = console.export_text()
    notes = "\n".join(textwrap.fill(n, width, subsequent_indent="  ") for n in _notes(rep))
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n" + notes + "\n"


def markdown(rep: "CostReport") -> str:
    lines = [f"## {_title(rep)}", ""]
    for title, head, rows, right in sections(rep):
        lines += [f"### {title}", "", "| " + " | ".join(head) + " |",
                  "|" + "|".join("---:" if c in right else "---" for c in range(len(head))) + "|"]
        lines += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in rows]
        lines.append("")
    lines += [f"- {n}" for n in _notes(rep)]
    return "\n".join(lines) + "\n"


def check_plot_path(path: Path) -> str:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".svg"):
        raise InvalidArgumentError(f"plot file {str(path)!r} must end in .png or .svg")
    if not path.parent.is_dir():
        raise InvalidArgumentError(f"plot file {str(path)!r}: folder {str(path.parent)!r} "
                                   "does not exist")
    if path.is_dir():
        raise InvalidArgumentError(f"plot file {str(path)!r} is a folder; name the file to "
                                   f"write in it, e.g. {str(path / ('cost' + suffix))!r}")
    return suffix


def plot(rep: "CostReport", path: Path) -> Path:
    """Added parameters and ops per stage, one bar series per ratio, as PNG or SVG."""
    suffix = check_plot_path(path)
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    stages = [f"{s.stage}\n{_size(s.spatial)}" for s in rep.ratios[0].stages]
    width = 0.8 / len(rep.ratios)
    for ax, what, label in ((axes[0], "parameters", "added parameters"),
                            (axes[1], "ops", "added ops")):
        for i, r in enumerate(rep.ratios):
            xs = [k + (i - (len(rep.ratios) - 1) / 2) * width for k in range(len(stages))]
            ax.bar(xs, [getattr(s, what) for s in r.stages], width, label=f"r={r.ratio}")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_xlabel("stage (tensor size)")
        ax.set_ylabel(label)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 3))
    axes[0].legend()
    fig.suptitle(f"SE cost per stage: {rep.model}, input {_size(rep.input_size)}")
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format=suffix[1:]), replace=True)
    except OSError as exc:
        raise InvalidArgumentError(f"plot file {str(path)!r}: could not write it: "
                                   f"{exc.strerror or exc}; nothing was written") from exc
    return path
