"""Quick start: revify a ResNet-50, see the plan and the memory analysis, train a few steps,
compare measured step memory.

    python examples/quickstart.py            # ResNet-50, batch 16, 112x112, CPU: about a minute
    python examples/quickstart.py --smoke    # ResNet-18, tiny input: seconds
"""
import argparse

import torch
import torch.nn.functional as F
import torchvision

import revify
from revify.memory.measure import measure_step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run (used by the tests)")
    args = parser.parse_args()
    if args.smoke:
        args.model, args.batch_size, args.image_size, args.steps = "resnet18", 2, 32, 2

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, num_classes=10)
    # shapes only: the batch and size of the step it plans for (nothing is computed on them)
    example = torch.empty(args.batch_size, 3, args.image_size, args.image_size)
    rev = revify.transform(model, example)
    print(rev.revify_plan)
    # Projected memory of one training step per strategy (fake tensors: nothing is allocated),
    # and the largest batch that fits 16 GiB.
    analysis = revify.analyze(model, (3, args.image_size, args.image_size), args.batch_size,
                              memory="16GiB", device="cpu")
    print("\n" + analysis.format())

    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    y = torch.randint(0, 10, (args.batch_size,))
    optimizer = torch.optim.AdamW(rev.parameters(), lr=1e-3)
    for step in range(args.steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(rev(x), y)
        loss.backward()  # reversible stages rebuild their activations here
        optimizer.step()
        print(f"step {step}: loss {loss.item():.4f}")

    mib = 2 ** 20
    original, revified = measure_step(model.train(), x, y), measure_step(rev.train(), x, y)
    print(f"\nactivation memory of one training step (peak, gradients excluded): "
          f"original {original.peak_activation_bytes / mib:.1f} MiB, "
          f"revified {revified.peak_activation_bytes / mib:.1f} MiB "
          f"({revified.peak_activation_bytes / original.peak_activation_bytes:.2f}x)")
    # gradient accumulation, DDP: every gradient exists before the step; what the step adds
    original, revified = (measure_step(m.train(), x, y, grads="accumulate") for m in (model, rev))
    print(f"with gradients allocated before the step (peak, gradients in flight included): "
          f"original {original.peak_bytes / mib:.1f} MiB, revified {revified.peak_bytes / mib:.1f} "
          f"MiB ({revified.peak_bytes / original.peak_bytes:.2f}x)")


if __name__ == "__main__":
    main()
