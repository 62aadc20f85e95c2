"""Step 3b of the pipeline, with couple="auto": couple blocks in pairs unless that costs memory.

A stage of n residual blocks can make its couplings two ways (revify.plan.plan.Options.couple):

- "pairs": blocks 2k and 2k+1 make one coupling, F the first's branch and G the second's, and
  an odd last block is F alone (y2 = x2). The stage runs n branches, as the original does: as
  many layers and kernel launches (ResNet-50, batch 2, 32x32: 836 ops that can launch a kernel
  a training step against 1,311; the original's 461).
- "each": every block makes a coupling of its own, F and G both its branch: 2n branches.

Both keep each stage's parameter count (width="match"). A "pairs" branch is wider, since one
branch per block carries what two carried: a basic block's internal width doubles, a
bottleneck's grows by about a fifth. Where a checkpointed unit sets the step's peak (the stem
and downsampling blocks of an ImageNet ResNet, at full resolution) that changes nothing; where a
reversible stage's backward sets it (a CIFAR ResNet of basic blocks) the peak grows with the
branch (ResNet-20: 1.25x).

So "auto" makes both plans, projects a training step of each (revify.memory.projection, every
unit recomputing) and takes "pairs" unless:

- their activations peak more than SLACK higher (gradients created during the step:
  activations alone, which grow with the batch);
- with gradients allocated before the step (as from the second micro-batch of gradient
  accumulation, or under DDP), the step's memory rises more than IN_FLIGHT. Besides wider
  activations, a pair branch's gradients in flight are a whole block's parameters: a constant
  of the model's, whatever the batch, so it is weighed against what the model holds anyway (its
  parameters and their gradients; optimizer state comes on top, so the device's rise is less).
  ResNet-50 at batch 2, 32x32, where they outweigh the activations more than ten to one: 17.8
  against 9.4 MiB of step peak, beside 180 MiB of parameters and gradients: +4%;
- they do not fit a budget the user gave;
- they miss width="match"'s parameter promise by more (a branch with no internal width to
  scale: two narrow copies keep more of its parameters than one).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import NamedTuple

from torch import fx

from revify.graph.blocks import ResidualBlock, module_path
from revify.memory.projection import Stretches, fake_model, project
from revify.plan.plan import Options, Plan, make_plan
from revify.plan.report import size
from revify.plan.schedule import least_step
from revify.rewrite import rewrite

SLACK = 0.01      # activation bytes "pairs" may add over "each" and still be taken
IN_FLIGHT = 0.05  # what they may add to the step's memory with gradients allocated


def couple(gm: fx.GraphModule, blocks: list[ResidualBlock], options: Options,
           example_inputs: tuple) -> tuple[fx.GraphModule, Plan, Stretches | None]:
    """Plan and rewrite `gm` (consumed) with options.couple resolved: the rewritten net, its
    plan, whose options say "pairs" or "each" and whose `coupling` says why, and the least step
    of the net if the choice projected it (revify.plan.schedule.least_step, which the schedule
    starts from; else None)."""
    if options.couple != "auto":
        plan = make_plan(gm, blocks, options)
        return rewrite(gm, plan), plan, None
    plans = {c: make_plan(gm, blocks, replace(options, couple=c)) for c in ("pairs", "each")}
    if not _paired(plans["pairs"]):  # nothing to choose: the couplings are the same
        return rewrite(gm, plans["pairs"]), plans["pairs"], None
    spare = copy.deepcopy(gm)
    nets = {"pairs": rewrite(gm, plans["pairs"]), "each": rewrite(spare, plans["each"])}
    steps = {c: _least(nets[c], plans[c], example_inputs) for c in nets}
    chosen, why = _choose(plans, nets, steps, options.budget)
    plans[chosen].coupling = f"couple='auto' chose '{chosen}': {why}"
    least = steps[chosen]  # None: the step could not be projected
    return nets[chosen], plans[chosen], least.lean if least else None


def _paired(plan: Plan) -> int:
    """How many couplings are two blocks (F one's branch, G the other's)."""
    return sum(g is not None and f != g and module_path(f) != module_path(g)
               for stage in plan.stages for f, g in stage.couplings)


class _Least(NamedTuple):
    """A training step of a net as rewritten (every unit recomputing), gradients allocated
    before it."""
    peak: int                   # the step's
    activations: int            # its activations' alone
    lean: Stretches | None      # its units' stretches, where the schedule can price them


def _least(net: fx.GraphModule, plan: Plan, example_inputs: tuple) -> _Least | None:
    """`net`'s least step: projected as the schedule prices it where it can, else as one call.
    None where the step reads a value (data-dependent control flow): no shapes price it."""
    try:
        lean = least_step(net, plan, example_inputs)
        if lean is not None:
            return _Least(lean.peak, lean.activation_peak, lean)
        step = project(fake_model(net), example_inputs, "accumulate")
        return _Least(step.peak, step.peak_activations, None)
    except Exception:
        return None


def _choose(plans: dict[str, Plan], nets: dict[str, fx.GraphModule],
            steps: dict[str, _Least | None], budget: int | None) -> tuple[str, str]:
    """("pairs" or "each", why), from each net's least step (`_least`)."""
    if None in steps.values():
        return "each", ("the step cannot be projected on shapes alone, and one coupling per "
                        "block has the narrower branches")
    peak = {c: step.peak for c, step in steps.items()}
    activations = {c: step.activations for c, step in steps.items()}
    if activations["pairs"] > activations["each"] * (1 + SLACK):
        return "each", (f"with pairs of blocks the step's activations would peak at "
                        f"{size(activations['pairs'])}, with one coupling per block at "
                        f"{size(activations['each'])}")
    fixed = 2 * sum(p.numel() * p.element_size() for p in nets["each"].parameters())
    if peak["pairs"] + fixed > (peak["each"] + fixed) * (1 + IN_FLIGHT):
        return "each", (f"with gradients allocated before the step, pairs of blocks would peak "
                        f"at {size(peak['pairs'])} instead of {size(peak['each'])} (each pair "
                        f"branch holds a whole block's gradients in flight): with the "
                        f"{size(fixed)} of parameters and gradients, over {IN_FLIGHT:.0%} more")
    if budget is not None and peak["pairs"] > budget:
        return "each", (f"with pairs of blocks the step would need {size(peak['pairs'])} with "
                        f"every unit recomputing, over the budget of {size(budget)}")
    if _unmatched(plans["pairs"]) > _unmatched(plans["each"]):
        names = ", ".join(s.name for s in plans["pairs"].unmatched())
        return "each", (f"pairs of blocks would leave {names} further outside width='match''s "
                        f"parameter promise")
    couplings = [c for stage in plans["pairs"].stages for c in stage.couplings]
    paired, alone = _paired(plans["pairs"]), sum(g is None for _, g in couplings)
    single = len(couplings) - paired - alone
    each = sum(len(s.couplings) for s in plans["each"].stages)
    return "pairs", (f"{_count(paired, 'coupling')} of two blocks"
                     + (f", {alone} of one block as F alone" if alone else "")
                     + (f", {single} of one block as F and G" if single else "")
                     + f" instead of {each} of one block as F and G; the step's activations "
                     f"peak at {size(activations['pairs'])} ({size(activations['each'])} with one "
                     f"coupling per block), with gradients allocated before it at "
                     f"{size(peak['pairs'])} ({size(peak['each'])})")


def _unmatched(plan: Plan) -> int:
    """Parameters the stages outside width="match"'s promise miss it by."""
    return sum(abs(s.params_after - s.params_before) for s in plan.unmatched())


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"
