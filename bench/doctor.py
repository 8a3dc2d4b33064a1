"""Doctor benchmarks: the seeded-bug suite's precision and recall, the runtime monitors' cost,
and the default airnet recipe on real CIFAR-10 (which must raise no alarm).

    python bench/doctor.py suite                  # precision / recall over tests/doctor_cases.py
    python bench/doctor.py realsuite [--only NAME] # the real-image suite (tests/doctor_real_cases.py)
    python bench/doctor.py overhead [--pairs 3]   # training time with and without the monitors
    python bench/doctor.py real [--epochs 1]      # `cifarlab doctor` on real CIFAR-10, airnet

Reads real CIFAR-10 from --data or $CIFARLAB_DATA. Writes its tables into docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from _common import machine, write_section


def suite(args: argparse.Namespace) -> None:
    from cifarlab.doctor import diagnose
    from doctor_cases import cases

    rows, caught, bugs, right, alarms_total, healthy_clean, healthy = [], 0, 0, 0, 0, 0, 0
    for case in cases():
        t = time.perf_counter()
        report = diagnose(case.build(), steps=case.steps)
        alarms = sorted({f.rule for f in report.alarms()})
        good = [a for a in alarms if a in case.expect]
        alarms_total += len(alarms)
        right += len(good)
        if case.expect:
            bugs += 1
            caught += bool(good)
            verdict = "caught" if good else "MISSED"
        else:
            healthy += 1
            healthy_clean += not alarms
            verdict = "clean" if not alarms else "FALSE ALARM"
        rows.append(f"| {case.name} | {', '.join(sorted(case.expect)) or '(healthy)'} | "
                    f"{', '.join(alarms) or '—'} | {verdict} | {time.perf_counter() - t:.1f} |")
        print(rows[-1], flush=True)
    recall = caught / bugs
    precision = right / alarms_total if alarms_total else 1.0
    lines = [
        "## Doctor: seeded-bug suite (`bench/doctor.py suite`)",
        "",
        f"Machine: {machine()}.",
        "The cases are `tests/doctor_cases.py` (the same ones `tests/test_doctor.py` asserts): "
        "small smooth synthetic images (4 classes, 16×16), small CNNs, an MLP; each case runs "
        "`cifarlab.doctor.diagnose` (preflight + 80 monitored steps). An alarm is a warning, "
        "error or critical finding after root-cause consolidation; it is right when its rule is "
        "one of the bug's own checks.",
        "",
        "| case | right checks | alarms raised | verdict | seconds |",
        "|---|---|---|---|---:|",
        *rows,
        "",
        f"**Recall {caught}/{bugs} = {recall:.0%}** (bugs caught by a right check; target ≥ 90%). "
        f"**Precision {right}/{alarms_total} = {precision:.0%}** (alarms that name a right check). "
        f"Healthy runs without any alarm: **{healthy_clean}/{healthy}**. For comparison, "
        "DeepDiagnosis found 46 of 53 real-world bugs (87%) in its ICSE 2022 evaluation; these "
        "are seeded bugs, an easier test.",
    ]
    write_section("doctor-suite", "\n".join(lines))


def _train_once(cfg, data, doctor: bool) -> tuple[float, float]:
    """(training seconds, seconds spent inside the monitor's own work)."""
    from cifarlab.doctor import DoctorMonitor
    from cifarlab.trainer import train

    monitor = DoctorMonitor(num_classes=len(data.classes)) if doctor else None
    result = train(cfg, [monitor] if monitor else [], data=data, evaluate_test=False,
                   progress=False)
    return result.train_seconds, monitor.seconds if monitor else 0.0


def overhead(args: argparse.Namespace) -> None:
    from cifarlab.data import load_data
    from cifarlab.models import default_config

    cfg = default_config("airnet")
    cfg.data.source = args.data
    cfg.data.train_fraction = args.fraction
    cfg.optim.epochs = args.epochs
    cfg.tta = 0
    data = load_data(cfg.data)
    _train_once(cfg.with_values({"optim.epochs": 0.2}), data, True)  # warm-up
    pairs = []
    for k in range(args.pairs):
        order = (True, False) if k % 2 == 0 else (False, True)  # alternate who goes first
        t = {d: _train_once(cfg, data, d) for d in order}
        pairs.append((t[True][0], t[False][0], t[True][1]))
        print(f"pair {k + 1}: with monitors {t[True][0]:.1f} s (monitor's own work "
              f"{t[True][1]:.2f} s), without {t[False][0]:.1f} s "
              f"({t[True][0] / t[False][0] - 1:+.1%})", flush=True)
    ratios = [a / b - 1 for a, b, _ in pairs]
    own = [m / a for a, _, m in pairs]
    med = float(np.median(ratios))
    steps = int(len(data.train) // cfg.optim.batch_size * args.epochs)
    lines = [
        "## Doctor: monitor overhead (`bench/doctor.py overhead`)",
        "",
        f"Machine: {machine()}.",
        f"airnet default recipe on real CIFAR-10, train fraction {args.fraction}, "
        f"{args.epochs} epochs ({steps} steps of {cfg.optim.batch_size}), training seconds of "
        "`train()` with a `DoctorMonitor` among its callbacks (what `cifarlab train` does) and without, in "
        f"{args.pairs} back-to-back pairs that alternate which run goes first.",
        "",
        "| pair | with monitors s | monitor's own work s | without s | overhead |",
        "|---:|---:|---:|---:|---:|",
        *[f"| {i + 1} | {a:.1f} | {m:.2f} | {b:.1f} | {a / b - 1:+.1%} |"
          for i, (a, b, m) in enumerate(pairs)],
        "",
        f"Median overhead of the paired runs **{med:+.1%}**; on this shared 2-core machine "
        "runs of the same config differ by several percent, so the monitor's own time, "
        "measured inside the run (sampling work on the training thread plus the activation "
        f"statistics taken in the sampled forward passes), is the sharper figure: "
        f"**{float(np.median(own)):.2%}** of training time (median). Target ≤ 5%: "
        + ("met." if max(med, float(np.median(own))) <= 0.05 else "MISSED."),
    ]
    write_section("doctor-overhead", "\n".join(lines))


def real(args: argparse.Namespace) -> None:
    from cifarlab.data import load_data
    from cifarlab.doctor import diagnose_config
    from cifarlab.models import default_config

    cfg = default_config("airnet")
    cfg.data.source = args.data or os.environ.get("CIFARLAB_DATA")
    data = load_data(cfg.data)
    t = time.perf_counter()
    report = diagnose_config(cfg, data, epochs=args.epochs)
    total = time.perf_counter() - t
    print(report.to_text())
    sec = report.context["seconds"]
    pre = sum(sec.values())
    alarms = report.alarms()
    notes = [f for f in report.findings if f not in alarms]
    ls = report.context.get("label_signal", {})
    lr = report.context.get("lr_range", {})
    training = report.context.get("training", {})
    lines = [
        "## Doctor on real CIFAR-10, default airnet recipe (`bench/doctor.py real`)",
        "",
        f"Machine: {machine()}.",
        f"`diagnose_config` = `cifarlab doctor --epochs {args.epochs}` on "
        f"`{Path(str(cfg.data.source)).name}` (45,000 train / 5,000 validation / 10,000 test), "
        "airnet with its default recipe.",
        "",
        f"- Preflight: **{pre:.0f} s** (data {sec.get('data', 0):.1f} s, model "
        f"{sec.get('model', 0):.1f} s, behaviour {sec.get('behaviour', 0):.1f} s; target under "
        f"2 minutes: " + ("met" if pre < 120 else "MISSED") + f"); whole run with the "
        f"{args.epochs}-epoch monitored training: {total:.0f} s.",
        f"- Alarms (warning or worse): **{len(alarms)}** (target 0)"
        + (": " + "; ".join(f.one_line() for f in alarms) if alarms else "."),
        f"- Notes: {'; '.join(f.one_line() for f in notes) or 'none'}.",
        f"- Initial loss {report.context['initial_loss']['value']:.3f} vs ln 10 = 2.303; "
        f"one batch of 32 overfitted in {report.context.get('overfit_steps', '—')} steps.",
        f"- Label signal after {ls.get('steps')} steps: training loss {ls.get('train_loss_real', 0):.3f}"
        f" with the real labels vs {ls.get('train_loss_shuffled', 0):.3f} shuffled; validation "
        f"accuracy {ls.get('val_acc_real', 0):.3f} (shuffled {ls.get('val_acc_shuffled', 0):.3f}, "
        f"zero input {ls.get('val_acc_zero_input', 0):.3f}).",
        f"- LR range test: suggests {lr.get('suggested_lr', 0):.3g} against the configured "
        f"{lr.get('configured_lr', 0):.3g} (PyTorch lr of the decoupled recipe).",
        f"- Monitored epoch: validation accuracy {training.get('val_acc') or 0:.4f}.",
    ]
    write_section("doctor-real", "\n".join(lines))


def _real_sample(source: str, n_train: int = 5000, n_val: int = 1000, n_test: int = 1000):
    """A fixed random sample of real CIFAR-10: train and validation from the training split,
    test from the test split."""
    from cifarlab.data.cache import prepare
    from doctor_real_cases import SuiteData

    p = prepare(source)
    rng = np.random.default_rng(0)
    tr = rng.permutation(len(p.train))[: n_train + n_val]
    te = rng.permutation(len(p.test))[:n_test]
    x, y = p.train.images[tr], p.train.labels[tr].astype(np.int64)
    return SuiteData(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                     p.test.images[te], p.test.labels[te].astype(np.int64))


def realsuite(args: argparse.Namespace) -> None:
    """Every case of the real-image suite, resumable from its results file."""
    import torch

    from cifarlab.doctor import diagnose
    from cifarlab.doctor.findings import tier_of
    from doctor_real_cases import cases

    source = args.data or os.environ.get("CIFARLAB_DATA")
    if not source:
        sys.exit("realsuite: give --data or set CIFARLAB_DATA to real CIFAR-10")
    out = Path(args.results)
    done = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    data = _real_sample(source)
    for case in cases():
        if (args.only and case.name not in args.only) or (case.name in done and not args.only):
            continue
        torch.manual_seed(0)
        np.random.seed(0)
        t = time.perf_counter()
        report = diagnose(case.build(data), steps=case.steps)
        seconds = time.perf_counter() - t
        ranked = report.ranked()
        alarms = [f for f in ranked if f.severity >= 1]
        done[case.name] = {
            "category": case.category, "right": sorted(case.right), "cause": sorted(case.cause),
            "alarms": [f.rule for f in alarms],
            "top": alarms[0].rule if alarms else None,
            "lines": [f.one_line() for f in ranked][:6],
            "tiers": {f.rule: tier_of(f) for f in alarms},
            "seconds": round(seconds, 1), "preflight_seconds": report.context.get("seconds"),
            "source": case.source}
        r = done[case.name]
        print(f"{case.name:34s} {case.category:9s} alarms={r['alarms']} top={r['top']} "
              f"{seconds:.1f}s", flush=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(done, indent=1))
        tmp.replace(out)
    _realsuite_report(done)


def _verdict(r: dict) -> tuple[bool, int, int, bool]:
    """(caught, right alarms, alarms, top names the cause) for one bug case."""
    right = [a for a in r["alarms"] if a in r["right"]]
    return bool(right), len(right), len(r["alarms"]), r["top"] in r["cause"]


def _realsuite_report(done: dict) -> None:
    from doctor_real_cases import cases

    order = [c.name for c in cases()]
    rows, per = [], {}
    for name in order:
        r = done.get(name)
        if r is None:
            continue
        cat = r["category"]
        if cat == "healthy":
            verdict = "clean" if not r["alarms"] else "FALSE ALARM"
            per.setdefault("healthy", [0, 0])
            per["healthy"][0] += not r["alarms"]
            per["healthy"][1] += 1
        else:
            caught, right, alarms, top = _verdict(r)
            verdict = ("caught" if caught else "MISSED") + ("" if top or not caught
                                                           else ", top is a symptom")
            p = per.setdefault(cat, [0, 0, 0, 0, 0])
            p[0] += caught
            p[1] += 1
            p[2] += right
            p[3] += alarms
            p[4] += top
        rows.append(f"| {name} | {cat} | {', '.join(r['right']) or '(healthy)'} | "
                    f"{', '.join(r['alarms']) or '—'} | {r['top'] or '—'} | {verdict} | "
                    f"{r['seconds']:.0f} |")
    bug = [v for k, v in per.items() if k != "healthy"]
    tot = [sum(v[i] for v in bug) for i in range(5)]
    pre = [sum((done[n]["preflight_seconds"] or {}).values()) for n in order if n in done]
    lines = [
        "## Doctor: the real-image suite (`bench/doctor.py realsuite`)",
        "",
        f"Machine: {machine()}.",
        "Cases: `tests/doctor_real_cases.py`, each with its source: ordinary models (the PyTorch "
        "tutorial network, a conv net with and without BatchNorm, a CIFAR ResNet, a VGG-style "
        "net, MLPs, a GroupNorm net with functional activations) on a fixed sample of real "
        "CIFAR-10 (original pixels: 5,000 training, 1,000 validation and 1,000 test images, "
        "10 classes, 32×32), each run as `diagnose(subject, steps=150)` with the default "
        "thresholds. A bug is caught when a warning or worse names one of its right rules; "
        "precision counts the alarms on bug cases whose rule is right; top-1 counts bugs whose "
        "first-ranked finding names the cause itself, not a symptom.",
        "",
        "| category | bugs | caught (recall) | precision | top-1 names the cause |",
        "|---|---:|---:|---:|---:|",
        *[f"| {k} | {v[1]} | {v[0]} ({v[0] / v[1]:.0%}) | {v[2]}/{v[3]} "
          f"({v[2] / max(1, v[3]):.0%}) | {v[4]} ({v[4] / v[1]:.0%}) |"
          for k, v in per.items() if k != "healthy"],
        f"| **all bugs** | {tot[1]} | **{tot[0]} ({tot[0] / max(1, tot[1]):.0%})** | "
        f"**{tot[2]}/{tot[3]} ({tot[2] / max(1, tot[3]):.0%})** | "
        f"**{tot[4]} ({tot[4] / max(1, tot[1]):.0%})** |",
        "",
        f"Healthy configurations without any warning: **{per.get('healthy', [0, 0])[0]} of "
        f"{per.get('healthy', [0, 0])[1]}**. Targets: recall ≥ 90%, precision ≥ 0.85, no healthy "
        "configuration with a warning, top-1 ≥ 75%.",
        "",
        "Read these figures with their caveat: the cases and the rules they exercise were "
        "written by the same people in the same session, and each rule was adjusted until its "
        "cases passed. They show that every class of bug named in issue #12 has a rule that "
        "fires on real images and that the healthy recipes stay quiet; how well the rules "
        "generalize is measured only by suites written elsewhere.",
        f"Preflight per case: median {float(np.median(pre)):.1f} s, max {max(pre):.1f} s; "
        "whole case with the 150 monitored steps: median "
        f"{float(np.median([done[n]['seconds'] for n in order if n in done])):.1f} s.",
        "",
        "| case | category | right rules | alarms raised | top finding | verdict | s |",
        "|---|---|---|---|---|---|---:|",
        *rows,
    ]
    write_section("doctor-realsuite", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("suite")
    o = sub.add_parser("overhead")
    o.add_argument("--pairs", type=int, default=3)
    o.add_argument("--fraction", type=float, default=0.25)
    o.add_argument("--epochs", type=float, default=2.0)
    o.add_argument("--data", default=None)
    r = sub.add_parser("real")
    r.add_argument("--epochs", type=float, default=1.0)
    r.add_argument("--data", default=None)
    rs = sub.add_parser("realsuite")
    rs.add_argument("--data", default=None)
    rs.add_argument("--only", nargs="*", default=None, help="rerun just these cases")
    rs.add_argument("--fresh", action="store_true", help="ignore earlier results")
    rs.add_argument("--results", default=str(Path(__file__).resolve().parent / "results"
                                             / "doctor-realsuite-cpu.json"))
    args = p.parse_args()
    {"suite": suite, "overhead": overhead, "real": real,
     "realsuite": realsuite}[args.cmd](args)


if __name__ == "__main__":
    main()
