"""Residual networks beyond torchvision's: timm's ResNet family and user-written nets.

One representative of each timm family (small inputs) against exact autograd, a few against
float64 finite differences, and the resize rules checked layer by layer. The full list of models
is `scripts/coverage.py` (docs/coverage.md), not part of the tests.
"""
import copy
import warnings

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from conftest import (assert_directional_derivatives, grads_match_plain_autograd, smoothed,
                      step_grads, worst_rel_err)
from torch import nn

import revify
from revify.plan.resize import RESIZERS, resizer_for
from revify.verify import unzero_init

# family -> (model, reversible blocks expected at least)
FAMILIES = {
    "resnet (deep stem, avg-down)": ("resnet18d", 4),
    "seresnet (squeeze-excite)": ("seresnet18", 4),
    "ecaresnet (ECA: 1-d conv over channels)": ("ecaresnet26t", 4),
    "skresnet (selective kernel)": ("skresnet18", 4),
    "resnetblur (anti-aliased downsampling)": ("resnetblur18", 4),
    "gcresnet (global context, ByobNet)": ("gcresnet33ts", 4),
    "resnetv2 (pre-activation, BatchNormAct2d)": ("resnetv2_50", 4),
    "resnet_gn (GroupNormAct)": ("resnet50_gn", 4),
}
# The 50-layer families are built with two blocks a stage (the first projects its shortcut):
# their block kinds at half the cost.
SMALLER = {"resnetv2_50": {"layers": (2, 2, 2, 2)}, "resnet50_gn": {"layers": (2, 2, 2, 2)}}


def _create(name, **kwargs):
    """timm's `name` with 5 classes, its branches computing (unzero_init), as SMALLER builds it."""
    return unzero_init(timm.create_model(name, num_classes=5, **SMALLER.get(name, {}), **kwargs))


def _revify(name, size=32, **kwargs):
    torch.manual_seed(0)
    model = _create(name, **kwargs)
    return model, revify.transform(model, input_size=(3, size, size))


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_family_converts_and_matches_exact_autograd(family):
    name, at_least = FAMILIES[family]
    _, rev = _revify(name)
    reversible = sum(b.action == "reversible" for b in rev.revify_plan.blocks)
    assert reversible >= at_least, str(rev.revify_plan)
    assert abs(rev.revify_plan.params_after / rev.revify_plan.params_before - 1) <= 0.1
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    err, where = worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))
    assert err <= 1e-5, (err, where)


# Finite differences are a reference only where the original model meets its own. At 32x32 the
# last stage is 1x1 and BatchNorm normalises over 2 values: with every branch computing (see
# `unzero_init`) the original ecaresnet26t misses its own finite differences by 10% there. At
# 64x64 (2x2 in the last stage) originals and revified models meet them (ecaresnet26t: to 1e-11
# at eps 1e-5); skresnet18 misses them by 8e-5 even smoothed, so it is checked against exact
# autograd only; so is gcresnet33ts, whose global-context branch is timm's modules rebuilt at
# half width (no autograd Function of revify's own for finite differences to catch).
@pytest.mark.parametrize("name,size", [("ecaresnet26t", 64), ("seresnet18", 64),
                                       ("resnetv2_50", 64)])
def test_timm_gradients_match_float64_finite_differences(name, size):
    torch.manual_seed(0)
    model = smoothed(_create(name))
    rev = revify.transform(model, input_size=(3, size, size)).double().train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, requires_grad=True)
    assert_directional_derivatives(rev, x, torch.tensor([1, 3]))


def _timm_rule_examples():
    import timm.layers as L
    from timm.layers import evo_norm, filter_response_norm
    from timm.layers.selective_kernel import SelectiveKernel
    return [L.EcaModule(64), L.CecaModule(64), L.GlobalContext(64, fuse_add=True),
            L.GlobalContext(64), SelectiveKernel(64, 64),
            filter_response_norm.FilterResponseNormTlu2d(64),
            filter_response_norm.FilterResponseNormAct2d(64), evo_norm.EvoNorm2dS0(64),
            evo_norm.EvoNorm2dS1(64), evo_norm.EvoNorm2dB0(64)]


@pytest.mark.parametrize("module", _timm_rule_examples(), ids=lambda m: type(m).__name__)
def test_timm_rules_rebuild_the_same_layer_and_a_half_width_one(module):
    """Rebuilt at its own width with its own weights, a layer computes what it did: the rule
    keeps every setting. Rebuilt at half width, it runs on half the channels."""
    rule = resizer_for(module)
    assert rule is not None and type(module) in RESIZERS
    torch.manual_seed(0)
    x = torch.randn(2, 64, 8, 8)
    same = rule.build(module, 64, 64, None)
    same.load_state_dict(module.state_dict())
    with torch.no_grad():
        assert torch.equal(same.eval()(x), module.eval()(x))
        assert rule.build(module, 32, 32, None).eval()(x[:, :32]).shape == (2, 32, 8, 8)


def test_subclass_with_extra_tensors_is_not_resized_by_its_base_rule():
    from timm.layers import ScaledStdConv2d, StdConv2d
    assert resizer_for(StdConv2d(8, 8, 3)) is RESIZERS[nn.Conv2d]  # same tensors as Conv2d
    assert resizer_for(ScaledStdConv2d(8, 8, 3)) is None           # its `gain` has no rule
    conv = nn.Conv2d(8, 8, 3)
    conv.register_buffer("scale", torch.ones(8))
    assert resizer_for(conv) is None  # Conv2d's own class, a tensor its rule does not rebuild

    class Attention(timm.layers.Attention):  # a subclass of a rule that lists no tensors
        pass
    assert resizer_for(Attention(16, num_heads=2)) is None


@pytest.mark.parametrize("make", [lambda c: nn.GroupNorm(32, c),
                                  lambda c: timm.layers.evo_norm.EvoNorm2dS0(c, groups=32)],
                         ids=["GroupNorm", "EvoNorm2dS0"])
def test_group_norms_keep_their_group_count_where_it_divides_else_their_group_width(make):
    from revify.plan.resize import rebuild
    groups = lambda m: getattr(m, "num_groups", getattr(m, "groups", None))
    assert groups(rebuild(make(256), 128, 128)) == 32  # 32 groups of 4
    assert groups(rebuild(make(64), 48, 48)) == 24     # 24 groups of 2, as in the original
    assert resizer_for(make(64)).divisor(make(64)) == 2
    assert resizer_for(nn.GroupNorm(1, 64)).divisor(nn.GroupNorm(1, 64)) == 1
    assert rebuild(nn.GroupNorm(1, 64), 40, 40).num_groups == 1  # over all channels, any width


def test_group_norm_bottlenecks_match_parameters_and_the_plan_prints_the_widths_built():
    """GroupNorm(32) over a 64-channel bottleneck: keeping 32 groups would allow its half-width
    branch 32 or 64 channels (-50% or +50% of the stage's parameters)."""
    model = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, [3, 1, 1, 1],
                                             norm_layer=lambda c: nn.GroupNorm(32, c))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # width="match" warns where it misses
        rev = revify.transform(model, input_size=(3, 32, 32), couple="each")
    plan = rev.revify_plan
    stage = plan.stages[0]
    assert stage.blocks == ["layer1.1", "layer1.2"]
    assert abs(stage.params_after / stage.params_before - 1) <= 0.10
    f = rev.get_submodule("net.layer1_1__layer1_2.blocks.0.f")
    norm, out = f.bn1, f.bn3
    assert norm.num_channels % 32 and norm.num_channels == 2 * norm.num_groups  # groups of 2
    assert (out.num_channels, out.num_groups) == (128, 32)  # the half stream: the count kept
    assert stage.width == norm.num_channels / 64  # the width built, not the multiplier searched
    assert f"{stage.width:.3g}" in str(plan).split("reversible stage")[1].splitlines()[2]


def test_features_only_backbone_keeps_every_tap():
    model, rev = _revify("resnet50", features_only=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = rev.eval()(x), model.eval()(x)
    assert [t.shape for t in got] == [t.shape for t in want]
    assert sum(b.action == "reversible" for b in rev.revify_plan.blocks) == 12
    rev.train()
    loss = lambda out: sum((t * t).mean() for t in out)  # every tap feeds the loss
    ref_model = copy.deepcopy(rev)
    loss(rev(x)).backward()
    with revify.plain_autograd():
        loss(ref_model(x)).backward()
    for (n, p), q in zip(rev.named_parameters(), ref_model.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), n


# ----------------------------------------------------------------------------- user-written nets
class PreActBlock(nn.Module):
    """x + conv(relu(bn(conv(relu(bn(x)))))): no activation after the add."""

    def __init__(self, c):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        return x + self.conv2(F.relu(self.bn2(out)))


class IdentityShortcutBlock(nn.Module):
    """An explicit `nn.Identity` shortcut, LayerNorm over channels-last, dropout in the branch."""

    def __init__(self, c):
        super().__init__()
        self.shortcut = nn.Identity()
        self.norm = nn.GroupNorm(1, c)  # LayerNorm over (C, H, W), as users write it for CNNs
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return torch.add(self.shortcut(x), self.drop(self.conv(F.gelu(self.norm(x)))))


class PadShortcutBlock(nn.Module):
    """CIFAR ResNet's option-A downsampling: the shortcut subsamples and zero-pads channels."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(2 * c)
        self.c = c

    def forward(self, x):
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.c // 2, self.c // 2))
        out = self.bn(self.conv(x))
        out += shortcut
        return F.relu(out)


class UserNet(nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pre = nn.Sequential(PreActBlock(c), PreActBlock(c), PreActBlock(c))
        self.down = PadShortcutBlock(c)
        self.ident = nn.Sequential(IdentityShortcutBlock(2 * c), IdentityShortcutBlock(2 * c))
        self.fc = nn.Linear(2 * c, 5)

    def forward(self, x):
        x = self.ident(self.down(self.pre(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def test_user_written_blocks_convert_and_match_autograd_and_finite_differences():
    torch.manual_seed(0)
    rev = revify.transform(UserNet(), input_size=(3, 16, 16))
    actions = {b.name: b.action for b in rev.revify_plan.blocks}
    assert actions == {"pre.0": "reversible", "pre.1": "reversible", "pre.2": "reversible",
                       "down": "checkpointed", "ident.0": "reversible", "ident.1": "reversible"}
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    err, where = worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))
    assert err <= 1e-5, (err, where)
    rev = revify.transform(UserNet(), input_size=(3, 16, 16)).double().train()
    for m in rev.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0  # finite differences need a deterministic function
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, requires_grad=True)
    assert_directional_derivatives(rev, x, y)


# ----------------------------------------------------------------------------- ConvNeXt
# Channels-last inside the branch (permute, LayerNorm, Linear), a bare per-channel layer scale
# and stochastic depth: torchvision's CNBlock and timm's ConvNeXtBlock (conv_mlp: LayerNorm2d and
# 1x1 convs, the default of convnext_atto; or permutes around LayerNorm and Linear).
def _convnext(source, **kwargs):
    torch.manual_seed(0)
    if source == "torchvision":  # convnext_tiny's blocks, narrower and two a stage
        from torchvision.models.convnext import CNBlockConfig, ConvNeXt
        stages = [CNBlockConfig(c, 2 * c if c < 256 else None, 2) for c in (32, 64, 128, 256)]
        return ConvNeXt(stages, num_classes=5, **kwargs)
    return timm.create_model("convnext_atto", num_classes=5, conv_mlp=source == "timm-conv-mlp",
                             **kwargs)


CONVNEXTS = {"torchvision": 8, "timm-conv-mlp": 12, "timm-linear": 12}  # blocks, none downsample


@pytest.mark.parametrize("source", CONVNEXTS)
def test_convnext_converts_and_matches_exact_autograd(source):
    # stochastic depth on: the backward must replay its per-sample masks
    drop = {"stochastic_depth_prob": 0.2} if source == "torchvision" else {"drop_path_rate": 0.2}
    rev = revify.transform(_convnext(source, **drop), input_size=(3, 32, 32))
    plan = rev.revify_plan
    assert [b.action for b in plan.blocks] == ["reversible"] * CONVNEXTS[source], str(plan)
    assert abs(plan.params_after / plan.params_before - 1) <= 0.1
    assert plan.params_after == sum(p.numel() for p in rev.parameters())
    got, x, y = grads_match_plain_autograd(rev)
    assert worst_rel_err(step_grads(rev, x, y, exact=True, seed=7), got)[0] > 1e-3  # masks drawn


def test_convnext_layer_scale_is_carried_per_half():
    """The layer scale becomes a parameter of each half-width branch, F from the first half of
    the original's channels and G from the second (one block's two halves with couple="each";
    with "pairs" block 1 is G of the first coupling)."""
    model = _convnext("timm-linear", ls_init_value=1.0)
    with torch.no_grad():
        gamma = model.stages[0].blocks[1].gamma
        gamma.copy_(torch.arange(gamma.numel()))
    half = gamma.numel() // 2
    for couple, index in [("each", 1), ("pairs", 0)]:
        rev = revify.transform(model, input_size=(3, 32, 32), couple=couple)
        coupling = next(m for m in rev.modules()
                        if isinstance(m, revify.runtime.reversible.ReversibleStage)).blocks[index]
        if couple == "each":
            assert torch.equal(coupling.f.gamma, gamma[:half])
        assert torch.equal(coupling.g.gamma, gamma[half:])


# Layer scale 1 (not 1e-6) so the branches count; stochastic depth off: the original models meet
# finite differences themselves with these settings at 32x32 (checked).
@pytest.mark.parametrize("source,kwargs", [
    ("timm-conv-mlp", {"ls_init_value": 1.0}), ("timm-linear", {"ls_init_value": 1.0}),
    ("torchvision", {"layer_scale": 1.0, "stochastic_depth_prob": 0.0})])
def test_convnext_gradients_match_float64_finite_differences(source, kwargs):
    rev = revify.transform(smoothed(_convnext(source, **kwargs)), input_size=(3, 32, 32))
    rev = rev.double().train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    assert_directional_derivatives(rev, x, torch.tensor([1, 3]))


class ChannelsLastBlock(nn.Module):
    """x + branch(x) with the branch in channels-last; `mistake` breaks it one of two ways."""

    def __init__(self, c, mistake=None):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.Linear(c, c)
        self.norm = nn.LayerNorm(c)
        self.mistake = mistake

    def forward(self, x):
        h = self.conv(x)
        if self.mistake == "norm_over_width":  # LayerNorm(c) over W (== c) of a NCHW tensor
            return x + self.norm(h)
        h = self.fc(self.norm(h.permute(0, 2, 3, 1)))
        return x + (h if self.mistake == "stays_last" else h.permute(0, 3, 1, 2))


@pytest.mark.parametrize("mistake,reason", [
    (None, None),
    ("stays_last", "branch cannot be halved: the branch returns its channels on dim 3, not 1"),
    ("norm_over_width", "works on another dimension than channels (dim 1)"),
])
def test_channels_must_be_where_each_layer_works_and_come_back(mistake, reason):
    torch.manual_seed(0)
    model = nn.Sequential(ChannelsLastBlock(8, mistake), ChannelsLastBlock(8, mistake))
    x = torch.randn(2, 8, 8, 8)  # C == H == W: shapes alone cannot tell the dims apart
    rev = revify.transform(model, x)
    for block in rev.revify_plan.blocks:
        if reason is None:
            assert block.action == "reversible", block.reason
        else:
            assert block.action == "checkpointed" and reason in block.reason, block.reason
    if reason is not None:
        torch.testing.assert_close(rev(x), model(x))


# ----------------------------------------------------------------------------- beyond ResNets
@pytest.mark.parametrize("name,reversible", [("mobilenet_v2", 10), ("regnet_y_400mf", 12),
                                             ("efficientnet_b0", 9)])
def test_inverted_residuals_and_regnet_blocks_convert(name, reversible):
    import torchvision
    torch.manual_seed(0)
    rev = revify.transform(torchvision.models.get_model(name, num_classes=5),
                           input_size=(3, 32, 32))
    assert sum(b.action == "reversible" for b in rev.revify_plan.blocks) == reversible
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 5, (2,))
    err, where = worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))
    assert err <= 1e-5, (err, where)


# ----------------------------------------------------------------------------- transformers
# Pre-norm ViT blocks: tokens (B, N, C) carry their channels last, and a transformer block's two
# residual adds (x + attn(norm(x)), x + mlp(norm(x))) become one coupling, F = attention and
# G = MLP, as in Reversible ViT.
def _vit(depth=3, **kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=depth,
                             num_classes=5, **kwargs)


def _stage(rev):
    return next(m for m in rev.modules()
                if isinstance(m, revify.runtime.reversible.ReversibleStage))


def test_vit_couples_attention_with_mlp_on_the_channel_dim():
    from timm.layers import Attention
    rev = revify.transform(_vit(), input_size=(3, 32, 32))
    plan = rev.revify_plan
    assert [b.name for b in plan.blocks] == [f"blocks.{k}{s}" for k in range(3) for s in ("", "#2")]
    (stage,) = plan.stages
    assert (stage.dim, stage.channels) == (2, 192)
    assert stage.couplings == [(f"blocks.{k}", f"blocks.{k}#2") for k in range(3)]
    coupling = _stage(rev).blocks[0]
    attn = coupling.f.attn
    assert (isinstance(attn, Attention) and attn.qkv.in_features == 96
            and attn.proj.out_features == 96)
    assert attn.head_dim == 64 and attn.num_heads * 64 == attn.attn_dim  # heads keep their size
    assert not any(isinstance(m, Attention) for m in coupling.g.modules())
    assert abs(plan.params_after / plan.params_before - 1) <= 0.02
    assert plan.params_after == sum(p.numel() for p in rev.parameters())
    assert "reversible (F)" in str(plan) and "reversible (G)" in str(plan)


def test_vit_with_layer_scale_drop_path_and_dropout_matches_exact_autograd():
    rev = revify.transform(_vit(init_values=0.5, drop_path_rate=0.2, attn_drop_rate=0.1,
                                proj_drop_rate=0.1), input_size=(3, 32, 32))
    got, x, y = grads_match_plain_autograd(rev)
    assert worst_rel_err(step_grads(rev, x, y, exact=True, seed=7), got)[0] > 1e-3  # masks drawn


def test_vit_gradients_match_float64_finite_differences():
    rev = revify.transform(_vit(depth=2, init_values=1.0), input_size=(3, 32, 32)).double().train()
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    assert_directional_derivatives(rev, x, torch.tensor([1, 3]))


def test_attention_rule_rebuilds_the_same_layer_and_one_with_fewer_heads():
    from timm.layers import Attention
    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    x = torch.randn(2, 5, 64)
    same = revify.plan.resize.rebuild(attn, 64, 64, inner=64)
    same.load_state_dict(attn.state_dict())
    with torch.no_grad():
        assert torch.equal(same.eval()(x), attn(x))
        narrow = revify.plan.resize.rebuild(attn, 32, 32, inner=32).eval()
        assert narrow.num_heads == 2 and narrow(x[..., :32]).shape == (2, 5, 32)


def test_torchvision_vit_mlp_blocks_convert_and_attention_says_why_not():
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                 num_heads=4, hidden_dim=64, mlp_dim=128,
                                                 num_classes=5)
    plan = revify.transform(model, input_size=(3, 32, 32)).revify_plan
    assert [b.action for b in plan.blocks] == ["checkpointed", "reversible"] * 2
    assert "no resize rule for MultiheadAttention" in plan.blocks[0].reason
