"""What each unit's kept layers (revify.runtime.keep) are worth in step time: the default revified
ResNet-50 timed with keeping switched off in one unit at a time, in all, and in none, against
the original, every configuration in one process with the steps interleaved in shuffled order.

    python scripts/keep_ablation.py [--model resnet50] [--batch-size 16] [--size 112] [--steps 9]
"""
import dataclasses
import time

import torch.nn.functional as F
from interleaved import arguments, medians, model_and_batch

import revify
from revify.rewrite import set_mode, unit_nodes


def main() -> None:
    args = arguments(__doc__)
    build, x, y = model_and_batch(args)
    model = build().train()
    rev = revify.transform(build().train(), x)
    units = {seg.name: rev.net.get_submodule(node.target)
             for seg, node in unit_nodes(rev.net, rev.revify_plan)}
    chosen = {name: unit.schedule for name, unit in units.items()}
    keeping = [name for name, schedule in chosen.items() if schedule.kept]

    def step(net):
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        F.cross_entropy(net(x), y).backward()
        return (time.perf_counter() - start,)

    def without(off):
        def run():
            for name in keeping:
                kept = frozenset() if name in off else chosen[name].kept
                set_mode(units[name], dataclasses.replace(chosen[name], kept=kept))
            return step(rev)
        return run

    runs = {"original": lambda: step(model), "keeping": without(set()),
            "keeping nothing": without(set(keeping))}
    runs |= {f"not keeping {name}": without({name}) for name in keeping}
    median = {name: t for name, (t,) in medians(runs, args.steps).items()}
    print(f"{'configuration':40s} {'step s':>7s} {'time':>6s} {'keeping saves':>14s}")
    for name, t in median.items():
        saves = "" if name == "original" else \
            f"{(t - median['keeping']) / median['original']:+.3f}x"
        print(f"{name:40s} {t:7.3f} {t / median['original']:5.2f}x {saves:>14s}")


if __name__ == "__main__":
    main()
