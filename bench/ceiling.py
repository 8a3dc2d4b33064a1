"""Training speed against the hardware's limit: airnet's images/s next to the bf16 matmul
ceiling of this machine, and where a training step's time goes.

    python bench/ceiling.py [--batch-size 1024] [--steps 12]

1. The ceiling: the FLOPs of one training image (forward + backward, counted by
   ``torch.utils.flop_counter`` on the real model) divided by the machine's peak bf16 matmul
   rate (the best of large square GEMMs, all threads). No training step can beat it.
2. The step, timed phase by phase on the trainer's own parts (``DeviceLoader`` augmentation,
   forward + loss under autocast, backward, optimizer + schedule, the lookahead average every
   5 steps), median of ``--steps`` steps after warm-up, channels_last, bf16.
3. What an epoch adds: the validation pass (5,000 images) per 44 steps of 1024.

Writes its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, publish
from cifarlab.data import Dataset
from cifarlab.hardware import autocast
from cifarlab.infer import Normalizer, predict_logits
from cifarlab.loader import DeviceLoader
from cifarlab.models import create_model, default_config
from cifarlab.optim import Lookahead, build_optimizer

MEAN, STD = [125.3, 123.0, 113.9], [63.0, 62.1, 66.7]


def matmul_peak(dtype: torch.dtype) -> tuple[float, int]:
    """Best GFLOP/s of n×n @ n×n over a few sizes (and the size that gave it)."""
    best, best_n = 0.0, 0
    for n in (1024, 2048, 3072, 4096):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        reps = max(3, int(2e10 / (2 * n**3)))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            times.append((time.perf_counter() - t0) / reps)
        rate = 2 * n**3 / min(times) / 1e9
        if rate > best:
            best, best_n = rate, n
    return best, best_n


def conv_peak() -> tuple[float, str]:
    """Best GFLOP/s of bf16 3×3 convolutions (channels_last, oneDNN: the kernels airnet runs),
    over airnet-like shapes."""
    best, shape = 0.0, ""
    for c, hw, n in ((64, 32, 256), (256, 16, 256), (256, 8, 512), (512, 8, 512)):
        x = torch.randn(n, c, hw, hw, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(c, c, 3, 3, dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        torch.nn.functional.conv2d(x, w, padding=1)
        flops = 2 * n * hw * hw * c * c * 9
        reps = max(2, int(1e10 / flops))
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.conv2d(x, w, padding=1)
            times.append((time.perf_counter() - t0) / reps)
        rate = flops / min(times) / 1e9
        if rate > best:
            best, shape = rate, f"{c}→{c} channels, {hw}×{hw}, batch {n}"
    return best, shape


def train_flops(model: nn.Module, bs: int) -> float:
    """FLOPs of forward + backward for a batch, counted by PyTorch's flop counter."""
    x = torch.randn(bs, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (bs,))
    with FlopCounterMode(display=False) as counter:
        with autocast(torch.device("cpu"), "bf16"):
            loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def op_profile(model: nn.Module, loader: DeviceLoader, opt: torch.optim.Optimizer,
               loss_fn: nn.Module, dev: torch.device) -> list[tuple[str, float]]:
    """Share of self CPU time per operator over 2 training steps, largest first."""
    from torch.profiler import ProfilerActivity, profile

    it = iter(loader)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            x, y = next(it)
            with autocast(dev, "bf16"):
                loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return [(e.key, e.self_cpu_time_total / total)
            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-fp32", dest="fp32", action="store_false", help="skip the fp32 peak")
    a = p.parse_args()
    dev = torch.device("cpu")
    torch.manual_seed(0)

    peak_bf16, n_bf16 = matmul_peak(torch.bfloat16)
    peak_fp32, n_fp32 = matmul_peak(torch.float32) if a.fp32 else (float("nan"), 0)
    peak_conv, conv_shape = conv_peak()
    peak = max(peak_bf16, peak_conv)
    print(f"bf16 matmul peak {peak_bf16:.0f} GFLOP/s (n={n_bf16}); bf16 conv {peak_conv:.0f} "
          f"({conv_shape}); fp32 matmul {peak_fp32:.0f}", flush=True)

    cfg = default_config("airnet").with_values({"batch_size": a.batch_size, "device": "cpu"})
    n = a.batch_size * (a.steps + a.warmup + 2)
    rng = np.random.default_rng(0)
    ds = Dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 rng.integers(0, 10, n).astype(np.int64), [str(i) for i in range(10)],
                 [f"{i}.png" for i in range(n)])
    model = create_model("airnet", 10).to(memory_format=torch.channels_last)
    norm = Normalizer(MEAN, STD, dev)
    model.init_from_data(norm(torch.from_numpy(ds.images[:5000]).permute(0, 3, 1, 2)))
    flops_per_image = train_flops(model, 64) / 64
    ceiling = peak * 1e9 / flops_per_image
    print(f"{flops_per_image / 1e9:.3f} GFLOP per training image -> ceiling "
          f"{ceiling:.0f} img/s", flush=True)

    loader = DeviceLoader(ds, cfg, norm, dev)
    opt, sched = build_optimizer(model, cfg, total_steps=10_000)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing, reduction="sum")
    lookahead = Lookahead(model)
    phases: dict[str, list[float]] = {k: [] for k in
                                      ("augment", "forward", "backward", "optimizer",
                                       "lookahead (1 in 5)", "step")}
    it = iter(loader)
    model.train()
    for step in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        x, y = next(it)
        t1 = time.perf_counter()
        with autocast(dev, "bf16"):
            loss = loss_fn(model(x), y)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        sched.step()
        t4 = time.perf_counter()
        if step % 5 == 0:
            lookahead.update(model, 0.9)
        t5 = time.perf_counter()
        if step >= a.warmup:
            for k, v in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, (t5 - t4),
                                     t5 - t0), strict=True):
                phases[k].append(v)
    med = {k: statistics.median(v) for k, v in phases.items()}
    med["lookahead (1 in 5)"] = statistics.mean(phases["lookahead (1 in 5)"])
    step_s = statistics.median(phases["step"])
    ips = a.batch_size / step_s
    compute = med["forward"] + med["backward"]

    ops = op_profile(model, loader, opt, loss_fn, dev)
    conv_share = sum(share for name, share in ops
                     if name in ("aten::mkldnn_convolution", "aten::convolution_backward"))
    conv_rate = flops_per_image * a.batch_size / (conv_share * step_s) / 1e9
    at_peak = a.batch_size / (step_s * (conv_share * conv_rate / peak + 1 - conv_share))

    val = torch.from_numpy(ds.images[:5000]).permute(0, 3, 1, 2)
    model.eval()
    predict_logits(model, val[:512], norm, dev, "bf16", 0)
    t0 = time.perf_counter()
    predict_logits(model, val, norm, dev, "bf16", 0)
    val_s = time.perf_counter() - t0
    epoch_steps = 45_000 // a.batch_size

    rows = [f"| {k} | {v * 1000:.0f} | {v / step_s:.1%} |" for k, v in med.items()
            if k != "step"]
    lines = [
        "## Training speed against the bf16 ceiling (`bench/ceiling.py`)",
        "",
        f"Machine: {machine()}. airnet, batch {a.batch_size}, bf16 autocast, channels_last, "
        f"median of {a.steps} steps after {a.warmup} warm-up steps, random uint8 images through "
        "the trainer's own loader, optimizer and lookahead.",
        "",
        f"- Peak rates, all threads: bf16 matmul {peak_bf16:.0f} GFLOP/s (n × n, n = {n_bf16}); "
        f"bf16 3×3 convolution **{peak_conv:.0f} GFLOP/s** ({conv_shape}, channels_last)"
        + (f"; fp32 matmul {peak_fp32:.0f} GFLOP/s (n = {n_fp32})" if n_fp32 else "")
        + f". The ceiling uses the higher bf16 figure, {peak:.0f} GFLOP/s.",
        f"- One training image (forward + backward, PyTorch's flop counter): "
        f"{flops_per_image / 1e9:.3f} GFLOP, so the ceiling is **{ceiling:.0f} img/s**.",
        f"- Measured: **{ips:.0f} img/s** = **{ips / ceiling:.0%} of the ceiling** (target "
        "≥ 90%). Forward + backward alone run at "
        f"{a.batch_size / compute:.0f} img/s ({a.batch_size / compute / ceiling:.0%}).",
        "",
        "| phase | ms per step | share of the step |",
        "|---|---:|---:|",
        *rows,
        f"| **step** | **{step_s * 1000:.0f}** | 100% |",
        "",
        f"Per epoch on 45,000 images: {epoch_steps} steps ≈ {epoch_steps * step_s:.1f} s, plus "
        f"the validation pass over 5,000 images, {val_s:.2f} s "
        f"({val_s / (epoch_steps * step_s):.1%}).",
        "",
        "Where the step's time goes, by operator (`torch.profiler`, self CPU time over 2 "
        "steps, the 12 largest):",
        "",
        "| operator | share of step time |",
        "|---|---:|",
        *[f"| {name} | {share:.1%} |" for name, share in ops[:12]],
        "",
        f"The convolutions (forward and backward) take {conv_share:.0%} of the step and run at "
        f"about {conv_rate:.0f} GFLOP/s, {conv_rate / peak:.0%} of the convolution peak; the "
        f"other {1 - conv_share:.0%} (pooling, GELU, batch norm, fills and copies) do almost no "
        "matmul work. With the convolutions at the peak rate and the rest unchanged, the step "
        f"would reach {at_peak / ceiling:.0%} of the ceiling ({at_peak:.0f} img/s): what stands "
        "between the trainer and 90% is the memory-bound work between the convolutions, which "
        "only fusing it into them (oneDNN post-ops, a graph compiler) would remove.",
    ]
    publish("ceiling", lines)


if __name__ == "__main__":
    main()
