"""Max pooling in recomputing units: CPU's channels-last kernel for the forward.

A unit that recomputes itself runs its max pool twice a step (a ResNet's stem: 16x64x56x56 at
batch 16 and 112x112). torch's CPU forward of max_pool2d on contiguous (NCHW) input takes about
ten times as long as on channels-last input (11 ms against 0.9 ms there, on this project's
2-core machine), while its backward is fast in either layout. So the forward runs on
channels-last copies (of an eighth of the input at a time) and hands back output and indices
in the input's layout; the backward is torch's own, from those indices. Max pooling picks
values without arithmetic and both kernels take the first maximum of a window in the same
order, so output, indices and gradients are those of `F.max_pool2d` to the bit
(tests/test_pool.py, ties included). Elsewhere (CUDA, other layouts, `return_indices`) the
module runs as it is.
"""
from __future__ import annotations

import torch
from torch import nn

from .keep import Wrapper
from .modes import discarding_enabled

POOLS = (nn.MaxPool2d,)
CHUNKS = 8  # the input is copied to channels-last in this many pieces (see _ChannelsLastMaxPool)


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
    return (x.device.type == "cpu" and x.dim() == 4 and x.is_floating_point() and x.numel() > 0
            and not pool.return_indices and x.is_contiguous()
            and not x.is_contiguous(memory_format=torch.channels_last))  # e.g. a 1x1 map


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v, v]


def _pieces(x: torch.Tensor) -> list[tuple[slice, slice]]:
    """About CHUNKS pieces of `x` (whole samples, or groups of a sample's channels, at least
    one channel plane each), each contiguous in `x`'s layout."""
    n, c = x.shape[:2]
    planes = -(-n * c // CHUNKS)   # channel planes per piece
    if planes >= c:
        step = planes // c
        return [(slice(s, s + step), slice(None)) for s in range(0, n, step)]
    return [(slice(s, s + 1), slice(k, k + planes)) for s in range(n) for k in range(0, c, planes)]


class _ChannelsLastMaxPool(torch.autograd.Function):
    """F.max_pool2d(x, ...) for contiguous CPU `x`, computed on channels-last copies of pieces
    of it (so the copies add an eighth of the input, or one channel plane if that is more, to
    what is live, where torch's own pool adds nothing); it saves what torch's own saves (the
    input and the indices), so what a step holds and its gradients are the same."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding, dilation, ceil_mode):
        # A checkpoint's first forward drops what is saved: the indices are left unwritten
        # there (the checkpoint only checks the recompute's against their shape and dtype).
        keep_indices = not discarding_enabled()
        out = indices = None
        for piece in _pieces(x):
            o, i = torch.ops.aten.max_pool2d_with_indices(
                x[piece].contiguous(memory_format=torch.channels_last), kernel, stride, padding,
                dilation, ceil_mode)
            if out is None:
                out = x.new_empty((*x.shape[:2], *o.shape[2:]))
                indices = torch.empty(out.shape, dtype=i.dtype, device=x.device)
            out[piece].copy_(o)
            if keep_indices:
                indices[piece].copy_(i)
        ctx.save_for_backward(x, indices)
        ctx.args = kernel, stride, padding, dilation, ceil_mode
        return out

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        grad_x = torch.ops.aten.max_pool2d_with_indices_backward(grad, x, *ctx.args, indices)
        return grad_x, None, None, None, None, None
