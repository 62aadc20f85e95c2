"""The side-by-side baselines: timm-style block checkpointing, torch.compile with an activation
memory budget, and the profiler-based measurement the compiled rows need."""
import math
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from torch import nn

import revify
from revify.bench import BlockCheckpointed, Compiled, run_bench, strategies, timm_checkpointing
from revify.memory.measure import measure_step, measure_step_profiled
from revify.memory.projection import project_peak
from revify.plan.plan import Options
from revify.pipeline import build
from conftest import TinyResNet

# The min-cut partitioner inductor uses, without inductor's C++ compile (a minute per model on
# 2 cores): the budget is the partitioner's, so it applies just the same.
PARTITIONED = "aot_eager_decomp_partition"


def _resnet18(size=64, batch=2):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    return model, torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))


def test_timm_style_row_checkpoints_the_blocks_and_stores_stem_and_head():
    model, x, y = _resnet18()
    models = strategies(model, (3, 64, 64), rows=("original", "checkpoint", "checkpoint-timm"))
    timm_style = models["checkpoint-timm"]
    wrapped = [n for n, m in timm_style.named_modules() if isinstance(m, BlockCheckpointed)]
    assert wrapped == [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
    assert isinstance(timm_style.conv1, nn.Conv2d) and isinstance(timm_style.fc, nn.Linear)
    peak = {name: measure_step(models[name], x, y).peak_activation_bytes
            for name in ("original", "checkpoint", "checkpoint-timm")}
    # the stored stem and head cost more than revify's checkpointing of everything
    assert peak["checkpoint"] < 0.95 * peak["checkpoint-timm"] < 0.95 * peak["original"]


def test_wrapping_blocks_is_exactly_what_timm_set_grad_checkpointing_does():
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10).train()
    x, y = torch.randn(2, 3, 64, 64), torch.randint(0, 10, (2,))
    own = timm_checkpointing(model)
    assert own.grad_checkpointing and not model.grad_checkpointing  # on a copy
    hidden = nn.Sequential(model)  # no set_grad_checkpointing: its blocks get wrapped instead
    wrapped = timm_checkpointing(hidden)
    assert sum(isinstance(m, BlockCheckpointed) for m in wrapped.modules()) == 8
    assert (measure_step(own, x, y).peak_activation_bytes
            == measure_step(wrapped.train(), x, y).peak_activation_bytes
            < 0.8 * measure_step(model, x, y).peak_activation_bytes)


class _FlatResidual(nn.Module):
    """A residual whose branch layers sit in the root module: no block submodule to wrap."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x):
        x = self.stem(x)
        return self.head(x + self.conv2(torch.relu(self.conv1(x))))


def test_a_model_without_block_modules_leaves_the_timm_row_out_with_a_note():
    notes = []
    models = strategies(_FlatResidual(), (3, 16, 16), note=notes.append)
    assert "checkpoint-timm" not in models and {"original", "checkpoint", "revify"} <= models.keys()
    assert "revify-at-timm-peak" not in models  # its budget is the timm row's peak
    assert [n.split(":")[0] for n in notes] == ["checkpoint-timm left out",
                                                 "revify-at-timm-peak left out"]


def test_revify_at_timms_peak_spends_that_memory_and_no_more():
    """The comparison under the same constraint: the schedule's budget is timm's projected peak
    at the bench's batch (a dense output gradient there: the loss's 128 KiB of log-softmax
    aside, the very step)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).train()
    x, y = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    rows = ("original", "checkpoint-timm", "revify", "revify-at-timm-peak")
    # one coupling per block: at this small input a pair's gradients in flight (a whole
    # block's) outweigh the activations, and revify.plan.couple leaves pairs out of this budget
    models = strategies(model, (3, 64, 64), rows, batch_size=4, couple="each")
    peak = {name: measure_step(models[name], x, y, grads="accumulate").peak_bytes for name in rows}
    default, spent = (models[n].revify_plan.schedule for n in ("revify", "revify-at-timm-peak"))
    assert project_peak(models["checkpoint-timm"], x, grads="accumulate") == spent.budget
    assert abs(spent.budget - peak["checkpoint-timm"]) <= 0.01 * spent.budget
    assert peak["revify"] < peak["revify-at-timm-peak"] <= spent.budget
    assert spent.flops_saved > default.flops_saved


@pytest.mark.parametrize("strategy", ["original", "checkpoint"])
def test_profiled_memory_agrees_with_the_live_tensor_tracker(strategy):
    """Both are exact on an eager step; the profiler also sees what no op makes (checkpointing's
    saved RNG states, 5 KB a block), hence not to the byte."""
    model, x, y = _resnet18()
    if strategy == "checkpoint":
        model = build(model, None, Options(reversible=False), input_size=(3, 64, 64)).train()
    tracked, profiled = measure_step(model, x, y), measure_step_profiled(model, x, y)
    assert profiled.peak_activation_bytes == pytest.approx(tracked.peak_activation_bytes, rel=0.02)
    assert profiled.peak_bytes == pytest.approx(tracked.peak_bytes, rel=0.02)
    assert profiled.activation_bytes == pytest.approx(tracked.activation_bytes, rel=0.10)
    assert profiled.grad_bytes == tracked.grad_bytes


def test_compiled_rows_follow_their_budget_and_report_it_by_profile():
    # the suite's small net: each budget compiles the whole step, forward and backward
    torch.manual_seed(0)
    model = TinyResNet().train()
    models = {"original": model, "compile-budget-0": Compiled(model, 0.0, PARTITIONED),
              "compile-budget-1": Compiled(model, 1.0, PARTITIONED)}
    rows = {r.name: r for r in run_bench(models, 2, (3, 16, 16), steps=1)}
    assert rows.keys() == models.keys()
    original, zero, one = rows.values()
    assert original.memory_method == "live tensors" and original.compile_seconds is None
    for row in (zero, one):
        assert row.memory_method == "allocator profile"
        assert row.graphs == 1 and row.compile_seconds > 0  # each budget compiled its own graph
        assert math.isfinite(row.peak_activation_bytes) and row.step_seconds > 0
    assert zero.peak_activation_bytes < original.peak_activation_bytes
    # budget 0 recomputes: after the forward it holds next to nothing, budget 1 what it saved
    assert zero.activation_bytes < 0.01 * one.activation_bytes
    assert one.activation_bytes > 0.5 * original.activation_bytes


def test_a_compilation_that_fails_leaves_its_row_out_with_one_line():
    def no_compiler(gm, example_inputs):
        raise RuntimeError("no C++ compiler\nsecond line")

    model, x, y = _resnet18(size=32)
    notes = []
    rows = run_bench({"original": model, "compile-budget-0": Compiled(model, 0.0, no_compiler)},
                     2, (3, 32, 32), steps=1, note=notes.append)
    assert [r.name for r in rows] == ["original"]
    assert notes == ["compile-budget-0 left out: torch.compile failed: RuntimeError: "
                     "no C++ compiler"]


def test_bench_command_adds_the_compiled_rows_with_compile(monkeypatch, capsys):
    from revify import bench
    from revify.cli import main
    monkeypatch.setattr(bench, "COMPILE_BACKEND", PARTITIONED)
    # the command's wiring of --compile (the compiled rows themselves are checked above), on the
    # suite's small net: every row is transformed, compiled or run
    assert main(["bench", "conftest:TinyResNet", "--input-size", "3", "16", "16", "--batch-size",
                 "2", "--steps", "1", "--compile"]) == 0
    out, err = capsys.readouterr()
    table = out.split("\n\n")[0]  # the memory and time table; the counts table follows
    rows = {line.split()[0]: line for line in table.splitlines()[2:]}
    assert list(rows)[-2:] == ["compile-budget-0.5", "compile-budget-0"]
    counted = out.split("host syncs")[1].split("compile-budget-0.5: compiled")[0]
    assert "revify" in counted and "compile-budget" not in counted  # compiled rows: not counted
    assert rows["original"].endswith("live tensors")
    assert rows["compile-budget-0"].endswith("allocator profile")
    assert "compile-budget-0: compiled 1 graph in " in out and "compiling compile-budget-0" in err


@pytest.mark.parametrize("script, rows", [
    ("time_breakdown.py", ["original", "revify", "revify, nothing recomputed", "revify, no grid",
                           "forward without autograd", "nothing recomputed + that"]),
    ("keep_ablation.py", ["original", "keeping", "keeping nothing"]),
])
def test_timing_scripts_run_every_configuration(script, rows, run_script):
    """The README's timing scripts (the suite's small net, two steps): every configuration
    gets a row. Run in-process, as `python scripts/...` runs them (conftest.run_script)."""
    done = run_script(Path(__file__).resolve().parents[1] / "scripts" / script, "--model",
                      "conftest:TinyResNet", "--batch-size", "2", "--size", "16", "--steps", "2")
    assert done.returncode == 0, done.stderr
    names = {line.split("  ")[0].strip() for line in done.stdout.splitlines()}
    assert set(rows) <= names


class _ReadsBack(nn.Module):
    """A linear layer whose forward reads a value back to the host, as `.item()` does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out = self.fc(x.view(2, 4))
        return out * float(out.detach().abs().max() > 0)


def test_step_counts_are_exact():
    """Ops below autograd (views apart), Python calls, host syncs: each counted, and the
    same on every count (no clock)."""
    from revify.memory.counting import count_step
    model, x, y = _ReadsBack(), torch.randn(2, 2, 2), torch.tensor([0, 2])
    counts = count_step(model, x, y)
    assert counts == count_step(model, x, y)
    assert counts.syncs == counts.by_op["aten._local_scalar_dense.default"] == 1
    assert counts.by_op["aten.view.default"] >= 1 and counts.kernel_ops < counts.ops
    assert counts.by_op["aten.addmm.default"] == 1 and counts.by_op["aten.mm.default"] == 1
    assert 0 < counts.python_calls < 200  # the module calls and the loss; not the counter's own
    plain = count_step(nn.Linear(4, 3), x.view(2, 4), y)
    assert plain.syncs == 0 and plain.ops < counts.ops


def test_bench_rows_report_the_counts_and_a_steady_revify_step_reads_nothing_back():
    model, x, y = _resnet18(size=32)
    models = strategies(model, (3, 32, 32), ("original", "revify"), batch_size=2)
    stages = sum(isinstance(m, revify.runtime.reversible.ReversibleStage)
                 for m in models["revify"].modules())
    original, rev = (row.counts for row in run_bench(models, 2, (3, 32, 32), steps=1))
    assert original.syncs == 0 and original.ops > 0 and original.python_calls > 0
    assert stages > 0 and rev.syncs == 0  # the grids' checks are read a step later
    assert rev.ops > original.ops


def test_revify_rows_run_the_network_the_revify_row_coupled():
    """couple="auto" is resolved once, by the "revify" row: the rows that run it another way
    take its coupling rather than choosing again (the budget row still chooses its own)."""
    torch.manual_seed(0)
    rows = ("revify", "revify-recompute", "revify-stored")
    models = strategies(TinyResNet(depth=2), (3, 16, 16), rows, batch_size=2)
    chosen = models["revify"].revify_plan
    assert chosen.coupling.startswith("couple='auto' chose")  # the row did choose
    for name in rows[1:]:
        plan = models[name].revify_plan
        assert plan.options.couple == chosen.options.couple and plan.coupling == ""
