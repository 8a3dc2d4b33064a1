"""Record real CIFAR-10 learning curves for a tabular multi-fidelity benchmark (#14).

    python bench/record_curves.py [--n 200] [--width 0.5] [--epochs 2] [--train-fraction 0.25]
                                  [--val-size 2000] [--seed 0]
                                  [--out bench/data/cifar-curves-cpu.json]

Configurations come from the search space of ``make demo`` and ``bench/tune_cifar.py``
(``examples/demo-space.yaml``), drawn by a scrambled Sobol sequence (``--seed``, also every
run's training seed) in the space's normalized coordinates, the ones the samplers see. Each
one is trained to the *target* of this table (airnet of ``--width``, ``--epochs`` epochs on
``--train-fraction`` of the training split: a reduced size on the CPU; the whole target on a
GPU) in nine moves, paused and continued
through the trainer's checkpoint, so every point is the same run's: validation loss and
accuracy on ``--val-size`` held-out images after each ninth of the budget, and the seconds
of each move (training, the evaluation and the checkpoint together). The original pixels
(``--data``, else ``$CIFARLAB_DATA``, else ``../shared``'s lossless file).

The table is rewritten (atomically) after each configuration, so a run resumes where it stopped.
``bench/mf_replay.py --problems cifar-curves`` replays the seed-0 table, and ``cifar-curves-b``
the seed-1 table (``bench/data/cifar-curves-cpu-b.json``): 200 other configurations, recorded
after the freeze-thaw rule was tuned on the first, so they test it independently.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine

ROOT = Path(__file__).resolve().parent.parent
LOSSLESS = ROOT.parent / "shared/datasets/cifar-10-lossless-python.tar.gz"
POINTS = 9  # the budget is recorded at every ninth: the replay's rungs 1/9, 1/3, 1 among them


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="configurations")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--train-fraction", type=float, default=0.25)
    p.add_argument("--val-size", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0,
                   help="the Sobol sequence's scrambling and every run's training seed: another "
                        "seed records another table of configurations")
    p.add_argument("--space", type=Path, default=ROOT / "examples/demo-space.yaml")
    p.add_argument("--data", default=os.environ.get("CIFARLAB_DATA") or str(LOSSLESS))
    p.add_argument("--device", default="auto")
    p.add_argument("--out", type=Path, default=ROOT / "bench/data/cifar-curves-cpu.json")
    a = p.parse_args()

    import numpy as np
    from optuna._gp.search_space import SearchSpace as GPSpace
    from scipy.stats import qmc

    from cifarlab.config import DataConfig
    from cifarlab.data import load_data
    from cifarlab.files import atomic_write_text
    from cifarlab.trainer import train
    from cifarlab.tune import load_space
    from cifarlab.tune.mfstudy import distributions, snap_to_grid

    space = load_space(a.space)
    gp_space = GPSpace(distributions(space))
    sobol = snap_to_grid(gp_space)(
        qmc.Sobol(len(space.params), scramble=True, seed=a.seed).random(a.n))
    table = json.loads(a.out.read_text()) if a.out.exists() else None
    target = {"model": space.fidelity.model, "width": a.width, "epochs": a.epochs,
              "train_fraction": a.train_fraction, "val_size": a.val_size}
    if table is None:
        table = {"space": space.to_dict(), "target": target, "machine": machine(),
                 "budgets": [k / POINTS for k in range(1, POINTS + 1)], "seed": a.seed,
                 "configs": []}
    elif table["target"] != target or table.get("seed", 0) != a.seed:
        sys.exit(f"{a.out} holds curves for the target {table['target']} with seed "
                 f"{table.get('seed', 0)}, not {target} with seed {a.seed}: give those options, "
                 "or another --out")
    data = load_data(DataConfig(source=a.data, val_size=a.val_size,
                                train_fraction=a.train_fraction))
    print(f"{len(table['configs'])} of {a.n} configurations recorded; {len(data.train)} training "
          f"and {len(data.val)} validation images", flush=True)
    for i in range(len(table["configs"]), a.n):
        params = gp_space.get_unnormalized_param(sobol[i])
        cfg = space.config_for(params).with_values({
            "model": space.fidelity.model, "width": a.width, "optim.epochs": a.epochs,
            "data.train_fraction": 1.0, "tta": 0, "seed": a.seed, "device": a.device})
        per_epoch = max(1, len(data.train) // cfg.optim.batch_size)
        total = max(1, math.ceil(per_epoch * cfg.optim.epochs))
        row: dict = {"params": params, "val_loss": [], "val_acc": [], "seconds": []}
        ckpt = Path(tempfile.mkdtemp(prefix="cifarlab-curve-"))
        try:
            for k in range(1, POINTS + 1):
                t0 = time.perf_counter()
                pause = None if k == POINTS else max(1, math.ceil(k / POINTS * total))
                r = train(cfg, data=data, evaluate_test=False, progress=False, checkpoint=ckpt,
                          pause_at_step=pause)
                row["seconds"].append(round(time.perf_counter() - t0, 3))
                loss = r.val_loss if r.val_loss is not None else math.inf
                row["val_loss"].append(loss if math.isfinite(loss) else None)
                row["val_acc"].append(r.val_acc)
        finally:
            shutil.rmtree(ckpt, ignore_errors=True)
        table["configs"].append(row)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(a.out, json.dumps(table, indent=None, separators=(",", ":")))
        print(f"{i + 1}/{a.n} {json.dumps(params)}: val loss "
              f"{' '.join(f'{v:.3f}' if v is not None else 'nan' for v in row['val_loss'])}; "
              f"{sum(row['seconds']):.1f} s", flush=True)
    losses = np.array([c["val_loss"][-1] if c["val_loss"][-1] is not None else np.nan
                       for c in table["configs"]])
    print(f"done: {len(losses)} curves, target loss min {np.nanmin(losses):.4f}, median "
          f"{np.nanmedian(losses):.4f}", flush=True)


if __name__ == "__main__":
    main()
