"""`python -m revify`: the plan and bench commands, and one clear line on bad input."""
import subprocess
import sys

import pytest


def revify_cli(*args):
    return subprocess.run([sys.executable, "-m", "revify", *args], capture_output=True, text=True,
                          timeout=600)


def test_plan_prints_what_would_be_done():
    result = revify_cli("plan", "resnet18", "--input-size", "3", "64", "64")
    assert result.returncode == 0, result.stderr
    assert "revify plan for ResNet: 8 residual blocks, 5 reversible in 4 stages" in result.stdout
    assert "projection shortcut" in result.stdout


def test_bench_reports_three_strategies_side_by_side():
    result = revify_cli("bench", "resnet18", "--batch-size", "2", "--input-size", "3", "32", "32",
                        "--steps", "1")
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[2:5]]
    assert rows == ["original", "checkpoint", "revify"]
    assert "1.00x" in result.stdout


@pytest.mark.parametrize("args,code,message", [
    (["plan", "resnet5000"], 1, "unknown model 'resnet5000'"),
    (["plan", "resnet18", "--input-size", "3", "0", "64"], 2, "--input-size must be positive"),
    (["bench", "resnet18", "--steps", "0"], 2, "must be positive"),
    (["plan", "resnet18", "--input-size", "3", "64"], 2, "--input-size: expected 3 arguments"),
    (["plan"], 2, "the following arguments are required: model"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_bad_input_gets_one_line_and_an_exit_code(args, code, message):
    result = revify_cli(*args)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
