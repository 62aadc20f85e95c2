"""Step 5 of the pipeline: print the plan (what was found and what became of it)."""
from __future__ import annotations

from tabulate import tabulate


def _shape(shape) -> str:
    return "x".join(map(str, shape[1:])) if shape else "?"


def _delta(before: int, after: int) -> str:
    return f"{(after - before) / before:+.1%}" if before else "-"


def format_plan(plan, fmt: str = "simple") -> str:
    blocks = [[b.name, _shape(b.shape), b.action, "" if b.stage is None else plan.stages[b.stage].name,
               f"{b.params_before:,}", f"{b.params_after:,}", b.reason] for b in plan.blocks]
    stages = [[s.name, len(s.blocks), s.channels, f"{s.channels // 2} + {s.channels // 2}",
               f"{s.width:g}", f"{s.params_before:,}", f"{s.params_after:,}",
               _delta(s.params_before, s.params_after)] for s in plan.stages]
    segments = [[s.name, s.kind, s.action, ", ".join(s.blocks) or "-"] for s in plan.segments]
    parts = [
        f"revify plan for {plan.model}: {len(plan.blocks)} residual blocks, "
        f"{sum(b.action == 'reversible' for b in plan.blocks)} reversible in {len(plan.stages)} stages "
        f"({plan.options.reconstruction} reconstruction)",
        tabulate(blocks, ["block", "output", "became", "stage", "params before", "params after",
                          "reason"], tablefmt=fmt),
        tabulate(stages, ["reversible stage", "blocks", "channels", "halves", "width",
                          "params before", "params after", "change"], tablefmt=fmt)
        if stages else "no reversible stage",
        tabulate(segments, ["unit", "kind", "runs as", "blocks"], tablefmt=fmt),
        f"parameters: {plan.params_before:,} -> {plan.params_after:,} "
        f"({_delta(plan.params_before, plan.params_after)})",
    ]
    return "\n\n".join(parts)
