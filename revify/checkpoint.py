"""Non-invertible layers (stem, downsampling blocks, head): activation checkpointing.

torch's non-reentrant checkpoint, for what it keeps of autograd: the unit's backward runs as the
nodes of its own forward graph, each handing its parameters' gradients to `.grad` (and DDP's
buckets) as soon as it has computed them. One autograd node for the whole unit, rerunning it and
backpropagating through the rerun in one `autograd.grad`, would hold every gradient of the unit
until its end: with `.grad` allocated (gradient accumulation, DDP) a downsampling block's
gradients in flight at once, more than its activations at small inputs.

What is added: the rerun leaves running statistics as the forward updated them
(`frozen_buffers`) and takes kept layers' outputs from the forward's tape (revify.keep). The
rerun's tensors are not checked against the forward's (`determinism_check="none"`): the rerun
runs the same ops on the same inputs, and the check costs Python calls per saved tensor.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .keep import Tape, recording, replaying
from .modes import discarding, exact_backward_enabled, frozen_buffers


class Checkpointed(nn.Module):
    """Runs `module` storing only its inputs; the backward recomputes it once.

    `owned=False` (a layer checkpointed inside a unit, revify.lean) leaves `module`'s layers
    registered where the unit has them, so parameter names do not depend on what is nested.
    `stored=True` (revify.schedule: the unit's activations fit under the step's peak) runs it
    with plain autograd instead: nothing recomputed.
    """

    def __init__(self, module: nn.Module, owned: bool = True, stored: bool = False):
        super().__init__()
        if owned:
            self.module = module
        else:
            object.__setattr__(self, "module", module)
        self.stored = stored
        self.keep = False  # the forward keeps its kept layers' outputs (revify.keep)

    def extra_repr(self) -> str:
        return ", ".join(f"{flag}=True" for flag in ("stored", "keep") if getattr(self, flag))

    def forward(self, *args):
        if self.stored or exact_backward_enabled() or not torch.is_grad_enabled():
            return self.module(*args)
        if torch.compiler.is_compiling():
            # Compiled, the recompute is part of the backward graph, which applies buffer
            # updates once (functionalised): nothing to freeze, and dynamo cannot take our context.
            return checkpoint(self.module, *args, use_reentrant=False)
        return checkpoint(self.module, *args, use_reentrant=False, context_fn=self._contexts,
                          determinism_check="none")

    def _contexts(self):
        tape = Tape() if self.keep else None
        return _Forward(tape), _Rerun(self.module, tape)


class _Forward:
    """The first forward's context: what it saves is dropped (revify.modes.discarding), kept
    outputs recorded on `tape`."""

    def __init__(self, tape: Tape | None):
        self.discarding, self.recording = discarding(), recording(tape)

    def __enter__(self):
        self.discarding.__enter__()
        self.recording.__enter__()
        return self

    def __exit__(self, *exc):
        self.recording.__exit__(*exc)
        self.discarding.__exit__(*exc)
        return False


class _Rerun:
    """The rerun's context: buffers put back after it, kept outputs taken from `tape`."""

    def __init__(self, module: nn.Module, tape: Tape | None):
        self.frozen, self.replaying = frozen_buffers(module), replaying(tape)

    def __enter__(self):
        self.frozen.__enter__()
        self.replaying.__enter__()
        return self

    def __exit__(self, *exc):
        self.replaying.__exit__(*exc)
        self.frozen.__exit__(*exc)
        return False
