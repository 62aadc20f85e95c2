"""Leaner checkpointed units: what the recompute of a non-invertible unit keeps.

A checkpointed unit (the stem, a downsampling block, the head) stores its inputs and reruns
itself in the backward, and that rerun saves everything autograd saves: every conv and norm
input. At the peak of a revified ResNet step it is this rerun that is alive (the first
downsampling block, at full resolution). The plan cuts it three ways, none of which changes a
value:

- nested: a layer (a conv or linear with the norm after it, plus an activation of the unit's
  input that only such layers read) whose recompute costs at most `FLOPS_PER_BYTE` FLOPs per
  byte it would otherwise keep is checkpointed inside the unit: its inner tensors are rebuilt
  once more when its own backward runs instead of being held through the unit's whole
  backward. A bottleneck's expansion 1x1 convs (64 -> 256 channels) qualify; 3x3 convs and the
  wide layers of deep stages, whose recompute is dear and whose tensors are small, never do.
- in place: a residual add whose operand is a fresh conv or norm output that nothing else reads
  adds into it (tracing turns the original's `out += identity` into a new tensor).
- masked ReLU: a ReLU whose output nothing after it keeps (the unit output, fed to a reversible
  stage, which stores nothing of its input) keeps a one-byte mask for its backward instead.

The plan also names the unit's dearest layers, whose outputs the forward may keep for the rerun
(revify.runtime.keep): the opposite trade, taken where revify.plan.schedule finds the memory for it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from revify.runtime.keep import KEEP_FLOPS_PER_BYTE, KEPT_LAYERS, Kept, fan_in
from revify.runtime.modes import discarding_enabled
from revify.graph.ops import is_activation, is_add

FLOPS_PER_BYTE = 96
HOT_FRACTION = 0.5     # a unit is hot if its largest tensor is over half the step's largest
LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
# Modules whose backward never reads their own output: adding into it in place is safe.
OUTPUT_UNREAD = LAYERS + NORMS
RELUS = (nn.ReLU,)


@dataclass
class LeanPlan:
    """What a checkpointed unit's recompute does differently (node names of the traced graph)."""
    nested: list[list[str]] = field(default_factory=list)  # each a layer checkpointed inside
    layers: list[str] = field(default_factory=list)        # the module of each nested layer
    in_place: dict[str, str] = field(default_factory=dict)  # add -> the operand it adds into
    masked: list[str] = field(default_factory=list)        # ReLUs that keep a mask
    early: list[str] = field(default_factory=list)         # nodes run first (a short shortcut)
    kept: list[str] = field(default_factory=list)          # layers whose outputs the forward
    kept_layers: list[str] = field(default_factory=list)   # may keep (revify.runtime.keep); their
                                                           # modules

    def __bool__(self) -> bool:
        return bool(self.nested or self.in_place or self.masked or self.early or self.kept)

    def describe(self) -> str:
        parts = [f"recomputes {', '.join(self.layers)} once more in its backward"] \
            if self.nested else []
        if self.kept:
            parts.append(f"keeps the output of {', '.join(self.kept_layers)} for the rerun")
        if self.in_place:
            parts.append(f"{len(self.in_place)} add{'s' if len(self.in_place) > 1 else ''} "
                         f"in place")
        if self.masked:
            parts.append(f"{len(self.masked)} ReLU{'s' if len(self.masked) > 1 else ''} keep"
                         f"{'s' if len(self.masked) == 1 else ''} a mask")
        return "; ".join(parts)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


class _Sizes:
    """Bytes and FLOPs of graph nodes, at the channel counts the rewrite will give them.

    `channels` (node name -> channel count, a reversible block's plan) scales the traced sizes
    to a branch rebuilt at half width; without it the traced sizes are the unit's own.
    """

    def __init__(self, channels: dict[str, int] | None = None, dim: int = 1):
        self.channels, self.dim = channels or {}, dim

    def scale(self, node: fx.Node) -> float:
        shape = node.meta.get("shape")
        if node.name not in self.channels or not shape or len(shape) <= self.dim:
            return 1.0
        return self.channels[node.name] / shape[self.dim]

    def nbytes(self, node: fx.Node) -> float:
        shape, dtype = node.meta.get("shape"), node.meta.get("dtype", torch.float32)
        return math.prod(shape) * dtype.itemsize * self.scale(node) if shape else 0

    def flops(self, module: nn.Module, node: fx.Node) -> float:
        """2 x multiply-adds of a conv or linear layer `node` running `module`."""
        numel = math.prod(node.meta.get("shape") or (0,)) * self.scale(node)
        source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        depthwise = not isinstance(module, nn.Linear) and module.groups == module.in_channels > 1
        scale = 1.0 if depthwise or source is None else self.scale(source)
        return 2 * numel * fan_in(module) * scale


def _norm_after(gm, node: fx.Node, members: set[str]) -> fx.Node | None:
    users = list(node.users)
    if len(users) == 1 and users[0].name in members and isinstance(_module(gm, users[0]), NORMS):
        return users[0]
    return None


def largest_tensor(nodes: list[fx.Node]) -> int:
    """The bytes of the largest tensor among `nodes` (what tells a unit's heat)."""
    return max((_Sizes().nbytes(n) for n in nodes), default=0)


def _readers(node: fx.Node, members: set[str]) -> list[fx.Node]:
    return [u for u in node.users if u.name in members]


def _pre_activation(gm, node: fx.Node, members: set[str], modules: dict) -> fx.Node | None:
    """An activation of the unit's input feeding `node` (a layer) that only layers read."""
    act = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if act is None or act.name not in members or not is_activation(act, modules):
        return None
    source = act.args[0] if act.args and isinstance(act.args[0], fx.Node) else None
    if source is None or source.name in members:  # only an activation of the unit's input
        return None
    readers = _readers(act, members)
    if len(readers) != len(act.users) or not all(isinstance(_module(gm, u), LAYERS)
                                                 for u in readers):
        return None
    return act


def _nested_layers(gm: fx.GraphModule, members: set[str], sizes: _Sizes) -> list[list[str]]:
    """The layers worth recomputing a second time (see the module docstring)."""
    nodes = [n for n in gm.graph.nodes if n.name in members]
    modules = dict(gm.named_modules())
    candidates = {}  # layer node -> (region, FLOPs, bytes kept without nesting, pre-activation)
    for node in nodes:
        module = _module(gm, node)
        norm = _norm_after(gm, node, members) if isinstance(module, LAYERS) else None
        if norm is None:  # a layer without a norm after it keeps nothing a nest would drop
            continue
        act = _pre_activation(gm, node, members, modules)
        candidates[node] = ([node.name, norm.name], sizes.flops(module, node), sizes.nbytes(node),
                            act)
    chosen = {}
    by_act: dict[fx.Node, list[fx.Node]] = {}
    for node, (_, _, _, act) in candidates.items():
        if act is not None:
            by_act.setdefault(act, []).append(node)
    for act, layers in by_act.items():  # the activation is dropped only if all its readers nest
        share = sizes.nbytes(act) / len(act.users)
        if len(layers) == len(act.users) and all(
                candidates[n][1] <= FLOPS_PER_BYTE * (candidates[n][2] + share) for n in layers):
            for n in layers:
                chosen[n] = [act.name] + candidates[n][0]
    for node, (region, flops, kept, _) in candidates.items():
        if node not in chosen and flops <= FLOPS_PER_BYTE * kept:
            chosen[node] = region
    return [chosen[n] for n in nodes if n in chosen]


def _in_place_adds(gm: fx.GraphModule, members: set[str]) -> dict[str, str]:
    out = {}
    for node in gm.graph.nodes:
        if node.name not in members or not is_add(node) or node.args[0] is node.args[1]:
            continue
        for a in node.args:
            if isinstance(_module(gm, a), OUTPUT_UNREAD) and a.name in members and \
                    len(a.users) == 1 and a.meta.get("shape") == node.meta.get("shape") and \
                    a.meta.get("dtype") == node.meta.get("dtype"):
                out[node.name] = a.name
                break
    return out


def _ancestry(node: fx.Node, members: set[str]) -> set[str]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.name in members and n.name not in seen:
            seen.add(n.name)
            todo.extend(n.all_input_nodes)
    return seen


def _short_paths_first(gm: fx.GraphModule, members: set[str]) -> list[str]:
    """The nodes of the shorter operand path of each residual add, to be run before the longer.

    The backward runs the later path first, and the gradient it leaves for the shared input
    waits, a full tensor, while the other path runs: better it waits through the short path
    (a projection shortcut) than through the main branch.
    """
    early = []
    for node in gm.graph.nodes:
        if node.name not in members or not is_add(node):
            continue
        a, b = (_ancestry(arg, members) for arg in node.args)
        short, long = sorted((a - b, b - a), key=len)
        if 0 < len(short) < len(long):
            early += [n.name for n in gm.graph.nodes if n.name in short]
    return early


def _is_relu(gm, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), RELUS)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu)
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _masked_relus(gm, members: set[str], unkept: set[str]) -> list[str]:
    """ReLUs of the unit whose every reader is outside it and keeps nothing (`unkept`)."""
    return [n.name for n in gm.graph.nodes if n.name in members and _is_relu(gm, n)
            and n.users and all(u.name in unkept for u in n.users)]


def plan_lean(gm: fx.GraphModule, nodes: list[str], unkept: set[str], hot: bool = True,
              channels: dict[str, int] | None = None, dim: int = 1, keep: bool = False) -> LeanPlan:
    """The lean recompute of the unit made of `nodes` (a checkpointed unit, or a reversible
    block's branch rebuilt at `channels`); `unkept` names the nodes outside it that read its
    outputs without keeping them (reversible stages). Layers are nested only in a `hot` unit,
    one whose tensors are among the step's largest (where the peak is reached); `keep` names
    the layers whose outputs the forward may keep."""
    members = set(nodes)
    sizes = _Sizes(channels, dim)
    nested = _nested_layers(gm, members, sizes) if hot else []
    in_place = _in_place_adds(gm, members)
    by_name = {n.name: n for n in gm.graph.nodes}
    layers = [by_name[r[-2]].target for r in nested]  # the conv or linear of each
    kept = _kept_layers(gm, members, sizes, {n for r in nested for n in r},
                        set(in_place.values())) if keep else []
    return LeanPlan(nested, layers, in_place, _masked_relus(gm, members, unkept),
                    _short_paths_first(gm, members), kept, [by_name[n].target for n in kept])


def _kept_layers(gm: fx.GraphModule, members: set[str], sizes: _Sizes, nested: set[str],
                 added_into: set[str]) -> list[str]:
    """The layers dear enough to keep the output of (revify.runtime.keep), outside the nested ones
    and with an output nothing changes in place: read only by layers and norms of the unit (not by
    an in-place op, nor by an op that may hand it on as it is, like an identity drop path,
    towards a branch output that the stream adds in place)."""
    kept = []
    for node in gm.graph.nodes:
        module = _module(gm, node)
        if node.name not in members or node.name in nested or type(module) not in KEPT_LAYERS:
            continue
        if node.name in added_into or not all(
                u.name in members and isinstance(_module(gm, u), OUTPUT_UNREAD)
                for u in node.users):
            continue
        if sizes.flops(module, node) >= KEEP_FLOPS_PER_BYTE * sizes.nbytes(node):
            kept.append(node.name)
    return kept


# ----------------------------------------------------------------------------- execution
class _MaskedReLU(torch.autograd.Function):
    """relu(x) whose backward keeps where x > 0 (one byte a value) instead of the output: the
    same values and gradients as torch.relu (a zero gradient may come out as -0.0, which equals
    0.0, and an inf or NaN gradient where x <= 0 stays NaN, where relu's would be 0: a step that
    overflows shows it, as GradScaler wants). `inplace` overwrites x, as nn.ReLU(inplace=True)
    does; `grad_in_place` zeroes the incoming gradient in place, for a ReLU whose only reader is
    a conv or linear layer, whose backward hands it a gradient of its own.

    The gradient is multiplied by the mask as uint8 (a free reinterpretation of the bool): on
    CPU that is several times faster than masked_fill with a bool mask, which dominated the cost
    of the lean recompute's masks."""

    @staticmethod
    def forward(ctx, x, inplace, grad_in_place):
        if inplace:
            ctx.mark_dirty(x)
            out = x.relu_()
        else:
            out = torch.relu(x)
        ctx.grad_in_place = grad_in_place
        # In a checkpoint's first forward the mask is dropped as soon as it is saved: an empty
        # stand-in (a checkpoint without determinism checks takes any tensor there).
        mask = torch.empty_like(out, dtype=torch.uint8) if discarding_enabled() else _positive(out)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        on, = ctx.saved_tensors
        return (grad.mul_(on) if ctx.grad_in_place else grad * on), None, None


def _positive(out: torch.Tensor) -> torch.Tensor:
    """Where out > 0, as uint8. Eager reinterprets the bool for free; under torch.compile a
    conversion, which inductor fuses into the comparison (its CUDA lowering of torch 2.11
    cannot view a bool as uint8)."""
    if torch.compiler.is_dynamo_compiling():
        return (out > 0).to(torch.uint8)
    return (out > 0).view(torch.uint8)


def masked_relu(x, inplace: bool = False, grad_in_place: bool = False):
    if isinstance(x, fx.Proxy):  # traced again (a GraphModule being unpickled): stay one node
        return x.tracer.create_proxy("call_function", masked_relu, (x, inplace, grad_in_place), {})
    if not (torch.is_grad_enabled() and x.requires_grad):  # no backward to come: no mask
        return x.relu_() if inplace else torch.relu(x)
    return _MaskedReLU.apply(x, inplace, grad_in_place)


def _add_into(a, b):
    return a.add_(b)


def _inplace(gm, node: fx.Node) -> bool:
    module = _module(gm, node)
    return bool(getattr(module, "inplace", False) or node.kwargs.get("inplace")
                or (node.op == "call_method" and node.target.endswith("_")))


def apply_lean(gm: fx.GraphModule, lean: LeanPlan, outline, wrap) -> None:
    """Execute `lean` on a checkpointed unit's own graph; `outline(gm, names, label, lean)`
    moves a nested layer into a checkpointed submodule (whose rerun does what `lean` says),
    `wrap(gm, node, wrapper)` calls a layer through a wrapper (Kept for a kept layer)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    _run_first(gm, [nodes[n] for n in lean.early])
    for name in lean.masked:
        _mask(gm, nodes[name], grad_in_place=False)
    for name, operand in lean.in_place.items():
        node = nodes[name]
        other = next(a for a in node.args if a.name != operand)
        node.op, node.target, node.args, node.kwargs = "call_function", _add_into, \
            (nodes[operand], other), {}
    for region, layer in zip(lean.nested, lean.layers):  # a nested layer's norm goes with it
        outline(gm, _own_pre_activation(gm, region), layer, None)
    nodes = {n.name: n for n in gm.graph.nodes}  # less the nested layers' nodes
    for name, layer_name in zip(lean.kept, lean.kept_layers):
        wrap(gm, nodes[name], functools.partial(Kept, layer_name=layer_name))
    gm.graph.lint()
    gm.recompile()


def _run_first(gm: fx.GraphModule, early: list[fx.Node]) -> None:
    """Move `early` (in order) to run as soon as their inputs are ready."""
    for node in early:
        inputs = node.all_input_nodes
        anchor = max(inputs, key=lambda n: _position(gm, n)) if inputs else None
        first = next(iter(gm.graph.nodes))
        target = anchor.next if anchor is not None else first
        if target is not node:
            target.prepend(node)


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    return next(i for i, n in enumerate(gm.graph.nodes) if n is node)


def _mask(gm: fx.GraphModule, node: fx.Node, grad_in_place: bool) -> None:
    node.args, node.kwargs = (node.args[0], _inplace(gm, node), grad_in_place), {}
    node.op, node.target = "call_function", masked_relu


def _own_pre_activation(gm: fx.GraphModule, region: list[str]) -> list[str]:
    """A shared pre-activation is copied into each nested layer that reads it (each recomputes
    its own), so that the unit itself no longer keeps it; a ReLU there, read by the layer
    alone, zeroes its gradient in place (the layer's backward made it)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    act, layer = nodes[region[0]], nodes[region[1]]
    if len(region) < 3:
        return region
    if len(act.users) > 1:
        with gm.graph.inserting_before(layer):
            act_copy = gm.graph.node_copy(act)
        layer.replace_input_with(act, act_copy)
        act = act_copy
    if _is_relu(gm, act):
        _mask(gm, act, grad_in_place=True)
    return [act.name] + region[1:]
