"""Coverage: run revify.transform over the timm and torchvision ResNet families, one row per model.

    python scripts/coverage.py                          # every model, conversion only
    python scripts/coverage.py --filter 'seresnet*' --grad --memory --out coverage.md

Models are built with random weights (nothing is downloaded). Every failure is caught and
recorded; the run never stops on a model.
"""
import argparse
import fnmatch
import json
import re
import signal
import time
from collections import Counter
from pathlib import Path

import timm
import torch
import torchvision
from tabulate import tabulate

import revify
from revify.bench import machine
from revify.verify import unzero_init

TIMM_PATTERNS = ["resnet*", "resnext*", "seresnet*", "seresnext*", "ecaresnet*", "resnetrs*",
                 "wide_resnet*", "skresnet*", "resnetblur*", "gcresnet*"]
TORCHVISION = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
               "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
LIST_FILE = Path(revify.__file__).parent / "coverage.json"
SIZES = [32, 64, 128]  # tried in order, then the model's own pretrained_cfg size
MAX_CHECKED_PARAMS = 250e6  # float64 grad checks of larger models do not fit in 24 GiB


class Timeout(BaseException):  # not an Exception: revify's handlers must not catch it
    pass


def _alarm(signum, frame):
    raise Timeout("timed out")


def models(pattern):
    timm_names = sorted({n for p in TIMM_PATTERNS for n in timm.list_models(p)})
    out = [("timm", n) for n in timm_names] + [("torchvision", n) for n in TORCHVISION]
    return [(lib, n) for lib, n in out if any(fnmatch.fnmatch(n, p) for p in pattern.split(","))]


def create(lib, name):
    # zero-initialised last norms would make every branch output a constant: nothing to check
    if lib == "timm":
        return unzero_init(timm.create_model(name, pretrained=False))
    return unzero_init(torchvision.models.get_model(name, weights=None))


def input_sizes(lib, model):
    sizes = list(SIZES)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if lib == "timm" and "input_size" in cfg and cfg["input_size"][-1] not in sizes:
        sizes.append(cfg["input_size"][-1])
    return sizes


def convert(lib, model):
    """revify.transform at the smallest input size that traces; returns (rev, size)."""
    err = None
    for size in input_sizes(lib, model):
        try:
            return revify.transform(model, input_size=(3, size, size)), size
        except revify.TraceError as exc:  # shapes: try a larger input
            err = exc
            if "example input" not in str(exc):
                raise
    raise err


def grad_error(rev, size):
    """Norm-wise relative error of all parameter gradients together: reversible backward vs
    plain autograd on the same model and input, in float32.

    float32, where the coupled stream lies on a fixed-point grid: every activation is rebuilt to
    the bit, so the two backward passes run the same kernels on the same values and agree
    exactly (0.0) unless something is wrong. (This table was made when the exact stream was
    carried in float64, which rebuilt activations to the bit as well.) float64 would be the
    weaker check: these randomly initialised nets at
    32x32 and batch 2 (BatchNorm over 2 values in the last stage; resnet50x4_clip_gap's gradient
    norm is 1e21 for an output of 7) amplify that rounding to O(1). Norms are taken in float64
    (float32 squares overflow at such gradients), and over all tensors together: a bias in
    front of a softmax has a gradient that is zero but for rounding, and its ratio says nothing.
    """
    rev = rev.float().train()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))

    def grads():
        rev.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        out = rev(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        (out.double() ** 2).mean().backward()
        return {n: p.grad.double() for n, p in rev.named_parameters() if p.grad is not None}

    buffers = {k: v.clone() for k, v in rev.state_dict().items()}
    g = grads()
    rev.load_state_dict(buffers)  # same BatchNorm statistics for the reference
    with revify.plain_autograd():
        ref = grads()
    diff = sum((g[n] - r).pow(2).sum() for n, r in ref.items()).sqrt()
    return (diff / sum(r.pow(2).sum() for r in ref.values()).sqrt().clamp_min(1e-300)).item()


def memory_saving(model, size, batch):
    a = revify.analyze(model, input_size=(3, size, size), batch_size=batch, device="cpu")
    # activations only: at these small inputs weights and gradients would swamp the difference
    return 1 - (a.strategies["revify"].peak_activation_bytes
                / a.strategies["original"].peak_activation_bytes)


def reasons(plan, all_reasons):
    """Why blocks were not made reversible: one example per kind of reason, with its count.

    Projection shortcuts (expected: they change the shape) are listed only if `all_reasons`.
    """
    counts, example = Counter(), {}
    for b in plan.blocks:
        if b.action == "reversible" or (not all_reasons and "projection shortcut" in b.reason):
            continue
        kind = re.sub(r"'[^']*'|\([^)]*\)|\d+", "_", b.reason)  # names and numbers vary
        counts[kind] += 1
        example.setdefault(kind, b.reason)
    return [f"{n}x {example[k]}" for k, n in counts.most_common()]


def run(lib, name, args):
    row = dict(model=name, lib=lib)
    model = create(lib, name)
    rev, size = convert(lib, model)
    plan = rev.revify_plan
    n_rev = sum(b.action == "reversible" for b in plan.blocks)
    row.update(size=size, rev=f"{n_rev}/{len(plan.blocks)}", stages=len(plan.stages),
               params_M=f"{plan.params_before / 1e6:.2f}", after_M=f"{plan.params_after / 1e6:.2f}",
               dparams=f"{plan.params_after / plan.params_before - 1:+.1%}")
    if plan.params_before > MAX_CHECKED_PARAMS and (args.memory or args.grad):
        row["ok"] = "yes" if n_rev else "no"
        row["note"] = f"grad/memory not run: over {MAX_CHECKED_PARAMS / 1e6:.0f}M parameters"
        return row
    if args.memory:
        row["mem_saving"] = f"{memory_saving(model, size, args.batch):.1%}"
    if args.grad:
        row["grad_err"] = f"{grad_error(rev, size):.1e}"
    row["ok"] = "yes" if n_rev else "no"
    row["note"] = "; ".join(reasons(plan, all_reasons=not n_rev))
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filter", default="*",
                        help="fnmatch pattern(s) on the model name, comma-separated")
    parser.add_argument("--out", help="write the table as markdown here")
    parser.add_argument("--grad", action="store_true", help="check grads against plain_autograd")
    parser.add_argument("--memory", action="store_true", help="projected peak-memory saving")
    parser.add_argument("--batch", type=int, default=32, help="batch size for --memory")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per model")
    parser.add_argument("--resume", action="store_true", help="keep the rows already in --out")
    args = parser.parse_args()

    signal.signal(signal.SIGALRM, _alarm)
    rows = read_table(args.out) if args.resume else []
    done = {(r["lib"], r["model"]) for r in rows}
    for lib, name in models(args.filter):
        if (lib, name) in done:
            continue
        t0 = time.time()
        signal.alarm(args.timeout)
        try:
            row = run(lib, name, args)
        except BaseException as exc:  # noqa: BLE001  one model never stops the run
            if isinstance(exc, KeyboardInterrupt):
                raise
            first = (str(exc).strip().splitlines() or [""])[0]
            row = dict(model=name, lib=lib, ok="error", note=f"{type(exc).__name__}: {first}")
        finally:
            signal.alarm(0)
        row["time_s"] = f"{time.time() - t0:.1f}"
        rows.append(row)
        print(" | ".join(str(v) for v in row.values()), flush=True)
        if args.out:  # after every model: a long run that is stopped still leaves its table
            write(rows, args.out, args.batch)


def read_table(path):
    """The rows of a table this script wrote (markdown, github format)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return [dict(zip(cells[0], row)) for row in cells[2:]]


def write(rows, path, batch):
    ok = sum(r["ok"] == "yes" for r in rows)
    summary = f"{ok}/{len(rows)} models have >=1 reversible block; " \
              f"{sum(r['ok'] == 'no' for r in rows)} convert with none; " \
              f"{sum(r['ok'] == 'error' for r in rows)} fail"
    cols = list(dict.fromkeys(k for r in sorted(rows, key=lambda r: -len(r)) for k in r))
    cols = [c for c in cols if c not in ("note", "time_s")] + ["time_s", "note"]
    table = tabulate([[r.get(c, "") for c in cols] for r in rows], headers=cols, tablefmt="github",
                     disable_numparse=True)
    with open(path, "w") as f:
        f.write(f"# revify coverage\n\nGenerated by `python scripts/coverage.py --grad --memory "
                f"--out {path}` (random weights, smallest of {SIZES} pixels that traces; "
                f"mem_saving: projected peak activation memory of one training step at batch "
                f"{batch}, revify against the original; "
                f"grad_err: reversible backward vs plain autograd in float32, norm-wise relative "
                f"error of all parameter gradients together; every model built with "
                f"revify.verify.unzero_init, so that its branches compute).\n\n"
                f"Run {time.strftime('%Y-%m-%d')} on {machine()}, timm {timm.__version__}."
                f"\n\n{summary}\n\n{table}\n")
    with open(LIST_FILE, "w") as f:  # what `revify list` reads
        json.dump([{k: r.get(k) for k in ("model", "lib", "rev", "ok", "note")} for r in rows], f,
                  indent=1)


if __name__ == "__main__":
    main()
