"""The doctor: the seeded-bug suite (each bug caught by the right check, healthy runs clean),
the runtime monitor inside cifarlab's trainer, and the report formats."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cifarlab.callbacks import Callback
from cifarlab.config import TrainConfig
from cifarlab.data import load_data
from cifarlab.doctor import DoctorMonitor, Report, Severity, diagnose, preflight, watch
from cifarlab.doctor.checks_data import near_duplicates
from cifarlab.doctor.findings import RULES, TIERS
from cifarlab.trainer import train
from doctor_cases import N_CLASSES, Case, SmallCNN, cases, smooth_images, subject

CASES = cases()


def test_suite_has_enough_bugs_and_healthy_runs():
    bugs = [c for c in CASES if c.expect]
    assert len(bugs) >= 15 and len(CASES) - len(bugs) >= 5
    assert all(rule in RULES for c in bugs for rule in c.expect)
    assert set(TIERS) == set(RULES)  # every rule has a place in the root-cause order


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_seeded_case(case: Case):
    report = diagnose(case.build(), steps=case.steps)
    alarms = {f.rule for f in report.alarms()}
    if case.expect:
        assert alarms & case.expect, (case.name, report.to_text())
        assert alarms <= case.expect, ("alarm outside the bug's checks", report.to_text())
        # the first finding a user reads names the cause (or a rule counted as catching it)
        assert report.ranked()[0].rule in case.expect, report.to_text()
        assert report.exit_code() == (1 if report.worst >= Severity.ERROR else 0)
    else:
        assert not alarms, report.to_text()
        assert report.exit_code() == 0


def test_findings_carry_evidence_cause_fix_and_source():
    report = diagnose(CASES[[c.name for c in CASES].index("softmax-before-ce")].build(), steps=0)
    f = next(f for f in report.findings if f.rule == "softmax-before-ce")
    d = f.to_dict()
    assert d["severity"] == "error" and d["cause"] and d["fix"] and "Ivanov" in d["source"]
    assert "sums to 1" in d["message"]
    text = report.to_text()
    assert "softmax-before-ce" in text and "fix:" in text
    assert json.loads(report.to_json())["findings"][0]["rule"] == "softmax-before-ce"


def test_one_finding_per_root_cause():
    r = Report()
    r.add("cannot-overfit", Severity.ERROR, "symptom")
    r.add("input-unnormalized", Severity.ERROR, "root")
    r.add("input-unnormalized", Severity.WARNING, "weaker repeat")
    r.consolidate()
    assert [f.rule for f in r.alarms()] == ["input-unnormalized"]
    demoted = next(f for f in r.findings if f.rule == "cannot-overfit")
    assert demoted.severity == Severity.INFO and demoted.evidence["consequence_of"] == [
        "input-unnormalized"]


def test_nan_names_the_first_module_and_stops():
    """A module that makes NaN: the monitor replays the batch and names it; training stops."""

    class Broken(SmallCNN):
        def forward(self, x):
            h = torch.relu(self.bn1(self.conv1(x)))
            h = torch.log(h - 1e9)  # NaN, always
            return self.fc(h.mean((2, 3)).repeat(1, 2))

    s = subject(Broken)
    report = watch(s, steps=30, every=5)
    f = next(f for f in report.findings if f.rule == "nonfinite-loss")
    assert f.severity == Severity.CRITICAL
    assert report.context["watch"]["steps"] == 1 and "doctor" in report.context["watch"]["stopped"]


def test_monitor_in_cifarlab_trainer(learnable):
    """A monitor passed to train(): a healthy run gets no alarm, a diverging one stops early
    with the finding as its reason and in the result."""
    cfg = TrainConfig(model="airnet", width=0.25, precision="fp32", tta=0,  # the default recipe
                      device="cpu")  # (on an accelerator, NaN is found at the next sample)
    cfg.data.source = str(learnable)
    cfg.data.val_size = 40
    cfg.optim.epochs = 6
    cfg.optim.batch_size = 64
    data = load_data(cfg.data)
    ok = train(cfg, [DoctorMonitor(num_classes=4)], data=data, progress=False)
    findings = ok.extras["doctor"]
    assert not [f for f in findings if f["severity"] in ("warning", "error", "critical")], \
        findings

    class Corrupt(Callback):  # an Inf lands in one weight at step 3, as an overflow would
        def on_step_end(self, state, loss, inputs, labels):
            if state.step == 3:
                with torch.no_grad():
                    state.model.block2.conv1.weight[0, 0, 0, 0] = float("inf")

    bad = train(cfg, [Corrupt(), DoctorMonitor(num_classes=4)], data=data, progress=False)
    assert bad.stopped_early and bad.stopped_early.by == "doctor"
    assert bad.stopped_early.kind == "nonfinite"
    f = next(f for f in bad.extras["doctor"] if f["rule"] == "nonfinite-loss")
    assert f["evidence"]["module"] == "block2.conv1" and f["evidence"]["step"] == 4, f
    assert len(bad.history) == 1  # stopped in the first epoch


def test_monitor_overhead_is_sampled():
    """Between samples the hooks do nothing: activations are captured only when armed."""
    m = DoctorMonitor(every=10)
    assert not m._armed
    s = subject()
    report = watch(s, steps=25, every=10)
    steps = report.series["monitor"]["step"]
    assert steps == [10, 20]  # 2 samples in 25 steps


def test_preflight_on_any_module_without_validation():
    s = subject()
    s.val_x = s.val_y = None  # the label checks need validation data; the rest runs
    r = preflight(s)
    assert "no-label-signal" not in {f.rule for f in r.findings}
    assert "cannot-overfit" in r.checks_run and r.exit_code() == 0
    assert math.isclose(r.context["initial_loss"]["ln_c"], math.log(N_CLASSES))


def test_near_duplicates_found_mirrored_and_brightened():
    train_x, _ = smooth_images(20, seed=3)
    test, _ = smooth_images(5, seed=4)
    test[0] = train_x[7, :, ::-1]  # mirrored copy
    test[1] = np.clip(train_x[11].astype(int) + 30, 0, 255).astype(np.uint8)  # brighter copy
    pairs = {(j, i): m for j, i, _, m in near_duplicates(train_x, test)}
    assert pairs.get((0, 7)) is True and pairs.get((1, 11)) is False
    assert len(pairs) == 2


def test_output_kind_and_range_test_blow_up_for_losses_of_any_sign():
    from cifarlab.doctor.behaviour import _blown_up
    from cifarlab.doctor.checks_model import output_kind

    logits = torch.randn(8, 5) * 3
    assert output_kind(logits) == "scores"
    assert output_kind(logits.softmax(1)) == "probabilities"
    assert output_kind(logits.log_softmax(1)) == "log-probabilities"
    assert output_kind(torch.randn(8)) is None
    # a positive loss: 4x its minimum is a blow-up (Smith's rule)
    assert _blown_up(2.1, 0.5, 2.3) and not _blown_up(1.9, 0.5, 2.3)
    # a loss that went negative: judged by the distance fallen from the start, not by sign
    assert not _blown_up(-4.0, -5.0, 0.0)  # near its minimum: 4x "minimum" would say blown
    assert _blown_up(12.0, -5.0, 0.0)
