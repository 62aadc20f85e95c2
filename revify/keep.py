"""Kept layers: the outputs of a unit's dearest layers, kept from its forward for its rerun.

A recomputing unit (a checkpointed block, a reversible stage's branches) reruns every layer in
the backward. Most of that compute sits in a few layers whose outputs are small for what they
cost: a 3x3 convolution does 2 * 9 * C_in FLOPs per value it writes, so keeping its output
costs 4 bytes per 18 * C_in FLOPs saved, a hundred times better than keeping a whole unit. The
plan marks such layers (`KEEP_FLOPS_PER_BYTE`); when the schedule lets a unit keep them, its
forward records their outputs on a `Tape` that the unit's backward holds, and the rerun takes
each output from the tape instead of computing it: the layer's backward (gradients of its
input and weights) runs as plain autograd's, from the same saved input and weights, so nothing
changes by a bit. The tape lives as long as the unit's piece of the autograd graph and is
emptied as the rerun consumes it.

This is the opposite of revify.lean, which nests the cheapest layers (recomputing them once
more); the two thresholds leave no layer in both.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

KEEP_FLOPS_PER_BYTE = 192  # a layer is kept if its forward costs at least this per output byte
# (twice revify.lean's FLOPS_PER_BYTE for nesting, so no layer is both)
KEPT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # one aten.convolution each: the op skipped

_local = threading.local()


class Tape:
    """What one forward of a unit keeps for its rerun, per layer in call order: kept layers'
    outputs (if `outputs`: the schedule lets the unit keep them) and BatchNorms' batch
    statistics (revify.stats; always, being two values a channel)."""

    def __init__(self, outputs: bool = True):
        self.outputs = outputs
        self.values: dict[int, list[tuple[object, list[int]]]] = {}

    def put(self, layer: nn.Module, value) -> None:
        """Record a tensor, a tuple of tensors or None (nothing to reuse from this call)."""
        value = _detached(value)
        self.values.setdefault(id(layer), []).append((value, [t._version for t in _tensors(value)]))

    def take(self, layer: nn.Module):
        """The layer's next record, or None (none recorded, or changed in place since: the
        rerun then computes it)."""
        queue = self.values.get(id(layer))
        if not queue:
            return None
        value, versions = queue.pop(0)
        return value if [t._version for t in _tensors(value)] == versions else None


def _tensors(value) -> tuple[torch.Tensor, ...]:
    return () if value is None else (value,) if isinstance(value, torch.Tensor) else tuple(value)


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    return None if value is None else tuple(t.detach() for t in value)


class _Using:
    """Sets the thread's tape while inside; re-enterable (a checkpoint enters its recompute
    context once per rerun)."""

    def __init__(self, tape: Tape | None, recording: bool):
        self.tape, self.recording, self.previous = tape, recording, []

    def __enter__(self):
        tape, recording, enclosing = getattr(_local, "state", (None, False, None))
        self.previous.append((tape, recording, enclosing))
        # A forward recording inside a unit's forward or rerun (a checkpoint nested in the
        # unit) may also record on, or take from, the unit's tape.
        enclosing = (tape, recording) if self.recording and tape is not None else None
        _local.state = (self.tape, self.recording, enclosing)
        return self.tape

    def __exit__(self, *exc):
        _local.state = self.previous.pop()
        return False


def recording(tape: Tape | None) -> _Using:
    """Kept layers run inside record their outputs on `tape` (None: they just run)."""
    return _Using(tape, True)


def replaying(tape: Tape | None) -> _Using:
    """Kept layers run inside take their outputs from `tape` (None: they just run)."""
    return _Using(tape, False)


def current() -> tuple[Tape | None, bool]:
    """The thread's tape (None outside a unit's forward or rerun, and while compiling) and
    whether the unit records on it (its forward) or takes from it (its rerun)."""
    if torch.compiler.is_compiling():
        return None, False
    tape, recording, _ = getattr(_local, "state", (None, False, None))
    return tape, recording


def enclosing() -> tuple[Tape, bool] | None:
    """While recording inside an enclosing unit's forward or rerun: that unit's tape and
    whether it records on it."""
    return None if torch.compiler.is_compiling() else getattr(_local, "state", (None,) * 3)[2]


class _Returning(TorchDispatchMode):
    """Below autograd: the layer's convolution returns `value` instead of computing it, so
    autograd records the convolution's backward with the input and weight it saves as usual."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default and self.value is not None:
            value, self.value = self.value, None
            return value.detach()
        return func(*args, **(kwargs or {}))


def fan_in(layer: nn.Module) -> int:
    """Multiply-adds per output value of a linear layer or a convolution."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


def kept_cost(layer: nn.Module, out: torch.Tensor) -> tuple[int, int]:
    """(bytes, FLOPs) of keeping `out`, the output of `layer` (a conv): what a forward keeps,
    what the rerun then does not compute."""
    return out.numel() * out.element_size(), 2 * out.numel() * fan_in(layer)


class Wrapper(nn.Module):
    """A module around `layer` that leaves it registered where it was: parameter names, state
    dicts and optimizers see the model as before the wrapping."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def extra_repr(self) -> str:
        return repr(self.layer)


class Kept(Wrapper):
    """A layer whose output a recording forward keeps and a replaying rerun reuses.

    `layer_name` (the layer's name in the source model; a reversible block's two branches each
    have a copy) is how the plan and the schedule name it; `active` says whether the schedule
    lets it keep (it may choose some of a unit's kept layers and not others)."""

    def __init__(self, layer: nn.Module, layer_name: str = ""):
        super().__init__(layer)
        self.layer_name, self.active = layer_name, True

    def forward(self, x):
        tape, recording = current()
        if tape is None or not tape.outputs or not self.active:
            return self.layer(x)
        if recording:
            out = self.layer(x)
            tape.put(self, out)
            return out
        value = tape.take(self)
        if value is None:
            return self.layer(x)
        with _Returning(value):
            return self.layer(x)

