"""Times the `make demo` pipeline from a cold data cache and records its test accuracy.

    python bench/demo.py [--epochs 4]

Runs the same commands as `make demo` (data info, train, evaluate) through the installed
`cifarlab` console script, with an empty cache so that decoding the dataset is counted.
Needs real CIFAR-10 through --data or $CIFARLAB_DATA. Writes its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--epochs", default="4")
    p.add_argument("--data", default=os.environ.get("CIFARLAB_DATA"))
    args = p.parse_args()
    if not args.data:
        sys.exit("bench/demo.py needs real CIFAR-10: pass --data or set CIFARLAB_DATA")
    exe = str(Path(sys.executable).parent / "cifarlab")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CIFARLAB_DATA": args.data, "CIFARLAB_CACHE": f"{tmp}/cache"}
        steps = [
            ["data", "info"],
            ["train", "--epochs", args.epochs, "--name", "demo", "--runs-dir", f"{tmp}/runs"],
            ["evaluate", f"{tmp}/runs/demo", "--json"],
        ]
        times, outputs = [], []
        for step in steps:
            t0 = time.perf_counter()
            out = subprocess.run([exe, *step], env=env, check=True, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            outputs.append(out.stdout)
            print(out.stdout, flush=True)
        summary = json.loads(Path(f"{tmp}/runs/demo/summary.json").read_text())
        evaluation = json.loads(outputs[-1])
    total = sum(times)
    lines = [
        "## make demo",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/demo.py --epochs {args.epochs}`: the commands of `make demo` "
        "(data info, train, evaluate) with an empty data cache, so decoding the JPEGs counts.",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| data info (decode + cache) | {times[0]:.1f} |",
        f"| train {args.epochs} epochs on 45,000 images + val/test evaluation | {times[1]:.1f} |",
        f"| evaluate the run folder (test, TTA) | {times[2]:.1f} |",
        f"| **total** | **{total:.1f}** ({total / 60:.1f} min) |",
        "",
        f"Validation accuracy {summary['val_acc'] * 100:.2f}%, test accuracy "
        f"**{evaluation['accuracy'] * 100:.2f}%** (TTA {evaluation['tta']}), "
        f"{summary['train_seconds']:.0f} s of training at {summary['precision']}.",
    ]
    write_section("demo", "\n".join(lines))


if __name__ == "__main__":
    main()
