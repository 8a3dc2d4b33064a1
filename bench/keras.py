"""Keras models on cifarlab, measured on real CIFAR-10 (the original pixels).

    python bench/keras.py throughput [--epochs 10]
    python bench/keras.py tuner [--seeds 0 1 2] [--trials 8]     # installs KerasTuner for itself
    python bench/keras.py e2e [--trials 8 --target-epochs 4]     # the README's example, recorded

throughput: ``keras-cnn`` trained three ways for the same epochs with its recipe on the 45,000
training images (5,000 held out for validation): by cifarlab's trainer, by Keras's ``model.fit``
(``--engine keras``, fed by cifarlab's batches and augmentation), and the same architecture
written in plain PyTorch (``bench/keras_twin.py``) by cifarlab's trainer. Plus the original
notes' Dense model (``keras-dense``) by cifarlab's trainer, for its accuracy. Reports images/s
(median epoch after the first), seconds to the accuracy all three keras-cnn runs reach, and
test accuracy (TTA 2).

tuner: ``cifarlab tune`` against KerasTuner's ``BayesianOptimization`` on the same builder
(``keras-cnn``), the same space (lr, weight decay, the builder's units and dropout), the same
trial budget (epochs on a fraction of the split) and number of trials, the same validation
images, per seed. KerasTuner's trials train with ``model.fit``, as its users run them;
cifarlab's with its trainer (and its study adds the recipe and the best trial at the target
budget). Each tuner's answer is then retrained the same way (cifarlab's trainer, the target
epochs, the training split) and evaluated on validation and test.

Every finished piece is saved to ``--results`` at once, so a rerun resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "torch")  # before KerasTuner imports Keras
ROOT = Path(__file__).resolve().parent.parent
# this file is keras.py: its folder must not be where `import keras` looks
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.append(str(ROOT / "bench"))
from _common import Server, machine, write_section  # noqa: E402
from cifarlab.config import DataConfig, TrainConfig  # noqa: E402
from cifarlab.data import load_data  # noqa: E402
from cifarlab.files import atomic_write_text  # noqa: E402
from cifarlab.models import default_config  # noqa: E402

LOSSLESS = ROOT.parent / "shared/datasets/cifar-10-lossless-python.tar.gz"
COMMITTED = ROOT / "bench" / "results" / "keras-cpu.json"
TWIN = str(ROOT / "bench" / "keras_twin.py") + ":build_model"
KT_LIB = ROOT / "bench-out" / "kerastuner-lib"

SPACE = {  # name: (config path, low, high, log, int)
    "lr": ("optim.lr", 1.0, 16.0, True, False),
    "weight_decay": ("optim.weight_decay", 5e-4, 1e-2, True, False),
    "units": ("model_args.units", 32, 256, True, True),
    "dropout": ("model_args.dropout", 0.0, 0.5, False, False),
}


def _load(path: Path) -> dict[str, Any]:
    start = path if path.exists() else COMMITTED
    return json.loads(start.read_text()) if start.exists() else {}


def _save(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1))


def _train(cfg: TrainConfig, data: Any, engine: str = "cifarlab",
           evaluate_test: bool = True) -> Any:
    if engine == "keras":
        from cifarlab.kerasfit import train_with_keras

        return train_with_keras(cfg, data=data, evaluate_test=evaluate_test, progress=False)
    from cifarlab.trainer import train

    return train(cfg, data=data, evaluate_test=evaluate_test, progress=False)


# ----------------------------------------------------------------------------- throughput


RUNS = {  # name: (model, engine)
    "keras-cnn/cifarlab": ("keras-cnn", "cifarlab"),
    "keras-cnn/model.fit": ("keras-cnn", "keras"),
    "pytorch-twin/cifarlab": (TWIN, "cifarlab"),
    "keras-dense/cifarlab": ("keras-dense", "cifarlab"),
}


def throughput(a: argparse.Namespace) -> None:
    results = _load(a.results)
    section = results.setdefault("throughput", {})
    data = load_data(DataConfig(source=a.data))
    for name, (model, engine) in RUNS.items():
        key = f"{name}/{a.epochs:g}"
        if key in section:
            continue
        base = "keras-dense" if model == "keras-dense" else "keras-cnn"
        cfg = default_config(base).with_values({"model": model, "optim.epochs": a.epochs,
                                                "device": "cpu"})
        t0 = time.perf_counter()
        r = _train(cfg, data, engine)
        section[key] = {
            "model": model, "engine": engine, "epochs": a.epochs,
            "history": r.history, "train_seconds": round(r.train_seconds, 1),
            "wall_seconds": round(time.perf_counter() - t0, 1), "precision": r.precision,
            "val_acc": r.val_acc, "test_acc": r.test_acc, "machine": machine(),
        }
        print(key, r.val_acc, r.test_acc, [h["images_per_second"] for h in r.history],
              flush=True)
        _save(a.results, results)
    _report(results, a)


def _ips(entry: dict[str, Any]) -> float:
    rates = [h["images_per_second"] for h in entry["history"][1:] if h["images_per_second"]]
    return statistics.median(rates or [entry["history"][0]["images_per_second"]])


def _seconds_to(entry: dict[str, Any], acc: float) -> float | None:
    t = 0.0
    for h in entry["history"]:
        t += h["seconds"]
        if h["val_acc"] is not None and h["val_acc"] >= acc:
            return t
    return None


# ----------------------------------------------------------------------------- tuner


def _kerastuner() -> Any:
    """KerasTuner, installed for the benchmark only (beside, not into, the environment)."""
    if not (KT_LIB / "keras_tuner").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(KT_LIB), "keras-tuner==1.4.8", "kt-legacy==1.0.5", "six"], check=True)
    sys.path.insert(0, str(KT_LIB))
    import keras_tuner

    return keras_tuner


def _space_yaml(epochs: float, fraction: float) -> str:
    lines = [f"fidelity: {{model: keras-cnn, epochs: {epochs:g}, train_fraction: {fraction:g}}}",
             "params:"]
    for path, low, high, log, is_int in SPACE.values():
        kind = "int" if is_int else "float"
        lines.append(f"  {path}: {{type: {kind}, low: {low}, high: {high}, "
                     f"log: {str(log).lower()}}}")
    return "\n".join(lines) + "\n"


def _cifarlab_study(a: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    from cifarlab.tune import open_study, retrain_config

    space = out / "space.yaml"
    out.mkdir(parents=True, exist_ok=True)
    space.write_text(_space_yaml(a.trial_epochs, a.trial_fraction))
    study = out / f"study-{seed}"
    t0 = time.perf_counter()
    env = {**os.environ, "CIFARLAB_DATA": a.data}
    subprocess.run([str(Path(sys.executable).parent / "cifarlab"), "tune", "--space",
                    str(space), "--study-dir", str(study), "--trials", str(a.trials),
                    "--target-epochs", str(a.target_epochs), "--top-k", "1", "--seed",
                    str(seed), "-q"], check=True, env=env)
    seconds = time.perf_counter() - t0
    trials = [t for t in open_study(study).trials
              if t.value is not None and t.user_attrs.get("role") is None]
    chosen = retrain_config(study)
    return {"config": chosen.config.to_dict(), "reason": chosen.reason,
            "best_trial_val_loss": min((t.value for t in trials), default=None),
            "seconds": round(seconds, 1)}


def _kerastuner_search(a: argparse.Namespace, seed: int, out: Path, data: Any) -> dict[str, Any]:
    kt = _kerastuner()
    from cifarlab.kerasfit import train_with_keras

    base = default_config("keras-cnn").with_values({
        "optim.epochs": a.trial_epochs, "data.train_fraction": a.trial_fraction, "tta": 0,
        "device": "cpu"})
    sub = load_data(DataConfig(source=a.data, train_fraction=a.trial_fraction))
    space = SPACE

    def config_of(values: dict[str, Any]) -> TrainConfig:
        return base.with_values({space[k][0]: v for k, v in values.items()})

    class Tuner(kt.BayesianOptimization):  # its GP and acquisition; model.fit trials
        def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> dict[str, float]:
            hp = trial.hyperparameters
            values = {}
            for name, (_, low, high, log, is_int) in space.items():
                if is_int:
                    values[name] = hp.Int(name, int(low), int(high),
                                          sampling="log" if log else "linear")
                else:
                    values[name] = hp.Float(name, low, high, sampling="log" if log else "linear")
            r = train_with_keras(config_of(values), data=sub, evaluate_test=False,
                                 progress=False)
            return {"val_loss": float(r.val_loss)}

    t0 = time.perf_counter()
    tuner = Tuner(objective=kt.Objective("val_loss", "min"), max_trials=a.trials, seed=seed,
                  directory=str(out), project_name=f"kerastuner-{seed}", overwrite=True)
    tuner.search()
    seconds = time.perf_counter() - t0
    best = tuner.oracle.get_best_trials(1)[0]
    values = {k: best.hyperparameters.get(k) for k in space}
    return {"config": config_of(values).to_dict(), "values": values,
            "best_trial_val_loss": best.score, "seconds": round(seconds, 1)}


def tuner(a: argparse.Namespace) -> None:
    results = _load(a.results)
    section = results.setdefault("tuner", {})
    out = ROOT / "bench-out" / "keras-tuner"
    data = load_data(DataConfig(source=a.data))
    for seed in a.seeds:
        for who in ("cifarlab", "kerastuner"):
            key = f"{who}/{seed}/{a.trials}/{a.trial_epochs:g}:{a.trial_fraction:g}/" \
                  f"{a.target_epochs:g}"
            if key in section:
                continue
            found = (_cifarlab_study(a, seed, out) if who == "cifarlab"
                     else _kerastuner_search(a, seed, out, data))
            cfg = TrainConfig.from_dict(found["config"]).with_values({
                "optim.epochs": a.target_epochs, "data.train_fraction": 1.0,
                "data.val_size": None, "tta": 2, "seed": 0, "device": "cpu"})
            r = _train(cfg, data)
            section[key] = {**found, "retrained": {"val_loss": r.val_loss, "val_acc": r.val_acc,
                                                   "test_acc": r.test_acc},
                            "machine": machine()}
            print(key, json.dumps(section[key]["retrained"]), flush=True)
            _save(a.results, results)
    _report(results, a)


# ----------------------------------------------------------------------------- e2e


def _readme_builder() -> str:
    """The builder file the README shows (so the run checks the README's own example)."""
    text = (ROOT / "README.md").read_text()
    after = text[text.index("A builder file (`nets.py`):"):]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


def e2e(a: argparse.Namespace) -> None:
    """The README's Keras example on real CIFAR-10, every command, recorded."""
    import httpx
    import numpy as np
    from PIL import Image

    results = _load(a.results)
    work = ROOT / "bench-out" / "keras-e2e"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "nets.py").write_text(_readme_builder())
    (work / "space.yaml").write_text(
        'fidelity: {model: "nets.py:build_model", epochs: 1, train_fraction: 0.2}\n'
        "params:\n"
        "  lr: {type: float, low: 0.5, high: 8.0, log: true}\n"
        "  model_args.units: {type: int, low: 32, high: 256, log: true}\n"
        "  model_args.dropout: {type: float, low: 0.0, high: 0.5}\n")
    test = load_data(DataConfig(source=a.data)).test
    Image.fromarray(np.asarray(test.images[0])).save(work / "test0.png")
    exe = str(Path(sys.executable).parent / "cifarlab")
    env = {**os.environ, "CIFARLAB_DATA": a.data}
    steps: list[dict[str, Any]] = []

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        t0 = time.perf_counter()
        r = subprocess.run([exe, *args], cwd=work, env=env, capture_output=True, text=True)
        steps.append({"command": "cifarlab " + " ".join(args), "exit": r.returncode,
                      "seconds": round(time.perf_counter() - t0, 1),
                      "tail": r.stdout.strip().splitlines()[-3:]})
        print(steps[-1], flush=True)
        if r.returncode not in (0, 1):
            raise SystemExit(r.stderr)
        return r

    run("tune", "--space", "space.yaml", "--trials", str(a.trials), "--target-epochs",
        str(a.target_epochs), "--top-k", "1", "--study-dir", "studies/nets", "-q")
    run("train", "--from-study", "studies/nets", "--name", "nets", "-q")
    run("doctor", "--model", "nets.py:build_model", "--epochs", "1", "--train-fraction", "0.2")
    ev = json.loads(run("evaluate", "runs/nets", "--json").stdout)
    pr = json.loads(run("predict", "runs/nets", "test0.png", "--json", "--tta", "0").stdout)
    server = Server("runs/nets", "--tta", "0", cwd=work, env=env)
    try:
        url = server.url
        rest = httpx.post(f"{url}/v1/predict", files={"file": (
            "test0.png", (work / "test0.png").read_bytes())}).json()
        meta = httpx.get(f"{url}/v2/models/build_model").json()
        page = httpx.get(url).status_code
    finally:
        server.close()
    run("export", "runs/nets", "--format", "keras")
    code = ("import json, os; os.environ['KERAS_BACKEND'] = 'torch'\n"
            "import numpy as np, keras; from PIL import Image\n"
            "m = keras.saving.load_model('runs/nets/model.keras')\n"
            "x = np.asarray(Image.open('test0.png').convert('RGB'), np.float32)[None]\n"
            "print(json.dumps(m.predict(x, verbose=0)[0].tolist()))\n")
    plain = json.loads(subprocess.run([sys.executable, "-c", code], cwd=work, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    summary = json.loads((work / "runs" / "nets" / "summary.json").read_text())
    top = pr["predictions"][0]["top"][0]
    results["e2e"] = {
        "steps": steps, "test_acc": summary["test_acc"], "evaluate_acc": ev["accuracy"],
        "config": json.loads((work / "runs" / "nets" / "config.json").read_text()),
        "predict_top": top, "rest_top": rest["predictions"][0]["top"][0],
        "v2_model": meta.get("name"), "page_status": page,
        "keras_export_prob": plain[summary["classes"].index(top["class"])],
        "true_class": summary["classes"][int(test.labels[0])], "machine": machine()}
    _save(a.results, results)
    _report(results, a)


# ----------------------------------------------------------------------------- report


def _report(results: dict[str, Any], a: argparse.Namespace) -> None:
    lines = ["## Keras models (`bench/keras.py`)", ""]
    tp = results.get("throughput", {})
    if tp:
        some = next(iter(tp.values()))
        lines += [f"Machine: {some['machine']}. Data: the original pixels, 45,000 training "
                  "images, 5,000 held out. Each model with its recipe (keras-cnn: batch 256, "
                  "SGD-Nesterov, label smoothing 0.1), bf16 autocast where cifarlab trains.", ""]
        cnn = {k: v for k, v in tp.items() if k.startswith(("keras-cnn", "pytorch-twin"))}
        # per-epoch validation is without TTA: the accuracy every keras-cnn run reached there
        reach = min((max(h["val_acc"] or 0.0 for h in v["history"]) for v in cnn.values()),
                    default=0.0)
        lines += ["| model / trainer | epochs | images/s | s to "
                  f"{reach:.1%} val (no TTA) | val acc (TTA 2) | test acc (TTA 2) |",
                  "|---|---:|---:|---:|---:|---:|"]
        for k, v in tp.items():
            t = _seconds_to(v, reach) if k in cnn else None
            lines.append(f"| {k.rsplit('/', 1)[0]} | {v['epochs']:g} | {_ips(v):,.0f} | "
                         f"{'-' if t is None else f'{t:.0f}'} | {v['val_acc']:.2%} | "
                         f"{v['test_acc']:.2%} |")
        fit = next((v for k, v in tp.items() if k.startswith("keras-cnn/model.fit")), None)
        own = next((v for k, v in tp.items() if k.startswith("keras-cnn/cifarlab")), None)
        twin = next((v for k, v in tp.items() if k.startswith("pytorch-twin")), None)
        if fit and own:
            lines.append("")
            lines.append(f"cifarlab's trainer against `model.fit`: {_ips(own) / _ips(fit):.2f}× "
                         "the images/s (target ≥ 2×).")
        if twin and own:
            lines.append(f"Keras model against its PyTorch twin: "
                         f"{_ips(twin) / _ips(own) - 1:+.1%} time per image (target ≤ 10%).")
    tu = results.get("tuner", {})
    if tu:
        lines += ["", "### cifarlab tune against KerasTuner's BayesianOptimization", ""]
        some = next(iter(tu.values()))
        lines += [f"Machine: {some['machine']}.", "",
                  "| tuner | seed | trials | best trial val loss | tuning s | retrained val loss "
                  "| retrained test acc |", "|---|---:|---:|---:|---:|---:|---:|"]
        by: dict[str, list[dict[str, Any]]] = {}
        for k, v in sorted(tu.items()):
            who, seed, trials = k.split("/")[:3]
            by.setdefault(who, []).append(v)
            bv = v["best_trial_val_loss"]
            lines.append(f"| {who} | {seed} | {trials} | {'-' if bv is None else f'{bv:.4f}'} | "
                         f"{v['seconds']:.0f} | {v['retrained']['val_loss']:.4f} | "
                         f"{v['retrained']['test_acc']:.2%} |")
        lines.append("")
        for who, rows in by.items():
            lines.append(f"- {who}: mean retrained test accuracy "
                         f"{statistics.mean(r['retrained']['test_acc'] for r in rows):.2%}, "
                         f"mean retrained val loss "
                         f"{statistics.mean(r['retrained']['val_loss'] for r in rows):.4f} "
                         f"({len(rows)} seeds)")
    e = results.get("e2e")
    if e:
        cfg = e["config"]
        lines += ["", "### The README's Keras example on real CIFAR-10", "",
                  f"Machine: {e['machine']}. `nets.py:build_model` (README), every command in "
                  "`bench-out/keras-e2e/`:", "",
                  "| command | exit | seconds | last line |", "|---|---:|---:|---|"]
        for st in e["steps"]:
            last = (st["tail"] or [""])[-1].replace("|", "\\|")[:110]
            lines.append(f"| `{st['command']}` | {st['exit']} | {st['seconds']:.0f} | {last} |")
        lines += ["", f"The answer (lr {cfg['optim']['lr']:.3g}, units "
                  f"{cfg['model_args'].get('units', 128)}, dropout "
                  f"{cfg['model_args'].get('dropout', 0.25):.3g}, {cfg['optim']['epochs']:g} "
                  f"epochs): test accuracy {e['test_acc']:.2%} (evaluate: {e['evaluate_acc']:.2%})."
                  f" Test image 0 (a {e['true_class']}): predict says {e['predict_top']['class']} "
                  f"{e['predict_top']['probability']:.4f}, the REST API "
                  f"{e['rest_top']['class']} {e['rest_top']['probability']:.4f}, the exported "
                  f".keras file in plain Keras {e['keras_export_prob']:.4f}; KServe v2 serves it "
                  f"as `{e['v2_model']}`; the page answered {e['page_status']}."]
    write_section("keras", "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=["throughput", "tuner", "e2e", "report"])
    p.add_argument("--epochs", type=float, default=10.0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--trial-epochs", type=float, default=2.0)
    p.add_argument("--trial-fraction", type=float, default=0.25)
    p.add_argument("--target-epochs", type=float, default=4.0)
    p.add_argument("--data", default=os.environ.get("CIFARLAB_DATA") or str(LOSSLESS))
    p.add_argument("--results", type=Path, default=ROOT / "bench-out" / "keras.json")
    a = p.parse_args()
    if a.what == "throughput":
        throughput(a)
    elif a.what == "tuner":
        tuner(a)
    elif a.what == "e2e":
        e2e(a)
    else:
        _report(_load(a.results), a)


if __name__ == "__main__":
    main()
