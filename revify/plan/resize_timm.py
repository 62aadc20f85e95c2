"""Resize rules for timm's layers that torch.fx cannot see through.

timm's attention and normalisation layers reshape along the channel axis (ECA's 1-d conv over
channels), assert on shapes or split channels into paths, so they are kept as opaque leaves and
rebuilt at the new width by their own constructor with the original's settings. Subclasses are
not covered by these rules (a subclass may add tensors): their blocks stay checkpointed.
"""
from __future__ import annotations

import copy

from torch import nn

from revify.plan.resize import (copy_unchanged, group_divisor, layer_norm_channels, rebuild,
                                regrouped, register_resizer, resize_layer_norm, shallow_copy)

try:
    import timm.layers as L
    from timm.layers import evo_norm, filter_response_norm
    from timm.layers.selective_kernel import SelectiveKernel
except ImportError:  # timm is optional for revify's own code paths
    L = None


def _scaled(channels: int, scale: float, divisor: int = 1) -> int:
    return max(divisor, round(channels * scale / divisor) * divisor)


if L is not None:
    @register_resizer(L.EcaModule, L.CecaModule, ties=lambda m: True, channels_in=lambda m: None)
    def _resize_eca(m, cin, cout, device=None):
        # The 1-d conv slides along the channel axis: its kernel fits any channel count.
        return copy.deepcopy(m).to(device) if device is not None else copy.deepcopy(m)

    @register_resizer(L.GlobalContext, ties=lambda m: True, channels_in=lambda m: None)
    def _resize_global_context(m, cin, cout, device=None):
        mlp = m.mlp_add or m.mlp_scale
        rd = _scaled(mlp.fc1.out_channels, cin / mlp.fc1.in_channels)
        return L.GlobalContext(cin, use_attn=m.conv_attn is not None,
                               fuse_add=m.mlp_add is not None, fuse_scale=m.mlp_scale is not None,
                               rd_channels=rd, device=device)

    @register_resizer(SelectiveKernel, ties=lambda m: False, channels_in=lambda m: m.in_channels,
                      divisor=lambda m: m.num_paths if m.split_input else 1)
    def _resize_selective_kernel(m, cin, cout, device=None):
        convs = [path.conv for path in m.paths]
        rd = _scaled(m.attn.fc_reduce.out_channels, cout / m.out_channels, 8)
        return SelectiveKernel(cin, cout, kernel_size=[1 + 2 * c.dilation[0] for c in convs],
                               stride=convs[0].stride[0], groups=convs[0].groups, rd_channels=rd,
                               split_input=m.split_input, device=device)

    def _per_channel(m):
        return m.weight.shape[0] if m.weight.dim() == 1 else m.weight.shape[1]

    @register_resizer(filter_response_norm.FilterResponseNormTlu2d,
                      filter_response_norm.FilterResponseNormAct2d,
                      ties=lambda m: True, channels_in=_per_channel)
    def _resize_frn(m, cin, cout, device=None):
        new = copy.deepcopy(m)
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            shape = list(t.shape)
            shape[0 if t.dim() == 1 else 1] = cin
            fresh = t.new_empty(shape, device=device or t.device)
            setattr(new, name, type(t)(fresh) if name in m._parameters else fresh)
        new.reset_parameters()
        return new

    @register_resizer(*[getattr(evo_norm, f"EvoNorm2d{v}")
                        for v in ("S0", "S0a", "S1", "S1a", "S2", "S2a")],
                      ties=lambda m: True, channels_in=_per_channel,
                      divisor=lambda m: group_divisor(_per_channel(m), m.groups))
    def _resize_evonorm_s(m, cin, cout, device=None):
        groups = regrouped(cin, _per_channel(m), m.groups)
        return type(m)(cin, groups=groups, apply_act=m.apply_act, eps=m.eps, device=device)

    @register_resizer(*[getattr(evo_norm, f"EvoNorm2d{v}") for v in ("B0", "B1", "B2")],
                      ties=lambda m: True, channels_in=_per_channel)
    def _resize_evonorm_b(m, cin, cout, device=None):
        return type(m)(cin, apply_act=m.apply_act, momentum=m.momentum, eps=m.eps, device=device)

    @register_resizer(L.Attention, ties=lambda m: False, channels_in=lambda m: m.qkv.in_features,
                      axis=-1, inner=lambda m: (m.attn_dim, m.head_dim))
    def _resize_attention(m, cin, cout, device=None, inner=None):
        # Heads keep their size; a narrower or wider attention has fewer or more of them.
        inner = inner or m.attn_dim
        new = shallow_copy(m)
        new._parameters, new._buffers = {}, {}
        new.num_heads, new.attn_dim = inner // m.head_dim, inner
        new.qkv = rebuild(m.qkv, cin, 3 * inner, device)
        new.proj = rebuild(m.proj, inner, cout, device)
        if m.gate is not None:
            new.gate = rebuild(m.gate, cin, inner, device)
        if not isinstance(m.norm, nn.Identity):
            new.norm = rebuild(m.norm, inner, inner, device)
        for name in ("q_norm", "k_norm"):  # over one head: unchanged
            norm = copy.deepcopy(getattr(m, name))
            setattr(new, name, norm if device is None else norm.to(device))
        return new

    # DropPath, like torchvision's StochasticDepth, must stay a leaf to drop samples in training.
    register_resizer(L.DropPath, ties=lambda m: True, channels_in=lambda m: None)(copy_unchanged)

    # timm's LayerNorm2d permutes NCHW to normalise over dim 1; its LayerNorm is nn.LayerNorm's.
    register_resizer(L.LayerNorm2d, ties=lambda m: True, channels_in=layer_norm_channels,
                     tensors={"weight", "bias"}, axis=1)(resize_layer_norm)
    if L.LayerNorm is not nn.LayerNorm:
        register_resizer(L.LayerNorm, ties=lambda m: True, channels_in=layer_norm_channels,
                         tensors={"weight", "bias"}, axis=-1)(resize_layer_norm)
