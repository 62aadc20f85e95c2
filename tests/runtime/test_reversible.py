"""revify/reversible.py on its own: the coupling and its inverse, the fixed-point grid (its
headroom, widening and overflow), and the stage's autograd Function (what it saves, what it
refuses, anchors).

Moved here from test_plan_and_errors.py, test_memory.py, test_gradients.py, test_module.py and
test_training.py, unchanged but for the drift check's depth (see its comment).
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from conftest import Block, TinyResNet, resnet_step, revified_tiny, step_grads, worst_rel_err
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

import revify
from revify.drift import measure_drift, stage_model
from revify.memory.measure import measure_step
from revify.pipeline import build
from revify.plan.plan import Options


# -------------------------------------------------------- coupling and inverse
def test_stage_inverse_rebuilds_the_input_exactly():
    torch.manual_seed(0)
    rev = revify.transform(TinyResNet(depth=6), input_size=(3, 16, 16)).eval()
    stage = next(m for m in rev.modules()
                 if isinstance(m, revify.runtime.reversible.ReversibleStage))
    x = torch.randn(4, 8, 16, 16)
    with torch.no_grad():
        coupled = stage.couple(x, record=True)
        assert torch.equal(stage.inverse(coupled), coupled.entry)
        # the entry is the input on the grid: 2^-20 of each channel's magnitude at most away
        size = x.abs().amax((0, 2, 3), keepdim=True)
        assert 0 < ((coupled.entry - x).abs() / size).max() <= 2.0 ** -20
        stage.exact = False  # the same coupling in plain float32 drifts
        coupled = stage.couple(x, record=True)
        drift = (stage.inverse(coupled) - x).abs().max().item()
    assert torch.equal(coupled.entry, x) and 0 < drift < 1e-3


def test_exact_reconstruction_stays_exact_at_18_blocks_under_bf16_autocast():
    # 18 blocks, not 54: exact is exact at any depth by construction, and native already drifts
    # by 1.2 here (4 orders over the bound below); what costs is per block (every block is
    # transformed, projected and run twice), so 54 cost three times as much for the same check.
    (exact, native), = [measure_drift(depths=(18,), modes=(("exact", None), ("native", None)),
                                      autocast="bf16", batch=2, size=8, channels=8)]
    assert exact.reconstruction_error == 0.0 and exact.gradient_error <= 1e-5
    assert native.reconstruction_error > 1e-4  # what exact buys: native drifts in bf16


# -------------------------------------- the grid: headroom, widening, overflow
def test_a_stream_that_outgrows_its_grid_widens_it_and_stays_exact(data):
    """Branch outputs far larger than the stage input overflow the first grid: the stage notices,
    gives those channels more headroom and runs its forward again, with the same dropout masks
    and BatchNorm counted once; the backward stays exact."""
    torch.manual_seed(0)
    model = TinyResNet(depth=4, dropout=0.2)
    for block in model.modules():  # the last norm of every branch: outputs 100 times larger
        if isinstance(block, Block):
            nn.init.constant_(block.bn2.weight, 100.0)
    rev = revify.transform(model, input_size=(3, 16, 16)).train()
    stages = [m for m in rev.modules() if isinstance(m, revify.runtime.reversible.ReversibleStage)]
    x, y = data
    # step_grads restores every buffer afterwards: both paths start from the first grid
    got, ref = step_grads(rev, x, y), step_grads(rev, x, y, exact=True)
    assert worst_rel_err(got, ref)[0] == 0.0
    before = {n: b.clone() for n, b in rev.named_buffers()}
    F.cross_entropy(rev(x.requires_grad_()), y).backward()
    assert all(int(s.headroom.max()) > revify.runtime.reversible.HEADROOM_BITS for s in stages)
    counts = [n for n in before if n.endswith("num_batches_tracked")]
    assert all(int(dict(rev.named_buffers())[n] - before[n]) == 1 for n in counts)


def test_a_grid_outgrown_in_steady_state_costs_no_sync_is_said_and_widened(data):
    """Once a stage's grid has held, a training step reads nothing back to the host: a stream
    that outgrows the grid then is widened on the device for the next step, the next forward
    says that step was not exact and checks on the host again, and from there it is exact."""
    from revify.memory.counting import _OpCounter
    torch.manual_seed(0)
    rev = revify.transform(TinyResNet(depth=4), input_size=(3, 16, 16)).train()
    stages = [m for m in rev.modules() if isinstance(m, revify.runtime.reversible.ReversibleStage)]
    x, y = data
    F.cross_entropy(rev(x), y).backward()  # the first grid holds: steady state from here on
    assert all(int(s.headroom.max()) == revify.runtime.reversible.HEADROOM_BITS for s in stages)
    with torch.no_grad():  # branch outputs 100 times larger: beyond the grid's 16x
        for norm in (m for s in stages for m in s.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.weight.mul_(100.0)
    with _OpCounter() as ops:
        F.cross_entropy(rev(x), y).backward()
    assert ops.syncs == 0
    assert all(int(s.headroom.max()) > revify.runtime.reversible.HEADROOM_BITS for s in stages)
    with pytest.warns(RuntimeWarning, match="outgrew its fixed-point grid"):
        got = step_grads(rev, x, y)
    assert worst_rel_err(got, step_grads(rev, x, y, exact=True))[0] == 0.0


def test_a_stream_beyond_any_grid_warns_and_trains_on(data):
    """Branch outputs 10^6 times the stage input outgrow even the widest grid that leaves 8 bits
    of precision: those channels stop at that grid, the adds that overflow it round as plain
    floating point would, one warning says so, and the step goes on."""
    torch.manual_seed(0)
    model = TinyResNet(depth=2)
    for block in model.modules():
        if isinstance(block, Block):
            nn.init.constant_(block.bn2.weight, 1e6)
    rev = revify.transform(model, input_size=(3, 16, 16)).train()
    x, y = data
    with pytest.warns(RuntimeWarning, match="beyond what its fixed-point grid holds"):
        F.cross_entropy(rev(x.requires_grad_()), y).backward()
    assert torch.isfinite(x.grad).all()
    most = 24 - revify.runtime.reversible.MIN_BITS
    assert all(int(s.headroom.max()) == most for s in rev.modules()
               if isinstance(s, revify.runtime.reversible.ReversibleStage))


def test_an_eval_pass_with_gradients_leaves_the_grid_as_training_left_it(data):
    """Attribution through a model in eval mode overflows its grid as a training step would;
    that pass is exact (its backward equals plain autograd's) but widens nothing for good:
    the headroom, saved with the weights and read by later training, is unchanged."""
    torch.manual_seed(0)
    model = TinyResNet(depth=4)
    for block in model.modules():
        if isinstance(block, Block):
            nn.init.constant_(block.bn2.weight, 100.0)
    rev = revify.transform(model, input_size=(3, 16, 16))
    x, _ = data
    for norm in rev.modules():  # running statistics of this batch: eval normalises as training
        if isinstance(norm, nn.BatchNorm2d):
            norm.momentum = None
    with torch.no_grad():  # no gradients: the grid is not checked
        rev.train()(x)
    rev.eval()
    stages = [m for m in rev.modules() if isinstance(m, revify.runtime.reversible.ReversibleStage)]
    before = [s.headroom.clone() for s in stages]
    grads = []
    for context in (contextlib.nullcontext, revify.plain_autograd):
        with context():
            inp = x.clone().requires_grad_(True)
            rev(inp).square().sum().backward()
        grads.append(inp.grad)
    assert torch.equal(grads[0], grads[1])
    assert all(torch.equal(s.headroom, b) for s, b in zip(stages, before))
    rev.train()  # training does widen it, for good
    F.cross_entropy(rev(x.clone().requires_grad_(True)),
                    torch.zeros(len(x), dtype=torch.long)).backward()
    assert any(not torch.equal(s.headroom, b) for s, b in zip(stages, before))


def test_exact_reconstruction_costs_no_memory_over_native():
    """The stream on a float32 grid is rebuilt to the bit with nothing stored beside the stage
    output (no wider dtype, no remainder): exact holds what native holds after the forward,
    peaks within a few small per-channel tensors of it, and only native drifts."""
    model, x, y, exact = resnet_step(Bottleneck, [3, 4, 6, 3])  # ResNet-50, shared: conftest
    native = build(model, None, Options(reconstruction="native"), input_size=(3, 64, 64)).train()
    assert "native reconstruction" in str(native.revify_plan)
    native_step, exact_step = measure_step(native, x, y), measure_step(exact, x, y)
    grid_bytes = 4 * 4 * sum(s.headroom.numel() for s in exact.modules()  # steps and limits
                             if isinstance(s, revify.runtime.reversible.ReversibleStage))
    assert exact_step.activation_bytes <= native_step.activation_bytes + grid_bytes
    assert exact_step.peak_activation_bytes <= native_step.peak_activation_bytes + 2 * grid_bytes
    assert worst_rel_err(step_grads(exact, x, y), step_grads(exact, x, y, exact=True))[0] == 0.0
    err, _ = worst_rel_err(step_grads(native, x, y), step_grads(native, x, y, exact=True))
    assert 0 < err < 1e-3  # float32 reconstruction drifts, a little, with depth


# ----------------------------------------------- the stage's autograd Function
def test_reversible_stage_keeps_no_saved_tensors():
    """The stage's autograd node saves nothing through autograd: it rebuilds from its output."""
    torch.manual_seed(0)
    rev = revify.transform(ResNet(BasicBlock, [3, 1, 1, 1], num_classes=10), input_size=(3, 32, 32))
    stage = next(m for m in rev.modules()
                 if isinstance(m, revify.runtime.reversible.ReversibleStage))
    seen = []
    stage.register_forward_hook(lambda mod, inp, out: seen.append(out))
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(torch.randn(2, 64, 8, 8, requires_grad=True))
    assert packed == []  # nothing saved: not even the input or any branch activation
    out.sum().backward()
    assert seen


def test_second_backward_through_a_stage_is_a_clear_error():
    rev = revify.transform(TinyResNet(depth=2), input_size=(3, 16, 16)).train()
    out = rev(torch.randn(2, 3, 16, 16)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"backward ran twice.*revify.plain_autograd\(\)"):
        out.backward()


def test_double_backward_names_plain_autograd_and_works_under_it():
    """A gradient penalty differentiates the backward itself: the reversible backward cannot
    be (it rebuilds activations outside autograd), so it says so and names the way; under
    plain_autograd() the same model gives the penalty's gradients."""
    torch.manual_seed(0)
    rev = revify.transform(TinyResNet(depth=2), input_size=(3, 16, 16)).train()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"create_graph=True.*revify.plain_autograd\(\)"):
        torch.autograd.grad(rev(x).sum(), x, create_graph=True)
    with revify.plain_autograd():
        grad, = torch.autograd.grad(rev(x).sum(), x, create_graph=True)
        grad.square().sum().backward()
    # the penalty reaches the weights of every convolution (biases of the head need not)
    convs = [m.weight for m in rev.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.grad is not None and w.grad.abs().sum() > 0 for w in convs)


def test_in_place_change_of_a_stage_output_is_caught():
    torch.manual_seed(0)
    rev = build(TinyResNet(depth=2), None, Options(non_invertible="store"),
                input_size=(3, 16, 16)).train()
    stage = next(m for m in rev.modules()
                 if isinstance(m, revify.runtime.reversible.ReversibleStage))
    out = stage(torch.randn(2, 8, 16, 16, requires_grad=True))
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


# --------------------------------------------------------------------- anchors
def test_anchors_bound_native_drift_and_cost_one_activation_each():
    torch.manual_seed(0)
    model, x = stage_model(12, channels=8), torch.randn(2, 3, 8, 8)
    rows = {k: measure_drift(depths=(12,), modes=(("native", k),), autocast="none", batch=2,
                             size=8, channels=8)[0] for k in (None, 1)}
    assert rows[1].reconstruction_error < rows[None].reconstruction_error
    assert rows[1].gradient_error < rows[None].gradient_error / 5  # measured: 23x smaller
    # memory: after the forward, each anchor holds one copy of the stream (here in float32)
    held = {}
    for k in (None, 4):
        rev = build(model, None, Options(reconstruction="native", anchor_every=k),
                    input_size=(3, 8, 8))
        held[k] = measure_step(rev.train(), x, torch.tensor([0, 1])).activation_bytes
    anchors = (12 - 1) // 4
    assert held[4] - held[None] == anchors * x.shape[0] * 8 * 8 * 8 * 4


def test_anchors_in_exact_mode_change_nothing():
    _, plain = revified_tiny(depth=4)
    _, anchored = revified_tiny(depth=4, anchor_every=2)
    anchored.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    got, want = step_grads(anchored, x, y), step_grads(plain, x, y)
    assert all(torch.equal(got[k], want[k]) for k in want)
