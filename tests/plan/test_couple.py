"""couple="auto" (revify.plan.couple): blocks coupled in pairs unless that raises the step's
activation peak, misses the parameter match by more, or breaks the user's budget; the plan says
which and why, and the file records what was built."""
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import revify
from conftest import grads_match_plain_autograd, revified_torchvision
from revify.memory.measure import measure_step
from revify.models import create_model
from revify.memory.projection import project_peak
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
    assert "would peak at" in plan.coupling and plan.coupling in str(plan)
    # the reason holds, projected and measured: a basic block's pair branch is twice as wide
    assert project_peak(pairs.net, x) > 1.01 * project_peak(each.net, x)
    assert (measure_step(pairs, x, y).peak_activation_bytes
            > measure_step(each, x, y).peak_activation_bytes)
    # both keep the parameter count
    for rev in (pairs, each):
        stage = rev.revify_plan.stages[0]
        assert abs(stage.params_after / stage.params_before - 1) <= 0.1
    grads_match_plain_autograd(pairs, 16)


def test_pairs_where_a_checkpointed_unit_sets_the_peak_and_a_budget_below_theirs_refuses_them():
    """ResNet-50 at batch 2, 224x224: the peak is the stem's and the downsampling blocks'. Pairs
    leave the activations' peak and add 4% of gradients in flight (within what they may add), so
    they are taken, and a budget at one coupling per block's least peak leaves them out."""
    x = torch.empty(2, 3, 224, 224)  # shapes only: nothing is computed at this size
    auto = revify.transform(torchvision.models.resnet50(), x)
    each = revify.transform(torchvision.models.resnet50(), x, couple="each")
    assert auto.revify_plan.options.couple == "pairs" and "chose 'pairs'" in \
        auto.revify_plan.coupling
    assert _couplings(auto) == [1, 2, 3, 1] and _couplings(each) == [2, 3, 5, 2]
    assert project_peak(auto.net, x, "fresh") <= 1.01 * project_peak(each.net, x, "fresh")
    least = each.revify_plan.schedule.peak_recompute
    assert least < auto.revify_plan.schedule.peak_recompute <= 1.1 * least
    rev = revify.transform(torchvision.models.resnet50(), x, budget=least)
    assert rev.revify_plan.options.couple == "each" and "over the budget" in \
        rev.revify_plan.coupling
    assert rev.revify_plan.schedule.peak <= least


def test_an_example_input_too_small_for_activations_to_matter_keeps_the_least_memory():
    """At batch 4, 64x64 a pair's gradients in flight (a whole block's) outweigh ResNet-50's
    activations: pairs would raise the step's peak with gradients allocated before it, and a
    plan made there would store units by that surplus."""
    x = torch.empty(4, 3, 64, 64)
    _, auto = revified_torchvision("resnet50", x)  # built once: conftest
    pairs = revify.transform(torchvision.models.resnet50(num_classes=10), x, couple="pairs")
    plan = auto.revify_plan
    assert plan.options.couple == "each" and "gradients in flight" in plan.coupling
    assert project_peak(pairs.net, x, "accumulate") > 1.1 * project_peak(auto.net, x, "accumulate")


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
