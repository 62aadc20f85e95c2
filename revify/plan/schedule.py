"""Step 5 of the pipeline: let the units whose activations fit under the step's peak keep them.

After the rewrite every non-invertible unit recomputes itself in the backward and every
reversible stage rebuilds its activations: the least memory, for a second forward of compute
(and a third of the layers revify.plan.lean nests in the hottest units). The peak of that step is
reached in one place (in a ResNet, the backward of the first units, at full resolution);
everywhere else the step holds less. So each unit runs in one of three modes
(revify.runtime.modes.UnitMode):

- LEAN: the rerun as the rewrite built it, nested layers recomputed once more;
- PLAIN: the rerun without the nesting (the nested layers store inside it), where its own
  backward still fits under the peak;
- STORED: plain autograd, where its activations fit under the peak for as long as they live,
  from its forward to its backward: its backward recomputes nothing. The units that fit are the
  late ones: low resolution, and their backward runs first, while the step holds little else.

and a LEAN or PLAIN rerun may also KEEP: the forward keeps the outputs of the unit's dearest
layers (revify.runtime.keep: 3x3 convolutions, wide 1x1 ones) and the rerun skips them. That buys
most of a unit's recompute FLOPs for a fraction of what storing it costs, so it fits in more units.

The choice is a `Schedule`, made once and never changed: per unit a
revify.runtime.modes.UnitSchedule (its mode and the kept layers that keep). `transform` attaches it
to the plan, which is not edited for it, and revify.rewrite.apply_schedule sets each unit's to it,
once: what the report prints (the plan and its schedule) is what runs.

How a choice is priced. One projection of a training step per mode (fake tensors: every op
dispatched with its real shapes, nothing allocated, every storage counted;
revify.memory.projection), every unit in that mode, gives the memory over time. The memory during a
unit's forward or backward depends on that unit's own mode; of the other units only those before it
hold anything then (what they keep between forward and backward), and that differs between the
projections by a known constant. So the peak of any choice is the largest, over units, of the unit's
own stretch in its mode's projection, shifted by what the units before it keep in their chosen modes
instead. Modes are taken greedily by the recompute FLOPs they save per byte they add while the
priced peak stays within the budget (by default the all-LEAN peak and 1%: a plain rerun may add
a few kilobytes of per-channel statistics there); the chosen net is projected once more, and
units are given back until it fits, so the budget holds to the byte at the example input.

What the budget leaves after the units' modes goes to single kept layers of the units that keep
none (a unit's whole keeping is often too large for it): each priced as its output's bytes held
from its unit's forward to its backward, taken by FLOPs per byte, given back first if the
final projection does not fit.

Activation bytes throughout: everything a step allocates with its parameter gradients
allocated before it, as from the second micro-batch of gradient accumulation on and under DDP
(revify.memory.measure.GRAD_REGIMES, "accumulate"): activations and the gradients in flight to
`.grad`. That is what a step adds to parameters, gradients and optimizer state in that regime, and
at least the activations in the other (gradients created during the step), so a budget holds in
both.

The default budget also holds the activations alone (the same projections, the gradients in
flight left out) within 1% of their least. The gradients in flight are a parameter's size
whatever the batch, activations grow with it: at a small example input the gradients in flight
set the peak, and units stored under that headroom would outgrow it at the batch trained at
(ResNet-50 planned at batch 2, 32x32 and trained at 16, 112x112: 92 MiB instead of 61). Bound
by both, a plan made at one input keeps its peak at larger ones.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import fx

from revify.runtime.keep import kept_cost
from revify.runtime.modes import UnitMode, UnitSchedule
from revify.plan.plan import Plan, Schedule
from revify.memory.projection import Stretches, fake_inputs, fake_model, project
from revify.runtime.reversible import ReversibleStage
from revify.rewrite import kept, nested, set_mode, unit_nodes


SLACK = 0.01  # the default budget: the least peak and 1% (see the module docstring)


class Mode(NamedTuple):
    """A unit's mode as the search prices it: how its backward runs, and whether its forward
    keeps all of its kept layers' outputs (single kept layers are priced apart, on top)."""
    base: UnitMode
    keep: bool = False


LEAN, PLAIN, STORED = Mode(UnitMode.LEAN), Mode(UnitMode.PLAIN), Mode(UnitMode.STORED)


class projector:
    """project(modes, layers=None) -> Stretches: a training step of a fake copy of `net`
    (nothing allocated) with the units (nodes of `units`) in `modes` (a Mode each) and, where
    `layers[k]` is given, only those kept layers of unit k keeping. The step's gradients are
    allocated before it (never counted: see the module docstring); its backward starts from a
    dense gradient, as a loss gives."""

    def __init__(self, net: fx.GraphModule, units: list[fx.Node], inputs: tuple):
        self.fake = fake_model(net)
        self.units = [self.fake.module.get_submodule(node.target) for node in units]
        self.names = [node.name for node in units]
        self.inputs = inputs
        self.kept = [frozenset(layer.layer_name for layer in kept(unit)) for unit in self.units]

    def __call__(self, modes: list[Mode], layers: list | None = None) -> Stretches:
        for unit, schedule in zip(self.units, self.schedules(modes, layers)):
            set_mode(unit, schedule)
        return project(self.fake, self.inputs, "accumulate", units=self.names).units

    def schedules(self, modes: list[Mode], layers: list | None = None) -> list[UnitSchedule]:
        """How each unit runs in `modes`: a keeping unit keeps the kept layers `layers[k]`
        names, or all of its own where that is not given."""
        def keeps(k: int) -> frozenset[str]:
            some = layers[k] if layers else None
            return self.kept[k] if some is None else frozenset(some)
        return [UnitSchedule(mode.base, keeps(k) if mode.keep else frozenset())
                for k, mode in enumerate(modes)]

    def kept_costs(self) -> list[dict[str, tuple[int, int]]]:
        """Per unit, per kept layer name: the (bytes, FLOPs) of keeping its outputs (both
        branches' copies in a reversible block), from one forward at the example input."""
        costs = [{} for _ in self.units]
        where = {id(m): k for k, unit in enumerate(self.units) for m in kept(unit)}

        def note(layer, _, out):
            unit_costs, cost = costs[where[id(layer)]], kept_cost(layer.layer, out)
            before = unit_costs.get(layer.layer_name, (0, 0))
            unit_costs[layer.layer_name] = (before[0] + cost[0], before[1] + cost[1])
        handles = [m.register_forward_hook(note) for unit in self.units for m in kept(unit)]
        try:
            # a forward without a backward runs each layer once
            with self.fake.mode, torch.no_grad():
                self.fake.module(*fake_inputs(self.inputs))
        finally:
            for handle in handles:
                handle.remove()
        return costs


class Budget(NamedTuple):
    """What a choice may peak at: the step (gradients in flight included) and, for the default
    budget, its activations alone (None: unbounded; see the module docstring)."""
    step: int
    activations: int | None = None

    def allows(self, peak: int, activation_peak: int) -> bool:
        return peak <= self.step and (self.activations is None
                                      or activation_peak <= self.activations)


class _Pricing:
    """The peak of any choice of modes (one per unit), from one projection per mode (see the
    module docstring). `stages[k]`: whether unit k is a reversible stage."""

    def __init__(self, runs: dict[Mode, Stretches], stages: list[bool]):
        self.runs, self.stages = runs, stages

    def held(self, modes: list[Mode], k: int) -> int:
        """What unit k keeps between forward and backward when the units run in `modes`.

        Its output is the next unit's input, kept if either of them keeps it: a recomputing
        unit keeps what its kind keeps (a checkpoint its input, a reversible stage its output),
        a stored one what its ops save (seen in the projection that stores every unit). The
        last unit's output is the net's: kept as its own projection says.
        """
        run, every = self.runs[modes[k]], self.runs[STORED]
        if k + 1 == len(modes):
            return run.held(k)
        ours = every.saves_output[k] if modes[k] == STORED else self.stages[k]
        theirs = every.saves_input[k + 1] if modes[k + 1] == STORED else not self.stages[k + 1]
        return run.inner[k] + (run.size[k] if ours or theirs else 0)

    def peak(self, modes: list[Mode], extra: list[int] | None = None,
             bare: bool = False) -> int:
        """Each unit's stretches in its own mode's projection, shifted by what the units before
        it keep in their chosen modes instead of that projection's; `extra[k]`: bytes unit k
        keeps on top of its mode (some of its kept layers' outputs), counted from its forward
        to its backward, its own stretches whole (an upper bound: its rerun consumes them).
        bare: the activations alone, without the gradients in flight."""
        extra = extra or [0] * len(modes)
        peak = 0
        for k, mode in enumerate(modes):
            own = self.runs[mode]
            shift = sum(self.held(modes, v) - own.held(v) + extra[v] for v in range(k))
            peaks = own.activation_peaks if bare else own.peaks
            peak = max(peak, peaks[k] + shift + extra[k])
        return peak

    def fits(self, modes: list[Mode], budget: Budget, extra: list[int] | None = None) -> bool:
        return budget.allows(self.peak(modes, extra), self.peak(modes, extra, bare=True))

    def saved_flops(self, k: int, mode: Mode) -> int:
        return self.runs[LEAN].flops[k] - self.runs[mode].flops[k]

    def choose(self, budget: Budget) -> list[Mode]:
        """Modes by recompute FLOPs saved per byte added (a plain rerun adds none between
        forward and backward, only to its own stretch: those come first), each taken if it saves
        more than the unit's mode so far and the priced peak fits."""
        lean = self.runs[LEAN]
        n = len(self.stages)
        options = [(k, mode) for mode in self.runs if mode != LEAN for k in range(n)
                   if self.saved_flops(k, mode) > 0]

        def cost(k, mode):  # bytes the mode adds (at least 1): between forward and backward
            # (a stored unit, kept outputs) or to the unit's own stretch (a plain rerun), the
            # units before it holding what they hold recomputing
            run = self.runs[mode]
            before = sum(run.held(v) - lean.held(v) for v in range(k))
            return max(run.held(k) - lean.held(k), run.peaks[k] - before - lean.peaks[k], 1)

        modes = [LEAN] * n
        for k, mode in sorted(options, key=lambda o: -self.saved_flops(*o) / cost(*o)):
            if self.saved_flops(k, mode) <= self.saved_flops(k, modes[k]):
                continue
            before, modes[k] = modes[k], mode
            if not self.fits(modes, budget):
                modes[k] = before
        return modes

    def choose_layers(self, modes: list[Mode], costs: list[dict[str, tuple[int, int]]],
                      budget: Budget) -> list[tuple[int, str, int, int]]:
        """In the units that recompute without keeping, the kept layers (unit, name, bytes,
        FLOPs) whose outputs still fit, by FLOPs saved per byte: what the budget leaves after
        the units' modes, in the pieces a whole unit's keeping is too large for."""
        options = [(k, name, *cost) for k, mode in enumerate(modes)
                   if mode in (LEAN, PLAIN) for name, cost in costs[k].items()]
        extra, chosen = [0] * len(modes), []
        for k, name, nbytes, flops in sorted(options, key=lambda o: -o[3] / max(o[2], 1)):
            extra[k] += nbytes
            if not self.fits(modes, budget, extra):
                extra[k] -= nbytes
            else:
                chosen.append((k, name, nbytes, flops))
        return chosen


def _chain(net: fx.GraphModule, units: list[fx.Node]) -> str | None:
    """Why the units do not run one after another, each on the one before's output (None: they
    do). The pricing needs that order: a unit's backward then ends where the one before begins."""
    chain = set(units)
    for node in net.graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            last = node.all_input_nodes == units[-1:]
            return None if last else "the net's output is not its last unit's"
        if node not in chain:
            return f"'{node.name}' runs between its units"
        k = units.index(node)
        if k and node.all_input_nodes != [units[k - 1]]:
            return f"unit '{node.target}' reads more than the unit before it"
    return None


def _units(net: fx.GraphModule, plan: Plan) -> list | str:
    """`net`'s units, (segment, node) each (revify.rewrite.unit_nodes), or why the schedule
    cannot price them."""
    units = unit_nodes(net, plan) or []
    why = "no unit to store" if not units else _chain(net, [node for _, node in units])
    return units if why is None else why


def least_step(net: fx.GraphModule, plan: Plan, example_inputs: tuple) -> Stretches | None:
    """A training step of `net` as rewritten (every unit LEAN), projected as the schedule prices
    it, which `schedule` can start from; None where it cannot price the units."""
    units = _units(net, plan)
    if isinstance(units, str):
        return None
    return projector(net, [node for _, node in units], example_inputs)([LEAN] * len(units))


def schedule(net: fx.GraphModule, plan: Plan, example_inputs: tuple,
             lean: Stretches | None = None) -> Schedule:
    """How each unit of `net` (rewritten from `plan`) runs within `plan.options.budget`: the
    units that store their activations, rerun plainly or keep kept layers' outputs. Neither
    `net` nor `plan` is changed (revify.rewrite.apply_schedule executes the choice). lean:
    `least_step` of the same net and inputs, if already projected."""
    pairs = _units(net, plan)
    if isinstance(pairs, str):
        return _skip(plan, pairs)
    segments, nodes = [seg for seg, _ in pairs], [node for _, node in pairs]
    project = projector(net, nodes, example_inputs)
    n = len(nodes)
    stages = [isinstance(net.get_submodule(node.target), ReversibleStage) for node in nodes]
    # A plain rerun differs from the lean one only in units with nested layers, keeping only
    # in units with kept layers.
    units = [net.get_submodule(node.target) for node in nodes]
    reruns = [LEAN] + ([PLAIN] if any(map(nested, units)) else [])
    keeping = [r._replace(keep=True) for r in reruns] if any(map(kept, units)) else []
    modes = reruns + [STORED] + keeping
    try:
        pricing = _Pricing({mode: lean if mode == LEAN and lean else project([mode] * n)
                            for mode in modes}, stages)
        costs = project.kept_costs() if any(map(kept, units)) else None
    except Exception as exc:  # a value the step reads (data-dependent control flow): no shapes
        # alone can price it, and every unit recomputing is always right
        return _skip(plan, f"the step cannot be projected on shapes alone: {type(exc).__name__}")
    lean = pricing.runs[LEAN]
    least = lean.peak
    budget = Budget(plan.options.budget) if plan.options.budget else \
        Budget(int(least * (1 + SLACK)), int(lean.activation_peak * (1 + SLACK)))
    if budget.step < least:
        raise ValueError(f"a training step at the example input {_shapes(example_inputs)} needs "
                         f"{least:,} bytes of activations with every unit recomputing; the "
                         f"budget of {budget.step:,} bytes is below that.")
    chosen = pricing.choose(budget)
    pieces = pricing.choose_layers(chosen, costs, budget) if costs else []
    run = project(*_with(chosen, pieces)) if chosen != [LEAN] * n or pieces else lean
    # the pricing was off (it is exact on the models tested): give back
    while not budget.allows(run.peak, run.activation_peak):
        if pieces:
            pieces.pop()
        else:
            chosen[max(k for k in range(n) if chosen[k] != LEAN)] = LEAN
        run = project(*_with(chosen, pieces))
    kept_bytes = {k: pricing.held(chosen, k) - pricing.held(_without_keep(chosen, k), k)
                  for k in range(n) if chosen[k].keep}
    for k, _, nbytes, _ in pieces:
        kept_bytes[k] = kept_bytes.get(k, 0) + nbytes
    return Schedule(
        budget.step, least, run.peak, budget.activations or 0,
        units=dict(zip([seg.name for seg in segments], project.schedules(*_with(chosen, pieces)))),
        stored={seg.name: pricing.held(chosen, k) for k, seg in enumerate(segments)
                if chosen[k] == STORED},
        kept={seg.name: kept_bytes[k] for k, seg in enumerate(segments) if k in kept_bytes},
        flops_saved=sum(pricing.saved_flops(k, chosen[k]) for k in range(n))
        + sum(flops for *_, flops in pieces))


def _with(chosen: list[Mode], pieces: list[tuple[int, str, int, int]]):
    """The units' modes and kept layers (None: all) once `pieces`, layers of units that do
    not keep as a whole, keep too."""
    layers: list[set | None] = [None] * len(chosen)
    for k, name, *_ in pieces:
        layers[k] = (layers[k] or set()) | {name}
    return [mode._replace(keep=True) if layers[k] else mode for k, mode in enumerate(chosen)], \
        layers


def _skip(plan: Plan, why: str) -> Schedule:
    """No choice: every unit recomputes as the rewrite built it, keeping nothing."""
    return Schedule(plan.options.budget or 0, 0, 0, skipped=why,
                    units={seg.name: UnitSchedule() for seg in plan.segments if seg.outlined})


def _without_keep(modes: list[Mode], k: int) -> list[Mode]:
    return modes[:k] + [modes[k]._replace(keep=False)] + modes[k + 1:]


def _shapes(inputs: tuple) -> str:
    return ", ".join("x".join(map(str, t.shape)) for t in inputs if isinstance(t, torch.Tensor))
