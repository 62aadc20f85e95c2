"""Non-invertible layers (stem, downsampling blocks, head): activation checkpointing.

Plain `torch.utils.checkpoint` re-runs BatchNorm in training mode during the recompute and so
updates running statistics twice per step; here the recompute runs with statistics frozen.
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
        # Non-reentrant checkpoint restores the RNG state for the recompute (same dropout masks)
        # and returns gradients through the autograd engine (DDP hooks fire as usual).
        if torch.compiler.is_compiling():
            # Compiled, the recompute is part of the backward graph, which applies buffer
            # updates once (functionalised): nothing to freeze, and dynamo cannot take our context.
            return checkpoint(self.module, *args, use_reentrant=False)
        return checkpoint(self.module, *args, use_reentrant=False, context_fn=self._contexts)

    def _contexts(self):
        tape = Tape(outputs=self.keep)
        return (_Together(discarding(), recording(tape)),
                _Together(frozen_buffers(self.module), replaying(tape)))


class _Together:
    """Contexts entered together (a checkpoint enters its recompute context once per rerun)."""

    def __init__(self, *contexts):
        self.contexts = contexts

    def __enter__(self):
        for context in self.contexts:
            context.__enter__()
        return self

    def __exit__(self, *exc):
        for context in reversed(self.contexts):
            context.__exit__(*exc)
        return False
