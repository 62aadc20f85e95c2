"""`python -m revify`: plan, bench and analyze (the full command line grows from here)."""
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
    models = strategies(model, input_size, native=args.native)
    print(f"{args.model}: batch {args.batch_size}, input {'x'.join(map(str, input_size))}, "
          f"{args.device}, {args.steps} timed steps per strategy", file=sys.stderr)
    results = run_bench(models, args.batch_size, input_size, args.steps, args.device,
                        progress=lambda s: print(f"  .. {s}", file=sys.stderr))
    print(format_bench(results))
    print("\npeak act: peak of all tensors a training step allocates except parameter gradients "
          "(exact live-storage accounting; not measurable on CUDA, where the allocator's peak "
          "includes gradients: '-'); peak: the same with gradients (max_memory_allocated on "
          "CUDA); time: median step")
    return 0


def cmd_analyze(args) -> int:
    import json

    from tabulate import tabulate_formats

    from .analyze import analyze, measure, parse_bytes, parse_dtype, plot, require_matplotlib
    from .models import create_model
    input_size = _positive_ints(args.input_size, "--input-size")
    _positive_ints([args.batch_size], "--batch-size")
    try:
        dtype = parse_dtype(args.dtype)
        memory = None if args.memory is None else parse_bytes(" ".join(args.memory))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.format not in tabulate_formats:
        raise UsageError(f"--format: unknown table format '{args.format}' (tabulate has "
                         f"{', '.join(sorted(tabulate_formats))})")
    if args.plot:
        require_matplotlib()  # fail before the analysis, not after it
    model = create_model(args.model)
    run = measure if args.measure else analyze
    result = run(model, input_size, args.batch_size, dtype, args.optimizer, memory,
                 curves=True if args.plot else None, name=args.model)
    if args.plot:
        plot(result, args.plot)
        print(f"revify: wrote {args.plot}", file=sys.stderr)
    print(json.dumps(result.to_json(), indent=2) if args.json else result.format(args.format, args.blocks))
    return 0


def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Bad arguments: one line on stderr and exit 2, as for every other usage error."""
    def error(message):
        parser.exit(2, f"revify: error: {message}\n")
    parser.error = error
    return parser


def _add_analyze(sub) -> None:
    analyze = _one_line_errors(sub.add_parser(
        "analyze", help="project (or --measure) the memory of a training step under each strategy",
        description="Exact memory accounting of one training step (forward + backward) under the "
                    "original network, per-block checkpointing and revify, run on fake tensors: "
                    "nothing is allocated."))
    analyze.add_argument("model", help="a torchvision or timm model name")
    analyze.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    analyze.add_argument("--batch-size", type=int, default=64)
    analyze.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    analyze.add_argument("--optimizer", choices=["sgd", "momentum", "adamw"], default="sgd",
                         help="optimizer state per parameter: sgd none, momentum 1, adamw 2")
    analyze.add_argument("--memory", nargs="+", metavar="SIZE",
                         help="a budget such as 24GiB, 24GB, 512MiB or 80e9 (bytes); default: the "
                              "CUDA device's memory when there is one")
    analyze.add_argument("--format", default="simple", help="any tabulate table format")
    analyze.add_argument("--json", action="store_true", help="print JSON only")
    analyze.add_argument("--blocks", action="store_true", help="expand reversible stages into blocks")
    analyze.add_argument("--measure", action="store_true",
                         help="also run a real training step and show measured next to projected")
    analyze.add_argument("--plot", metavar="PNG", help="draw peak memory against batch size "
                                                        "(needs matplotlib)")
    analyze.set_defaults(run=cmd_analyze)


def build_parser() -> argparse.ArgumentParser:
    parser = _one_line_errors(argparse.ArgumentParser(prog="revify", description=__doc__))
    parser.add_argument("--version", action="version", version=f"revify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = _one_line_errors(sub.add_parser("plan", help="show what revify would do to a model"))
    plan.add_argument("model")
    plan.add_argument("--input-size", type=int, nargs=3, default=[3, 224, 224], metavar=("C", "H", "W"))
    plan.set_defaults(run=cmd_plan)
    bench = _one_line_errors(sub.add_parser(
        "bench", help="time and memory of original, checkpointing and revify"))
    bench.add_argument("model")
    bench.add_argument("--batch-size", type=int, default=16)
    bench.add_argument("--input-size", type=int, nargs=3, default=[3, 112, 112], metavar=("C", "H", "W"))
    bench.add_argument("--steps", type=int, default=3)
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--native", action="store_true",
                       help="also measure reconstruction='native' (stream in the activation dtype)")
    bench.set_defaults(run=cmd_bench)
    _add_analyze(sub)
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
