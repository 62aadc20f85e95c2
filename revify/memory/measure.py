"""Exact memory accounting: every tensor storage allocated while tracking, from birth to death.

A TorchDispatchMode sees every op's outputs; a storage is counted once (views share it) and
released when its Python object dies (PyTorch keeps one Python object per live storage). This
measures what a training step holds, independent of allocator caching, RSS or timing, and works
on any device. On CUDA, `torch.cuda.max_memory_allocated` is the figure to compare with.

Compiled code allocates its buffers below the dispatcher, out of the mode's sight:
`measure_step_profiled` reads the CPU allocator's own records instead (the profiler's memory
events), just as exact, and agrees with the tracker on eager models.

Steps projected on fake tensors, without running anything for real, are revify.memory.projection's.
"""
from __future__ import annotations

import os
import re
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int | float) -> int:
    """A memory size: '24GiB', '24GB', '512MiB', '80e9' (bytes) or a number of bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"cannot read the memory size '{text}': write e.g. 24GiB, 24GB, 512MiB "
                         f"or 80e9 (bytes)")
    size = int(float(match.group(1)) * _BYTE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise ValueError(f"the memory size must be positive, got '{text}'")
    return size


class LiveTensorTracker(TorchDispatchMode):
    """Tracks the bytes of live storages created while active.

    Storages that existed before (parameters, the input batch) are not counted. `events` keeps
    the timeline so peaks can be recomputed leaving chosen storages out (parameter gradients).
    `count_meta=True` also counts meta storages (meta-device and fake tensors) at the bytes they
    stand for: a step run on them is an exact projection that allocates nothing.
    """

    def __init__(self, count_meta: bool = False):
        super().__init__()
        self.count_meta = count_meta
        self.live: dict[int, tuple[int, int]] = {}  # storage address -> (birth id, bytes)
        self.current = 0
        self.peak = 0
        self.events: list[tuple[int, int]] = []     # (birth id, +bytes at birth / -bytes at death)
        self.marks: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tensors(args, kwargs.values()):
            self._known(t)  # storages from before (parameters, buffers): never counted
        out = func(*args, **kwargs)
        for t in _tensors((out,)):
            self._track(t)
        return out

    def _known(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.live:
            self.live[key] = (None, 0)
            weakref.finalize(storage, self._release, key)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or storage.nbytes() == 0:
            return
        if storage.device.type == "meta" and not self.count_meta:
            return
        nbytes = storage.nbytes()
        birth = len(self.events)  # addresses are reused after a free; births are unique
        self.live[key] = (birth, nbytes)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.events.append((birth, nbytes))
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        birth, nbytes = self.live.pop(key, (None, 0))
        if birth is not None:
            self.current -= nbytes
            self.events.append((birth, -nbytes))

    def mark(self, name: str) -> None:
        """Remember the bytes live now (e.g. after the forward: the activations held)."""
        self.marks[name] = self.current

    def peak_without(self, tensors) -> int:
        """The peak had the given (still live) tensors' storages never been counted."""
        keys = {t.untyped_storage()._cdata for t in tensors if t is not None}
        return _peak(self.events, skip={self.live[k][0] for k in keys if k in self.live})


def _tensors(*groups) -> list[torch.Tensor]:
    """The tensors among the values of `groups`, one level of lists and tuples in (what ops
    take and return): torch.utils._pytree.tree_leaves, without its cost on every op."""
    found = []
    for group in groups:
        for value in group:
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, (list, tuple)):
                found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


# How a step finds parameter gradients. "fresh": none (zero_grad(set_to_none=True)); each is
# born when the backward first computes it and counts from then on. "accumulate": all exist
# before the step (the second micro-batch of gradient accumulation on, zero_grad(set_to_none=
# False), DDP's gradient buckets); they are fixed memory, and what the step adds is everything
# else, gradients in flight to them included.
GRAD_REGIMES = ("fresh", "accumulate")


def check_grads(grads: str) -> None:
    if grads not in GRAD_REGIMES:
        raise ValueError(f"unknown gradient regime '{grads}': choose {' or '.join(GRAD_REGIMES)}")


def prepare_grads(model: torch.nn.Module, grads: str) -> None:
    """Put `model`'s gradients in the state regime `grads` (GRAD_REGIMES) starts a step from."""
    check_grads(grads)
    for p in model.parameters():
        if grads == "fresh":
            p.grad = None
        elif p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)


def _peak(events: list[tuple[int, int]], skip=frozenset()) -> int:
    """The peak of a (birth id, +bytes / -bytes) timeline, the births in `skip` left out."""
    current = peak = 0
    for key, delta in events:
        if key not in skip:
            current += delta
            peak = max(peak, current)
    return peak


@dataclass
class StepMemory:
    peak_bytes: int                    # everything allocated during the step: with grads="fresh"
                                       # the gradients from birth, with "accumulate" those in flight
    peak_activation_bytes: int | None  # the same without the final parameter gradients (None:
                                       # not measurable); with "accumulate": the same as peak_bytes
    activation_bytes: int              # held between forward and backward (what the backward needs)
    grad_bytes: int


def measure_step(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                 loss_fn=torch.nn.functional.cross_entropy, grads: str = "fresh") -> StepMemory:
    """The memory of one forward + backward, gradients in the regime `grads` (GRAD_REGIMES:
    "fresh" resets them first, "accumulate" allocates any missing and keeps them); the batch is
    not counted.

    CPU: exact live-tensor accounting. CUDA: the caching allocator's figures after a warm-up step
    (library workspaces are allocated once); its peak cannot leave fresh gradients out, so
    `peak_activation_bytes` is None there.
    """
    if inputs.device.type == "cuda":
        return _measure_step_cuda(model, inputs, target, loss_fn, grads)
    prepare_grads(model, grads)
    with LiveTensorTracker() as tracker:
        loss = loss_fn(model(inputs), target)
        tracker.mark("forward")
        loss.backward()
        del loss
    kept = [p.grad for p in model.parameters() if p.grad is not None]
    return StepMemory(peak_bytes=tracker.peak, peak_activation_bytes=tracker.peak_without(kept),
                      activation_bytes=tracker.marks["forward"], grad_bytes=_nbytes(kept))


def _measure_step_cuda(model, inputs, target, loss_fn, grads) -> StepMemory:
    loss_fn(model(inputs), target).backward()  # warm-up
    prepare_grads(model, grads)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = loss_fn(model(inputs), target)
    held = torch.cuda.memory_allocated() - base
    loss.backward()
    del loss
    torch.cuda.synchronize()
    kept = [p.grad for p in model.parameters() if p.grad is not None]
    peak = torch.cuda.max_memory_allocated() - base
    return StepMemory(peak_bytes=peak,
                      peak_activation_bytes=peak if grads == "accumulate" else None,
                      activation_bytes=held, grad_bytes=_nbytes(kept))


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def measure_step_profiled(model: torch.nn.Module, inputs: torch.Tensor, target: torch.Tensor,
                          loss_fn=torch.nn.functional.cross_entropy,
                          grads: str = "fresh") -> StepMemory:
    """`measure_step` from the CPU allocator's records: sees compiled kernels' buffers too.

    The profiler (profile_memory=True) reports every allocation and free of the c10 CPU
    allocator with its address. Blocks from before the step (parameters, the batch) are never
    reported allocated, so their frees are ignored; parameter gradients are the blocks still
    live at the end at the addresses of the final `p.grad` storages. A block an op allocates and
    frees before it returns (a kernel's workspace) is left out: the tracker sees tensors, not
    workspaces, and a compiled graph's extern kernels (convolutions) keep theirs just the same.
    What the profiler sees and the tracker does not: storages made without an op, such as the
    RNG states checkpointing keeps. CUDA: as `measure_step`.
    """
    if inputs.device.type == "cuda":
        return _measure_step_cuda(model, inputs, target, loss_fn, grads)
    prepare_grads(model, grads)  # gradients from before the step are never reported allocated
    # Two sessions: their boundary is the end of the forward, with no clock to compare.
    with _cpu_allocations() as forward:
        loss = loss_fn(model(inputs), target)
    with _cpu_allocations() as backward:
        loss.backward()
        del loss
    live: dict[int, tuple[int, int | None]] = {}  # address -> (birth id, op that allocated it)
    events: list[tuple[int, int]] = []            # as LiveTensorTracker.events
    workspaces, held = set(), 0
    for i, (ptr, nbytes, op) in enumerate(forward + backward):
        if nbytes > 0:
            live[ptr] = (len(events), op)
            events.append((len(events), nbytes))
        elif ptr in live:
            birth, born_in = live.pop(ptr)
            events.append((birth, nbytes))
            if op is not None and op == born_in:
                workspaces.add(birth)
        if i == len(forward) - 1:
            held = sum(delta for _, delta in events)
    kept = [p.grad for p in model.parameters() if p.grad is not None]
    ptrs = {g.untyped_storage().data_ptr() for g in kept}
    skip = workspaces | {birth for ptr, (birth, _) in live.items() if ptr in ptrs}
    return StepMemory(peak_bytes=_peak(events, workspaces),
                      peak_activation_bytes=_peak(events, skip),
                      activation_bytes=held, grad_bytes=_nbytes(kept))


_OPERATOR = re.compile(r"[A-Za-z_]\w*::[A-Za-z_]\w*$")


@contextmanager
def _cpu_allocations():
    """Yields a list that gets (address, +bytes / -bytes, op) for every CPU allocation and free,
    in order, once the block ends; op: the outermost operator call it happened in, or None.

    Operators are the events named `namespace::name` (aten::convolution_backward); the profiler
    gives the same scope to annotations around them ("autograd::engine::evaluate_function: ...",
    "## Call CompiledFxGraph ... ##"), which enclose whole backward nodes and compiled graphs.
    """
    from torch._C._profiler import RecordScope, _EventType
    from torch.profiler import ProfilerActivity, profile
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else kineto logs every start and stop
    found: list[tuple[int, int, int, int | None]] = []
    ops = iter(range(1 << 62))

    def walk(event, op):
        kind, fields = event.typed
        if kind == _EventType.Allocation and fields.device.type == "cpu":
            found.append((event.start_time_ns, fields.ptr, fields.alloc_size, op))
        if (op is None and kind == _EventType.TorchOp and fields.scope == RecordScope.FUNCTION
                and _OPERATOR.match(fields.name)):
            op = next(ops)
        for child in event.children:  # allocations sit under the op that made them
            walk(child, op)

    allocations: list[tuple[int, int, int | None]] = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        yield allocations
    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root, None)
    allocations.extend(event[1:] for event in sorted(found, key=lambda f: f[0]))
