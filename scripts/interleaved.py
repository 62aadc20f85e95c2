"""What the timing scripts share: their command line, the model and batch they time, and
steps of several configurations interleaved in shuffled order in one process (this machine's
speed drifts by several percent within minutes: only ratios from one run compare)."""
import argparse
import random
import statistics

import torch

from revify.models import create_model


def arguments(doc: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default="resnet50",
                   help="a model name (torchvision, timm or package.module:factory)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--steps", type=int, default=9)
    return p.parse_args()


def model_and_batch(args: argparse.Namespace):
    """A factory of `args.model` (random weights, 1000 classes) and a random batch for it
    (seeded)."""
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.size, args.size)
    y = torch.randint(0, 1000, (args.batch_size,))
    return lambda: create_model(args.model, num_classes=1000), x, y


def medians(runs: dict, steps: int) -> dict:
    """Each run (a function returning its step's times) once to warm up, then `steps` rounds
    in shuffled order; the median of each of its times."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    order = list(runs)
    for _ in range(steps):
        random.shuffle(order)
        for name in order:
            times[name].append(runs[name]())
    return {name: [statistics.median(column) for column in zip(*t)] for name, t in times.items()}
