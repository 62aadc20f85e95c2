"""Residual nets as people write them: hooks registered before `transform`, functional dropout
reading `self.training`, grouped convolutions at a fixed group width, squeeze-excitation pooled
with `F.avg_pool2d(out, out.size(2))` and other shape reads, elementwise activations."""
import pytest
import torch
import torch.nn.functional as F
from conftest import grads_match_plain_autograd, step_grads, worst_rel_err
from torch import nn

import revify
from revify.graph.blocks import find_blocks
from revify.plan.plan import Options, make_plan
from revify.graph.trace import propagate_shapes, trace
from revify.pipeline import build


def _plan(model, size=16):
    """The plan alone (no rewrite, no schedule): enough to say what converts, and cheap."""
    gm = trace(model)
    propagate_shapes(gm, (torch.randn(2, 3, size, size),))
    return make_plan(gm, find_blocks(gm), Options(couple="pairs"))


class Net(nn.Module):
    """A CIFAR-style net: stem conv1/bn1, one stage of two `block`s, a linear head."""

    def __init__(self, block, c=16, **kwargs):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.layer1 = nn.Sequential(block(c, **kwargs), block(c, **kwargs))
        self.fc = nn.Linear(c, 5)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


class BasicBlock(nn.Module):
    """A pre-activation WideResNet block, its dropout written as in the WRN code people copy."""

    def __init__(self, c, drop_rate=0.3):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.drop_rate = drop_rate

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return x + self.conv2(F.relu(self.bn2(out)))


# ----------------------------------------------------------------------------- hooks
def test_hooks_registered_before_transform_are_left_out_with_one_warning():
    torch.manual_seed(0)
    model = Net(BasicBlock, drop_rate=0.0)
    calls = {"bn1": 0, "layer1.0.conv1": 0, "layer1.1": 0}

    def count(name):
        return lambda *_: calls.__setitem__(name, calls[name] + 1)
    model.bn1.register_forward_hook(count("bn1"))
    model.layer1[0].conv1.register_forward_pre_hook(count("layer1.0.conv1"))
    # a hook on a whole block that cannot run on a proxy (it used to keep its block opaque)
    model.layer1[1].register_forward_hook(lambda m, i, out: calls.__setitem__(
        "layer1.1", calls["layer1.1"] + 1 + 0 * float(out.detach().mean())))
    with pytest.warns(UserWarning) as record:
        rev = revify.transform(model, input_size=(3, 16, 16))
    messages = [str(w.message) for w in record if "hooks on" in str(w.message)]
    assert messages == ["revify: hooks on bn1, layer1.0.conv1, layer1.1 are not carried into the "
                        "revified model (its layers are rebuilt, and rerun in the backward); "
                        "register them on the revified model's modules instead."]
    assert calls == {"bn1": 0, "layer1.0.conv1": 0, "layer1.1": 0}  # none ran in transform
    assert [b.action for b in rev.revify_plan.blocks] == ["reversible"] * 2
    assert not rev.revify_plan.opaque
    hooked = [n for n, m in rev.named_modules() if m._forward_hooks or m._forward_pre_hooks]
    assert hooked == []
    grads_match_plain_autograd(rev, 16)
    assert calls == {"bn1": 0, "layer1.0.conv1": 0, "layer1.1": 0}  # nor in the revified model
    model(torch.randn(2, 3, 16, 16))  # the caller's model keeps its hooks
    assert calls == {"bn1": 1, "layer1.0.conv1": 1, "layer1.1": 1}


def test_a_model_without_hooks_converts_without_the_warning(recwarn):
    revify.transform(Net(BasicBlock, drop_rate=0.0), input_size=(3, 16, 16))
    assert not [w for w in recwarn if "hooks on" in str(w.message)]


@pytest.mark.parametrize("norm", [nn.utils.spectral_norm, nn.utils.parametrizations.spectral_norm,
                                  nn.utils.weight_norm, nn.utils.parametrizations.weight_norm])
def test_weight_reparametrizations_stay_checkpointed_and_rerun_the_forwards_weight(norm):
    """spectral_norm and weight_norm in both forms, applied after a forward with gradients (which
    leaves the hook forms' weights non-leaf: a plain deepcopy refuses the model). No rule resizes
    them: their block stays checkpointed, the plan says why, and the checkpoint's rerun computes
    the forward's weight (a second power iteration would change it, and the gradients)."""
    torch.manual_seed(0)
    model = Net(BasicBlock, drop_rate=0.0)
    model.layer1[0].conv1 = norm(model.layer1[0].conv1)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    rev = build(model, None, Options(schedule="recompute_all"), input_size=(3, 16, 16))
    first, second = rev.revify_plan.blocks
    assert first.action == "checkpointed" and "no resize rule" in first.reason
    assert "layer1.0.conv1" in first.reason and second.action == "reversible"
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))
    got, ref = step_grads(rev.train(), x, y), step_grads(rev, x, y, exact=True)
    assert all(torch.equal(got[k], ref[k]) for k in ref), worst_rel_err(got, ref)


# ----------------------------------------------------------------------------- dropout
@pytest.fixture(scope="module")
def dropout_net():
    torch.manual_seed(0)
    model = Net(BasicBlock)
    return model, revify.transform(model, input_size=(3, 16, 16))


def test_functional_dropout_converts_as_nn_dropout(dropout_net):
    _, rev = dropout_net
    plan = rev.revify_plan
    assert [b.action for b in plan.blocks] == ["reversible"] * 2, str(plan)
    assert not plan.opaque
    drops = [m for n, m in rev.named_modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 4 and all(d.p == 0.3 for d in drops)  # F's and G's of two blocks


def test_functional_dropout_masks_replay_in_the_backward(dropout_net):
    _, rev = dropout_net
    # the reversible rerun draws the forward's masks
    got, x, y = grads_match_plain_autograd(rev, 16, seed=123)
    other = step_grads(rev, x, y, exact=True, seed=7)
    assert worst_rel_err(other, got)[0] > 1e-3  # masks really are drawn in training
    torch.manual_seed(123)
    reversible_loss = F.cross_entropy(rev(x), y)
    torch.manual_seed(123)
    with revify.plain_autograd():
        assert torch.equal(F.cross_entropy(rev(x), y), reversible_loss)


def test_functional_dropout_follows_eval_mode(dropout_net):
    model, rev = dropout_net
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        rev.eval()
        assert torch.equal(rev(x), rev(x))  # no mask drawn in eval mode
        same = build(model, None, Options(reversible=False), input_size=(3, 16, 16)).eval()
        torch.testing.assert_close(same(x), model.eval()(x))
    rev.train()


class NoisyBlock(BasicBlock):
    """Code that truly differs in training: no module form can stand for it."""

    def forward(self, x):
        out = self.conv1(F.relu(self.bn1(x)))
        if self.training:
            out = out + 0.1 * torch.randn_like(out)
        return x + self.conv2(F.relu(self.bn2(out)))


def test_a_block_that_cannot_convert_is_named_with_its_reason():
    with pytest.raises(revify.NoResidualBlocks) as error:
        revify.transform(Net(NoisyBlock), input_size=(3, 16, 16))
    message = str(error.value)
    assert "layer1.0: runs different code in training and in eval mode (in training: add, mul, " \
           "randn_like)" in message and "layer1.1: runs different code" in message


# ----------------------------------------------------------------------------- grouped convs
class XBlock(nn.Module):
    """A RegNetX block: the 3x3 conv grouped at a fixed group width; projection if it resizes."""

    def __init__(self, w_in, w_out, group_width, stride=1, groups=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(w_in, w_out, 1, bias=False), nn.BatchNorm2d(w_out)
        groups = groups or w_out // group_width
        self.conv2 = nn.Conv2d(w_out, w_out, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(w_out)
        self.conv3, self.bn3 = nn.Conv2d(w_out, w_out, 1, bias=False), nn.BatchNorm2d(w_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or w_in != w_out:
            self.shortcut = nn.Sequential(nn.Conv2d(w_in, w_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(w_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class GroupedNet(nn.Module):
    def __init__(self, widths=(24, 56), group_width=8, depth=3, groups=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        stages, w_in = [], 16
        for w in widths:
            blocks = [XBlock(w_in if k == 0 else w, w, group_width, 2 if k == 0 else 1, groups)
                      for k in range(depth)]
            stages.append(nn.Sequential(*blocks))
            w_in = w
        self.layer1, self.layer2 = stages
        self.linear = nn.Linear(w_in, 5)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer2(self.layer1(out))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _group_shapes(rev):
    """(in_channels per group, groups) of every grouped conv in the reversible branches."""
    return {(m.in_channels // m.groups, m.groups) for n, m in rev.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and ".blocks." in n}


def test_grouped_convs_keep_their_group_width_and_the_parameter_count():
    torch.manual_seed(0)
    # RegNetX_200MF's widths at group width 8 (19 groups at 152 channels) went -77% before
    plan = _plan(GroupedNet(widths=(152, 368), depth=2))
    assert [s.name for s in plan.stages] == ["layer1.1", "layer2.1"]
    for stage in plan.stages:
        assert abs(stage.params_after / stage.params_before - 1) <= 0.1, str(plan)
    assert not plan.unmatched() and "NOT matched" not in str(plan)
    rev = revify.transform(GroupedNet(), input_size=(3, 16, 16))
    assert [s.name for s in rev.revify_plan.stages] == ["layer1.1..layer1.2", "layer2.1..layer2.2"]
    for stage in rev.revify_plan.stages:
        assert abs(stage.params_after / stage.params_before - 1) <= 0.1
    assert {width for width, _ in _group_shapes(rev)} == {8}  # the group width, as in RegNet
    assert rev.revify_plan.params_after == sum(p.numel() for p in rev.parameters())
    grads_match_plain_autograd(rev, 16)


def test_grouped_convs_at_one_group_count_keep_it():
    """ResNeXt: the same number of groups in every stage, the group width growing."""
    torch.manual_seed(0)
    model = GroupedNet(widths=(32, 64), groups=4)  # 8 then 16 channels a group
    rev = revify.transform(model, input_size=(3, 16, 16))
    assert {groups for _, groups in _group_shapes(rev)} == {4}
    for stage in rev.revify_plan.stages:
        assert abs(stage.params_after / stage.params_before - 1) <= 0.1
    grads_match_plain_autograd(rev, 16)


class ThinBlock(nn.Module):
    """A branch with no internal width: nothing to scale back up after halving its conv."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn(self.conv(x)))


def test_a_stage_outside_the_parameter_promise_is_flagged():
    with pytest.warns(UserWarning, match=r"parameters NOT matched within ±10%: "
                                         r"layer1.0..layer1.1 \(-49.3%\)"):
        rev = revify.transform(Net(ThinBlock), input_size=(3, 16, 16))
    assert [s.name for s in rev.revify_plan.unmatched()] == ["layer1.0..layer1.1"]
    note = "parameters NOT matched within ±10%: layer1.0..layer1.1 (-49.3%)"
    assert note in str(rev.revify_plan)
    chosen = revify.transform(Net(ThinBlock), input_size=(3, 16, 16), width=1.0)
    assert not chosen.revify_plan.unmatched()  # a width the user chose promises nothing


# ----------------------------------------------------------------------------- shape reads
class SEBlock(nn.Module):
    """Squeeze-excitation pooled over `out.size(2)`, with a softplus."""

    def __init__(self, c, r=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.fc1, self.fc2 = nn.Conv2d(c, c // r, 1), nn.Conv2d(c // r, c, 1)

    def forward(self, x):
        out = F.softplus(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        w = F.avg_pool2d(out, out.size(2))
        w = F.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return F.relu(out * w + x)


class ClassicSE(nn.Module):
    """Squeeze-excitation as in the SE paper's code: `b, c, _, _ = x.size()`, Linear layers."""

    def __init__(self, c, r=4):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.conv2 = nn.Conv2d(2 * c, c, 1, bias=False)
        self.fc = nn.Sequential(nn.Linear(c, c // r, bias=False), nn.ReLU(inplace=True),
                                nn.Linear(c // r, c, bias=False), nn.Sigmoid())

    def forward(self, x):
        out = self.conv2(F.relu(self.bn(self.conv(x))))
        b, c, _, _ = out.size()
        y = F.adaptive_avg_pool2d(out, 1).view(b, c)
        y = self.fc(y).view(b, c, 1, 1)
        return F.relu(x + out * y.expand_as(out))


class FlatStats(nn.Module):
    """Statistics over the flattened positions (`x.view(x.size(0), x.size(1), -1)`) and pooling
    over `x.shape[2:]` and `x.size()[-1]`."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 1, bias=False)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        flat = out.view(out.size(0), out.size(1), -1)  # the channel axis kept whole
        scale = flat.mean(2).view(out.shape[0], -1, 1, 1)  # -1 stands for the channels
        pooled = F.max_pool2d(out, out.shape[2:]) * F.avg_pool2d(out, out.size()[-1])
        return x + self.conv2(out * torch.sigmoid(scale) * torch.sigmoid(pooled))


@pytest.mark.parametrize("block", [SEBlock, ClassicSE, FlatStats])
def test_shape_reads_of_other_dims_and_the_channel_count_convert(block):
    torch.manual_seed(0)
    rev = revify.transform(Net(block), input_size=(3, 16, 16))
    plan = rev.revify_plan
    assert [b.action for b in plan.blocks] == ["reversible"] * 2, str(plan)
    grads_match_plain_autograd(rev, 16)


class ShuffleBlock(nn.Module):
    """Arithmetic on the channel count (a channel shuffle): a half-width branch would shuffle
    other channels together, so the block is refused, with the reason."""

    def __init__(self, c):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.bn(self.conv(x))
        b, c, h, w = out.size()
        out = out.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return F.relu(x + out)


class FixedCountBlock(ShuffleBlock):
    def forward(self, x):
        out = self.bn(self.conv(x))
        return F.relu(x + out.view(out.size(0), 16, -1).view_as(out))


@pytest.mark.parametrize("block,reason", [
    (ShuffleBlock, "(floordiv) computes with the channel count"),
    (FixedCountBlock, "gives the channel count as a fixed number (16)")])
def test_reads_of_the_channel_count_it_cannot_follow_are_refused(block, reason):
    plan = _plan(Net(block))
    assert [b.action for b in plan.blocks] == ["checkpointed"] * 2
    assert reason in plan.block("layer1.0").reason, plan.block("layer1.0").reason


ELEMENTWISE = [F.softplus, F.hardswish, F.hardsigmoid, F.mish, F.elu, F.leaky_relu, F.gelu,
               F.silu, F.sigmoid, F.tanh, F.selu, F.celu, F.softsign, F.relu6, torch.sigmoid,
               torch.tanh, torch.exp, torch.abs, lambda t: t.sigmoid(), lambda t: t.tanh(),
               lambda t: t.exp(), lambda t: -t, lambda t: t ** 2, lambda t: t.clamp_min(0),
               nn.Softplus(), nn.SELU(), nn.Hardsigmoid()]


class ActBlock(nn.Module):
    def __init__(self, c, act):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.act = act

    def forward(self, x):
        return x + self.conv2(self.act(self.conv1(x)))


@pytest.mark.parametrize("act", ELEMENTWISE, ids=lambda a: getattr(a, "__name__", repr(a)))
def test_elementwise_activations_treat_channels_alike(act):
    plan = _plan(Net(ActBlock, act=act))
    assert [b.action for b in plan.blocks] == ["reversible"] * 2, str(plan)
