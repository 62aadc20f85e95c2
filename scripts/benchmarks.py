"""The benchmark matrix: ResNet-18/50/101/152 and CIFAR ResNet-164, every strategy side by side.

    python scripts/benchmarks.py --out docs/benchmarks.md --plot docs/peak_vs_depth.png
    python scripts/benchmarks.py --models resnet50 --steps 3          # one model, printed only

Per model, one `revify bench` run (revify.bench.run_bench: the strategies interleaved in one
process, memory by exact live-tensor accounting on CPU or max_memory_allocated on CUDA): the
original, per-block checkpointing (revify's, and timm's set_grad_checkpointing: blocks only),
checkpoint_sequential's sqrt(n) groups, revify (and with every unit recomputing), revify with
its non-invertible layers stored (the RevNet paper's choice), revify given timm's peak as its
budget (the same memory constraint) and torch.compile with activation_memory_budget 0.5 and 0
(`--no-compile` leaves those out: compiling takes minutes on CPU; their memory comes from the
CPU allocator's profiled records); then the floor of revify's design (revify.analyze's
`Floor`: the boundary tensors plus the largest block's plain recompute, projected). The table
gives step time and peak activation memory as ratios to the original; the plot draws peak
activation memory against the number of residual blocks.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

from revify.memory.analyze import analyze
from revify.bench import (COMPILE_BUDGETS, DEFAULT_ROWS, format_compiles, format_counts, machine,
                          run_bench, strategies)

IMAGENET = {"resnet18": 8, "resnet50": 16, "resnet101": 33, "resnet152": 50}  # residual blocks


class PreActBottleneck(nn.Module):
    """ResNet-164's block (He et al., "Identity Mappings in Deep Residual Networks", 2016)."""

    def __init__(self, c_in, c, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(c_in), nn.Conv2d(c_in, c, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, stride, 1, bias=False)
        self.bn3, self.conv3 = nn.BatchNorm2d(c), nn.Conv2d(c, 4 * c, 1, bias=False)
        self.shortcut = (nn.Conv2d(c_in, 4 * c, 1, stride, bias=False)
                         if stride > 1 or c_in != 4 * c else None)

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(torch.relu(self.bn2(out)))
        out = self.conv3(torch.relu(self.bn3(out)))
        return out + shortcut


def resnet164(num_classes=10, blocks_per_stage=18):
    layers, c_in = [nn.Conv2d(3, 16, 3, padding=1, bias=False)], 16
    for stage, c in enumerate((16, 32, 64)):
        for k in range(blocks_per_stage):
            layers.append(PreActBottleneck(c_in, c, 2 if stage and not k else 1))
            c_in = 4 * c
    layers += [nn.BatchNorm2d(c_in), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
               nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def build(name):
    if name == "resnet164":
        return resnet164(), (3, 32, 32), 54
    return torchvision.models.get_model(name, num_classes=1000), None, IMAGENET[name]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=[*IMAGENET, "resnet164"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=112, help="ImageNet ResNets (ResNet-164: 32)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the markdown table here")
    p.add_argument("--plot", help="write the peak-memory-against-depth plot here (PNG)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the torch.compile rows (each compiles for minutes on CPU)")
    args = p.parse_args()
    rows, curves, counts = [], {}, []
    for name in args.models:
        torch.manual_seed(0)
        model, input_size, blocks = build(name)
        input_size = input_size or (3, args.image_size, args.image_size)
        print(f"{name}: batch {args.batch_size}, input {'x'.join(map(str, input_size))}",
              file=sys.stderr, flush=True)
        names = DEFAULT_ROWS + (tuple(COMPILE_BUDGETS) if args.compile else ())
        results = run_bench(strategies(model, input_size, names, batch_size=args.batch_size),
                            args.batch_size, input_size, args.steps, args.device)
        base = results[0]
        base_peak = base.peak_activation_bytes or base.peak_bytes
        first = len(rows)
        for r in results:
            peak = r.peak_activation_bytes if r.peak_activation_bytes is not None else r.peak_bytes
            accumulated = r.accumulate_peak_bytes
            rows.append([name, blocks, r.name, f"{r.step_seconds:.3f}",
                         f"{r.step_seconds / base.step_seconds:.2f}x", f"{peak / 2**20:.1f}",
                         f"{peak / base_peak:.2f}x", f"{accumulated / 2**20:.1f}",
                         f"{accumulated / base.accumulate_peak_bytes:.2f}x", r.memory_method])
            if name in IMAGENET:
                curves.setdefault(r.name, []).append((blocks, peak / 2**20))
        # the design's floor: every unit recomputing (stored units would count as boundaries)
        floor = analyze(model, input_size, args.batch_size, device="cpu",
                        options={"schedule": "recompute_all"}).floor()
        rows.append([name, blocks, f"floor (block {floor.block})", "-", "-",
                     f"{floor.total_bytes / 2**20:.1f}", f"{floor.total_bytes / base_peak:.2f}x",
                     "-", "-", "projected"])
        print(_table(rows[first:]), flush=True)
        print(format_counts(results), flush=True)
        counts.append((name, format_counts(results, "github")))
        for line in format_compiles(results):
            print(line, file=sys.stderr, flush=True)
    if args.out:
        _write(args, rows, counts)
    if args.plot:
        _plot(curves, args)


def _table(rows, fmt="simple"):
    from tabulate import tabulate
    return tabulate(rows, ["model", "blocks", "strategy", "step s", "time", "peak act MiB",
                           "peak act", "accum MiB", "accum", "memory by"], tablefmt=fmt,
                    disable_numparse=True)


def _write(args, rows, counts):
    command = "python scripts/benchmarks.py " + " ".join(sys.argv[1:])
    Path(args.out).write_text(
        f"# revify benchmarks\n\n`{command}`, run {time.strftime('%Y-%m-%d')} on "
        f"{machine(args.device)} ({args.device}, batch {args.batch_size}, "
        f"{args.image_size}x{args.image_size} for the ImageNet ResNets, 32x32 for ResNet-164, "
        f"fp32, median of {args.steps} steps; peak act: peak of everything a training step "
        f"allocates except parameter gradients (on CUDA: max_memory_allocated, gradients "
        f"included); accum: the peak of a step whose gradients are allocated before it "
        f"(gradient accumulation, DDP buckets), all but those gradients (gradients in flight "
        f"included); memory by: live tensors, or the CPU allocator's profiled allocations "
        f"for compiled rows; ratios to the original in the same run).\n\n{_table(rows, 'github')}\n"
        f"\n## Per training step: aten ops, Python calls, host syncs\n\nExact counts of one step "
        f"(revify.memory.counting: ops dispatched below autograd, those that are not views or "
        f"aliases, Python calls by sys.setprofile, ops whose result the host must wait for); "
        f"ratios to the original. Compiled rows are not counted.\n\n"
        + "\n\n".join(f"### {name}\n\n{table}" for name, table in counts) + "\n")


def _plot(curves, args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xlabel("residual blocks (ResNet-18/50/101/152)")
    ax.set_ylabel("peak activation memory (MiB)")
    ax.set_title(f"one training step, batch {args.batch_size}, "
                 f"{args.image_size}x{args.image_size}, {args.device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
