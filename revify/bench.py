"""Side-by-side measurement of one training step: original, per-block checkpointing, revify.

Besides revify's own checkpointing baselines, the alternatives users know: timm's
`set_grad_checkpointing` and torch.compile with an activation memory budget.

Memory comes from `revify.memory`: exact live-tensor accounting on CPU (the CPU allocator's
profiled records for compiled rows, whose kernels allocate out of the tracker's sight), the
caching allocator on CUDA; time is the median of timed steps, the strategies interleaved so
that machine noise hits all of them alike. Everything is reported as ratios to the original
as well.
"""
from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from revify.memory.analyze import checkpoint_baseline
from revify.graph.blocks import find_blocks, module_path
from revify.graph.hooks import copy_model
from revify.memory.counting import StepCounts, count_step
from revify.memory.measure import measure_step, measure_step_profiled
from revify.memory.projection import project_peak
from revify.graph.trace import trace
from revify.pipeline import build_with

# torch.compile rows: name -> the min-cut partitioner's activation_memory_budget, the fraction
# of the activations it would save that it may keep (1: all of them; 0: recompute what it can).
COMPILE_BUDGETS = {"compile-budget-0.5": 0.5, "compile-budget-0": 0.0}
COMPILE_BACKEND = "inductor"  # torch.compile's default

# How a row's memory is measured on CPU (its `memory_method`; CUDA: the caching allocator).
MEASURES = {"live tensors": measure_step, "allocator profile": measure_step_profiled}


@dataclass
class BenchResult:
    name: str
    step_seconds: float
    peak_activation_bytes: int | None
    peak_bytes: int                # gradients fresh (set_to_none=True): counted from birth
    accumulate_peak_bytes: int     # gradients allocated before the step: those in flight
    activation_bytes: int
    params: int
    memory_method: str = "live tensors"
    compile_seconds: float | None = None   # compiled rows: the first step, never a timed one
    graphs: int | None = None              # compiled rows: graphs compiled (>1: graph breaks)
    counts: StepCounts | None = None       # ops, Python calls, syncs of a step (eager rows)


def _note(text: str) -> None:
    print(f"revify bench: {text}", file=sys.stderr)


def _revify(**overrides):
    """A revify row: the "revify" row's network (its coupling, which `strategies` pins once that
    row is built), with `overrides` changing how it runs."""
    def build(model, example, options):
        return build_with(model, example, options | overrides)
    build.same_network = True
    return build


def _revify_at_timm_peak(model, example, options):
    """revify allowed the memory timm's checkpointing takes (its projected peak at the bench's
    input, as the schedule's budget, with gradients allocated before the step as the schedule
    prices it): the two compared under the same memory constraint."""
    timm = timm_checkpointing(model, options.get("leaf_modules", ()))
    budget = project_peak(timm, example, grads="accumulate")
    try:
        return build_with(model, example, options | {"budget": budget})
    except ValueError as exc:  # revify's least peak is over it: nothing to compare at that memory
        raise RowLeftOut(str(exc)) from None


def _baseline(**how):
    """revify's own checkpointing of the unchanged model
    (revify.memory.analyze.checkpoint_baseline)."""
    return lambda model, example, options: checkpoint_baseline(
        model, example, options.get("leaf_modules", ()), **how)


# Row name -> how the row's model is built from the original, the example input and revify's
# options. `strategies` builds the rows asked for, in this order.
ROWS = {
    "original": lambda model, example, options: model,
    # every unit checkpointed one by one, stem and head included
    "checkpoint": _baseline(),
    # timm's set_grad_checkpointing: the blocks checkpointed, stem and head stored
    "checkpoint-timm": lambda model, example, options: timm_checkpointing(
        model, options.get("leaf_modules", ())),
    # checkpoint_sequential's sqrt(n) groups, the last stored
    "checkpoint-sqrt": _baseline(segments="sqrt"),
    "revify": _revify(),
    # every unit recomputed: what revify.plan.schedule's stored units save in time, at the same peak
    "revify-recompute": _revify(schedule="recompute_all"),
    # the RevNet paper's choice: the non-invertible layers stored, not recomputed
    "revify-stored": _revify(non_invertible="store"),
    # the same memory as timm's checkpointing, spent by the schedule on speed
    "revify-at-timm-peak": _revify_at_timm_peak,
    "revify-native": _revify(reconstruction="native"),
    **{name: (lambda model, example, options, budget=budget:
              Compiled(model, budget, COMPILE_BACKEND))
       for name, budget in COMPILE_BUDGETS.items()},
}
DEFAULT_ROWS = ("original", "checkpoint", "checkpoint-timm", "checkpoint-sqrt", "revify",
                "revify-recompute", "revify-stored", "revify-at-timm-peak")


def strategies(model: nn.Module, input_size, rows=DEFAULT_ROWS, note=_note, batch_size: int = 2,
               **options) -> dict[str, nn.Module]:
    """The model under each strategy of `rows` (names of ROWS), in ROWS' order.

    options: revify.plan.plan.Options fields and leaf_modules for the revified rows (as
    revify.pipeline.build_with takes them); the checkpointing
    baselines share only its leaf modules. batch_size: the batch the rows will run at (revify's
    schedule chooses at it). note(text) says why a row was left out (a model with no block
    submodule for the timm-style rows).
    """
    example = torch.empty(batch_size, *input_size)
    models, pinned = {}, {}
    for name, build in ROWS.items():
        if name not in rows:
            continue
        try:
            models[name] = build(model, example,
                                 options | (pinned if getattr(build, "same_network", False) else {}))
        except RowLeftOut as exc:
            note(f"{name} left out: {exc}")
        if name == "revify":
            # The other revify rows run the coupling this row chose: they then compare ways of
            # running one network (and couple="auto" is not projected again for each). The
            # budget row keeps "auto": the coupling is part of what a budget chooses.
            pinned = {"couple": models[name].revify_plan.options.couple}
    return models


# ----------------------------------------------------------------------------- timm's checkpointing
class RowLeftOut(ValueError):
    """A row that cannot be built for this model; the message says why."""


class NoBlockModules(RowLeftOut):
    """No residual block of the model is a submodule of its own that could be wrapped."""


class BlockCheckpointed(nn.Module):
    """One block under plain non-reentrant checkpointing, as timm's `checkpoint_seq` runs each
    (its BatchNorm statistics update again in the recompute, as there)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def timm_checkpointing(model: nn.Module, leaf_modules=()) -> nn.Module:
    """What timm's `model.set_grad_checkpointing(True)` makes of a ResNet, on a copy: every
    residual block checkpointed, the stem and the head stored.

    A timm model does it itself. Any other model gets its blocks wrapped in BlockCheckpointed:
    the blocks revify finds, each where it is one submodule (torchvision's `layer1.0`...).
    """
    model = copy_model(model)
    if hasattr(model, "set_grad_checkpointing"):
        try:
            model.set_grad_checkpointing(True)
            return model
        except Exception:  # some timm models assert they do not support it: wrap the blocks
            pass
    names = _block_modules(model, leaf_modules)
    if not names:
        raise NoBlockModules(f"no residual block of {type(model).__name__} is a submodule of its "
                             f"own to wrap")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, BlockCheckpointed(model.get_submodule(name)))
    return model


def _block_modules(model: nn.Module, leaf_modules) -> list[str]:
    """The submodules that hold residual blocks and nothing else (a ViT block holds two)."""
    try:
        gm = trace(model, leaf_modules)
    except Exception as exc:  # a model fx cannot trace: no blocks to find
        raise NoBlockModules(f"tracing failed ({_first_line(exc)})") from None
    owned: dict[str, set[str]] = {}
    for block in find_blocks(gm):
        owned.setdefault(module_path(block.name), set()).update(block.nodes)
    names = []
    for name, nodes in owned.items():
        inside = {n.name for n in gm.graph.nodes
                  if n.op == "call_module" and n.target.startswith(name + ".")}
        if name and inside and inside <= nodes:  # wrapping it checkpoints the blocks, no more
            names.append(name)
    return [n for n in names if not any(m.startswith(n + ".") for m in names)]  # innermost


# ----------------------------------------------------------------------------- torch.compile
class Compiled(nn.Module):
    """A copy of `model` under torch.compile (`backend`: a name or a backend callable), the
    min-cut rematerialization partitioner held to `budget`
    (torch._functorch.config.activation_memory_budget).

    Its backend sets the budget around every compilation it makes, recompiles included, and,
    being a callable of its own, never shares dynamo's cached graphs with another budget's.
    `graphs` counts the graphs compiled: more than one means graph breaks or recompiles.
    """
    memory_method = "allocator profile"  # compiled kernels allocate below the dispatcher

    def __init__(self, model: nn.Module, budget: float, backend="inductor"):
        super().__init__()
        import torch._dynamo
        import torch._functorch.config
        self.budget, self.graphs = budget, 0
        compile_graph = torch._dynamo.lookup_backend(backend)

        def with_budget(gm, example_inputs):
            self.graphs += 1
            with torch._functorch.config.patch(activation_memory_budget=budget):
                return compile_graph(gm, example_inputs)

        self.net = torch.compile(copy_model(model), backend=with_budget)

    def forward(self, *args):
        return self.net(*args)


def machine(device: str = "cpu") -> str:
    """What a benchmark ran on, for its report: the processor (or GPU) and the versions."""
    import os
    import platform
    if str(device).startswith("cuda") and torch.cuda.is_available():
        where = torch.cuda.get_device_name(device)
    else:
        where = platform.processor()
        if os.path.exists("/proc/cpuinfo"):
            where = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                          if line.startswith("model name")), where)
        where += f", {os.cpu_count()} cores"
    from revify import __version__
    return f"{where}, torch {torch.__version__}, revify {__version__}"


def _first_line(exc: BaseException) -> str:
    """What went wrong, in one line: dynamo wraps the backend's own error
    ("backend=... raised:")."""
    while (inner := getattr(exc, "inner_exception", None) or exc.__cause__) is not None:
        exc = inner
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        logits = model.eval()(x[:1])
    model.train()
    return logits.shape[-1]


class Autocast(nn.Module):
    """`model` with its forward under autocast to `dtype` and the backward outside it, as users
    train; the output in float32 for the loss."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model, self.dtype = model, dtype

    @property
    def memory_method(self) -> str:
        return getattr(self.model, "memory_method", "live tensors")

    @property
    def graphs(self):
        return getattr(self.model, "graphs", None)

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.model(x).float()


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _compiled(model: nn.Module) -> bool:
    return isinstance(model.model if isinstance(model, Autocast) else model, Compiled)


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _compile(models: dict[str, nn.Module], x, y, tick, note) -> dict[str, float]:
    """Runs the first step of every Compiled model (compiling it), timed apart; a model that
    fails to compile is dropped from `models` with one line."""
    seconds = {}
    for name in [n for n, m in models.items() if _compiled(m)]:
        tick(f"compiling {name}")
        start = time.perf_counter()
        try:
            _step(models[name], x, y)
        except Exception as exc:  # no compiler, an unsupported op: the other rows go on
            note(f"{name} left out: torch.compile failed: {_first_line(exc)}")
            del models[name]
            continue
        seconds[name] = time.perf_counter() - start
    return seconds


def run_bench(models: dict[str, nn.Module], batch_size: int, input_size, steps: int = 3,
              device: str = "cpu", progress=None, note=_note, autocast: torch.dtype | None = None,
              channels_last: bool = False) -> list[BenchResult]:
    """progress(done, total, what) is called before each measured piece of work; note(text)
    says why a row was left out (a failed compilation); `autocast` runs every forward under
    autocast to that dtype; `channels_last` stores the input and every model in NHWC, as
    mixed-precision training on a GPU usually runs."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, *input_size, device=device).contiguous(memory_format=fmt)
    models = {k: m.to(device, memory_format=fmt).train() for k, m in models.items()}
    if autocast is not None:
        models = {k: Autocast(m, autocast) for k, m in models.items()}
    y = torch.randint(0, _num_classes(next(iter(models.values())), x), (batch_size,), device=device)
    progress = progress or (lambda done, total, what: None)
    done, compiling = 0, sum(_compiled(m) for m in models.values())

    def tick(what):
        nonlocal done
        progress(done, compiling + len(models) * (steps + 2), what)
        done += 1

    compile_seconds = _compile(models, x, y, tick, note)
    compiling = len(compile_seconds)
    memory, accumulate, methods = {}, {}, {}
    for name, model in models.items():
        tick(f"memory of {name}")
        methods[name] = getattr(model, "memory_method", "live tensors")
        memory[name] = MEASURES[methods[name]](model, x, y, grads="fresh")
        accumulate[name] = MEASURES[methods[name]](model, x, y, grads="accumulate").peak_bytes
        if device == "cuda":
            methods[name] = "max_memory_allocated"
    times, counts = {name: [] for name in models}, {}
    for name, model in models.items():
        tick(f"warm-up of {name}")
        _step(model, x, y)
        # Compiled code runs kernels of its own, below the dispatcher: not counted.
        counts[name] = None if _compiled(model) else count_step(model, x, y)
    for i in range(steps):
        for name, model in models.items():  # interleaved: noise hits all alike
            tick(f"step {i + 1}/{steps} of {name}")
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _step(model, x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    progress(done, done, "done")
    return [BenchResult(name, statistics.median(times[name]), memory[name].peak_activation_bytes,
                        memory[name].peak_bytes, accumulate[name], memory[name].activation_bytes,
                        sum(p.numel() for p in models[name].parameters()), methods[name],
                        compile_seconds.get(name), getattr(models[name], "graphs", None),
                        counts[name])
            for name in models]


def format_bench(results: list[BenchResult], fmt: str = "simple") -> str:
    from tabulate import tabulate
    base = results[0]
    def mib_and_ratio(value, reference):
        if value is None:  # not measurable on this device
            return ["-", "-"]
        return [f"{value / 2 ** 20:.1f}", f"{value / reference:.2f}x"]

    rows = [[r.name, f"{r.step_seconds:.3f}", f"{r.step_seconds / base.step_seconds:.2f}x",
             *mib_and_ratio(r.peak_activation_bytes, base.peak_activation_bytes),
             *mib_and_ratio(r.peak_bytes, base.peak_bytes),
             *mib_and_ratio(r.accumulate_peak_bytes, base.accumulate_peak_bytes), f"{r.params:,}",
             r.memory_method] for r in results]
    return tabulate(rows, ["strategy", "step s", "time", "peak act MiB", "act vs orig",
                           "peak MiB", "peak vs orig", "accum MiB", "accum vs orig", "params",
                           "memory by"], tablefmt=fmt)


def format_counts(results: list[BenchResult], fmt: str = "simple") -> str:
    """Per strategy, what a step costs in launches (revify.memory.counting), with ratios to the
    first row's."""
    from tabulate import tabulate
    base = results[0].counts

    def with_ratio(value, reference):
        return f"{value:,}" + (f" ({value / reference:.2f}x)" if reference else "")

    rows = [[r.name, with_ratio(c.ops, base.ops), with_ratio(c.kernel_ops, base.kernel_ops),
             with_ratio(c.python_calls, base.python_calls), f"{c.syncs:,}"]
            for r in results if (c := r.counts) is not None]
    return tabulate(rows, ["strategy", "aten ops", "kernel ops", "Python calls", "host syncs"],
                    tablefmt=fmt, disable_numparse=True)


def format_compiles(results: list[BenchResult]) -> list[str]:
    """One line per compiled row: its compile time and graph count."""
    return [f"{r.name}: compiled {r.graphs} graph{'s' * (r.graphs != 1)} in "
            f"{r.compile_seconds:.1f} s (its first step; never a timed one)"
            for r in results if r.compile_seconds is not None]
