"""Side-by-side measurement of one training step: original, per-block checkpointing, revify.

Memory comes from `revify.memory.measure_step`: exact live-tensor accounting on CPU, the
caching allocator on CUDA; time is the median of timed steps, the strategies interleaved so that machine noise hits
all of them alike. Everything is reported as ratios to the original as well.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .memory import measure_step
from .transform import transform


@dataclass
class BenchResult:
    name: str
    step_seconds: float
    peak_activation_bytes: int | None
    peak_bytes: int
    activation_bytes: int
    params: int


def strategies(model: nn.Module, input_size, native: bool = False, sequential: bool = False,
               **options) -> dict[str, nn.Module]:
    """The model as is, with per-block checkpointing, optionally with sqrt(n) checkpointed groups
    of blocks (`sequential`: `checkpoint_sequential`'s scheme), and revified (optionally also
    "native").

    options: revify.transform's keyword arguments for the revified model; the checkpointing
    baseline shares only its leaf modules (the rest concerns reversible stages).
    """
    example = torch.empty(2, *input_size)
    baseline = {k: v for k, v in options.items() if k == "leaf_modules"}
    models = {
        "original": model,
        "checkpoint": transform(model, example, **baseline, reversible=False),
    }
    if sequential:
        models["checkpoint-sqrt"] = transform(model, example, **baseline, reversible=False,
                                              segments="sqrt")
    models["revify"] = transform(model, example, **options)
    if native:
        models["revify-native"] = transform(model, example, **(options | {"reconstruction": "native"}))
    return models


def _num_classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        logits = model.eval()(x[:1])
    model.train()
    return logits.shape[-1]


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def run_bench(models: dict[str, nn.Module], batch_size: int, input_size, steps: int = 3,
              device: str = "cpu", progress=None) -> list[BenchResult]:
    """progress(done, total, what) is called before each measured piece of work."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, *input_size, device=device)
    models = {k: m.to(device).train() for k, m in models.items()}
    y = torch.randint(0, _num_classes(next(iter(models.values())), x), (batch_size,), device=device)
    progress = progress or (lambda done, total, what: None)
    total, memory = len(models) * (steps + 2), {}
    for name, model in models.items():
        progress(len(memory), total, f"memory of {name}")
        memory[name] = measure_step(model, x, y)
    times = {name: [] for name in models}
    for i, (name, model) in enumerate(models.items()):
        progress(len(models) + i, total, f"warm-up of {name}")
        _step(model, x, y)
    for i in range(steps):
        for j, (name, model) in enumerate(models.items()):  # interleaved: noise hits all alike
            progress(len(models) * (2 + i) + j, total, f"step {i + 1}/{steps} of {name}")
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            _step(model, x, y)
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    progress(total, total, "done")
    return [BenchResult(name, statistics.median(times[name]), memory[name].peak_activation_bytes,
                        memory[name].peak_bytes, memory[name].activation_bytes,
                        sum(p.numel() for p in models[name].parameters()))
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
             *mib_and_ratio(r.peak_bytes, base.peak_bytes), f"{r.params:,}"] for r in results]
    return tabulate(rows, ["strategy", "step s", "time", "peak act MiB", "act vs orig",
                           "peak MiB", "peak vs orig", "params"], tablefmt=fmt)
