"""Max pools in recomputing units run their CPU forward on the channels-last kernel: the same
output, indices and gradients as F.max_pool2d, to the bit."""
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import revify
from revify.pool import FastMaxPool

# (kernel, stride, padding, dilation, ceil_mode); torch allows padding up to half the kernel
CONFIGS = [c for c in itertools.product([2, 3], [None, 1, 2], [0, 1], [1, 2], [False, True])
           if c[2] <= c[0] // 2]


def _input(kind: str, shape=(3, 5, 13, 11)) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "relu":        # zeros everywhere: windows full of ties
        x = x.relu()
    elif kind == "integers":  # few distinct values: ties inside windows
        x = torch.randint(-2, 3, shape, generator=g).double()
    elif kind == "nan":       # NaN is the maximum of its windows in both kernels
        x[0, 1, 2, 3] = float("nan")
        x[1, 0, 4, 4] = float("-inf")
    return x


@pytest.mark.parametrize("kernel, stride, padding, dilation, ceil_mode", CONFIGS)
@pytest.mark.parametrize("kind", ["random", "relu", "integers", "nan"])
def test_the_channels_last_forward_gives_max_pool2ds_bits(kind, kernel, stride, padding,
                                                          dilation, ceil_mode):
    pool = nn.MaxPool2d(kernel, stride, padding, dilation, ceil_mode=ceil_mode)
    x = _input(kind).requires_grad_(True)
    ours = FastMaxPool(pool)(x)
    reference = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode)
    assert ours.grad_fn.name().endswith("_ChannelsLastMaxPoolBackward")
    assert ours.is_contiguous() and torch.equal(ours.nan_to_num(7.0), reference.nan_to_num(7.0))
    grad = torch.randn_like(ours).requires_grad_(True)
    g_ours, = torch.autograd.grad(ours, x, grad, create_graph=True)
    g_ref, = torch.autograd.grad(reference, x, grad, create_graph=True)
    assert torch.equal(g_ours, g_ref)
    # second order: the gradient's own backward gathers through the same indices
    gg = torch.randn_like(g_ours)
    assert torch.equal(torch.autograd.grad(g_ours, grad, gg)[0],
                       torch.autograd.grad(g_ref, grad, gg)[0])


@pytest.mark.parametrize("case", ["channels_last", "return_indices", "three_dims", "integer"])
def test_other_inputs_run_the_module_as_it_is(case):
    pool = nn.MaxPool2d(3, 2, 1, return_indices=case == "return_indices")
    x = _input("random", (2, 4, 9, 9) if case != "three_dims" else (4, 9, 9)).float()
    if case == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if case == "integer":
        x = x.to(torch.int64)
    else:
        x.requires_grad_(True)
    out = FastMaxPool(pool)(x)
    out = out[0] if case == "return_indices" else out
    assert out.grad_fn is None or "ChannelsLast" not in out.grad_fn.name()
    reference = pool(x)
    assert torch.equal(out, reference[0] if case == "return_indices" else reference)


class _PoolLayouts(TorchDispatchMode):
    """The memory layout of every max pool forward's input."""

    def __init__(self):
        super().__init__()
        self.layouts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.max_pool2d_with_indices.default:
            cl = args[0].is_contiguous(memory_format=torch.channels_last)
            self.layouts.append("channels_last" if cl else "contiguous")
        return func(*args, **(kwargs or {}))


def test_a_resnet_stem_pools_on_the_channels_last_kernel_in_forward_and_rerun():
    torch.manual_seed(0)
    rev = revify.transform(torchvision.models.resnet18(num_classes=10), torch.empty(2, 3, 64, 64))
    assert "1 max pool on CPU's channels-last kernel" in str(rev.revify_plan)
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    with _PoolLayouts() as seen:
        F.cross_entropy(rev(x), y).backward()
    # the forward and the rerun, each in pieces (an eighth of the input at a time)
    assert seen.layouts == ["channels_last"] * 2 * revify.pool.CHUNKS
    grads = [p.grad.clone() for p in rev.parameters()]
    rev.zero_grad(set_to_none=True)
    with revify.exact_backward():  # plain autograd, nothing recomputed
        F.cross_entropy(rev(x), y).backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, rev.parameters()))


@pytest.mark.parametrize("name, shape", [("resnet18", (2, 3, 64, 64)), ("resnet18", (16, 3, 64, 64)),
                                         ("resnet50", (4, 3, 64, 64))])
def test_the_channels_last_copies_leave_a_steps_peak_as_torchs_pool_does(monkeypatch, name, shape):
    """The copies are made in pieces, so what a step holds at its peak is unchanged to the byte
    (a copy of the whole input at once raised resnet18's, whose peak is at the stem)."""
    from revify.memory import project_peak
    x = torch.randn(shape)
    peaks = []
    for pools in [(), (nn.MaxPool2d,)]:
        monkeypatch.setattr(revify.lean, "POOLS", pools)
        rev = revify.transform(torchvision.models.get_model(name, num_classes=10), x)
        assert any(isinstance(m, FastMaxPool) for m in rev.modules()) == bool(pools)
        peaks.append(project_peak(rev, x))
    assert peaks[1] == peaks[0]
