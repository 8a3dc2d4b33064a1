"""What a study minimises: which validation score of a trained trial is its value.

* ``calibrated-loss`` (the default for new studies): validation cross-entropy at the temperature
  that minimises it (:func:`cifarlab.infer.calibrated_loss`). Plain cross-entropy compares how
  confident models are as much as what they know, so a study minimising it drifts towards
  settings that only sharpen the softmax. Measured in ``make demo`` (2026-11-26): the plain-loss
  answer (label smoothing 0.04) beat the recipe (0.2) by 0.23 in validation loss with 1.5
  points more validation accuracy, and a second candidate had 2 points more accuracy than the
  answer at a higher plain loss.
* ``loss``: plain validation cross-entropy, what studies made before this option minimised
  (and still do: a study keeps the metric it was created with).
* ``error``: 1 − validation accuracy, what a user who reports accuracy may want; coarser (a
  step of 1/5,000 on the default validation split) and noisier than either loss.

The metric is stored on the study, so every worker, the target trials, the answer and the
reports read the same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import optuna

from cifarlab.errors import ConfigError, StudyError

__all__ = ["DEFAULT_METRIC", "METRICS", "METRIC_ATTR", "Metric", "get_metric", "study_metric"]

METRIC_ATTR = "cifarlab:metric"


@dataclass(frozen=True)
class Metric:
    name: str  # as --metric spells it
    column: str  # the short label of tables and plots
    describe: str  # what it is, in words
    axis: str  # short enough for a plot's axis

    def value(self, scores: dict[str, Any]) -> float | None:
        """The metric from an epoch row or a result's validation figures (None: not measured).
        """
        if self.name == "error":
            acc = scores.get("val_acc")
            return None if acc is None else 1.0 - float(acc)
        raw = scores.get("val_loss" if self.name == "loss" else "val_cal_loss")
        return None if raw is None else float(raw)


METRICS = {m.name: m for m in (
    Metric("calibrated-loss", "val_cal_loss",
           "validation cross-entropy at its best temperature", "val. loss (calibrated)"),
    Metric("loss", "val_loss", "validation cross-entropy", "validation loss"),
    Metric("error", "val_error", "validation error (1 - accuracy)", "validation error"),
)}
DEFAULT_METRIC = "calibrated-loss"


def get_metric(name: str) -> Metric:
    try:
        return METRICS[name]
    except KeyError:
        raise ConfigError(f"Unknown --metric {name!r}; choose one of "
                          f"{', '.join(METRICS)}.") from None


def study_metric(study: optuna.Study) -> Metric:
    """The study's metric; plain validation loss for a study made before metrics existed."""
    raw = study.user_attrs.get(METRIC_ATTR, "loss")
    if raw not in METRICS:
        raise StudyError(f"Study {study.study_name!r} minimises {raw!r}, which this version of "
                         f"cifarlab does not know ({', '.join(METRICS)}); upgrade cifarlab.")
    return METRICS[raw]
