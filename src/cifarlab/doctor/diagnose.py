"""Running the doctor: preflight, then a monitored run, on any model or on a cifarlab config."""

from __future__ import annotations

import torch

from cifarlab.callbacks import TrainState
from cifarlab.config import TrainConfig
from cifarlab.data import SplitData
from cifarlab.doctor.findings import Report, Severity
from cifarlab.doctor.monitor import DoctorMonitor
from cifarlab.doctor.preflight import preflight
from cifarlab.doctor.subject import Subject, subject_from_config
from cifarlab.trainer import train

__all__ = ["diagnose", "diagnose_config", "watch"]


def watch(subject: Subject, steps: int = 100, every: int = 10, batch_size: int = 64,
          seed: int = 0) -> Report:
    """Train a copy of the subject's model for ``steps`` steps of its own ``step_fn`` under a
    :class:`DoctorMonitor`; returns the monitor's report."""
    model = subject.fresh_model()
    opt = subject.optimizer_for(model)
    # every watched step is the start of training: a schedule that collapses here is a bug
    monitor = DoctorMonitor(every=every, num_classes=subject.num_classes,
                            intentionally_frozen=subject.intentionally_frozen, lr_window=steps)
    state = TrainState(TrainConfig(), model, opt, torch.device("cpu"), "fp32", steps,
                       max(1, len(subject.train_x) // batch_size))
    monitor.on_train_start(state)
    gen = torch.Generator().manual_seed(seed)
    x, y = subject.train_x, subject.train_y
    ok = (y >= 0) & (y < subject.num_classes)
    x, y = x[ok], y[ok]
    users = subject.optimizer
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        xb, yb = x[idx], y[idx]
        before = [g["lr"] for g in users.param_groups] if users is not None else []
        loss = subject.step_fn(model, opt, subject.loss_fn, xb, yb)
        if users is not None:
            _mirror_schedule(users, before, opt)
        state.step += 1
        monitor.on_step_end(state, _per_sample(subject, loss, len(yb)), xb, yb)
        if state.should_stop:
            break
    report = monitor.finish(state)
    report.context["watch"] = {"steps": state.step, "stopped": None if state.stop_reason is None
                               else str(state.stop_reason)}
    return report


def _mirror_schedule(users: torch.optim.Optimizer, before: list[float],
                     opt: torch.optim.Optimizer) -> None:
    """A step function that steps a scheduler bound to the user's own optimizer changes that
    optimizer's lr, not the copy's the doctor trains: carry the same factor over, so the
    watched run follows the user's schedule."""
    for g_user, lr0, g in zip(users.param_groups, before, opt.param_groups, strict=False):
        lr1 = g_user["lr"]
        if lr1 != lr0 and lr0 > 0:
            g["lr"] = g["lr"] * (lr1 / lr0)
        elif lr1 != lr0:  # from 0: take the user's value
            g["lr"] = lr1


def _per_sample(subject: Subject, loss: torch.Tensor, n: int) -> torch.Tensor:
    reduction = getattr(subject.loss_fn, "reduction", "mean")
    return loss.detach() / n if reduction == "sum" else loss.detach()


def diagnose(subject: Subject, steps: int = 100, behaviour: bool = True,
             seed: int = 0) -> Report:
    """Preflight checks, then a monitored run of ``steps`` training steps."""
    report = preflight(subject, behaviour=behaviour, seed=seed)
    if steps > 0:
        report.extend(watch(subject, steps=steps, seed=seed))
        _slow_not_broken(report)
    return report.consolidate()


def _slow_not_broken(report: Report) -> None:
    """A model that memorized one batch, only slowly, trains correctly at a small learning
    rate (the PyTorch tutorial's lr 0.001): a short watched run that has not left the
    starting loss, or updates below the usual ratio, are then what slow training looks like,
    not a fault. They become notes that say so; too large updates stay alarms."""
    slow = report.context.get("overfit_slow")
    if not slow:
        return
    for f in report.findings:
        if f.severity < Severity.WARNING or f.rule not in ("plateau", "update-ratio"):
            continue
        value = f.evidence.get("value")
        if f.rule == "update-ratio" and not (isinstance(value, float) and value < 1e-4):
            continue
        f.evidence["was"] = str(f.severity)
        f.severity = Severity.INFO
        f.message += (f" (a slow learner, not a fault: one batch was memorized in {slow} "
                      "steps; a larger learning rate trains faster)")


def diagnose_config(config: TrainConfig, data: SplitData, epochs: float | None = 1.0,
                    behaviour: bool = True) -> Report:
    """Preflight on ``config``'s model fed as cifarlab's trainer feeds it, then (unless
    ``epochs`` is 0 or None) a monitored training run of ``epochs`` with the real trainer."""
    subject = subject_from_config(config, data)
    report = preflight(subject, behaviour=behaviour, seed=config.seed)
    if epochs:
        cfg = config.with_values({"optim.epochs": float(epochs)})
        monitor = DoctorMonitor(num_classes=len(data.classes))
        result = train(cfg, [monitor], data=data, progress=False, evaluate_test=False)
        report.extend(monitor.report)
        report.context["training"] = {"epochs": epochs, "val_acc": result.val_acc,
                                      "val_loss": result.val_loss,
                                      "stopped": None if result.stopped_early is None
                                      else str(result.stopped_early),
                                      "history": result.history}
    return report.consolidate()
