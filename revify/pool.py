"""Max pooling in recomputing units: CPU's channels-last kernel for the forward.

A unit that recomputes itself runs its max pool twice a step (a ResNet's stem: 16x64x56x56 at
batch 16 and 112x112). torch's CPU forward of max_pool2d on contiguous (NCHW) input takes about
ten times as long as on channels-last input (11 ms against 0.9 ms there, on this project's
2-core machine), while its backward is fast in either layout. So the forward runs on a
channels-last copy and hands back output and indices in the input's layout; the backward is
torch's own, from those indices. Max pooling picks values without arithmetic and both kernels
take the first maximum of a window in the same order, so output, indices and gradients are
those of `F.max_pool2d` to the bit (tests/test_pool.py, ties included). Elsewhere (CUDA, other
layouts, `return_indices`) the module runs as it is.
"""
from __future__ import annotations

import torch
from torch import nn

from .keep import Wrapper
from .modes import discarding_enabled

POOLS = (nn.MaxPool2d,)


class FastMaxPool(Wrapper):
    """An nn.MaxPool2d (`layer`) whose CPU forward goes through the channels-last kernel."""

    def forward(self, x):
        pool = self.layer
        if not _applies(pool, x):
            return pool(x)
        stride = pool.stride if pool.stride is not None else pool.kernel_size
        return _ChannelsLastMaxPool.apply(x, _pair(pool.kernel_size), _pair(stride),
                                          _pair(pool.padding), _pair(pool.dilation), pool.ceil_mode)


def _applies(pool: nn.MaxPool2d, x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point()
            and not pool.return_indices and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last))  # e.g. a 1x1 map


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


class _ChannelsLastMaxPool(torch.autograd.Function):
    """F.max_pool2d(x, ...) for contiguous CPU `x`, computed on a channels-last copy; it saves
    what torch's own saves (the input and the indices), so memory and gradients are the same."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        out, indices = torch.ops.aten.max_pool2d_with_indices(
            x.contiguous(memory_format=torch.channels_last), kernel, stride, padding, dilation,
            ceil_mode)
        out = out.contiguous()
        # A checkpoint's first forward drops what is saved: an empty stand-in of the same shape
        # and dtype (what the checkpoint checks the recompute's against) spares the copy.
        indices = torch.empty_like(out, dtype=indices.dtype) if discarding_enabled() else \
            indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.args = kernel, stride, padding, dilation, ceil_mode
        return out

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.args, indices)
        return grad_x, None, None, None, None, None
