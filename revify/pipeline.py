"""`revify.transform`: trace -> find blocks -> plan (and couple) -> rewrite -> schedule,
returning a trainable module whose plan says what was done."""
from __future__ import annotations

import warnings
from dataclasses import asdict
from typing import Iterable, Literal

import torch
from torch import nn

from revify.graph.blocks import find_blocks
from revify.graph.hooks import hooks_warning
from revify.distill import DEFAULT_STEPS, distill
from revify.memory.measure import parse_bytes
from revify.plan.couple import couple
from revify.plan.plan import Options, Plan
from revify.plan.report import unmatched_note
from revify.rewrite import apply_schedule
from revify.runtime import fast
from revify.plan.schedule import schedule
from revify.graph.trace import propagate_shapes, trace


class NoResidualBlocks(ValueError):
    """The model has no residual block revify could find."""


class RevifiedModel(nn.Module):
    """A revified network: `net` is the rewritten graph, `revify_plan` says what was done.

    `revify_recipe` is how to build it again (source model, options, input shapes): plain data,
    what `revify.save` writes beside the weights.
    """

    def __init__(self, net: nn.Module, plan: Plan, recipe: dict | None = None):
        super().__init__()
        self.net = net
        self.revify_plan = plan
        self.revify_recipe = recipe

    def forward(self, *args, **kwargs):
        if torch.compiler.is_dynamo_compiling():  # compiled: every BatchNorm counts its own
            return self.net(*args, **kwargs)
        with fast.batches_counted():
            return self.net(*args, **kwargs)


def _example_inputs(model: nn.Module, example_inputs, input_size) -> tuple:
    if example_inputs is None:
        if any(int(s) <= 0 for s in input_size):
            raise ValueError(f"input_size must be positive, got {tuple(input_size)}.")
        # in the model's dtype and on its device: a float64 or CUDA model gets one like it
        params = model.parameters() if isinstance(model, nn.Module) else []  # trace says if not
        param = next((p for p in params if p.is_floating_point()), None)
        return (torch.empty(2, *input_size, dtype=param.dtype if param is not None else None,
                            device=param.device if param is not None else None),)
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def transform(model: nn.Module, example_inputs=None, *, input_size: Iterable[int] = (3, 224, 224),
              width: float | Literal["match"] = "match",
              couple: Literal["auto", "pairs", "each"] = "auto",
              budget: int | str | None = None, leaf_modules: Iterable[type | str] = (),
              calibration=None, distill_steps: int = DEFAULT_STEPS) -> RevifiedModel:
    """Turn the residual stages of `model` into reversible stages; `model` is left untouched.

    example_inputs: a tensor (or tuple) shaped like the model's input, used only for its shapes
        (default: a batch of 2 of `input_size`). Nothing is computed on real data.
    width: "match" picks the branches' internal widths so every stage keeps its parameter count
        within 10%; a number scales the original internal widths instead.
    couple: "pairs" makes two consecutive blocks of a stage one coupling (F the first's branch,
        G the second's; an odd last one F alone: as many layers as the original); "each" makes
        every block a coupling of its own (its branch built twice at narrower widths: twice the
        layers); "auto" takes "pairs" unless it makes the step's activations peak higher
        (revify.plan.couple; the plan says which and why).
    budget: the peak activation memory (bytes, or a size such as '2GiB') a training step at the
        example input may reach, gradients in flight to already allocated `.grad` included
        (gradient accumulation, DDP); default: the peak with every unit recomputing and 1%.
        Under it, units keep their activations instead of recomputing them in the backward, or
        rerun without revify.plan.lean's nesting, or keep their dearest layers' outputs for the
        rerun (revify.plan.schedule, revify.runtime.keep; the plan says which). Pass example_inputs
        at your batch size for a budget to mean your step.
    leaf_modules: module classes or qualified names torch.fx should not trace into.
    calibration: unlabelled inputs of the data a trained `model` learned from (a tensor, or an
        iterable of batches such as a DataLoader of (inputs, labels)): each reversible stage
        is then fitted to the trained stage it replaces, so the converted model starts
        fine-tuning near the original's accuracy (revify.distill; the plan says how close).
        Without it F and G start from slices of the trained layers, which keeps little of what
        the model learned. Costs `distill_steps` steps of training the stages at conversion;
        the converted model is the same (parameters, memory, exact backward) either way.
    distill_steps: training steps of that fit (batches of the calibration data, repeated).

    The layers outside reversible stages are checkpointed and the stream is rebuilt exactly
    (see README). The baselines revify is measured against are other revify.plan.plan.Options,
    which `build` below takes (`revify bench` and `revify drift` use it).

    Hooks registered on `model`'s modules are not carried into the revified model (its layers
    are rebuilt, and rerun in the backward): a warning names their modules (revify.graph.hooks).
    """
    options = Options(width=width, couple=couple,
                      budget=None if budget is None else parse_bytes(budget))
    return build(model, example_inputs, options, input_size=input_size, leaf_modules=leaf_modules,
                 calibration=calibration, distill_steps=distill_steps)


def build(model: nn.Module, example_inputs=None, options: Options | None = None, *,
          input_size: Iterable[int] = (3, 224, 224), leaf_modules: Iterable[type | str] = (),
          calibration=None, distill_steps: int = DEFAULT_STEPS) -> RevifiedModel:
    """`transform` with every plan setting (revify.plan.plan.Options): the baselines
    (reversible=False, segments, lean=False, non_invertible="store", schedule="recompute_all") and
    native reconstruction with anchors, for the benchmark, the drift measurement and the tests.
    Warnings point at the caller's caller (`transform`'s caller when it calls this)."""
    options = Options() if options is None else options
    leaf_modules = list(leaf_modules)
    example_inputs = _example_inputs(model, example_inputs, input_size)
    gm = trace(model, leaf_modules, len(example_inputs))
    if gm.meta["hooked"]:
        warnings.warn(hooks_warning(gm.meta["hooked"]), UserWarning, stacklevel=3)
    propagate_shapes(gm, example_inputs)
    blocks = find_blocks(gm)
    if not blocks:
        raise NoResidualBlocks(_no_blocks_message(model, gm.meta["opaque"]))
    net, plan, least = couple(gm, blocks, options, example_inputs)  # make_plan, then rewrite
    if plan.unmatched():
        warnings.warn(f"revify: {unmatched_note(plan)}", UserWarning, stacklevel=3)
    if options.schedules:  # the plan is not edited for it: the schedule goes beside it, once
        plan.schedule = schedule(net, plan, example_inputs, least)
        apply_schedule(net, plan)
    # the user's options: couple="auto" is resolved again on load (as width="match" is), and a
    # revify that resolves it otherwise fails the strict weight load instead of differing
    recipe = _recipe(model, example_inputs, options, leaf_modules)
    rev = RevifiedModel(net, plan, recipe).train(model.training)
    if calibration is not None and plan.stages:
        distill(rev, model, calibration, steps=distill_steps, leaf_modules=leaf_modules,
                num_inputs=len(example_inputs))
    return rev


def build_with(model: nn.Module, example_inputs, settings: dict, **kwargs) -> RevifiedModel:
    """`build` with the settings as plain data: Options fields by name, and leaf_modules (a
    file's recipe, the `options` of revify.analyze and revify bench's rows); budget may be a
    size such as '2GiB'."""
    settings = dict(settings)
    kwargs.setdefault("leaf_modules", settings.pop("leaf_modules", None) or ())
    if isinstance(settings.get("budget"), str):
        settings["budget"] = parse_bytes(settings["budget"])
    return build(model, example_inputs, Options(**settings), **kwargs)


def _no_blocks_message(model: nn.Module, opaque: dict[str, str]) -> str:
    """Why no block was found; a block kept opaque hides the residual add inside it."""
    message = (f"{type(model).__name__} has no residual block (an add of x and a branch computed "
               f"from x): there is nothing to make reversible.")
    if opaque:
        message += (" These modules were kept as opaque layers, so revify cannot see a residual "
                    "add inside them: "
                    + "; ".join(f"{name}: {why}" for name, why in opaque.items())
                    + ".")
    return message


def _recipe(model: nn.Module, example_inputs: tuple, options: Options, leaf_modules: list) -> dict:
    """Everything `transform` needs to build this model again, as plain data."""
    leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
    leaf_names = [m for m in leaf_modules if isinstance(m, str)]
    if leaf_types:  # classes become the module names they matched: strings need no import
        leaf_names += [n for n, m in model.named_modules() if n and isinstance(m, leaf_types)]
    cls = type(model)
    source = getattr(model, "revify_source", None) or {
        "library": "user", "name": f"{cls.__module__}.{cls.__qualname__}", "kwargs": {}}
    return {
        "source": source,
        # Options by field name (revify.files.read maps the names older files used)
        "transform": asdict(options) | {"leaf_modules": leaf_names},
        "inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                   if isinstance(t, torch.Tensor) else None for t in example_inputs],
    }
