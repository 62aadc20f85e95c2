"""BatchNorm statistics are updated once per step; recomputation replays the same randomness."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import revify
from conftest import step_grads, worst_rel_err


def _norm_state(model):
    return {n: b.clone() for n, b in model.named_buffers()}


class Counting(nn.Module):
    """A layer with a buffer of its own that every forward updates: a rerun must put it back.
    (fx runs `add_(1)` on the real buffer at the trace and records nothing: the tracer finds
    the write by the buffer's version counter.)"""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x


def _hook_every_batchnorm(rev):
    for m in rev.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(lambda *_: None)


def _cumulative_average(rev):
    for m in rev.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None


class OwnNorm(nn.BatchNorm2d):
    """A BatchNorm of another class: called through its own forward, not revify's shortcut."""


def _in_every_block(model, layer):
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            block.bn2 = layer(block.bn2)
    return model


def _own_norms(model):
    def own(bn):
        norm = OwnNorm(bn.num_features)
        norm.load_state_dict(bn.state_dict())
        return norm
    return _in_every_block(model, own)


def _counting(model):
    return _in_every_block(model, lambda bn: nn.Sequential(bn, Counting()))


@pytest.mark.parametrize("edit_model, edit_rev, stages", [
    (None, None, True),                   # BatchNorms called directly: momentum 0 on the rerun
    (None, _hook_every_batchnorm, True),  # their own call (hooks registered after the transform)
    (None, _cumulative_average, True),    # their own call (momentum None)
    (_own_norms, None, True),             # a layer's own buffers, put back after the rerun
    (_counting, None, False),             # a layer updating a buffer in its own code: a leaf
])                                        # (fx would drop the update), in checkpoints
def test_buffers_updated_exactly_once_per_step(edit_model, edit_rev, stages):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    rev = revify.transform(edit_model(model) if edit_model else model,
                           input_size=(3, 32, 32)).train()
    if edit_rev:
        edit_rev(rev)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = _norm_state(rev)

    with revify.plain_autograd():  # plain autograd: every layer runs exactly once
        F.cross_entropy(rev(x), y).backward()
    once = _norm_state(rev)
    rev.load_state_dict({**rev.state_dict(), **before})

    F.cross_entropy(rev(x), y).backward()  # reversible stages and checkpoints recompute
    after = _norm_state(rev)

    counters = [n for n in after if n.endswith(("num_batches_tracked", "calls"))]
    assert len(counters) > 20
    assert all(after[n].item() == 1 for n in counters)
    in_stages = [n for n in after if "blocks" in n]      # BN inside reversible stages
    checkpointed = [n for n in after if ".module." in n]  # BN inside checkpointed layers
    assert checkpointed and bool(in_stages) == stages
    for name in after:
        torch.testing.assert_close(after[name], once[name], rtol=0, atol=0, msg=name)


def test_plain_checkpoint_would_double_count():
    """The property above is not vacuous: torch.utils.checkpoint updates twice."""
    bn = nn.BatchNorm1d(3).train()
    x = torch.randn(8, 3, requires_grad=True)
    torch.utils.checkpoint.checkpoint(bn, x, use_reentrant=False).sum().backward()
    assert bn.num_batches_tracked.item() == 2


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, 1, 1) > self.p).to(x.dtype)
        return x * keep / (1 - self.p)


class DroppyBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.drop, self.drop_path = nn.Dropout(0.3), DropPath(0.3)

    def forward(self, x):
        out = self.conv2(self.drop(F.relu(self.conv1(x))))
        return x + self.drop_path(out)


def test_dropout_and_drop_path_replay_the_same_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[DroppyBlock(8) for _ in range(4)],
                          nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    # DropPath reads self.training (traced in eval mode it used to vanish): revify keeps it
    # opaque and its blocks checkpointed, unless the user vouches that it treats channels alike
    plan = revify.transform(model, input_size=(3, 8, 8)).revify_plan
    assert not plan.stages and "1.drop_path" in plan.opaque
    assert "name it in leaf_modules" in plan.block("1").reason
    rev = revify.transform(model, input_size=(3, 8, 8), leaf_modules=[DropPath]).train()
    assert rev.revify_plan.stages[0].blocks == ["1", "2", "3", "4"]
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 5, (6,))
    got = step_grads(rev, x, y, seed=123)
    rng_after_reversible = torch.rand(4)
    ref = step_grads(rev, x, y, exact=True, seed=123)
    rng_after_exact = torch.rand(4)
    err, where = worst_rel_err(got, ref)
    assert err <= 1e-5, (where, err)
    # the recomputation consumed no random numbers and did not reseed the global generator
    torch.testing.assert_close(rng_after_reversible, rng_after_exact, rtol=0, atol=0)
    other_seed = step_grads(rev, x, y, exact=True, seed=7)
    assert worst_rel_err(other_seed, ref)[0] > 1e-3  # masks really are random


def test_only_units_that_draw_random_numbers_capture_the_rng_state(monkeypatch):
    """Capturing the RNG state copies the generator's state for every branch and unit each step:
    those known to draw nothing (convolutions, norms, ReLUs) skip it; a branch with a dropout
    captures it, as does the stage that may rerun its forward (revify.graph.ops.draws_random)."""
    from revify.runtime import checkpoint, modes, reversible
    captured = []

    def capture(device):
        captured.append(device)
        return modes.capture_rng(device)

    monkeypatch.setattr(reversible, "capture_rng", capture)
    monkeypatch.setattr(checkpoint, "capture_rng", capture)
    torch.manual_seed(0)
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 5, (2,))
    plain = revify.transform(torchvision.models.resnet18(num_classes=5), input_size=(3, 8, 8))
    F.cross_entropy(plain.train()(x), y).backward()
    assert captured == []
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), *[DroppyBlock(8) for _ in range(3)],
                          nn.Flatten(), nn.Linear(8 * 8 * 8, 5))
    rev = revify.transform(model, input_size=(3, 8, 8), leaf_modules=[DropPath]).train()
    assert rev.revify_plan.stages[0].blocks == ["1", "2", "3"]
    captured.clear()  # what the schedule's projections at transform time captured
    F.cross_entropy(rev(x), y).backward()
    assert len(captured) == 1 + 2 * 3  # the stage, then F and G of each block; not stem or head
