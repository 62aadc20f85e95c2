"""The revify file: safe to load, rebuilt exactly, refused clearly when it is anything else."""
import random

import pytest
import torch
from conftest import TinyResNet, step_grads

import revify
from revify import files
from revify.models import create_model
from revify.plan.plan import Options
from revify.plan.report import carried_weights
from revify.runtime.reversible import CouplingBlock
from revify.pipeline import build


@pytest.fixture(scope="module")
def saved_resnet18(tmp_path_factory):
    torch.manual_seed(0)
    rev = revify.transform(create_model("resnet18", num_classes=7), input_size=(3, 32, 32))
    path = tmp_path_factory.mktemp("files") / "r18.pt"
    revify.save(rev, path)
    return rev, path


def test_file_loads_with_weights_only_and_names_its_source(saved_resnet18):
    rev, path = saved_resnet18
    payload = torch.load(path, weights_only=True)  # no code runs: plain data and tensors only
    assert payload["format"] == "revify" and payload["format_version"] == files.FORMAT_VERSION
    assert payload["source"] == {"library": "torchvision", "name": "resnet18",
                                 "kwargs": {"num_classes": 7}}
    assert payload["transform"]["non_invertible"] == "recompute"  # Options' names
    assert payload["inputs"] == [{"shape": [2, 3, 32, 32], "dtype": "float32"}]
    assert payload["revify_version"] == revify.__version__
    assert payload["state_dict"].keys() == rev.state_dict().keys()


def test_load_rebuilds_the_same_model(saved_resnet18, data):
    rev, path = saved_resnet18
    loaded = revify.load(path)
    assert str(loaded.revify_plan) == str(rev.revify_plan)
    for (k, a), b in zip(rev.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 6])
    got, ref = step_grads(loaded, x, y), step_grads(rev, x, y)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_user_model_needs_the_model_argument(tmp_path, data):
    x, y = data
    torch.manual_seed(0)
    rev = revify.transform(TinyResNet(), input_size=(3, 16, 16), leaf_modules=[torch.nn.Dropout])
    path = tmp_path / "tiny.pt"
    revify.save(rev, path)
    recipe = torch.load(path, weights_only=True)
    assert recipe["source"]["name"] == "conftest.TinyResNet"
    assert recipe["transform"]["leaf_modules"] == [  # classes recorded as module names
        f"stage{s}.{b}.drop" for s in (1, 2) for b in (0, 1)]
    with pytest.raises(revify.models.UnknownModel,
                       match=r"pass the model, revify.load\(path, model=...\)"):
        revify.load(path)
    loaded = revify.load(path, model=TinyResNet())
    got, ref = step_grads(loaded, x, y), step_grads(rev, x, y)
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_file_with_the_old_setting_names_loads(tmp_path):
    """Files written before the renames say checkpoint="none" and store="none" for today's
    non_invertible="store" and schedule="recompute_all"; settings no revify knows are refused."""
    torch.manual_seed(0)
    rev = build(TinyResNet(), None, Options(non_invertible="store"), input_size=(3, 16, 16))
    revify.save(rev, tmp_path / "new.pt")
    payload = torch.load(tmp_path / "new.pt", weights_only=True)
    settings = payload["transform"]
    del settings["non_invertible"], settings["schedule"]
    payload["transform"] = settings | {"checkpoint": "none", "store": "none"}
    torch.save(payload, tmp_path / "old.pt")
    loaded = revify.load(tmp_path / "old.pt", model=TinyResNet())
    assert loaded.revify_plan.options == Options(non_invertible="store", schedule="recompute_all",
                                                 couple=rev.revify_plan.options.couple)
    for (k, a), b in zip(rev.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    payload["transform"]["frobnicate"] = 1
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(revify.RevifyFileError,
                       match=r"settings this revify does not know \(frobnicate"):
        revify.load(tmp_path / "future.pt", model=TinyResNet())


def test_model_of_another_shape_is_refused(tmp_path):
    rev = revify.transform(TinyResNet(), input_size=(3, 16, 16))
    path = tmp_path / "tiny.pt"
    revify.save(rev, path)
    with pytest.raises(revify.RevifyFileError, match=r"do not match .* of another shape"):
        revify.load(path, model=TinyResNet(c=16))


def _write(path, payload):
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("make,message", [
    (lambda p: p.write_bytes(b""), "not a readable PyTorch revify file"),
    (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "is not a PyTorch revify file"),
    (lambda p: _write(p, TinyResNet()), "holds pickled Python objects"),
    (lambda p: _write(p, TinyResNet().state_dict()), "is not a revify file"),
    (lambda p: _write(p, {"format": "revify", "format_version": 99, "revify_version": "9.0"}),
     "format version 99 .* upgrade revify"),
    (lambda p: _write(p, {"format": "revify", "format_version": 1}), "damaged revify file"),
])
def test_bad_files_are_refused_in_one_sentence(tmp_path, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(revify.RevifyFileError, match=message):
        revify.load(path)


def test_truncated_file_is_refused(saved_resnet18, tmp_path):
    _, path = saved_resnet18
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(revify.RevifyFileError, match="corrupt or truncated"):
        revify.load(cut)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        revify.load(tmp_path / "nothing.pt")


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    rev = revify.transform(TinyResNet(), input_size=(3, 16, 16))
    path = tmp_path / "model.pt"
    path.write_bytes(b"the previous file")

    def half_a_save(obj, f):
        with open(f, "wb") as out:
            out.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", half_a_save)
    with pytest.raises(OSError, match="disk full"):
        revify.save(rev, path)
    assert path.read_bytes() == b"the previous file"  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temporary left


def test_output_folder_is_checked_first(tmp_path):
    rev = revify.transform(TinyResNet(), input_size=(3, 16, 16))
    with pytest.raises(revify.RevifyFileError, match="does not exist"):
        revify.save(rev, tmp_path / "missing" / "model.pt")
    with pytest.raises(revify.RevifyFileError, match="is a folder"):
        revify.save(rev, tmp_path)


def test_only_revify_models_are_saved(tmp_path):
    with pytest.raises(revify.RevifyFileError, match="expects a model from revify.transform"):
        revify.save(TinyResNet(), tmp_path / "plain.pt")


def test_weights_are_read_from_the_usual_checkpoint_layouts(tmp_path):
    state = TinyResNet().state_dict()
    ddp = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    got = files.read_weights(_write(tmp_path / "ckpt.pt", ddp))
    assert got.keys() == state.keys()
    with pytest.raises(revify.RevifyFileError, match="holds no state dict"):
        files.read_weights(_write(tmp_path / "list.pt", [1, 2, 3]))


def test_weights_carry_over_unchanged_outside_stages_and_as_slices_inside():
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=7)
    half = model.layer1[0].conv1.in_channels // 2
    for couple, g_block in [("each", model.layer1[0]), ("pairs", model.layer1[1])]:
        rev = revify.transform(model, input_size=(3, 32, 32), couple=couple)
        assert torch.equal(rev.net.stem.module.conv1.weight, model.conv1.weight)
        first = next(m for m in rev.modules() if isinstance(m, CouplingBlock))  # from layer1.0
        f_conv, g_conv = first.f.conv1.weight, first.g.conv1.weight
        f_source, g_source = model.layer1[0].conv1.weight, g_block.conv1.weight
        rows = min(f_conv.shape[0], f_source.shape[0])  # "pairs" widens the branch: new rows
        assert torch.equal(f_conv[:rows], f_source[:rows, :half])  # F: first half of inputs
        assert torch.equal(g_conv[:rows], g_source[:rows, half:])  # G: the second half
        counts = carried_weights(rev)
        assert counts["unchanged_values"] + counts["sliced_values"] == sum(
            t.numel() for t in [*rev.parameters(), *rev.buffers()] if t.is_floating_point())
        assert 0 < counts["carried_values"] <= counts["sliced_values"]

