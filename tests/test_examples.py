"""Every example runs (in its short smoke mode).

They run in-process as `python examples/NAME.py ...` runs them (conftest.run_script): a
subprocess each would spend more on importing torch than on the run.
The DDP example runs under torchrun, its processes its own.
"""
import math
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


@pytest.fixture
def example(run_script):
    """example(name, *args): examples/name run as `python examples/name args`
    (conftest.run_script)."""
    return lambda name, *args: run_script(EXAMPLES / name, *args)


def test_quickstart_smoke(example):
    result = example("quickstart.py", "--smoke")
    assert result.returncode == 0, result.stderr
    assert "revify plan for ResNet" in result.stdout and "step 1: loss" in result.stdout
    # both regimes: gradients created during the step, and allocated before it
    lines = [l for l in result.stdout.splitlines() if l.endswith("x)") and "MiB" in l]
    assert len(lines) == 2 and "allocated before the step" in lines[1]
    for line in lines:
        ratio = float(line.rsplit("(", 1)[1].split("x)")[0])
        assert 0 < ratio < 1, line


def epoch_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("epoch ")]


def test_train_cifar_smoke(example):
    result = example("train_cifar.py", "--synthetic", "--smoke")
    assert result.returncode == 0, result.stderr
    assert "7 reversible in 3 stages" in result.stdout  # resnet20 was revified
    epochs = epoch_lines(result.stdout)
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 2"]
    for line in epochs:
        train_loss = float(line.split("loss ")[1].split()[0])
        test_loss = float(line.split("test loss ")[1].split()[0])
        assert math.isfinite(train_loss) and math.isfinite(test_loss), line


def test_train_cifar_without_data_is_one_line_usage_error(example):
    result = example("train_cifar.py", "--epochs", "1")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "--data PATH" in result.stderr and "--synthetic" in result.stderr


def test_train_ddp_smoke_two_processes():
    # One thread per process: on two cores, two-thread kernels of two processes stall waiting
    # for each other.
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--standalone", str(EXAMPLES / "train_ddp.py"), "--synthetic",
                             "--smoke"], capture_output=True, text=True, timeout=600,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DDP over 2 processes (gloo)" in result.stdout
    epochs = epoch_lines(result.stdout)
    assert len(epochs) == 2, result.stdout
    for line in epochs:
        per_rank = line.split("loss per rank [")[1].split("]")[0].split(", ")
        assert len(per_rank) == 2 and all(math.isfinite(float(v)) for v in per_rank), line
    assert "parameters in sync across 2 ranks: max |difference| 0\n" in result.stdout


def test_memory_budget_smoke(example):
    result = example("memory_budget.py", "--smoke")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("original", "checkpoint", "revify")}
    assert rows.keys() == {"original", "checkpoint", "revify"}, result.stdout
    largest = {strategy: int(row[1]) for strategy, row in rows.items()}
    assert 0 < largest["original"] <= largest["checkpoint"]
    assert largest["revify"] >= largest["original"]
    for row in rows.values():  # each largest batch's projected peak is within the 0.25 GiB budget
        assert float(row[2]) <= 0.25
