"""Step 3 of the pipeline: decide what becomes of every residual block.

The plan is plain data (names, numbers, reasons). The rewrite executes it and the report prints
it, so what is printed is what was done. revify.plan.schedule's choice goes beside it
(`Plan.schedule`, a frozen `Schedule` attached once), never into it: nothing edits a plan's
blocks, stages or segments after `make_plan`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import fx, nn

from revify.graph.blocks import ResidualBlock, module_path
from revify.graph.channels import BranchChannels, Unresizable, analyze_branch, groups_key, inner_key
from revify.plan.lean import HOT_FRACTION, LeanPlan, largest_tensor, plan_lean
from revify.runtime.modes import UnitMode, UnitSchedule
from revify.plan.resize import holds_state, rebuild, resizer_for

Action = Literal["reversible", "checkpointed", "stored"]
MATCH_TOLERANCE = 0.10  # width="match" promises each stage's parameter count within this fraction


@dataclass
class Options:
    """Every setting of a plan. `revify.transform` takes the user's (width, budget) and leaves
    the rest at their defaults; the baselines and measurements (`revify bench`, `revify drift`,
    the tests) set the others through `revify.pipeline.build`."""
    width: float | Literal["match"] = "match"   # internal width multiplier, or match parameters
    # How a stage's blocks make couplings. "pairs": two consecutive blocks make one, F the
    # first's branch and G the second's, an odd last block F alone: a stage runs as many
    # branches (layers, kernel launches) as the original. "each": every block is F and G of its
    # own coupling, its branch built twice at narrower widths. "auto": pairs unless they cost
    # activation memory (revify.plan.couple); make_plan takes "pairs" or "each".
    couple: Literal["auto", "pairs", "each"] = "auto"
    # The layers outside reversible stages (stem, head, blocks that cannot be inverted): their
    # activations recomputed in the backward (activation checkpointing), or stored as usual.
    non_invertible: Literal["recompute", "store"] = "recompute"
    reversible: bool = True                      # False: per-block checkpointing only (a baseline)
    reconstruction: Literal["exact", "native"] = "exact"  # fixed-point grid, or plain float
    # Keep the stream at every k-th block input (bounds native drift to k blocks): one k for
    # every stage, or {stage name: k}.
    anchor_every: int | dict[str, int] | None = None
    # With reversible=False: checkpoint the units in this many contiguous groups instead of one
    # by one ("sqrt": sqrt(n) of them), the last stored, as torch's checkpoint_sequential does.
    segments: int | Literal["sqrt"] | None = None
    # Leaner recompute of checkpointed units (revify.plan.lean): nested cheap layers, in-place adds,
    # masked ReLUs. False: plain per-unit checkpointing (the baseline revify bench measures).
    lean: bool = True
    # revify.plan.schedule: "budget" lets the units whose activations fit under `budget` keep them
    # (nothing recomputed in their backward) and the units whose rerun fits without the lean
    # nesting run it plainly; "recompute_all" recomputes every unit, nested layers too.
    schedule: Literal["budget", "recompute_all"] = "budget"
    # Peak activation bytes a training step at the example input may reach (None: the peak
    # with every unit recomputing and 1%).
    budget: int | None = None

    def __post_init__(self):
        for name, allowed in (("couple", ("auto", "pairs", "each")),
                              ("non_invertible", ("recompute", "store")),
                              ("reconstruction", ("exact", "native")),
                              ("schedule", ("budget", "recompute_all"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, "
                                 f"not {getattr(self, name)!r}.")
        if self.width != "match" and not (isinstance(self.width, (int, float)) and self.width > 0):
            raise ValueError(f"width must be 'match' or a positive number, not {self.width!r}.")
        every = self.anchor_every.values() if isinstance(self.anchor_every, dict) else \
            [] if self.anchor_every is None else [self.anchor_every]
        if self.segments is not None and (self.reversible or not (
                self.segments == "sqrt" or (isinstance(self.segments, int) and self.segments > 0))):
            raise ValueError(f"segments must be 'sqrt' or a positive number, with "
                             f"reversible=False, not {self.segments!r}.")
        if self.budget is not None and not (isinstance(self.budget, int) and self.budget > 0):
            raise ValueError(f"budget must be a positive number of bytes, not {self.budget!r}.")
        if self.budget is not None and not self.schedules:
            raise ValueError("budget needs schedule='budget' and the default reversible plan "
                             "(reversible=True, non_invertible='recompute', no segments).")
        if not all(isinstance(k, int) and not isinstance(k, bool) and k > 0 for k in every):
            raise ValueError(f"anchor_every must be a positive whole number of blocks (or a dict "
                             f"of them by stage name), not {self.anchor_every!r}.")

    @property
    def schedules(self) -> bool:
        """Whether revify.plan.schedule may store units: only revify's own plan, not the baselines
        (per-block checkpointing, sqrt(n) groups) nor the stored layers of
        non_invertible='store'."""
        return (self.schedule == "budget" and self.reversible and self.segments is None
                and self.non_invertible == "recompute")

    def anchors_for(self, stage: str) -> int | None:
        if isinstance(self.anchor_every, dict):
            return self.anchor_every.get(stage)
        return self.anchor_every


@dataclass
class BlockPlan:
    name: str
    block: ResidualBlock
    shape: tuple[int, ...]                     # output shape at the example input
    dim: int = 1                               # the dim of the stream that holds the channels
    action: Action = "checkpointed"
    reason: str = ""
    stage: int | None = None
    pre_op: str | None = None                  # activation the branches apply first (see README)
    channels: dict[str, int] = field(default_factory=dict)  # branch node -> new channel count
    stream: list[str] = field(default_factory=list)        # branch nodes on the coupled stream
    params_before: int = 0
    params_after: int = 0
    lean: LeanPlan | None = None               # what its branches' recompute drops
                                               # (revify.plan.lean)


@dataclass
class StagePlan:
    name: str
    blocks: list[str]
    entry: str                                 # node feeding the stage
    output: str                                # node whose value the stage replaces (last add)
    channels: int                              # stream channels C (each half holds C/2)
    width: float                               # internal widths built, relative to the original
    dim: int = 1                               # the dim split into halves
    anchor_every: int | None = None            # the stream is kept at every k-th block input
    # (F, G) of each coupling, as block names: (b, b) when a block's branch gives both, (b, None)
    # when it is F alone (G none: y2 = x2); a transformer's attention and MLP blocks pair up as
    # (attention, MLP), as in Reversible ViT.
    couplings: list[tuple[str, str | None]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0


@dataclass
class SegmentPlan:
    name: str
    kind: Literal["stem", "block", "stage", "head", "glue", "group"]
    action: Action
    nodes: list[str]
    blocks: list[str] = field(default_factory=list)
    lean: LeanPlan | None = None               # what a checkpointed unit's recompute drops
    # A unit of its own in the rewritten net (a Checkpointed or ReversibleStage module); False:
    # its nodes run inline, stored (non_invertible="store", the last of sqrt(n) groups). A unit
    # revify.plan.schedule stores stays a unit, its action as planned: the schedule says how it
    # runs (Plan.runs_as).
    outlined: bool = True


@dataclass(frozen=True)
class Schedule:
    """What revify.plan.schedule chose, made once and never changed: how each unit runs (the units
    that keep their activations instead of recomputing them, those that rerun without
    revify.plan.lean's nesting, those that keep their dearest layers' outputs for the rerun), and
    what that costs. The plan is not edited for it: the units run, and the report prints,
    the plan as made with this on top. Bytes are projected for a training step at the
    example input."""
    budget: int                                # the peak activation bytes allowed (gradients
                                               # in flight included: revify.plan.schedule)
    peak_recompute: int                        # the peak with every unit recomputing
    peak: int                                  # the peak with the units as `units` says
    activation_budget: int = 0                 # the same for the activations alone, without
                                               # the gradients in flight (0: unbounded, a
                                               # budget the user gave)
    units: dict[str, UnitSchedule] = field(default_factory=dict)  # unit -> how it runs, for
                                               # every outlined unit, in order
    stored: dict[str, int] = field(default_factory=dict)  # STORED unit -> bytes it keeps
    kept: dict[str, int] = field(default_factory=dict)  # unit -> bytes of layer outputs its
                                               # forward keeps for its rerun (revify.runtime.keep)
    flops_saved: int = 0                       # recompute FLOPs a step no longer runs
    skipped: str = ""                          # why no unit could be considered, if so

    @property
    def plain(self) -> list[str]:
        """The units whose rerun nests no layer: the peak stays where it is without it."""
        return [name for name, unit in self.units.items() if unit.mode is UnitMode.PLAIN]


@dataclass
class Plan:
    model: str
    options: Options
    blocks: list[BlockPlan]
    stages: list[StagePlan]
    segments: list[SegmentPlan]
    params_before: int
    params_after: int = 0
    opaque: dict[str, str] = field(default_factory=dict)  # modules fx could not trace -> why
    schedule: Schedule | None = None           # revify.plan.schedule's choice (None: not run)
    coupling: str = ""                         # why couple="auto" chose this (revify.plan.couple)
    # revify.distill.Distillation: how the stages were fitted to a trained model's (None: they
    # start from slices of its layers)
    distillation: object | None = None

    def __str__(self) -> str:
        from revify.plan.report import format_plan
        return format_plan(self)

    def block(self, name: str) -> BlockPlan:
        return next(b for b in self.blocks if b.name == name)

    def unmatched(self) -> list[StagePlan]:
        """The stages width="match" could not keep within MATCH_TOLERANCE of their parameters
        (a branch with little internal width cannot make up for its halved stream layers)."""
        if self.options.width != "match":
            return []
        return [s for s in self.stages
                if abs(s.params_after - s.params_before) > MATCH_TOLERANCE * s.params_before]

    def segment(self, name: str) -> SegmentPlan:
        return next(s for s in self.segments if s.name == name)

    def unit_schedule(self, name: str) -> UnitSchedule:
        """How unit `name` runs: as the schedule says, else as the rewrite built it (LEAN,
        keeping nothing)."""
        return self.schedule.units.get(name, UnitSchedule()) if self.schedule else UnitSchedule()

    def runs_as(self, segment: SegmentPlan) -> str:
        """What `segment` runs as: its action, or "stored" where the schedule stores it."""
        stored = self.unit_schedule(segment.name).mode is UnitMode.STORED
        return "stored" if stored else segment.action

    def running(self, lean: LeanPlan | None, unit: str) -> LeanPlan | None:
        """What of `lean` (a plan of unit `unit` or of one of its blocks) runs: its nesting
        only if the unit runs LEAN (PLAIN and STORED store what is nested; their in-place adds
        and masked ReLUs stay), only the kept layers the unit keeps."""
        if lean is None:
            return None
        schedule = self.unit_schedule(unit)
        nests = schedule.mode is UnitMode.LEAN
        kept = [(n, m) for n, m in zip(lean.kept, lean.kept_layers) if m in schedule.kept]
        return replace(lean, nested=lean.nested if nests else [],
                       layers=lean.layers if nests else [],
                       kept=[n for n, _ in kept], kept_layers=[m for _, m in kept])

    def leans(self, segment: SegmentPlan) -> list[LeanPlan]:
        """What the recompute of `segment`'s unit does differently: its own lean plan, or its
        blocks' (a reversible stage's branches)."""
        leans = [segment.lean] + [self.block(b).lean for b in segment.blocks]
        return [lean for lean in leans if lean is not None]


# ----------------------------------------------------------------------------- blocks
def _stream_dim(gm: fx.GraphModule, block: ResidualBlock) -> int:
    """The dim of the block's input that holds channels: where its branch's first layer works.

    1 for conv nets (NCHW), the last for transformers ((B, N, C) tokens: a LayerNorm first).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    rank = len(nodes[block.entry].meta.get("shape") or ())
    for name in block.branch:
        node = nodes[name]
        if rank < 2 or node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        rule = resizer_for(module)
        if rule is not None and rule.channels_in(module) is not None:
            return rule.axis % rank
    return 1


def _why_not_invertible(gm: fx.GraphModule, block: ResidualBlock, dim: int) -> str | None:
    nodes = {n.name: n for n in gm.graph.nodes}
    entry_shape, out_shape = (nodes[block.entry].meta.get("shape"),
                              nodes[block.add].meta.get("shape"))
    if not block.identity_shortcut:
        layers = [nodes[n].target for n in block.shortcut if nodes[n].op == "call_module"]
        what = f"projection shortcut ({', '.join(map(str, layers))})" if layers else \
            f"shortcut transforms x ({', '.join(block.shortcut)})"
        return f"{what}: not invertible"
    if entry_shape != out_shape:
        return f"changes shape {_fmt(entry_shape)} -> {_fmt(out_shape)}"
    if entry_shape is None or len(entry_shape) <= dim:
        return "input has no channel dim to split"
    if entry_shape[dim] % 2:
        return f"{entry_shape[dim]} channels cannot be split into equal halves"
    return None


def _fmt(shape) -> str:
    return "x".join(map(str, shape[1:])) if shape else "?"


def _module_params(gm: fx.GraphModule, names: list[str]) -> int:
    """Parameters of the modules the given nodes call and the parameters they read bare
    (get_attr), each counted once."""
    nodes = {n.name: n for n in gm.graph.nodes}
    params = {}
    for node in (nodes[n] for n in names):
        if node.op == "call_module":
            params.update((id(p), p) for p in gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr" and isinstance(attr := _attr(gm, node.target), nn.Parameter):
            params[id(attr)] = attr
    return sum(p.numel() for p in params.values())


def _attr(gm: fx.GraphModule, target: str):
    module, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(module), name)


def _resized_params(gm: fx.GraphModule, block: BlockPlan, widths: dict[str, int],
                    cache: dict | None = None) -> int:
    """Parameters of one half-width branch (F or G) at the given widths, built on the meta device.

    The width search asks for the same (module, widths) many times: `cache` remembers them.
    """
    cache = {} if cache is None else cache
    nodes = {n.name: n for n in gm.graph.nodes}
    total, seen = 0, set()
    for name in block.block.branch:
        node = nodes[name]
        if node.op not in ("call_module", "get_attr") or node.target in seen:
            continue
        seen.add(node.target)
        if node.op == "get_attr":  # a per-channel vector: as many values as channels
            total += widths[name] if isinstance(_attr(gm, node.target), nn.Parameter) else 0
            continue
        key = (node.target, widths[node.all_input_nodes[0].name], widths[name],
               widths.get(inner_key(name)), widths.get(groups_key(name)))
        if key not in cache:
            new = rebuild(gm.get_submodule(node.target), *key[1:3], torch.device("meta"), *key[3:])
            cache[key] = sum(p.numel() for p in new.parameters())
        total += cache[key]
    return total


def _shared_layers(gm: fx.GraphModule, blocks: list[ResidualBlock]) -> dict[str, str]:
    """Block name -> a layer with parameters it shares with code outside the block.

    Rebuilding such a branch would silently untie the weights, so the block is not made reversible.
    """
    users: dict[str, set[str | None]] = {}
    owner = {n: b.name for b in blocks for n in b.nodes}
    for node in gm.graph.nodes:
        if node.op == "call_module" and holds_state(gm.get_submodule(node.target)):
            users.setdefault(node.target, set()).add(owner.get(node.name))
        elif node.op == "get_attr":  # one node per attribute: its users say who reads it
            users.setdefault(node.target, set()).update(owner.get(u.name) for u in node.users)
    shared = {}
    for target, owners in users.items():
        if len(owners) > 1:
            for name in owners - {None}:
                shared.setdefault(name, target)
    return shared


def fixes_group_width(gm: fx.GraphModule) -> bool:
    """Whether the model's grouped layers keep their group width at other widths (RegNet: 8
    channels a group in every stage) rather than their number of groups (ResNeXt: 32 groups in
    every stage). Only layers that all have one group count at several widths say the count;
    one shape alone says nothing, and then the group width is kept: the layer's parameters then
    grow with its width as a 1x1 conv's do, so a stage's count can be matched in fine steps."""
    grouped = [(m.in_channels // groups, groups) for m in gm.modules()
               if (rule := resizer_for(m)) is not None and (groups := rule.groups(m)) > 1]
    counts, widths = {g for _, g in grouped}, {w for w, _ in grouped}
    return not (len(counts) == 1 and len(widths) > 1)


def _plan_block(gm, block: ResidualBlock, options: Options, shared: dict[str, str],
                fixed_group_width: bool = True) -> tuple[BlockPlan, BranchChannels | None]:
    nodes = {n.name: n for n in gm.graph.nodes}
    plan = BlockPlan(name=block.name, block=block, shape=nodes[block.output].meta.get("shape"),
                     dim=_stream_dim(gm, block),
                     params_before=_module_params(gm, list(block.branch + block.shortcut)))
    plan.params_after = plan.params_before
    plan.reason = _why_not_invertible(gm, block, plan.dim) or ""
    if not plan.reason and block.name in shared:
        plan.reason = (f"shares layer '{shared[block.name]}' with other code: rebuilding it would "
                       f"untie the weights")
    if not options.reversible:
        plan.reason = "per-block checkpointing requested (reversible=False)"
    if plan.reason:
        return plan, None
    try:
        analysis = analyze_branch(gm, block.entry, list(block.branch), block.branch_output,
                                  plan.dim, fixed_group_width)
        analysis.widths(plan.shape[plan.dim] // 2, 1.0)
    except Unresizable as exc:
        plan.reason = f"branch cannot be halved: {exc}"
        return plan, None
    return plan, analysis


# ----------------------------------------------------------------------------- stages
def _chain(gm, candidates: list[BlockPlan]) -> list[list[BlockPlan]]:
    """Group consecutive reversible candidates whose intermediate outputs feed nothing else."""
    nodes = {n.name: n for n in gm.graph.nodes}
    runs: list[list[BlockPlan]] = []
    for bp in candidates:
        prev = runs[-1][-1] if runs else None
        if prev is not None and bp.block.entry == prev.block.output and bp.dim == prev.dim:
            owned = set(bp.block.nodes)
            if all(u.name in owned for u in nodes[prev.block.output].users):
                runs[-1].append(bp)
                continue
        runs.append([bp])
    return runs


def _couplings(run: list[BlockPlan], couple: str) -> list[tuple[BlockPlan, BlockPlan | None]]:
    """(F, G) per coupling. Two residual blocks of one module (a transformer block's attention
    and MLP) make one coupling, F = the first and G = the second, as in Reversible ViT; with
    couple="pairs" so do any two consecutive blocks (a RevNet's F and G are two residual
    functions, so a stage keeps the original's depth in them), and an odd last block is F alone
    (y1 = x1 + F(x2), y2 = x2: NICE's additive coupling), so that the stage runs one branch per
    block, as the original does. A block with no other in its stage is F and G of its own, as
    every block is with couple="each": alone, it would leave half the stream unchanged."""
    pairs, k = [], 0
    while k < len(run):
        if k + 1 < len(run) and (couple == "pairs"
                                 or module_path(run[k].name) == module_path(run[k + 1].name)):
            pairs.append((run[k], run[k + 1]))
            k += 2
        else:
            pairs.append((run[k], None if couple == "pairs" and len(run) > 1 else run[k]))
            k += 1
    return pairs


def _solve_width(gm, run: list[BlockPlan], analyses, options: Options) -> float:
    """The internal-width multiplier for a stage: the user's, or the one matching parameters."""
    if options.width != "match":
        return float(options.width)
    half = run[0].shape[run[0].dim] // 2
    cache: dict = {}

    def params_at(scale: float) -> int:
        return sum(_resized_params(gm, bp, analyses[bp.name].widths(half, scale), cache)
                   for pair in _couplings(run, options.couple) for bp in pair if bp)

    target = sum(bp.params_before for bp in run)
    lo, hi = math.log(1 / 16), math.log(16)
    for _ in range(24):  # parameters grow with the width: bisect on a log scale
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if params_at(math.exp(mid)) < target else (lo, mid)
    # rounded outwards: both ends of the bisection sit at one jump of the rounded widths, and
    # rounding both to the nearest would put them on the same side of it
    candidates = [math.floor(math.exp(lo) * 1e4) / 1e4, math.ceil(math.exp(hi) * 1e4) / 1e4]
    return min(candidates, key=lambda s: abs(params_at(s) - target))


def _ratio(counts: list[tuple[int, int]], default: float) -> float:
    """sum(new) / sum(old) of (new, old) counts; `default` where there are none (a branch with
    no internal layer: its width is the stream's)."""
    old = sum(o for _, o in counts)
    return sum(n for n, _ in counts) / old if old else default


def _plan_stages(gm, block_plans: list[BlockPlan], analyses, options: Options) -> list[StagePlan]:
    stages = []
    candidates = [bp for bp in block_plans if bp.name in analyses]
    for run in _chain(gm, candidates):
        width = _solve_width(gm, run, analyses, options)
        dim = run[0].dim
        half = run[0].shape[dim] // 2
        couplings = _couplings(run, options.couple)
        copies = {bp.name: sum(pair.count(bp) for pair in couplings) for bp in run}
        index, inside = len(stages), []
        for k, bp in enumerate(run):
            bp.action, bp.stage = "reversible", index
            bp.pre_op = run[k - 1].block.post_op if k else None
            analysis = analyses[bp.name]
            bp.channels = analysis.widths(half, width)
            inside.append(analysis.internal(bp.channels))
            bp.stream = [n for n, c in analysis.node_class.items() if c == analysis.stream]
            if bp.pre_op:
                bp.channels[bp.pre_op] = half
                bp.stream.append(bp.pre_op)
            bp.params_after = copies[bp.name] * _resized_params(gm, bp, bp.channels)
        name = run[0].name if len(run) == 1 else f"{run[0].name}..{run[-1].name}"
        stages.append(StagePlan(name=name, blocks=[bp.name for bp in run], entry=run[0].block.entry,
                                output=run[-1].block.add, channels=2 * half, dim=dim,
                                width=_ratio(inside, default=width),
                                couplings=[(f.name, g and g.name) for f, g in couplings],
                                anchor_every=options.anchors_for(name),
                                params_before=sum(bp.params_before for bp in run),
                                params_after=sum(bp.params_after for bp in run)))
    return stages


# ----------------------------------------------------------------------------- segments
def _plan_segments(gm, block_plans: list[BlockPlan], stages: list[StagePlan],
                   options: Options) -> list[SegmentPlan]:
    """Cut the graph into the units the rewrite wraps: stem, blocks, stages and head.

    Loose nodes between units join the unit after them (so a stage's exit activation is
    recomputed by the next checkpointed block instead of being stored twice); those before the
    first block form the stem and those after the last block the head.
    """
    owner: dict[str, tuple[str, str]] = {}
    for bp in block_plans:
        key = ("stage", stages[bp.stage].name) if bp.stage is not None else ("block", bp.name)
        for n in bp.block.nodes:
            owner[n] = key
        if bp.stage is not None and bp.block.post_op:
            owner.pop(bp.block.post_op)  # re-owned below if the next block of the stage uses it
    for bp in block_plans:
        if bp.pre_op:
            owner[bp.pre_op] = ("stage", stages[bp.stage].name)
    stored = "checkpointed" if options.non_invertible == "recompute" else "stored"
    segments: list[SegmentPlan] = []
    loose: list[str] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        key = owner.get(node.name)
        if key is None:
            loose.append(node.name)
            continue
        last = segments[-1] if segments else None
        if last is not None and (last.kind, last.name) == key and not loose:
            last.nodes.append(node.name)
            continue
        if loose and (key[0] == "stage" or not segments):
            segments.append(SegmentPlan("stem" if not segments else f"glue{len(segments)}",
                                        "stem" if not segments else "glue", stored, loose,
                                        outlined=stored != "stored"))
            loose = []
        action = "reversible" if key[0] == "stage" else stored
        segments.append(SegmentPlan(key[1], key[0], action, loose + [node.name],
                                    outlined=action != "stored"))
        loose = []
    if loose:
        segments.append(SegmentPlan("head", "head", stored, loose, outlined=stored != "stored"))
    for seg in segments:
        seg.blocks = [bp.name for bp in block_plans if bp.block.add in seg.nodes]
    return segments


def _grouped(segments: list[SegmentPlan], count: int | str) -> list[SegmentPlan]:
    """Consecutive units merged into `count` groups of near-equal length, every group
    checkpointed but the last, which runs stored (its activations are needed at once)."""
    n = len(segments)
    k = max(1, min(n, round(math.sqrt(n)) if count == "sqrt" else int(count)))
    bounds = [round(i * n / k) for i in range(k + 1)]
    groups = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        members = segments[a:b]
        name = members[0].name if len(members) == 1 else f"{members[0].name}..{members[-1].name}"
        last = i == k - 1
        groups.append(SegmentPlan(name, "group", "stored" if last else "checkpointed",
                                  [n for m in members for n in m.nodes],
                                  [b for m in members for b in m.blocks], outlined=not last))
    return groups


def _plan_lean(gm: fx.GraphModule, segments: list[SegmentPlan], blocks: dict[str, BlockPlan],
               keep: bool):
    """What each unit's recompute drops (revify.plan.lean): layers are nested in the units whose
    tensors are the largest of the step, where its peak is reached, and nowhere else, since
    each costs its FLOPs once more (the stem neither: it runs its backward last, with little
    else alive). With `keep` (revify.plan.schedule will choose) every unit names its dearest layers,
    whose outputs its forward may keep (revify.runtime.keep)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    largest = {seg.name: largest_tensor([nodes[n] for n in seg.nodes]) for seg in segments}
    hottest = max(largest.values(), default=0)
    unkept = {n for seg in segments if seg.action == "reversible" for n in seg.nodes}
    for seg in segments:
        hot = largest[seg.name] > HOT_FRACTION * hottest
        if seg.action == "checkpointed":
            seg.lean = plan_lean(gm, seg.nodes, unkept, hot and seg.kind != "stem", keep=keep)
        elif seg.action == "reversible":
            for bp in (blocks[b] for b in seg.blocks):
                branch = [*bp.block.branch, *([bp.pre_op] if bp.pre_op else [])]
                bp.lean = plan_lean(gm, branch, set(), hot, bp.channels, bp.dim, keep) or None


def make_plan(gm: fx.GraphModule, blocks: list[ResidualBlock], options: Options) -> Plan:
    if options.couple == "auto":
        raise ValueError("make_plan takes couple='pairs' or 'each' (revify.plan.couple resolves "
                         "'auto')")
    block_plans, analyses = [], {}
    shared = _shared_layers(gm, blocks)
    fixed_group_width = fixes_group_width(gm)
    for block in blocks:
        bp, analysis = _plan_block(gm, block, options, shared, fixed_group_width)
        block_plans.append(bp)
        if analysis is not None:
            analyses[bp.name] = analysis
    stages = _plan_stages(gm, block_plans, analyses, options)
    if isinstance(options.anchor_every, dict) and (
            unknown := set(options.anchor_every) - {s.name for s in stages}):
        raise ValueError(f"anchor_every names no reversible stage: {', '.join(sorted(unknown))} "
                         f"(stages: {', '.join(s.name for s in stages) or 'none'}).")
    for bp in block_plans:
        if bp.action != "reversible" and options.non_invertible == "store":
            bp.action = "stored"
    segments = _plan_segments(gm, block_plans, stages, options)
    if options.segments is not None:
        segments = _grouped(segments, options.segments)
    elif options.lean and options.non_invertible == "recompute":  # stored layers set the peak
        _plan_lean(gm, segments, {bp.name: bp for bp in block_plans}, options.schedules)
    params_before = sum(p.numel() for p in gm.parameters())
    changed = sum(s.params_after - s.params_before for s in stages)
    return Plan(model=gm.__class__.__name__, options=options, blocks=block_plans, stages=stages,
                segments=segments, params_before=params_before,
                params_after=params_before + changed, opaque=dict(gm.meta.get("opaque", {})))
