"""Train a revified ResNet on CIFAR-10.

    python examples/train_cifar.py --data ~/data/cifar10 --epochs 30 --amp   # the real thing
    python examples/train_cifar.py --synthetic --epochs 3                      # no data set needed
    python examples/train_cifar.py --synthetic --smoke                         # seconds (the tests)

The data set is read from --data with torchvision's CIFAR10 (download=False: the folder must
already hold `cifar-10-batches-py`). --synthetic draws a learnable stand-in instead: one fixed
random image per class plus noise, so the loss falls and the accuracy rises within an epoch.

Models. `resnet18` (the default) is torchvision's ResNet-18 with the stem adapted to 32x32
images (3x3 stride-1 conv, no max-pool), the usual CIFAR variant: the ImageNet stem would shrink
the image to 8x8 before the first stage. Its stages have two blocks, the first of three of them a
projection block, so revify makes five blocks reversible in four stages. `resnet20` ... `resnet110`
are He et al.'s CIFAR ResNets (16/32/64 channels, 3n blocks per stage, subsample-and-pad
shortcuts): thin, and deep stages where reversibility saves the most; resnet20 is what --smoke
trains.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import revify

NUM_CLASSES = 10
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_RESNETS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}


# ----------------------------------------------------------------------------- models
class CifarBlock(nn.Module):
    """He et al.'s CIFAR block; a downsampling one subsamples x and pads it with zero channels."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))

    def shortcut(self, x):
        if self.stride == 1 and not self.pad:
            return x  # written out: revify sees even x[:, :, ::1, ::1] as a transformed shortcut
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


class CifarResNet(nn.Module):
    def __init__(self, blocks_per_stage: int, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        layers, c_in = [], 16
        for c_out, stride in [(16, 1), (32, 2), (64, 2)]:
            for i in range(blocks_per_stage):
                layers.append(CifarBlock(c_in, c_out, stride if i == 0 else 1))
                c_in = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def cifar_resnet18() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS = ["resnet18", *CIFAR_RESNETS]


def build_model(name: str, revified: bool = True) -> nn.Module:
    model = cifar_resnet18() if name == "resnet18" else CifarResNet(CIFAR_RESNETS[name])
    return revify.transform(model, input_size=(3, 32, 32)) if revified else model


# ----------------------------------------------------------------------------- data
def synthetic_data(size: int, seed: int) -> torch.utils.data.TensorDataset:
    """A learnable stand-in for CIFAR-10: a fixed random image per class plus as much noise.

    The class images come from seed 0 and the samples from `seed`, so a train and a test split
    share their classes."""
    prototypes = torch.randn(NUM_CLASSES, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=generator)
    images = prototypes[labels] + torch.randn(size, 3, 32, 32, generator=generator)
    return torch.utils.data.TensorDataset(images, labels)


def cifar_data(root: str) -> tuple:
    """CIFAR-10's train and test splits, read from `root` (raises if they are not there)."""
    import torchvision.transforms as T
    normalize = T.Normalize(CIFAR_MEAN, CIFAR_STD)
    augment = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                         normalize])
    plain = T.Compose([T.ToTensor(), normalize])
    return (torchvision.datasets.CIFAR10(root, train=True, transform=augment, download=False),
            torchvision.datasets.CIFAR10(root, train=False, transform=plain, download=False))


def datasets(args) -> tuple:
    """(train, test) for the options, or exit 2 with one line when the data set is not there."""
    if args.synthetic:
        test_size = max(args.synthetic_size // 4, 1)
        return synthetic_data(args.synthetic_size, seed=1), synthetic_data(test_size, seed=2)
    if not args.data:
        fail("give --data PATH (a folder holding cifar-10-batches-py) or --synthetic")
    try:
        return cifar_data(args.data)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted..."
        fail(f"no CIFAR-10 under {args.data} ({exc}); nothing is downloaded: "
             f"put cifar-10-batches-py there, or use --synthetic")


def fail(message: str) -> None:
    print(f"{sys.argv[0]}: error: {message}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- training
class Precision:
    """Mixed precision for the device: bf16 autocast on CPU; fp16 and a GradScaler on CUDA
    (fp16 gradients underflow without loss scaling; bf16 has float32's range)."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled = device, enabled
        self.dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.enabled)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.scale(loss).backward()  # reversible stages rebuild their activations here
        self.scaler.step(optimizer)
        self.scaler.update()


def make_optimizer(model: nn.Module, args, steps_total: int):
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=steps_total,
                                                   pct_start=0.15)
    return optimizer, schedule


@dataclass
class Totals:
    """Loss summed over samples, correct predictions and samples seen, on this process."""
    loss: float = 0.0
    correct: int = 0
    seen: int = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss += F.cross_entropy(logits.detach().float(), labels, reduction="sum").item()
        self.correct += (logits.argmax(1) == labels).sum().item()
        self.seen += len(labels)

    def __str__(self) -> str:
        return f"loss {self.loss / self.seen:.4f} acc {self.correct / self.seen:.2%}"


def train_epoch(model, loader, optimizer, schedule, precision: Precision, device,
                max_steps) -> Totals:
    model.train()
    totals = Totals()
    for step, (images, labels) in enumerate(loader):
        if step == max_steps:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            logits = model(images)
            loss = F.cross_entropy(logits, labels)
        precision.step(loss, optimizer)
        schedule.step()
        totals.add(logits, labels)
    return totals


@torch.no_grad()
def evaluate(model, loader, precision: Precision, device, max_steps) -> Totals:
    model.eval()
    totals = Totals()
    for step, (images, labels) in enumerate(loader):
        if step == max_steps:
            break
        images, labels = images.to(device), labels.to(device)
        with precision.autocast():
            totals.add(model(images), labels)
    return totals


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "peak memory: not measured on cpu"
    return f"peak memory {torch.cuda.max_memory_allocated(device) / 2**20:,.0f} MiB"


# ----------------------------------------------------------------------------- command line
def parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description.splitlines()[0])
    p.add_argument("--data", metavar="PATH", help="folder holding cifar-10-batches-py")
    p.add_argument("--synthetic", action="store_true", help="random learnable data, no data set")
    p.add_argument("--synthetic-size", type=int, default=5000, help="synthetic training images")
    p.add_argument("--model", choices=MODELS, default="resnet18")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=128, help="per process")
    p.add_argument("--lr", type=float, default=0.1, help="peak of the one-cycle schedule")
    p.add_argument("--no-revify", dest="revify", action="store_false",
                   help="train the original network (to compare time and peak memory)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CPU, fp16 + GradScaler on CUDA")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--steps", type=int, default=None, help="at most this many steps per epoch "
                                                           "(and evaluation batches)")
    p.add_argument("--workers", type=int, default=2, help="data loader processes (CIFAR only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a seconds-long run: resnet20, synthetic "
                                                        "data, 2 epochs of 3 steps")
    return p


def parse_args(p: argparse.ArgumentParser, argv=None):
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.synthetic, args.synthetic_size = "resnet20", True, 256
        args.epochs, args.steps, args.batch_size = 2, 3, 16
    for name in ("epochs", "batch_size", "synthetic_size"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive")
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        fail("--device cuda: no CUDA device is available")
    return args


def loader(dataset, args, shuffle: bool, sampler=None):
    workers = 0 if args.synthetic else args.workers
    return torch.utils.data.DataLoader(dataset, args.batch_size, shuffle=shuffle and sampler is None,
                                       sampler=sampler, num_workers=workers, drop_last=shuffle,
                                       pin_memory=args.device.type == "cuda")


def main(argv=None) -> None:
    args = parse_args(parser(), argv)
    torch.manual_seed(args.seed)
    train_set, test_set = datasets(args)
    model = build_model(args.model, args.revify).to(args.device)
    print(str(model.revify_plan).splitlines()[0] if args.revify else "the original network")
    train_loader, test_loader = loader(train_set, args, True), loader(test_set, args, False)
    steps_per_epoch = min(len(train_loader), args.steps or math.inf)
    if steps_per_epoch == 0:
        fail(f"fewer training images ({len(train_set)}) than one batch ({args.batch_size})")
    optimizer, schedule = make_optimizer(model, args, args.epochs * steps_per_epoch)
    precision = Precision(args.device, args.amp)
    print(f"{args.model} on {'synthetic data' if args.synthetic else args.data}, {args.device}, "
          f"batch {args.batch_size}, {steps_per_epoch} steps per epoch"
          f"{', amp ' + str(precision.dtype).removeprefix('torch.') if args.amp else ''}")
    for epoch in range(1, args.epochs + 1):
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        start = time.perf_counter()
        train = train_epoch(model, train_loader, optimizer, schedule, precision, args.device,
                            args.steps)
        test = evaluate(model, test_loader, precision, args.device, args.steps)
        print(f"epoch {epoch}: {train} | test {test} | {time.perf_counter() - start:.1f} s | "
              f"{peak_memory(args.device)}", flush=True)


if __name__ == "__main__":
    main()
