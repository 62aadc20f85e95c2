"""Projected training steps: one step run on fake tensors, every storage counted, nothing allocated.

torch's FakeTensorMode dispatches every op with its real shapes and dtypes and allocates no
data; `ProjectionTracker` (a revify.memory.measure.LiveTensorTracker) counts each storage at the
bytes it stands for, from birth to death, and the FLOPs of every op. `project` is the one engine:
revify.plan.schedule prices its choices with it, revify.analyze reports strategies with it, and
`project_peak` is its plainest use. A batch of 1024 at 224x224 projects in seconds.

Fake tensors rather than the meta device: a reversible stage records the autocast state of its
input's device, and torch has no autocast state for "meta"; fake tensors keep their device.
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass
from typing import Hashable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from revify.graph.hooks import recomputed_weights
from revify.memory.measure import LiveTensorTracker, prepare_grads


class ProjectionTracker(LiveTensorTracker):
    """A LiveTensorTracker for projected steps (fake or meta tensors, counted at the bytes they
    stand for) that also counts the FLOPs of every op, by FlopCounterMode's formulas, and
    attributes births and FLOPs to `label`, whatever the step says is running.

    It also tells the gradients in flight apart: the births the backward adds into one of
    `grads` (storages of `.grad` that exist before the step), so a step with gradients allocated
    also gives the peak of its activations alone (what grows with the batch; the gradients in
    flight are a parameter's size whatever the batch)."""

    def __init__(self):
        super().__init__(count_meta=True)
        self.total_flops = 0
        self.label: Hashable = None
        self.born_in: dict[int, Hashable] = {}     # birth id -> label
        self.flops: dict[Hashable, int] = defaultdict(int)
        self.grads: set[int] = set()                # storage addresses of `.grad`
        self.in_flight: set[int] = set()            # births added into them

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.add_.Tensor and args[0].untyped_storage()._cdata in self.grads:
            self.in_flight.add(self.birth(args[1]))  # AccumulateGrad: `.grad += new`
        out = super().__torch_dispatch__(func, types, args, kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = formula(*args, **(kwargs or {}), out_val=out)
            self.total_flops += flops
            self.flops[self.label] += flops
        return out

    def _track(self, t: torch.Tensor) -> None:
        birth = len(self.events)
        super()._track(t)
        if len(self.events) > birth:
            self.born_in[birth] = self.label

    def birth(self, t: torch.Tensor) -> int | None:
        """The birth id of `t`'s storage (None: not born while tracking)."""
        return self.live.get(t.untyped_storage()._cdata, (None,))[0]

    def here(self) -> tuple[int, int]:
        """Where the step is: (events so far, FLOPs so far)."""
        return len(self.events), self.total_flops

    def held_by_label(self) -> dict[Hashable, int]:
        held: dict[Hashable, int] = defaultdict(int)
        for birth, nbytes in self.live.values():
            if birth is not None:
                held[self.born_in[birth]] += nbytes
        return dict(held)


# ----------------------------------------------------------------------------- fake models
def fake_copy(model: nn.Module, mode, device=None, dtype=None) -> nn.Module:
    """`model` in training mode with fake parameters and buffers (of `mode`, a FakeTensorMode;
    floating ones in `dtype`, all on `device`; None: as they are): nothing is allocated.

    deepcopy's memo swaps each tensor for its fake twin, so tied weights stay tied and no real
    weight is copied.
    """
    memo = {}
    with mode:
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(fake_like(p, device, dtype), p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = fake_like(b, device, dtype)
        for w in recomputed_weights(model):  # hook-set weights (weight_norm's): nor these
            memo[id(w)] = fake_like(w, device, dtype)
    return copy.deepcopy(model, memo).train()


def fake_like(t: torch.Tensor, device=None, dtype=None) -> torch.Tensor:
    """An empty tensor shaped like `t` (in the active mode: fake under a FakeTensorMode), on
    `device` and, if floating, in `dtype` (None: as `t` is)."""
    floating = dtype is not None and t.is_floating_point()
    return torch.empty_strided(t.shape, t.stride(), device=device or t.device,
                               dtype=dtype if floating else t.dtype)


def fake_inputs(inputs: tuple) -> list:
    """Inputs shaped like `inputs` (tensors made fake in the active mode, the rest as given)."""
    return [fake_like(t) if isinstance(t, torch.Tensor) else t for t in inputs]


@dataclass
class FakeModel:
    """A module with fake parameters and buffers and the FakeTensorMode they belong to."""
    module: nn.Module
    mode: FakeTensorMode


def fake_model(model: nn.Module, device=None, dtype=None) -> FakeModel:
    """`model` copied onto fake tensors (see fake_copy), in a mode of its own."""
    mode = FakeTensorMode()
    return FakeModel(fake_copy(model, mode, device, dtype), mode)


# ----------------------------------------------------------------------------- results
@dataclass
class Stretches:
    """A projected step cut into its units' stretches of time (units: graph nodes run one
    after another, each on the one before's output)."""
    inner: list[int]   # per unit: bytes born in its forward (its output aside) and alive when
                       # the backward begins
    out: list[int]     # per unit: its output's bytes if alive when the backward begins, else 0
    size: list[int]    # per unit: its output's bytes
    saves_output: list[bool]  # per unit: whether its own ops save its output for the backward
    saves_input: list[bool]   # per unit: whether its own ops save its input
    flops: list[int]   # per unit: FLOPs of its forward and backward stretches
    peaks: list[int]   # per unit: the most bytes live during its forward or its backward
    peak: int          # the step's
    activation_peaks: list[int]  # the same without the gradients in flight (ProjectionTracker)
    activation_peak: int

    def held(self, k: int) -> int:
        """What unit k keeps between forward and backward in this projection."""
        return self.inner[k] + self.out[k]


@dataclass
class Labelled:
    """A projected step's bytes and FLOPs by the label of the code that ran them."""
    held: dict[Hashable, int]          # label -> bytes its code created, alive when the
                                       # backward begins (None: unlabelled code, the inputs)
    rerun_flops: dict[Hashable, int]   # label -> FLOPs its code ran again during the backward
    shapes: dict[Hashable, tuple]      # label -> its last node's output shape, batch left out,
                                       # in the order the labels last ran


@dataclass
class Projection:
    """One projected training step. Bytes are what the step allocates (parameters, gradients
    allocated before it and uncounted inputs aside)."""
    peak: int               # the most bytes live at once
    peak_activations: int   # the same, the parameter gradients left out: those alive at the
                            # end (grads="fresh"), those in flight to `.grad` ("accumulate")
    held: int               # bytes live when the backward begins: what the forward leaves it
    flops: int              # forward and backward, recomputation included
    grad_bytes: int         # the parameter gradients after the step
    timeline: list[int]     # bytes live after every allocation and release, in order
    units: Stretches | None = None   # with `units=`
    labels: Labelled | None = None   # with `labels=`


# ----------------------------------------------------------------------------- the engine
LOSSES = ("dense", "cross_entropy")


def project(fake: FakeModel, inputs: tuple, grads: str = "fresh", *, loss: str = "dense",
            count_inputs: bool = False, units: list[str] | None = None,
            labels: dict[str, Hashable] | None = None,
            label_modules: list[tuple[nn.Module, Hashable]] = ()) -> Projection:
    """One training step of `fake` on inputs shaped like `inputs`, its parameter gradients in
    the regime `grads` (revify.memory.measure.GRAD_REGIMES).

    loss: "dense": the backward starts from a dense gradient of every output that needs one
        (what a loss gives, without its own bytes); "cross_entropy": from F.cross_entropy of
        the output against class targets made with the inputs.
    count_inputs: whether the inputs (and targets) are the step's own bytes, as a device holds
        them, or were there before.
    units: node names of `fake.module`, a GraphModule, whose stretches to cut (Stretches).
    labels: node name -> label of the GraphModule's code, for bytes and FLOPs by label
        (Labelled); label_modules: (module, label) whose calls run under that label, also when
        the backward reruns them.
    With units or labels the graph runs node by node (an fx.Interpreter), else as a call.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss}': choose {' or '.join(LOSSES)}")
    tracker = ProjectionTracker()
    interpreter = None
    if units is not None or labels is not None:
        interpreter = _Interpreter(fake.module, tracker, units or [], labels or {})
    handles = _label_hooks(tracker, label_modules)
    try:
        start, held, forward_flops, held_by_label = _step(fake, inputs, grads, loss, count_inputs,
                                                          interpreter, tracker)
    finally:
        for handle in handles:
            handle.remove()
    kept = [p.grad for p in fake.module.parameters() if p.grad is not None]
    timeline = _timeline(tracker.events)
    bare = _timeline(tracker.events, skip=tracker.in_flight) if tracker.in_flight else timeline
    return Projection(
        peak=tracker.peak, held=held,
        peak_activations=max(bare, default=0) if grads == "accumulate"
        else tracker.peak_without(kept),
        flops=tracker.total_flops, grad_bytes=sum(g.untyped_storage().nbytes() for g in kept),
        timeline=timeline,
        units=None if units is None else _cut(tracker, interpreter, start, timeline, bare),
        labels=None if labels is None else Labelled(
            held_by_label, {k: v - forward_flops.get(k, 0) for k, v in tracker.flops.items()
                            if k is not None}, interpreter.shapes))


def _step(fake: FakeModel, inputs: tuple, grads: str, loss: str, count_inputs: bool,
          interpreter: fx.Interpreter | None, tracker: ProjectionTracker):
    """Run the step; returns where the backward began (events and FLOPs so far), the bytes
    live then, and the FLOPs and bytes held by label then."""
    with fake.mode:
        prepare_grads(fake.module, grads)
        tracker.grads = {p.grad.untyped_storage()._cdata for p in fake.module.parameters()
                         if p.grad is not None}
        before = None if count_inputs else _make_inputs(inputs, loss)
        with tracker:
            args, target = before or _make_inputs(inputs, loss)
            del before
            out = interpreter.run(*args) if interpreter else fake.module(*args)
            if interpreter:
                interpreter.env.clear()  # else the output lives as long as the interpreter
            if loss == "cross_entropy":
                roots = [F.cross_entropy(out, target)]
            else:
                roots = [o for o in tree_leaves(out)
                         if isinstance(o, torch.Tensor) and o.requires_grad]
            del out  # what the backward needs, the roots keep
            start, held = tracker.here(), tracker.current
            forward_flops, held_by_label = dict(tracker.flops), tracker.held_by_label()
            torch.autograd.backward(roots, None if loss == "cross_entropy"
                                    else [torch.empty_like(o) for o in roots])
            del roots
    return start, held, forward_flops, held_by_label


def _make_inputs(inputs: tuple, loss: str) -> tuple[list, torch.Tensor | None]:
    """Fake inputs and, for a classifying loss, targets of class 0 for the first one's batch."""
    args = fake_inputs(inputs)
    if loss != "cross_entropy":
        return args, None
    return args, torch.zeros(args[0].shape[0], dtype=torch.long, device=args[0].device)


def _label_hooks(tracker: ProjectionTracker, label_modules) -> list:
    """Hooks that run each module's calls under its label. They fire again when the backward
    reruns a module, so the FLOPs counted under a label after the forward are its rerun.
    Pre-hooks push the label and post-hooks restore the previous one, also when a checkpoint
    stops its recomputation early by raising."""
    previous = []

    def enter(label):
        def hook(*_):
            previous.append(tracker.label)
            tracker.label = label
        return hook

    def leave(*_):
        tracker.label = previous.pop()

    handles = []
    for module, label in label_modules:
        handles.append(module.register_forward_pre_hook(enter(label)))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


def _timeline(events: list[tuple[int, int]], skip=frozenset()) -> list[int]:
    """Bytes live after every event, the births in `skip` left out (their events count 0)."""
    current, out = 0, []
    for birth, delta in events:
        if birth not in skip:
            current += delta
        out.append(current)
    return out


class _Mark(torch.autograd.Function):
    """The identity on a unit's output; its backward runs just before the unit's backward."""

    @staticmethod
    def forward(ctx, x, at_backward):
        ctx.at_backward = at_backward
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.at_backward()
        return grad, None


class _Interpreter(fx.Interpreter):
    """Runs a graph telling the tracker the label of each node of `labels` while it runs, and
    noting where each of `units` begins its forward and its backward, its output's birth and
    what its own ops save."""

    def __init__(self, gm: fx.GraphModule, tracker: ProjectionTracker, units: list[str],
                 labels: dict[str, Hashable]):
        super().__init__(gm)
        self.tracker, self.labels = tracker, labels
        self.units = {name: k for k, name in enumerate(units)}
        self.fwd = [(0, 0)] * len(units)   # (event index, FLOPs so far) per unit
        self.bwd = [(0, 0)] * len(units)
        self.births: list[int | None] = [None] * len(units)  # the birth of each unit's output
        self.saved: list[set] = [set() for _ in units]  # births of what each unit's ops save
        self.shapes: dict[Hashable, tuple] = {}

    def run_node(self, node: fx.Node):
        label = self.labels.get(node.name)
        self.tracker.label = label
        k = self.units.get(node.name)
        result = super().run_node(node) if k is None else self._run_unit(node, k)
        self.tracker.label = None
        if label is not None and isinstance(result, torch.Tensor):
            self.shapes.pop(label, None)  # reinserted: the order is the labels' last runs
            self.shapes[label] = tuple(result.shape[1:])
        return result

    def _run_unit(self, node: fx.Node, k: int):
        self.fwd[k] = self.tracker.here()
        # What autograd saves in the unit's own ops (a checkpoint's inside stays unseen: it
        # saves through hooks of its own).
        def save(t: torch.Tensor) -> torch.Tensor:
            self.saved[k].add(self.tracker.birth(t))
            return t
        with torch.autograd.graph.saved_tensors_hooks(save, lambda t: t):
            result = super().run_node(node)
        if isinstance(result, torch.Tensor):
            self.births[k] = self.tracker.birth(result)
            if result.requires_grad:
                result = _Mark.apply(result, lambda: self.bwd.__setitem__(k, self.tracker.here()))
        return result


def _cut(tracker: ProjectionTracker, marked: _Interpreter, start: tuple[int, int],
         timeline: list[int], bare: list[int]) -> Stretches:
    """The step's timeline (and `bare`, the same without the gradients in flight) cut into each
    unit's forward and backward stretches.

    Unit k's forward runs from its start to the next unit's (the last one's to the start of
    the backward); its backward from its mark to the previous unit's (the last one's from the
    start of the backward, the loss's gradient included; the first one's to the end).
    """
    fwd, bwd, births, saved = marked.fwd, marked.bwd, marked.births, marked.saved
    events, n = tracker.events, len(fwd)
    end = tracker.here()
    forward = [(fwd[k], fwd[k + 1] if k + 1 < n else start) for k in range(n)]
    backward = [(bwd[k] if k + 1 < n else start, bwd[k - 1] if k else end) for k in range(n)]
    died = {birth for birth, delta in events[:start[0]] if delta < 0}
    size = [events[b][1] if b is not None else 0 for b in births]
    kept = [size[k] if births[k] is not None and births[k] not in died else 0 for k in range(n)]
    inner = [sum(delta for birth, delta in events[a[0]:b[0]] if delta > 0 and birth not in died
                 and birth != births[k])
             for k, (a, b) in enumerate(forward)]
    flops = [(fb[1] - fa[1]) + (bb[1] - ba[1]) for (fa, fb), (ba, bb) in zip(forward, backward)]

    def peaks(timeline: list[int]) -> list[int]:
        timeline = [0] + timeline  # timeline[i]: bytes live after i events
        return [max(max(timeline[fa[0]:fb[0] + 1]), max(timeline[ba[0]:bb[0] + 1]))
                for (fa, fb), (ba, bb) in zip(forward, backward)]

    saves_output = [births[k] is not None and births[k] in saved[k] for k in range(n)]
    saves_input = [k > 0 and births[k - 1] is not None and births[k - 1] in saved[k]
                   for k in range(n)]
    return Stretches(inner, kept, size, saves_output, saves_input, flops, peaks(timeline),
                     max(timeline, default=0), peaks(bare), max(bare, default=0))


def project_peak(model: nn.Module, example: torch.Tensor | tuple, grads: str = "fresh") -> int:
    """The peak bytes of one training step of `model` on an input shaped like `example` (or
    inputs, a tuple), projected on fake tensors (nothing is allocated): "fresh" all but
    parameter gradients, "accumulate" all but the gradients that exist before the step (see
    GRAD_REGIMES). The
    input is not counted (as in revify.memory.measure.measure_step); the backward starts from a
    dense output gradient, as revify.plan.schedule's projections do."""
    inputs = example if isinstance(example, tuple) else (example,)
    step = project(fake_model(model), inputs, grads)
    return step.peak if grads == "accumulate" else step.peak_activations
