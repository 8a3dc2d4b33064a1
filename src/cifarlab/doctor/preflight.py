"""Preflight: data, model and behavioural checks that run before training.

Each check adds at most one finding per root cause to a :class:`Report`. The thresholds are the
issue's (3:1 imbalance, std in [0.5, 2], overfit one batch of 32 below 0.05·ln C within 200
steps); the behavioural tests train throw-away copies of the model and never touch the model
the user passed in.
"""

from __future__ import annotations

import time

from cifarlab.doctor.behaviour import behaviour_checks
from cifarlab.doctor.checks_data import data_checks
from cifarlab.doctor.checks_model import model_checks
from cifarlab.doctor.findings import Report
from cifarlab.doctor.subject import Subject

__all__ = ["behaviour_checks", "data_checks", "model_checks", "preflight"]


def preflight(subject: Subject, behaviour: bool = True, seed: int = 0) -> Report:
    """Run every preflight check on ``subject``; returns the report (never raises on a finding).

    Example::

        report = preflight(Subject(model, x, y, num_classes=10, optimizer=opt, val_x=vx,
                                   val_y=vy))
        print(report.to_text())
    """
    report = Report(context={"subject": subject.context()})
    timings: dict[str, float] = {}
    for name, fn in (("data", data_checks), ("model", model_checks)):
        t = time.perf_counter()
        fn(subject, report)
        timings[name] = round(time.perf_counter() - t, 2)
    if behaviour:
        t = time.perf_counter()
        behaviour_checks(subject, report, seed=seed)
        timings["behaviour"] = round(time.perf_counter() - t, 2)
    report.context["seconds"] = timings
    return report
