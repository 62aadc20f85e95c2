"""`revify.transform`: trace -> find blocks -> plan -> rewrite, returning a trainable module."""
from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn

from .blocks import find_blocks
from .plan import Options, Plan, make_plan
from .rewrite import rewrite
from .trace import propagate_shapes, trace


class NoResidualBlocks(ValueError):
    """The model has no residual block revify could find."""


class RevifiedModel(nn.Module):
    """A revified network: `net` is the rewritten graph, `revify_plan` says what was done."""

    def __init__(self, net: nn.Module, plan: Plan):
        super().__init__()
        self.net = net
        self.revify_plan = plan

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)


def _example_inputs(example_inputs, input_size) -> tuple:
    if example_inputs is None:
        if any(int(s) <= 0 for s in input_size):
            raise ValueError(f"input_size must be positive, got {tuple(input_size)}.")
        return (torch.empty(2, *input_size),)
    return example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)


def transform(model: nn.Module, example_inputs=None, *, input_size: Iterable[int] = (3, 224, 224),
              width: float | Literal["match"] = "match",
              checkpoint: Literal["non_invertible", "none"] = "non_invertible",
              reversible: bool = True, reconstruction: Literal["exact", "native"] = "exact",
              leaf_modules: Iterable[type | str] = ()) -> RevifiedModel:
    """Turn the residual stages of `model` into reversible stages; `model` is left untouched.

    example_inputs: a tensor (or tuple) shaped like the model's input, used only for its shapes
        (default: a batch of 2 of `input_size`). Nothing is computed on real data.
    width: "match" picks the branches' internal widths so every stage keeps its parameter count
        within 10%; a number scales the original internal widths instead.
    checkpoint: "non_invertible" wraps every layer outside a reversible stage in activation
        checkpointing; "none" stores their activations as usual.
    reversible: False checkpoints every block instead (the per-block checkpointing baseline).
    reconstruction: "exact" carries the coupled stream in float64, so the backward rebuilds every
        activation to the bit; "native" keeps it in the activation dtype: less memory and time,
        but reconstruction error grows with depth (see README).
    leaf_modules: module classes or qualified names torch.fx should not trace into.
    """
    options = Options(width=width, checkpoint=checkpoint, reversible=reversible,
                      reconstruction=reconstruction)
    gm = trace(model, leaf_modules)
    propagate_shapes(gm, _example_inputs(example_inputs, input_size))
    blocks = find_blocks(gm)
    if not blocks:
        raise NoResidualBlocks(f"{type(model).__name__} has no residual block (an add of x and a "
                               f"branch computed from x): there is nothing to make reversible.")
    plan = make_plan(gm, blocks, options)
    net = rewrite(gm, plan)
    return RevifiedModel(net, plan).train(model.training)
