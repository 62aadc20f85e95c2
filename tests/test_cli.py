"""The command line: every command end to end, and one clear line for every kind of bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TinyResNet

import revify
from revify.cli import main


def revify_cli(*args):
    return subprocess.run([sys.executable, "-m", "revify", *args], capture_output=True, text=True,
                          timeout=600)


def run(capsys, *args):
    """The CLI in-process (fast): exit code, stdout, stderr."""
    code = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return code, out, err


SMALL = ["--input-size", "3", "32", "32"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """`revify convert` of resnet18 with local weights, run as a user would (subprocess)."""
    folder = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    import torchvision
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), folder / "weights.pt")
    result = revify_cli("convert", "resnet18", "--num-classes", "10", "--weights",
                        folder / "weights.pt", "--out", folder / "model.pt", *SMALL,
                        "--batch-size", "4")
    return result, folder


def test_convert_prints_plan_weights_and_memory_and_writes_a_loadable_file(converted):
    result, folder = converted
    assert result.returncode == 0, result.stderr
    assert "revify plan for ResNet: 8 residual blocks, 5 reversible in 4 stages" in result.stdout
    assert "copied unchanged" in result.stdout and "Fine-tune it before use" in result.stdout
    assert "projected memory of one training step at batch 4" in result.stdout
    assert f"wrote {folder / 'model.pt'}" in result.stderr
    rev = revify.load(folder / "model.pt")
    source = torch.load(folder / "weights.pt", weights_only=True)
    assert torch.equal(rev.net.stem.module.conv1.weight, source["conv1.weight"])
    assert rev(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_convert_transforms_once_and_analyzes_the_model_it_converted(capsys, tmp_path,
                                                                    monkeypatch):
    import importlib
    pipeline = importlib.import_module("revify.pipeline")
    real, calls = pipeline.build, []

    def counted(model, example_inputs=None, options=None, **kwargs):
        calls.append(options.reversible)
        return real(model, example_inputs, options, **kwargs)
    # transform and build_with (analyze's baseline, bench's rows) both build through it
    monkeypatch.setattr(pipeline, "build", counted)
    code, out, err = run(capsys, "convert", "resnet18", *SMALL, "--out", tmp_path / "model.pt")
    assert code == 0, err
    assert "projected memory of one training step" in out
    assert calls == [True, False]  # revify's once, then the per-unit checkpointing baseline


def test_analyze_does_not_import_bench():
    check = "import revify.memory.analyze, sys; assert 'revify.bench' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert result.returncode == 0, result.stderr


def test_verify_passes_on_a_converted_file(converted, capsys):
    _, folder = converted
    code, out, err = run(capsys, "verify", folder / "model.pt")
    assert code == 0, err
    assert "gradients vs plain autograd" in out and "BatchNorm counted once per step" in out
    assert out.count("reconstruction, float32") == 4 and out.count("bfloat16 autocast") == 4
    assert "11 of 11 checks passed" in out and "FAIL" not in out


def test_verify_fails_when_reconstruction_is_broken(converted, capsys, monkeypatch):
    _, folder = converted
    real = revify.runtime.reversible.ReversibleStage.inverse
    monkeypatch.setattr(revify.runtime.reversible.ReversibleStage, "inverse",
                        lambda self, coupled, anchors=None: real(self, coupled, anchors) * 1.001)
    code, out, _ = run(capsys, "verify", folder / "model.pt")
    assert code == 1 and "FAIL" in out and "3 of 11 checks passed" in out


def test_verify_catches_a_wrong_backward(capsys, monkeypatch):
    import revify.runtime.reversible as reversible
    real = reversible._own_halves
    monkeypatch.setattr(reversible, "_own_halves",
                        lambda *args: [h * 1.01 for h in real(*args)])  # a rebuild 1% off
    code, out, _ = run(capsys, "verify", "resnet18", *SMALL)
    assert code == 1
    assert next(line for line in out.splitlines() if line.startswith("gradients")).endswith("FAIL")


def test_verify_of_a_model_built_by_name_checks_branches_that_compute(capsys, monkeypatch):
    """timm zero-initialises each branch's last norm: with random weights the branches would
    output constants and their convolutions get no gradient to check. revify verify sets such
    weights to one first (a file's trained weights are left as they are)."""
    import timm

    import revify.verify as verify_module
    zero = lambda model: [n for n, p in model.named_parameters()
                          if n.endswith("weight") and not p.any()]
    assert zero(timm.create_model("resnet18", pretrained=False))  # what the check is about
    checked, real = [], verify_module.verify
    monkeypatch.setattr(verify_module, "verify", lambda rev, x: checked.append(rev) or real(rev, x))
    code, _, err = run(capsys, "verify", "timm/resnet18", *SMALL)
    assert code == 0, err
    assert zero(checked[0]) == []


def test_analyze_plan_and_bench_read_a_file(converted, capsys):
    _, folder = converted
    code, out, err = run(capsys, "plan", folder / "model.pt")
    assert code == 0 and "5 reversible in 4 stages" in out, err
    code, out, err = run(capsys, "analyze", folder / "model.pt", "--batch-size", "2")
    assert code == 0 and "input 3x32x32" in out, err   # the file's own input size
    code, out, err = run(capsys, "bench", folder / "model.pt", "--batch-size", "2", "--steps", "1")
    assert code == 0, err
    assert [line.split()[0] for line in out.splitlines()[2:7]] == [
        "original", "checkpoint", "checkpoint-timm", "checkpoint-sqrt", "revify"]
    assert "compile-budget" not in out  # --compile adds those rows (tests/test_bench.py)
    assert "1.00x" in out and "memory of revify" in err  # progress, one line per piece of work


def test_analyze_budget_in_either_gradient_regime(converted, capsys):
    """--grads picks the regime of the budget tables (accumulate by default); --json carries
    both."""
    import json
    _, folder = converted
    code, out, err = run(capsys, "analyze", folder / "model.pt", "--batch-size", "2",
                         "--memory", "512MiB", "--grads", "fresh", "--json")
    assert code == 0, err
    budget = json.loads(out)["budget"]
    answers = budget["largest_batch_by_grads"]
    assert budget["grads"] == "fresh" and budget["largest_batch"] == answers["fresh"]
    assert answers["accumulate"].keys() == answers["fresh"].keys()
    for strategy, batch in answers["accumulate"].items():  # every gradient held: fewer fit
        assert 0 < batch <= answers["fresh"][strategy]
    assert any(answers["accumulate"][s] < answers["fresh"][s] for s in answers["fresh"])
    with pytest.raises(SystemExit) as exited:  # argparse's own one-line usage error
        main(["analyze", str(folder / "model.pt"), "--grads", "sometimes"])
    assert exited.value.code == 2 and "--grads: invalid choice" in capsys.readouterr().err


def test_list_shows_the_models_the_coverage_run_converted(capsys):
    code, out, _ = run(capsys, "list", "resnet5*")
    assert code == 0
    rows = {tuple(line.split()[:2]) for line in out.splitlines()[2:] if line.strip()}
    assert ("resnet50", "timm") in rows and ("resnet50d", "timm") in rows
    assert "resnet14t" not in out  # converts with no reversible block: only with --all
    code, out, _ = run(capsys, "list", "resnet14t", "--all")
    assert code == 0 and "projection shortcut" in out and "0/4" in out


def test_console_script_runs_main():
    # (`python -m revify`, the other entry point, is what revify_cli runs)
    script = Path(sys.executable).parent / "revify"
    by_script = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert by_script.returncode == 0 and by_script.stdout.strip() == f"revify {revify.__version__}"


def test_bad_input_in_a_subprocess_is_one_line_without_traceback():
    result = revify_cli("plan", "resnet5000")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("revify: error: unknown model 'resnet5000': neither "
                                    "torchvision nor timm has it. Did you mean resnet50, ")
    assert len(set(result.stderr.split("?")[0].split(", "))) == 3  # three distinct names
    with pytest.raises(revify.UnknownModel):  # --debug lets the exception, and its traceback, out
        main(["--debug", "plan", "resnet5000"])


def _bad_files(folder: Path) -> dict[str, Path]:
    torch.save(TinyResNet().state_dict(), folder / "state_dict.pt")
    torch.save({"format": "revify", "format_version": 2, "revify_version": "9.9"},
               folder / "future.pt")
    (folder / "corrupt.pt").write_bytes(b"PK\x03\x04 not really a zip")
    torch.save(TinyResNet().state_dict(), folder / "tiny_weights.pt")
    (folder / "a_file").write_text("")
    return {p.stem: p for p in folder.iterdir()}


@pytest.mark.parametrize("args,code,message", [
    (["plan", "resnet5000"], 2, "unknown model 'resnet5000'"),
    (["plan", "timm/resnet5000"], 2, "Did you mean"),
    (["plan", "mars/resnet50"], 2, "unknown library 'mars'"),
    (["plan", "no_such_pkg.models:net"], 2, "cannot import 'no_such_pkg.models'"),
    (["plan", "collections:OrderedDict"], 2, "returned a OrderedDict, not a torch.nn.Module"),
    (["verify", "{missing}/model.pt"], 2, "no such file"),
    (["verify", "{corrupt}"], 1, "is not a readable PyTorch revify file"),
    (["verify", "{state_dict}"], 1, "is not a revify file"),
    (["analyze", "{future}"], 1, "format version 2 (written by revify 9.9)"),
    (["convert", "resnet18", "--weights", "{tiny_weights}", "--out", "{out}"], 1,
     "do not match resnet18"),
    (["convert", "resnet18", "--weights", "{state_dict}", "--out", "{missing}/m.pt"], 2,
     "folder"),
    (["convert", "resnet18", "--out", "{a_file}/m.pt"], 2, "does not exist"),
    (["convert", "resnet18", "--out", "{folder}"], 2, "is a folder"),
    (["convert", "{state_dict}", "--out", "{out}"], 2, "convert takes a model name"),
    (["convert", "resnet18", "--out", "{out}", "--input-size", "3", "32"], 2,
     "expected 3 arguments"),
    (["convert", "resnet18", "--out", "{out}", "--input-size", "3", "0", "32"], 2,
     "must be positive"),
    (["convert", "resnet18", "--out", "{out}", "--no-reversible"], 2,
     "--no-reversible is no longer an option of convert: `revify bench` measures"),
    (["convert", "resnet18", "--out", "{out}", "--store", "none"], 2, "revify-recompute row"),
    (["convert", "resnet18", "--out", "{out}", "--anchor-every", "2"], 2,
     "revify drift --anchor-every"),
    (["convert", "resnet18", "--out", "{out}", "--width", "-1"], 2,
     "neither 'match' nor a positive"),
    (["convert", "resnet18"], 2, "the following arguments are required: --out"),
    (["plan", "resnet18", "--source", "a.b:c"], 2, "--source names the source of a revify FILE"),
    (["bench", "resnet18", "--steps", "0"], 2, "must be positive"),
    (["list", "nothing_like_this*"], 2, "no convertible model matches"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
])
def test_bad_input_gets_one_line_and_an_exit_code(capsys, tmp_path, args, code, message):
    paths = {k: str(v) for k, v in _bad_files(tmp_path).items()}
    paths |= {"missing": str(tmp_path / "missing"), "out": str(tmp_path / "out.pt"),
              "folder": str(tmp_path)}
    before = sorted(os.listdir(tmp_path))
    try:
        got, out, err = run(capsys, *[a.format(**paths) for a in args])
    except SystemExit as exc:  # argparse's own errors
        got, (_, err) = exc.code, capsys.readouterr()
    assert (got, message in err) == (code, True), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == before  # no output, partial or whole


def test_unwritable_output_folder_is_refused_before_any_work(capsys, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access",
                        lambda p, mode: False if mode == os.W_OK else real_access(p, mode))
    monkeypatch.setattr("revify.models.create_model", lambda *a, **k: pytest.fail("did work"))
    code, _, err = run(capsys, "convert", "resnet18", "--out", tmp_path / "m.pt")
    assert code == 2 and "is not writable" in err
