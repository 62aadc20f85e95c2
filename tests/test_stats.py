"""revify.stats: a BatchNorm's rerun reuses the batch statistics of its forward.

Checked against the training kernel itself (bit for bit, over random shapes, layouts and
dtypes), against plain autograd (the same norm run normally, the same model under
exact_backward), and by counting the training-mode norm kernels a step runs.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import revify
from revify import stats
from revify.keep import Tape, recording, replaying
from revify.stats import KeptStats, refold
from conftest import assert_rerun_is_plain

NATIVE = torch.ops.aten.native_batch_norm.default


class _TrainingNorms(TorchDispatchMode):
    """Counts native_batch_norm calls in training mode (those that reduce their input)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is NATIVE and bool(args[5])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_refold_gives_the_training_kernels_bits(dtype):
    g = torch.Generator().manual_seed(0)
    for case in range(60):
        n, c, h, w = (int(torch.randint(1, k, (), generator=g)) for k in (9, 70, 20, 20))
        if n * h * w < 2:
            continue
        x = (torch.randn(n, c, h, w, generator=g) * 10 * torch.rand((), generator=g)
             + torch.randn((), generator=g)).to(dtype)
        if case % 2:
            x = x.contiguous(memory_format=torch.channels_last)
        affine = case % 5 != 0
        weight, bias = ((torch.randn(c, generator=g).to(dtype) if affine else None) for _ in range(2))
        eps = (1e-5, 1e-3, 0.1, 1e-12)[case % 4]
        out, mean, invstd = NATIVE(x, weight, bias, torch.zeros(c, dtype=dtype),
                                   torch.ones(c, dtype=dtype), True, 0.1, eps)
        assert torch.equal(refold(x, weight, bias, mean, invstd, eps), out), (case, x.shape, eps)


class _OwnForward(nn.BatchNorm2d):
    """A BatchNorm subclass with a forward of its own (as timm's BatchNormAct2d): its rerun
    runs that forward under the dispatch mode rather than calling the kernel directly."""

    def forward(self, x):
        return super().forward(x) * 1.0


NORM_KINDS = {
    "plain": lambda: nn.BatchNorm2d(6),
    "cumulative": lambda: nn.BatchNorm2d(6, momentum=None),
    "untracked": lambda: nn.BatchNorm2d(6, track_running_stats=False),
    "own forward": lambda: _OwnForward(6),
}


def _norm_and_input(channels_last=False, kind="plain"):
    torch.manual_seed(0)
    norm = NORM_KINDS[kind]()
    nn.init.normal_(norm.weight), nn.init.normal_(norm.bias)
    x = torch.randn(4, 6, 5, 7) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return norm, x.requires_grad_()


@pytest.mark.parametrize("kind", list(NORM_KINDS))
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_rerun_norm_gives_plain_autograds_value_and_gradients(channels_last, kind):
    norm, x = _norm_and_input(channels_last, kind)
    reference_norm = copy.deepcopy(norm)
    wrapped, tape = KeptStats(norm), Tape(outputs=False)
    with _TrainingNorms() as reduced:
        with torch.no_grad(), recording(tape):
            first = wrapped(x)
        with torch.no_grad():
            reference = reference_norm(x)
        # the recording forward updated the buffers as the norm's own forward does
        assert all(torch.equal(a, b) for a, b in zip(norm.buffers(), reference_norm.buffers()))
        running = [b.clone() for b in norm.buffers() if b.is_floating_point()]
        with replaying(tape):
            again = wrapped(x)
    assert reduced.count == 2  # the norm's forward and the reference's; the rerun reduced nothing
    assert all(torch.equal(a, b) for a, b in zip(running, (b for b in norm.buffers()
                                                          if b.is_floating_point())))
    assert_rerun_is_plain(norm, x, first, again)
    assert not tape.values[id(wrapped)]  # taken: the tape holds them no longer
    assert list(wrapped.parameters()) == []  # the norm stays registered where it was


def test_a_rerun_norm_is_differentiable_twice_as_the_norm_is():
    """Double backward (a gradient penalty) through a rerun norm equals plain autograd's, in
    float64: the rerun records the norm's own autograd node."""
    norm, x = _norm_and_input()
    norm, x = norm.double(), x.detach().double().requires_grad_()
    wrapped, tape = KeptStats(norm), Tape(outputs=False)
    with torch.no_grad(), recording(tape):
        wrapped(x)
    with _TrainingNorms() as reduced, replaying(tape):
        again = wrapped(x)
    assert reduced.count == 0  # the statistics were reused

    def penalty(out):
        grads = torch.autograd.grad((out ** 2).sum(), [x, norm.weight], create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in grads), [x, norm.weight, norm.bias])

    for got, want in zip(penalty(again), penalty(norm(x))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_strided_input_is_rerun_with_its_statistics_computed_again():
    norm, x = _norm_and_input()
    strided = x.detach().transpose(2, 3).requires_grad_()  # neither contiguous nor channels-last
    wrapped, tape = KeptStats(norm), Tape(outputs=False)
    with _TrainingNorms() as reduced:
        with torch.no_grad(), recording(tape):
            wrapped(strided)
        with replaying(tape):
            again = wrapped(strided)
    assert reduced.count == 2 and torch.equal(again, norm(strided))


def test_kernels_that_disagree_are_not_used(monkeypatch):
    monkeypatch.setattr(stats, "_agreement", {})
    monkeypatch.setattr(stats, "refold", lambda *args: refold(*args) * (1 + 2 ** -20))
    assert not stats._paths_agree(torch.float32, torch.float32, torch.contiguous_format)
    norm, x = _norm_and_input()
    tape = Tape(outputs=False)
    with torch.no_grad(), recording(tape):
        KeptStats(norm)(x)
    assert tape.values and all(value is None for queue in tape.values.values()
                               for value, _ in queue)


class _Bottlenecks(nn.Module):
    """A stem, a downsampling block and two identity blocks: checkpointed units, a reversible
    stage and nested layers all hold BatchNorms."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.body0 = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8),
                                   nn.ReLU(), nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(32, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 32, 1, bias=False), nn.BatchNorm2d(32)) for _ in range(2))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(self.body0(x) + self.down(x))
        for block in self.blocks:
            x = torch.relu(block(x) + x)
        return self.head(x.mean((2, 3)))


def test_a_revified_step_reruns_norms_from_kept_statistics_and_changes_no_gradient():
    torch.manual_seed(0)
    rev = revify.transform(_Bottlenecks().train(), torch.empty(4, 3, 16, 16), store="none")
    wrapped = [m for m in rev.modules() if isinstance(m, KeptStats)]
    norms = [m for m in rev.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(wrapped) == len(norms)  # every norm is in a recomputing unit
    assert "BatchNorms rerun from kept statistics" in str(rev.revify_plan)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    state = {k: v.clone() for k, v in rev.state_dict().items()}
    with _TrainingNorms() as reduced:
        F.cross_entropy(rev(x), y).backward()
    assert reduced.count == len(norms)  # each reduced once, in the forward
    grads, after = [p.grad.clone() for p in rev.parameters()], rev.state_dict()
    rev.load_state_dict(state)
    rev.zero_grad(set_to_none=True)
    with revify.exact_backward():
        F.cross_entropy(rev(x), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, rev.parameters()))
    assert all(torch.equal(after[k], v) for k, v in rev.state_dict().items())  # running stats


def test_plain_checkpointing_reruns_norms_as_they_are():
    rev = revify.transform(_Bottlenecks().train(), torch.empty(4, 3, 16, 16), lean=False)
    assert not any(isinstance(m, KeptStats) for m in rev.modules())


@pytest.mark.parametrize("store", ["none", "auto"])
def test_every_norm_of_a_resnet_reduces_once_a_step_nested_ones_included(store):
    """ResNet-50's hottest units nest layers (a checkpoint inside the unit, whose first forward
    runs again in the unit's rerun): their norms reuse the unit's statistics there too."""
    import torchvision
    from revify.rewrite import nested, unit_calls
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).train()
    # 96x96: activations, not layer4's gradients in flight, set the peak, so some units nest
    rev = revify.transform(model, torch.empty(4, 3, 96, 96), store=store)
    units = [rev.net.get_submodule(node.target) for node in unit_calls(rev.net)]
    assert any(not layer.stored for unit in units for layer in nested(unit))
    with _TrainingNorms() as reduced:
        F.cross_entropy(rev(torch.randn(4, 3, 96, 96)), torch.randint(0, 10, (4,))).backward()
    assert reduced.count == sum(isinstance(m, nn.BatchNorm2d) for m in rev.modules())
