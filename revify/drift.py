"""How far the reversible backward drifts from plain autograd as a stage gets deeper.

`revify drift` builds ResNet stages of n basic blocks (conv-BN-ReLU-conv-BN, ReLU after the add),
revifies each with every reconstruction mode asked for and measures, under one autocast dtype:

- reconstruction: the stage input rebuilt from the stage output by running the blocks backwards
  (what the backward does), relative max error against the input the forward saw;
- gradients: the reversible backward against plain autograd on the same model, input and
  autocast (`plain_autograd`), the worst norm-wise relative error over parameters and input.

Weights are random and BatchNorm is in training mode for the gradients, as at the start of
training, when activations are least tame.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from revify.plan.plan import Options
from revify.pipeline import build
from revify.verify import gradient_error, reconstruction_errors

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(out)))


def stage_model(depth: int, channels: int = 16, num_classes: int = 10) -> nn.Module:
    """stem -> `depth` basic blocks -> pool -> linear: one reversible stage once revified."""
    return nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        *[BasicBlock(channels) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))


@dataclass
class DriftRow:
    depth: int
    reconstruction: str       # "exact" or "native"
    anchor_every: int | None
    autocast: str
    reconstruction_error: float
    gradient_error: float


def measure_drift(depths=(9, 18, 36, 54), modes=(("exact", None), ("native", None)),
                  autocast: str = "bf16", device: str = "cpu", batch: int = 4, size: int = 16,
                  channels: int = 16, seed: int = 0) -> list[DriftRow]:
    rows = []
    for depth in depths:
        torch.manual_seed(seed)
        model = stage_model(depth, channels)
        x = torch.randn(batch, 3, size, size, device=device)
        for reconstruction, anchor_every in modes:
            options = Options(reconstruction=reconstruction, anchor_every=anchor_every)
            rev = build(model, None, options, input_size=(3, size, size)).to(device)
            with _autocast(device, autocast):
                recon = max(reconstruction_errors(rev, x).values())
                grads = gradient_error(rev.train(), x)[0]
            rows.append(DriftRow(depth, reconstruction, anchor_every, autocast, recon, grads))
    return rows


def _autocast(device: str, name: str):
    dtype = AUTOCAST[name]
    return nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype)


def format_drift(rows: list[DriftRow], fmt: str = "simple") -> str:
    from tabulate import tabulate
    table = [[r.depth,
              r.reconstruction + (f", anchor every {r.anchor_every}" if r.anchor_every else ""),
              r.autocast, f"{r.reconstruction_error:.1e}", f"{r.gradient_error:.1e}"] for r in rows]
    return tabulate(table, ["blocks", "reconstruction", "autocast", "rebuilt input error",
                            "gradient error vs autograd"], tablefmt=fmt, disable_numparse=True)
