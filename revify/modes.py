"""Switches and context managers shared by reversible stages and checkpointed layers."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch import nn

_local = threading.local()


@contextmanager
def exact_backward():
    """Run revified models with plain autograd: store activations, rebuild nothing.

    The reference the reversible backward is tested against, and a debugging aid: inside this
    block a revified model computes the same function with ordinary autograd.
    """
    previous = getattr(_local, "exact", False)
    _local.exact = True
    try:
        yield
    finally:
        _local.exact = previous


def exact_backward_enabled() -> bool:
    return getattr(_local, "exact", False)


class discarding:
    """A checkpoint's first forward: what autograd saves is dropped (and recomputed later), so
    a tensor computed only to be saved (a masked ReLU's mask) need not be computed."""

    def __enter__(self):
        self.previous = getattr(_local, "discarding", False)
        _local.discarding = True
        return self

    def __exit__(self, *exc):
        _local.discarding = self.previous
        return False


def discarding_enabled() -> bool:
    return getattr(_local, "discarding", False)


class frozen_buffers:
    """Recompute without net effect on buffers: running statistics were updated in the forward.

    The recompute runs the very same ops as the forward (a checkpoint matches saved tensors by
    position, so BatchNorm must not switch to a different kernel), then the buffers of training
    modules are put back. Writing through `.data` leaves version counters alone, so tensors the
    recompute saved for the backward stay valid. Re-enterable: a checkpoint enters the same
    object once per recompute.
    """

    def __init__(self, module: nn.Module):
        self.module = module
        self.buffers, self.saved = [], []

    def __enter__(self):
        # The module dicts read directly and the buffers put back by one foreach op: a
        # reversible stage's backward enters this once a step over hundreds of buffers.
        self.buffers = [b for m in self.module.modules() if m.training
                        for b in m._buffers.values() if b is not None]
        self.saved = [b.detach().clone() for b in self.buffers]
        return self

    def __exit__(self, *exc):
        if self.buffers:  # through .data: version counters stay
            torch._foreach_copy_([b.data for b in self.buffers], self.saved)
        self.buffers, self.saved = [], []
        return False


def capture_rng(device: torch.device):
    """The RNG state a recomputation must start from to draw the same dropout masks."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def replay_rng(state, device: torch.device):
    """Run with the captured RNG state, leaving the global RNG as it was afterwards."""
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        restore_rng(state, device)
        yield


def restore_rng(state, device: torch.device) -> None:
    """Set the global RNG back to a captured state (a forward run again draws the same masks)."""
    if state is None:
        return
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def capture_autocast(device: torch.device):
    kind = device.type
    try:
        return kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)
    except RuntimeError:  # a device type without autocast (meta): nothing to replay
        return None


@contextmanager
def replay_autocast(state):
    if state is None:
        yield
        return
    kind, enabled, dtype = state
    with torch.autocast(kind, dtype=dtype, enabled=enabled):
        yield
