"""What each unit's kept layers (revify.keep) are worth in step time: the default revified
ResNet-50 timed with keeping switched off in one unit at a time, in all, and in none, against
the original, every configuration in one process with the steps interleaved in shuffled order.

    python scripts/keep_ablation.py [--model resnet50] [--batch-size 16] [--size 112] [--steps 9]
"""
import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import revify
from revify.rewrite import unit_nodes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=9)
    args = p.parse_args()
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)().train()
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch_size,))
    rev = revify.transform(model, x)
    units = {seg.name: rev.net.get_submodule(node.target)
             for seg, node in unit_nodes(rev.net, rev.revify_plan)}
    keeping = [name for name, unit in units.items() if unit.keep]

    def step(net):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()

    def without(off):
        def run():
            for name in keeping:
                units[name].keep = name not in off
            step(rev)
        return run

    runs = {"original": lambda: step(model), "keeping": without(set()),
            "keeping nothing": without(set(keeping))}
    runs |= {f"not keeping {name}": without({name}) for name in keeping}
    for run in runs.values():  # warm-up
        run()
    times = {name: [] for name in runs}
    order = list(runs)
    for _ in range(args.steps):
        random.shuffle(order)
        for name in order:
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(f"{'configuration':40s} {'step s':>7s} {'time':>6s} {'keeping saves':>14s}")
    for name, t in median.items():
        saves = "" if name == "original" else \
            f"{(t - median['keeping']) / median['original']:+.3f}x"
        print(f"{name:40s} {t:7.3f} {t / median['original']:5.2f}x {saves:>14s}")


if __name__ == "__main__":
    main()
