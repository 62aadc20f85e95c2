"""A registry that says how to rebuild a module at other channel counts.

Each entry answers four questions about a module type: does its output follow its input's
channels (a BatchNorm does, a Conv mixes them), what channel counts must be multiples of (the
groups of a grouped conv), which dimension of its input holds the channels it works on (1 for a
Conv, the last for a Linear), and how to build a fresh copy at new counts. Modules holding no
parameters or buffers (activations, pooling, dropout) work at any width and need no entry; a
module type that holds parameters and has no entry makes its block non-reversible.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.nn.utils.parametrize import is_parametrized
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops import StochasticDepth


@dataclass(frozen=True)
class Resizer:
    ties: Callable[[nn.Module], bool]              # output channels follow input channels
    divisor: Callable[[nn.Module], int]            # channel counts must be multiples of this
    build: Callable[[nn.Module, int, int, torch.device | None], nn.Module]
    channels_in: Callable[[nn.Module], int | None]  # the input channels the module expects
    tensors: frozenset[str] | None = None          # what build re-creates; None: all (a new module)
    axis: int = 1                                  # the input dim it works on (-1: the last)
    # A layer with a width of its own inside (attention's heads x head_dim): (width, divisor).
    # It is scaled like a branch's internal widths and handed to build as `inner=`.
    inner: Callable[[nn.Module], tuple[int, int]] | None = None
    # The groups of a grouped layer whose group count build may change (handed as `groups=`,
    # to keep the group width instead; see revify.graph.channels); 1: none.
    groups: Callable[[nn.Module], int] = lambda m: 1


RESIZERS: dict[type, Resizer] = {}


def register_resizer(*types: type, ties, channels_in, divisor=lambda m: 1, tensors=None, axis=1,
                     inner=None, groups=lambda m: 1):
    """Register `build(module, cin, cout, device)` for `types` (and, with care, their subclasses).

    tensors: the parameter and buffer names `build` re-creates. A subclass holding any other
    tensor (timm's ScaledStdConv2d and its `gain`) is not resized by the base class's rule: its
    block stays checkpointed rather than getting a tensor of the wrong shape.
    """
    def wrap(build):
        for t in types:
            RESIZERS[t] = Resizer(ties=ties, divisor=divisor, build=build, channels_in=channels_in,
                                  tensors=None if tensors is None else frozenset(tensors),
                                  axis=axis, inner=inner, groups=groups)
        return build
    return wrap


def holds_state(m: nn.Module) -> bool:
    return (any(True for _ in m.parameters(recurse=True))
            or any(True for _ in m.buffers(recurse=True)))


_STATELESS = Resizer(ties=lambda m: True, divisor=lambda m: 1,
                     build=lambda m, cin, cout, device: _stateless_copy(m),
                     channels_in=lambda m: None)


def resizer_for(module: nn.Module) -> Resizer | None:
    """The registered resizer (looked up along the class hierarchy), or None if unknown or if
    the module holds tensors its rule does not rebuild: a subclass's own (timm's ScaledStdConv2d
    `gain`), or those a hook-based `spectral_norm`/`weight_norm` put on a plain layer
    (`weight_orig`, `weight_u`, `weight_g`, ...), from which its hook recomputes `weight` at
    the old shape. (The `parametrizations` forms make a subclass of their own: no rule either.)"""
    for cls in type(module).__mro__:
        if cls in RESIZERS:
            rule = RESIZERS[cls]
            if cls is type(module) and rule.tensors is None:
                return rule
            return rule if rule.tensors is not None and _own_tensors(module) <= rule.tensors \
                else None
    return None if holds_state(module) else _STATELESS


def reparametrized(module: nn.Module) -> str:
    """What makes a layer of a registered type unresizable, said in a plan's reason: its
    parametrization, or the tensors its rule does not rebuild (empty if neither)."""
    if is_parametrized(module):
        return f" (its {', '.join(module.parametrizations)} parametrized)"
    rule = RESIZERS.get(type(module))
    extra = sorted(_own_tensors(module) - rule.tensors) if rule and rule.tensors else []
    return f" (its {', '.join(extra)}, as a hook-based weight_norm or spectral_norm adds)" \
        if extra else ""


def _own_tensors(module: nn.Module) -> set[str]:
    return {n.rpartition(".")[2] for n, _ in [*module.named_parameters(), *module.named_buffers()]}


def rebuild(module: nn.Module, cin: int, cout: int, device=None, inner: int | None = None,
            groups: int | None = None) -> nn.Module:
    """`module` rebuilt by its rule at `cin` -> `cout` channels (and its own width `inner`, in
    `groups` groups where the rule's group count may change)."""
    rule = resizer_for(module)
    extra = {} if rule.inner is None else {"inner": inner}
    if groups is not None:
        extra["groups"] = groups
    return rule.build(module, cin, cout, device, **extra)


def _stateless_copy(m: nn.Module) -> nn.Module:
    return copy.deepcopy(m)


def shallow_copy(m: nn.Module) -> nn.Module:
    """`copy.copy(m)` with its own containers: tensors, submodules and hooks in dicts (and the
    non-persistent buffer set) of its own, so a hook registered on F's copy of a layer does not
    fire on G's, nor a tensor replaced in one show in the other."""
    new = copy.copy(m)
    for name, value in vars(m).items():
        if isinstance(value, (dict, set)):
            new.__dict__[name] = copy.copy(value)
    return new


def clone_with(m: nn.Module, attrs: dict, shapes: dict[str, tuple], device=None) -> nn.Module:
    """A fresh copy of `m` with attributes replaced and tensors re-created at new shapes.

    Copying (rather than calling the constructor) keeps subclasses (timm's StdConv2d, Conv2dSame)
    and their extra attributes intact; `reset_parameters` then initialises the new tensors.
    """
    new = shallow_copy(m)
    new.__dict__.update(attrs)
    for name, shape in shapes.items():
        old = getattr(m, name)
        if old is None:
            continue
        fresh = torch.empty(shape, dtype=old.dtype, device=device or old.device)
        if name in m._parameters:
            new._parameters[name] = nn.Parameter(fresh, requires_grad=old.requires_grad)
        else:
            new._buffers[name] = fresh
    for name, buf in m._buffers.items():  # scalar buffers (num_batches_tracked) are copied as is
        if name not in shapes and buf is not None:
            new._buffers[name] = buf.detach().clone().to(device or buf.device)
    new.reset_parameters()
    return new


def _is_depthwise(m: nn.Module) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _grouped(m: nn.Module) -> int:
    return 1 if _is_depthwise(m) else m.groups


@register_resizer(nn.Conv1d, nn.Conv2d, nn.Conv3d, ties=_is_depthwise,
                  channels_in=lambda m: m.in_channels, divisor=_grouped, groups=_grouped,
                  tensors={"weight", "bias"})
def _resize_conv(m, cin, cout, device=None, groups=None):
    groups = cin if _is_depthwise(m) else groups or m.groups
    k = tuple(m.weight.shape[2:])
    return clone_with(m, dict(in_channels=cin, out_channels=cout, groups=groups),
                      dict(weight=(cout, cin // groups, *k), bias=(cout,)), device)


@register_resizer(nn.Linear, ties=lambda m: False, channels_in=lambda m: m.in_features,
                  tensors={"weight", "bias"}, axis=-1)
def _resize_linear(m, cin, cout, device=None):
    return clone_with(m, dict(in_features=cin, out_features=cout),
                      dict(weight=(cout, cin), bias=(cout,)), device)


@register_resizer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                  nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, ties=lambda m: True,
                  channels_in=lambda m: m.num_features,
                  tensors={"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})
def _resize_batchnorm(m, cin, cout, device=None):
    per_channel = dict(weight=(cin,), bias=(cin,), running_mean=(cin,), running_var=(cin,))
    return clone_with(m, dict(num_features=cin), per_channel, device)


def group_divisor(channels: int, groups: int) -> int:
    """What a layer normalising `channels` in `groups` groups needs its channels to be multiples
    of at another width: its group width (`regrouped` then finds a group count). One group
    normalises over all channels at any width. Keeping the group count alone would round a
    narrow layer coarsely: GroupNorm(32, 64) could be rebuilt at 32 or 64 channels, not 48."""
    return 1 if groups == 1 else channels // groups


def regrouped(channels: int, old_channels: int, groups: int) -> int:
    """The group count of such a layer rebuilt at `channels`: its own where it divides them
    (GroupNorm(32, 256) at 128: 32 groups of 4), else as many as keep its group width
    (GroupNorm(32, 64) at 48: 24 groups of 2)."""
    return groups if channels % groups == 0 else channels // (old_channels // groups)


@register_resizer(nn.GroupNorm, ties=lambda m: True, channels_in=lambda m: m.num_channels,
                  divisor=lambda m: group_divisor(m.num_channels, m.num_groups),
                  tensors={"weight", "bias"})
def _resize_groupnorm(m, cin, cout, device=None):
    return clone_with(m, dict(num_channels=cin,
                              num_groups=regrouped(cin, m.num_channels, m.num_groups)),
                      dict(weight=(cin,), bias=(cin,)), device)


def layer_norm_channels(m) -> int:
    # Normalising over several dims (C, H, W) mixes channels with positions: -1 matches no tensor,
    # so such a LayerNorm keeps its block checkpointed.
    return m.normalized_shape[0] if len(m.normalized_shape) == 1 else -1


def resize_layer_norm(m, cin, cout, device=None):
    return clone_with(m, dict(normalized_shape=(cin,)), dict(weight=(cin,), bias=(cin,)), device)


register_resizer(nn.LayerNorm, ties=lambda m: True, channels_in=layer_norm_channels,
                 tensors={"weight", "bias"}, axis=-1)(resize_layer_norm)
# torchvision's ConvNeXt LayerNorm2d permutes NCHW to normalise over dim 1 inside its forward.
register_resizer(LayerNorm2d, ties=lambda m: True, channels_in=layer_norm_channels,
                 tensors={"weight", "bias"}, axis=1)(resize_layer_norm)


def copy_unchanged(m, cin, cout, device=None):
    return copy.deepcopy(m)


# Per-sample stochastic depth holds no tensors but decides on `self.training` in its forward:
# traced into (in eval mode) it would vanish from training. A rule keeps it a leaf layer.
register_resizer(StochasticDepth, ties=lambda m: True, channels_in=lambda m: None)(copy_unchanged)


@register_resizer(nn.PReLU, ties=lambda m: True,
                  channels_in=lambda m: None if m.num_parameters == 1 else m.num_parameters,
                  tensors={"weight"})
def _resize_prelu(m, cin, cout, device=None):
    if m.num_parameters == 1:
        return copy.deepcopy(m)
    return clone_with(m, dict(num_parameters=cin), dict(weight=(cin,)), device)


def carry_over(new: nn.Module, old: nn.Module, in_offset: int, out_offset: int) -> int:
    """Copy the overlapping slice of `old`'s tensors into `new`; returns how many values were
    copied.

    Dim 0 of every tensor runs over output channels and dim 1 of a weight over input channels
    (per group), true of every module in the registry. The offsets pick which half of the
    original's coupled channels this copy takes (0 for F, C/2 for G).
    """
    copied = 0
    old_tensors = dict(old.named_parameters(recurse=False)) | dict(old.named_buffers(recurse=False))
    for name, t in (list(new.named_parameters(recurse=False))
                    + list(new.named_buffers(recurse=False))):
        src = old_tensors.get(name)
        if src is None or src.dim() != t.dim() or t.device.type == "meta":
            continue
        if t.dim() == 0:
            t.data.copy_(src)
            copied += t.is_floating_point()
            continue
        offsets = [out_offset] + [in_offset if d == 1 and getattr(old, "groups", 1) == 1 else 0
                                  for d in range(1, t.dim())]
        if any(o >= s for o, s in zip(offsets, src.shape)):
            continue
        lengths = [min(n, s - o) for n, s, o in zip(t.shape, src.shape, offsets)]
        dst_idx = tuple(slice(0, n) for n in lengths)
        src_idx = tuple(slice(o, o + n) for o, n in zip(offsets, lengths))
        with torch.no_grad():
            t[dst_idx] = src[src_idx].to(t.dtype)
        copied += math.prod(lengths) if t.is_floating_point() else 0
    return copied

