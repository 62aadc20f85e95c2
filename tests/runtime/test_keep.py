"""revify.runtime.keep: a unit's forward keeps its dearest layers' outputs and the rerun reuses
them.

Checked against plain autograd (the same layer run normally, the same model under
plain_autograd) and by counting the layer's calls and the step's live memory.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import revify
from revify.runtime.keep import Kept, Tape, recording, replaying
from revify.memory.measure import LiveTensorTracker
from revify.plan.plan import Options
from revify.pipeline import build
from revify.rewrite import unit_nodes
from conftest import assert_rerun_is_plain, revified_torchvision

X = torch.empty(4, 3, 64, 64)


class _Convolutions(TorchDispatchMode):
    """Counts the convolutions computed with each weight (by its data pointer)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.counts[args[1].data_ptr()] = self.counts.get(args[1].data_ptr(), 0) + 1
        return func(*args, **(kwargs or {}))

    def of(self, layer: nn.Module) -> int:
        return self.counts.get(layer.weight.data_ptr(), 0)


def _conv_and_input():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    return conv, torch.randn(2, 4, 8, 8, requires_grad=True)


def test_a_replayed_layer_gives_plain_autograds_value_and_gradients():
    conv, x = _conv_and_input()
    kept, tape = Kept(conv), Tape()
    with _Convolutions() as computed:
        with torch.no_grad(), recording(tape):
            first = kept(x)
        with replaying(tape):
            again = kept(x)
    assert computed.of(conv) == 1  # the rerun took the output from the tape
    assert_rerun_is_plain(conv, x, first, again)
    assert not tape.values[id(kept)]  # taken: the tape holds it no longer


def test_an_output_changed_in_place_after_recording_is_computed_again():
    conv, x = _conv_and_input()
    kept, tape = Kept(conv), Tape()
    with _Convolutions() as computed:
        with torch.no_grad(), recording(tape):
            kept(x).mul_(2)
        with replaying(tape):
            again = kept(x)
    assert computed.of(conv) == 2 and torch.equal(again, conv(x))


def test_without_a_tape_a_kept_layer_just_runs():
    conv, x = _conv_and_input()
    kept = Kept(conv)
    with _Convolutions() as computed:
        assert torch.equal(kept(x), conv(x)) and computed.of(conv) == 2
        with replaying(Tape()):  # nothing recorded: computed
            assert torch.equal(kept(x), conv(x)) and computed.of(conv) == 4
    assert list(kept.parameters()) == []  # the layer stays registered where it was


@pytest.fixture(scope="module")
def resnet50():
    # transformed once per session (conftest; test_schedule.py uses the same two)
    model, rev = revified_torchvision("resnet50", X)
    _, every = revified_torchvision("resnet50", X, schedule="recompute_all")
    return model.train(), rev.train(), every.train()


def _step(model, x, y):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def test_keeping_units_skip_their_kept_layers_in_the_rerun(resnet50):
    _, rev, every = resnet50
    schedule = rev.revify_plan.schedule
    assert schedule.kept and schedule.peak <= schedule.budget
    units = {seg.name: rev.net.get_submodule(node.target)
             for seg, node in unit_nodes(rev.net, rev.revify_plan)}
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    with _Convolutions() as computed:
        _step(rev, x, y), _step(every, x, y)
    twins = dict(every.named_modules())
    partial = 0
    for segment in rev.revify_plan.segments:
        if segment.name not in units:
            continue
        named = units[segment.name].schedule.kept
        layers = [m for m in units[segment.name].modules() if isinstance(m, Kept)]
        assert (segment.name in schedule.kept) == bool(named)
        assert named == {m for lean in rev.revify_plan.leans(segment)
                         for m in rev.revify_plan.running(lean, segment.name).kept_layers}
        # the layers the plan names keep (computed once a step), the others rerun (twice)
        for kept in layers:
            twin = twins[next(n for n, m in rev.named_modules() if m is kept.layer)]
            calls = 1 if kept.layer_name in named else 2
            assert (computed.of(kept.layer), computed.of(twin)) == (calls, 2), kept.layer_name
        partial += 0 < len(named) < len({m.layer_name for m in layers})
    assert partial  # some unit keeps only some of its kept layers: the check has teeth
    plan = str(rev.revify_plan)
    assert (f"Keeping their dearest layers' outputs for the rerun: {', '.join(schedule.kept)}"
            in plan)
    assert "keeps the output of" in plan


def test_keeping_changes_no_gradient_and_leaves_nothing_behind(resnet50):
    _, rev, _ = resnet50
    torch.manual_seed(1)
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    F.cross_entropy(rev(x), y).backward()  # the grids hold: the tracked step is a steady one
    state = {k: v.clone() for k, v in rev.state_dict().items()}
    rev.zero_grad(set_to_none=True)
    with LiveTensorTracker() as tracker:
        F.cross_entropy(rev(x), y).backward()
    grads = [p.grad.clone() for p in rev.parameters()]
    # every tape was emptied or released with the graph: only the gradients are left, and
    # each stage's one-value overflow flag, read at its next forward (revify.runtime.reversible)
    flags = [m._outgrown.flag for m in rev.modules()
             if isinstance(m, revify.runtime.reversible.ReversibleStage)]
    assert len(flags) == len(rev.revify_plan.stages) and all(f.numel() == 1 for f in flags)
    assert tracker.current == sum(t.untyped_storage().nbytes()
                                  for t in [p.grad for p in rev.parameters()] + flags)
    assert (tracker.peak_without([p.grad for p in rev.parameters()])
            <= rev.revify_plan.schedule.budget)
    rev.load_state_dict(state)
    with revify.plain_autograd():
        _step(rev, x, y)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, rev.parameters()))


def test_baselines_and_plain_checkpointing_keep_nothing(resnet50):
    model, _, every = resnet50
    for rev in (every, build(model, X, Options(lean=False)),
                build(model, X, Options(reversible=False))):
        assert not any(isinstance(m, Kept) for m in rev.modules())
        assert "keeps the output of" not in str(rev.revify_plan)


def test_a_keeping_checkpoint_backpropagates_twice():
    """The tape is used up by the first rerun; a second backward (retain_graph) reruns the
    checkpoint again, computing the kept layers: the same gradients twice."""
    from revify.runtime.checkpoint import Checkpointed
    from revify.runtime.modes import UnitMode, UnitSchedule
    from revify.rewrite import set_mode
    conv, x = _conv_and_input()
    unit = Checkpointed(nn.Sequential(Kept(conv, "conv"), nn.ReLU()))
    set_mode(unit, UnitSchedule(UnitMode.LEAN, frozenset({"conv"})))
    out = unit(x)
    out.sum().backward(retain_graph=True)
    first = x.grad.clone()
    out.sum().backward()
    assert torch.equal(x.grad, 2 * first)
    ref = x.detach().clone().requires_grad_()
    torch.relu(conv(ref)).sum().backward()
    assert torch.equal(first, ref.grad)


def test_every_kept_output_is_reused_in_a_pre_activation_resnet(monkeypatch):
    """ResNetV2's branches end in a conv handed on by an identity drop path to the stream,
    which adds it in place: that conv is not kept (its output would be changed before the
    rerun, which would then compute it again and have held it for nothing)."""
    import timm
    counts = {"recorded": 0, "reused": 0}
    put, take = Tape.put, Tape.take

    def counted_put(self, layer, value):
        counts["recorded"] += 1
        put(self, layer, value)

    def counted_take(self, layer):
        value = take(self, layer)
        counts["reused"] += value is not None
        return value

    monkeypatch.setattr(Tape, "put", counted_put)
    monkeypatch.setattr(Tape, "take", counted_take)
    torch.manual_seed(0)
    model = timm.create_model("resnetv2_50", num_classes=10, layers=(2, 2, 2, 2)).train()
    rev = revify.transform(model, X).train()
    assert rev.revify_plan.schedule.kept
    counts.update(recorded=0, reused=0)  # the schedule's projections recorded too
    _step(rev, torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    assert counts["recorded"] > 0 and counts["reused"] == counts["recorded"]
