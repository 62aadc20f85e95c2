"""Kept layers: the outputs of a unit's dearest layers, kept from its forward for its rerun.

A recomputing unit (a checkpointed block, a reversible stage's branches) reruns every layer in
the backward. Most of that compute sits in a few layers whose outputs are small for what they
cost: a 3x3 convolution does 2 * 9 * C_in FLOPs per value it writes, so keeping its output
costs 4 bytes per 18 * C_in FLOPs saved, a hundred times better than keeping a whole unit. The
plan marks such layers (`KEEP_FLOPS_PER_BYTE`); when the schedule lets a unit keep them (the
`kept` of its revify.runtime.modes.UnitSchedule names them), its forward records their outputs on a
`Tape` that the unit's backward holds, and the rerun takes each output from the tape instead
of computing it: the layer's backward (gradients of its input and weights) runs as plain
autograd's, from the same saved input and weights, so nothing changes by a bit. The tape
lives as long as the unit's piece of the autograd graph and is emptied as the rerun consumes
it.

This is the opposite of revify.plan.lean, which nests the cheapest layers (recomputing them once
more); the two thresholds leave no layer in both.
"""
from __future__ import annotations

import math
import threading

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from revify.runtime.fast import DIRECT as _DIRECT

KEEP_FLOPS_PER_BYTE = 192  # a layer is kept if its forward costs at least this per output byte
# (twice revify.plan.lean's FLOPS_PER_BYTE for nesting, so no layer is both)
KEPT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # one aten.convolution each: the op skipped

_local = threading.local()
# Tapes entered in any thread: while none is, a kept layer just runs (no lookup). A count
# gone wrong between threads only costs that lookup, never a wrong value.
_entered = [0]


class Tape:
    """The kept layers' outputs of one forward of a unit, per layer in call order."""

    def __init__(self):
        self.values: dict[int, list[tuple[torch.Tensor, int]]] = {}

    def put(self, layer: nn.Module, value: torch.Tensor) -> None:
        if value.requires_grad:  # a forward runs without autograd: only when traced for shapes
            value = value.detach()
        self.values.setdefault(id(layer), []).append((value, value._version))

    def take(self, layer: nn.Module) -> torch.Tensor | None:
        """The layer's next record, or None (none recorded, or changed in place since: the
        rerun then computes it)."""
        queue = self.values.get(id(layer))
        if not queue:
            return None
        value, version = queue.pop(0)
        return value if value._version == version else None


class _Using:
    """Sets the thread's tape while inside (None: kept layers just run)."""

    def __init__(self, tape: Tape | None, recording: bool):
        self.tape, self.recording = tape, recording

    def __enter__(self):
        self.previous = getattr(_local, "state", None)
        _local.state = (self.tape, self.recording) if self.tape is not None else None
        _entered[0] += self.tape is not None
        return self.tape

    def __exit__(self, *exc):
        _local.state = self.previous
        _entered[0] -= self.tape is not None
        return False


def recording(tape: Tape | None) -> _Using:
    """Kept layers run inside record their outputs on `tape`."""
    return _Using(tape, True)


def replaying(tape: Tape | None) -> _Using:
    """Kept layers run inside take their outputs from `tape`."""
    return _Using(tape, False)


def current() -> tuple[Tape, bool] | None:
    """The thread's tape and whether the unit records on it (its forward) or takes from it
    (its rerun); None outside a keeping unit's forward or rerun, and while compiling."""
    if torch.compiler.is_dynamo_compiling():
        return None
    return getattr(_local, "state", None)


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


class Kept(nn.Module):
    """A layer whose output a recording forward keeps and a replaying rerun reuses. The layer
    stays registered where it was (parameter names, state dicts and optimizers see the model
    as before the wrapping).

    `layer_name` (the layer's name in the source model; a reversible block's two branches each
    have a copy) is how the plan and the schedule name it; `keeps` whether it is in its unit's
    schedule's kept set (the schedule may choose some of a unit's kept layers and not others).
    That is the unit's schedule (revify.runtime.modes.UnitSchedule) copied once, by
    revify.rewrite.set_mode: the layer need not find its unit at every call. Until then it
    keeps wherever a tape records (a unit records only if its schedule keeps)."""
    only_calls_children = True  # draws no random numbers of its own (revify.graph.ops.draws_random)

    def __init__(self, layer: nn.Module, layer_name: str = ""):
        super().__init__()
        object.__setattr__(self, "layer", layer)
        self.layer_name, self.keeps = layer_name, True

    def extra_repr(self) -> str:
        return repr(self.layer)

    def forward(self, x):
        call = _DIRECT.get(type(self.layer), _module_call)  # as the graph would call the layer
        state = current() if _entered[0] and self.keeps else None
        if state is None:
            return call(self.layer, x)
        tape, recording = state
        if recording:
            out = call(self.layer, x)
            tape.put(self, out)
            return out
        value = tape.take(self)
        if value is None:
            return call(self.layer, x)
        with _Returning(value):
            return call(self.layer, x)


def _module_call(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer(x)
