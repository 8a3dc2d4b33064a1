"""The real-image doctor suite's own checks (the suite runs on real CIFAR-10 in
`bench/doctor.py realsuite`): its size and coverage, that every case builds a working subject,
and a few cases run end to end on small synthetic 32×32 images with 10 classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cifarlab.doctor import diagnose
from cifarlab.doctor.findings import RULES
from doctor_cases import SmallCNN, _norm, smooth_images, subject
from doctor_real_cases import C, Case, SuiteData, cases

CASES = cases()


def _data(n: int = 12) -> SuiteData:
    """Small learnable 32×32 images with 10 classes (for building, not for verdicts)."""
    x, y = smooth_images(n, seed=0, size=32, n_classes=C)
    vx, vy = smooth_images(12, seed=1, size=32, n_classes=C)
    tx, ty = smooth_images(3, seed=2, size=32, n_classes=C)
    return SuiteData(x, y, vx, vy, tx, ty)


def test_suite_size_coverage_and_sources():
    bugs = [c for c in CASES if c.category != "healthy"]
    assert len(bugs) >= 40 and len(CASES) - len(bugs) >= 15
    assert {c.category for c in bugs} == {"data", "model", "loss", "optimizer", "schedule",
                                          "loop"}
    assert len({c.name for c in CASES}) == len(CASES)
    for c in bugs:
        assert c.right and c.cause <= c.right, c.name
        assert all(r in RULES for r in c.right | c.cause), c.name
    assert all(c.source for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case_builds_a_working_subject(case: Case):
    s = case.build(_data(40))
    assert s.train_x.shape[1:] == (3, 32, 32) and s.num_classes == C
    model = s.fresh_model().train()
    opt = s.optimizer_for(model)
    idx = torch.arange(16)
    loss = s.step_fn(model, opt, s.loss_fn, torch.nan_to_num(s.train_x[idx]),
                     s.train_y[idx].clamp(0, C - 1))
    assert loss.ndim == 0


@pytest.mark.slow
@pytest.mark.parametrize("name,rule", [("relu-on-logits", "output-range"),
                                       ("convs-without-activations", "stacked-linear"),
                                       ("steplr-per-batch", "lr-schedule"),
                                       ("class-weights-zero", "loss-weights")])
def test_real_case_caught_on_small_images(name: str, rule: str):
    case = next(c for c in CASES if c.name == name)
    report = diagnose(case.build(_data(20)), steps=60)
    assert rule in {f.rule for f in report.alarms()}, report.to_text()
    assert report.ranked()[0].rule in case.cause, report.to_text()


def _four_class_subject(x: np.ndarray, y: np.ndarray, vx: np.ndarray, vy: np.ndarray):
    """tests/doctor_cases.py's small CNN (4 classes, 16×16: learnable in seconds) on the given
    training labels."""
    s = subject(SmallCNN)
    mean, std = x.reshape(-1, 3).mean(0) / 255, x.reshape(-1, 3).std(0) / 255
    s.train_x, s.train_y = _norm(x, mean, std), torch.from_numpy(y)
    s.images, s.labels_all = x, y
    s.val_x, s.val_y = _norm(vx, mean, std), torch.from_numpy(vy)
    return s


@pytest.mark.slow
def test_label_noise_found_against_clean_validation():
    """60% of the training labels replaced at random, validation labels clean: the held-out
    training labels agree with a short model far less than validation's do; with clean labels
    nothing is said."""
    x, y = smooth_images(150, seed=5)
    vx, vy = smooth_images(40, seed=6)
    rng = np.random.default_rng(3)
    noisy = y.copy()
    flip = rng.random(len(y)) < 0.6
    noisy[flip] = rng.integers(0, 4, int(flip.sum()))
    report = diagnose(_four_class_subject(x, noisy, vx, vy), steps=0)
    assert "label-noise" in {f.rule for f in report.alarms()}, report.to_text()
    clean = diagnose(_four_class_subject(x, y, vx, vy), steps=0)
    assert "label-noise" not in {f.rule for f in clean.findings}, clean.to_text()
