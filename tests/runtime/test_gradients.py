"""The reversible backward gives the gradients plain autograd gives, and the true derivative."""
import pytest
import torch
import torch.nn.functional as F
import torchvision

import revify
from conftest import (TinyResNet, assert_directional_derivatives, revified_torchvision, smoothed,
                      step_grads, worst_rel_err)

# one model per block kind and the deepest (ResNet-34 and -101 repeat ResNet-18's and -50's
# blocks at another depth, which ResNet-152 covers; Wide ResNet-50-2 is ResNet-50's graph with
# wider branches, which tests/memory/test_analyze.py projects and measures)
TORCHVISION_MODELS = ["resnet18", "resnet50", "resnet152", "resnext50_32x4d"]


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_gradients_match_exact_autograd(name):
    # planned at a batch of 4 (the transform tests/plan and tests/runtime share), run at 2
    _, rev = revified_torchvision(name, torch.empty(4, 3, 64, 64))
    rev.train()
    assert rev.revify_plan.stages, "nothing became reversible"
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    got = step_grads(rev, x, y)
    ref = step_grads(rev, x, y, exact=True)
    err, where = worst_rel_err(got, ref)
    assert err <= 1e-5, f"{name}: {where} differs by {err:.2e}"


def _loss_fn(model, x, y):
    return lambda: F.cross_entropy(model(x), y)


# one model per block kind: ResNeXt's grouped convs are checked against exact autograd above
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_gradients_match_float64_finite_differences(name):
    """Directional derivative along random directions for all parameters and the input."""
    torch.manual_seed(0)
    model = smoothed(torchvision.models.get_model(name, num_classes=10))
    rev = revify.transform(model, input_size=(3, 64, 64)).double().train()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 10, (2,))
    assert_directional_derivatives(rev, x, y)


@pytest.mark.parametrize("depth, couple", [(2, "auto"), (3, "pairs")])  # 3: a pair, F alone
def test_full_jacobian_matches_float64_finite_differences(depth, couple):
    """Every entry of d(output)/d(input and parameters) of a tiny revified net, float64.

    (torch.autograd.gradcheck backpropagates twice through one graph; a reversible stage frees
    its state after one backward, so each analytic row here comes from a fresh forward.)
    """
    torch.manual_seed(0)
    rev = smoothed(revify.transform(TinyResNet(depth=depth, c=4), input_size=(3, 6, 6),
                                    couple=couple)).double().train()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    first_stage = next(m for m in rev.modules()
                       if isinstance(m, revify.runtime.reversible.ReversibleStage))
    leaves = [x] + list(first_stage.parameters()) + list(rev.net.stem.parameters())
    out_size = rev(x).numel()
    analytic = []
    for k in range(out_size):
        rev.zero_grad(set_to_none=True)
        x.grad = None
        rev(x).flatten()[k].backward()
        analytic.append(torch.cat([t.grad.flatten() for t in leaves]))
    analytic = torch.stack(analytic)                    # (outputs, inputs)
    numeric = []
    eps = 1e-6
    with torch.no_grad():
        for t in leaves:
            flat = t.view(-1)
            for i in range(flat.numel()):
                flat[i] += eps
                plus = rev(x).flatten()
                flat[i] -= 2 * eps
                minus = rev(x).flatten()
                flat[i] += eps
                numeric.append((plus - minus) / (2 * eps))
    numeric = torch.stack(numeric, dim=1)
    assert analytic.shape == numeric.shape and analytic.shape[1] > 300
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_frozen_parameters_and_input_without_grad():
    torch.manual_seed(0)
    rev = revify.transform(TinyResNet(depth=3), input_size=(3, 16, 16)).train()
    frozen = [n for n, p in rev.named_parameters() if ".f." in n][:4]
    for n, p in rev.named_parameters():
        p.requires_grad_(n not in frozen)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    results = []
    for exact in (False, True):
        rev.zero_grad(set_to_none=True)
        with revify.plain_autograd() if exact else torch.enable_grad():
            F.cross_entropy(rev(x), y).backward()
        results.append({n: p.grad for n, p in rev.named_parameters()})
    got, ref = results
    for n in frozen:
        assert got[n] is None and ref[n] is None
    err, where = worst_rel_err({k: v for k, v in got.items() if v is not None},
                               {k: v for k, v in ref.items() if v is not None})
    assert err <= 1e-5, where


def test_gradient_accumulation_and_hooks_fire_once_per_parameter():
    """Gradients reach parameters through the autograd engine (what DDP/FSDP hook into)."""
    torch.manual_seed(0)
    rev = revify.transform(TinyResNet(depth=3), input_size=(3, 16, 16)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    fired = {}
    for n, p in rev.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, n=n: fired.__setitem__(n, fired.get(n, 0) + 1))
    single = step_grads(rev, x, y)
    fired.clear()
    rev.zero_grad(set_to_none=True)
    for _ in range(2):  # two micro-batches accumulate
        F.cross_entropy(rev(x), y).backward()
    assert set(fired) == {n for n, _ in rev.named_parameters()}
    assert all(count == 2 for count in fired.values())
    for n, p in rev.named_parameters():
        torch.testing.assert_close(p.grad, 2 * single[n], rtol=1e-5, atol=1e-7)


def test_autocast_backward_replays_the_forward_autocast_state():
    torch.manual_seed(0)
    rev = revify.transform(TinyResNet(depth=3, c=16), input_size=(3, 16, 16)).train()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    grads = []
    for exact in (False, True):
        rev.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16), \
                (revify.plain_autograd() if exact else torch.enable_grad()):
            loss = F.cross_entropy(rev(x).float(), y)
        loss.backward()
        grads.append({n: p.grad.float() for n, p in rev.named_parameters()})
    err, where = worst_rel_err(*grads)
    assert err <= 1e-5, (where, err)  # bf16 inside F and G, exact reconstruction: same gradients
