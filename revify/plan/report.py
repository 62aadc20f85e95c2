"""Step 6 of the pipeline: print the plan (what was found and what became of it)."""
from __future__ import annotations

from tabulate import tabulate

from revify.plan.plan import MATCH_TOLERANCE


def _shape(shape) -> str:
    return "x".join(map(str, shape[1:])) if shape else "?"


def _delta(before: int, after: int) -> str:
    return f"{(after - before) / before:+.1%}" if before else "-"


def format_plan(plan, fmt: str = "simple") -> str:
    roles = {}  # paired blocks say which half of the coupling they became
    for stage in plan.stages:
        for f, g in stage.couplings:
            if g is None:
                roles[f] = " (F alone)"
            elif f != g:
                roles[f], roles[g] = " (F)", " (G)"
    blocks = [[b.name, _shape(b.shape), b.action + roles.get(b.name, ""),
               "" if b.stage is None else plan.stages[b.stage].name,
               f"{b.params_before:,}", f"{b.params_after:,}", b.reason or _branch(plan, b)]
              for b in plan.blocks]
    stages = [[s.name, len(s.blocks), len(s.couplings), s.channels,
               f"{s.channels // 2} + {s.channels // 2}", f"{s.width:.3g}", f"{s.params_before:,}",
               f"{s.params_after:,}", _delta(s.params_before, s.params_after)] for s in plan.stages]
    segments = [[s.name, s.kind, plan.runs_as(s), ", ".join(s.blocks) or "-",
                 "; ".join(_scheduled(s.name, plan.schedule) +
                           ([lean.describe()] if (lean := plan.running(s.lean, s.name)) else []))]
                for s in plan.segments]
    parts = [
        f"revify plan for {plan.model}: {len(plan.blocks)} residual blocks, "
        f"{sum(b.action == 'reversible' for b in plan.blocks)} reversible in {len(plan.stages)} "
        f"stage{'s' if len(plan.stages) != 1 else ''} "
        f"({plan.options.reconstruction} reconstruction)",
        tabulate(blocks, ["block", "output", "became", "stage", "params before", "params after",
                          "reason"], tablefmt=fmt),
        tabulate(stages, ["reversible stage", "blocks", "couplings", "channels", "halves", "width",
                          "params before", "params after", "change"], tablefmt=fmt)
        if stages else "no reversible stage",
        tabulate(segments, ["unit", "kind", "runs as", "blocks", "recompute"], tablefmt=fmt),
        f"parameters: {plan.params_before:,} -> {plan.params_after:,} "
        f"({_delta(plan.params_before, plan.params_after)})",
    ]
    if plan.coupling:
        parts.insert(-1, plan.coupling + ".")
    if plan.schedule:
        parts.insert(-1, format_schedule(plan.schedule))
    if plan.unmatched():
        parts.insert(-1, unmatched_note(plan))
    if plan.distillation:
        parts.insert(-1, f"weights: {plan.distillation}")
    if plan.opaque:
        parts.insert(-1, "kept as opaque layers (not traced into):\n" + "\n".join(
            f"  {name}: {why}" for name, why in plan.opaque.items()))
    return "\n\n".join(parts)


def _branch(plan, block) -> str:
    """What a reversible block's branches drop in their rebuild, as its stage runs."""
    lean = block.lean and plan.running(block.lean, plan.stages[block.stage].name)
    return f"branch {lean.describe()}" if lean else ""


def unmatched_note(plan) -> str:
    """The stages whose parameters width="match" could not keep, said in the plan and warned."""
    stages = ", ".join(f"{s.name} ({_delta(s.params_before, s.params_after)})"
                       for s in plan.unmatched())
    return (f"parameters NOT matched within ±{MATCH_TOLERANCE:.0%}: {stages}. width='match' "
            f"scales only the branches' internal widths (in multiples of their group widths); "
            f"these have too little of them to make up for their halved stream layers. Pass "
            f"width= to choose.")


def _scheduled(unit: str, schedule) -> list[str]:
    """What revify.plan.schedule chose for one unit, as the plan's recompute column says it."""
    if schedule is None:
        return []
    notes = []
    if unit in schedule.stored:
        notes.append(f"keeps {size(schedule.stored[unit])}: fits under the peak")
    if unit in schedule.plain:
        notes.append("nests no layer: fits under the peak")
    if unit in schedule.kept:
        notes.append(f"keeps {size(schedule.kept[unit])} of layer outputs for the rerun: "
                     f"fits under the peak")
    return notes


def size(nbytes: int) -> str:
    """A byte count as the plan prints it: MiB, or KiB below one MiB."""
    return f"{nbytes / 2**20:,.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"


def format_schedule(schedule) -> str:
    """One paragraph: which units store their activations or rerun plainly, and what that costs
    and saves."""
    if schedule.skipped:
        return f"schedule: every unit recomputes ({schedule.skipped})."
    head = (f"schedule (a training step at the example input, projected): every unit recomputing "
            f"peaks at {size(schedule.peak_recompute)} of activations; budget "
            f"{size(schedule.budget)}"
            + (f", {size(schedule.activation_budget)} of them without the gradients in "
               f"flight (what grows with the batch)" if schedule.activation_budget else ""))
    if not schedule.stored and not schedule.plain and not schedule.kept:
        return f"{head}. No unit's activations fit under it: every unit recomputes."
    parts = []
    if schedule.stored:
        parts.append(f"Stored instead of recomputed: {', '.join(schedule.stored)} (keeping "
                     f"{size(sum(schedule.stored.values()))} between forward and backward).")
    if schedule.plain:
        parts.append(f"Recomputed without nested layers: {', '.join(schedule.plain)}.")
    if schedule.kept:
        parts.append(f"Keeping their dearest layers' outputs for the rerun: "
                     f"{', '.join(schedule.kept)} ({size(sum(schedule.kept.values()))}).")
    return (f"{head}. {' '.join(parts)} The peak is {size(schedule.peak)} and the backward "
            f"recomputes {schedule.flops_saved / 1e9:,.2f} GFLOP less.")


def carried_weights(rev) -> dict[str, int]:
    """How much of a converted model's weights started from the source model's.

    Layers outside reversible stages are the source's own modules: copied unchanged. Resized
    branch layers start from a slice of the source's (F from the first half of the stream
    channels, G from the second; `revify.plan.resize.carry_over`), the rest keeps its
    initialisation.
    """
    from revify.runtime.reversible import CouplingBlock
    coupled = [m for m in rev.modules() if isinstance(m, CouplingBlock)]
    in_blocks = {id(t) for b in coupled for t in [*b.parameters(), *b.buffers()]}
    tensors = [t for t in [*rev.parameters(), *rev.buffers()] if t.is_floating_point()]
    return {
        "unchanged_tensors": sum(id(t) not in in_blocks for t in tensors),
        "unchanged_values": sum(t.numel() for t in tensors if id(t) not in in_blocks),
        "sliced_tensors": sum(id(t) in in_blocks for t in tensors),
        "sliced_values": sum(t.numel() for t in tensors if id(t) in in_blocks),
        "carried_values": sum(branch.meta.get("carried_values", 0)
                              for b in coupled for _, branch in b.branches),
    }


def format_weights(model, rev, input_size, inputs=None) -> str:
    """What conversion did to pretrained weights, said plainly, with the output difference on
    `inputs` (the calibration inputs the stages were fitted on, if any; else a random input)."""
    import torch
    c = carried_weights(rev)
    fitted = rev.revify_plan.distillation is not None
    torch.manual_seed(0)
    x = inputs[:64] if inputs is not None else torch.randn(2, *input_size)
    with torch.no_grad():
        before, after = model.eval()(x), rev.eval()(x)
    model.train(), rev.train()
    if not isinstance(before, torch.Tensor):
        before = after = torch.ones(1)  # several outputs: compared by verify's checks instead
    diff = ((after - before).norm() / before.norm().clamp_min(1e-30)).item()
    start = (f"{c['sliced_tensors']} tensors of the resized branches were fitted to the trained "
             f"stages (the plan's last lines)" if fitted else
             f"{c['sliced_tensors']} tensors of the resized branches start from slices of the "
             f"originals (F from the first half of the channels, G from the second): "
             f"{c['carried_values']:,} of their {c['sliced_values']:,} values "
             f"({c['carried_values'] / max(c['sliced_values'], 1):.0%}) are copied from the "
             f"source; the rest keep their fresh initialisation")
    end = (f"On {len(x)} calibration inputs the converted model's output differs from the "
           f"original's by {diff:.1%} (relative norm)." if fitted else
           f"Additive coupling at half width computes a different function: on a random input "
           f"the converted model's output differs from the original's by {diff:.0%} (relative "
           f"norm). Fine-tune it before use, or pass --calibration FILE (unlabelled inputs of "
           f"the training data) to fit the stages to these weights.")
    return (f"weights: {c['unchanged_tensors']} tensors ({c['unchanged_values']:,} values) outside "
            f"reversible stages are copied unchanged. {start}.\n{end}")
