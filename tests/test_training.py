"""Everyday training with a revified model: mixed precision, the anchor option, gradient
accumulation, frozen layers, channels_last, resuming from a checkpoint, torch.compile (drift and
anchors at work: test_reversible.py).

References are independent of the reversible backward: plain autograd on the same model
(`plain_autograd`), or a second run of the same procedure.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import revified_tiny, revified_torchvision, step_grads, worst_rel_err

import revify
from revify.memory.measure import measure_step


# --------------------------------------------------------------------------- precision, options
def test_anchor_every_names_stages_and_rejects_nonsense():
    _, rev = revified_tiny(depth=3, anchor_every={"stage1.0..stage1.2": 2})
    assert [s.anchor_every for s in rev.revify_plan.stages] == [2, None]
    with pytest.raises(ValueError, match="names no reversible stage: nope"):
        revified_tiny(anchor_every={"nope": 2})
    with pytest.raises(ValueError, match="positive whole number"):
        revified_tiny(anchor_every=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_gradients_match_autograd_under_the_same_autocast(dtype):
    """bf16, and fp16 with a GradScaler (CPU autocast runs fp16 too; the GPU run of
    scripts/gpu_checks.py does the same on CUDA)."""
    _, rev = revified_tiny()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])

    def grads(exact):
        rev.zero_grad(set_to_none=True)
        state = copy.deepcopy(rev.state_dict())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=dtype == torch.float16)
        with revify.plain_autograd() if exact else torch.enable_grad():
            with torch.autocast("cpu", dtype):
                loss = F.cross_entropy(rev(x), y)
            scaler.scale(loss).backward()
        rev.load_state_dict(state)
        return {n: p.grad / scaler.get_scale() for n, p in rev.named_parameters()}

    err, where = worst_rel_err(grads(False), grads(True))
    assert err <= 1e-5, (err, where)


# ----------------------------------------------------------------------------- everyday training
def test_gradient_accumulation_sums_micro_batches_like_autograd():
    _, rev = revified_tiny()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 1, 2])

    def accumulate(exact):
        rev.zero_grad(set_to_none=True)
        state = copy.deepcopy(rev.state_dict())
        with revify.plain_autograd() if exact else torch.enable_grad():
            for xs, ys in zip(x.chunk(2), y.chunk(2)):
                (F.cross_entropy(rev(xs), ys) / 2).backward()
        grads = {n: p.grad.clone() for n, p in rev.named_parameters()}
        rev.load_state_dict(state)  # BatchNorm statistics as before
        return grads

    got, want = accumulate(False), accumulate(True)
    assert worst_rel_err(got, want)[0] <= 1e-5
    single = step_grads(rev, x[:2], y[:2])
    single.pop("<input>")
    assert worst_rel_err(got, single)[0] > 1e-2  # the second micro-batch did add up


def test_frozen_layers_get_no_gradient_and_the_rest_match_autograd():
    _, rev = revified_tiny()
    frozen = [n for n, p in rev.named_parameters() if "stem" in n or ".f." in n]
    assert any(".f." in n for n in frozen)  # half of every coupling, inside reversible stages
    for n, p in rev.named_parameters():
        p.requires_grad_(n not in frozen)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    got, want = step_grads(rev, x, y), step_grads(rev, x, y, exact=True)
    assert not set(frozen) & got.keys()
    assert worst_rel_err(got, want)[0] <= 1e-5


@pytest.mark.parametrize("schedule", ["budget", "recompute_all"])
def test_channels_last_trains_like_autograd(schedule):
    _, rev = revified_tiny(schedule=schedule)
    rev = rev.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    y = torch.tensor([0, 3])
    stages = [m for m in rev.modules() if isinstance(m, revify.runtime.reversible.ReversibleStage)]
    # every conv in a stage (the branches' first ones read the branch input) sees channels_last,
    # in the forward and in the backward's rerun: no layout conversion per branch call
    layouts = []
    for conv in (m for s in stages for m in s.modules() if isinstance(m, torch.nn.Conv2d)):
        conv.register_forward_pre_hook(lambda m, args: layouts.append(
            args[0].is_contiguous(memory_format=torch.channels_last)
            and not args[0].is_contiguous()))
    err, where = worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))
    assert err <= 1e-5, (err, where)
    assert layouts and all(layouts), layouts
    for stage in stages:
        h = torch.randn(2, stage.headroom.numel(), 8, 8).to(memory_format=torch.channels_last)
        assert stage(h.requires_grad_()).is_contiguous(memory_format=torch.channels_last)  # kept


def _train(rev, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(rev(x), y).backward()
        opt.step()


def test_resuming_from_a_checkpoint_continues_the_same_run(tmp_path):
    torch.manual_seed(0)
    batches = [(torch.randn(2, 3, 16, 16), torch.randint(0, 5, (2,))) for _ in range(4)]
    model, rev = revified_tiny()
    opt = torch.optim.AdamW(rev.parameters(), lr=1e-2)
    _train(rev, opt, batches[:2])
    torch.save({"model": rev.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(rev, opt, batches[2:])

    resumed = revify.transform(model, input_size=(3, 16, 16))  # a fresh process would do this
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed.load_state_dict(state["model"])
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    _train(resumed, opt2, batches[2:])
    for (n, a), b in zip(rev.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n


# ----------------------------------------------------------------------------- torch.compile
def _unprefixed(grads: dict) -> dict:
    return {k.removeprefix("_orig_mod."): v for k, v in grads.items()}


def test_torch_compile_matches_eager_breaks_once_per_stage_and_keeps_the_saving():
    """aot_eager runs dynamo and AOT autograd (graph capture, the checkpoint HOP, the partition)
    without code generation, which would take minutes on CPU; inductor is checked by hand
    (README)."""
    model, rev = revified_tiny(depth=3)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 3])
    eager = step_grads(rev, x, y)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(rev)(x)
    assert explained.graph_break_count == len(rev.revify_plan.stages)  # the stages run eagerly
    compiled = torch.compile(rev, backend="aot_eager")
    got = _unprefixed(step_grads(compiled, x, y))
    err, where = worst_rel_err(got, eager)
    assert err <= 1e-6, (err, where)
    peak = {name: measure_step(torch.compile(m, backend="aot_eager"), x, y).peak_activation_bytes
            for name, m in [("original", model.train()), ("revify", rev)]}
    eager_peak = {name: measure_step(m, x, y).peak_activation_bytes
                  for name, m in [("original", model), ("revify", rev)]}
    assert peak["revify"] / peak["original"] <= eager_peak["revify"] / eager_peak["original"] + 0.05
    assert peak["revify"] < 0.8 * peak["original"]


def test_an_empty_batch_trains_as_the_original_does():
    """A batch of 0 (the last shard of a small data set, say): an empty output, zero gradients,
    norms' running statistics as the original leaves them; the next batch trains as before."""
    model, rev = revified_torchvision("resnet18", (3, 32, 32))  # transformed once: conftest
    model, rev = model.train(), rev.train()
    empty, none = torch.randn(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)
    stats = {}
    for name, net in (("original", model), ("revify", rev)):
        before = {k: v.clone() for k, v in net.state_dict().items()
                  if "running" in k or "num_b" in k}
        x = empty.clone().requires_grad_(True)
        out = net(x)
        assert out.shape == (0, 10)
        F.cross_entropy(out, none).backward()
        assert x.grad.shape == x.shape
        assert all(p.grad is not None and not p.grad.any() for p in net.parameters()), name
        after = {k: v for k, v in net.state_dict().items() if k in before}
        stats[name] = sorted((torch.equal(before[k], after[k]), k.split(".")[-1]) for k in before)
    # each kind of buffer changed (or not) as the original's did
    assert {s for s in stats["revify"]} == {s for s in stats["original"]}
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    assert worst_rel_err(step_grads(rev, x, y), step_grads(rev, x, y, exact=True))[0] <= 1e-5
