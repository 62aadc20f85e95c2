"""Reversible stages: additive coupling with a backward that rebuilds activations.

    y1 = x1 + F(x2)        x2 = y2 - G(y1)
    y2 = x2 + G(y1)        x1 = y1 - F(x2)

A stage is one autograd Function that saves only its output. Its backward walks the blocks in
reverse; per block it recomputes G(y1) once, using the value both to rebuild x2 and to
backpropagate through G, then does the same for F: one extra forward per block.

Exact reconstruction. Subtracting F(x2) from a rounded sum does not give x1 back exactly, and
the error compounds over a deep stage. With `exact=True` (the default) the coupled stream's
*value* is carried in float64 while F and G run in the activation dtype: a sum of float32 (or
bf16) values is exact in float64, so `y - F(x2)` returns x1 to the bit. Its *gradient* stays in
the activation dtype, as in any network (float64 gradients would cost memory and buy nothing).
The stage output is returned in the activation dtype (`hi`) and the float64 remainder is saved
as a second tensor (`lo`, float32 for 16-bit activations): hi + lo holds y to 2^-48 relative for
float32 activations and 2^-32 for 16-bit ones, far below the precision F and G see.

Anchors. With `anchor_every=k` the forward also keeps the stream at the input of every k-th
block, and the backward resets its rebuilt stream to it there: drift (native reconstruction)
then never spans more than k blocks, for one stored activation per anchor.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .modes import (capture_autocast, capture_rng, exact_backward_enabled, frozen_buffers,
                    replay_autocast, replay_rng)


class CouplingBlock(nn.Module):
    """One reversible block: F and G are the original branch rebuilt at half the channels."""

    def __init__(self, f: nn.Module, g: nn.Module):
        super().__init__()
        self.f, self.g = f, g


def _remainder_dtype(dtype: torch.dtype) -> torch.dtype:
    """What the float64 remainder is kept in: at least float32, so hi + lo holds 32+ bits."""
    return torch.float32 if dtype.itemsize < 4 else dtype


def stream_dtype(dtype: torch.dtype, device: torch.device, exact: bool) -> torch.dtype:
    if not exact or dtype == torch.float64 or device.type == "mps":  # MPS has no float64
        return dtype
    return torch.float64


class _ExactAdd(torch.autograd.Function):
    """(h, v) + f for the plain-autograd path: v the stream's exact value (no gradient), h its
    rounding to the activation dtype, which carries the gradient (that of `+`: the identity)."""

    @staticmethod
    def forward(ctx, h, v, f):
        v = v + f
        ctx.f_dtype = f.dtype
        ctx.mark_non_differentiable(v)
        return v.to(h.dtype), v

    @staticmethod
    def backward(ctx, dh, dv):
        return dh, None, dh.to(ctx.f_dtype)


def _add(h, v, f):
    if v is None:
        return h + f, None
    return _ExactAdd.apply(h, v, f)


class ReversibleStage(nn.Module):
    """A run of coupling blocks: split once at entry, concatenate once at exit."""

    def __init__(self, blocks: list[CouplingBlock], dim: int = 1, exact: bool = True,
                 anchor_every: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.dim = dim
        self.exact = exact
        self.anchor_every = anchor_every

    def anchored(self, index: int) -> bool:
        """Whether the forward keeps the stream at the input of block `index`."""
        return bool(self.anchor_every) and index > 0 and index % self.anchor_every == 0

    def forward(self, x):
        params = list(self.parameters())
        needs_grad = x.requires_grad or any(p.requires_grad for p in params)
        if exact_backward_enabled() or not torch.is_grad_enabled() or not needs_grad:
            return self.forward_plain(x)
        _refuse_fsdp_inside(self)
        return _run_reversible(self, x, *params)

    def couple(self, x, anchors: dict | None = None):
        """Every block with plain autograd: (output, exact float64 stream or None).

        `anchors`, if given, receives the stream at every anchored block input, as the
        reversible forward keeps it (for `inverse`).
        """
        h1, h2 = x.chunk(2, self.dim)
        exact = stream_dtype(x.dtype, x.device, self.exact) != x.dtype
        v1, v2 = x.to(torch.float64).chunk(2, self.dim) if exact else (None, None)
        for i, block in enumerate(self.blocks):  # inputs contiguous as in the Function (see _branch_input)
            if anchors is not None and self.anchored(i):
                anchors[i] = torch.cat([v1, v2] if exact else [h1, h2], self.dim).detach()
            h1, v1 = _add(h1, v1, block.f(h2.contiguous()))
            h2, v2 = _add(h2, v2, block.g(h1.contiguous()))
        stream = torch.cat([v1, v2], self.dim) if exact else None
        return torch.cat([h1, h2], self.dim), stream

    def forward_plain(self, x):
        return self.couple(x)[0]

    def inverse(self, y, dtype: torch.dtype | None = None, anchors: dict | None = None):
        """The stage input rebuilt from the coupled stream `y` (the blocks run backwards),
        restarting from `anchors` (see `couple`) where the backward would."""
        dtype = dtype or y.dtype
        anchors = anchors or {}
        y1, y2 = y.chunk(2, self.dim)
        for i in reversed(range(len(self.blocks))):
            block = self.blocks[i]
            y2 = y2 - block.g(y1.to(dtype))
            y1 = y1 - block.f(y2.to(dtype))
            if i in anchors:
                y1, y2 = anchors[i].to(y.dtype).chunk(2, self.dim)
        return torch.cat([y1, y2], self.dim)


# Under torch.compile the reversible stage runs eagerly between compiled graphs: its backward
# rebuilds activations from a stage output the compiled graph must not plan around, and dynamo
# cannot trace the RNG capture. One graph break per stage, on purpose.
@torch.compiler.disable
def _run_reversible(stage, x, *params):
    return _ReversibleStageFunction.apply(stage, x, *params)


def _refuse_fsdp_inside(stage: ReversibleStage) -> None:
    """fully_shard on a module inside a stage would hand its backward sharded parameters that
    the recompute never touches: their gradients would silently be None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    inner = next((n for n, m in stage.named_modules() if n and isinstance(m, FSDPModule)), None)
    if inner is not None:
        raise RuntimeError(f"revify: fully_shard was applied to '{inner}' inside a reversible "
                           f"stage; apply it to the ReversibleStage itself or a module above it.")


def _branch_input(half: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A stream half as F or G sees it: in the activation dtype and contiguous in every path
    (forward, recompute, plain autograd), so kernels such as BatchNorm's take the same path
    and round alike: a channel half of NCHW is a strided view."""
    return half.to(dtype).contiguous()


def _rebuild_stream(hi, lo, dtype):
    """The stream as a fresh tensor (the backward updates it in place)."""
    stream = hi.to(dtype, copy=True)
    if lo is not None:
        stream += lo
    return stream


def _recompute(fn, stream, dtype, grad_out, params, rng, autocast, device):
    """Run fn on a stream value once with autograd and backpropagate grad_out through it.

    Returns fn's value (used to rebuild the other half) and the gradients with respect to fn's
    input and to `params`. Only the recomputation re-enters the forward's autocast state; the
    backward through it runs outside autocast, as `loss.backward()` does.
    """
    with torch.enable_grad(), replay_rng(rng, device), replay_autocast(autocast):
        inp = _branch_input(stream, dtype).detach().requires_grad_(True)
        out = fn(inp)
    grads = torch.autograd.grad(out, [inp, *params], grad_out.to(out.dtype), allow_unused=True)
    d_inp = grads[0] if grads[0] is not None else torch.zeros_like(inp)
    return out.detach(), d_inp, grads[1:]


class _ReversibleStageFunction(torch.autograd.Function):
    """Saves nothing but the stage output; the backward rebuilds every block's input from it.

    The output is kept as a detached alias in `ctx.state` rather than through
    `save_for_backward`, so the backward can drop it as soon as the stream has been rebuilt
    (the autograd engine would hold saved tensors until the backward returns). In-place changes
    to the output between forward and backward are still caught, by the version counter.
    """

    @staticmethod
    def forward(ctx, stage: ReversibleStage, x, *params):
        device, dtype = x.device, x.dtype
        ctx.stage, ctx.dtype = stage, dtype
        ctx.autocast = capture_autocast(device)
        ctx.rng, ctx.anchors = [], {}
        x1, x2 = x.to(stream_dtype(dtype, device, stage.exact)).chunk(2, stage.dim)
        for i, block in enumerate(stage.blocks):
            if stage.anchored(i):  # x1, x2 are rebound below, never changed: no copy needed
                ctx.anchors[i] = (x1, x2)
            rng_f = capture_rng(device) if block.training else None
            x1 = x1 + block.f(_branch_input(x2, dtype))  # a float64 stream absorbs it exactly
            rng_g = capture_rng(device) if block.training else None
            x2 = x2 + block.g(_branch_input(x1, dtype))
            ctx.rng.append((rng_f, rng_g))
        y = torch.cat([x1, x2], stage.dim)
        del x1, x2
        hi = y.to(dtype)
        lo = (y - hi).to(_remainder_dtype(dtype)) if y.dtype != dtype else None
        ctx.state = [hi.detach(), lo]
        ctx.version = hi._version
        ctx.stream_dtype = y.dtype
        return hi

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        stage, dim, dtype = ctx.stage, ctx.stage.dim, ctx.dtype
        if ctx.state is None:
            raise RuntimeError("revify: a reversible stage's backward ran twice; the stage output "
                               "it rebuilds from is released after the first backward.")
        hi, lo = ctx.state
        ctx.state = None
        if hi._version != ctx.version:
            raise RuntimeError("revify: the output of a reversible stage was modified in place "
                               "before the backward; the stage rebuilds its activations from it.")
        device = hi.device
        # The stream is our own buffer, updated in place: its halves become each block's input
        # in turn. Gradients are summed out of place, as the autograd engine sums them: kernels
        # take other paths for strided and contiguous gradients, and the reversible backward is
        # meant to match plain autograd to the last bit.
        y1, y2 = _rebuild_stream(hi, lo, ctx.stream_dtype).chunk(2, dim)
        del hi, lo
        dy1, dy2 = dy.chunk(2, dim)
        del dy
        params = list(stage.parameters())
        trainable = {id(p) for p, need in zip(params, ctx.needs_input_grad[2:]) if need}
        grads: dict[int, torch.Tensor] = {}

        def backprop(fn, stream, grad_out, rng):
            fn_params = [p for p in fn.parameters() if id(p) in trainable]
            value, d_inp, d_params = _recompute(fn, stream, dtype, grad_out, fn_params, rng,
                                                ctx.autocast, device)
            for p, g in zip(fn_params, d_params):
                if g is not None:
                    grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g
            return value, d_inp

        with frozen_buffers(stage):
            for i in reversed(range(len(stage.blocks))):
                block, (rng_f, rng_g) = stage.blocks[i], ctx.rng[i]
                g_y1, d_y1 = backprop(block.g, y1, dy2, rng_g)
                y2 -= g_y1                           # x2, rebuilt
                dy1 = dy1 + d_y1                     # total gradient reaching y1
                del g_y1, d_y1
                f_x2, d_x2 = backprop(block.f, y2, dy1, rng_f)
                y1 -= f_x2                           # x1, rebuilt
                dy2 = dy2 + d_x2                     # gradient reaching x2
                del f_x2, d_x2
                if i in ctx.anchors:                 # drop the drift: restart from the anchor
                    a1, a2 = ctx.anchors.pop(i)
                    y1.copy_(a1), y2.copy_(a2)
        del y1, y2
        dx = torch.cat([dy1, dy2], dim) if ctx.needs_input_grad[1] else None
        ctx.rng = ctx.anchors = None
        return (None, dx, *[grads.get(id(p)) for p in params])
