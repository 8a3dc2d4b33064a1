"""Training benchmark: throughput per model and configuration, and time-to-accuracy.

    python bench/train.py throughput             # img/s: model × {fp32,bf16} × {contiguous,channels_last}
    python bench/train.py tta --epochs 9.9       # default airnet recipe on all 50,000 real images

Reads real CIFAR-10 from --data or $CIFARLAB_DATA. Writes its tables into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from cifarlab.callbacks import Callback, TrainState
from cifarlab.data import load_data
from cifarlab.infer import Normalizer, loss_and_accuracy, predict_logits, to_device_images
from cifarlab.models import create_model, default_config, get_spec, list_models
from cifarlab.runs import RunWriter
from cifarlab.step import training_step
from cifarlab.trainer import train


def throughput(args: argparse.Namespace) -> None:
    """Steady-state training img/s of each model on random data of CIFAR shape."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    rows = []
    for name in args.models or list_models():
        bs = args.batch_size or get_spec(name).recipe.get("batch_size", 1024)
        x = torch.randn(bs, 3, 32, 32, device=dev)
        y = torch.randint(0, 10, (bs,), device=dev)
        for precision in ("fp32", "bf16"):
            for layout in ("contiguous", "channels_last"):
                model = create_model(name).to(dev)
                if hasattr(model, "init_from_data"):
                    model.init_from_data(x)
                xb = x
                if layout == "channels_last":
                    model = model.to(memory_format=torch.channels_last)
                    xb = x.contiguous(memory_format=torch.channels_last)
                opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, nesterov=True)
                loss_fn = nn.CrossEntropyLoss(label_smoothing=0.2)
                times = []
                for step in range(args.warmup + args.steps):
                    t0 = time.perf_counter()
                    training_step(model, opt, loss_fn, xb, y, dev, precision)
                    if dev.type == "cuda":
                        torch.cuda.synchronize(dev)
                    if step >= args.warmup:
                        times.append(time.perf_counter() - t0)
                times.sort()
                med = times[len(times) // 2]
                rows.append((name, precision, layout, bs, bs / med))
                print(f"{name:9s} {precision:5s} {layout:13s} {bs / med:8.1f} img/s", flush=True)
    base = {r[0]: r[4] for r in rows if r[1] == "fp32" and r[2] == "contiguous"}
    lines = [
        "## Training throughput",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/train.py throughput --device {args.device} --steps {args.steps} "
        f"--warmup {args.warmup}`. Batch size = the model's recipe, median of "
        f"{args.steps} steps after {args.warmup} warm-up steps, forward + backward + SGD step, "
        "random CIFAR-shaped data. Ratios are against fp32/contiguous of the same model in the "
        "same run.",
        "",
        "| model | precision | layout | batch | img/s | × fp32 contiguous |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [f"| {m} | {p} | {lay} | {b} | {v:.0f} | {v / base[m]:.2f} |"
              for m, p, lay, b, v in rows]
    write_section("train-throughput" + ("" if dev.type == "cpu" else f"-{dev.type}"),
                  "\n".join(lines))


class _TestCurve(Callback):
    """Evaluates test accuracy after each epoch, outside the timed training loop."""

    def __init__(self, data, device: str):
        self.data, self.device, self.rows = data, device, []
        self.images = to_device_images(data.test.images, torch.device("cpu"))

    def on_epoch_end(self, state: TrainState, metrics: dict) -> None:
        norm = Normalizer(self.data.mean, self.data.std, state.device)
        logits = predict_logits(state.model, self.images, norm, state.device, state.precision)
        _loss, acc = loss_and_accuracy(logits, self.data.test.labels)
        elapsed = sum(r["seconds"] for r in state.history)
        self.rows.append((metrics["epoch"], elapsed, metrics["train_loss"], acc))
        print(f"epoch {metrics['epoch']:2d}  train_loss {metrics['train_loss']:.4f}  "
              f"test_acc(no TTA) {acc:.4f}  train_s {elapsed:7.1f}  "
              f"{metrics['images_per_second']} img/s", flush=True)


def data_label(source: str | None) -> str:
    """``lossless`` or ``jpeg`` for the two shared copies of CIFAR-10, else the file's name."""
    name = Path(source or "").name.lower()
    return "lossless" if "lossless" in name else "jpeg" if "jpeg" in name else name or "default"


DATA_TEXT = {"lossless": "the original pixels (`cifar-10-lossless-python.tar.gz`)",
             "jpeg": "the JPEG copy (`cifar10-jpeg.tar.gz`, an image-folder tree)"}


def run_curve(model: str, epochs: float, seed: int, source: str | None, device: str,
              save: Path | None = None):
    """Train on all 50,000 training images with a per-epoch test curve; optionally keep the
    run folder (for `bench/robustness.py`). Returns the train result and the curve rows."""
    cfg = default_config(model).with_values(
        {"optim.epochs": epochs, "data.source": source, "val_size": 0, "seed": seed,
         "device": device})
    data = load_data(cfg.data)
    curve = _TestCurve(data, cfg.device)
    callbacks: list[Callback] = [curve]
    if save is not None:
        callbacks.append(RunWriter(save))
    result = train(cfg, callbacks, data=data, progress=False)
    print(json.dumps({"test_acc_tta": result.test_acc, "train_seconds": result.train_seconds,
                      "precision": result.precision}))
    return result, curve.rows


def write_curve(model: str, epochs: float, seed: int, source: str | None, device: str,
                result, rows) -> None:
    label = data_label(source)
    on = "" if result.device == "cpu" else f" on {result.device}"
    lines = [
        f"## Time to accuracy: {model}, {epochs} epochs, seed {seed}{on}, "
        f"{'original pixels' if label == 'lossless' else label}",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/train.py tta --model {model} --epochs {epochs} "
        f"--seed {seed} --device {device} --data {Path(source or '').name}` on "
        f"{DATA_TEXT.get(label, source)}, trained on all 50,000 training images, precision "
        f"{result.precision}. Training seconds exclude the per-epoch test evaluation, which is "
        "done only for this curve.",
        "",
        "| epoch | training s | train loss | test acc (no TTA) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {e} | {s:.1f} | {tl:.4f} | {a * 100:.2f}% |" for e, s, tl, a in rows]
    lines += [
        "",
        f"Final test accuracy with flip+translate TTA: **{result.test_acc * 100:.2f}%** after "
        f"**{result.train_seconds:.0f} s** of training ({result.train_seconds / 60:.1f} min).",
    ]
    suffix = ("" if result.device == "cpu" else f"-{result.device.split(':')[0]}") + (
        f"-s{seed}" if seed else "") + ("" if label == "lossless" else f"-{label}")
    write_section(f"tta-{model}-{epochs}e{suffix}", "\n".join(lines))


def time_to_accuracy(args: argparse.Namespace) -> None:
    source = args.data or os.environ.get("CIFARLAB_DATA")
    result, rows = run_curve(args.model, args.epochs, args.seed, source, args.device, args.save)
    write_curve(args.model, args.epochs, args.seed, source, args.device, result, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--models", nargs="*")
    t.add_argument("--batch-size", type=int, default=None, help="default: each model's recipe")
    t.add_argument("--steps", type=int, default=8)
    t.add_argument("--warmup", type=int, default=2)
    t.add_argument("--device", default="cpu")
    a = sub.add_parser("tta")
    a.add_argument("--model", default="airnet")
    a.add_argument("--epochs", type=float, default=9.9)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--data", default=None)
    a.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    a.add_argument("--save", type=Path, default=None, help="keep the run folder here")
    args = p.parse_args()
    throughput(args) if args.cmd == "throughput" else time_to_accuracy(args)


if __name__ == "__main__":
    main()
