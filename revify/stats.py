"""Kept batch statistics: a BatchNorm's rerun without its reduction.

In training, BatchNorm's forward passes over its input twice: once to reduce it to per-channel
batch statistics (mean, inverse std), once to apply them. A recomputing unit's rerun must give
the very same output (a reversible stage rebuilds its stream from it bit for bit, and
gradients must equal plain autograd's), and it does if it applies the same statistics with the
same kernel. So the unit's forward keeps them (two values a channel, on the unit's Tape) and
the rerun applies them through the kernel's inference path: with the inverse std folded into
the weight and a running variance v for which v + eps == 1 exactly, CPU's kernel computes
alpha = invstd * weight and beta = bias - mean * alpha as the training path does, by the same
code, then the same x * alpha + beta. On CPU that is about a fifth of the training
forward's time.

It happens below autograd (a TorchDispatchMode around the norm's call), so autograd records
the norm's own backward, which saves the kept statistics where it would have saved the ones it
computed: no gradient changes by a bit. Only where the two paths provably share their code:
native_batch_norm on CPU for an input layout and dtype whose two paths were found to agree bit
for bit (checked once per kind, `_paths_agree`: a torch whose kernels differ gets plain
reruns). Elsewhere (cuDNN on CUDA, a strided input) the rerun computes the statistics again.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from .keep import Wrapper, current, enclosing

NORMS = (nn.modules.batchnorm._BatchNorm,)  # one aten.native_batch_norm per call
_NATIVE = torch.ops.aten.native_batch_norm.default


class KeptStats(Wrapper):
    """A BatchNorm (`layer`) whose batch statistics a recording forward keeps and a replaying
    rerun reuses."""

    def forward(self, x):
        tape, recording = current()
        if tape is None:
            return self.layer(x)
        stats, record_on = None, []
        if not recording:
            stats = tape.take(self)
        else:  # a forward; in a checkpoint nested in a unit, for the unit's rerun too
            record_on.append(tape)
            outer = enclosing()
            if outer is not None:
                outer_tape, outer_recording = outer
                if outer_recording:  # the unit's forward: its rerun runs this forward again
                    record_on.append(outer_tape)
                else:  # the unit's rerun: this forward is itself a rerun
                    stats = outer_tape.take(self)
        if stats is None and not record_on:
            return self.layer(x)
        norm = self.layer
        if stats is None and _plain(norm) and _refoldable(x, norm.weight):
            return _record(norm, x, [(on, self) for on in record_on])
        # A rerun keeps the autograd node of the norm's training forward (a checkpoint matches
        # the tensors its rerun saves against its forward's), so it swaps the kernel below
        # autograd. (An autograd Function doing the same in reversible stages' reruns, calling
        # the training kernel's backward itself, was tried: 3% slower a step on ResNet-50, in
        # steps interleaved with this version's.) A plain norm's rerun makes the kernel call
        # alone, as `_record` does.
        with _Rerunning(stats, record_on, self):
            if stats is not None and not record_on and _plain(norm):
                return _training_call(norm, x)[0]
            return self.layer(x)


# Norms whose training forward `_record` repeats, calling the kernel itself: a dispatch mode
# around the module's own forward costs twice the call. Subclasses (timm's BatchNormAct2d,
# SyncBatchNorm) run their own forward under the mode.
_PLAIN_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _plain(norm: nn.Module) -> bool:
    return type(norm) in _PLAIN_NORMS and norm.training and norm.eps > 0


def _record(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, records: list) -> torch.Tensor:
    """`norm(x)` in training mode as torch's _BatchNorm.forward computes it (the same kernel
    call, so the same autograd node and buffer updates), its batch statistics put on the tapes."""
    norm._check_input_dim(x)
    F._verify_batch_size(x.size())
    momentum = 0.0 if norm.momentum is None else norm.momentum
    track = norm.track_running_stats
    if track and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(norm.num_batches_tracked)
    out, mean, invstd = _training_call(norm, x, momentum)
    for tape, key in records:
        tape.put(key, (mean, invstd))
    return out


def _training_call(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, momentum: float = 0.0):
    """The kernel call of `norm`'s training forward (under `_Rerunning`, a rerun: the same
    autograd node, nothing updated, so the module's own forward and its checks, already run
    on this input by the forward, are skipped)."""
    track = norm.track_running_stats
    return torch.native_batch_norm(x, norm.weight, norm.bias, norm.running_mean if track else None,
                                   norm.running_var if track else None, True, momentum, norm.eps)


class _Rerunning(TorchDispatchMode):
    """Around one call of the norm: its training forward computed from `stats` (through the
    inference path) if given, else by the kernel; its statistics put on each of `tapes` (None
    where a rerun could not reuse them), one record per call, so that records and reruns
    pair up."""

    def __init__(self, stats: tuple[torch.Tensor, torch.Tensor] | None, tapes: list, key: nn.Module):
        super().__init__()
        self.stats, self.tapes, self.key, self.done = stats, tapes, key, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not _NATIVE or not _training(args, kwargs) or self.done:
            return func(*args, **(kwargs or {}))
        self.done = True
        if self.stats is not None:
            mean, invstd = self.stats
            x, weight, bias = args[:3]
            out = refold(x, weight, bias, mean, invstd, _argument(args, kwargs, 7, "eps")), \
                mean.detach(), invstd.detach()
        else:
            out = func(*args, **(kwargs or {}))
        reusable = self.stats is not None or _refoldable(args[0], args[1])
        for tape in self.tapes:
            tape.put(self.key, out[1:] if reusable else None)
        return out


def refold(x, weight, bias, mean, invstd, eps: float) -> torch.Tensor:
    """native_batch_norm's training output for batch statistics (mean, invstd), through its
    inference path: weight * invstd as the weight, unit variance, zero momentum."""
    scale = invstd if weight is None else invstd * weight
    variance = _unit_variance(mean, eps)
    return _NATIVE(x, scale, bias, mean, variance, False, 0.0, eps)[0]


def _argument(args, kwargs, index: int, name: str):
    return args[index] if len(args) > index else (kwargs or {})[name]


def _training(args, kwargs) -> bool:
    return bool(_argument(args, kwargs, 5, "training"))


_unit_variances: dict[tuple, float] = {}


def _unit_variance(mean: torch.Tensor, eps: float) -> torch.Tensor:
    """A running variance v shaped like `mean` with v + eps == 1 exactly in the kernel's
    arithmetic (float for 16- and 32-bit parameters, else their dtype), so that its inverse
    std is exactly 1."""
    key = (mean.dtype, eps)
    if key not in _unit_variances:
        math_dtype = mean.dtype if mean.dtype.itemsize >= 4 else torch.float32
        with _disable_current_modes():
            e = torch.tensor(eps, dtype=math_dtype)
            v = (1 - e).to(mean.dtype)
            for _ in range(64):  # 1 - eps rounds; step to the neighbour that sums to one
                total = v.to(math_dtype) + e
                if total == 1:
                    break
                v = torch.nextafter(v, torch.tensor(2.0 if total < 1 else -2.0, dtype=mean.dtype))
            _unit_variances[key] = v.item()  # a float64 holds it exactly
    return torch.full_like(mean, _unit_variances[key])


def _refoldable(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether the rerun can reuse statistics for `x`: a CPU tensor of a layout and dtypes
    whose training and refolded paths agree (an empty batch goes through the norm's own
    forward, which returns it as it is)."""
    if x.device.type != "cpu" or x.dim() < 2 or x.numel() == 0:
        return False
    if x.is_contiguous():
        layout = torch.contiguous_format
    elif x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        layout = torch.channels_last
    else:
        return False
    return _paths_agree(x.dtype, x.dtype if weight is None else weight.dtype, layout)


_agreement: dict[tuple, bool] = {}


def _paths_agree(dtype: torch.dtype, param_dtype: torch.dtype, layout: torch.memory_format) -> bool:
    """Whether the training path and `refold` give the same bits, on a sample with a ragged
    tail and odd sizes (checked once per kind of input, outside any mode)."""
    key = (dtype, param_dtype, layout)
    if key not in _agreement:
        with _disable_current_modes(), torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x = (torch.randn(3, 5, 7, 9, generator=g) * 3 + 1).to(dtype)
            x = x.contiguous(memory_format=layout)
            weight, bias = (torch.randn(5, generator=g).to(param_dtype) for _ in range(2))
            out, mean, invstd = _NATIVE(x, weight, bias, None, None, True, 0.1, 1e-5)
            try:
                ours = refold(x, weight, bias, mean, invstd, 1e-5)
                _agreement[key] = ours.dtype == out.dtype and torch.equal(ours, out)
            except RuntimeError:  # a kernel without this path (dtype, layout)
                _agreement[key] = False
    return _agreement[key]
