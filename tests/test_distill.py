"""Converting a trained model with calibration inputs (revify.distill) keeps what it learned:
the converted model starts near the original's accuracy, and is an ordinary revified model
(gradients exact, reconstruction exact, saved and loaded like any other)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TinyResNet, assert_directional_derivatives, smoothed, step_grads, worst_rel_err

import revify
from revify.distill import calibration_batches, reversible_stages

CLASSES, SIZE = 4, 8


def gratings(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A small learnable task: class c is a grating at c * 45 degrees, with random phase,
    contrast and colour, under noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    coords = torch.arange(SIZE, dtype=torch.float32) - (SIZE - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = (labels * math.pi / CLASSES)[:, None, None]
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    wave = torch.sin(2 * math.pi * (xx * torch.cos(angle) + yy * torch.sin(angle)) / 4 + phase)
    colour = torch.rand(n, 3, 1, 1, generator=g) * 2 - 1
    return wave[:, None] * colour + 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=g), labels


def accuracy(model, data) -> float:
    x, y = data
    mode = model.training
    with torch.no_grad():
        correct = (model.eval()(x).argmax(1) == y).float().mean().item()
    model.train(mode)
    return 100 * correct


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests train: tiny convolutions gain nothing from threads, and OpenMP threads on
    a busy machine wait for each other (10x slower on two shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A TinyResNet trained on `gratings` (a few seconds), and its test set."""
    torch.manual_seed(0)
    model = TinyResNet(depth=2, c=8, num_classes=CLASSES)
    x, y = gratings(2048, seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for epoch in range(4):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[start:start + 64]), y[start:start + 64]).backward()
            optimizer.step()
    return model.eval(), gratings(1024, seed=2), x[:512]


@pytest.fixture(scope="module")
def distilled(trained):
    model, _, calibration = trained
    torch.manual_seed(0)
    return revify.transform(model, input_size=(3, SIZE, SIZE), calibration=calibration,
                            distill_steps=150)


@pytest.fixture(scope="module")
def sliced(trained):
    """The trained model converted without calibration (its stages start from slices), once for
    the three tests that compare against it (none of them changes its weights), and the trained
    model's state just before that conversion."""
    before = copy.deepcopy(trained[0].state_dict())
    torch.manual_seed(0)
    return revify.transform(trained[0], input_size=(3, SIZE, SIZE)), before


def test_trained_model_keeps_its_accuracy_where_slices_lose_it(trained, distilled, sliced):
    model, test, _ = trained
    original = accuracy(model, test)
    assert original >= 90, "the task did not train: the comparison below would say nothing"
    assert accuracy(sliced[0], test) < original - 20  # what the fit has to recover
    assert accuracy(distilled, test) >= original - 5


def test_distilled_outputs_are_close_to_the_original(trained, distilled, sliced):
    model, (x, _), _ = trained
    with torch.no_grad():
        want = model(x)
        err = lambda rev: ((rev.eval()(x) - want).norm() / want.norm()).item()
        assert err(distilled) < 0.35 and err(distilled) < err(sliced[0]) / 3
    report = distilled.revify_plan.distillation
    assert report.steps == 150 and report.samples == 150 * 64
    assert all(report.error_after[s] < report.error_before[s] for s in report.error_before)
    assert "fitted to the trained stages on 9,600 calibration inputs" in str(distilled.revify_plan)


def test_only_the_reversible_stages_change_and_the_original_is_untouched(trained, distilled,
                                                                        sliced):
    model, _, _ = trained
    sliced, before = sliced  # the model's state before the conversion the fixture made
    stages = tuple(name + "." for name, m in distilled.named_modules()
                   if isinstance(m, revify.runtime.reversible.ReversibleStage))
    fitted, sliced = distilled.state_dict(), sliced.state_dict()
    outside = [k for k in fitted if not k.startswith(stages)]
    inside = [k for k in fitted if k.startswith(stages) and fitted[k].is_floating_point()]
    assert outside and all(torch.equal(fitted[k], sliced[k]) for k in outside)
    assert not all(torch.equal(fitted[k], sliced[k]) for k in inside)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_distilled_model_gradients_match_exact_autograd(trained, distilled):
    (x, y) = trained[1]
    rev = copy.deepcopy(distilled).train()
    err, where = worst_rel_err(step_grads(rev, x[:16], y[:16]),
                               step_grads(rev, x[:16], y[:16], exact=True))
    assert err <= 1e-5, f"{where} differs by {err:.2e}"


def test_distilled_model_gradients_match_float64_finite_differences(trained):
    model, (x, y), calibration = trained
    smooth = smoothed(copy.deepcopy(model))  # finite differences need no ReLU kinks
    rev = revify.transform(smooth, input_size=(3, SIZE, SIZE), calibration=calibration[:128],
                           distill_steps=5).double().train()
    assert rev.revify_plan.distillation is not None
    assert_directional_derivatives(rev, x[:4].double().requires_grad_(True), y[:4])


def test_distilled_stages_rebuild_their_input_exactly(trained, distilled):
    _, (x, _), _ = trained
    stages = list(reversible_stages(distilled).values())
    assert stages
    entries = []
    hooks = [s.register_forward_pre_hook(lambda m, args: entries.append(args[0])) for s in stages]
    with torch.no_grad():
        distilled.eval()(x[:8])
        for hook in hooks:
            hook.remove()
        for stage, entry in zip(stages, entries):
            coupled = stage.couple(entry, record=True)
            assert torch.equal(stage.inverse(coupled), coupled.entry)


def test_a_saved_distilled_model_loads_with_its_fitted_weights(trained, distilled, tmp_path):
    model, (x, _), _ = trained
    revify.save(distilled, tmp_path / "m.pt")
    loaded = revify.load(tmp_path / "m.pt", model=TinyResNet(depth=2, c=8, num_classes=CLASSES))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), distilled.eval()(x))


def test_calibration_comes_as_a_tensor_a_loader_or_an_iterator():
    like = torch.zeros((), dtype=torch.float64)
    x, y = torch.randn(100, 3), torch.arange(100)
    from_tensor = calibration_batches(x, 1, like)
    assert [len(next(from_tensor)[0]) for _ in range(3)] == [64, 36, 64]  # batched, repeated
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=50)
    batch = next(calibration_batches(loader, 1, like))
    assert len(batch) == 1 and batch[0].dtype == torch.float64  # labels dropped, model's dtype
    once = calibration_batches(iter([x[:10], x[10:20]]), 1, like)
    assert [next(once)[0][0, 0].item() for _ in range(3)] == [x[0, 0].item(), x[10, 0].item(),
                                                               x[0, 0].item()]
    for empty in (torch.empty(0, 3), [], iter([])):
        with pytest.raises(ValueError, match="calibration holds no inputs"):
            next(calibration_batches(empty, 1, like))


def _cli(capsys, *args):
    from revify.cli import main
    try:
        code = main(list(map(str, args)))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_with_calibration_fits_the_stages_and_says_so(capsys, tmp_path):
    # The command's calibration path on the suite's small net (as the next test does): what
    # is checked is the wiring (weights, calibration file, steps, report, saved file), which
    # does not depend on the model; a ResNet-18 here cost 45 s (analyze included), on one thread.
    torch.manual_seed(0)
    torch.save(TinyResNet(num_classes=10).state_dict(), tmp_path / "w.pt")
    torch.save((torch.randn(8, 3, 32, 32), torch.zeros(8)), tmp_path / "calibration.pt")
    code, out, err = _cli(capsys, "convert", "conftest:TinyResNet", "--num-classes", 10,
                          "--weights", tmp_path / "w.pt",
                          "--calibration", tmp_path / "calibration.pt",
                          "--distill-steps", 2, "--input-size", 3, 32, 32, "--batch-size", 2,
                          "--out", tmp_path / "m.pt")
    assert code == 0, err
    assert "weights: fitted to the trained stages on 16 calibration inputs (2 steps" in out
    assert "were fitted to the trained stages" in out and "On 8 calibration inputs" in out
    loaded = revify.load(tmp_path / "m.pt", model=TinyResNet(num_classes=10))
    assert loaded.revify_plan.distillation is None  # the weights carry it


@pytest.mark.parametrize("args,code,message", [
    (["--calibration", "{calibration}"], 2, "--calibration fits the converted model to trained"),
    (["--weights", "{weights}", "--calibration", "{wrong}"], 1,
     "holds inputs of shape (8, 3, 16, 16)"),
    (["--weights", "{weights}", "--calibration", "{weights}"], 1, "holds no input tensor"),
    (["--weights", "{weights}", "--calibration", "{calibration}", "--distill-steps", "0"], 2,
     "is not a positive whole number"),
])
def test_bad_calibration_gets_one_line_and_an_exit_code(capsys, tmp_path, args, code, message):
    paths = {"weights": tmp_path / "w.pt", "calibration": tmp_path / "c.pt",
             "wrong": tmp_path / "x.pt"}
    torch.save(TinyResNet().state_dict(), paths["weights"])
    torch.save(torch.randn(8, 3, 32, 32), paths["calibration"])
    torch.save(torch.randn(8, 3, 16, 16), paths["wrong"])
    got, _, err = _cli(capsys, "convert", "conftest:TinyResNet", "--input-size", 3, 32, 32,
                       "--out", tmp_path / "m.pt", *[a.format(**paths) for a in args])
    assert (got, message in err) == (code, True), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "m.pt").exists()
