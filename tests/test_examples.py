"""Every example runs (in its short smoke mode)."""
import pathlib
import subprocess
import sys

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"


def test_quickstart_smoke():
    result = subprocess.run([sys.executable, str(EXAMPLES / "quickstart.py"), "--smoke"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "revify plan for ResNet" in result.stdout and "step 1: loss" in result.stdout
    ratio = float(result.stdout.rsplit("(", 1)[1].split("x)")[0])
    assert 0 < ratio < 1
