"""Non-invertible layers (stem, downsampling blocks, head): activation checkpointing.

Non-reentrant checkpointing, as torch.utils.checkpoint's: the unit's forward runs under
saved-tensor hooks that keep a number in place of each tensor autograd saves; the first time its
backward unpacks one, the unit is run again (same random masks, same autocast state) and the
rerun's saved tensors, in the same order, are handed out instead. So the backward runs as the
nodes of the forward's own graph, each handing its parameters' gradients to `.grad` (and DDP's
buckets) as soon as it has computed them. (One autograd node for the whole unit, rerunning it
and backpropagating in one `autograd.grad`, would hold every gradient of the unit until its end:
with `.grad` allocated, a downsampling block's gradients at once, more than its activations.)

Why not torch.utils.checkpoint itself: it checks every rerun tensor against the forward's,
supports early stopping and several graph tasks at once, which cost about ten Python calls and
a `detach` per saved tensor; a unit runs the same ops on the same inputs, so two calls and no op
do. What is added: the rerun leaves running statistics as the forward updated them
(`frozen_buffers`), takes kept layers' outputs from the forward's tape (revify.runtime.keep),
and the forward computes nothing only saved (revify.runtime.modes.discarding). A checkpoint
nested in a unit (revify.plan.lean) saves its inputs under the unit's hooks, so the unit's forward
keeps them no more than the rest. Under torch.compile torch's checkpoint is used: the compiled
backward graph holds the rerun.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.checkpoint import checkpoint

from revify.runtime.keep import Tape, recording, replaying
from revify.graph.ops import draws_random
from revify.runtime.modes import (UnitMode, UnitSchedule, capture_autocast, capture_rng, discarding,
                                  plain_autograd_enabled, frozen_buffers, replay_autocast,
                                  replay_rng)


class Checkpointed(nn.Module):
    """Runs `module` storing only its inputs; the backward recomputes it once.

    `owned=False` (a layer checkpointed inside a unit, revify.plan.lean) leaves `module`'s layers
    registered where the unit has them, so parameter names do not depend on what is nested.
    `schedule` (revify.plan.schedule's choice, set by revify.rewrite.set_mode) says how it runs:
    STORED (the unit's activations fit under the step's peak) with plain autograd, nothing
    recomputed; its `kept` layers' outputs kept by the forward for the rerun (revify.runtime.keep).
    """
    only_calls_children = True  # draws no random numbers of its own (revify.graph.ops.draws_random)

    def __init__(self, module: nn.Module, owned: bool = True):
        super().__init__()
        if owned:
            self.module = module
        else:
            object.__setattr__(self, "module", module)
        self.schedule = UnitSchedule()
        self.random = draws_random(module)  # its rerun must replay the RNG state

    def extra_repr(self) -> str:
        return "" if self.schedule == UnitSchedule() else str(self.schedule)

    def forward(self, *args):
        if self.schedule.mode is UnitMode.STORED or plain_autograd_enabled() \
                or not torch.is_grad_enabled():
            return self.module(*args)
        if torch.compiler.is_compiling():
            # Compiled, the recompute is part of the backward graph, which applies buffer
            # updates once (functionalised): nothing to freeze, and dynamo cannot take our context.
            return checkpoint(self.module, *args, use_reentrant=False)
        frame = _Frame(self, args)
        with saved_tensors_hooks(frame.pack, frame.unpack), discarding(), recording(frame.tape):
            return self.module(*args)


class _SaveInputs(torch.autograd.Function):
    """Saves a unit's tensor inputs for its rerun under the hooks active around the unit: an
    enclosing unit's forward drops them as it drops everything else."""

    @staticmethod
    def forward(ctx, anchor, *inputs):
        ctx.save_for_backward(*inputs)
        return torch.empty(0)

    @staticmethod
    def backward(ctx, *grads):
        raise AssertionError("revify: a checkpoint's input saver is never backpropagated")


_ANCHOR = torch.empty(0, requires_grad=True)  # makes _SaveInputs record its node


class _Frame:
    """One forward of a checkpointed unit: what its rerun needs, and the rerun's saved tensors
    (each handed out once; a second backward, with retain_graph=True, reruns the unit again)."""

    def __init__(self, unit: Checkpointed, args: tuple):
        self.module = unit.module
        self.is_tensor = [isinstance(a, torch.Tensor) for a in args]
        tensors = [a for a, t in zip(args, self.is_tensor) if t]
        self.others = [None if t else a for a, t in zip(args, self.is_tensor)]
        self.requires = [a.requires_grad for a in tensors]
        self.inputs = _SaveInputs.apply(_ANCHOR, *tensors)
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self.rng = capture_rng(self.device) if unit.training and unit.random else None
        self.autocast = capture_autocast(self.device)
        self.tape = Tape() if unit.schedule.kept else None
        self.saved, self.count = None, 0

    def pack(self, _) -> int:
        self.count += 1
        return self.count - 1

    def unpack(self, index: int) -> torch.Tensor:
        if self.saved is None or self.saved[index] is None:
            self.saved = self.rerun()
        tensor, self.saved[index] = self.saved[index], None
        return tensor

    def rerun(self) -> list[torch.Tensor]:
        tensors = iter(self.inputs.grad_fn.saved_tensors)
        requires = iter(self.requires)
        args = [next(tensors).detach().requires_grad_(next(requires)) if t else other
                for t, other in zip(self.is_tensor, self.others)]
        saved = []
        with torch.enable_grad(), replay_rng(self.rng, self.device), \
                replay_autocast(self.autocast), frozen_buffers(self.module), \
                replaying(self.tape), saved_tensors_hooks(saved.append, _never_unpacked):
            self.module(*args)
        return saved


def _never_unpacked(_):
    raise AssertionError("revify: a checkpoint's rerun is never backpropagated itself")
