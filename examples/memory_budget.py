"""The largest batch that trains in a memory budget: original, per-block checkpointing, revify.

    python examples/memory_budget.py --model resnet50 --budget 4GiB --input-size 3 224 224
    python examples/memory_budget.py --model resnet101 --budget 80GB --optimizer adamw --dtype bf16
    python examples/memory_budget.py --smoke        # resnet18 at 64x64 under 256 MiB: seconds

Nothing is allocated: revify.analyze runs one training step of each strategy on fake tensors at
two batch sizes and counts every storage alive over time. Every allocation grows linearly with
the batch, so the two runs give the step's peak at any batch, and the largest batch under the
budget is read off that line (`Analysis.largest_batch`, what `revify analyze --memory` prints).
The peak counts parameters, gradients, optimizer state and activations; not the allocator's
fragmentation or the framework's own workspace, so leave some headroom on a real device.
Gradients are taken as allocated before the step (`--grads accumulate`, the default: gradient
accumulation, DDP, and the larger figure); `--grads fresh` for zero_grad(set_to_none=True).
"""
from __future__ import annotations

import argparse
import sys

import revify
from revify.memory.analyze import STRATEGIES, Analysis, parse_bytes, parse_dtype
from revify.models import UnknownModel, create_model

GiB = 2**30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50", help="a torchvision or timm name")
    p.add_argument("--budget", default="4GiB", help="memory budget: 4GiB, 24GB, 512MiB, 80e9")
    p.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adamw"], default="sgd",
                   help="optimizer state per parameter: none, one or two tensors")
    p.add_argument("--probe-batch", type=int, default=8,
                   help="the batch the step is projected at (and twice it); any size gives the "
                        "same answer")
    p.add_argument("--grads", choices=["accumulate", "fresh"], default="accumulate",
                   help="gradients allocated before the step, or created during it")
    p.add_argument("--details", action="store_true", help="also print revify analyze's tables")
    p.add_argument("--smoke", action="store_true", help="resnet18, 3x64x64, 256MiB: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.input_size, args.budget = "resnet18", [3, 64, 64], "256MiB"
    try:
        args.budget, args.dtype = parse_bytes(args.budget), parse_dtype(args.dtype)
    except ValueError as exc:
        p.exit(2, f"{p.prog}: error: {exc}\n")
    return args


def budget_rows(analysis: Analysis) -> list[list]:
    """Per strategy: the largest batch, its peak, and how many times the original's batch."""
    largest = analysis.largest_batch()
    rows = []
    for strategy in STRATEGIES:
        batch = largest[strategy]
        peak = f"{analysis.peak_at(strategy, batch) / GiB:.2f}" if batch else "-"
        gain = f"{batch / largest['original']:.2f}x" if largest["original"] else "-"
        rows.append([strategy, batch, peak, gain])
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        model = create_model(args.model)
    except UnknownModel as exc:
        print(f"{sys.argv[0]}: error: {exc}", file=sys.stderr)
        return 2
    analysis = revify.analyze(model, tuple(args.input_size), args.probe_batch, args.dtype,
                              args.optimizer, args.budget, name=args.model, grads=args.grads)
    if args.details:
        print(analysis.format() + "\n")
    from tabulate import tabulate
    print(f"{args.model}, input {'x'.join(map(str, args.input_size))}, {analysis.dtype}, "
          f"optimizer {analysis.optimizer}, gradients {analysis.grads}, projected for "
          f"{analysis.device}: budget {args.budget / GiB:.2f} GiB")
    print(tabulate(budget_rows(analysis), ["strategy", "largest batch", "peak GiB at it",
                                           "vs original"], disable_numparse=True,
                   colalign=["left", "right", "right", "right"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
