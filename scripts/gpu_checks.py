"""The checks that need a CUDA device, in one run (a few minutes on one GPU).

    python scripts/gpu_checks.py                 # prints every table; exits 1 if a check fails

1. fp16 autocast with GradScaler: gradients of the reversible backward against plain autograd
   under the same autocast and scaler (unscaled), and bf16 likewise.
2. Drift against depth (9/18/36/54 blocks) under fp16 and bf16 autocast (`revify drift`).
3. torch.compile with inductor: gradients against eager, graph breaks, peak memory.
4. Steady state: no host sync in a training step (counted), BatchNorm statistics updated once
   (as plain autograd's), and a stream that outgrows its grid in steady state is widened on the
   device and said at the next forward (CUDA event path).
5. `revify bench` figures (max_memory_allocated, step time, counts) for resnet50 and resnet152
   at batch 64, 224x224, in float32 and under bf16 autocast.
"""
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

import revify
from revify.drift import format_drift, measure_drift

DEVICE = os.environ.get("REVIFY_DEVICE", "cuda")  # cpu: a dry run of the parts that allow it
failures = []


def check(name, value, limit):
    ok = value <= limit
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.2e} (limit {limit:.0e})", flush=True)
    if not ok:
        failures.append(name)


def grads(model, x, y, dtype, scaler=None, exact=False):
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with revify.plain_autograd() if exact else torch.enable_grad():
        with torch.autocast(DEVICE, dtype):
            loss = F.cross_entropy(model(x), y)
        (scaler.scale(loss) if scaler else loss).backward()
    scale = scaler.get_scale() if scaler else 1.0
    out = {n: p.grad.float() / scale for n, p in model.named_parameters() if p.grad is not None}
    model.load_state_dict(state)
    return out


def worst(got, ref):
    return max(((got[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30)).item() for k in ref)


def norm_err(got, ref):
    num = sum((got[k] - ref[k]).pow(2).sum() for k in ref).sqrt()
    return (num / sum(ref[k].pow(2).sum() for k in ref).sqrt()).item()


def mixed_precision():
    torch.manual_seed(0)
    rev = revify.transform(torchvision.models.resnet50(num_classes=10), input_size=(3, 64, 64)).to(DEVICE)
    x = torch.randn(16, 3, 64, 64, device=DEVICE)
    y = torch.randint(0, 10, (16,), device=DEVICE)
    for dtype, scaler in [(torch.float16, torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10)),
                          (torch.bfloat16, None)]:
        got = grads(rev, x, y, dtype, scaler)
        ref = grads(rev, x, y, dtype, scaler, exact=True)
        check(f"resnet50 {dtype} autocast{' + GradScaler' if scaler else ''}: all-parameter "
              f"gradient error vs autograd", norm_err(got, ref), 1e-2)
        print(f"     worst single tensor: {worst(got, ref):.2e}")


def drift():
    for autocast in ("fp16", "bf16"):
        rows = measure_drift(modes=(("exact", None), ("native", None), ("native", 3)),
                             autocast=autocast, device=DEVICE, batch=8, size=32)
        print(format_drift(rows), flush=True)
        for r in rows:
            if r.reconstruction == "exact":
                check(f"exact drift {r.depth} blocks {autocast}", r.reconstruction_error, 1e-6)


def compiled():
    """Inductor against eager for the original and the revified model alike: inductor's fused
    kernels round differently, and a randomly initialised ResNet amplifies rounding, so the
    revified model's error is judged against the original's own."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).to(DEVICE)
    rev = revify.transform(model, input_size=(3, 64, 64))
    x = torch.randn(32, 3, 64, 64, device=DEVICE)
    y = torch.randint(0, 10, (32,), device=DEVICE)

    def step_grads(m, params):
        for p in params.values():
            p.grad = None
        state = {k: v.clone() for k, v in m.state_dict().items()}
        F.cross_entropy(m(x), y).backward()
        m.load_state_dict(state)
        return {n: p.grad.clone() for n, p in params.items()}

    explained = torch._dynamo.explain(rev)(x)
    print(f"torch.compile: {explained.graph_count} graphs, {explained.graph_break_count} breaks "
          f"for {len(rev.revify_plan.stages)} reversible stages")
    errors = {}
    for name, m in [("original", model), ("revify", rev)]:
        params = dict(m.named_parameters())
        eager = step_grads(m, params)
        torch._dynamo.reset()
        t0 = time.time()
        comp = torch.compile(m)
        errors[name] = norm_err(step_grads(comp, params), eager)
        print(f"{name}: inductor compile + first step {time.time() - t0:.0f} s, all-parameter "
              f"gradient error vs eager {errors[name]:.2e}")
        for _ in range(2):
            comp.zero_grad(set_to_none=True)
            F.cross_entropy(comp(x), y).backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        comp.zero_grad(set_to_none=True)
        F.cross_entropy(comp(x), y).backward()
        torch.cuda.synchronize()
        print(f"compiled {name}: max_memory_allocated {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    check("inductor: revified model's gradient error over the original's", errors["revify"] / errors["original"], 10)


def steady():
    import warnings
    from revify.memory.counting import count_step
    torch.manual_seed(0)
    rev = revify.transform(torchvision.models.resnet50(num_classes=10), input_size=(3, 64, 64)).to(DEVICE)
    x = torch.randn(16, 3, 64, 64, device=DEVICE)
    y = torch.randint(0, 10, (16,), device=DEVICE)
    for _ in range(2):
        F.cross_entropy(rev(x), y).backward()
    check("host syncs in a steady-state resnet50 step", count_step(rev, x, y).syncs, 0)
    # the reruns (momentum 0 on the direct BatchNorm calls) leave the statistics of one update
    state = {k: v.clone() for k, v in rev.state_dict().items()}
    with revify.plain_autograd():
        F.cross_entropy(rev(x), y).backward()
    plain = {k: v.clone() for k, v in rev.named_buffers()}
    rev.load_state_dict(state)
    F.cross_entropy(rev(x), y).backward()
    check("BatchNorm buffers after a step vs plain autograd's (largest difference)",
          max((b.double() - plain[k].double()).abs().max().item()
              for k, b in rev.named_buffers()), 1e-6)
    stages = [m for m in rev.modules() if isinstance(m, revify.runtime.reversible.ReversibleStage)]
    with torch.no_grad():
        for norm in (m for s in stages for m in s.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            norm.weight.mul_(100.0)
    F.cross_entropy(rev(x), y).backward()
    torch.cuda.synchronize()  # the pending read is ready at the next forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(rev(x), y).backward()
    said = any("outgrew its fixed-point grid" in str(w.message) for w in caught)
    check("an outgrown grid in steady state said at the next forward (0: said)", float(not said), 0)


def bench():
    for name in ("resnet50", "resnet152"):
        for autocast in ([], ["--autocast", "bf16"]):
            cmd = [sys.executable, "-m", "revify", "bench", name, "--device", "cuda",
                   "--batch-size", "64", "--steps", "5", *autocast]
            print("$", " ".join(cmd[1:]), flush=True)
            subprocess.run(cmd, check=False)


if __name__ == "__main__":
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.__version__, torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE, flush=True)
    for part in sys.argv[1:] or ["mixed_precision", "steady", "drift", "compiled", "bench"]:
        print(f"\n== {part}", flush=True)
        globals()[part]()
    print("\nfailed:", ", ".join(failures) if failures else "none")
    sys.exit(1 if failures else 0)
