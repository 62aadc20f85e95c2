"""`python -m revify`: plan and bench (the full command line grows from here)."""
from __future__ import annotations

import argparse
import sys

from . import __version__


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


def _positive_ints(values, what: str) -> tuple[int, ...]:
    if any(v <= 0 for v in values):
        raise UsageError(f"{what} must be positive, got {' '.join(map(str, values))}")
    return tuple(values)


def cmd_plan(args) -> int:
    from .models import create_model
    from .transform import transform
    model = create_model(args.model)
    rev = transform(model, input_size=_positive_ints(args.input_size, "--input-size"))
    print(rev.revify_plan)
    return 0


def cmd_bench(args) -> int:
    from .bench import format_bench, run_bench, strategies
    from .models import create_model
    input_size = _positive_ints(args.input_size, "--input-size")
    _positive_ints([args.batch_size, args.steps], "--batch-size and --steps")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
    model = create_model(args.model)
    models = strategies(model, input_size)
    print(f"{args.model}: batch {args.batch_size}, input {'x'.join(map(str, input_size))}, "
          f"{args.device}, {args.steps} timed steps per strategy", file=sys.stderr)
    results = run_bench(models, args.batch_size, input_size, args.steps, args.device,
                        progress=lambda s: print(f"  .. {s}", file=sys.stderr))
    print(format_bench(results))
    print("\npeak act: peak of all tensors a training step allocates except parameter gradients "
          "(exact live-storage accounting on CPU, max_memory_allocated on CUDA); "
          "peak: the same with gradients; time: median step")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revify", description=__doc__)
    parser.add_argument("--version", action="version", version=f"revify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="show what revify would do to a model")
    plan.add_argument("model")
    plan.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    plan.set_defaults(run=cmd_plan)
    bench = sub.add_parser("bench", help="time and memory of original, checkpointing and revify")
    bench.add_argument("model")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--input-size", type=int, nargs=3, default=[3, 112, 112], metavar=("C", "H", "W"))
    bench.add_argument("--steps", type=int, default=3)
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        if args.debug:
            raise
        print(f"revify: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # every failure is one clear line unless --debug
        if args.debug:
            raise
        print(f"revify: error: {exc}", file=sys.stderr)
        return 1
