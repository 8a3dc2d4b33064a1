"""The doctor: why a network is not learning, with evidence.

Preflight checks (data, model, behaviour) run before training; :class:`DoctorMonitor` watches a
training run; both report :class:`Finding` objects, one per root cause. For any PyTorch model::

    from cifarlab.doctor import Subject, diagnose
    report = diagnose(Subject(model, train_x, train_y, num_classes=10, optimizer=opt,
                              val_x=val_x, val_y=val_y), steps=100)
    print(report.to_text()); raise SystemExit(report.exit_code())

For a cifarlab config, :func:`diagnose_config` does the same with cifarlab's own trainer.
"""

from __future__ import annotations

from cifarlab.doctor.diagnose import diagnose, diagnose_config, watch
from cifarlab.doctor.findings import RULES, Finding, Report, Severity
from cifarlab.doctor.monitor import DoctorMonitor
from cifarlab.doctor.preflight import preflight
from cifarlab.doctor.subject import Subject, default_step, subject_from_config

__all__ = ["RULES", "DoctorMonitor", "Finding", "Report", "Severity", "Subject", "default_step",
           "diagnose", "diagnose_config", "preflight", "subject_from_config", "watch"]
