"""`revify verify`: the checks to trust a revified model with before spending GPU hours on it.

- gradients: one training step through the reversible backward against the same model under
  `plain_autograd()` (plain autograd, activations stored), worst relative error over every
  parameter and the input;
- reconstruction: per reversible stage, the input rebuilt from the output by running the blocks
  backwards, in float32 and under bfloat16 autocast (relative max error), in training mode as
  the backward meets it;
- BatchNorm: after one step every running statistic equals plain autograd's and
  `num_batches_tracked` went up by exactly one (recomputation must not count twice).
"""
from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from revify.runtime.modes import plain_autograd
from revify.runtime.reversible import ReversibleStage

# Relative tolerances. Exact reconstruction rebuilds every activation to the bit, so its
# gradients match plain autograd to rounding of the gradient sums; native reconstruction adds
# the float32 rebuild error, which grows with depth (see README): looser, still far below what
# training notices.
GRAD_TOLERANCE = {"exact": 1e-5, "native": 1e-3}
RECONSTRUCTION_TOLERANCE = {"exact": 1e-6, "native": 1e-4}


@dataclass
class Check:
    name: str
    where: str
    value: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.value <= self.tolerance  # NaN fails


def unzero_init(model: nn.Module) -> nn.Module:
    """Set every all-zero weight (timm's zero-initialised last norm of each residual branch) to
    one, in place, and return the model.

    With those weights at zero every branch outputs a constant and no gradient reaches its
    convolutions, so a gradient check of a freshly built timm model would test next to nothing:
    the checks of models built with random weights (`revify verify MODEL`, the tests,
    scripts/coverage.py) run on models whose branches compute.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "weight" and p.is_floating_point() and not p.any():
                p.fill_(1.0)
    return model


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = (out.values() if isinstance(out, dict)
              else out if isinstance(out, (list, tuple)) else [])
    return [t for v in values for t in _tensors(v)]


def _loss(out, seed: int) -> torch.Tensor:
    """A loss for any output: a fixed random projection of every output tensor."""
    gen = torch.Generator().manual_seed(seed)
    return sum((t.float() * torch.randn(t.shape, generator=gen).to(t.device)).sum()
               for t in _tensors(out))


def _step(model: nn.Module, x: torch.Tensor, plain: bool) -> tuple[dict, dict]:
    """(gradients of parameters and input, buffers) after one step; the model is restored."""
    before = copy.deepcopy(dict(model.named_buffers()))
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    with plain_autograd() if plain else nullcontext():
        _loss(model(x), seed=1).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.detach().clone()
    after = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(before[name])
    model.zero_grad(set_to_none=True)
    return grads, after


def _short(name: str) -> str:
    """A parameter or module name without the RevifiedModel's own prefix."""
    return name.removeprefix("net.").replace(".module.", ".")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _worst(grads: dict, ref_grads: dict) -> tuple[float, str]:
    if grads.keys() != ref_grads.keys():
        return float("inf"), "some parameters got no gradient"
    return max((_rel(grads[k], ref_grads[k]), _short(k)) for k in ref_grads)


def gradient_error(model: nn.Module, x: torch.Tensor) -> tuple[float, str]:
    """The worst relative gradient error (parameters and input) of one step against plain
    autograd on the same model and input, and where it is."""
    return _worst(_step(model, x, False)[0], _step(model, x, True)[0])


def _gradient_checks(model, x, reconstruction) -> list[Check]:
    (grads, buffers), (ref_grads, ref_buffers) = _step(model, x, False), _step(model, x, True)
    worst, where = _worst(grads, ref_grads)
    checks = [Check("gradients vs plain autograd", where, worst, GRAD_TOLERANCE[reconstruction])]
    before = dict(model.named_buffers())
    stats = [k for k in ref_buffers if k.endswith(("running_mean", "running_var"))]
    counters = [k for k in ref_buffers if k.endswith("num_batches_tracked")]
    if stats:
        err, where = max((_rel(buffers[k], ref_buffers[k]), _short(k)) for k in stats)
        checks.append(Check("BatchNorm statistics vs plain autograd", where, err, 1e-5))
    if counters:
        off, where = max((abs(int(buffers[k] - before[k]) - 1), _short(k)) for k in counters)
        checks.append(Check("BatchNorm counted once per step", where, off, 0))
    return checks


def _stage_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each reversible stage sees on `x`."""
    seen, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, ReversibleStage):
            hooks.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.setdefault(name, args[0].detach())))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def reconstruction_errors(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per reversible stage: the relative max error of its input rebuilt from its output, as
    the backward rebuilds it (from anchors where the stage keeps them), under the caller's
    autocast state. In training mode, as the backward meets it (an untrained network in eval
    mode has activations that explode); every buffer is put back afterwards."""
    stages = dict(model.named_modules())
    errors = {}
    before, training = copy.deepcopy(dict(model.named_buffers())), model.training
    try:
        model.train()
        for name, stage_input in _stage_inputs(model, x).items():
            stage, anchors = stages[name], {}
            with torch.no_grad():
                coupled = stage.couple(stage_input, anchors, record=True)
                rebuilt = stage.inverse(coupled, anchors)
            entry = coupled.entry.double()
            errors[_short(name)] = ((rebuilt.double() - entry).abs().max()
                                    / entry.abs().max().clamp_min(1e-30)).item()
    finally:
        model.train(training)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                buf.copy_(before[name])
    return errors


def _reconstruction_checks(model, x, reconstruction) -> list[Check]:
    checks = []
    for label, autocast in [("float32", nullcontext()),
                            ("bfloat16 autocast", torch.autocast(x.device.type, torch.bfloat16))]:
        with autocast:
            errors = reconstruction_errors(model, x)
        checks += [Check(f"reconstruction, {label}", name, err,
                         RECONSTRUCTION_TOLERANCE[reconstruction])
                   for name, err in errors.items()]
    return checks


def verify(model: nn.Module, example_input: torch.Tensor) -> list[Check]:
    """Run every check on a revified model (left as it was) at `example_input`'s shape."""
    recipe = getattr(model, "revify_recipe", None) or {}
    reconstruction = recipe.get("transform", {}).get("reconstruction", "exact")
    training = model.training
    torch.manual_seed(0)
    x = torch.randn_like(example_input)
    try:
        checks = _gradient_checks(model.train(), x, reconstruction)
        checks += _reconstruction_checks(model, x, reconstruction)
    finally:
        model.train(training)
    return checks


def format_checks(checks: list[Check], fmt: str = "simple") -> str:
    from tabulate import tabulate
    rows = [[c.name, c.where, f"{c.value:.2e}", f"{c.tolerance:.0e}",
             "pass" if c.passed else "FAIL"]
            for c in checks]
    failed = sum(not c.passed for c in checks)
    verdict = f"{len(checks) - failed} of {len(checks)} checks passed"
    return tabulate(rows, ["check", "where", "error", "tolerance", "result"], tablefmt=fmt,
                    disable_numparse=True) + f"\n\n{verdict}"
