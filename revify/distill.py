"""Converting a trained model: fit each reversible stage to the stage it replaces.

A coupling block over channel halves, `y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`, cannot in general
compute a full-width residual block `y = x + R(x)`: F sees half the channels R saw, and the
sliced weights `revify.rewrite` starts F and G from leave a trained model at chance accuracy.
So when a trained model is converted with calibration inputs (`revify.transform(model,
calibration=...)`), every reversible stage is fitted to the original stage it replaces:
unlabelled inputs run through the original (traced, in eval mode) give each stage's input and
what the layer after it reads (the last add through the activation after it), and the stage's
F and G are trained on the relative squared error between the two on that input. The stages
are independent given the original's inputs, so all of them train at once from one pass of the
original per batch.

Why this and not a path that makes the converted net equal the original at step 0 (Dr2Net's
second residual path with coefficients, momentum ResNets as the momentum goes to 0): such a net
is exactly reversible only at the end of a transition during fine-tuning, and until then its
inverse divides by a coefficient near 0 (its reconstruction is neither exact nor stable), so the
transition stores activations as plain autograd does, keeps a second full-width stream and
path, and needs a schedule the user tunes. A fitted stage is an ordinary reversible stage from
the first step: the same parameters, memory and exact backward as a revified model trained from
scratch, nothing to anneal. What it costs is calibration data (a few hundred to a few thousand
unlabelled inputs, no labels) and time at conversion (`steps` training steps of the stages on
their own, with plain autograd); the fit is approximate, and `Distillation` reports how close.

BatchNorm: the stages are fitted in training mode (batch statistics, as fine-tuning runs them),
then their running statistics are measured afresh on the calibration inputs (a cumulative
average), so evaluation at step 0 uses statistics of the fitted layers, not of the slices they
started from. Layers outside reversible stages are the original's and are not touched.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from revify.runtime.modes import plain_autograd
from revify.rewrite import unit_nodes
from revify.graph.trace import trace

DEFAULT_STEPS = 400
DEFAULT_LR = 2e-3
DEFAULT_BATCH = 64          # for calibration given as one tensor
RECALIBRATION_BATCHES = 8   # batches the fitted stages' BatchNorm statistics are measured on


@dataclass
class Distillation:
    """How the reversible stages were fitted to the trained model's (what the plan prints)."""
    steps: int
    samples: int                        # calibration inputs seen (with repeats)
    seconds: float
    # per stage: relative error (norm of the difference / norm of the original's) of what the
    # stage hands on (its output through the activation after it) on a calibration batch, in
    # eval mode, before and after the fit
    error_before: dict[str, float] = field(default_factory=dict)
    error_after: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        stages = ", ".join(f"{name} {self.error_before[name]:.0%} -> {self.error_after[name]:.1%}"
                           for name in self.error_after)
        return (f"fitted to the trained stages on {self.samples:,} calibration inputs "
                f"({self.steps} steps, {self.seconds:.1f} s): relative error of what each stage "
                f"hands on {stages}. No extra parameters or memory: a plain revified model.")


class _Recorder(fx.Interpreter):
    """Runs the traced original and keeps copies of the values of the nodes named in `wanted`
    (copies: a later in-place op, `out += x` or ReLU(inplace=True), would change them)."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if node.name in self.wanted:
            self.values[node.name] = value.detach().clone()
        return value


def calibration_batches(calibration, num_inputs: int, like: torch.Tensor):
    """An endless stream of input tuples from `calibration`: a tensor (batched here), or an
    iterable of batches, each a tensor or a tuple/list whose first `num_inputs` items are the
    inputs (a DataLoader of (inputs, labels): the labels are ignored), on `like`'s device and,
    if floating point, in its dtype."""
    if isinstance(calibration, torch.Tensor):
        calibration = calibration.split(DEFAULT_BATCH) if len(calibration) else []
    for batch in _repeated(calibration):
        inputs = (batch,) if isinstance(batch, torch.Tensor) else tuple(batch)[:num_inputs]
        yield tuple(t.to(like.device, like.dtype) if t.is_floating_point() else t.to(like.device)
                    for t in inputs)
    raise ValueError("calibration holds no inputs.")  # only a one-shot iterator ends here


def _repeated(batches):
    """The batches over and over. A collection or a DataLoader is iterated afresh each time
    (a loader that shuffles reshuffles, and no pass is held in memory); a one-shot iterator's
    batches are kept as they come, to go round again."""
    if iter(batches) is batches:
        batches = itertools.cycle(batches)
        yield from batches
        return
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
        if empty:
            raise ValueError("calibration holds no inputs.")


def reversible_stages(rev) -> dict[str, nn.Module]:
    """The ReversibleStage modules of a revified model, by stage name."""
    plan = rev.revify_plan
    names = {stage.name for stage in plan.stages}
    return {segment.name: rev.net.get_submodule(node.target)
            for segment, node in unit_nodes(rev.net, plan) if segment.name in names}


@dataclass
class _Fit:
    """One reversible stage and where the traced original holds what it must compute."""
    stage: nn.Module
    entry: str                  # the node holding the stage's input
    exit: str                   # the node holding what the layer after the stage reads: the
                                # last add through the activation after it, if any
    activate: Callable          # that activation, applied to the stage's output


def _fits(rev, teacher: fx.GraphModule) -> dict[str, _Fit]:
    """Each stage of `rev` with its places in `teacher`. A stage is fitted through the
    activation after it: what is lost there (a ReLU's negative side) is no error, and a fit
    that spends no capacity on it comes closer where it counts (on the test task of
    tests/test_distill.py it halved the output error)."""
    plan, nodes = rev.revify_plan, {n.name: n for n in teacher.graph.nodes}
    modules, fits = reversible_stages(rev), {}
    for stage in plan.stages:
        post = plan.block(stage.blocks[-1]).block.post_op
        activate = _activation(teacher, nodes[stage.output], nodes[post]) if post \
            else (lambda t: t)
        fits[stage.name] = _Fit(modules[stage.name], stage.entry, post or stage.output, activate)
    return fits


def _activation(teacher: fx.GraphModule, add: fx.Node, post: fx.Node) -> Callable:
    """The original's node `post` run alone on a value standing for `add`'s."""
    runner = fx.Interpreter(teacher)

    def activate(t: torch.Tensor) -> torch.Tensor:
        runner.env = {add: t.clone()}  # an in-place activation must not write to the stage output
        return runner.run_node(post)
    return activate


def distill(rev, model: nn.Module, calibration, *, steps: int = DEFAULT_STEPS,
            lr: float = DEFAULT_LR, leaf_modules=(), num_inputs: int = 1) -> Distillation:
    """Fit the reversible stages of `rev` (converted from `model`) to `model`'s stages on
    `calibration` inputs, in place; returns what was done (also set on the plan)."""
    if steps < 0:
        raise ValueError(f"distill_steps must be 0 or more, not {steps}.")
    start = time.perf_counter()
    teacher = trace(model, leaf_modules, num_inputs).eval()
    fits = _fits(rev, teacher)
    recorder = _Recorder(teacher, {n for fit in fits.values() for n in (fit.entry, fit.exit)})
    like = next(p for p in rev.parameters() if p.is_floating_point())
    batches = calibration_batches(calibration, num_inputs, like)

    def targets() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per stage, its input and what it must compute there, on the next batch."""
        with torch.no_grad():
            recorder.values = {}
            recorder.run(*next(batches))
        return {name: (recorder.values[fit.entry], recorder.values[fit.exit])
                for name, fit in fits.items()}

    check = targets()  # one batch to report the error on, before and after
    report = Distillation(steps, 0, 0.0, error_before=_errors(fits, check))
    mode = rev.training
    _fit(fits, targets, steps, lr, report)
    _recalibrate(fits, targets, RECALIBRATION_BATCHES)
    report.error_after = _errors(fits, check)
    report.seconds = time.perf_counter() - start
    rev.train(mode)
    rev.revify_plan.distillation = report
    return report


def _fit(fits: dict[str, _Fit], targets, steps: int, lr: float, report: Distillation):
    """Adam on every stage's parameters at once, the learning rate on a cosine to 0; plain
    autograd (`plain_autograd`: the same function, no recomputation, faster here)."""
    params = [p for fit in fits.values() for p in fit.stage.parameters() if p.requires_grad]
    if not params or steps == 0:
        return
    optimizer = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for fit in fits.values():
        fit.stage.train()
    for _ in range(steps):
        pairs = targets()
        optimizer.zero_grad(set_to_none=True)
        with plain_autograd():
            loss = sum(_relative_mse(fits[name].activate(fits[name].stage(x)), y)
                       for name, (x, y) in pairs.items())
        loss.backward()
        optimizer.step()
        schedule.step()
        report.samples += len(next(iter(pairs.values()))[0])


def _relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error relative to the target's energy: stages of any scale weigh alike."""
    return (output - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def _recalibrate(fits: dict[str, _Fit], targets, batches: int) -> None:
    """Measure the stages' BatchNorm running statistics afresh (a cumulative average over
    `batches` calibration batches): those from the fit's first steps describe other weights."""
    norms = [m for fit in fits.values() for m in fit.stage.modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        for fit in fits.values():
            fit.stage.train()
        for _ in range(batches):
            for name, (x, _) in targets().items():
                fits[name].stage(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def _errors(fits: dict[str, _Fit], pairs: dict) -> dict[str, float]:
    """Relative error of what each stage gives the next layer (eval mode) against the
    original's."""
    errors = {}
    with torch.no_grad():
        for name, (x, y) in pairs.items():
            stage = fits[name].stage
            mode = stage.training
            out = fits[name].activate(stage.eval()(x))
            stage.train(mode)
            errors[name] = ((out - y).norm() / y.norm().clamp_min(1e-30)).item()
    return errors
