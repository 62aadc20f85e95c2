"""Converting a trained ResNet: accuracy kept at step 0 and after one epoch of fine-tuning.

A CIFAR-style ResNet-20 is trained on a synthetic 10-class image task made here (oriented,
textured gratings under random colour, phase and noise: learnable, nothing downloaded), then
converted three ways and fine-tuned for one epoch each:

- `slices`: `revify.transform(trained)`: F and G start from slices of the trained layers;
- `distill`: `revify.transform(trained, calibration=...)`: F and G fitted to the trained stages
  on unlabelled training images (revify.distill);
- `scratch`: a revified ResNet-20 of fresh weights, trained for the same one epoch;
- `distill, pairs` and `scratch, pairs`: the same with couple="pairs" (couple="auto" takes one
  coupling per block for this model: its basic-block stages set the peak).

It prints test accuracy before and after the epoch (the original too, fine-tuned alike), the time
each conversion took, and the peak activation memory of one fine-tuning step
(revify.memory.measure.measure_step: every tensor allocated during the step, counted exactly)
against the original's.

    python scripts/trained_conversion.py [--epochs 8] [--train 4000] [--size 16] [--seed 0]
        [--threads 1]

About 5 minutes on two CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import revify
from revify.memory.measure import measure_step

CLASSES = 10


# ----------------------------------------------------------------------------- data
def make_images(n: int, size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images of `size` x `size`: class c is a grating at orientation c * 18 degrees, of a
    class-dependent spatial frequency, with a second weaker grating of a random orientation,
    random phase, contrast and colour, and Gaussian noise. Orientation and frequency tell the
    classes apart; nothing else does."""
    labels = torch.randint(0, CLASSES, (n,), generator=generator)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def grating(angle, frequency, phase):
        along = xx * torch.cos(angle)[:, None, None] + yy * torch.sin(angle)[:, None, None]
        return torch.sin(2 * math.pi * frequency[:, None, None] * along / size
                         + phase[:, None, None])

    rand = lambda *shape: torch.rand(*shape, generator=generator)
    angle = labels * math.pi / CLASSES + (rand(n) - 0.5) * 0.15
    frequency = 2.0 + (labels % 3) * 0.75 + (rand(n) - 0.5) * 0.4
    signal = grating(angle, frequency, rand(n) * 2 * math.pi) * (0.5 + rand(n))[:, None, None]
    clutter = grating(rand(n) * math.pi, 1.5 + 3 * rand(n), rand(n) * 2 * math.pi) * 0.4
    colour = rand(n, 3, 1, 1) * 2 - 1
    images = ((signal + clutter)[:, None] * colour
              + torch.randn(n, 3, size, size, generator=generator) * 0.5)
    return images, labels


def batches(images, labels, batch_size, generator=None):
    order = torch.randperm(len(images), generator=generator) if generator is not None \
        else torch.arange(len(images))
    for start in range(0, len(images), batch_size):
        index = order[start:start + batch_size]
        yield images[index], labels[index]


# ----------------------------------------------------------------------------- model
class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """He et al.'s CIFAR ResNet-20: 3 stages of 3 BasicBlocks, 16/32/64 channels."""

    def __init__(self, widths=(16, 32, 64), depth=3, num_classes=CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        layers, c_in = [], widths[0]
        for k, c in enumerate(widths):
            blocks = ([BasicBlock(c_in, c, 1 if k == 0 else 2)]
                      + [BasicBlock(c, c) for _ in range(depth - 1)])
            layers.append(nn.Sequential(*blocks))
            c_in = c
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


# ----------------------------------------------------------------------------- training
def train_epochs(model, data, epochs, lr, seed, batch_size=128):
    """SGD with momentum and a cosine schedule over `epochs`, one step per batch."""
    images, labels = data
    steps = epochs * math.ceil(len(images) / batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4,
                                nesterov=True)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for x, y in batches(images, labels, batch_size, generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            schedule.step()
    return model


@torch.no_grad()
def accuracy(model, data) -> float:
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches(*data, 500))
    model.train()
    return 100.0 * correct / len(data[0])


def peak_activation_mib(model, data, batch_size=128) -> float:
    x, y = data[0][:batch_size], data[1][:batch_size]
    return measure_step(model.train(), x, y).peak_activation_bytes / 2**20


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8, help="epochs of training the original")
    parser.add_argument("--train", type=int, default=4000, help="training images")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--calibration", type=int, default=1024,
                        help="unlabelled training images the distillation fits on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    # Small convolutions gain little from threads, and OpenMP threads on a busy machine wait
    # for each other: one thread ran this model 10x faster than two on a shared 2-core machine.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train = make_images(args.train, args.size, generator)
    test = make_images(4000, args.size, generator)
    input_size = (3, args.size, args.size)

    start = time.perf_counter()
    original = train_epochs(ResNet20(), train, args.epochs, lr=0.1, seed=args.seed)
    print(f"trained the original for {args.epochs} epochs in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    fine_tune = lambda model: train_epochs(model, train, 1, lr=0.01, seed=args.seed + 1)
    # the original fine-tuned for the same epoch: what the epoch itself does to the accuracy
    rows = [("original", accuracy(original, test),
             accuracy(fine_tune(copy.deepcopy(original)), test),
             None, peak_activation_mib(copy.deepcopy(original), train))]
    conversions = {
        "slices": lambda: revify.transform(original, input_size=input_size),
        "distill": lambda: revify.transform(original, input_size=input_size,
                                            calibration=train[0][:args.calibration]),
        # couple="auto" takes one coupling per block here (a basic-block stage sets the peak);
        # the pairs it turned down, for the accuracy and memory they trade
        "distill, pairs": lambda: revify.transform(original, input_size=input_size,
                                                   calibration=train[0][:args.calibration],
                                                   couple="pairs"),
    }
    for name, convert in conversions.items():
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        rev = convert()
        seconds = time.perf_counter() - start
        before = accuracy(rev, test)
        memory = peak_activation_mib(copy.deepcopy(rev), train)
        rows.append((name, before, accuracy(fine_tune(rev), test), seconds, memory))
        print(f"{name}: converted in {seconds:.0f} s, fine-tuned", flush=True)
    for name, couple in (("scratch", "auto"), ("scratch, pairs", "pairs")):
        torch.manual_seed(args.seed)
        scratch = revify.transform(ResNet20(), input_size=input_size, couple=couple)
        rows.append((name, accuracy(scratch, test),
                     accuracy(train_epochs(scratch, train, 1, lr=0.1, seed=args.seed + 1), test),
                     None, peak_activation_mib(copy.deepcopy(scratch), train)))
    print_table(rows, rows[0][4])


def print_table(rows, original_mib) -> None:
    header = ("model", "test acc. at step 0", "after 1 epoch", "conversion s",
              "peak act. MiB (x orig.)")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for name, before, after, seconds, mib in rows:
        cells = [name, f"{before:.1f}%", "" if after is None else f"{after:.1f}%",
                 "" if seconds is None else f"{seconds:.1f}",
                 f"{mib:.2f} ({mib / original_mib:.2f}x)"]
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
