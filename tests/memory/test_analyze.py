"""revify.analyze: exact projections of a training step's memory, checked against real steps."""
import copy
import json
import sys

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.flop_counter import FlopCounterMode

import revify
from revify.memory.analyze import STRATEGIES, measure, parse_bytes, plot
from revify.cli import main
from revify.runtime.reversible import ReversibleStage
from conftest import TinyResNet

SIZE = (3, 16, 16)
KEYS = {"param_bytes", "grad_bytes", "optimizer_bytes", "activation_bytes",
        "peak_activation_bytes", "step_peak_bytes", "accumulate_peak_bytes", "peak_bytes",
        "accumulate_bytes", "flops"}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return TinyResNet(depth=2, c=8)


@pytest.fixture(scope="module")
def analysis(tiny):
    return revify.analyze(tiny, input_size=SIZE, batch_size=4, optimizer="momentum",
                          memory="64MiB")


# ----------------------------------------------------------------------------- projections
# basic blocks, and wide bottlenecks: Wide ResNet-50-2's blocks (ResNet-50's graph, its
# branches twice as wide), its first two stages as deep (stages of 2 and 3 reversible blocks),
# the last two of 2 blocks (a block further would repeat the one before at the same sizes)
MODELS = {"resnet18": torchvision.models.resnet18,
          "wide bottlenecks": lambda: torchvision.models.resnet.ResNet(
              torchvision.models.resnet.Bottleneck, [3, 4, 2, 2], width_per_group=128)}


@pytest.mark.parametrize("name", MODELS)
def test_projection_matches_a_real_training_step(name):
    """Both gradient regimes (fresh, and allocated before the step), projected and measured."""
    torch.manual_seed(0)
    model = MODELS[name]()
    result = measure(model, input_size=(3, 64, 64), batch_size=2, device="cpu")
    for strategy in STRATEGIES:
        assert {"step_peak_bytes", "accumulate_peak_bytes"} <= result.measured[strategy].keys()
        for key, measured in result.measured[strategy].items():
            projected = getattr(result.strategies[strategy], key)
            assert abs(projected / measured - 1) <= 0.05, (strategy, key, projected, measured)
    # Activations alone (gradients fresh): revify under checkpointing, under the original.
    activations = {s: result.measured[s]["peak_activation_bytes"] for s in STRATEGIES}
    assert activations["revify"] <= activations["checkpoint"] < activations["original"]
    # Gradients allocated before the step: revify holds one branch's gradients in flight at a
    # time, checkpointing one layer's. At this small batch they outweigh the activations, so
    # revify may exceed checkpointing there, by no more than its widest branch's parameters (a
    # whole block's, with couplings of two blocks): a constant, whatever the batch.
    accumulated = {s: result.measured[s]["accumulate_peak_bytes"] for s in STRATEGIES}
    widest = max(sum(p.numel() * p.element_size() for p in block.parameters())
                 for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
                 for block in layer)
    assert accumulated["revify"] <= accumulated["checkpoint"] + widest
    assert accumulated["checkpoint"] < accumulated["original"]


@pytest.mark.parametrize("grads", ["accumulate", "fresh"])
def test_peak_extrapolates_exactly_and_the_largest_batch_is_the_largest(tiny, analysis, grads):
    budget, largest = parse_bytes("64MiB"), analysis.largest_batch(grads)
    for strategy, n in largest.items():
        assert n > 8
        assert (analysis.peak_at(strategy, n, grads) <= budget
                < analysis.peak_at(strategy, n + 1, grads))
    # a third, independent projection (the curves come from batches 4 and 8)
    third = revify.analyze(tiny, input_size=SIZE, batch_size=largest["revify"] + 1,
                           optimizer="momentum", curves=False)
    for strategy in STRATEGIES:
        assert analysis.peak_at(strategy, third.batch_size, grads) == \
            third.strategies[strategy].total_bytes(grads)
    assert third.strategies["revify"].total_bytes(grads) > budget


def test_the_budget_assumes_gradients_allocated_before_the_step_by_default(analysis):
    """Accumulating (or DDP) holds every gradient for the whole step: the larger figure, so
    the default; fresh gradients fit at least as large a batch."""
    assert analysis.grads == "accumulate"
    assert analysis.largest_batch() == analysis.largest_batch("accumulate")
    fresh, accumulated = analysis.largest_batch("fresh"), analysis.largest_batch("accumulate")
    for strategy, s in analysis.strategies.items():
        assert s.accumulate_bytes == s.param_bytes + s.grad_bytes + s.optimizer_bytes + \
            s.accumulate_peak_bytes
        assert s.accumulate_bytes >= s.peak_bytes and fresh[strategy] >= accumulated[strategy]


def test_an_extra_block_costs_its_weights_and_nothing_that_grows(tiny):
    """What `extra_blocks` promises, checked by projecting the deeper net: a reversible stage
    one block deeper needs that block's parameters, gradients and optimizer state, and at most
    a copy of its buffers (the running statistics a stage's backward snapshots), nothing else."""
    def project(depth):
        torch.manual_seed(0)
        return revify.analyze(TinyResNet(depth=depth, c=8), input_size=SIZE, batch_size=4,
                              optimizer="momentum", memory="64MiB", curves=False)
    short, deep = project(3), project(4)
    added = sum(e["bytes_per_block"] for e in short.extra_blocks())  # one block in each stage
    rev = revify.transform(TinyResNet(depth=4, c=8), input_size=SIZE)
    snapshot = max(sum(b.nbytes for b in stage.blocks[0].buffers())
                   for stage in rev.modules() if isinstance(stage, ReversibleStage))
    assert added <= deep.peak("revify") - short.peak("revify") <= added + snapshot


def test_units_account_for_everything_held_after_the_forward(tiny, analysis):
    for strategy in STRATEGIES:
        held = sum(u.activation_bytes[strategy] for u in analysis.units)
        assert held == analysis.strategies[strategy].activation_bytes
    stages = [u for u in analysis.units if u.kind == "stage"]
    assert stages and all(len(u.blocks) == 2 for u in stages)
    rev = revify.transform(tiny, input_size=SIZE)
    built = [m for m in rev.modules() if isinstance(m, ReversibleStage)]
    assert len(built) == len(stages)
    for stage, module in zip(stages, built):
        # A reversible stage keeps its output only; the original keeps every block's activations.
        assert sum(b.activation_bytes["revify"] for b in stage.blocks) == 0
        assert 0 < stage.activation_bytes["revify"] < stage.activation_bytes["original"]
        assert (sum(b.activation_bytes["original"] for b in stage.blocks)
                == stage.activation_bytes["original"])
        assert stage.shape and stage.became == "reversible"


def test_recompute_flops_are_what_the_backward_runs_again(tiny, analysis):
    with revify.plain_autograd():  # plain autograd: nothing is recomputed
        plain = revify.analyze(tiny, input_size=SIZE, batch_size=4, curves=False)
    for strategy in STRATEGIES:
        recompute = sum(u.recompute_flops[strategy] for u in analysis.units)
        assert analysis.strategies[strategy].flops - plain.strategies[strategy].flops == recompute
    assert sum(u.recompute_flops["original"] for u in analysis.units) == 0
    assert sum(u.recompute_flops["revify"] for u in analysis.units) > 0


def test_flops_are_torch_flop_counter_s(tiny, analysis):
    model = copy.deepcopy(tiny).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(torch.randn(4, *SIZE)), torch.zeros(4, dtype=torch.long)).backward()
    assert analysis.strategies["original"].flops == counter.get_total_flops() > 0


def test_optimizer_state_and_dtype(tiny, analysis):
    for s in analysis.strategies.values():  # float32, momentum: one state tensor per parameter
        assert s.param_bytes == s.grad_bytes == s.optimizer_bytes == 4 * s.params
        assert s.peak_bytes == s.param_bytes + s.optimizer_bytes + s.step_peak_bytes
        assert s.accumulate_bytes == s.param_bytes + s.grad_bytes + s.optimizer_bytes + \
            s.accumulate_peak_bytes
    half = revify.analyze(tiny, input_size=SIZE, batch_size=4, dtype="bfloat16", optimizer="adamw")
    for strategy, s in half.strategies.items():
        assert s.param_bytes == s.grad_bytes == 2 * s.params and s.optimizer_bytes == 4 * s.params
    # bfloat16 activations: about half of float32's (BatchNorm statistics stay float32)
    full = analysis.strategies["original"].activation_bytes
    assert 0.45 * full < half.strategies["original"].activation_bytes < 0.6 * full


def test_json_and_tables(analysis):
    data = json.loads(json.dumps(analysis.to_json()))
    assert data["batch_size"] == 4 and data["input_size"] == list(SIZE)
    assert data["dtype"] == "float32"
    for strategy in STRATEGIES:
        assert KEYS <= data["strategies"][strategy].keys()
    assert data["budget"]["largest_batch"] == analysis.largest_batch()
    assert data["budget"]["grads"] == "accumulate"
    assert data["budget"]["largest_batch_by_grads"] == {
        "fresh": analysis.largest_batch("fresh"),
        "accumulate": analysis.largest_batch("accumulate")}
    assert [e["stage"] for e in data["budget"]["extra_blocks"]] == [s.name for s in analysis.stages]
    text = analysis.format("github", blocks=True)
    assert "| stem" in text and "largest batch" in text and "weights share" in text
    for unit in analysis.units:
        assert unit.name in text
        assert all(f"- {b.name}" in text for b in unit.blocks)


@pytest.mark.parametrize("text,size", [("24GiB", 24 * 2**30), ("24GB", 24 * 10**9),
                                       ("512MiB", 512 * 2**20), ("80e9", 80 * 10**9),
                                       ("1.5 gib", 3 * 2**29), (4096, 4096)])
def test_memory_sizes(text, size):
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["12 potatoes", "0GB", "-5GiB", "GiB", ""])
def test_bad_memory_sizes(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


# ----------------------------------------------------------------------------- command line
def analyze_cli(capsys, *args):
    try:
        code = main(["analyze", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_prints_json_only(capsys):
    code, out, err = analyze_cli(capsys, "resnet18", "--batch-size", "2", "--input-size", "3",
                                 "32", "32", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["model"] == "resnet18" and data["budget"] is None and data["optimizer"] == "sgd"
    assert data["strategies"]["original"]["optimizer_bytes"] == 0
    assert (data["strategies"]["revify"]["activation_bytes"]
            < data["strategies"]["original"]["activation_bytes"])


def test_cli_tables_with_measured_next_to_projected(capsys, monkeypatch, tiny):
    monkeypatch.setattr("revify.models.create_model", lambda name: tiny)  # a fast model
    code, out, err = analyze_cli(capsys, "tiny", "--batch-size", "2", "--input-size", "3",
                                 "16", "16", "--measure", "--blocks", "--format", "github",
                                 "--memory", "0.5", "GiB", "--optimizer", "adamw")
    assert code == 0, err
    assert "| stage1.0..stage1.1" in out and "| - stage1.0 " in out
    assert "largest batch" in out and "measured on cpu" in out and "optimizer adamw" in out
    assert "budget: 0.50 GiB" in out


@pytest.mark.parametrize("args,code,message", [
    (["resnet5000"], 2, "unknown model 'resnet5000'"),
    (["resnet18", "--input-size", "3", "0", "224"], 2, "--input-size must be positive"),
    (["resnet18", "--input-size", "3", "224"], 2, "expected 3 arguments"),
    (["resnet18", "--batch-size", "0"], 2, "--batch-size must be positive"),
    (["resnet18", "--memory", "12", "potatoes"], 2, "cannot read the memory size '12 potatoes'"),
    (["resnet18", "--dtype", "float128"], 2, "unsupported dtype 'float128'"),
    (["resnet18", "--format", "nope"], 2, "unknown table format 'nope'"),
    (["resnet18", "--optimizer", "lion"], 2, "invalid choice: 'lion'"),
])
def test_bad_input_gets_one_line_and_an_exit_code(capsys, args, code, message):
    got, out, err = analyze_cli(capsys, *args)
    assert got == code and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not out


def test_plot_without_matplotlib_is_one_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, out, err = analyze_cli(capsys, "resnet18", "--plot", str(tmp_path / "memory.png"))
    assert code == 1 and "matplotlib" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "memory.png").exists()


def test_plot_draws_peak_against_batch_size(analysis, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory.png"
    plot(analysis, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
