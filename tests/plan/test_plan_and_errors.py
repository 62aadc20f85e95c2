"""What the pass finds, what it plans, and how it refuses bad input."""
import copy
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import revify
from revify.graph.blocks import find_blocks
from revify.plan.plan import Options
from revify.graph.trace import propagate_shapes, trace
from revify.pipeline import build
from conftest import Block, TinyResNet, revified_torchvision, step_grads, worst_rel_err


def _blocks(model, size=(3, 16, 16)):
    gm = trace(model)
    propagate_shapes(gm, (torch.empty(2, *size),))
    return find_blocks(gm)


@pytest.mark.parametrize("name,blocks,projections", [("resnet18", 8, 3), ("resnet50", 16, 4),
                                                      ("resnet152", 50, 4)])
def test_finds_every_torchvision_block(name, blocks, projections):
    found = _blocks(torchvision.models.get_model(name), (3, 64, 64))
    assert len(found) == blocks
    assert sum(not b.identity_shortcut for b in found) == projections
    assert all(b.post_op for b in found)  # the ReLU after the add belongs to the block


class PoolMix(TinyResNet):
    """TinyResNet with `max_pool(x) + avg_pool(x)` after the stem: an add of two sides computed
    from one tensor, with nothing learned on either."""

    def forward(self, x):
        x = self.stem(x)
        x = F.max_pool2d(x, 3, 1, 1) + F.avg_pool2d(x, 3, 1, 1)
        x = self.stage2(self.down(self.stage1(x)))
        return self.fc(x.mean((2, 3)))


def test_an_add_of_pools_is_not_a_residual_block():
    assert [b.name for b in _blocks(PoolMix())] == [
        "stage1.0", "stage1.1", "stage2.0", "stage2.1"]


@pytest.mark.parametrize("style", ["plus", "iadd", "torch.add", "method"])
@pytest.mark.parametrize("act", ["module", "functional"])
def test_user_written_blocks_are_found_and_made_reversible(style, act, data):
    torch.manual_seed(0)
    model = TinyResNet(depth=3, style=style, act=act)
    rev = revify.transform(model, input_size=(3, 16, 16)).train()
    plan = rev.revify_plan
    assert [b.action for b in plan.blocks] == ["reversible"] * 6
    assert [s.blocks for s in plan.stages] == [["stage1.0", "stage1.1", "stage1.2"],
                                               ["stage2.0", "stage2.1", "stage2.2"]]
    x, y = data
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-5


def test_plan_keeps_parameters_within_ten_percent_and_says_what_it_built():
    _, rev = revified_torchvision("resnet50", torch.empty(4, 3, 64, 64), couple="pairs")
    plan = rev.revify_plan
    for stage in plan.stages:
        assert abs(stage.params_after - stage.params_before) <= 0.10 * stage.params_before
    assert plan.params_after == sum(p.numel() for p in rev.parameters())
    stage_modules = [m for m in rev.modules()
                     if isinstance(m, revify.runtime.reversible.ReversibleStage)]
    assert [sum(p.numel() for p in m.parameters()) for m in stage_modules] == \
        [s.params_after for s in plan.stages]
    assert [len(s.blocks) for s in plan.stages] == [2, 3, 5, 2]
    # two blocks a coupling (F the first's branch, G the second's), an odd last one F alone
    assert ([len(m.blocks) for m in stage_modules] == [len(s.couplings) for s in plan.stages]
            == [1, 2, 3, 1])
    assert plan.stages[1].couplings == [("layer2.1", "layer2.2"), ("layer2.3", None)]
    text = str(plan)
    for expected in ["layer1.0", "projection shortcut", "reversible (F)", "reversible (G)",
                     "reversible (F alone)", "checkpointed", "stem", "head", "layer3.1..layer3.5",
                     f"{plan.params_before:,}", f"{plan.params_after:,}"]:
        assert expected in text


def test_width_option_scales_internal_channels():
    model = torchvision.models.resnet18()
    half = revify.transform(model, input_size=(3, 32, 32), width=0.5).revify_plan
    full = revify.transform(model, input_size=(3, 32, 32), width=1.0).revify_plan
    for a, b in zip(half.stages, full.stages):
        assert a.width == 0.5 and b.width == 1.0 and a.params_after < b.params_after


def test_non_invertible_store_keeps_the_layers_outside_stages_stored(data):
    rev = build(TinyResNet(depth=2), None, Options(non_invertible="store"), input_size=(3, 16, 16))
    assert not any(isinstance(m, revify.runtime.checkpoint.Checkpointed) for m in rev.modules())
    assert {s.action for s in rev.revify_plan.segments} == {"reversible", "stored"}
    x, y = data
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-5


def test_odd_channels_keep_the_block_checkpointed_with_a_reason(data):
    model = nn.Sequential(nn.Conv2d(3, 7, 3, padding=1), Block(7), Block(7), nn.Flatten(),
                          nn.Linear(7 * 16 * 16, 5))
    rev = revify.transform(model, input_size=(3, 16, 16))
    plan = rev.revify_plan
    assert [b.action for b in plan.blocks] == ["checkpointed", "checkpointed"]
    assert all("7 channels cannot be split" in b.reason for b in plan.blocks)
    assert "7 channels cannot be split" in str(plan)
    x, y = data
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-6


class UnknownLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(c, 1, 1))

    def forward(self, x):
        return x * self.scale


class ScaledBlock(Block):
    def __init__(self, c):
        super().__init__(c)
        self.unknown = UnknownLayer(c)

    def forward(self, x):
        return self.relu(x + self.unknown(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))))


def test_unknown_parameterised_module_falls_back_to_checkpointing(data):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ScaledBlock(8), nn.Flatten(),
                          nn.Linear(8 * 16 * 16, 5))
    rev = revify.transform(model, input_size=(3, 16, 16), leaf_modules=[UnknownLayer])
    (block,) = rev.revify_plan.blocks
    assert block.action == "checkpointed" and "UnknownLayer" in block.reason
    x, y = data
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-6


def test_feature_tap_breaks_the_stage_where_the_tensor_is_used():
    class Tapped(TinyResNet):
        def __init__(self, depth):
            super().__init__(depth)
            self.tap_head = nn.Linear(8, 5)

        def forward(self, x):
            x = self.stem(x)
            a = self.stage1[0](x)
            b = self.stage1[1](a)
            return self.tap_head(b.mean((2, 3)) + a.mean((2, 3)))  # `a` is consumed twice

    torch.manual_seed(0)
    model = Tapped(depth=2)
    rev = revify.transform(model, input_size=(3, 16, 16)).train()
    assert [s.blocks for s in rev.revify_plan.stages] == [["stage1.0"], ["stage1.1"]]
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-5


def test_not_a_module():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got function"):
        revify.transform(lambda x: x)


def test_no_residual_block():
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(revify.NoResidualBlocks, match="Sequential has no residual block"):
        revify.transform(mlp, torch.randn(2, 4))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value cannot be traced symbolically
            return x
        return -x


class Untraceable(TinyResNet):
    def __init__(self):
        super().__init__()
        self.gate = DataDependent()

    def forward(self, x):
        return super().forward(self.gate(x))


def test_untraceable_module_is_kept_opaque_and_reported(data):
    x, y = data
    rev = revify.transform(Untraceable(), input_size=(3, 16, 16))
    assert list(rev.revify_plan.opaque) == ["gate"] and len(rev.revify_plan.stages) == 2
    assert ("kept as opaque layers" in str(rev.revify_plan)
            and "gate: TraceError" in str(rev.revify_plan))
    got, ref = step_grads(rev, x, y), step_grads(rev, x, y, exact=True)
    assert worst_rel_err(got, ref)[0] <= 1e-5


class GatedBlock(Block):
    """A block whose branch holds an untraceable layer: revify cannot know it is channel-wise."""

    def __init__(self, c):
        super().__init__(c)
        self.gate = DataDependent()

    def forward(self, x):
        out = self.gate(self.relu(self.bn1(self.conv1(x))))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_untraceable_layer_in_a_branch_keeps_its_block_checkpointed(data):
    model = TinyResNet()
    model.stage1[1] = GatedBlock(8)
    rev = revify.transform(model, input_size=(3, 16, 16))
    assert "stage1.1.gate" in rev.revify_plan.opaque
    actions = {b.name: (b.action, b.reason) for b in rev.revify_plan.blocks}
    assert actions["stage1.0"][0] == "reversible"
    action, reason = actions["stage1.1"]
    assert action == "checkpointed" and reason.startswith("branch cannot be halved: "
                                                          "'stage1.1.gate' is kept opaque "
                                                          "(TraceError")
    assert reason.endswith("so revify cannot tell whether it treats channels alike (if it does, "
                           "a drop path say, name it in leaf_modules)")


class TrainOnlyNoise(nn.Module):
    """Code that differs in training: traced once (in eval mode) it would never add its noise."""

    def forward(self, x):
        if self.training:
            x = x + 0.1 * torch.randn_like(x)
        return F.dropout(x, 0.2, training=self.training)


class NoisyBlock(Block):
    def __init__(self, c):
        super().__init__(c)
        self.noise = TrainOnlyNoise()

    def forward(self, x):
        out = self.noise(self.relu(self.bn1(self.conv1(x))))
        return self.relu(self.bn2(self.conv2(out)) + x)


def test_code_that_differs_in_training_keeps_its_training_behaviour(data):
    x, y = data
    model = TinyResNet()
    model.stage2[0] = NoisyBlock(16)
    rev = revify.transform(model, input_size=(3, 16, 16))
    assert list(rev.revify_plan.opaque) == ["stage2.0.noise"]
    assert ("runs different code in training and in eval mode"
            in rev.revify_plan.opaque["stage2.0.noise"])
    assert rev.revify_plan.block("stage2.0").action == "checkpointed"
    same = build(model, None, Options(reversible=False),
                 input_size=(3, 16, 16))  # the same function
    with torch.no_grad():
        torch.testing.assert_close(same.eval()(x), model.eval()(x))
        torch.manual_seed(0)
        noisy = same.train()(x)
        torch.manual_seed(0)
        torch.testing.assert_close(noisy,
                                   model.train()(x))  # the noise is drawn, as in the original
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-5


class ModeDependentForward(TinyResNet):
    def forward(self, x):
        return super().forward(x + 1 if self.training else x)


def test_mode_dependent_model_forward_is_refused():
    with pytest.raises(revify.TraceError, match="runs different code in training and in eval mode"):
        revify.transform(ModeDependentForward(), input_size=(3, 16, 16))


class Counter(nn.Module):
    """Updates a buffer of its own in place, by a traced amount: fx records it, in the stem's
    checkpoint, which would copy its input first (and rerun it). (A constant amount is not
    recorded: tests/runtime/test_batchnorm_and_rng.py's Counting.)"""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(x.shape[0])
        return x


class Counted(TinyResNet):
    def __init__(self):
        super().__init__()
        self.counter = Counter()

    def forward(self, x):
        return super().forward(self.counter(x))


def test_a_module_updating_its_buffer_is_kept_opaque_and_still_counts(data):
    x, y = data
    model = Counted()
    rev = revify.transform(model, input_size=(3, 16, 16))
    assert "updates its tensor 'seen' in place" in rev.revify_plan.opaque["counter"]
    seen = next(b for n, b in rev.named_buffers() if n.endswith("counter.seen"))
    assert model.counter.seen.item() == 0 and seen.item() == 0  # tracing counted nothing
    for _ in range(2):
        F.cross_entropy(rev(x), y).backward()  # the stem's rerun does not count again
    assert seen.item() == 2 * len(x)


class CountingForward(TinyResNet):
    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x):
        self.seen.add_(1)  # in the model's own forward: no module to keep opaque
        return super().forward(x)


def test_a_model_forward_updating_a_buffer_is_refused():
    with pytest.raises(revify.TraceError, match=r"'forward' updates the tensor 'seen' in place"):
        revify.transform(CountingForward(), input_size=(3, 16, 16))


class UntraceableForward(TinyResNet):
    def forward(self, x):
        if x.sum() > 0:  # in the model's own forward: no module to keep opaque
            x = -x
        return super().forward(x)


def test_untraceable_model_forward_names_the_way_out():
    with pytest.raises(revify.TraceError,
                       match=r"could not trace the forward of UntraceableForward"):
        revify.transform(UntraceableForward(), input_size=(3, 16, 16))


@pytest.mark.parametrize("kwargs,message", [
    (dict(width=-1), "width must be"), (dict(budget="lots"), "cannot read the memory size"),
    (dict(input_size=(3, 0, 16)), "input_size must be positive")])
def test_impossible_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        revify.transform(TinyResNet(), **kwargs)


def test_wrong_example_input_is_a_clear_error():
    with pytest.raises(revify.TraceError, match="example input of shape"):
        revify.transform(TinyResNet(), torch.randn(2, 5, 16, 16))


def test_weights_shared_between_blocks_stay_tied(data):
    class Shared(TinyResNet):
        def forward(self, x):
            x = self.stem(x)
            x = self.stage1[0](self.stage1[0](x))  # one block applied twice: tied weights
            x = self.stage1[1](x)
            return self.fc(self.stage2[0](self.down(x)).mean((2, 3)))

    rev = revify.transform(Shared(depth=2), input_size=(3, 16, 16))
    plan = rev.revify_plan
    tied = [b for b in plan.blocks if b.name.startswith("stage1.0")]
    assert len(tied) == 2 and all(b.action == "checkpointed" and "untie" in b.reason for b in tied)
    assert plan.block("stage1.1").action == "reversible"
    x, y = data
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-5


class TokenMLP(nn.Module):
    """A residual MLP on (batch, tokens, features): channels are the last dim, not dim 1."""

    def __init__(self, tokens=8, features=8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(features, 16), nn.Linear(16, features)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


class TokenMixer(nn.Module):
    """MLP-Mixer's token mixing: normalise features, then a Linear across the tokens."""

    def __init__(self, tokens=8, features=8):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(features), nn.Linear(tokens, tokens)

    def forward(self, x):
        return x + self.fc(self.norm(x).transpose(1, 2)).transpose(1, 2)


def test_blocks_split_the_dim_their_layers_work_on():
    """Tokens == features, so shapes alone cannot tell the dims apart: the feature MLP splits
    the last dim (where its Linear works); token mixing works across two dims and stays whole."""
    torch.manual_seed(0)
    model = nn.Sequential(TokenMLP(), TokenMLP(), TokenMixer())
    rev = revify.transform(model, torch.randn(2, 8, 8))
    assert [s.dim for s in rev.revify_plan.stages] == [2]
    mixer = rev.revify_plan.blocks[-1]
    assert mixer.action == "checkpointed" and "another dimension" in mixer.reason, mixer.reason
    x = torch.randn(2, 8, 8, requires_grad=True)
    ref = copy.deepcopy(rev)
    rev(x).square().sum().backward()
    with revify.plain_autograd():
        ref(x).square().sum().backward()
    for (n, p), q in zip(rev.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_a_wrongly_rebuilt_stage_is_caught_at_transform_time(monkeypatch):
    """The safety net behind the channel analysis: blind the analysis and the net still holds."""
    import dataclasses

    from revify.plan import resize
    blind = dataclasses.replace(resize.RESIZERS[nn.Linear], channels_in=lambda m: None)
    monkeypatch.setitem(resize.RESIZERS, nn.Linear, blind)

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return x + self.fc2(F.gelu(self.fc1(x)))

    with pytest.raises(RuntimeError, match="built reversible stage .* wrongly"):
        revify.transform(nn.Sequential(Square(), Square()), torch.randn(2, 8, 8))


def test_checkpointed_unit_with_two_outputs(data):
    """A stem tensor also used by the head: the outlined stem returns two values."""
    class TwoOutputs(TinyResNet):
        def forward(self, x):
            s0 = self.stem[0](x)
            h = self.stage2(self.down(self.stage1(self.stem[2](self.stem[1](s0)))))
            return self.fc(h.mean((2, 3))) + s0.mean((1, 2, 3))[:, None]

    torch.manual_seed(0)
    rev = revify.transform(TwoOutputs(), input_size=(3, 16, 16)).train()
    assert sum(n.op == "call_function" for n in rev.net.graph.nodes) == 2  # two getitems
    x, y = data
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-5


