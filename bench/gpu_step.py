"""Where a GPU training step's time goes: eager against CUDA-graph replay, on random images.

    python bench/gpu_step.py --recipe airbench94-muon --batch 2000 --out step.json

For each mode it times ``--steps`` steps of airnet's training step (the loader's augmentation
included) with CUDA events after a warm-up, and for the eager step it reads one profiled step:
the CPU time spent dispatching it against the GPU time its kernels ran. When the CPU's time is
the larger, the step is launch-bound and a captured graph removes most of it. Random pixels
are enough here: a step's time does not depend on what the pixels are.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cifarlab.data import Dataset
from cifarlab.hardware import cudnn_mode
from cifarlab.infer import Normalizer
from cifarlab.loader import DeviceLoader
from cifarlab.models import create_model, default_config
from cifarlab.optim import Muon, build_optimizer
from cifarlab.step import GraphedStep, training_step

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class _AmaxPool(nn.Module):
    """max over k×k windows as a reshape and amax (a trial of a faster pooling kernel)."""

    def __init__(self, k: int | None):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k is None:  # global
            return x.amax((2, 3), keepdim=True)
        h, w = x.shape[-2:]
        k = self.k
        x = x[..., : h // k * k, : w // k * k]
        return x.unflatten(3, (w // k, k)).unflatten(2, (h // k, k)).amax((3, 5))


def _variant(model: nn.Module, optimizer: torch.optim.Optimizer, name: str) -> None:
    if "amaxpool" in name:
        for mod in list(model.modules()):
            for child_name, child in mod.named_children():
                if isinstance(child, nn.MaxPool2d):
                    setattr(mod, child_name, _AmaxPool(int(child.kernel_size)))  # type: ignore[arg-type]
                elif isinstance(child, nn.AdaptiveMaxPool2d):
                    setattr(mod, child_name, _AmaxPool(None))
    if "compile" in name:  # compile: true (Muon's Newton-Schulz is compiled by build_optimizer)
        model.compile(mode="max-autotune-no-cudagraphs" if "autotune" in name else None)


def time_mode(recipe: str, batch: int, graphed: bool, steps: int, n: int,
              variant: str = "") -> dict:
    device = torch.device("cuda")
    cfg = default_config("airnet", recipe).with_values(
        {"batch_size": batch, "seed": 0, "compile": "compile" in variant,
         "muon_ns_precision": "bf16" if "nsbf16" in variant else "fp32"})
    rng = np.random.default_rng(0)
    ds = Dataset(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 rng.integers(0, 10, n).astype(np.int64), [str(i) for i in range(10)],
                 [str(i) for i in range(n)])
    torch.manual_seed(0)
    model = create_model("airnet", 10, 1.0).to(device).to(memory_format=torch.channels_last)
    norm = Normalizer(MEAN, STD, device)
    loader = DeviceLoader(ds, cfg, norm, device)
    total = steps * 3
    optimizer, scheduler = build_optimizer(model, cfg, total, capturable=graphed)
    _variant(model, optimizer, variant)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2, reduction="sum")
    if graphed:
        assert isinstance(optimizer, Muon)
        optimizer.lr_from_tensors(device)
        step = GraphedStep(model, optimizer, loss_fn, device, "bf16")
    else:
        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return training_step(model, optimizer, loss_fn, x, y, device, "bf16")
    order = loader.epoch_order()
    per = len(loader)

    def run(k: int) -> None:
        for i in range(k):
            x, y = loader.batch(order, i % per)
            step(x, y)
            scheduler.step()

    run(steps)  # warm-up: cuDNN's autotuning, the graph's capture
    torch.cuda.synchronize()
    times = []
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(steps // 3)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / (steps // 3))
    row = {"recipe": recipe, "batch": batch, "graphed": graphed, "variant": variant,
           "ms_per_step": round(statistics.median(times), 3),
           "ms_each": [round(t, 3) for t in times]}
    if not graphed:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run(5)
            torch.cuda.synchronize()
        events = prof.key_averages()
        cuda_us = sum(e.self_device_time_total for e in events) / 5
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel",
                                                             "cudaLaunchKernelExC",
                                                             "cuLaunchKernel",
                                                             "cuLaunchKernelEx")) / 5
        kernels = [e for e in events if e.self_cpu_time_total == 0 and e.self_device_time_total]
        row |= {"top_kernels_ms_per_step": [
                    (e.key[:90], e.count // 5, round(e.self_device_time_total / 5000, 3))
                    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[:14]],
                "kernel_ms_per_step": round(sum(e.self_device_time_total for e in kernels)
                                            / 5000, 3),
                "gpu_kernel_ms_per_step": round(cuda_us / 1000, 3),
                "kernel_launches_per_step": round(launches, 1),
                "top_cpu": [(e.key, round(e.self_cpu_time_total / 5000, 3))
                            for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]]}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--recipe", nargs="*", default=["airbench94-muon"])
    p.add_argument("--batch", type=int, nargs="*", default=[2000])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--variants", nargs="*", default=[""],
                   help="trials: nsbf16 (muon_ns_precision: bf16), amaxpool (pooling by "
                        "amax), compile (compile: true), compile-autotune (and compile_mode: "
                        "max-autotune-no-cudagraphs)")
    p.add_argument("--graphed-only", action="store_true")
    p.add_argument("--out", type=Path, default=Path("gpu-step.json"))
    a = p.parse_args()
    rows = []
    with cudnn_mode(torch.device("cuda"), deterministic=False):
        for recipe in a.recipe:
            for batch in a.batch:
                for graphed, variant in [(g, v) for v in a.variants
                                         for g in ((True,) if a.graphed_only else (False, True))]:
                    try:
                        rows.append(time_mode(recipe, batch, graphed, a.steps, a.images,
                                              variant))
                    except Exception as exc:  # report and go on: one broken mode must not
                        rows.append({"recipe": recipe, "batch": batch, "graphed": graphed,
                                     "error": repr(exc)[:800]})
                    print(json.dumps(rows[-1]), flush=True)
    a.out.write_text(json.dumps({"device": torch.cuda.get_device_name(),
                                 "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
