"""Memory analysis: what one training step holds under each strategy, by exact accounting.

A projection (revify.memory.projection) runs one real training step (forward + backward) of the
original network, of per-block checkpointing and of revify on fake tensors (torch's
FakeTensorMode: every op is dispatched with its real shapes and dtypes, no data is allocated)
while a tracker counts every storage the step creates, at the bytes it stands for, and the
unit whose code created it. Nothing is estimated and nothing is allocated, so a batch of 1024 at
224x224 projects in seconds. `measure` runs the same step for real to check the projection.

Parameter gradients are projected in both regimes a step can find them in (revify.memory.
GRAD_REGIMES): "fresh" (created during the step, counted from birth) and "accumulate" (allocated
before it: gradient accumulation, DDP's buckets; fixed memory, plus what the step adds, the
gradients in flight to them included). The budget tables use one, `grads` ("accumulate" by
default: it is the larger, and it is what every step but the first of an accumulating or DDP
run holds); the JSON has both.

Every storage a step allocates is k * batch + m bytes, so each point of the step's memory
timeline is affine in the batch size. Two projections (batch B and 2B) give every point as a
line, and the peak at any batch is the highest of those lines: exact as long as the step makes
the same allocations in the same order at both sizes, which is checked.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from revify.graph.hooks import copy_model
from revify.runtime.checkpoint import Checkpointed
from revify.memory.measure import GRAD_REGIMES, check_grads, measure_step
from revify.memory.measure import parse_bytes  # noqa: F401 (revify.memory.analyze.parse_bytes,
                                               # as before)
from revify.memory.projection import FakeModel, fake_model, project
from revify.rewrite import unit_calls
from revify.graph.trace import trace
from revify.pipeline import build_with

STRATEGIES = ("original", "checkpoint", "revify")
OPTIMIZER_STATES = {"sgd": 0, "momentum": 1, "adamw": 2}   # state tensors kept per parameter
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
                  "half": "float16"}
MiB = 2**20


# ----------------------------------------------------------------------------- inputs
def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    name = _DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype '{dtype}': choose {', '.join(DTYPES)}")
    return DTYPES[name]


def _check(input_size, batch_size: int, optimizer: str) -> tuple[int, ...]:
    input_size = tuple(int(s) for s in input_size)
    if not input_size or any(s <= 0 for s in input_size):
        raise ValueError(f"input_size must be positive, got {input_size}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer '{optimizer}': choose {', '.join(OPTIMIZER_STATES)}")
    return input_size


# ----------------------------------------------------------------------------- results
@dataclass
class StrategyMemory:
    """One strategy's training step. Bytes; `peak_bytes` is what the device must hold."""
    params: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int       # held between forward and backward, the input batch included
    peak_activation_bytes: int  # peak during forward + backward of all but params, grads, state
    step_peak_bytes: int        # the same peak with the gradients alive at that moment ("fresh")
    flops: int                  # forward + backward, recomputation included
    accumulate_peak_bytes: int = 0  # the peak of the same step with every gradient allocated
                                    # before it ("accumulate"): gradients in flight included

    @property
    def peak_bytes(self) -> int:
        """What the device holds at the step's peak, gradients fresh."""
        return self.param_bytes + self.optimizer_bytes + self.step_peak_bytes

    @property
    def accumulate_bytes(self) -> int:
        """What the device holds at the step's peak, gradients allocated before it."""
        return self.weight_bytes + self.accumulate_peak_bytes

    def total_bytes(self, grads: str) -> int:
        return self.peak_bytes if grads == "fresh" else self.accumulate_bytes

    @property
    def weight_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


@dataclass
class Unit:
    """A unit of revify's plan (stem, reversible stage, checkpointed block, head) or a block."""
    name: str
    kind: str
    became: str                                   # under revify
    shape: tuple[int, ...]                        # output, batch dimension left out
    activation_bytes: dict[str, int] = field(default_factory=dict)  # strategy -> held after forward
    recompute_flops: dict[str, int] = field(default_factory=dict)   # strategy -> re-run in backward
    blocks: list["Unit"] = field(default_factory=list)


@dataclass
class Curve:
    """Peak bytes of a step against batch size: every point of its timeline is affine."""
    fixed: int           # parameters, optimizer state (and gradients, if allocated before the
                         # step): no batch dependence
    batch: int           # the timeline was recorded at `batch` and at twice that
    at_batch: list[int]
    at_double: list[int]

    def _points(self):
        b = self.batch
        return [(lo, hi - lo) for lo, hi in zip(self.at_batch, self.at_double)], b

    def peak(self, batch: int) -> int:
        points, b = self._points()
        return self.fixed + max(lo + (grow * (batch - b)) // b for lo, grow in points)

    def largest_batch(self, budget: int) -> int:
        """The largest batch whose peak fits in `budget` bytes (0: not even a batch of 1)."""
        if self.peak(1) > budget:
            return 0
        points, b = self._points()
        room = budget - self.fixed
        # Points that do not grow fit at every batch once they fit at 1.
        best = min((b + ((room - lo) * b) // grow for lo, grow in points if grow > 0),
                   default=2**31)
        while self.peak(best) > budget:  # integer rounding: step back to what fits
            best -= 1
        return best


@dataclass
class StageCost:
    name: str
    blocks: int
    params: int          # parameters of the stage after revify


@dataclass
class Floor:
    """The floor of revify's design for one step (bytes, the input batch left out): what must
    be held between forward and backward (stage outputs, inputs of checkpointed units), plus
    the working set of the one block whose plain recompute keeps the most and that block's
    output gradient. Recomputing that block leanly (revify.plan.lean) can go below it. Units that
    revify.plan.schedule stores count as held: analyze with options={"schedule": "recompute_all"}
    for the floor of the design itself."""
    boundary_bytes: int
    block: str
    working_bytes: int
    grad_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.boundary_bytes + self.working_bytes + self.grad_bytes


@dataclass
class Analysis:
    """What `analyze` found: per strategy, per unit, and (with a budget) what fits.

    `to_json()` is the machine-readable form, `format()` the tables the command line prints.
    """
    model: str
    batch_size: int
    input_size: tuple[int, ...]
    dtype: str
    optimizer: str
    device: str
    memory: int | None                     # the budget, bytes
    strategies: dict[str, StrategyMemory]
    units: list[Unit]
    stages: list[StageCost]
    curves: dict[str, dict[str, Curve]] | None = None  # regime -> strategy -> curve
    measured: dict[str, dict[str, int | None]] | None = None
    grads: str = "accumulate"  # the gradient regime of the budget tables (GRAD_REGIMES)

    def peak(self, strategy: str) -> int:
        """What the device holds at the peak of a step at this batch, in `grads`' regime."""
        return self.strategies[strategy].total_bytes(self.grads)

    def peak_at(self, strategy: str, batch: int, grads: str | None = None) -> int:
        if self.curves is None:
            raise ValueError("this analysis has no batch-size curves: pass memory= or curves=True")
        return self.curves[grads or self.grads][strategy].peak(batch)

    def largest_batch(self, grads: str | None = None) -> dict[str, int] | None:
        if self.memory is None or self.curves is None:
            return None
        return {s: c.largest_batch(self.memory)
                for s, c in self.curves[grads or self.grads].items()}

    def bytes_per_param(self) -> int:
        """A parameter's own bytes, its gradient's and its optimizer state's."""
        return DTYPES[self.dtype].itemsize * (2 + OPTIMIZER_STATES[self.optimizer])

    def extra_blocks(self) -> list[dict] | None:
        """More blocks each reversible stage could hold at this batch, on its own."""
        if self.memory is None:
            return None
        headroom = self.memory - self.peak("revify")
        rows = []
        for stage in self.stages:
            cost = stage.params // stage.blocks * self.bytes_per_param()
            rows.append({"stage": stage.name, "blocks": stage.blocks,
                         "params_per_block": stage.params // stage.blocks, "bytes_per_block": cost,
                         "extra_blocks": max(headroom, 0) // cost if cost else None})
        return rows

    def floor(self) -> Floor:
        """The design floor of `Floor`, from this analysis' units."""
        itemsize = DTYPES[self.dtype].itemsize
        batch_bytes = self.batch_size * math.prod(self.input_size) * itemsize
        blocks = [b for u in self.units for b in (u.blocks or [u]) if u.kind != "other"]
        worst = max(blocks, key=lambda b: b.activation_bytes["original"])
        return Floor(self.strategies["revify"].activation_bytes - batch_bytes, worst.name,
                     worst.activation_bytes["original"],
                     self.batch_size * math.prod(worst.shape) * itemsize)

    def shares(self) -> dict[str, dict]:
        out = {}
        for name, s in self.strategies.items():
            total = s.weight_bytes + s.peak_activation_bytes
            out[name] = {"weight_bytes": s.weight_bytes,
                         "activation_bytes": s.peak_activation_bytes,
                         "weight_share": s.weight_bytes / total, "activation_share":
                         s.peak_activation_bytes / total}
        return out

    def to_json(self) -> dict:
        largest = self.largest_batch()
        return {
            "model": self.model, "batch_size": self.batch_size, "input_size": list(self.input_size),
            "dtype": self.dtype, "optimizer": self.optimizer, "device": self.device,
            "strategies": {k: {**asdict(s), "peak_bytes": s.peak_bytes,
                               "accumulate_bytes": s.accumulate_bytes}
                           for k, s in self.strategies.items()},
            "units": [asdict(u) for u in self.units],
            "shares": self.shares(),
            "budget": None if self.memory is None else {
                "memory_bytes": self.memory, "grads": self.grads, "largest_batch": largest,
                "largest_batch_by_grads": {g: self.largest_batch(g) for g in GRAD_REGIMES},
                "extra_blocks": self.extra_blocks()},
            "measured": self.measured,
        }

    def format(self, fmt: str = "simple", blocks: bool = False) -> str:
        return format_analysis(self, fmt, blocks)


# ----------------------------------------------------------------------------- strategies
def checkpoint_baseline(model: nn.Module, example, leaf_modules=(), **how) -> nn.Module:
    """revify's own checkpointing of the unchanged model: it shares only the leaf modules with
    revify (the other options concern reversible stages), and recomputes plainly (lean=False);
    `how`: more of revify.transform's options (segments=...)."""
    return build_with(model, example, {"leaf_modules": leaf_modules, "reversible": False,
                                       "lean": False, **how})


def strategy_models(model: nn.Module, input_size, options: dict | None = None,
                    revified: nn.Module | None = None) -> dict[str, nn.Module]:
    """The model under each of STRATEGIES: as it is, every unit checkpointed one by one, and
    revify.transform with `options` at a batch of 2 (`revified`, when already transformed so)."""
    options = options or {}
    example = torch.empty(2, *input_size)
    return {"original": model,
            "checkpoint": checkpoint_baseline(model, example, options.get("leaf_modules", ())),
            "revify": revified if revified is not None else build_with(model, example, options)}


# ----------------------------------------------------------------------------- projection
@dataclass
class _Run:
    memory: StrategyMemory
    held: dict[tuple, int]              # label -> bytes held after the forward
    recompute_flops: dict[tuple, int]   # label -> FLOPs re-run during the backward
    shapes: dict[int, tuple]            # row -> its output's shape, batch left out
    timelines: dict[str, list[int]]     # gradient regime -> bytes live after every event


def _run(p: _Prepared, batch: int, input_size, dtype, device, optimizer: str,
         grads: str) -> _Run:
    """One projected training step of the strategy `p` (cross-entropy on a batch it holds,
    gradients in the regime `grads`), its memory attributed to the rows of the report."""
    with p.fake.mode:
        x = torch.empty(batch, *input_size, dtype=dtype, device=device)
    step = project(p.fake, (x,), grads, loss="cross_entropy", count_inputs=True, labels=p.labels,
                   label_modules=p.label_modules)
    params = list(p.fake.module.parameters())
    trainable = sum(q.untyped_storage().nbytes() for q in params if q.requires_grad)
    memory = StrategyMemory(
        params=sum(q.numel() for q in params),
        param_bytes=sum(q.untyped_storage().nbytes() for q in params),
        grad_bytes=step.grad_bytes, optimizer_bytes=OPTIMIZER_STATES[optimizer] * trainable,
        activation_bytes=step.held, peak_activation_bytes=step.peak_activations,
        step_peak_bytes=step.peak, flops=step.flops)
    # a row's output is that of its label that ran last
    shapes = {label[0]: shape for label, shape in step.labels.shapes.items()}
    return _Run(memory, step.labels.held, step.labels.rerun_flops, shapes, {grads: step.timeline})


# ----------------------------------------------------------------------------- labels
def _block_rows(plan) -> dict[str, int]:
    return {b: i for i, seg in enumerate(plan.segments) for b in seg.blocks}


def _rows_of(segments, report_plan) -> list[int]:
    """The row of revify's plan each of another plan's segments is reported under.

    A segment with blocks goes to its first block's row; one before every block to the first
    row (the stem), one after every block to the last (the head), one in between to the next
    block's row (loose nodes join the unit after them, as in the plan).
    """
    row_of = _block_rows(report_plan)
    out = []
    for k, seg in enumerate(segments):
        later = [row_of[s.blocks[0]] for s in segments[k:] if s.blocks]  # this one included
        if not any(s.blocks for s in segments[:k + 1]):
            out.append(0)
        else:
            out.append(later[0] if later else len(report_plan.segments) - 1)
    return out


def _original_labels(report_plan) -> dict[str, tuple]:
    """Node -> (row, block): the traced original has the node names revify's plan refers to."""
    labels = {}
    for i, seg in enumerate(report_plan.segments):
        in_stage = {n: b for b in (seg.blocks if seg.kind == "stage" else [])
                    for n in report_plan.block(b).block.nodes}
        for node in seg.nodes:
            labels[node] = (i, in_stage.get(node))
    return labels


def _net_labels(rev: nn.Module, report_plan) -> dict[str, tuple]:
    """Unit node of a revified net -> (row, block): units follow the plan's wrapped segments."""
    plan = rev.revify_plan
    wrapped = [(seg, row) for seg, row in zip(plan.segments, _rows_of(plan.segments, report_plan))
               if seg.outlined]
    units = unit_calls(rev.net)
    if len(units) != len(wrapped):  # an unexpected rewrite: report it all as unattributed
        return {}
    labels = {}
    for node, (seg, row) in zip(units, wrapped):
        row_blocks = (report_plan.segments[row].blocks
                      if report_plan.segments[row].kind == "stage" else [])
        block = seg.blocks[0] if len(seg.blocks) == 1 and seg.blocks[0] in row_blocks else None
        labels[node.name] = (row, block)
    return labels


def _label_modules(net: fx.GraphModule, labels: dict,
                   report_plan) -> list[tuple[nn.Module, tuple]]:
    """The modules that run under a unit's label (and a block's, in a stage) when called, also
    when the backward reruns them (or a layer nested in them): what makes the FLOPs counted
    under a label after the forward its recomputation."""
    modules = []
    for node in unit_calls(net):
        if node.name not in labels:
            continue
        row, block = labels[node.name]
        unit = net.get_submodule(node.target)
        watched = [(unit.module, (row, block))] if isinstance(unit, Checkpointed) else \
            _branch_labels(unit, report_plan, row)
        # a layer checkpointed inside a unit (revify.plan.lean) reruns later, in the unit's backward
        watched += [(inner.module, label) for module, label in watched
                    for inner in module.modules() if isinstance(inner, Checkpointed)]
        modules += watched
    return modules


def _branch_labels(stage: nn.Module, report_plan, row: int) -> list[tuple[nn.Module, tuple]]:
    """A reversible stage's branches, each under the label of the block it was built from (a
    coupling of two blocks: F the first's, G the second's)."""
    name = report_plan.segments[row].name
    couplings = next(s.couplings for s in report_plan.stages if s.name == name)
    return [(branch, (row, blocks[k])) for blocks, coupling in zip(couplings, stage.blocks)
            for k, branch in coupling.branches]


# ----------------------------------------------------------------------------- analysis
@dataclass
class _Prepared:
    fake: FakeModel          # a graph on fake tensors: runs without allocating
    labels: dict[str, tuple]
    label_modules: list[tuple[nn.Module, tuple]]


def _prepare(models: dict[str, nn.Module], device, dtype) -> dict[str, _Prepared]:
    # revify's plan lays out the report: one row per unit (stem, stages, blocks, head), and
    # every strategy's memory is attributed to those rows.
    report_plan = models["revify"].revify_plan
    # The traced original has the node names revify's plan refers to, so its memory can be
    # attributed to the same units; it runs the same ops as the model itself.
    inputs = len((report_plan and models["revify"].revify_recipe or {}).get("inputs", [None]))
    original = fake_model(trace(models["original"], num_inputs=inputs), device, dtype)
    prepared = {"original": _Prepared(original, _original_labels(report_plan), [])}
    for name in ("checkpoint", "revify"):
        whole = fake_model(models[name], device, dtype)
        net = whole.module.net
        labels = _net_labels(whole.module, report_plan)
        prepared[name] = _Prepared(FakeModel(net, whole.mode), labels,
                                   _label_modules(net, labels, report_plan))
    return prepared


def _project(prepared: dict[str, _Prepared], batch, input_size, dtype, device,
             optimizer) -> dict[str, _Run]:
    """Per strategy, a step with fresh gradients, with the peak and timeline of the same step
    with gradients allocated before it beside."""
    runs = {}
    for name, p in prepared.items():
        fresh, accumulated = (_run(p, batch, input_size, dtype, device, optimizer, grads)
                              for grads in GRAD_REGIMES)
        fresh.memory.accumulate_peak_bytes = accumulated.memory.step_peak_bytes
        fresh.timelines.update(accumulated.timelines)
        runs[name] = fresh
    return runs


def _curve(run: _Run, doubled: _Run, batch: int, grads: str) -> Curve:
    m = run.memory
    fixed = m.param_bytes + m.optimizer_bytes + (m.grad_bytes if grads == "accumulate" else 0)
    if len(run.timelines[grads]) == len(doubled.timelines[grads]):
        return Curve(fixed, batch, run.timelines[grads], doubled.timelines[grads])
    # The step allocated differently at the two sizes: fall back to the line through the peaks.
    peak = lambda r: r.memory.total_bytes(grads) - fixed
    return Curve(fixed, batch, [peak(run)], [peak(doubled)])


def _unit(name, kind, became, shape, runs, match) -> Unit:
    unit = Unit(name, kind, became, tuple(shape))
    for strategy, run in runs.items():
        unit.activation_bytes[strategy] = sum(v for k, v in run.held.items() if match(k))
        unit.recompute_flops[strategy] = sum(v for k, v in run.recompute_flops.items() if match(k))
    return unit


def _unit_table(report_plan, runs) -> list[Unit]:
    shapes = runs["revify"].shapes
    units = []
    for i, seg in enumerate(report_plan.segments):
        unit = _unit(seg.name, seg.kind, report_plan.runs_as(seg), shapes.get(i, ()), runs,
                     lambda k, i=i: k is not None and k[0] == i)
        if seg.kind == "stage":
            unit.blocks = [_unit(b, "block", report_plan.block(b).action,
                                 report_plan.block(b).shape[1:], runs,
                                 lambda k, i=i, b=b: k == (i, b)) for b in seg.blocks]
        units.append(unit)
    units.append(_unit("input, loss", "other", "stored", (), runs, lambda k: k is None))
    return units


def _default_budget(memory) -> int | None:
    if memory is not None:
        return parse_bytes(memory)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return None


def _analyze(model, input_size, batch_size, dtype, optimizer, memory, device, curves, name,
             options, grads, revified=None):
    input_size = _check(input_size, batch_size, optimizer)
    check_grads(grads)  # before the transform, which takes the time
    dtype, memory = parse_dtype(dtype), _default_budget(memory)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = strategy_models(model, input_size, options, revified)
    report_plan = models["revify"].revify_plan
    prepared = _prepare(models, device, dtype)

    def project(batch: int) -> dict[str, _Run]:
        return _project(prepared, batch, input_size, dtype, device, optimizer)

    runs, curve_map = project(batch_size), None
    if curves or (curves is None and memory is not None):  # a second size gives every line
        doubled = project(2 * batch_size)
        curve_map = {g: {s: _curve(runs[s], doubled[s], batch_size, g) for s in runs}
                     for g in GRAD_REGIMES}
    analysis = Analysis(
        model=name or type(model).__name__, batch_size=batch_size, input_size=input_size,
        dtype=str(dtype).removeprefix("torch."), optimizer=optimizer, device=device.type,
        memory=memory, strategies={s: r.memory for s, r in runs.items()},
        units=_unit_table(report_plan, runs),
        stages=[StageCost(s.name, len(s.blocks), s.params_after) for s in report_plan.stages],
        curves=curve_map, grads=grads)
    return analysis, models


def analyze(model: nn.Module, input_size=(3, 224, 224), batch_size: int = 64,
            dtype: str | torch.dtype = torch.float32, optimizer: str = "sgd", memory=None, *,
            device: str | None = None, curves: bool | None = None, name: str | None = None,
            options: dict | None = None, grads: str = "accumulate",
            revified: nn.Module | None = None) -> Analysis:
    """Project the memory of one training step under each strategy, allocating nothing.

    memory: a budget ('24GiB', '80e9', or bytes) for the budget table; default: the CUDA device's
        total memory when there is one. curves: also project at twice the batch, for
        `peak_at`/`largest_batch` and plots (default: when there is a budget).
    device: the device the step would run on (default: CUDA when available, else CPU).
    options: the revify strategy's settings: revify.transform's width, budget and leaf_modules,
        or any revify.plan.plan.Options field (as revify.pipeline.build_with takes them).
    grads: the gradient regime the budget tables use: "accumulate" (gradients allocated before
        the step, as from the second micro-batch of accumulation on and under DDP) or "fresh"
        (zero_grad(set_to_none=True)); both are projected either way.
    revified: `model` already revify.transform-ed with `options` at a batch of 2 (what
        `revify convert` has), reported instead of transforming it again.
    """
    return _analyze(model, input_size, batch_size, dtype, optimizer, memory, device, curves, name,
                    options, grads, revified)[0]


def measure(model: nn.Module, input_size=(3, 224, 224), batch_size: int = 64,
            dtype: str | torch.dtype = torch.float32, optimizer: str = "sgd", memory=None, *,
            device: str | None = None, curves: bool | None = None, name: str | None = None,
            options: dict | None = None, grads: str = "accumulate") -> Analysis:
    """`analyze`, plus one real training step of each strategy measured next to the projection.

    CPU: exact live-storage accounting (revify.memory.measure.measure_step); CUDA:
    torch.cuda.max_memory_allocated. `model` itself is not trained: a copy is.
    """
    analysis, models = _analyze(model, input_size, batch_size, dtype, optimizer, memory, device,
                                curves, name, options, grads)
    models["original"] = copy_model(models["original"])
    device = torch.device(analysis.device)
    analysis.measured = {s: _measure(m, analysis.batch_size, analysis.input_size,
                                     DTYPES[analysis.dtype], device) for s, m in models.items()}
    return analysis


def _measure(model: nn.Module, batch: int, input_size, dtype, device) -> dict[str, int | None]:
    model = model.to(device=device, dtype=dtype).train()
    torch.manual_seed(0)
    x = torch.randn(batch, *input_size, device=device, dtype=dtype)
    y = torch.zeros(batch, dtype=torch.long, device=device)
    step = measure_step(model, x, y, grads="fresh")
    accumulated = measure_step(model, x, y, grads="accumulate")
    batch_bytes = x.untyped_storage().nbytes() + y.untyped_storage().nbytes()  # projected too
    peak_activation = step.peak_activation_bytes
    return {"activation_bytes": step.activation_bytes + batch_bytes,
            "peak_activation_bytes": (None if peak_activation is None
                                      else peak_activation + batch_bytes),
            "step_peak_bytes": step.peak_bytes + batch_bytes,
            "accumulate_peak_bytes": accumulated.peak_bytes + batch_bytes}


# ----------------------------------------------------------------------------- report
def _num(value: float) -> str:
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _mib(nbytes: int | None) -> str:
    return "-" if nbytes is None else _num(nbytes / MiB)


def _gflop(flops: int) -> str:
    return _num(flops / 1e9)


def _shape(shape) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def _unit_rows(a: Analysis, blocks: bool) -> list[list]:
    out = []
    for unit in a.units:
        expand = blocks and len(unit.blocks) > 1  # a one-block stage is its block
        for u, prefix in [(unit, "")] + ([(b, "- ") for b in unit.blocks] if expand else []):
            out.append([prefix + u.name, u.became, _shape(u.shape),
                        *[_mib(u.activation_bytes[s]) for s in STRATEGIES],
                        *[_gflop(u.recompute_flops[s]) for s in STRATEGIES[1:]]])
    return out


def _totals_rows(a: Analysis) -> list[list]:
    orig, ckpt = a.peak("original"), a.peak("checkpoint")
    return [[name, f"{s.params:,}", _mib(s.param_bytes), _mib(s.grad_bytes),
             _mib(s.optimizer_bytes), _mib(s.activation_bytes), _mib(s.peak_activation_bytes),
             _mib(s.peak_bytes), _mib(s.accumulate_bytes), _pct(1 - a.peak(name) / orig),
             _pct(1 - a.peak(name) / ckpt), _gflop(s.flops),
             _pct(s.flops / a.strategies["original"].flops - 1, "+")]
            for name, s in a.strategies.items()]


def format_totals(a: Analysis, fmt: str = "simple") -> str:
    """One row per strategy: parameters, gradients, optimizer state, activations, peak, compute."""
    return _table(_totals_rows(a), [
        "strategy", "params", "params MiB", "grads MiB", "optimizer MiB", "held MiB",
        "peak act MiB", "peak MiB: grads fresh", "accumulated",
        f"saved vs original ({a.grads})", "vs checkpoint", "GFLOP/step", "extra compute"], fmt,
        text=1)


def _budget_parts(a: Analysis, fmt: str) -> list[str]:
    gib, largest = 2**30, a.largest_batch()
    rows = [[s, f"{a.peak(s) / gib:,.2f}", "yes" if a.peak(s) <= a.memory else "no",
             f"{largest[s]:,}" if largest else "-"] for s in a.strategies]
    parts = [f"budget: {a.memory / gib:,.2f} GiB ({a.memory:,} bytes), "
             f"gradients {_REGIMES[a.grads]}",
             _table(rows, ["strategy", f"peak GiB at batch {a.batch_size}", "fits",
                           "largest batch"], fmt, text=1)]
    extra = a.extra_blocks()
    if extra:
        parts.append(_table(
            [[e["stage"], e["blocks"], f"{e['params_per_block']:,}", _mib(e["bytes_per_block"]),
              f"{e['extra_blocks']:,}"] for e in extra],
            ["reversible stage", "blocks", "params/block", "MiB per extra block",
             f"extra blocks at batch {a.batch_size}"], fmt, text=1))
        parts.append(
            f"Extra blocks: each stage on its own, given the whole headroom left under revify "
            f"(stages share it). A block copied from the stage costs its parameters, their "
            f"gradients and the {a.optimizer} state ({a.bytes_per_param()} bytes per parameter "
            f"in {a.dtype}); a reversible stage's activation memory does not grow with its depth, "
            f"so that is all the memory it costs. It does cost time: its branches run twice (in "
            f"the forward, and again in the backward).")
    return parts


def _measured_rows(a: Analysis) -> list[list]:
    rows = []
    for s, m in a.measured.items():
        p = a.strategies[s]
        for key, label in [("activation_bytes", "held after forward"),
                           ("peak_activation_bytes", "peak activations"),
                           ("step_peak_bytes", "step peak (grads fresh)"),
                           ("accumulate_peak_bytes", "step peak (grads accumulated)")]:
            measured, projected = m.get(key), getattr(p, key)
            error = ("-" if not measured
                     else f"{projected / measured - 1:+.2%}".replace("-0.00%", "+0.00%"))
            rows.append([s, label, _mib(measured), _mib(projected), error])
    return rows


_REGIMES = {"accumulate": "allocated before the step (gradient accumulation, DDP buckets)",
            "fresh": "created during the step (zero_grad(set_to_none=True))"}

_NOTES = """\
held: bytes held between forward and backward by storages each unit created (under the strategy
in the column); re-GFLOP: forward FLOPs the backward spends re-running the unit. peak act: peak
of everything but parameters, gradients and optimizer state during forward + backward (input
batch included); peak, grads fresh: that plus parameters, optimizer state and the gradients
alive at the moment (zero_grad(set_to_none=True)); accumulated: the same step with every
gradient allocated before it (gradient accumulation, DDP buckets): parameters, gradients,
optimizer state and the step's peak of everything else, gradients in flight included. The
optimizer step's own temporaries are not included. Weights share: parameters,
gradients and optimizer state against peak activations. All figures are exact accounting of one
step run on fake tensors (every op dispatched with real shapes, nothing allocated)."""


def _table(rows, headers, fmt: str, text: int) -> str:
    """A table whose first `text` columns are text and the rest right-aligned numbers."""
    from tabulate import tabulate
    align = ["left"] * text + ["right"] * (len(headers) - text)
    return tabulate(rows, headers, tablefmt=fmt, colalign=align, disable_numparse=True)


def _pct(value: float, sign: str = "") -> str:
    return f"{value + 0.0:{sign}.1%}".replace("-0.0%", "0.0%").replace("+0.0%", "0.0%")


def format_analysis(a: Analysis, fmt: str = "simple", blocks: bool = False) -> str:
    header = (f"{a.model}: batch {a.batch_size}, input {_shape(a.input_size)}, {a.dtype}, "
              f"optimizer {a.optimizer}, projected for {a.device}")
    parts = [header, _table(_unit_rows(a, blocks), [
        "unit", "became", "output", "held MiB: original", "checkpoint", "revify",
        "re-GFLOP: checkpoint", "revify"], fmt, text=3)]
    parts.append(format_totals(a, fmt))
    parts.append(_table([[s, _mib(v["weight_bytes"]), _mib(v["activation_bytes"]),
                          _pct(v["weight_share"]), _pct(v["activation_share"])]
                         for s, v in a.shares().items()],
                        ["strategy", "weights+grads+optimizer MiB", "peak activations MiB",
                         "weights share", "activations share"], fmt, text=1))
    if a.memory is not None:
        parts.extend(_budget_parts(a, fmt))
    if a.measured:
        parts.append(f"measured on {a.device} (one real training step) next to the projection:")
        parts.append(_table(_measured_rows(a), ["strategy", "quantity", "measured MiB",
                                                "projected MiB", "error"], fmt, text=2))
    parts.append(_NOTES)
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- plot
class MissingMatplotlib(RuntimeError):
    """Plots need matplotlib, an optional extra."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingMatplotlib("plotting needs matplotlib, which is not installed: "
                                "pip install matplotlib") from exc


def plot(a: Analysis, path: str) -> None:
    """Peak memory against batch size for the three strategies, with the budget line."""
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    largest = a.largest_batch() or {}
    top = max(2 * a.batch_size,
              min(int(1.25 * max(largest.values(), default=0)), 100 * a.batch_size))
    batches = list(range(1, top + 1, max(1, top // 200)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in STRATEGIES:
        ax.plot(batches, [a.peak_at(s, b) / 2**30 for b in batches], label=s)
    if a.memory is not None:
        ax.axhline(a.memory / 2**30, color="black", linestyle="--", label="budget")
    ax.axvline(a.batch_size, color="grey", linestyle=":", label=f"batch {a.batch_size}")
    ax.set(xlabel="batch size", ylabel=f"peak memory (GiB), gradients {a.grads}",
           title=f"{a.model}, input {_shape(a.input_size)}, {a.dtype}, {a.optimizer}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
