"""Train a revified ResNet on CIFAR-10 with DistributedDataParallel, one process per device.

    torchrun --nproc_per_node=2 examples/train_ddp.py --synthetic --smoke        # CPU, gloo
    torchrun --nproc_per_node=8 examples/train_ddp.py --data ~/data/cifar10 --amp  # GPUs, nccl

Options as in train_cifar.py; --batch-size is per process. Each process trains on its own
shard of the data (DistributedSampler); DDP averages the gradients, so the replicas must end
bit-identical, which the run checks at the end (exit 1 if not). The revified model goes into
DDP like any module: its reversible stages take their parameters as autograd inputs, so DDP's
gradient hooks fire as the backward rebuilds each stage.
"""
from __future__ import annotations

import math
import os
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data.distributed import DistributedSampler

import train_cifar as cifar


def setup(args) -> tuple[int, int]:
    """Join the process group torchrun describes; (rank, world size)."""
    if "RANK" not in os.environ:
        cifar.fail("run me with torchrun, e.g. torchrun --nproc_per_node=2 "
                   "examples/train_ddp.py --synthetic --smoke")
    if args.device.type == "cuda":
        args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def gathered(totals: cifar.Totals, device) -> list[cifar.Totals]:
    """Every rank's totals, on every rank."""
    mine = torch.tensor([totals.loss, totals.correct, totals.seen], dtype=torch.float64,
                        device=device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [cifar.Totals(t[0].item(), int(t[1].item()), int(t[2].item())) for t in everyone]


def combined(parts: list[cifar.Totals]) -> cifar.Totals:
    return cifar.Totals(sum(p.loss for p in parts), sum(p.correct for p in parts),
                        sum(p.seen for p in parts))


def max_parameter_difference(model: torch.nn.Module) -> float:
    """The largest |difference| between any rank's parameters and rank 0's."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    difference = (flat - reference).abs().max()
    dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    return difference.item()


def main(argv=None) -> int:
    args = cifar.parse_args(cifar.parser(__doc__), argv)
    rank, world = setup(args)
    torch.manual_seed(args.seed)  # the same model on every rank (DDP also broadcasts rank 0's)
    train_set, test_set = cifar.datasets(args)
    net = cifar.build_model(args.model, args.revify).to(args.device)
    model = DDP(net, device_ids=[args.device.index] if args.device.type == "cuda" else None)
    train_sampler = DistributedSampler(train_set, world, rank, shuffle=True, seed=args.seed,
                                       drop_last=True)
    train_loader = cifar.loader(train_set, args, True, train_sampler)
    test_loader = cifar.loader(test_set, args, False, DistributedSampler(test_set, world, rank,
                                                                         shuffle=False))
    steps_per_epoch = min(len(train_loader), args.steps or math.inf)
    if steps_per_epoch == 0:
        cifar.fail(f"fewer training images per rank ({len(train_sampler)}) than one batch")
    optimizer, schedule = cifar.make_optimizer(model, args, args.epochs * steps_per_epoch)
    precision = cifar.Precision(args.device, args.amp)
    if rank == 0:
        print(str(net.revify_plan).splitlines()[0] if args.revify else "the original network")
        print(f"{args.model}, DDP over {world} processes ({dist.get_backend()}), {args.device.type}, "
              f"batch {args.batch_size} per process, {steps_per_epoch} steps per epoch", flush=True)
    for epoch in range(1, args.epochs + 1):
        train_sampler.set_epoch(epoch)
        if args.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(args.device)
        start = time.perf_counter()
        train = gathered(cifar.train_epoch(model, train_loader, optimizer, schedule, precision,
                                           args.device, args.steps), args.device)
        test = combined(gathered(cifar.evaluate(model, test_loader, precision, args.device,
                                                args.steps), args.device))
        if rank == 0:
            per_rank = ", ".join(f"{t.loss / t.seen:.4f}" for t in train)
            print(f"epoch {epoch}: loss per rank [{per_rank}] | {combined(train)} | test {test} | "
                  f"{time.perf_counter() - start:.1f} s | {cifar.peak_memory(args.device)} "
                  f"(rank 0)", flush=True)
    difference = max_parameter_difference(model)
    if rank == 0:
        verdict = "in sync" if difference == 0 else "NOT in sync"
        print(f"parameters {verdict} across {world} ranks: max |difference| {difference:g}")
    dist.destroy_process_group()
    return 0 if difference == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
