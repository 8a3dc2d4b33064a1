"""Times the `make demo` pipeline from a cold data cache and records what it found.

    python bench/demo.py [--trials 10] [--epochs 2] [--plots docs/img]

Runs the same commands as `make demo` (data info, tune with a target budget, tune report, train
--from-study for the answer and for the baseline, compare) through the installed `cifarlab`
console script, with an empty cache so that decoding the dataset is counted. Copies the study's PNG plots to --plots for the README. Needs real
CIFAR-10 through --data or $CIFARLAB_DATA. Writes its table into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_section


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--trials", default="10")
    p.add_argument("--epochs", default="2", help="the target budget (make demo's DEMO_EPOCHS)")
    p.add_argument("--plots", type=Path, default=Path("docs/img"))
    p.add_argument("--data", default=os.environ.get("CIFARLAB_DATA"))
    args = p.parse_args()
    if not args.data:
        sys.exit("bench/demo.py needs real CIFAR-10: pass --data or set CIFARLAB_DATA")
    exe = str(Path(sys.executable).parent / "cifarlab")
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CIFARLAB_DATA": args.data, "CIFARLAB_CACHE": f"{tmp}/cache"}
        space = str(Path(__file__).resolve().parent.parent / "examples" / "demo-space.yaml")
        study = f"{tmp}/studies/demo"
        steps = [
            ["data", "info"],
            ["tune", "--study-dir", study, "--space", space, "--trials", args.trials,
             "--target-epochs", args.epochs],
            ["tune", "report", study],
            ["train", "--from-study", study, "--name", "demo", "--runs-dir", f"{tmp}/runs"],
            ["train", "--from-study", study, "--baseline", "--name", "demo-baseline",
             "--runs-dir", f"{tmp}/runs"],
            ["compare", f"{tmp}/runs/demo-baseline", f"{tmp}/runs/demo", "--json"],
        ]
        times, outputs = [], []
        for step in steps:
            t0 = time.perf_counter()
            out = subprocess.run([exe, *step], env=env, check=True, capture_output=True, text=True)
            times.append(time.perf_counter() - t0)
            outputs.append(out.stdout)
            print(out.stdout, flush=True)
        baseline, tuned = json.loads(outputs[-1])
        show = subprocess.run([exe, "tune", "show", study, "--json"], env=env, check=True,
                              capture_output=True, text=True)
        study_summary = json.loads(show.stdout)
        args.plots.mkdir(parents=True, exist_ok=True)
        for png in sorted(Path(study, "report").glob("*.png")):
            shutil.copy(png, args.plots / f"demo-{png.name}")
    total = sum(times)
    s = study_summary
    answer = s["answer"]
    params = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in (s["answer_params"] or {}).items())
    rows = [f"| {r['name']} | {r['value']:.4f} | {r['val_acc'] or 0:.4f} |"
            for r in s["target_rows"]]
    lines = [
        "## make demo",
        "",
        f"Machine: {machine()}.",
        f"Command: `python bench/demo.py --trials {args.trials} --epochs {args.epochs}`: the "
        "commands of `make demo` with an empty data cache, so decoding the dataset counts "
        f"(`{Path(args.data).name}`). "
        "Target: under 20 minutes after installation.",
        "",
        "| step | seconds |",
        "|---|---:|",
        f"| data info (decode + cache) | {times[0]:.1f} |",
        f"| tune: the baseline at {args.epochs} epochs on 45,000 images, {args.trials} trials "
        "of 1 epoch on 9,000 images (examples/demo-space.yaml), the top 2 at "
        f"{args.epochs} epochs | {times[1]:.1f} |",
        f"| tune report (4 PNG + HTML) | {times[2]:.1f} |",
        f"| retrain the answer, {args.epochs} epochs on 50,000 images + test evaluation "
        f"| {times[3]:.1f} |",
        f"| retrain the baseline, the same | {times[4]:.1f} |",
        f"| compare | {times[5]:.1f} |",
        f"| **total** | **{total:.1f}** ({total / 60:.1f} min) |",
        "",
        f"Study: {s['n_complete']} search trials complete, {s['n_pruned']} pruned, "
        f"{s['n_failed']} failed; best cheap {s['metric']} {s['best_value']:.4f} (trial "
        f"{s['best_number']}). At the target budget ({args.epochs} epochs, all training images):",
        "",
        f"| configuration | {s['metric']} ({s['metric_describe']}) | val acc |",
        "|---|---:|---:|",
        *rows,
        "",
        f"Answer: **{answer}**" + (f" ({params})" if params else "") + ".",
        "",
        "| retrained on 50,000 images | test accuracy (TTA 2) | training s |",
        "|---|---:|---:|",
        f"| baseline (the airnet recipe) | {baseline['test_acc'] * 100:.2f}% | "
        f"{baseline['train_seconds']:.0f} |",
        f"| the study's answer | **{tuned['test_acc'] * 100:.2f}%** | "
        f"{tuned['train_seconds']:.0f} |",
    ]
    write_section("demo", "\n".join(lines))


if __name__ == "__main__":
    main()
