"""What one training step costs besides FLOPs: aten ops dispatched, Python calls, host syncs.

On a GPU a short step is bounded by launches, not arithmetic: every op that can launch a kernel,
every Python call between them and every host-device sync (a value read back to the host)
shows in the step time. These counts are exact and the same on any machine, so the CPU can
tell what a GPU step will pay for.

- ops: every aten op the step dispatches (a TorchDispatchMode, below autograd);
- kernel ops: those that are not views or aliases (`detach`, `view`, `chunk`, ...), which never
  launch a kernel;
- Python calls: Python function calls made while the step runs (`sys.setprofile`);
- syncs: ops whose result the host must wait for (`_local_scalar_dense` behind `.item()` and
  `bool(tensor)`, `nonzero`, ...): free on a CPU, a stall of the whole queue on a GPU.

The backward runs on the calling thread while counting (autograd's device threads would escape
both counters), as it does on a CPU anyway.
"""
from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
# Ops whose result the host reads (or whose output size depends on values): a device sync.
SYNC_OPS = {_aten._local_scalar_dense.default, _aten.nonzero.default, _aten.is_nonzero.default,
            _aten.equal.default, _aten.masked_select.default, _aten.unique_dim.default,
            _aten._unique2.default, _aten.item.default}


@dataclass
class StepCounts:
    ops: int           # aten ops dispatched
    kernel_ops: int    # of those, not views or aliases
    python_calls: int
    syncs: int
    by_op: Counter     # op name -> count


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.by_op: Counter = Counter()
        self.kernel_ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.by_op[str(func)] += 1
        if not func.is_view:
            self.kernel_ops += 1
        if func in SYNC_OPS:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def count_step(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor,
               loss_fn=F.cross_entropy) -> StepCounts:
    """The counts of a training step (forward, loss, backward; gradients set to None first),
    ops and Python calls from two steps (the op counter's own Python would count as calls).
    Run a step before counting, so one-time work (caches, lazy initialisation) is left out."""
    def step():
        loss_fn(model(inputs), target).backward()

    calls = [0]

    def profile(frame, event, arg):
        if event == "call":
            calls[0] += 1

    with torch.autograd.set_multithreading_enabled(False):
        model.zero_grad(set_to_none=True)
        with _OpCounter() as ops:
            step()
        model.zero_grad(set_to_none=True)
        sys.setprofile(profile)
        try:
            step()
        finally:
            sys.setprofile(None)
    return StepCounts(sum(ops.by_op.values()), ops.kernel_ops, calls[0], ops.syncs, ops.by_op)
