"""A revified model behaves like any other nn.Module."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision

import revify
import revify.runtime.checkpoint
import revify.runtime.reversible
from conftest import revified_torchvision, step_grads, worst_rel_err


@pytest.fixture
def model_and_rev():
    """A ResNet-18 and its transform, each test its own copy (transformed once: conftest)."""
    return revified_torchvision("resnet18", (3, 32, 32))


def test_original_model_is_left_untouched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    before = copy.deepcopy(model.state_dict())
    modules_before = [type(m) for m in model.modules()]
    revify.transform(model, input_size=(3, 32, 32))
    assert model.training
    assert [type(m) for m in model.modules()] == modules_before
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_every_rebuilt_layer_has_hooks_of_its_own(model_and_rev):
    """F's and G's copies of a layer are separate modules: a hook on one fires for it alone."""
    _, rev = model_and_rev
    block = next(m for m in rev.modules() if isinstance(m, revify.runtime.reversible.CouplingBlock))
    fired = []
    block.f.conv1.register_forward_hook(lambda m, *_: fired.append(m))
    block.f.conv1.register_forward_pre_hook(lambda m, *_: fired.append(m))
    with torch.no_grad():
        rev.eval()(torch.randn(1, 3, 32, 32))
    assert fired == [block.f.conv1, block.f.conv1]
    assert not block.g.conv1._forward_hooks and not block.g.conv1._forward_pre_hooks


def _count_calls(monkeypatch):
    calls = {"reversible": 0, "checkpoint": 0}
    apply = revify.runtime.reversible._Enter.apply

    def counting_apply(*a):
        calls["reversible"] += 1
        return apply(*a)

    class CountingFrame(revify.runtime.checkpoint._Frame):
        def __init__(self, *a):
            calls["checkpoint"] += 1
            super().__init__(*a)

    monkeypatch.setattr(revify.runtime.reversible._Enter, "apply", counting_apply)
    monkeypatch.setattr(revify.runtime.checkpoint, "_Frame", CountingFrame)
    return calls


def test_inference_runs_a_plain_forward(model_and_rev, monkeypatch):
    _, rev = model_and_rev
    calls = _count_calls(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    rev.eval()
    with torch.no_grad():
        out = rev(x)
    assert calls == {"reversible": 0, "checkpoint": 0} and out.grad_fn is None
    with torch.inference_mode():
        assert torch.equal(rev(x), out)
    rev.train()
    loss = rev(x).sum()
    reversible = [s for s in rev.revify_plan.segments if s.action == "reversible"]
    assert reversible and calls["reversible"] == len(reversible) and calls["checkpoint"] > 0
    loss.backward()


def test_train_eval_switching(model_and_rev):
    _, rev = model_and_rev
    x = torch.randn(4, 3, 32, 32)
    rev.train()
    rev(x).sum().backward()  # updates running statistics
    rev.eval()
    assert all(not m.training for m in rev.modules())
    with torch.no_grad():
        a, b = rev(x), rev(x[:2])
    torch.testing.assert_close(a[:2], b)  # eval: per-sample, running statistics
    with torch.no_grad(), revify.plain_autograd():
        torch.testing.assert_close(rev(x), a)
    rev.train()
    assert all(m.training for m in rev.modules())


def test_double_precision_and_dtype_conversion(model_and_rev):
    _, rev = model_and_rev
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    rev64 = copy.deepcopy(rev).double().train()
    got = step_grads(rev64, x.double(), y)
    ref = step_grads(rev64, x.double(), y, exact=True)
    assert all(g.dtype == torch.float64 for g in got.values())
    assert worst_rel_err(got, ref)[0] <= 1e-10
    rev16 = copy.deepcopy(rev).to(torch.bfloat16).train()
    out = rev16(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    F.cross_entropy(out.float(), y).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in rev16.parameters())


def test_state_dict_round_trip(model_and_rev):
    model, rev = model_and_rev
    x = torch.randn(2, 3, 32, 32)
    rev(x).sum().backward()
    other = revify.transform(torchvision.models.resnet18(num_classes=10), input_size=(3, 32, 32))
    other.load_state_dict(rev.state_dict())
    rev.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), rev(x), rtol=0, atol=0)


def test_deepcopy_and_torch_save_load(model_and_rev):
    _, rev = model_and_rev
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    twin = copy.deepcopy(rev)
    assert twin.revify_plan is not rev.revify_plan and str(twin.revify_plan) == str(rev.revify_plan)
    assert all(a is not b for a, b in zip(twin.parameters(), rev.parameters()))
    buffer = io.BytesIO()
    torch.save(rev, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for m in (twin, loaded):
        torch.testing.assert_close(step_grads(m, x, y), step_grads(rev, x, y), rtol=0, atol=0)
        assert str(m.revify_plan) == str(rev.revify_plan)


def test_replaced_parameters_get_the_gradients(model_and_rev):
    """A stage works out once which of its parameters each branch owns and reuses that while
    they are the same objects. Parameters replaced after a step (load_state_dict(assign=True)),
    one added to F and one taken from G (as many as before, owned differently) must get the
    gradients plain autograd gives, and the replaced ones none."""
    _, rev = model_and_rev
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    rev.train()
    step_grads(rev, x, y)                                       # the layout is worked out
    stage = next(m for m in rev.modules()
                 if isinstance(m, revify.runtime.reversible.ReversibleStage))
    old = list(stage.parameters())
    for p in old:
        p.grad = None
    stage.load_state_dict({k: v * 1.5 for k, v in stage.state_dict().items()}, assign=True)
    f, g = stage.blocks[0].f, stage.blocks[0].g
    conv = next(m for m in f.modules() if isinstance(m, torch.nn.Conv2d))
    conv.bias = torch.nn.Parameter(torch.randn(conv.out_channels))
    next(m for m in g.modules() if isinstance(m, torch.nn.BatchNorm2d)).bias = None
    assert len(list(stage.parameters())) == len(old)
    got, ref = step_grads(rev, x, y), step_grads(rev, x, y, exact=True)
    assert set(got) == set(ref) and worst_rel_err(got, ref)[0] <= 1e-5
    assert all(p.grad is None for p in old)


def test_optimizer_step_trains(model_and_rev):
    _, rev = model_and_rev
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(rev.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = F.cross_entropy(rev(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_exact_backward_is_plain_autograd_under_its_old_name(monkeypatch):
    """The old name warns once (DeprecationWarning) and does what plain_autograd does."""
    import warnings
    from revify.runtime.modes import plain_autograd_enabled
    monkeypatch.setattr(revify.runtime.modes, "_warned", False)
    with pytest.warns(DeprecationWarning, match=r"now revify.plain_autograd\(\)"):
        with revify.exact_backward():
            assert plain_autograd_enabled()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with revify.exact_backward():  # once only
            assert plain_autograd_enabled()
    assert not plain_autograd_enabled()

