"""couple="auto" (revify.plan.couple): blocks coupled in pairs unless that raises the step's
activation peak, its gradients in flight raise its memory too much, it misses the parameter match
by more, or breaks the user's budget; the plan says which and why, and the file records what was
built."""
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import revify
from conftest import grads_match_plain_autograd
from revify.memory.measure import measure_step
from revify.models import create_model
from revify.memory.projection import project_peak
from revify.pipeline import build_with
from revify.plan.couple import IN_FLIGHT
from revify.runtime.reversible import ReversibleStage


class Basic(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class FullResolution(nn.Module):
    """A CIFAR-style stage at the input's resolution: its backward sets the step's peak."""

    def __init__(self, c=16, blocks=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU())
        self.layer = nn.Sequential(*[Basic(c) for _ in range(blocks)])
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.layer(self.stem(x)).mean((2, 3)))


def _couplings(rev) -> list[int]:
    return [len(m.blocks) for m in rev.modules() if isinstance(m, ReversibleStage)]


def test_pairs_that_raise_the_activation_peak_give_way_to_one_coupling_per_block():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    model = FullResolution()
    auto = revify.transform(model, x)
    pairs, each = (revify.transform(model, x, couple=c) for c in ("pairs", "each"))
    assert _couplings(pairs) == [2] and _couplings(each) == _couplings(auto) == [4]
    plan = auto.revify_plan
    assert plan.options.couple == "each" and auto.revify_recipe["transform"]["couple"] == "auto"
    assert "activations would peak at" in plan.coupling and plan.coupling in str(plan)
    # the reason holds, projected and measured: a basic block's pair branch is twice as wide
    assert project_peak(pairs.net, x) > 1.01 * project_peak(each.net, x)
    assert (measure_step(pairs, x, y).peak_activation_bytes
            > measure_step(each, x, y).peak_activation_bytes)
    # both keep the parameter count
    for rev in (pairs, each):
        stage = rev.revify_plan.stages[0]
        assert abs(stage.params_after / stage.params_before - 1) <= 0.1
    grads_match_plain_autograd(pairs, 16)


def test_the_odd_block_of_a_stage_of_pairs_is_f_alone():
    """couple="pairs" on a stage of three blocks: the first two make a coupling, the third is F
    alone (y1 = x1 + F(x2), y2 = x2), so the stage runs three branches, as the original runs
    three blocks; gradients are plain autograd's and the inverse is exact. A stage of one block
    keeps it as F and G: alone it would leave half the stream untouched."""
    torch.manual_seed(0)
    model, x = FullResolution(blocks=3), torch.randn(4, 3, 8, 8)
    rev = revify.transform(model, x, couple="pairs")
    assert rev.revify_plan.stages[0].couplings == [("layer.0", "layer.1"), ("layer.2", None)]
    assert "reversible (F alone)" in str(rev.revify_plan)
    stage = next(m for m in rev.modules() if isinstance(m, ReversibleStage))
    assert [len(block.branches) for block in stage.blocks] == [2, 1]
    convs = lambda m: sum(isinstance(layer, nn.Conv2d) for layer in m.modules())
    assert convs(stage) == convs(model.layer)
    assert abs(rev.revify_plan.stages[0].params_after / sum(
        p.numel() for p in model.layer.parameters()) - 1) <= 0.1
    grads_match_plain_autograd(rev, 8)
    with torch.no_grad():
        coupled = stage.eval().couple(torch.randn(4, 16, 8, 8), record=True)
        assert torch.equal(stage.inverse(coupled), coupled.entry)
    one = revify.transform(FullResolution(blocks=1), x, couple="pairs").revify_plan.stages[0]
    assert one.couplings == [("layer.0", "layer.0")]


def test_resnet50_takes_pairs_where_a_checkpointed_unit_sets_the_peak():
    """ResNet-50 at batch 2, 224x224: the peak is the stem's and the downsampling blocks', so
    pairs leave it where it is."""
    x = torch.empty(2, 3, 224, 224)  # shapes only: nothing is computed at this size
    auto = revify.transform(torchvision.models.resnet50(), x)
    assert auto.revify_plan.options.couple == "pairs" and "chose 'pairs'" in \
        auto.revify_plan.coupling
    assert _couplings(auto) == [1, 2, 3, 1]


class Bottleneck(nn.Module):
    def __init__(self, c, w):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w)
        self.conv2, self.bn2 = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
        self.conv3, self.bn3 = nn.Conv2d(w, c, 1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(x + self.bn3(self.conv3(h)))


class WideLate(nn.Module):
    """A stem (its backward sets the activations' peak) pooled to 2x2, then two wide
    bottlenecks: nearly all of the parameters, few of the activations."""

    def __init__(self, c=256, w=64):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.layer = nn.Sequential(Bottleneck(c, w), Bottleneck(c, w))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        return self.fc(self.layer(self.stem(x)).mean((2, 3)))


def test_narrow_pair_branches_keep_the_parameter_match():
    """A CIFAR-width stage (bottlenecks of 32 channels on a 128-channel stream, as ResNet-164's
    middle stage): coupled in pairs a branch needs 36 to 38 channels, which a multiple of 8
    would round to 32 or 40, its parameters -24% or +11%; unaligned, they keep them within
    10% (and couple="auto" does not turn pairs down for the parameter match)."""
    model = nn.Sequential(nn.Conv2d(3, 128, 3, padding=1),
                          *[Bottleneck(128, 32) for _ in range(3)])
    rev = revify.transform(model, torch.empty(2, 3, 8, 8), couple="pairs")
    stage = rev.revify_plan.stages[0]
    assert abs(stage.params_after / stage.params_before - 1) <= 0.1 and not \
        rev.revify_plan.unmatched()
    assert rev.revify_plan.block(stage.blocks[0]).channels["_1_conv2"] % 8  # 38


def test_gradients_in_flight_and_a_budget_refuse_pairs():
    """A pair branch holds a whole block's gradients in flight: at 4x4 that raises the step's
    memory with gradients allocated (parameters and gradients counted) by over IN_FLIGHT,
    at 8x8 the stem's backward sets the peak and it does not. The activations are the same.
    Where pairs are taken, a budget under their peak refuses them."""
    model = WideLate()
    fixed = 2 * sum(p.numel() * 4 for p in model.parameters())
    for size, chosen in ((4, "each"), (8, "pairs")):
        x = torch.empty(1, 3, size, size)
        auto = revify.transform(model, x)
        nets = {c: build_with(model, x, {"couple": c, "schedule": "recompute_all"}).net
                for c in ("pairs", "each")}
        peak = {c: project_peak(net, x, "accumulate") for c, net in nets.items()}
        fresh = {c: project_peak(net, x, "fresh") for c, net in nets.items()}
        assert fresh["pairs"] <= 1.01 * fresh["each"]
        rise = (peak["pairs"] - peak["each"]) / (peak["each"] + fixed)
        assert (rise > IN_FLIGHT) == (chosen == "each"), (size, rise)
        assert auto.revify_plan.options.couple == chosen
        assert ("gradients in flight" in auto.revify_plan.coupling) == (chosen == "each")
    # where pairs are taken, a budget at one coupling per block's least peak leaves them out
    assert peak["each"] < peak["pairs"]
    rev = revify.transform(model, x, budget=peak["each"])
    assert rev.revify_plan.options.couple == "each" and "over the budget" in \
        rev.revify_plan.coupling
    assert rev.revify_plan.schedule.peak <= peak["each"]


def test_a_file_written_before_couple_existed_loads_as_one_coupling_per_block(tmp_path):
    torch.manual_seed(0)
    rev = revify.transform(create_model("resnet18", num_classes=7), input_size=(3, 32, 32),
                           couple="each")
    path = tmp_path / "old.pt"
    revify.save(rev, path)
    payload = torch.load(path, weights_only=True)
    del payload["transform"]["couple"]
    torch.save(payload, path)
    loaded = revify.load(path)
    assert loaded.revify_plan.options.couple == "each" and _couplings(loaded) == _couplings(rev)
    for (k, a), b in zip(rev.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
