"""Running a study: create or join it, run its workers (processes on this machine, or
machines sharing one storage), survive dead workers and Ctrl-C, and stop at the trial budget."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

import optuna
import torch
from optuna.trial import TrialState

from cifarlab import __version__
from cifarlab.config import DataConfig, TrainConfig
from cifarlab.data import load_data
from cifarlab.errors import CifarlabError, ConfigError, StudyError
from cifarlab.files import atomic_write_text
from cifarlab.tune.interrupt import StopFlag
from cifarlab.tune.metric import DEFAULT_METRIC, METRIC_ATTR, get_metric, study_metric
from cifarlab.tune.mfstudy import FreezeThawObjective, FreezeThawRunner, record_candidates
from cifarlab.tune.objective import Objective, TargetObjective
from cifarlab.tune.samplers import FREEZE_THAW, default_startup, make_pruner, make_sampler
from cifarlab.tune.space import SearchSpace, default_space
from cifarlab.tune.storage import (
    DATA_ATTR,
    SETTINGS_ATTR,
    SPACE_ATTR,
    STUDY_FILE,
    TuneSettings,
    connect,
    redact,
    study_space,
)
from cifarlab.tune.summary import LiveTable
from cifarlab.tune.target import (
    BASE_ATTR,
    TARGET_ATTR,
    Target,
    enqueue_baseline,
    enqueue_candidates,
    open_target,
    study_base,
    study_target,
    target_name,
    target_pending,
)

__all__ = ["budget_used", "run_study"]

_INTERRUPTED = 130  # a worker's exit code after Ctrl-C


def run_study(settings: TuneSettings, space: SearchSpace | None,
              announce: Callable[[str], Any] | None = None) -> tuple[optuna.Study, bool]:
    """Create the study (or join the one already there) and run its workers to the end.

    ``space`` is ``None`` to use the space stored in an existing study, or the built-in space
    for a new one; a different space for an existing study is an error. Returns the
    study (see :func:`summarize`) and whether Ctrl-C stopped it.
    """
    settings.study_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_optuna():
        study = _create_or_join(settings, space)
    space = study_space(study)
    if announce is not None:
        done = len(study.trials)
        announce(f"study {settings.name} ({redact(settings.storage_url)}): "
                 + (f"resuming with {done} trial(s) stored" if done else "new"))
        for line in space.describe():
            announce("  " + line)
    if settings.devices and settings.workers < len(settings.devices):
        settings.workers = len(settings.devices)
    interrupted = _worker(settings, 0) if settings.workers == 1 else _spawn_workers(settings)
    study = optuna.load_study(study_name=settings.name, storage=connect(settings.storage_url))
    return study, interrupted


def _create_or_join(settings: TuneSettings, space: SearchSpace | None) -> optuna.Study:
    # load_if_exists: two machines starting the same command at once end up in one study
    study = optuna.create_study(study_name=settings.name, storage=connect(settings.storage_url),
                                direction="minimize", load_if_exists=True)
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        space = space or default_space()
        if settings.base is not None:
            base = TrainConfig.from_dict(settings.base)
            if base.model != space.fidelity.model:
                raise ConfigError(f"--config trains {base.model!r} but the search space's "
                                  f"fidelity.model is {space.fidelity.model!r}; make them the "
                                  "same (--model sets the space's).")
            study.set_user_attr(BASE_ATTR, base.to_dict())
        study.set_user_attr(SPACE_ATTR, space.to_dict())
        study.set_user_attr(METRIC_ATTR, get_metric(settings.metric or DEFAULT_METRIC).name)
        study.set_user_attr(SETTINGS_ATTR, {
            "sampler": settings.sampler, "noisy": settings.noisy, "pruner": settings.pruner,
            "seed": settings.seed,
            "cifarlab": __version__, "optuna": optuna.__version__})
    elif space is not None and stored != space.to_dict():
        raise StudyError(
            f"Study {settings.name!r} already exists with a different search space or "
            "fidelity. Resume it without --space/--model/--epochs/--train-fraction, or choose "
            "another --name.")
    elif settings.base is not None and study.user_attrs.get(BASE_ATTR) != TrainConfig.from_dict(
            settings.base).to_dict():
        raise StudyError(f"Study {settings.name!r} already exists with another starting "
                         "config; resume it without --config, or choose another --name.")
    elif settings.sampler == FREEZE_THAW and study_sampler(study) != FREEZE_THAW:
        raise StudyError(f"Study {settings.name!r} was made with --sampler "
                         f"{study_sampler(study)}; a freeze-thaw study trains at the target "
                         "budget in moves from the start. Choose another --name.")
    elif settings.metric is not None and get_metric(settings.metric) != study_metric(study):
        raise StudyError(f"Study {settings.name!r} minimises {study_metric(study).name}; resume "
                         f"it without --metric (or with --metric {study_metric(study).name}), "
                         "or choose another --name.")
    _set_target(study, settings)
    target_study = open_target(study)  # created here, once, before any worker looks for it
    if settings.target_trials:
        enqueue_baseline(study, target_study)  # the study's first trial: what it must beat
    ref = {"storage": redact(settings.storage_url), "study_name": settings.name}
    if settings.storage is None:
        ref["storage"] = "sqlite:///study.db"  # relative to the folder: the folder can move
    atomic_write_text(settings.study_dir / STUDY_FILE, json.dumps(ref, indent=2) + "\n")
    return study


def _set_target(study: optuna.Study, settings: TuneSettings) -> None:
    """Store the target budget on a new study (or on one made before targets existed); a
    different --target-epochs or --top-k for an existing study is an error."""
    stored = study_target(study)
    epochs = settings.target_epochs
    if stored is None:
        if epochs is None:
            epochs = study_base(study).optim.epochs
        study.set_user_attr(TARGET_ATTR, Target(float(epochs), settings.top_k).check().to_dict())
    elif (epochs is not None and float(epochs) != stored.epochs) or (
            settings.top_k != stored.top_k and settings.top_k != TuneSettings.top_k):
        raise StudyError(f"Study {settings.name!r} answers for {stored.epochs:g} epochs with "
                         f"the top {stored.top_k}; resume it without --target-epochs/--top-k, "
                         "or choose another --name.")


def _spawn_workers(settings: TuneSettings) -> bool:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_worker_entry, args=(settings, i), name=f"cifarlab-worker-{i}")
             for i in range(settings.workers)]
    for p in procs:
        p.start()
    # Ctrl-C reaches every worker through the terminal's process group; each one stops after
    # marking its running trial. The parent only waits for them.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        for p in procs:
            p.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    bad = [p for p in procs if p.exitcode not in (0, None, _INTERRUPTED)]
    if bad:
        codes = ", ".join(f"{p.name}: {p.exitcode}" for p in bad)
        raise StudyError(f"Worker process(es) ended with an error ({codes}); the study keeps "
                         "every finished trial; run the same command again to resume.")
    return any(p.exitcode == _INTERRUPTED for p in procs)


def _worker_entry(settings: TuneSettings, index: int) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if _worker(settings, index):
            sys.exit(_INTERRUPTED)
    except CifarlabError as exc:
        print(f"worker {index}: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(exc.exit_code)


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    """For the duration of a worker: no Optuna log line per trial (a failed trial is reported
    by the live table with its reason; Optuna would add a traceback), and no warning that
    heartbeats and their retry callback are experimental in Optuna 5.0 (they are what lets a
    study survive a killed worker, and Optuna is pinned). Both are restored afterwards."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def _worker(settings: TuneSettings, index: int) -> bool:
    """Run trials until the budget is used; True if Ctrl-C stopped it."""
    with _quiet_optuna():
        return _run_trials(settings, index)


def _run_trials(settings: TuneSettings, index: int) -> bool:
    storage = connect(settings.storage_url, settings)
    study0 = optuna.load_study(study_name=settings.name, storage=storage)
    space = study_space(study0)
    base = space.base_config(study_base(study0))
    base.data = DataConfig(**{**asdict(settings.data),
                              "train_fraction": space.fidelity.train_fraction})
    base.validate()
    target = study_target(study0)
    assert target is not None  # _create_or_join stored it
    if base.data.val_size is not None and base.data.val_size <= 0:
        raise ConfigError("A study minimizes validation loss, so it needs a validation split; "
                          "set --val-size above 0.")
    device = settings.devices[index % len(settings.devices)] if settings.devices else "auto"
    base.device = device
    if device in ("auto", "cpu") and settings.workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // settings.workers))
    data = load_data(base.data)
    _check_same_data(study0, data.data_sha256)

    seed = settings.seed if index == 0 else settings.seed + 1000 * index
    n_startup = (settings.n_startup if settings.n_startup is not None
                 else default_startup(settings.n_trials))
    study = optuna.load_study(
        study_name=settings.name,
        storage=storage,
        sampler=make_sampler(settings.sampler, seed, n_startup, noisy=settings.noisy),
        pruner=make_pruner("none" if study_sampler(study0) == FREEZE_THAW else settings.pruner,
                           math.ceil(space.fidelity.epochs)),
    )
    target_study = optuna.load_study(study_name=target_name(settings.name), storage=storage,
                                     pruner=optuna.pruners.NopPruner())
    stop = StopFlag()
    prefix = f"w{index} " if settings.workers > 1 else ""
    column = study_metric(study0).column
    table = LiveTable(prefix=prefix, quiet=settings.quiet, column=column)
    target_table = LiveTable(prefix=prefix, quiet=settings.quiet, target=target, column=column)
    board = settings.study_dir / "tensorboard" if settings.tensorboard else None
    objective = Objective(space, base, data, stop, train_seed=settings.seed, tensorboard=board,
                          metric=study_metric(study0))
    target_objective: TargetObjective | None = None
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    full_data: list[Any] = []

    def full() -> Any:  # the whole training split: the target budget's data
        if not full_data:
            full_data.append(data if space.fidelity.train_fraction == 1.0 else load_data(
                DataConfig(**{**asdict(base.data), "train_fraction": 1.0})))
        return full_data[0]

    runner: FreezeThawRunner | None = None
    if study_sampler(study0) == FREEZE_THAW:
        runner = FreezeThawRunner(
            study, FreezeThawObjective(study, full(), stop, settings.study_dir / "checkpoints",
                                       settings.seed, device, tensorboard=board),
            seed, n_startup, index,
            own_trials_only=settings.workers > 1 and settings.storage_url.startswith("sqlite"))
    table.header()
    # SQLite's check-and-set of a queued trial is not atomic across processes (PostgreSQL's is:
    # SELECT ... FOR UPDATE), so two workers on one SQLite file could both pop the baseline.
    # There, worker 0 alone runs the target trials, while the others search.
    runs_targets = settings.target_trials and (
        index == 0 or not settings.storage_url.startswith("sqlite"))
    with stop.installed():
        while not stop.requested:
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> retried
            if runs_targets:
                optuna.storages.fail_stale_trials(target_study)
                target_waiting, target_running = target_pending(target_study)
            else:
                target_waiting = target_running = False
            if target_waiting:
                if target_objective is None:
                    target_objective = TargetObjective(study, full(), stop, settings.seed,
                                                       device, tensorboard=board)
                target_study.optimize(target_objective, n_trials=1, catch=(Exception,),
                                      callbacks=[target_table], gc_after_trial=False)
                continue
            if runner is not None:
                # --n-trials counts target budgets trained; a move must end before --timeout
                if runner.compute_used() < settings.n_trials and runner.step(deadline, table):
                    continue
            else:
                used, waiting = budget_used(study)
                if (used < settings.n_trials or waiting) and not _out_of_time(
                        deadline, target_study, target.top_k if settings.target_trials else 0):
                    study.optimize(objective, n_trials=1, catch=(Exception,),
                                   callbacks=[table], gc_after_trial=False)
                    continue
            if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                # Another worker's trial is still running; if that worker is dead, its trial
                # goes stale after the grace period and is retried here, so wait and look again.
                time.sleep(min(settings.heartbeat_interval, 5))
                continue
            if runs_targets and (
                    record_candidates(study, target_study, target.top_k) if runner is not None
                    else enqueue_candidates(study, target_study, target.top_k,
                                            settings.noisy)):
                continue  # the search is done: its winners go to the target budget
            if not target_running:
                break
            time.sleep(min(settings.heartbeat_interval, 5))
    return stop.requested


def _out_of_time(deadline: float | None, target_study: optuna.Study, top_k: int) -> bool:
    """Whether the search must stop starting trials: past the deadline less the time the top-k
    target trials will take (each as long as the baseline took), so that the answer is checked
    at the target budget within ``--timeout``. Queued target trials still run after it."""
    if deadline is None:
        return False
    took = [t.duration.total_seconds() for t in target_study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE,))
        if t.user_attrs.get("role") == "baseline" and t.duration is not None]
    return time.monotonic() > deadline - top_k * (max(took) if took else 0.0)


def study_sampler(study: optuna.Study) -> str:
    """The sampler the study was created with (its settings attribute)."""
    return str(study.user_attrs.get(SETTINGS_ATTR, {}).get("sampler", "gp"))


def _check_same_data(study: optuna.Study, sha: str | None) -> None:
    stored = study.user_attrs.get(DATA_ATTR)
    if stored is None:
        study.set_user_attr(DATA_ATTR, sha)
    elif sha is not None and stored != sha:
        raise StudyError(f"This worker's data (sha256 {sha[:12]}…) differs from the study's "
                         f"({str(stored)[:12]}…); point --data or CIFARLAB_DATA at the same "
                         "dataset the study started with.")


def budget_used(study: optuna.Study) -> tuple[int, bool]:
    """(trials that count against ``n_trials``, whether retries are waiting).

    A trial lost to a dead worker is retried as a new WAITING trial and does not count twice;
    a trial stopped by Ctrl-C does not count either.
    """
    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials}
    waiting = any(t.state == TrialState.WAITING for t in trials)
    used = sum(
        1 for t in trials
        if t.state != TrialState.WAITING and t.number not in retried
        and t.user_attrs.get("fail_kind") != "interrupted"
    )
    return used, waiting
