"""Reversible stages: additive coupling with a backward that rebuilds activations.

    y1 = x1 + F(x2)        x2 = y2 - G(y1)
    y2 = x2 + G(y1)        x1 = y1 - F(x2)

A stage saves only its output. Its backward walks the blocks in reverse; per block it
recomputes G(y1) once, using the value both to rebuild x2 and to backpropagate through G, then
does the same for F: one extra forward per block. In the autograd graph the stage is a chain
with one node per branch (`_run_reversible`), so each branch's parameter gradients reach
autograd (and `.grad`, DDP's buckets, hooks) as soon as they are computed: the backward holds
one branch's gradients at a time, whatever the stage's depth.

Exact reconstruction on a fixed-point grid. In floating point `(x1 + f) - f` is not x1: the add
rounds away the low bits of x1, and the error compounds over a deep stage. With `exact=True`
(the default) every value of the coupled stream lies on a grid, the multiples of a power of two
`step` chosen per channel at the stage entry from the input's magnitude, 2^-(P-H) of it (P: the
significand bits of the stream dtype, H: headroom bits). The stage input and every branch
output are rounded onto the grid (straight through: the rounding's gradient is the identity),
so every add is a sum of two multiples of `step` below 2^P * step, which floating point
computes exactly: the backward's subtraction gives x1 back to the bit, at any depth, with the
stream in the activation dtype (float32 for 16-bit activations): no wider dtype, no second
tensor. What it costs is that rounding: 2^-(P-H) of a channel's entry magnitude, about 1e-6 for
float32 with H = 4, far finer than bfloat16 and about what float32 itself rounds the largest
values of a channel to. Fixed-point arithmetic for exact reversal: MacKay et al., "Reversible
Recurrent Neural Networks", NeurIPS 2018.

The grid holds while no value reaches 2^P * step. Every block records its stream channels'
largest magnitude and one reduction per stage compares them with the limits; a channel that outgrew
its headroom gets 8 more bits and (until the grid has held once: `widen`) the stage runs its
forward again, drawing the same random masks and leaving BatchNorm statistics as the first run
updated them. The headroom is kept (a buffer), so a stage pays this once, not every step. A
stream that grows beyond what the grid can hold with 8 bits of precision left
(`ReversibleStage.widen`) makes the overflowing adds round as plain floating point would, with a
warning. A forward that needs no
backward (inference) checks nothing.

Anchors. With `anchor_every=k` the forward also keeps the stream at the input of every k-th
block, and the backward resets its rebuilt stream to it there: drift (native reconstruction)
then never spans more than k blocks, for one stored activation per anchor.
"""
from __future__ import annotations

import operator
import warnings
import weakref
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from revify.runtime.keep import Tape, recording, replaying
from revify.graph.ops import draws_random
from revify.runtime.modes import (NOTHING, Seed, UnitMode, UnitSchedule, capture_autocast,
                                  capture_rng, frozen_buffers, grads_of, plain_autograd_enabled,
                                  replay_autocast, replay_rng, rerunning, restore_rng, slots)

SIGNIFICAND_BITS = {torch.float32: 24, torch.float64: 53}
HEADROOM_BITS = 4      # at first a channel may grow 16x over its entry magnitude
WIDEN_BITS = 8         # what a channel that outgrew its headroom gets on top
MIN_BITS = 8           # the most headroom leaves 2^-8 of a channel's input magnitude as the step
FLOOR_BITS = 8         # a channel's magnitude counts as at least 2^-8 of the largest one's


class CouplingBlock(nn.Module):
    """One reversible block: F and G are the original branch rebuilt at half the channels. G
    may be None (y2 = x2): a coupling of one branch, F alone."""

    def __init__(self, f: nn.Module, g: nn.Module | None = None):
        super().__init__()
        self.f, self.g = f, g
        # per branch, whether its rerun must replay the RNG state its forward drew from
        self.random = (draws_random(f), g is not None and draws_random(g))

    @property
    def branches(self) -> list[tuple[int, nn.Module]]:
        """(the half it adds to, branch) per branch, in the order the forward runs them."""
        return [(0, self.f)] if self.g is None else [(0, self.f), (1, self.g)]


def stream_dtype(dtype: torch.dtype, exact: bool) -> torch.dtype:
    """What the coupled stream is carried in: a 16-bit grid would be too coarse."""
    return torch.float32 if exact and dtype.itemsize < 4 else dtype


def _data_dependent_ok(t: torch.Tensor) -> bool:
    """Whether values can be read back: not on meta or fake tensors (shape-only runs)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return t.device.type != "meta" and not isinstance(t, FakeTensor)


@dataclass
class Grid:
    """The fixed-point grid of a stage's two stream halves, per channel along `dim`.

    The forward carries the stream as one pair tensor, the two halves stacked on a new
    leading dim (`paired`): the grid's rounding at the stage entry and its check after each
    block run once on the pair, not once a half.
    """
    step: torch.Tensor      # spacing, shaped to broadcast against the pair
    inverse: torch.Tensor   # 1 / step: powers of two, so t * (1 / step) is t / step to the bit
    limit: torch.Tensor     # per stream channel, 2^P * step: every value stays below it
    dims: list[int]         # the dims a per-channel reduction of a half runs over
    empty: bool = False     # made for an empty batch: it proves nothing

    def __post_init__(self):
        # each half's, shaped to broadcast against a half (views, made once a grid)
        self.steps, self.inverses = self.step.unbind(0), self.inverse.unbind(0)
        self.pair_dims = [d + 1 for d in self.dims]  # those dims in the pair

    @classmethod
    def for_input(cls, x: torch.Tensor, dim: int, headroom: torch.Tensor, dtype: torch.dtype):
        dims = [d for d in range(x.ndim) if d != dim]
        bits = SIGNIFICAND_BITS[dtype]
        with torch.no_grad():
            size = magnitude(x.detach(), dims).to(dtype)
            size = torch.maximum(size, size.max() * 2.0 ** -FLOOR_BITS)
            size.clamp_min_(torch.finfo(dtype).tiny * 2.0 ** 64)  # keep steps normal
            exponent = torch.frexp(size).exponent          # size < 2^exponent
            step = torch.ldexp(torch.ones_like(size), exponent.add_(headroom).sub_(bits))
            inverse, limit = step.reciprocal(), step * 2.0 ** bits
        shape = [2] + [1] * x.ndim
        shape[dim + 1] = -1
        return cls(step.view(shape), inverse.view(shape), limit, dims, x.numel() == 0)

    def snap(self, t: torch.Tensor, half: int) -> torch.Tensor:
        """`t` rounded onto half `half`'s grid, in the stream dtype (a new tensor)."""
        return torch.mul(t, self.inverses[half]).round_().mul_(self.steps[half])

    def snap_pair(self, pair: torch.Tensor) -> torch.Tensor:
        """Both halves of a pair rounded onto their grids, in place."""
        return pair.mul_(self.inverse).round_().mul_(self.step)

    def add_snapped(self, stream: torch.Tensor, t: torch.Tensor, half: int, sign: int = 1,
                    scratch: bool = True):
        """stream += sign * snap(t), in place; `t` is used as scratch if `scratch` and it has the
        stream's dtype. Every step is exact, so the result is the same bits as
        `stream + snap(t)` computed any other way."""
        inverse = self.inverses[half]
        if scratch and t.dtype == stream.dtype:
            scaled = torch.round_(t.mul_(inverse))
        else:
            scaled = torch.round(t * inverse)
        return stream.addcmul_(scaled, self.steps[half], value=sign)

    def outgrown(self, sizes: list[torch.Tensor]) -> torch.Tensor:
        """Per stream channel: whether a value reached the grid's limit, from the magnitudes
        of both halves (`magnitude` of the pair) after each of a stage's blocks, combined in
        one reduction (no sync). A half changes once a block, so a check at each block's end
        sees every value the stream took."""
        return torch.stack(sizes).amax(0).flatten() >= self.limit


def magnitude(t: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """Per channel, the largest |value| of `t` (reduced over `dims`); zeros for an empty batch
    (no value to place on the grid, none can outgrow it)."""
    if t.numel() == 0:
        return t.new_zeros([n for d, n in enumerate(t.shape) if d not in dims])
    return torch.amax(t.abs(), dims)


class _read_later:
    """A one-value device tensor read on the host once it is ready, without waiting: on CUDA
    copied into pinned memory behind an event, on CPU read as it is (numpy, no aten op)."""

    def __init__(self, flag: torch.Tensor):
        self.event = None
        if flag.device.type == "cuda":
            self.flag = torch.empty(flag.shape, dtype=flag.dtype, pin_memory=True)
            self.flag.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.flag = flag

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def value(self) -> bool:
        return bool(self.flag.numpy().any())


class _Snap(torch.autograd.Function):
    """Rounding onto the grid for the plain-autograd path; its gradient is the identity."""

    @staticmethod
    def forward(ctx, t, grid, half):
        ctx.dtype = t.dtype
        return grid.snap(t, half)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None, None


class _ExactAdd(torch.autograd.Function):
    """(h, v) + f for 16-bit activations on the plain-autograd path: v the stream's float32
    value on the grid (no gradient), h its rounding to the activation dtype, which carries the
    gradient (that of `+`: the identity)."""

    @staticmethod
    def forward(ctx, h, v, f, grid, half):
        v = v + grid.snap(f, half)
        ctx.f_dtype = f.dtype
        ctx.mark_non_differentiable(v)
        return v.to(h.dtype), v

    @staticmethod
    def backward(ctx, dh, dv):
        return dh, None, dh.to(ctx.f_dtype), None, None


@dataclass
class Coupled:
    """What the plain forward of a stage computed: for the backward's reference and `inverse`."""
    output: torch.Tensor          # in the activation dtype
    stream: torch.Tensor          # the stream at the output (the stream dtype, detached)
    entry: torch.Tensor | None    # the stream at the input, what `inverse` must give back
                                  # (kept with `couple(record=True)`)
    grid: Grid | None             # None: native reconstruction


class ReversibleStage(nn.Module):
    """A run of coupling blocks: split once at entry, concatenate once at exit."""
    rerun_safe = True  # its headroom changes in `widen`, after a forward, never in a rerun

    def __init__(self, blocks: list[CouplingBlock], dim: int = 1, exact: bool = True,
                 anchor_every: int | None = None, channels: int | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.random = any(r for block in blocks for r in block.random)
        self.dim = dim
        self.exact = exact
        self.anchor_every = anchor_every
        # How it runs (revify.plan.schedule, set by revify.rewrite.set_mode): STORED with plain
        # autograd, keeping the activations (they fit under the step's peak), the same
        # function, grid included: only the backward differs; its `kept` layers' outputs kept
        # by the forward for the rebuild (revify.runtime.keep).
        self.schedule = UnitSchedule()
        # Headroom bits per stream channel (see the module docstring): the grid is part of the
        # function the stage computes, so it is saved with the weights.
        headroom = torch.full((channels,), HEADROOM_BITS, dtype=torch.int32) \
            if channels and exact else None
        self.register_buffer("headroom", headroom)
        # The headroom (tensor, version) a forward last found to hold (see `widen`: any other
        # change, a widening, a loaded or restored state, is checked on the host again), and
        # the check of the last steady-state forward, read later. Runtime state, not saved.
        self._held, self._outgrown = None, None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if prefix + "headroom" in missing_keys:  # weights saved before the grid: the first guess
            missing_keys.remove(prefix + "headroom")

    def __getstate__(self):
        # a pending read may hold a CUDA event, which neither copies nor pickles
        return {**super().__getstate__(), "_outgrown": None}

    def anchored(self, index: int) -> bool:
        """Whether the forward keeps the stream at the input of block `index`."""
        return bool(self.anchor_every) and index > 0 and index % self.anchor_every == 0

    def forward(self, x):
        if self.training or self.headroom is None or not torch.is_grad_enabled():
            return self._forward(x)
        # Eval mode with gradients (attribution, adversarial inputs): a grid widened for this
        # pass serves its backward (which has its grid) and is dropped, so that an eval pass
        # leaves what training computes afterwards, and the saved headroom, as they were.
        headroom = self.headroom.clone()
        try:
            return self._forward(x)
        finally:
            self.headroom = headroom

    def _forward(self, x):
        if self.schedule.mode is UnitMode.STORED or plain_autograd_enabled() \
                or not torch.is_grad_enabled():
            return self.couple(x).output
        return _run_reversible(self, x)

    # ------------------------------------------------------------------ the grid
    def grid_for(self, x: torch.Tensor) -> Grid | None:
        if not self.exact:
            return None
        if self.headroom is None or self.headroom.numel() != x.shape[self.dim]:
            self.headroom = torch.full((x.shape[self.dim],), HEADROOM_BITS, dtype=torch.int32,
                                       device=x.device)  # a new grid: not held (`_holds`)
        return Grid.for_input(x, self.dim, self.headroom.to(x.device, torch.int32),
                              stream_dtype(x.dtype, True))

    def widen(self, grid: Grid | None, sizes: list[torch.Tensor] | None) -> bool:
        """Give the channels that outgrew the grid more headroom; whether the forward must run
        again. `sizes`: the magnitudes the forward's adds left (`Grid.outgrown`), None when
        there was nothing to check.

        Until the grid has held for one forward (after it was made or widened) this reads the
        check on the host (a sync) and runs the forward again on overflow, so the step is
        exact. After that, in steady state, it reads nothing back: the widening is applied on
        the device for the next step, and whether anything outgrew the grid is read a step
        later without waiting (`_settle`): such a step's reconstruction rounded as floating
        point would (as with `native`), which is said once, and the next forward checks on the
        host again.

        A channel already at the most headroom that still leaves 2^MIN_BITS of precision stays
        there: its stream grew over 2^(P - MIN_BITS) times its input within the
        stage (an untrained network whose activations explode), and the adds that overflowed
        it rounded as plain floating point would (`native` reconstruction), said once.
        """
        if not sizes:
            return False
        over = grid.outgrown(sizes).to(self.headroom.device)
        most = SIGNIFICAND_BITS[grid.step.dtype] - MIN_BITS
        if self._holds():
            self._outgrown = _read_later(over.any())
            self._give_room(over, most)  # channels at `most` stay there (clamped)
            self._mark_held()  # what it widened is checked when the read comes back
            return False
        if not bool(over.any()):
            if not grid.empty:
                self._mark_held()
            return False
        room = over & (self.headroom < most)
        if not bool(room.any()):
            if not getattr(self, "_warned", False):
                self._warned = True
                warnings.warn(
                    f"revify: the coupled stream of a reversible stage grew over "
                    f"2^{most}x its input's magnitude within the stage, beyond "
                    f"what its fixed-point grid holds; those adds rounded as in floating point, "
                    f"so that step's reconstruction was not exact (as with reconstruction="
                    f"'native'). Activations that explode like this are typical of an untrained "
                    f"network in eval mode.", RuntimeWarning, stacklevel=4)
            return False
        self._give_room(room, most)
        return True

    def _give_room(self, room: torch.Tensor, most: int) -> None:
        """WIDEN_BITS more headroom for the channels in `room`, at most `most`, in place."""
        self.headroom.add_(room, alpha=WIDEN_BITS).clamp_max_(most)

    def _holds(self) -> bool:
        held = self._held
        return held is not None and held[0] is self.headroom and \
            held[1] == self.headroom._version

    def _mark_held(self) -> None:
        self._held = (self.headroom, self.headroom._version)

    def _settle(self) -> None:
        """Read the last steady-state check if it is ready (never waiting for it)."""
        pending = self._outgrown
        if pending is None or not pending.ready():
            return
        self._outgrown = None
        if pending.value():
            self._held = None
            warnings.warn("revify: the coupled stream of a reversible stage outgrew its "
                          "fixed-point grid in a training step, so that step's reconstruction "
                          "rounded as floating point would (as with reconstruction='native'); "
                          "the grid is widened and checked again from this step on.",
                          RuntimeWarning, stacklevel=5)

    def _attempts(self, x):
        """Run the forward until the grid holds: yields (grid, context for the attempt).

        A repeated attempt draws the random masks of the first and leaves the BatchNorm
        statistics as the first one updated them.
        """
        self._settle()
        rng = capture_rng(x.device) if self.training and self.random else None
        first = True
        while True:
            grid = self.grid_for(x)
            if not first:
                restore_rng(rng, x.device)
            context = frozen_buffers(self) if not first else nullcontext()
            yield grid, context
            first = False

    # ------------------------------------------------------------------ plain autograd
    def couple(self, x, anchors: dict | None = None, record: bool = False) -> Coupled:
        """Every block with plain autograd (the reference of the reversible backward).

        `record` keeps the stream at the stage entry and `anchors`, if given, receives it at
        every anchored block input, as the reversible forward keeps it (for `inverse`).
        """
        for grid, context in self._attempts(x):
            with context:
                coupled, sizes = self._couple_once(x, grid, anchors, record)
            if not self.widen(grid, sizes):
                return coupled

    def _couple_once(self, x, grid: Grid | None, anchors: dict | None, record: bool):
        # Without a backward to come (inference) nothing needs rebuilding: no overflow check.
        check = grid is not None and (torch.is_grad_enabled() or record) and \
            _data_dependent_ok(x)
        dtype, dim, fmt = x.dtype, self.dim, layout(x)
        sdt = stream_dtype(dtype, grid is not None)
        halves = x.chunk(2, dim)
        if grid is None:
            values = [None, None]
            h = [t.contiguous(memory_format=fmt) for t in halves]  # as the branches see them
        else:  # snapping makes new tensors, dense in the halves' own layout: no copy first
            snapped = [_Snap.apply(t.to(sdt), grid, k) for k, t in enumerate(halves)]
            values = [s.detach() for s in snapped] if sdt != dtype else [None, None]
            h = [s.to(dtype) for s in snapped] if sdt != dtype else snapped
        value = lambda k: (values[k] if values[k] is not None else h[k]).detach()
        stream = lambda: torch.cat([value(0), value(1)], dim)
        entry = stream() if record else None
        sizes = ([], [])
        for i, block in enumerate(self.blocks):
            if anchors is not None and self.anchored(i):
                anchors[i] = stream()
            for k, branch in block.branches:
                f = branch(_branch_input(h[1 - k], dtype, fmt))
                h[k], values[k] = _plain_add(h[k], values[k], f, grid, k)
                if check:
                    sizes[k].append(magnitude(value(k), grid.dims))
        output = torch.cat(h, dim)
        exit = output.detach() if values[0] is None else stream()
        # as Grid.outgrown reads them: both halves' magnitudes (here the largest over the stage;
        # a half no branch added to keeps its entry's)
        most = [torch.stack([torch.stack(s or [magnitude(value(k), grid.dims)]).amax(0)
                             for k, s in enumerate(sizes)])] if check else []
        return Coupled(output, exit, entry, grid), most

    def inverse(self, coupled: Coupled, anchors: dict | None = None) -> torch.Tensor:
        """The stage input (as its blocks saw it) rebuilt from `coupled.stream` by running the
        blocks backwards, restarting from `anchors` (see `couple`) where the backward would."""
        anchors, grid = anchors or {}, coupled.grid
        dtype, fmt = coupled.output.dtype, layout(coupled.stream)
        y = list(coupled.stream.chunk(2, self.dim))
        for i in reversed(range(len(self.blocks))):
            for k, branch in reversed(self.blocks[i].branches):
                value = branch(_branch_input(y[1 - k], dtype, fmt))
                y[k] = y[k] - (grid.snap(value, k) if grid is not None else value)
            if i in anchors:
                y = list(anchors[i].to(y[0].dtype).chunk(2, self.dim))
        return torch.cat(y, self.dim)


def _plain_add(h, v, f, grid, half):
    """One coupling add with autograd: native, on the grid, or on a float32 grid beside 16-bit
    activations (h the activation-dtype value carrying the gradient, v the exact value)."""
    if grid is None:
        return h + f, None
    if v is None:
        return h + _Snap.apply(f, grid, half), None
    return _ExactAdd.apply(h, v, f, grid, half)


# Under torch.compile the reversible stage runs eagerly between compiled graphs: its backward
# rebuilds activations from a stage output the compiled graph must not plan around, and dynamo
# cannot trace the RNG capture. One graph break per stage, on purpose.
@torch.compiler.disable
def _run_reversible(stage, x):
    """The stage as a chain of autograd nodes: `_Enter` runs every block (no autograd) and
    `_Exit` returns the output; between them one `_Branch` node per F and per G stands for that
    branch in the graph, holding its parameters. The engine runs their backwards in reverse,
    one branch at a time, and accumulates each branch's parameter gradients as soon as its node
    returns them: the backward holds one branch's gradients at a time, not the stage's (with
    `.grad` already allocated, as under gradient accumulation or DDP's buckets, a single stage
    node would hold every gradient of the stage twice at its end)."""
    branches = branch_params(stage)  # here: dynamo must not trace the slots' lookups
    if not x.requires_grad and not any(p.requires_grad for block in branches
                                       for params in block for p in params):
        return stage.couple(x).output  # nothing to backpropagate
    run = _Run(stage, x.dtype)
    a = list(_Enter.apply(run, x))
    for i, block in enumerate(branches):
        for k, params in enumerate(block):  # F adds to half 0, G to half 1
            a[k] = _Branch.apply(run, i, k, a[k], a[1 - k], *params)
    return _Exit.apply(run, *a)


_branch_slots: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def branch_params(stage: ReversibleStage) -> list[list[list]]:
    """Per block, the parameters of F and of G (if any), read through their slots
    (revify.runtime.modes.Slots: no module walk each step). When they are other objects than
    last time (moved with overwrite, loaded with assign=True, sharded) a module sharded inside
    the stage is refused."""
    cached = _branch_slots.get(stage)
    if cached is None:
        cached = _branch_slots[stage] = [[slots(branch) for _, branch in b.branches]
                                         for b in stage.blocks], [None]
    branch_slots, last = cached
    params = [[s.parameters() for s in block] for block in branch_slots]
    flat = [p for block in params for ps in block for p in ps]
    if last[0] is None or len(flat) != len(last[0]) or \
            not all(map(operator.is_, flat, [ref() for ref in last[0]])):
        _refuse_fsdp_inside(stage)
        last[0] = [weakref.ref(p) for p in flat]  # weak: replaced parameters are freed
    return params


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


def layout(x: torch.Tensor) -> torch.memory_format:
    """The memory format a stage keeps its halves and branch inputs in: channels_last where the
    stage input is stored so (a GPU's NHWC convolutions and norms then run without layout
    conversions), else contiguous."""
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    return (torch.channels_last if channels_last and not x.is_contiguous()
            else torch.contiguous_format)


def _branch_input(half: torch.Tensor, dtype: torch.dtype, fmt: torch.memory_format) -> torch.Tensor:
    """A stream half as F or G sees it: in the activation dtype and dense in the stage's layout
    in every path (forward, recompute, plain autograd), so kernels such as BatchNorm's take the
    same path and round alike. The stream's own halves already are: then this is the half."""
    return half.to(dtype).contiguous(memory_format=fmt)


def _own_halves(t: torch.Tensor, dim: int, fmt: torch.memory_format) -> list[torch.Tensor]:
    """The two halves of `t` as fresh dense tensors (in `fmt`) the stage may update in place."""
    return [h.clone(memory_format=fmt) for h in t.chunk(2, dim)]


def paired(t: torch.Tensor, dim: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The two halves of `t` (split along `dim`) stacked on a new leading dim, in `dtype`: a
    fresh tensor the stage updates in place, whose halves `pair[0]`, `pair[1]` are dense in
    `t`'s layout (channels_last stays channels_last, and so does the stage output)."""
    pair = torch.stack(t.chunk(2, dim))
    return pair if dtype is None else pair.to(dtype)


def _recompute(fn, stream, dtype, fmt, grad_out, params, rng, autocast, device, rebuild,
               tape=None):
    """Run fn on a stream value once with autograd, hand its value to `rebuild` (which rebuilds
    the other stream half from it) and backpropagate grad_out through it.

    Returns the gradients with respect to fn's input and to `params`. Only the recomputation
    re-enters the forward's autocast state; the backward through it runs outside autocast, as
    `loss.backward()` does. When fn's last op does not read its own output in the backward (a
    norm, a conv, an add), `rebuild` may use the value as scratch. Either way the backward
    starts from a stand-in (`Seed`), so nothing but fn's own backward keeps the value alive.
    """
    with torch.enable_grad(), replay_rng(rng, device), replay_autocast(autocast), rerunning(), \
            replaying(tape) if tape is not None else NOTHING:
        inp = _branch_input(stream, dtype, fmt).detach().requires_grad_(True)
        out = fn(inp)
        seed = Seed.apply(out, grad_out.to(out.dtype))
    scratch = _output_unread(out, stream)
    rebuild(out.detach() if scratch else _scratch(out.detach(), stream), scratch)
    del out
    grads = grads_of(seed, [inp, *params])
    d_inp = grads[0] if grads[0] is not None else torch.zeros_like(inp)
    return d_inp, grads[1:]


def _output_unread(out: torch.Tensor, branch_input: torch.Tensor) -> bool:
    """Whether `out` is a tensor of its own that no backward reads: its op (one of torch's own
    nodes) keeps no `_saved_result`, and it is neither a view nor the branch input."""
    node = out.grad_fn
    return (node is not None and out._base is None and not _shares(out, branch_input)
            and not isinstance(node, torch.autograd.function.BackwardCFunction)
            and not hasattr(type(node), "_saved_result"))


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors share memory (the same storage; fake tensors too)."""
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


def _scratch(value: torch.Tensor, branch_input: torch.Tensor) -> torch.Tensor:
    """A branch output the stage may overwrite: a copy if it shares memory with the stream
    (an identity branch, a view of its input)."""
    return value.clone() if _shares(value, branch_input) else value


class _Run:
    """One forward of a reversible stage, shared by the nodes of its chain (`_run_reversible`).

    The forward keeps the stage output (a detached alias, so the backward can drop it as soon
    as the stream is rebuilt; in-place changes to it are still caught, by its version counter)
    and per branch the RNG state and tape its rerun needs. The backward rebuilds the stream in
    a pair of tensors of its own, updated in place: their halves become each block's input in
    turn."""

    def __init__(self, stage: ReversibleStage, dtype):
        self.stage, self.dtype = stage, dtype
        self.first = None  # (block, half) of the first branch node in the autograd graph

    def forward(self, x):
        self.autocast = capture_autocast(x.device)
        stage = self.stage
        for grid, context in stage._attempts(x):
            with context:
                pair, sizes = _forward_once(self, stage, x, grid)
            if not stage.widen(grid, sizes):
                break
        self.grid, self.pair = grid, pair

    def output(self) -> torch.Tensor:
        pair = self.pair
        hi = torch.cat([pair[0], pair[1]], self.stage.dim).to(self.dtype)
        # On a float32 (or float64) grid the output is the stream itself; beside 16-bit
        # activations the float32 stream is kept too (6 bytes a value, as a float32 stream).
        self.state = [hi.detach(), None if pair.dtype == self.dtype else pair]
        self.pair, self.version = None, hi._version
        return hi

    def start_backward(self) -> None:
        if self.state is None:
            raise RuntimeError("revify: a reversible stage's backward ran twice; the stage output "
                               "it rebuilds from is released after the first backward. Run the "
                               "forward again, or run the step under revify.plain_autograd() "
                               "(plain autograd) to backpropagate through one graph twice.")
        hi, pair = self.state
        self.state = None
        if hi._version != self.version:
            raise RuntimeError("revify: the output of a reversible stage was modified in place "
                               "before the backward; the stage rebuilds its activations from it.")
        # Halves with version counters of their own (views of one pair share the pair's): the
        # backward through one branch's rerun saves its input half while the other is rebuilt.
        # Beside 16-bit activations the forward's float32 pair serves: a branch's input is then
        # a converted copy.
        self.stream = pair.unbind(0) if pair is not None else \
            _own_halves(hi, self.stage.dim, self.fmt)
        # Buffers a rerun would change (all but BatchNorm statistics: revify.runtime.modes.Slots)
        # are put back after the chain's last branch (one snapshot a stage, not one a branch).
        self.frozen = frozen_buffers(self.stage, switch=False).__enter__()

    def backprop(self, i: int, k: int, grad_out, params, trainable) -> tuple:
        """Block i's branch k (0: F, 1: G, its parameters `params`) rerun on the stream half it
        reads, its value taken off the other half (rebuilding that half's input: x2 from G(y1),
        x1 from F(x2)), and grad_out backpropagated through it: the gradients of its input and
        of its parameters (None where `trainable` says none is wanted)."""
        stage, stream, grid = self.stage, self.stream, self.grid
        branch = stage.blocks[i].g if k else stage.blocks[i].f
        params = [p for p, t in zip(params, trainable) if t]
        rebuild = lambda value, scratch: _accumulate(stream[k], value, grid, k, -1, scratch)
        rng, self.rng[i][k] = self.rng[i][k], None
        tape, self.tapes[i][k] = self.tapes[i][k], None
        d_inp, d_params = _recompute(branch, stream[1 - k], self.dtype, self.fmt, grad_out,
                                     params, rng, self.autocast, stream[0].device, rebuild, tape)
        if k == 0 and i in self.anchors:  # drop the drift: restart from the anchor
            for half, anchor in zip(stream, self.anchors.pop(i).unbind(0)):
                half.copy_(anchor)
        if (i, k) == self.first:  # the chain's last backward: the stream is the stage input
            self.frozen.__exit__(None, None, None)
            self.stream = self.rng = self.anchors = self.tapes = self.grid = self.frozen = None
        d_params = iter(d_params)
        return d_inp, [next(d_params) if t else None for t in trainable]


def _token(like: torch.Tensor) -> torch.Tensor:
    """What flows between the chain's nodes in the forward: a view of a stream half's shape and
    dtype (the gradient flowing back is the real one; the values are never read), made without
    allocating or launching anything."""
    return like.view_as(like)


class _Enter(torch.autograd.Function):
    """Runs the whole stage (no autograd); its backward joins the halves' gradients."""

    @staticmethod
    def forward(ctx, run: _Run, x):
        ctx.dim = run.stage.dim
        run.forward(x)
        return tuple(x.chunk(2, ctx.dim))

    @staticmethod
    @once_differentiable
    def backward(ctx, dx1, dx2):
        return None, torch.cat([dx1, dx2], ctx.dim)


class _Branch(torch.autograd.Function):
    """Block `index`'s F (half 0: y1 = x1 + F(x2)) or G (half 1: y2 = x2 + G(y1)) in the graph:
    the forward computed it already; the backward reruns it, rebuilds `mine`'s input and
    returns the branch's parameter gradients."""

    @staticmethod
    def forward(ctx, run: _Run, index: int, half: int, mine, other, *params):
        ctx.run, ctx.at, ctx.params = run, (index, half), params
        if run.first is None and any(ctx.needs_input_grad):
            run.first = ctx.at
        return _token(mine)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        d_other, d_params = ctx.run.backprop(*ctx.at, grad, ctx.params, ctx.needs_input_grad[5:])
        ctx.run = ctx.params = None
        return (None, None, None, grad, d_other, *d_params)


class _Exit(torch.autograd.Function):
    """Returns the stage output; its backward starts the rebuild from it."""

    @staticmethod
    def forward(ctx, run: _Run, a1, a2):
        ctx.run = run
        return run.output()

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: the rebuilt backward is not differentiable
            raise RuntimeError(
                "revify: a reversible stage's backward cannot be differentiated again "
                "(create_graph=True: double backward, gradient penalties); run that step under "
                "revify.plain_autograd(), which computes the same function with plain autograd.")
        ctx.run.start_backward()
        return (None, *dy.chunk(2, ctx.run.stage.dim))


def _accumulate(stream, value, grid, half, sign=1, scratch=True):
    """stream += sign * value in place, snapped onto the grid when exact (the forward adds a
    branch's value, the backward takes it off again)."""
    if grid is None:
        stream.add_(value, alpha=sign)
    else:
        grid.add_snapped(stream, value, half, sign, scratch)


def _forward_once(run: _Run, stage: ReversibleStage, x, grid: Grid | None):
    """The stage's blocks without autograd, the stream updated in place; returns it (a pair,
    `paired`) and the magnitudes it reached, per block, for `widen` (empty: nothing to
    check)."""
    dtype, device, fmt = x.dtype, x.device, layout(x)
    run.rng, run.anchors, run.tapes, run.fmt = [], {}, [], fmt
    pair = paired(x, stage.dim, stream_dtype(dtype, grid is not None))
    if grid is not None:
        grid.snap_pair(pair)
    stream = pair.unbind(0)
    check = grid is not None and _data_dependent_ok(x)
    sizes = []
    for i, block in enumerate(stage.blocks):
        if stage.anchored(i):
            run.anchors[i] = pair.clone()
        rngs, tapes = [], []
        for k, branch in block.branches:
            rngs.append(capture_rng(device) if block.training and block.random[k] else None)
            tapes.append(Tape() if stage.schedule.kept else None)
            with recording(tapes[-1]) if stage.schedule.kept else NOTHING:
                f = _scratch(branch(_branch_input(stream[1 - k], dtype, fmt)), stream[1 - k])
            _accumulate(stream[k], f, grid, k)
        if check:
            sizes.append(magnitude(pair, grid.pair_dims))
        run.rng.append(rngs)
        run.tapes.append(tapes)
    return pair, sizes
