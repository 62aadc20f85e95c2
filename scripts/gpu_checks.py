"""The checks that need a CUDA device, in one run (about 8 minutes on one H200).

    python scripts/gpu_checks.py [PART ...] [--out DIR]   # exits 1 if a check fails

Parts, in the order they run (the most wanted first; a part that raises is reported and the
next one runs; parts not started by GPU_CHECKS_SECONDS, default 480, are skipped and named):
1. bench: step time, peak memory and counts of original, per-block checkpointing (every unit;
   timm-style, stem and head stored) and revify on resnet50 and resnet152 at batch 64, 224x224,
   under bf16 autocast (channels_last and NCHW) and in float32 (cuDNN's default TF32
   convolutions), strategies interleaved.
2. profile: resnet50 at batch 64, 224x224, bf16, channels_last and NCHW: step time with CUDA
   events of original, per-block checkpointing, revify, revify with nothing recomputed (the
   architecture's own cost) and revify without the grid, each beside the GPU busy time of one
   profiled step (the rest is the GPU waiting for the host); op tables and revify's Chrome
   trace to DIR.
3. steady: no host sync in a training step (counted), BatchNorm statistics updated once (as plain
   autograd's), and a stream that outgrows its grid in steady state is widened on the device
   and said at the next forward (CUDA event path).
4. mixed_precision: fp16 autocast with GradScaler, gradients of the reversible backward against
   plain autograd under the same autocast and scaler (unscaled), and bf16 likewise.
5. drift: reconstruction drift against depth (9/18/36/54 blocks) under fp16 and bf16 autocast.
6. compiled: torch.compile with inductor: gradients against eager, graph breaks, peak memory.
7. compiled_speed: step time of original and revify compiled with inductor against eager
   (resnet50 at the bench's input, bf16, channels_last).
The gradient checks run with TF32 off; the timings with PyTorch's defaults, as users train.
"""
import contextlib
import os
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import torchvision

import revify
from revify.drift import format_drift, measure_drift

DEVICE = os.environ.get("REVIFY_DEVICE", "cuda")  # cpu: a dry run of the parts that allow it
# The bench's input; GPU_CHECKS_SMALL=1 shrinks it for a dry run of the script on a CPU.
BATCH, SIZE, STEPS = (2, 64, 2) if os.environ.get("GPU_CHECKS_SMALL") else (64, 224, 10)
failures = []


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def exact_float32():
    """TF32 off: gradient checks compare float32 arithmetic, not TF32's 10-bit mantissas."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


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
    rev = revify.transform(torchvision.models.resnet50(num_classes=10),
                           input_size=(3, 64, 64)).to(DEVICE)
    x = torch.randn(16, 3, 64, 64, device=DEVICE)
    y = torch.randint(0, 10, (16,), device=DEVICE)
    for dtype, scaler, fmt in [
            (torch.float16, torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 10),
             torch.contiguous_format),
            (torch.bfloat16, None, torch.contiguous_format),
            (torch.bfloat16, None, torch.channels_last)]:
        rev, x = rev.to(memory_format=fmt), x.contiguous(memory_format=fmt)
        got = grads(rev, x, y, dtype, scaler)
        ref = grads(rev, x, y, dtype, scaler, exact=True)
        layout = ", channels_last" if fmt == torch.channels_last else ""
        check(f"resnet50 {dtype} autocast{' + GradScaler' if scaler else ''}{layout}: "
              f"all-parameter gradient error vs autograd", norm_err(got, ref), 1e-2)
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
        if DEVICE == "cuda":  # the compiled step's peak (a CPU dry run has no allocator stats)
            for _ in range(2):
                comp.zero_grad(set_to_none=True)
                F.cross_entropy(comp(x), y).backward()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            comp.zero_grad(set_to_none=True)
            F.cross_entropy(comp(x), y).backward()
            torch.cuda.synchronize()
            print(f"compiled {name}: max_memory_allocated "
                  f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    check("inductor: revified model's gradient error over the original's",
          errors["revify"] / errors["original"], 10)


def steady():
    import warnings
    from revify.memory.counting import count_step
    torch.manual_seed(0)
    rev = revify.transform(torchvision.models.resnet50(num_classes=10),
                           input_size=(3, 64, 64)).to(DEVICE)
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
    sync()  # the pending read is ready at the next forward
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        F.cross_entropy(rev(x), y).backward()
    said = any("outgrew its fixed-point grid" in str(w.message) for w in caught)
    check("an outgrown grid in steady state said at the next forward (0: said)", float(not said), 0)


BENCH_ROWS = ("original", "checkpoint", "checkpoint-timm", "revify")


def bench():
    """In one process, each model built once for both precisions (a resnet152 plan takes
    about 30 s of CPU)."""
    from revify.bench import format_bench, format_counts, run_bench, strategies
    for name in ("resnet50", "resnet152"):
        torch.manual_seed(0)
        models = strategies(getattr(torchvision.models, name)(), (3, SIZE, SIZE),
                            rows=BENCH_ROWS, batch_size=BATCH)
        for autocast, channels_last in ((torch.bfloat16, True), (torch.bfloat16, False),
                                        (None, False)):
            results = run_bench(models, BATCH, (3, SIZE, SIZE), steps=STEPS, device=DEVICE,
                                autocast=autocast, channels_last=channels_last)
            print(f"\n{name}, batch {BATCH}, {SIZE}x{SIZE}, {autocast or 'float32'}"
                  f"{', channels_last' if channels_last else ''}, median of {STEPS} interleaved "
                  f"steps")
            print(format_bench(results))
            print(format_counts(results), flush=True)
            times = {r.name: r.step_seconds for r in results}
            print("revify over original {:.2f}x, over checkpoint {:.2f}x, over checkpoint-timm "
                  "{:.2f}x".format(*(times["revify"] / times[k] for k in BENCH_ROWS[:3])))
        del models
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def _timed_steps(runs: dict, x, y, steps: int) -> dict:
    """Median step milliseconds of each run (model, context), interleaved, timed with CUDA
    events where there is a GPU (host clock otherwise)."""
    def step(model, context):
        model.zero_grad(set_to_none=True)
        with context():
            F.cross_entropy(model(x), y).backward()

    times = {name: [] for name in runs}
    for run in runs.values():
        step(*run)
    for _ in range(steps):
        for name, run in runs.items():
            if DEVICE == "cuda":
                start, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                start.record()
                step(*run)
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step(*run)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def _profiled(model, x, y, out, name, trace=False):
    """One profiled step: its GPU busy milliseconds (kernel time summed) and kernels launched;
    its op tables (and with `trace`, a gzipped Chrome trace) to `out`."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    model.zero_grad(set_to_none=True)
    sync()
    with profile(activities=activities) as prof:
        F.cross_entropy(model(x), y).backward()
        sync()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e3
    sort = "self_cuda_time_total" if DEVICE == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    if out:  # one file of tables (the device returns at most 8 files)
        tag = name.replace(" ", "_").replace(",", "")
        with open(os.path.join(out, "profiles.txt"), "a") as f:
            f.write(f"\n\n##### {name}\n{table}\n\n"
                    + prof.key_averages().table(sort_by="cpu_time_total", row_limit=60))
        if trace:
            import gzip
            trace = os.path.join(out, f"trace_{tag}.json")
            prof.export_chrome_trace(trace)
            with open(trace, "rb") as f, gzip.open(trace + ".gz", "wb") as g:
                g.write(f.read())
            os.remove(trace)
    return busy, len(kernels), table


def profile():
    """Where a step's time goes: CUDA-event step times against GPU busy time (their difference
    is the GPU waiting for the host), for both memory layouts."""
    import revify.bench
    from revify.pipeline import build
    from revify.plan.plan import Options
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    example = torch.empty(BATCH, 3, SIZE, SIZE)
    built = revify.bench.strategies(model, (3, SIZE, SIZE), batch_size=BATCH,
                                    rows=("original", "checkpoint", "checkpoint-timm", "revify"))
    built["revify, no grid"] = build(model, example, Options(reconstruction="native"))
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    y = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    for fmt in (torch.channels_last, torch.contiguous_format):
        layout = "channels_last" if fmt == torch.channels_last else "NCHW"
        models = {k: revify.bench.Autocast(m.to(DEVICE, memory_format=fmt).train(), torch.bfloat16)
                  for k, m in built.items()}
        x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE).contiguous(memory_format=fmt)
        runs = {name: (m, contextlib.nullcontext) for name, m in models.items()}
        runs["revify, nothing recomputed"] = (models["revify"], revify.plain_autograd)
        median = _timed_steps(runs, x, y, STEPS)
        print(f"\nresnet50, batch {BATCH}, {SIZE}x{SIZE}, bf16 autocast, {layout}: median of "
              f"{STEPS} interleaved steps (CUDA events); GPU busy of one profiled step")
        for name, ms in median.items():
            model, context = runs[name]
            with context():
                busy, kernels, table = _profiled(model, x, y, out, f"{name} {layout}",
                                                 trace=name == "revify")
            print(f"  {name:28} {ms:7.1f} ms  {ms / median['original']:.3f}x   GPU busy "
                  f"{busy:6.1f} ms, {kernels} kernels", flush=True)
            if name == "revify" and fmt == torch.channels_last:
                revify_table = table
    print(revify_table)


def compiled_speed():
    """Step time of torch.compile (inductor, default mode) against eager, original and revify,
    resnet50 at the bench's input, bf16 autocast, channels_last: what compiling buys each when
    revify's stages run eagerly between the compiled graphs."""
    import revify.bench
    torch.manual_seed(0)
    built = revify.bench.strategies(torchvision.models.resnet50(), (3, SIZE, SIZE),
                                    batch_size=BATCH, rows=("original", "revify"))
    fmt = torch.channels_last
    x = torch.randn(BATCH, 3, SIZE, SIZE, device=DEVICE).contiguous(memory_format=fmt)
    y = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    runs = {}
    for name, m in built.items():
        eager = revify.bench.Autocast(m.to(DEVICE, memory_format=fmt).train(), torch.bfloat16)
        runs[name] = (eager, contextlib.nullcontext)
        comp = torch.compile(eager)
        t0 = time.time()
        F.cross_entropy(comp(x), y).backward()
        sync()
        print(f"{name}: inductor compile + first step {time.time() - t0:.0f} s", flush=True)
        runs[f"{name}, compiled"] = (comp, contextlib.nullcontext)
    median = _timed_steps(runs, x, y, STEPS)
    print(f"resnet50, batch {BATCH}, {SIZE}x{SIZE}, bf16 autocast, channels_last: median of "
          f"{STEPS} interleaved steps (CUDA events)")
    for name, ms in median.items():
        print(f"  {name:20} {ms:7.1f} ms  {ms / median['original']:.3f}x")


PARTS = {"bench": bench, "profile": profile, "steady": steady,
         "mixed_precision": mixed_precision, "drift": drift, "compiled": compiled,
         "compiled_speed": compiled_speed}
EXACT = {"steady", "mixed_precision", "drift", "compiled"}  # gradient checks: TF32 off


def main() -> int:
    print(torch.__version__, torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE,
          flush=True)
    deadline = time.time() + float(os.environ.get("GPU_CHECKS_SECONDS", 480))
    args = sys.argv[1:]
    if "--out" in args:
        os.makedirs(args[args.index("--out") + 1], exist_ok=True)
        del args[args.index("--out"):args.index("--out") + 2]
    for part in args or PARTS:
        if time.time() > deadline:
            print(f"\n== {part}: skipped, GPU_CHECKS_SECONDS spent", flush=True)
            failures.append(f"{part} (not run)")
            continue
        print(f"\n== {part}", flush=True)
        start = time.time()
        try:
            with exact_float32() if part in EXACT else contextlib.nullcontext():
                PARTS[part]()
        except Exception:
            traceback.print_exc()
            failures.append(f"{part} (raised)")
        print(f"({part}: {time.time() - start:.0f} s)", flush=True)
    print("\nfailed:", ", ".join(failures) if failures else "none")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
