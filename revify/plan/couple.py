"""Step 3b of the pipeline, with couple="auto": couple blocks in pairs unless that costs memory.

A stage of n residual blocks can make its couplings two ways (revify.plan.plan.Options.couple):

- "pairs": blocks 2k and 2k+1 make one coupling, F the first's branch and G the second's. The
  stage runs n branches, as the original does: as many layers and kernel launches (ResNet-50,
  batch 2: 880 ops that can launch a kernel a training step against 1,277; the original's 461).
- "each": every block makes a coupling of its own, F and G both its branch: 2n branches.

Both keep each stage's parameter count (width="match"). A "pairs" branch is wider, since one
branch per block carries what two carried: a basic block's internal width doubles, a
bottleneck's grows by about a fifth. Where a checkpointed unit sets the step's peak (the stem
and downsampling blocks of an ImageNet ResNet, at full resolution) that changes nothing; where a
reversible stage's backward sets it (a CIFAR ResNet of basic blocks) the peak grows with the
branch (ResNet-20: 1.25x).

So "auto" makes both plans, projects a training step of each (revify.memory.projection, every
unit recomputing) and takes "pairs" unless:

- the step peaks more than IN_FLIGHT higher with gradients allocated before it (as the
  schedule's budget counts it). Besides wider activations, a pair branch's gradients in flight
  are a whole block's parameters: at example inputs so small that they outweigh the activations
  (ResNet-50 at batch 2, 32x32: 1.9x; batch 2, 224x224: 1.04x; batch 16, 112x112 on: equal)
  the schedule would also size the units it stores by that surplus, which their activations
  then outgrow at the batch trained at: a plan made at such an input keeps the least memory and
  says so;
- their activations peak more than SLACK higher (gradients created during the step:
  activations alone, which grow with the batch);
- they do not fit a budget the user gave;
- they miss width="match"'s parameter promise by more (a branch with no internal width to
  scale: two narrow copies keep more of its parameters than one).
"""
from __future__ import annotations

import copy
from dataclasses import replace

from torch import fx

from revify.graph.blocks import ResidualBlock, module_path
from revify.memory.projection import project_peak
from revify.plan.plan import Options, Plan, make_plan
from revify.rewrite import rewrite

SLACK = 0.01      # activation bytes "pairs" may add over "each" and still be taken
IN_FLIGHT = 0.10  # what their larger gradients in flight may add to the step's peak


def couple(gm: fx.GraphModule, blocks: list[ResidualBlock], options: Options,
           example_inputs: tuple) -> tuple[fx.GraphModule, Plan]:
    """Plan and rewrite `gm` (consumed) with options.couple resolved: the rewritten net and its
    plan, whose options say "pairs" or "each" and whose `coupling` says why."""
    if options.couple != "auto":
        plan = make_plan(gm, blocks, options)
        return rewrite(gm, plan), plan
    plans = {c: make_plan(gm, blocks, replace(options, couple=c)) for c in ("pairs", "each")}
    if not _pairs_blocks(plans["pairs"]):  # nothing to choose: the couplings are the same
        return rewrite(gm, plans["pairs"]), plans["pairs"]
    spare = copy.deepcopy(gm)
    nets = {"pairs": rewrite(gm, plans["pairs"]), "each": rewrite(spare, plans["each"])}
    chosen, why = _choose(plans, nets, example_inputs, options.budget)
    plans[chosen].coupling = f"couple='auto' chose '{chosen}': {why}"
    return nets[chosen], plans[chosen]


def _pairs_blocks(plan: Plan) -> bool:
    """Whether any coupling is two blocks that only couple="pairs" puts together."""
    return any(f != g and module_path(f) != module_path(g)
               for stage in plan.stages for f, g in stage.couplings)


def _peak(net: fx.GraphModule, example_inputs: tuple, grads: str) -> int | None:
    """The peak of a training step of `net` as rewritten (every unit recomputing), gradients in
    the regime `grads`: "fresh" counts activations, "accumulate" the gradients in flight too, as
    the schedule's budget does. None where the step reads a value (data-dependent control
    flow): no shapes price it."""
    try:
        return project_peak(net, example_inputs, grads)
    except Exception:
        return None


def _choose(plans: dict[str, Plan], nets: dict[str, fx.GraphModule], example_inputs: tuple,
            budget: int | None) -> tuple[str, str]:
    """("pairs" or "each", why). The step's peak with gradients allocated first: where pairs
    fail it (tiny example inputs, and stages of basic blocks that set the peak) the
    activations-only projections are not needed."""
    peak = {c: _peak(net, example_inputs, "accumulate") for c, net in nets.items()}
    if None in peak.values():
        return "each", ("the step cannot be projected on shapes alone, and one coupling per "
                        "block has the narrower branches")
    if peak["pairs"] > peak["each"] * (1 + IN_FLIGHT):
        return "each", (f"with pairs of blocks the step would peak at {_size(peak['pairs'])} "
                        f"instead of {_size(peak['each'])} with gradients allocated (their "
                        f"branches are wider, and each holds a whole block's gradients in "
                        f"flight); give example_inputs at the batch and size you train at")
    activations = {c: _peak(net, example_inputs, "fresh") for c, net in nets.items()}
    if activations["pairs"] > activations["each"] * (1 + SLACK):
        return "each", (f"with pairs of blocks the step's activations would peak at "
                        f"{_size(activations['pairs'])}, with one coupling per block at "
                        f"{_size(activations['each'])}")
    if budget is not None and peak["pairs"] > budget:
        return "each", (f"with pairs of blocks the step would need {_size(peak['pairs'])} with "
                        f"every unit recomputing, over the budget of {_size(budget)}")
    if _unmatched(plans["pairs"]) > _unmatched(plans["each"]):
        names = ", ".join(s.name for s in plans["pairs"].unmatched())
        return "each", (f"pairs of blocks would leave {names} further outside width='match''s "
                        f"parameter promise")
    couplings = {c: sum(len(s.couplings) for s in plan.stages) for c, plan in plans.items()}
    return "pairs", (f"{couplings['pairs']} couplings of two blocks' branches instead of "
                     f"{couplings['each']} of one, the step peaking at {_size(peak['pairs'])} "
                     f"({_size(peak['each'])} with one coupling per block)")


def _unmatched(plan: Plan) -> int:
    """Parameters the stages outside width="match"'s promise miss it by."""
    return sum(abs(s.params_after - s.params_before) for s in plan.unmatched())


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:,.0f} KiB"
