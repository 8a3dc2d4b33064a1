"""On a GPU, side by side: airbench94_muon's own script and cifarlab's airnet recipes, on the
original CIFAR-10 pixels, several runs each.

    python bench/airbench_gpu.py --airbench PATH/airbench94_muon.py --data cifar-10-lossless.tar.gz \
        --recipes airbench94 "airbench94-muon@2000" "airbench94-muon@2000+compile" \
        --search "airbench94-muon:epochs=7.5,ema=true" --deadline 460 --out gpu.json
    python bench/airbench_gpu.py --report gpu.json --section H100   # here, afterwards

A recipe is ``NAME[@BATCH][+compile][:key=value,...]``. ``--search`` recipes run after the side
by side, their seeds interleaved, until ``--deadline`` seconds: a GPU's seconds per run make it
a fast place to compare CPU recipes on accuracy. bench/gpu_data.py carries the data there.

airbench94_muon.py is KellerJordan/cifar10-airbench's file, fetched separately and never
committed here. It runs unchanged: this harness imports it, writes the dataset where its loader
looks (``cifar10/train.pt`` and ``test.pt``, uint8 N×32×32×3, from cifarlab's decoding of
``--data``), compiles its model as its own ``__main__`` does, and calls its ``main`` for a
warm-up and ``--runs`` runs (its own loop is 200). Its time is the time it prints: training plus
its TTA evaluation, in CUDA events. cifarlab's is ``train_seconds`` (training only), with
``deterministic: false``. Prints one JSON line per run and rewrites ``--out`` after each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_section
from cifarlab.data import prepare
from cifarlab.models import default_config
from cifarlab.trainer import train


class Results:
    """Every run so far, rewritten to ``path`` after each one: a call cut off at its time limit
    still brings back what it measured."""

    def __init__(self, path: Path, t0: float, deadline: float):
        self.path, self.t0, self.deadline = path, t0, deadline
        self.runs: list[dict] = []

    def add(self, row: dict) -> None:
        row["at_s"] = round(time.perf_counter() - self.t0, 1)
        self.runs.append(row)
        print(json.dumps(row), flush=True)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        self.path.write_text(json.dumps({"device": gpu,
                                         "torch": torch.__version__, "runs": self.runs},
                                        indent=1))

    def time_left(self) -> float:
        return self.deadline - (time.perf_counter() - self.t0)


def _load_airbench(path: Path, work: Path) -> Any:
    os.chdir(work)
    spec = importlib.util.spec_from_file_location("airbench94_muon", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.argv = [str(path)]  # it reads its own source for its log
    spec.loader.exec_module(mod)
    return mod


def _write_airbench_data(work: Path, train_x: torch.Tensor, train_y: torch.Tensor,
                         test_x: torch.Tensor, test_y: torch.Tensor, classes: list) -> None:
    (work / "cifar10").mkdir(parents=True, exist_ok=True)
    for name, x, y in (("train.pt", train_x, train_y), ("test.pt", test_x, test_y)):
        torch.save({"images": x, "labels": y, "classes": classes}, work / "cifar10" / name)


def airbench(path: Path, work: Path, data_path: str, runs: int, res: Results) -> None:
    prepared = prepare(data_path)
    _write_airbench_data(work, torch.from_numpy(prepared.train.images[:].copy()),
                         torch.from_numpy(prepared.train.labels.copy()),
                         torch.from_numpy(prepared.test.images[:].copy()),
                         torch.from_numpy(prepared.test.labels.copy()), prepared.train.classes)
    mod = _load_airbench(path, work)
    t0 = time.perf_counter()
    model = mod.CifarNet().cuda().to(memory_format=torch.channels_last)
    model.compile(mode="max-autotune")
    with contextlib.redirect_stdout(io.StringIO()):
        mod.main("warmup", model)
    res.add({"who": "airbench94_muon.py", "warmup_and_compile_s": time.perf_counter() - t0})
    for run in range(runs):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            acc = mod.main(run, model)
        last = [line for line in buf.getvalue().splitlines() if "eval" in line][-1]
        seconds = float(re.findall(r"[\d.]+", last)[-1])
        res.add({"who": "airbench94_muon.py", "run": run, "tta_acc": acc, "seconds": seconds})


def parse_recipe(spec: str) -> tuple[str, dict[str, Any]]:
    """``NAME[@BATCH][+compile][:key=value,...]`` -> (recipe name, config values)."""
    head, _, extra = spec.partition(":")
    head, plus, _ = head.partition("+compile")
    name, _, batch = head.partition("@")
    values: dict[str, Any] = {"batch_size": int(batch)} if batch else {}
    if plus:
        values["compile"] = True
    for item in filter(None, extra.split(",")):
        key, _, raw = item.partition("=")
        values[key] = json.loads(raw)
    return name, values


def cifarlab_run(data_path: str, spec: str, seed: int, res: Results, device: str,
                 warmup: bool = False) -> None:
    """One timed run of ``spec``; with ``warmup``, an untimed one first (a whole run for a
    compiled spec, one epoch otherwise: cuDNN's autotuning for the spec's batch size)."""
    name, values = parse_recipe(spec)
    values |= {"data.source": data_path, "val_size": 0, "device": device, "seed": seed,
               "deterministic": False}
    if warmup and not values.get("compile"):
        values["epochs"] = 1.0
    t0 = time.perf_counter()
    try:
        r = train(default_config("airnet", name).with_values(values), progress=False)
    except Exception as exc:  # a variant that breaks (a compile error) must not end the bench
        res.add({"who": f"cifarlab {spec}", "seed": seed, "error": repr(exc)[:500]})
        return
    if warmup:
        res.add({"who": f"cifarlab {spec}", "warmup_and_compile_s": r.train_seconds})
        return
    res.add({"who": f"cifarlab {spec}", "seed": seed, "tta_acc": r.test_acc,
             "seconds": r.train_seconds, "wall_s": round(time.perf_counter() - t0, 2),
             "precision": r.precision})


def _table(saved: dict) -> tuple[list[str], dict[str, float]]:
    groups: dict[str, list[dict]] = {}
    for r in saved["runs"]:
        if "tta_acc" in r:
            groups.setdefault(r["who"], []).append(r)
    rows, reached = [], {}
    for who, runs in groups.items():
        accs = [r["tta_acc"] * 100 for r in runs]
        secs = [r["seconds"] for r in runs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        if len(runs) >= 3 and statistics.mean(accs) >= 94.0:
            reached[who] = statistics.median(secs)
        rows.append(f"| {who} | {len(runs)} | {statistics.mean(accs):.2f}% ± {sd:.2f} "
                    f"| {' '.join(f'{a:.2f}' for a in accs)} | {statistics.mean(secs):.2f} "
                    f"| {statistics.median(secs):.2f} |")
    compiles = [f"{r['who']} {r['warmup_and_compile_s']:.0f} s" for r in saved["runs"]
                if "warmup_and_compile_s" in r]
    lines = ["| trainer and recipe | runs | test acc mean ± sd | each run | mean s | median s |",
             "|---|---:|---:|---|---:|---:|", *rows]
    if compiles:
        lines += ["", "Compile and warm-up (not in any timed run): " + "; ".join(compiles) + "."]
    return lines, reached


def report(paths: list[Path], section: str) -> None:
    """Write a docs/BENCHMARKS.md section from saved ``--out`` files (on this machine), one
    table per file: each file is one machine, and times compare only inside one."""
    lines = [f"## GPU: airbench94_muon's own script against cifarlab ({section})", "",
             "Command: `python bench/airbench_gpu.py --data DATA --airbench airbench94_muon.py "
             "--runs N --recipes ... --search ...` on the original CIFAR-10 pixels "
             "(`bench/gpu_data.py` carries them there losslessly and checks their SHA-256). "
             "airbench's seconds are what its script prints (training plus its TTA evaluation, "
             "CUDA events, after `torch.compile(mode='max-autotune')` and its warm-up run); "
             "cifarlab's are `train_seconds` (training only, bf16 autocast, "
             "`deterministic: false`, after a warm-up epoch; `+compile` adds `compile: true` "
             "after an untimed compiled run). Test accuracy with TTA 2 for both. `@2000`: "
             "batch size 2000, airbench's, instead of the recipe's 1024 (chosen for the CPU). "
             "Rows with fewer runs than the table's others were cut off by the run's deadline."]
    for path in paths:
        saved = json.loads(path.read_text())
        table, reached = _table(saved)
        lines += ["", f"### `{path.name}`: one {saved['device']}, torch {saved['torch']}", "",
                  *table]
        ours = {k: v for k, v in reached.items() if k.startswith("cifarlab")}
        theirs = reached.get("airbench94_muon.py")
        if ours and theirs:
            best = min(ours, key=ours.__getitem__)
            ratio = ours[best] / theirs
            lines += ["", f"Time to ≥ 94.0% mean test accuracy (median seconds, at least 3 "
                          f"runs): {best} {ours[best]:.2f} s, airbench94_muon.py "
                          f"{theirs:.2f} s: {ratio:.2f}x. Target ≤ 1.0x: "
                          + ("met." if ratio <= 1.0 else "MISSED.")]
    write_section(f"gpu-airbench94-muon-{section.lower().replace(' ', '-')}", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--report", type=Path, nargs="*", default=None,
                   help="only write docs/BENCHMARKS.md's section from saved --out files")
    p.add_argument("--section", default="H100", help="the section's name, for --report")
    p.add_argument("--airbench", type=Path, default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--recipes", nargs="*",
                   default=["airbench94", "airbench94-muon", "airbench94-muon@2000"],
                   help="airnet recipes, NAME[@BATCH][+compile][:key=value,...]")
    p.add_argument("--search", nargs="*", default=[],
                   help="recipes to compare on accuracy after the side by side, seeds "
                        "interleaved, until the deadline")
    p.add_argument("--search-seeds", type=int, default=6)
    p.add_argument("--deadline", type=float, default=1e9,
                   help="seconds: no new run starts after this")
    p.add_argument("--airbench-first", action="store_true",
                   help="run airbench's script before cifarlab's recipes (its numbers then "
                        "survive a cifarlab compile that outlasts the call)")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this harness")
    p.add_argument("--work", type=Path, default=Path("/tmp/airbench-work"))
    p.add_argument("--out", type=Path, default=Path("gpu.json"))
    a = p.parse_args()
    if a.report is not None:
        report(a.report, a.section)
        return
    if a.data is None:
        p.error("--data is required")
    a.data = str(Path(a.data).resolve())
    res = Results(a.out.resolve(), time.perf_counter(), a.deadline)
    prepare(a.data)  # decode and cache once, outside every timing
    if a.airbench is not None and a.airbench_first:
        airbench(a.airbench.resolve(), a.work, a.data, a.runs, res)
        os.chdir(Path(__file__).resolve().parents[1])
    # each spec's warm-up (cuDNN's autotuning at its batch size, or its compile) is not part of
    # any timed run
    for spec in a.recipes + a.search:
        cifarlab_run(a.data, spec, 1000, res, a.device, warmup=True)
    for spec in a.recipes:
        for seed in range(a.runs):
            if res.time_left() > 0:
                cifarlab_run(a.data, spec, seed, res, a.device)
    if a.airbench is not None and not a.airbench_first and res.time_left() > 30:
        airbench(a.airbench.resolve(), a.work, a.data, a.runs, res)
    for seed in range(a.search_seeds):
        for spec in a.search:
            if res.time_left() > 0:
                cifarlab_run(a.data, spec, seed, res, a.device)


if __name__ == "__main__":
    main()
