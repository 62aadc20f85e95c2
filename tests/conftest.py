"""Shared helpers: gradients of one training step, relative errors, small test networks."""
from __future__ import annotations

import copy
import runpy
import sys
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revify
from revify.pipeline import build_with


_BUILT: dict = {}


def built_once(key, build):
    """`build()` run once per session per `key`; every call returns a deep copy of what it
    built, and leaves the global RNG as `build()` left it, so what a test draws next is what it
    drew when it built its own.

    Transforming a model (its schedule projects every unit on fake tensors) costs seconds even
    for a small net; tests that start from the same transformed model share one build this way
    and still get a model of their own to train, hook or change.
    """
    if key not in _BUILT:
        built = build()
        _BUILT[key] = (copy.deepcopy(built), torch.get_rng_state())
        return built
    built, rng = _BUILT[key]
    torch.set_rng_state(rng)
    return copy.deepcopy(built)


def revified_torchvision(name: str, x: torch.Tensor | tuple = (3, 64, 64), **options):
    """(model, rev): torchvision `name` with 10 classes, built after torch.manual_seed(0), and
    its transform at `x` (an example input or an input size) with `options`
    (revify.plan.plan.Options fields);
    built once per session (`built_once`)."""
    import torchvision
    shape = tuple(x.shape) if isinstance(x, torch.Tensor) else tuple(x)

    def build():
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=10)
        spec = torch.empty(shape) if isinstance(x, torch.Tensor) else {"input_size": shape}
        rev = (build_with(model, spec, options) if isinstance(x, torch.Tensor)
               else build_with(model, None, options, **spec))
        return model, rev
    return built_once(("torchvision", name, shape, isinstance(x, torch.Tensor),
                       tuple(sorted(options.items()))), build)


def revified_tiny(depth=2, **settings):
    """(model, rev): a TinyResNet of `depth` blocks (seed 0) and its transform at 3x16x16 with
    `settings` (revify.plan.plan.Options fields); built once per session (`built_once`)."""
    def build():
        torch.manual_seed(0)
        model = TinyResNet(depth=depth)
        return model, build_with(model, None, settings, input_size=(3, 16, 16))
    return built_once(("TinyResNet", depth, repr(sorted(settings.items()))), build)


def resnet_step(block, layers, **options):
    """(model, x, y, rev): torchvision's ResNet of `block`s (10 classes, training mode), a batch
    of 4 at 64x64 and its labels, drawn in that order after torch.manual_seed(0), and the
    model's transform at that size with `options`; built once per session (`built_once`)."""
    from torchvision.models.resnet import ResNet

    def build():
        torch.manual_seed(0)
        model = ResNet(block, layers, num_classes=10).train()
        x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
        return model, x, y, build_with(model, None, options, input_size=(3, 64, 64)).train()
    return built_once(("ResNet", block.__name__, tuple(layers), tuple(sorted(options.items()))),
                      build)


def step_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, exact: bool = False,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """Gradients of every parameter and of the input after one cross-entropy step.

    `exact=True` runs the same revified model with plain autograd (the reference).
    The model's buffers are restored afterwards, so two calls start from the same state.
    """
    buffers = copy.deepcopy(dict(model.named_buffers()))
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    with revify.plain_autograd() if exact else nullcontext():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    grads["<input>"] = x.grad.detach().clone()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            buf.copy_(buffers[name])
    return grads


def assert_rerun_is_plain(layer: nn.Module, x: torch.Tensor, first: torch.Tensor,
                          again: torch.Tensor) -> None:
    """A unit's rerun of `layer` gave `again` (its recording forward `first`): both equal
    `layer(x)`, and gradients through the rerun (of x and the layer's parameters) equal plain
    autograd's, bit for bit."""
    inputs = [x, *layer.parameters()]
    grad = torch.randn_like(again)
    rerun = torch.autograd.grad(again, inputs, grad)
    reference = layer(x)
    assert torch.equal(again, reference) and torch.equal(first, reference)
    plain = torch.autograd.grad(reference, inputs, grad)
    assert all(torch.equal(a, b) for a, b in zip(rerun, plain))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error of a against the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def worst_rel_err(got: dict, ref: dict) -> tuple[float, str]:
    assert got.keys() == ref.keys()
    return max((rel_err(got[k], ref[k]), k) for k in ref)


def grads_match_plain_autograd(rev: nn.Module, size: int = 32, seed: int = 0,
                               tolerance: float = 1e-5) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """One step of `rev` (a batch of 2 at 3 x size x size and 5 classes, drawn after
    torch.manual_seed(1)) through its reversible backward, against the same model under plain
    autograd: every gradient within `tolerance`. Returns (gradients, x, y)."""
    torch.manual_seed(1)
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 5, (2,))
    got = step_grads(rev.train(), x, y, seed=seed)
    err, where = worst_rel_err(got, step_grads(rev, x, y, exact=True, seed=seed))
    assert err <= tolerance, (err, where)
    return got, x, y


def smoothed(model: torch.nn.Module) -> torch.nn.Module:
    """The same architecture with ReLU -> SiLU and max- -> average-pooling.

    Finite differences across a ReLU kink or a max-pool tie are wrong by construction (the plain
    torchvision model misses them by 0.4% at eps=1e-7); a smooth network makes them a
    trustworthy reference for the revified model's derivative.
    """
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ReLU):
            setattr(model, name, torch.nn.SiLU())
        elif isinstance(child, torch.nn.MaxPool2d):
            setattr(model, name, torch.nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        else:
            smoothed(child)
    return model


def assert_directional_derivatives(rev: nn.Module, x: torch.Tensor, y: torch.Tensor,
                                   eps: float = 1e-6) -> None:
    """Float64 central differences along random unit directions over all parameters and the
    input, against the revified backward's directional derivative."""
    params = [p for p in rev.parameters()]
    rev.zero_grad()
    F.cross_entropy(rev(x), y).backward()
    grads = [p.grad.clone() for p in params] + [x.grad.clone()]
    tensors = params + [x]
    for trial in range(3):
        direction = [torch.randn_like(t) for t in tensors]
        norm = sum((d * d).sum() for d in direction).sqrt()
        direction = [d / norm for d in direction]  # a unit step: stays clear of ReLU kinks
        analytic = sum((g * d).sum() for g, d in zip(grads, direction)).item()
        with torch.no_grad():
            for t, d in zip(tensors, direction):
                t.add_(eps * d)
            plus = F.cross_entropy(rev(x), y).item()
            for t, d in zip(tensors, direction):
                t.sub_(2 * eps * d)
            minus = F.cross_entropy(rev(x), y).item()
            for t, d in zip(tensors, direction):
                t.add_(eps * d)
        numeric = (plus - minus) / (2 * eps)
        assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic)), (trial, numeric, analytic)


class Block(nn.Module):
    """A user-written post-activation residual block, configurable in the ways people write them."""

    def __init__(self, c, style="plus", act="module", norm="bn", dropout=0.0):
        super().__init__()
        norm_layer = {"bn": nn.BatchNorm2d, "gn": lambda c: nn.GroupNorm(2, c)}[norm]
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm_layer(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), norm_layer(c)
        self.drop = nn.Dropout(dropout)
        self.relu = nn.ReLU(inplace=True)
        self.style, self.act = style, act

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.drop(self.bn2(self.conv2(out)))
        if self.style == "plus":
            out = out + x
        elif self.style == "iadd":
            out += x
        elif self.style == "torch.add":
            out = torch.add(x, out)
        else:
            out = x.add(out)
        return F.relu(out) if self.act == "functional" else self.relu(out)


class TinyResNet(nn.Module):
    """stem -> stage of `depth` blocks -> downsample -> stage of `depth` blocks -> head."""

    def __init__(self, depth=2, c=8, num_classes=5, **block_kwargs):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.stage1 = nn.Sequential(*[Block(c, **block_kwargs) for _ in range(depth)])
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1),
                                  nn.BatchNorm2d(2 * c), nn.ReLU())
        self.stage2 = nn.Sequential(*[Block(2 * c, **block_kwargs) for _ in range(depth)])
        self.fc = nn.Linear(2 * c, num_classes)

    def forward(self, x):
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture
def data():
    torch.manual_seed(0)
    return torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))


@pytest.fixture
def run_script(monkeypatch, capsys):
    """run_script(path, *args): the script run in this process as `python path args` runs it
    (under __main__, its folder first on sys.path, the arguments in sys.argv), which spares a
    subprocess its import of torch; its exit code, stdout and stderr, as subprocess.run gives
    them."""
    def run(path, *args: str) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", [str(path), *args])
        monkeypatch.syspath_prepend(str(path.parent))
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run
