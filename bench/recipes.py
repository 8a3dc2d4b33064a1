"""Side by side on one machine: airnet's recipes trained on all 50,000 original CIFAR-10 training
images, several seeds each, test accuracy (the run's TTA) and training seconds.

    python bench/recipes.py [--seeds 0 1 2] [--recipes airbench94 airbench94-muon]

Needs the original pixels (``--data``, else ``$CIFARLAB_DATA``, else
``../shared/datasets/cifar-10-lossless-python.tar.gz``). Each finished run is saved to
``--results`` at once (atomically), and a rerun skips what is there, so the benchmark resumes
across sessions. Recipes alternate which goes first from seed to seed, so a slow spell of the
shared machine does not land on one recipe only. Writes its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from cifarlab.data import load_data
from cifarlab.files import atomic_write_text
from cifarlab.models import default_config
from cifarlab.trainer import train

LOSSLESS = Path(__file__).resolve().parents[2] / "shared/datasets/cifar-10-lossless-python.tar.gz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=["airbench94", "airbench94-muon"])
    p.add_argument("--data", default=os.environ.get("CIFARLAB_DATA") or str(LOSSLESS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--results", type=Path, default=Path("bench-out/recipes.json"))
    a = p.parse_args()
    results = json.loads(a.results.read_text()) if a.results.exists() else {}
    split = None
    for i, seed in enumerate(a.seeds):
        order = a.recipes if i % 2 == 0 else a.recipes[::-1]
        for recipe in order:
            key = f"{recipe}/{seed}/{a.device}"
            if key in results:
                continue
            cfg = default_config("airnet", recipe).with_values(
                {"data.source": a.data, "val_size": 0, "seed": seed, "device": a.device})
            split = split or load_data(cfg.data)
            r = train(cfg, [], data=split, progress=False)
            results[key] = {
                "recipe": recipe, "seed": seed, "device": r.device, "test_acc": r.test_acc,
                "test_loss": r.test_loss, "tta": cfg.tta, "train_seconds": r.train_seconds,
                "epochs": cfg.optim.epochs, "precision": r.precision, "machine": machine(),
                "images_per_second": [row["images_per_second"] for row in r.history],
            }
            print(json.dumps(results[key]), flush=True)
            a.results.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(a.results, json.dumps(results, indent=1))
    report(results, a)


def report(results: dict, a: argparse.Namespace) -> None:
    rows, means = [], {}
    for recipe in a.recipes:
        runs = [results[f"{recipe}/{s}/{a.device}"] for s in a.seeds
                if f"{recipe}/{s}/{a.device}" in results]
        if not runs:
            continue
        for r in runs:
            rows.append(f"| {recipe} | {r['seed']} | {r['epochs']:g} | {r['test_acc'] * 100:.2f}% "
                        f"| {r['train_seconds']:.0f} |")
        acc = statistics.mean(r["test_acc"] for r in runs)
        sec = statistics.mean(r["train_seconds"] for r in runs)
        means[recipe] = (acc, sec, len(runs))
        rows.append(f"| **{recipe} mean of {len(runs)}** | | | **{acc * 100:.2f}%** "
                    f"| **{sec:.0f}** |")
    first = next(iter(results.values()))
    lines = [
        f"## airnet recipes side by side ({a.device}, original pixels)",
        "",
        f"Machine: {first['machine']}.",
        f"Command: `python bench/recipes.py --seeds {' '.join(map(str, a.seeds))} --recipes "
        f"{' '.join(a.recipes)} --device {a.device}`. Each run trains on all 50,000 training "
        "images of `cifar-10-lossless-python.tar.gz` and reports test accuracy with the run's TTA "
        "(2, measured in fp32); training seconds exclude data loading and the final evaluation. "
        "Runs alternate which recipe goes first per seed.",
        "",
        "| recipe | seed | epochs | test acc (TTA) | training s |",
        "|---|---:|---:|---:|---:|",
        *rows,
    ]
    if len(means) == 2:
        (r1, (a1, s1, _)), (r2, (a2, s2, _)) = means.items()
        lines += ["", f"{r2} against {r1}: {(a2 - a1) * 100:+.2f} points of mean test accuracy "
                      f"in {s2 / s1:.2f}x the training time."]
    write_section(f"recipes-{a.device}", "\n".join(lines))


if __name__ == "__main__":
    main()
