"""A reversible stage hands each branch's parameter gradients to autograd as soon as its
backward computes them: one branch's gradients in flight at a time, hooks once per parameter,
and the same bits as plain autograd when gradients accumulate into existing ones."""
import torch
import torch.nn.functional as F

import revify
from revify.memory.measure import LiveTensorTracker
from conftest import TinyResNet


def _revified(depth=3, c=8):
    torch.manual_seed(0)
    return revify.transform(TinyResNet(depth=depth, c=c), input_size=(3, 16, 16)).train()


def _stages(rev):
    return [m for m in rev.modules() if isinstance(m, revify.runtime.reversible.ReversibleStage)]


def test_each_branch_s_gradients_reach_autograd_before_the_next_branch_reruns(data):
    rev = _revified()
    events, in_backward = [], [False]
    branches = {}
    for s, stage in enumerate(_stages(rev)):
        for i, block in enumerate(stage.blocks):
            for name, branch in (("F", block.f), ("G", block.g)):
                key = (s, i, name)
                branches[key] = [p for p in branch.parameters()]
                branch.register_forward_pre_hook(
                    lambda *_, key=key: events.append(("rerun", key)) if in_backward[0] else None)
                for p in branch.parameters():
                    p.register_post_accumulate_grad_hook(
                        lambda p, key=key: events.append(("grad", key)))
    x, y = data
    loss = F.cross_entropy(rev(x), y)
    in_backward[0] = True
    loss.backward()
    assert len(events) == sum(1 + len(ps) for ps in branches.values())
    # Per stage, in reverse: G's rerun, G's gradients, F's rerun, F's gradients, block by block
    # (no branch's gradients held back until the stage's backward ends).
    for s, stage in enumerate(_stages(rev)):
        mine = [e for e in events if e[1][0] == s]
        expected = []
        for i in reversed(range(len(stage.blocks))):
            for name in ("G", "F"):
                key = (s, i, name)
                expected += [("rerun", key)] + [("grad", key)] * len(branches[key])
        assert mine == expected
    # every parameter's hook fired exactly once in this backward
    assert sorted(e[1] for e in events if e[0] == "grad") == sorted(
        k for k, ps in branches.items() for _ in ps)


def _accumulated_grads(rev, batches, exact):
    """Gradients after backpropagating `batches` into gradients that already exist."""
    torch.manual_seed(1)
    for p in rev.parameters():
        p.grad = torch.randn_like(p)
    state = {k: v.clone() for k, v in rev.state_dict().items()}
    with revify.plain_autograd() if exact else torch.enable_grad():
        for x, y in batches:
            F.cross_entropy(rev(x), y).backward()
    rev.load_state_dict(state)
    return {n: p.grad.clone() for n, p in rev.named_parameters()}


def test_accumulating_into_existing_gradients_matches_plain_autograd_bit_for_bit():
    rev = _revified(depth=2)
    torch.manual_seed(2)
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))) for _ in range(2)]
    reversible = _accumulated_grads(rev, batches, exact=False)
    plain = _accumulated_grads(rev, batches, exact=True)
    assert reversible.keys() == plain.keys()
    for name in plain:
        assert torch.equal(reversible[name], plain[name]), name


def _accumulate_peak(depth: int) -> tuple[int, int]:
    """The peak of a step whose gradients exist before it, and the largest stage's gradient
    bytes: wide channels on a small map, where parameter gradients outweigh activations."""
    rev = _revified(depth=depth, c=32)
    for p in rev.parameters():
        p.grad = torch.zeros_like(p)
    x, y = torch.randn(1, 3, 8, 8), torch.randint(0, 5, (1,))
    with LiveTensorTracker() as tracker:
        F.cross_entropy(rev(x), y).backward()
    return tracker.peak, max(sum(p.numel() * 4 for p in s.parameters()) for s in _stages(rev))


def test_gradients_in_flight_do_not_grow_with_the_stage():
    shallow, _ = _accumulate_peak(2)
    deep, stage_grads = _accumulate_peak(4)
    # A stage returning all its gradients at once would add a whole stage's gradients, more
    # than the shallow net's entire peak; handing them over branch by branch adds nothing.
    assert stage_grads > shallow
    assert deep <= 1.05 * shallow
