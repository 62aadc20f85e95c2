"""Layers of the rewritten graphs called without nn.Module's call machinery.

A revified step runs every layer of a reversible branch twice (forward and rerun), and a block's
branch as two half-width copies (F and G): four calls of each layer where the original makes
one, and on a GPU, where a step is short, each module call's Python (hook checks, `forward`,
attribute lookups) costs about as much as the kernel it launches. The rewritten graphs call
convolutions, BatchNorms and ReLUs through these functions: each does what the module's own
`forward` does, reading its parameters and buffers from the module's dicts, so the same aten op
runs with the same arguments, bit for bit. A module with hooks (its own or global ones), a
subclass (a parametrization makes one) or a setting not covered here goes through its own call,
and so does every layer while torch.compile traces (dynamo knows modules, not these shortcuts).
Traced again by torch.fx (a GraphModule being unpickled), each call stays one node.
"""
from __future__ import annotations

import contextlib

import torch
from torch import fx, nn
from torch.nn.modules import module as _module

from revify.runtime import modes as _modes

_GLOBAL_HOOKS = (_module._global_forward_hooks, _module._global_forward_pre_hooks,
                 _module._global_backward_hooks, _module._global_backward_pre_hooks,
                 _module._global_forward_hooks_always_called)


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _own_call(m: nn.Module) -> bool:
    """Whether `m` must go through its own call: hooks, or dynamo tracing (is_dynamo_compiling
    is False when run, True when dynamo traces it; is_compiling would cost a call more)."""
    return torch.compiler.is_dynamo_compiling() or any(map(m.__dict__.__getitem__, _HOOKS)) or \
        any(_GLOBAL_HOOKS)


def _node(fn, m: nn.Module, x: fx.Proxy) -> fx.Proxy:
    return x.tracer.create_proxy("call_function", fn, (m, x), {})


def conv2d(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, fx.Proxy):
        return _node(conv2d, m, x)
    if type(m) is not nn.Conv2d or m.padding_mode != "zeros" or _own_call(m):
        return m(x)
    p = m._parameters
    return torch.conv2d(x, p["weight"], p["bias"], m.stride, m.padding, m.dilation, m.groups)


def batch_norm(m: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """nn.BatchNorm2d's forward where the momentum is set and the batch has more than one value
    per channel (else the module's own, for its cumulative average or its error). A rerun
    (revify.runtime.modes.rerunning) leaves the statistics as the forward updated them: the
    same kernel with momentum 0 writes back what it reads, bit for bit, and no batch is
    counted, so nothing needs restoring afterwards."""
    if isinstance(x, fx.Proxy):
        return _node(batch_norm, m, x)
    rerun = getattr(_modes._local, "rerunning", False)
    if type(m) is not nn.BatchNorm2d or m.momentum is None or x.dim() != 4 or _own_call(m):
        return _rerun_own_call(m, x) if rerun else m(x)
    b, p = m._buffers, m._parameters
    training, tracking = m.training, m.track_running_stats
    if training and x.shape[0] * x.shape[2] * x.shape[3] == 1:
        return m(x)
    if training and tracking and not rerun and b.get("num_batches_tracked") is not None:
        _count_batch(b["num_batches_tracked"])
    stats = not training or tracking
    mean, var = (b["running_mean"], b["running_var"]) if stats else (None, None)
    return torch.batch_norm(x, p["weight"], p["bias"], mean, var,
                            training or (b["running_mean"] is None and b["running_var"] is None),
                            0.0 if rerun else m.momentum, m.eps, torch._C._get_cudnn_enabled())


batch_norm.rerun_safe = True  # see revify.runtime.modes.Slots


def _count_batch(counter: torch.Tensor) -> None:
    """One batch more on a BatchNorm's `num_batches_tracked`: inside `batches_counted`, at its
    end, else now. With the momentum set nothing reads the count during a forward."""
    pending = getattr(_modes._local, "batches", None)
    if pending is None:
        counter.add_(1)
    else:
        pending.append(counter)


@contextlib.contextmanager
def batches_counted():
    """The batch counts of the BatchNorms called directly in a forward, added at its end in one
    foreach op instead of one kernel each (a revified ResNet-50 has 89 BatchNorms in training).
    Nested: the outermost adds them."""
    if getattr(_modes._local, "batches", None) is not None:
        yield
        return
    _modes._local.batches = pending = []
    try:
        yield
    finally:
        _modes._local.batches = None
        if len(set(map(id, pending))) == len(pending):
            if pending:
                torch._foreach_add_(pending, 1)
        else:  # a layer called twice counts twice: one foreach op would add once
            for counter in pending:
                counter.add_(1)


def _rerun_own_call(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A rerun of a BatchNorm through its own call (hooks, a parametrization, a cumulative
    average): with momentum 0 it writes back the statistics it reads, and the batch it counts
    is taken back."""
    momentum, m.momentum = m.momentum, 0.0
    try:
        out = m(x)
    finally:
        m.momentum = momentum
    count = m._buffers.get("num_batches_tracked")
    if m.training and m.track_running_stats and count is not None:
        count.sub_(1)
    return out


def relu(m: nn.ReLU, x: torch.Tensor) -> torch.Tensor:
    if isinstance(x, fx.Proxy):
        return _node(relu, m, x)
    if type(m) is not nn.ReLU or _own_call(m):
        return m(x)
    return torch.relu_(x) if m.inplace else torch.relu(x)


DIRECT = {nn.Conv2d: conv2d, nn.BatchNorm2d: batch_norm, nn.ReLU: relu}


def call_directly(gm: fx.GraphModule) -> None:
    """Rewrite `gm`'s calls of DIRECT's layers into calls of their functions."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or node.kwargs:
            continue
        fn = DIRECT.get(type(gm.get_submodule(node.target)))
        if fn is None or len(node.args) != 1:
            continue
        with gm.graph.inserting_before(node):
            layer = gm.graph.get_attr(node.target)
        node.op, node.target, node.args = "call_function", fn, (layer, *node.args)
        changed = True
    if changed:
        gm.recompile()
