"""revify's command line: convert, plan, analyze, verify, bench and list.

MODEL is a torchvision or timm name (`resnet50`, `timm/resnet50d`) or `package.module:factory`;
FILE is a file written by `revify convert` / `revify.save`. Bad input gets one line on stderr:
exit 2 for usage errors (what was typed), 1 for failures (what was found); `--debug` shows the
traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from revify import __version__
from revify.files import RevifyFileError
from revify.models import UnknownModel


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


USAGE_ERRORS = (UsageError, UnknownModel, FileNotFoundError)
FILE_SUFFIXES = (".pt", ".pth", ".revify")


# ----------------------------------------------------------------------------- arguments
def _positive_ints(values, what: str) -> tuple[int, ...]:
    if any(v <= 0 for v in values):
        raise UsageError(f"{what} must be positive, got {' '.join(map(str, values))}")
    return tuple(values)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a positive whole number")
    return int(text)


def _width(text: str):
    if text == "match":
        return text
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"'{text}' is neither 'match' nor a positive number")
    return value


def _add_input_size(p, default=None) -> None:
    p.add_argument("--input-size", type=int, nargs=3, default=default, metavar=("C", "H", "W"),
                   help="input shape without the batch"
                   + ("" if default else " (default: a file's own, else 3 224 224)"))


def _add_model(p, what="a model name or a revify file") -> None:
    p.add_argument("model",
                   help=f"{what}: resnet50, timm/resnet50d, package.module:factory, model.pt")
    p.add_argument("--source", metavar="package.module:factory",
                   help="for a FILE from user code: the factory that builds its source model")


# Flags of the baselines that convert no longer takes -> where their measurement lives now.
MOVED = {
    "--checkpoint": "the layers outside reversible stages are always checkpointed; `revify "
                    "bench` measures them stored (its revify-stored row)",
    "--no-reversible": "`revify bench` measures per-block checkpointing (its checkpoint row)",
    "--store": "`revify bench` measures every unit recomputed (its revify-recompute row)",
    "--reconstruction": "`revify bench --native` and `revify drift` measure native reconstruction",
    "--anchor-every": "`revify drift --anchor-every K` measures anchors",
}


class _Moved(argparse.Action):
    """A removed flag: one sentence saying where it went, exit 2."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} is no longer an option of convert: {MOVED[option_string]}")


def _add_transform_options(p) -> None:
    g = p.add_argument_group("transform options (see revify.transform)")
    g.add_argument("--width", type=_width, default=None,
                   help="'match' (keep each stage's parameters, default) or an internal "
                        "width factor")
    g.add_argument("--couple", choices=("auto", "pairs", "each"), default=None,
                   help="'pairs': two consecutive blocks make one coupling; 'each': every block "
                        "is a coupling of its own; 'auto' (default): pairs unless they peak higher")
    g.add_argument("--leaf-module", action="append", default=[], metavar="NAME",
                   help="a submodule torch.fx should not trace into (repeatable)")
    for flag in MOVED:
        g.add_argument(flag, action=_Moved, nargs="?", help=argparse.SUPPRESS)


def _transform_options(args) -> dict:
    """The transform options given on the command line."""
    options = {"width": args.width, "couple": args.couple, "leaf_modules": args.leaf_module or None}
    return {k: v for k, v in options.items() if v is not None}


# ----------------------------------------------------------------------------- models
@dataclass
class Source:
    """What a MODEL or FILE argument names: the source model and how to revify it."""
    name: str
    model: object                # the untransformed nn.Module
    options: dict                # settings as revify.pipeline.build_with takes them
    input_size: tuple[int, ...]
    payload: dict | None = None  # the file's contents, when it was a file

    def revified(self):
        from revify.files import build
        from revify.pipeline import build_with
        if self.payload is None:
            return build_with(self.model, None, self.options, input_size=self.input_size)
        return build(self.payload, self.model, self.name)


def _is_file(spec: str) -> bool:
    return os.path.exists(spec) or spec.endswith(FILE_SUFFIXES)


def _source(args, **kwargs) -> Source:
    from revify.files import read, source_of
    from revify.models import create_model
    if not _is_file(args.model):
        if args.source:
            raise UsageError("--source names the source of a revify FILE; MODEL is built by name")
        input_size = _positive_ints(args.input_size or (3, 224, 224), "--input-size")
        return Source(args.model, create_model(args.model, **kwargs), {}, input_size)
    payload = read(args.model)
    model = create_model(args.source) if args.source else None
    file_size = tuple(payload["inputs"][0]["shape"][1:])
    input_size = _positive_ints(args.input_size or file_size, "--input-size")
    return Source(args.model, source_of(payload, model), dict(payload["transform"]), input_size,
                  payload)


def _progress(done: int, total: int, what: str) -> None:
    """A progress bar on a terminal; one line per piece of work in a log."""
    if sys.stderr.isatty():
        bar = "#" * (24 * done // total)
        end = "\n" if done == total else ""
        print(f"\r  [{bar:<24}] {done}/{total} {what:<40}", end=end, file=sys.stderr, flush=True)
    else:
        print(f"  {done}/{total} {what}", file=sys.stderr)


# ----------------------------------------------------------------------------- commands
def cmd_convert(args) -> int:
    from revify.memory.analyze import analyze, format_totals
    from revify.files import load_weights, read_calibration, read_weights, save
    from revify.models import create_model
    from revify.plan.report import format_weights
    from revify.pipeline import transform
    input_size = _positive_ints(args.input_size, "--input-size")
    _positive_ints([args.batch_size], "--batch-size")
    if _is_file(args.model):
        raise UsageError(f"convert takes a model name, not a file ('{args.model}'); "
                         f"--weights takes the source model's weights")
    if args.calibration and not args.weights:
        raise UsageError("--calibration fits the converted model to trained weights: give them "
                         "with --weights")
    _check_out(args.out)  # before the work, so a typo costs nothing
    options = _transform_options(args)
    # the stages fitted to the weights on these inputs (revify.distill); not a plan option
    fit = {"calibration": read_calibration(args.calibration, input_size),
           "distill_steps": args.distill_steps} if args.calibration else {}
    kwargs = {} if args.num_classes is None else {"num_classes": args.num_classes}
    model = create_model(args.model, **kwargs)
    weights = None
    if args.weights:
        weights = read_weights(args.weights)
        load_weights(model, weights, args.weights, args.model)
    rev = transform(model, input_size=input_size, **options, **fit)
    print(rev.revify_plan)
    if weights is not None:
        print("\n" + format_weights(model, rev, input_size, fit.get("calibration")))
    memory = analyze(model, input_size, args.batch_size, name=args.model, options=options,
                     revified=rev)
    print(f"\nprojected memory of one training step at batch {args.batch_size} "
          f"(revify analyze for the full tables):\n" + format_totals(memory))
    save(rev, args.out)
    print(f"revify: wrote {args.out}", file=sys.stderr)
    return 0


def cmd_plan(args) -> int:
    source = _source(args)
    print(source.revified().revify_plan)
    return 0


def cmd_analyze(args) -> int:
    import json

    from tabulate import tabulate_formats

    from revify.memory.analyze import (analyze, measure, parse_bytes, parse_dtype, plot,
                                       require_matplotlib)
    from revify.files import atomic_path
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
        _check_out(args.plot)
    source = _source(args)
    run = measure if args.measure else analyze
    result = run(source.model, source.input_size, args.batch_size, dtype, args.optimizer, memory,
                 curves=True if args.plot else None, name=source.name, options=source.options,
                 grads=args.grads)
    if args.plot:
        with atomic_path(args.plot) as tmp:
            plot(result, tmp)
        print(f"revify: wrote {args.plot}", file=sys.stderr)
    print(json.dumps(result.to_json(), indent=2) if args.json
          else result.format(args.format, args.blocks))
    return 0


def cmd_verify(args) -> int:
    import torch

    from revify.verify import format_checks, unzero_init, verify
    _positive_ints([args.batch_size], "--batch-size")
    source = _source(args)
    rev = source.revified()
    if source.payload is None:  # random weights: zero-initialised norms would leave little to check
        unzero_init(rev)
    print(f"{source.name}: {sum(b.action == 'reversible' for b in rev.revify_plan.blocks)} "
          f"reversible blocks, batch {args.batch_size}, "
          f"input {'x'.join(map(str, source.input_size))}",
          file=sys.stderr)
    checks = verify(rev, torch.empty(args.batch_size, *source.input_size))
    print(format_checks(checks))
    return 0 if all(c.passed for c in checks) else 1


def cmd_bench(args) -> int:
    from revify.bench import (AUTOCAST, COMPILE_BUDGETS, DEFAULT_ROWS, format_bench,
                              format_compiles, format_counts, run_bench, strategies)
    _positive_ints([args.batch_size, args.steps], "--batch-size and --steps")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device is available")
    source = _source(args)
    rows = DEFAULT_ROWS + (("revify-native",) if args.native else ()) + \
        (tuple(COMPILE_BUDGETS) if args.compile else ())
    models = strategies(source.model, source.input_size, rows, batch_size=args.batch_size,
                        **source.options)
    if source.payload is not None:  # the file's own weights for the revified row
        models["revify"] = source.revified()
    print(f"{source.name}: batch {args.batch_size}, input {'x'.join(map(str, source.input_size))}, "
          f"{args.device}{', ' + args.autocast + ' autocast' if args.autocast else ''}"
          f"{', channels_last' if args.channels_last else ''}, "
          f"{args.steps} timed steps per strategy", file=sys.stderr)
    results = run_bench(models, args.batch_size, source.input_size, args.steps, args.device,
                        progress=_progress, autocast=AUTOCAST.get(args.autocast),
                        channels_last=args.channels_last)
    print(format_bench(results))
    print("\npeak act: peak of all tensors a training step allocates except parameter gradients "
          "(exact live-storage accounting; not measurable on CUDA, where the allocator's peak "
          "includes gradients: '-'); peak: the same with gradients counted from birth "
          "(zero_grad(set_to_none=True); max_memory_allocated on CUDA); accum: the peak of a "
          "step whose gradients exist before it (gradient accumulation, DDP buckets), all but "
          "those gradients; time: median step; memory by: live tensors (a dispatch mode), "
          "allocator profile (the CPU allocator's profiled allocations and frees, for compiled "
          "code, which allocates out of the dispatch mode's sight; kernel workspaces left out as "
          "there)")
    print("\nper training step, exact counts (on a GPU every kernel op is a launch, every Python "
          "call time between launches, every host sync a stall; compiled rows are not counted):")
    print(format_counts(results))
    for line in format_compiles(results):
        print(line)
    return 0


def cmd_list(args) -> int:
    from tabulate import tabulate

    from revify.models import list_convertible
    found = list_convertible(args.pattern, args.all)
    if not found:
        raise UsageError(f"no {'' if args.all else 'convertible '}model matches '{args.pattern}' "
                         f"in the coverage run, which covers the ResNet families (try 'revify "
                         f"list --all', or 'revify plan NAME' for any other model)")
    rows = [[r["model"], r["lib"], r.get("rev") or "-"] + ([r["note"] or ""] if args.all else [])
            for r in found]
    print(tabulate(rows,
                   ["model", "library", "reversible blocks"] + (["why not"] if args.all else []),
                   disable_numparse=True))
    print(f"\n{len(found)} models, each converted with random weights by scripts/coverage.py "
          f"(docs/coverage.md); a name both libraries have is tv/NAME or timm/NAME")
    return 0


def cmd_drift(args) -> int:
    import torch

    from revify.drift import format_drift, measure_drift
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if args.autocast == "fp16" and args.device == "cpu":
        raise UsageError("--autocast fp16 needs --device cuda (CPU autocast runs bf16)")
    modes = [("exact", None), ("native", None)] + (
        [("native", args.anchor_every)] if args.anchor_every else [])
    rows = measure_drift(_positive_ints(args.depths, "--depths"), modes, args.autocast, args.device,
                         args.batch_size, args.image_size)
    print(format_drift(rows))
    return 0


def _check_out(path: str) -> None:
    from revify.files import check_writable
    try:
        check_writable(path)
    except RevifyFileError as exc:
        raise UsageError(str(exc)) from exc


# ----------------------------------------------------------------------------- parser
def _one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Bad arguments: one line on stderr and exit 2, as for every other usage error."""
    def error(message):
        parser.exit(2, f"revify: error: {message}\n")
    parser.error = error
    return parser


def _add_convert(sub) -> None:
    from revify.distill import DEFAULT_STEPS
    p = _one_line_errors(sub.add_parser(
        "convert", help="revify a model and write it to a file",
        description="Revify MODEL, print the plan and the projected memory, and write a file "
                    "that revify.load (or torch.load(weights_only=True)) reads back."))
    p.add_argument("model", help="resnet50, timm/resnet50d or package.module:factory")
    p.add_argument("--out", required=True, help="the file to write (written atomically)")
    p.add_argument("--weights", metavar="FILE", help="a local state dict of the source model "
                                                      "(nothing is downloaded)")
    p.add_argument("--calibration", metavar="FILE",
                   help="unlabelled inputs of the data the --weights were trained on (a tensor N x "
                        "C x H x W, or an (inputs, labels) pair, saved with torch.save): fit each "
                        "reversible stage to the trained one, keeping the model's accuracy")
    p.add_argument("--distill-steps", type=_positive_int, default=DEFAULT_STEPS, metavar="N",
                   help=f"training steps of that fit (default {DEFAULT_STEPS})")
    p.add_argument("--num-classes", type=int, help="classifier outputs, passed to the constructor")
    _add_input_size(p, [3, 224, 224])
    p.add_argument("--batch-size", type=int, default=64, help="batch of the memory table")
    _add_transform_options(p)
    p.set_defaults(run=cmd_convert)


def _add_analyze(sub) -> None:
    p = _one_line_errors(sub.add_parser(
        "analyze", help="project (or --measure) the memory of a training step under each strategy",
        description="Exact memory accounting of one training step (forward + backward) under the "
                    "original network, per-block checkpointing and revify, run on fake tensors: "
                    "nothing is allocated."))
    _add_model(p)
    _add_input_size(p)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument("--optimizer", choices=["sgd", "momentum", "adamw"], default="sgd",
                   help="optimizer state per parameter: sgd none, momentum 1, adamw 2")
    p.add_argument("--memory", nargs="+", metavar="SIZE",
                   help="a budget such as 24GiB, 24GB, 512MiB or 80e9 (bytes); default: the "
                        "CUDA device's memory when there is one")
    p.add_argument("--grads", choices=["accumulate", "fresh"], default="accumulate",
                   help="the gradients the budget tables assume: allocated before the step "
                        "(accumulate: gradient accumulation, DDP, zero_grad(set_to_none=False)) "
                        "or created during it (fresh: zero_grad(set_to_none=True)); the tables "
                        "and --json show both peaks")
    p.add_argument("--format", default="simple", help="any tabulate table format")
    p.add_argument("--json", action="store_true", help="print JSON only")
    p.add_argument("--blocks", action="store_true", help="expand reversible stages into blocks")
    p.add_argument("--measure", action="store_true",
                   help="also run a real training step and show measured next to projected")
    p.add_argument("--plot", metavar="PNG", help="draw peak memory against batch size "
                                                 "(needs matplotlib)")
    p.set_defaults(run=cmd_analyze)


def build_parser() -> argparse.ArgumentParser:
    parser = _one_line_errors(argparse.ArgumentParser(prog="revify", description=__doc__))
    parser.add_argument("--version", action="version", version=f"revify {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_convert(sub)
    p = _one_line_errors(sub.add_parser("plan", help="show what revify would do to a model"))
    _add_model(p)
    _add_input_size(p)
    p.set_defaults(run=cmd_plan)
    _add_analyze(sub)
    p = _one_line_errors(sub.add_parser(
        "verify", help="check gradients, reconstruction and BatchNorm against plain autograd"))
    _add_model(p)
    _add_input_size(p)
    p.add_argument("--batch-size", type=int, default=2)
    p.set_defaults(run=cmd_verify)
    p = _one_line_errors(sub.add_parser(
        "bench", help="time and memory of original, checkpointing and revify, side by side"))
    _add_model(p)
    _add_input_size(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--autocast", choices=["bf16", "fp16"],
                   help="run every forward under autocast to this dtype (mixed precision)")
    p.add_argument("--channels-last", action="store_true",
                   help="store the input and the models in channels_last (NHWC), as GPU "
                        "mixed-precision training usually does")
    p.add_argument("--native", action="store_true",
                   help="also measure reconstruction='native' (stream in the activation dtype)")
    p.add_argument("--compile", action="store_true",
                   help="also measure torch.compile (inductor) of the original with "
                        "activation_memory_budget 0.5 and 0 (slow on CPU: a minute or more each)")
    p.set_defaults(run=cmd_bench)
    p = _one_line_errors(sub.add_parser(
        "drift", help="reconstruction and gradient error against stage depth, per mode",
        description="Builds ResNet stages of each depth (random weights), revifies them with exact "
                    "and native reconstruction and measures the rebuilt stage input and the "
                    "gradients against plain autograd under the same autocast."))
    p.add_argument("--depths", type=int, nargs="+", default=[9, 18, 36, 54])
    p.add_argument("--autocast", choices=["bf16", "fp16", "none"], default="bf16")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--anchor-every", type=_positive_int, default=None, metavar="K",
                   help="also measure native reconstruction with an anchor every K blocks")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=16)
    p.set_defaults(run=cmd_drift)
    p = _one_line_errors(sub.add_parser("list", help="the models revify converts"))
    p.add_argument("pattern", nargs="?", default="*", help="a shell pattern such as 'resnet*'")
    p.add_argument("--all", action="store_true", help="also the models that convert with no "
                                                      "reversible block or fail, with the reason")
    p.set_defaults(run=cmd_list)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except USAGE_ERRORS as exc:
        if args.debug:
            raise
        print(f"revify: error: {_sentence(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # every failure is one clear line unless --debug
        if args.debug:
            raise
        print(f"revify: error: {_sentence(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("revify: interrupted", file=sys.stderr)
        return 130


def _sentence(exc: BaseException) -> str:
    """An exception as one line (the type's name when it carries no message)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, KeyError) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text
