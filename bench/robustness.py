"""What re-encoding costs: the default airnet recipe trained on the original pixels and on the
JPEG copy, each evaluated on both test sets.

    python bench/robustness.py [--seed 0] [--epochs 9.9]

Trains on all 50,000 training images of each copy (per-epoch test curve included, so this also
writes the `tta-airnet-*` sections of both), keeps the run folders under ``bench-out/robust/``,
then evaluates every run on every test set with ``Predictor.from_run`` at the run's own TTA,
in fp32: the same path as ``cifarlab evaluate``. Results go to ``--results`` after each step, and
a rerun skips what is there, so the benchmark resumes across sessions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section
from cifarlab.data import load_data
from cifarlab.files import atomic_write_text
from cifarlab.infer import Predictor
from cifarlab.models import default_config
from train import run_curve, write_curve

SHARED = Path(__file__).resolve().parents[2] / "shared/datasets"
SOURCES = {"lossless": SHARED / "cifar-10-lossless-python.tar.gz",
           "jpeg": SHARED / "cifar10-jpeg.tar.gz"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=float, default=9.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("bench-out/robust"))
    p.add_argument("--results", type=Path, default=Path("bench-out/robustness.json"))
    p.add_argument("--note", default="", help="a sentence to add to the section")
    a = p.parse_args()
    results = json.loads(a.results.read_text()) if a.results.exists() else {}

    def save() -> None:
        a.results.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.results, json.dumps(results, indent=1))

    for name, source in SOURCES.items():
        key = f"train/{name}/{a.seed}"
        run_dir = a.out / f"{name}-s{a.seed}"
        if key in results and (run_dir / "summary.json").exists():
            continue
        result, rows = run_curve("airnet", a.epochs, a.seed, str(source), a.device, run_dir)
        write_curve("airnet", a.epochs, a.seed, str(source), a.device, result, rows)
        results[key] = {"test_acc": result.test_acc, "train_seconds": result.train_seconds,
                        "run": str(run_dir), "machine": machine(), "curve": rows}
        save()

    for test_name, source in SOURCES.items():
        test = None
        for train_name in SOURCES:
            key = f"eval/{train_name}/{test_name}/{a.seed}"
            if key in results:
                continue
            if test is None:
                cfg = default_config("airnet").with_values({"data.source": str(source),
                                                            "val_size": 0})
                test = load_data(cfg.data).test
            pred = Predictor.from_run(a.out / f"{train_name}-s{a.seed}")
            results[key] = pred.evaluate(test) | {"machine": machine()}
            print(key, json.dumps(results[key]), flush=True)
            save()

    acc = {(tr, te): results[f"eval/{tr}/{te}/{a.seed}"]["accuracy"]
           for tr in SOURCES for te in SOURCES}
    tta = results[f"eval/lossless/lossless/{a.seed}"]["tta"]
    lines = [
        "## Robustness to re-encoding (`bench/robustness.py`)",
        "",
        f"Machine: {machine()}. The default airnet recipe ({a.epochs} epochs, seed {a.seed}) "
        "trained on all 50,000 training images of each copy of CIFAR-10, then each run "
        f"evaluated on both 10,000-image test sets with `Predictor.from_run` (TTA {tta}, fp32: "
        "what `cifarlab evaluate` does). The JPEG copy re-encodes both splits (median PSNR "
        "30.6 dB per the dataset's README).",
        "",
        "| trained on ↓ · tested on → | original pixels | JPEG copy | cost of the other copy |",
        "|---|---:|---:|---:|",
    ]
    for tr in SOURCES:
        other = "jpeg" if tr == "lossless" else "lossless"
        lines.append(
            f"| {'original pixels' if tr == 'lossless' else 'JPEG copy'} "
            f"({results[f'train/{tr}/{a.seed}']['train_seconds']:.0f} s) | "
            f"{acc[tr, 'lossless']:.2%} | {acc[tr, 'jpeg']:.2%} | "
            f"{(acc[tr, other] - acc[tr, tr]) * 100:+.2f} points |")
    lines += [
        "",
        f"Same test set, other training copy: original-pixel test images lose "
        f"{(acc['lossless', 'lossless'] - acc['jpeg', 'lossless']) * 100:.2f} points when the "
        f"model was trained on JPEGs; JPEG test images lose "
        f"{(acc['jpeg', 'jpeg'] - acc['lossless', 'jpeg']) * 100:.2f} points when it was trained "
        "on the original pixels.",
    ]
    if a.note:
        lines += ["", a.note]
    write_section("robustness", "\n".join(lines))


if __name__ == "__main__":
    main()
