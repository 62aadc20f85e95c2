"""Where a revified step's extra time goes: the forward and backward of the original, of revify,
of the same revified model with plain autograd (`plain_autograd`: nothing recomputed, so what is
left is the architecture's own cost: half-width couplings, the grid), and of revify with
`reconstruction="native"` (no grid), and of revify with the couplings `couple="auto"` turned
down (pairs of blocks, or one coupling per block: twice the branches, narrower), every
configuration in one process with the steps interleaved in shuffled order. Ratios are to the
original's step.

The last row is about what revify's step cannot go below at its plan: the step with nothing
recomputed plus one forward of the revified model without autograd (the recompute's own
arithmetic; a little more than it, since the backward reruns neither the stored units nor the
kept layers). revify's step minus that row is what its rerun machinery costs.

    python scripts/time_breakdown.py [--model resnet50] [--batch-size 16] [--size 112] [--steps 9]
"""
import contextlib
import time

import torch
import torch.nn.functional as F
from interleaved import arguments, medians, model_and_batch

import revify
from revify.plan.plan import Options
from revify.pipeline import build as revify_build


def main() -> None:
    args = arguments(__doc__)
    build, x, y = model_and_batch(args)
    rev = revify.transform(build(), x)
    native = revify_build(build(), x, Options(reconstruction="native"))
    other = "each" if rev.revify_plan.options.couple == "pairs" else "pairs"
    turned_down = revify.transform(build(), x, couple=other)

    def step(net, context=contextlib.nullcontext):
        with context():
            net.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = F.cross_entropy(net(x), y)
            middle = time.perf_counter()
            loss.backward()
            return middle - start, time.perf_counter() - middle

    def forward_only(net):
        with torch.no_grad():
            start = time.perf_counter()
            net(x)
            return time.perf_counter() - start, 0.0

    original = build()
    median = medians({
        "original": lambda: step(original),
        "revify": lambda: step(rev),
        "revify, nothing recomputed": lambda: step(rev, revify.plain_autograd),
        "revify, no grid": lambda: step(native),
        f"revify, couple='{other}'": lambda: step(turned_down),
        f"couple='{other}', nothing recomp.": lambda: step(turned_down, revify.plain_autograd),
        "forward without autograd": lambda: forward_only(rev),
    }, args.steps)
    median["nothing recomputed + that"] = [sum(median["revify, nothing recomputed"]),
                                           median["forward without autograd"][0]]
    base = sum(median["original"])
    print(f"{args.model}, batch {args.batch_size}, {args.size}x{args.size}, "
          f"medians of {args.steps} interleaved steps ({torch.get_num_threads()} threads)")
    print(f"{rev.revify_plan.coupling or 'couple=' + repr(rev.revify_plan.options.couple)}")
    print(f"{'':30} {'forward ms':>10} {'backward ms':>11} {'step':>7}")
    for name, (forward, backward) in median.items():
        print(f"{name:30} {forward * 1e3:10.1f} {backward * 1e3:11.1f} "
              f"{(forward + backward) / base:6.3f}x")


if __name__ == "__main__":
    main()
