"""Running a study: storage, workers, the objective, failures, the live table and the summary.

A study is an ordinary Optuna study in an ordinary Optuna storage (an SQLite file in the study's
folder by default, or any database URL such as PostgreSQL), so optuna-dashboard opens it. What
cifarlab needs to rebuild a trial's configuration travels inside the study as user attributes:
the search space, the fidelity and the data's hash. A worker on another machine therefore needs
only the storage URL and the study name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from cifarlab import __version__
from cifarlab.config import DataConfig, TrainConfig
from cifarlab.doctor.findings import Report
from cifarlab.doctor.monitor import DoctorMonitor
from cifarlab.errors import CifarlabError, ConfigError, StudyError
from cifarlab.files import atomic_write_text
from cifarlab.train import Callback, TrainState
from cifarlab.tune.samplers import IMPUTE_ATTR, default_startup, make_pruner, make_sampler
from cifarlab.tune.space import SearchSpace

__all__ = ["StudyRef", "TuneSettings", "best_config", "open_study", "run_study", "summarize"]

# Heartbeats and their retry callback are marked experimental in Optuna 5.0; they are what
# lets a study survive a killed worker, and Optuna is pinned, so the warning is only noise.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE_ATTR = "cifarlab:space"
DATA_ATTR = "cifarlab:data_sha256"
SETTINGS_ATTR = "cifarlab:settings"
STUDY_FILE = "study.json"
_INTERRUPTED = 130  # a worker's exit code after Ctrl-C


@dataclass
class TuneSettings:
    """Everything ``cifarlab tune`` needs besides the search space."""

    study_dir: Path
    study_name: str | None = None  # default: the folder's name
    storage: str | None = None  # default: sqlite:///<study_dir>/study.db
    n_trials: int = 20  # finished trials (complete, pruned or failed) the study aims for
    sampler: str = "gp"
    pruner: str = "median"
    n_startup: int | None = None  # random trials before the surrogate; default_startup()
    seed: int = 0
    workers: int = 1
    devices: list[str] = field(default_factory=list)
    timeout: float | None = None  # seconds, per worker
    data: DataConfig = field(default_factory=DataConfig)
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 30  # a RUNNING trial silent this long belongs to a dead worker
    quiet: bool = False

    @property
    def name(self) -> str:
        return self.study_name or self.study_dir.resolve().name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.study_dir / 'study.db').resolve()}"


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives: what ``study.json`` in its folder records."""

    storage: str
    study_name: str

    @classmethod
    def from_dir(cls, study_dir: Path, storage: str | None = None) -> StudyRef:
        meta = study_dir / STUDY_FILE
        if not meta.is_file():
            raise StudyError(f"{study_dir} is not a study folder (no {STUDY_FILE}); start one "
                             "with `cifarlab tune --study-dir DIR`.")
        try:
            raw = json.loads(meta.read_text())
            url, name = raw["storage"], raw["study_name"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise StudyError(f"{meta}: damaged ({exc}); it should hold storage and "
                             "study_name.") from None
        if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_absolute():
            url = f"sqlite:///{(study_dir / url[len('sqlite:///'):]).resolve()}"
        return cls(storage or url, name)


def _storage(url: str, settings: TuneSettings | None = None) -> optuna.storages.RDBStorage:
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        # several worker processes share the file: wait for a lock instead of failing at once
        engine_kwargs["connect_args"] = {"timeout": 120}
    else:
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {}
    if settings is not None:
        kwargs = dict(
            heartbeat_interval=settings.heartbeat_interval,
            grace_period=settings.grace_period,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=2),
        )
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except Exception as exc:  # sqlalchemy's connection and driver errors
        raise StudyError(f"Cannot open study storage {_redact(url)}: "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from None


def _redact(url: str) -> str:
    """The URL without its password, fit for files and messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True).replace("***", "")
    except Exception:
        return url


def open_study(study_dir: Path, storage: str | None = None) -> optuna.Study:
    """Load an existing study from its folder (or ``storage`` when the folder's URL needs a
    password: libpq also reads ``PGPASSWORD`` and ``~/.pgpass``)."""
    ref = StudyRef.from_dir(study_dir, storage)
    try:
        return optuna.load_study(study_name=ref.study_name, storage=_storage(ref.storage))
    except KeyError:
        raise StudyError(f"No study named {ref.study_name!r} in {_redact(ref.storage)}.") from None


def study_space(study: optuna.Study) -> SearchSpace:
    raw = study.user_attrs.get(SPACE_ATTR)
    if raw is None:
        raise StudyError(f"Study {study.study_name!r} was not made by cifarlab (it has no "
                         "search space attribute).")
    return SearchSpace.from_dict(raw, f"study {study.study_name}")


# ------------------------------------------------------------------------------- running


def run_study(settings: TuneSettings, space: SearchSpace | None,
              announce: Callable[[str], Any] | None = None) -> tuple[optuna.Study, bool]:
    """Create the study (or join the one already there) and run its workers to the end.

    ``space`` is ``None`` to use the space stored in an existing study, or the built-in space
    for a new one; a different space for an existing study is an error. Returns the
    study (see :func:`summarize`) and whether Ctrl-C stopped it.
    """
    settings.study_dir.mkdir(parents=True, exist_ok=True)
    study = _create_or_join(settings, space)
    space = study_space(study)
    if announce is not None:
        done = len(study.trials)
        announce(f"study {settings.name} ({_redact(settings.storage_url)}): "
                 + (f"resuming with {done} trial(s) stored" if done else "new"))
        for line in space.describe():
            announce("  " + line)
    if settings.devices and settings.workers < len(settings.devices):
        settings.workers = len(settings.devices)
    interrupted = _worker(settings, 0) if settings.workers == 1 else _spawn_workers(settings)
    study = optuna.load_study(study_name=settings.name, storage=_storage(settings.storage_url))
    return study, interrupted


def _create_or_join(settings: TuneSettings, space: SearchSpace | None) -> optuna.Study:
    from cifarlab.tune.space import default_space

    # load_if_exists: two machines starting the same command at once end up in one study
    study = optuna.create_study(study_name=settings.name, storage=_storage(settings.storage_url),
                                direction="minimize", load_if_exists=True)
    stored = study.user_attrs.get(SPACE_ATTR)
    if stored is None:
        study.set_user_attr(SPACE_ATTR, (space or default_space()).to_dict())
        study.set_user_attr(SETTINGS_ATTR, {
            "sampler": settings.sampler, "pruner": settings.pruner, "seed": settings.seed,
            "cifarlab": __version__, "optuna": optuna.__version__})
    elif space is not None and stored != space.to_dict():
        raise StudyError(
            f"Study {settings.name!r} already exists with a different search space or "
            "fidelity. Resume it without --space/--model/--epochs/--train-fraction, or choose "
            "another --name.")
    ref = {"storage": _redact(settings.storage_url), "study_name": settings.name}
    if settings.storage is None:
        ref["storage"] = "sqlite:///study.db"  # relative to the folder: the folder can move
    atomic_write_text(settings.study_dir / STUDY_FILE, json.dumps(ref, indent=2) + "\n")
    return study


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


class _StopFlag:
    """First Ctrl-C: finish by marking the running trial. Second: stop at once."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nstopping after the running trial is marked (Ctrl-C again to quit now)",
                  file=sys.stderr, flush=True)

        try:
            previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: no signal handling
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)


def _worker(settings: TuneSettings, index: int) -> bool:
    """Run trials until the budget is used; True if Ctrl-C stopped it."""
    from cifarlab.data import load_data

    # A failed trial is reported by the live table with its reason; Optuna would add a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    storage = _storage(settings.storage_url, settings)
    study0 = optuna.load_study(study_name=settings.name, storage=storage)
    space = study_space(study0)
    base = space.base_config()
    base.data = DataConfig(**{**asdict(settings.data),
                              "train_fraction": space.fidelity.train_fraction})
    base.validate()
    if base.data.val_size <= 0:
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
        sampler=make_sampler(settings.sampler, seed, n_startup),
        pruner=make_pruner(settings.pruner, math.ceil(space.fidelity.epochs)),
    )
    stop = _StopFlag()
    table = LiveTable(prefix=f"w{index} " if settings.workers > 1 else "",
                      quiet=settings.quiet)
    objective = Objective(space, base, data, stop, train_seed=settings.seed)
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    table.header()
    with stop.installed():
        while not stop.requested:
            if deadline is not None and time.monotonic() > deadline:
                break
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial -> retried
            used, waiting = budget_used(study)
            if used >= settings.n_trials and not waiting:
                if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                    break
                # Another worker's trial is still running; if that worker is dead, its trial
                # goes stale after the grace period and is retried here, so wait and look again.
                time.sleep(min(settings.heartbeat_interval, 5))
                continue
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[table],
                           gc_after_trial=False)
    return stop.requested


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


# ----------------------------------------------------------------------------- objective


class TrialFailed(Exception):
    """The trial's training went wrong in a way its parameters explain (NaN loss, OOM)."""


class TrialInterrupted(Exception):
    """Ctrl-C during the trial."""


class Objective:
    """Train with the trial's parameters; return the validation loss (never the test loss).

    Validation loss is reported after every epoch so a pruner can stop the trial; a non-finite
    training loss ends the trial at once, as a failure with its reason stored in the study.
    """

    def __init__(self, space: SearchSpace, base: TrainConfig, data: Any, stop: _StopFlag,
                 train_seed: int = 0, check_every: int = 10):
        self.space, self.base, self.data, self.stop = space, base, data, stop
        self.train_seed, self.check_every = train_seed, check_every

    def __call__(self, trial: optuna.Trial) -> float:
        from cifarlab.train import train

        values = self.space.suggest(trial)
        try:
            config = self.base.with_values(values)
            config.seed = self.train_seed  # same seed for every trial: compare like with like
            config.validate()
        except ConfigError as exc:
            return self._fail(trial, "config", str(exc), impute=True)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        watch = _TrialWatch(trial, self.stop, self.check_every)
        monitor = DoctorMonitor(num_classes=len(self.data.classes))
        try:
            result = train(config, [watch, monitor], data=self.data, evaluate_test=False,
                           progress=False)
        except Exception as exc:
            oom = "out of memory" in str(exc).lower() or type(exc).__name__ == "OutOfMemoryError"
            _free_device_memory()
            kind = "oom" if oom else "exception"
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            _record_doctor(trial, monitor.report, failed=True)
            return self._fail(trial, kind, reason, impute=True)
        trial.set_user_attr("epochs", len(result.history))
        trial.set_user_attr("train_seconds", round(result.train_seconds, 2))
        finding = _record_doctor(trial, monitor.report, failed=watch.failure is not None or (
            result.stopped_early or "").startswith("doctor:"))
        if watch.failure is not None:
            return self._fail(trial, "nonfinite", _with_finding(watch.failure, finding),
                              impute=True)
        if (result.stopped_early or "").startswith("doctor:"):
            nonfinite = any(f.rule in ("nonfinite-loss", "input-nonfinite")
                            for f in monitor.report.findings)
            return self._fail(trial, "nonfinite" if nonfinite else "diverged",
                              str(result.stopped_early), impute=True)
        if watch.interrupted:
            return self._fail(trial, "interrupted", "interrupted by Ctrl-C", impute=False)
        if watch.pruned:
            raise optuna.TrialPruned(f"pruned after epoch {watch.pruned_at}")
        val_loss, val_acc = result.val_loss, result.val_acc
        if val_loss is None:  # _worker checks val_size > 0, so this is a bug
            raise RuntimeError("training returned no validation loss")
        if not math.isfinite(val_loss):
            return self._fail(trial, "nonfinite", f"validation loss is {val_loss}", impute=True)
        trial.set_user_attr("val_acc", val_acc)
        return float(val_loss)

    @staticmethod
    def _fail(trial: optuna.Trial, kind: str, reason: str, impute: bool) -> NoReturn:
        trial.set_user_attr("fail_kind", kind)
        trial.set_user_attr("fail_reason", reason)
        if impute:
            trial.set_user_attr(IMPUTE_ATTR, True)
        if kind == "interrupted":
            raise TrialInterrupted(reason)
        raise TrialFailed(reason)


def _record_doctor(trial: optuna.Trial, report: Report, failed: bool) -> str | None:
    """Store the doctor's findings on the trial (user attr ``doctor``); returns the message of
    the worst one. A failed trial always gets the attribute, empty when the monitors saw no
    symptom before the failure."""
    report.consolidate()
    alarms = sorted(report.alarms(), key=lambda f: -f.severity)
    if alarms or failed:
        trial.set_user_attr("doctor", [{"rule": f.rule, "severity": str(f.severity),
                                        "message": f.message} for f in alarms])
    return alarms[0].message if alarms else None


def _with_finding(reason: str, finding: str | None) -> str:
    return f"{reason}; doctor: {finding}" if finding else reason


def _free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _TrialWatch(Callback):
    """Trainer callback: reports per-epoch validation loss, prunes, and stops on NaN/Inf."""

    def __init__(self, trial: optuna.Trial, stop: _StopFlag, check_every: int):
        self.trial, self.stop, self.check_every = trial, stop, check_every
        self.failure: str | None = None
        self.pruned = False
        self.pruned_at = 0
        self.interrupted = False

    def on_step_end(self, state: TrainState, loss: torch.Tensor, inputs: torch.Tensor,
                    labels: torch.Tensor) -> None:
        # A NaN never heals, so checking every k steps loses at most k steps and avoids a
        # device sync per step on a GPU.
        if state.step % self.check_every == 0 or state.step == state.total_steps:
            value = float(loss)
            if not math.isfinite(value):
                self.failure = f"training loss became {value} at step {state.step}"
                state.should_stop, state.stop_reason = True, self.failure
        if self.stop.requested and not state.should_stop:
            self.interrupted = True
            state.should_stop, state.stop_reason = True, "interrupted"

    def on_epoch_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.failure or self.interrupted:
            return
        val_loss = metrics.get("val_loss")
        if val_loss is None:
            return
        if not math.isfinite(val_loss):
            self.failure = f"validation loss became {val_loss} after epoch {metrics['epoch']}"
            state.should_stop, state.stop_reason = True, self.failure
            return
        self.trial.report(val_loss, metrics["epoch"])
        if state.step < state.total_steps and self.trial.should_prune():
            self.pruned, self.pruned_at = True, metrics["epoch"]
            state.should_stop, state.stop_reason = True, "pruned"


# ------------------------------------------------------------------------------- output


class LiveTable:
    """One fixed-width row per finished trial, printed by the worker that ran it."""

    def __init__(self, prefix: str = "", quiet: bool = False,
                 write: Callable[[str], None] | None = None):
        self.prefix, self.quiet = prefix, quiet
        self.write = write or (lambda s: print(s, flush=True))

    def header(self) -> None:
        if not self.quiet:
            self.write(f"{self.prefix}{'trial':>5} {'state':<9} {'val_loss':>9} {'val_acc':>8} "
                       f"{'epochs':>6} {'seconds':>8} {'best':>9}  params")

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.quiet:
            return
        value = "" if trial.value is None else f"{trial.value:.4f}"
        if trial.state == TrialState.PRUNED and trial.intermediate_values:
            value = f"({trial.intermediate_values[max(trial.intermediate_values)]:.4f})"
        acc = trial.user_attrs.get("val_acc")
        try:
            best = f"{study.best_value:.4f}"
        except ValueError:
            best = "-"
        seconds = (trial.duration.total_seconds() if trial.duration else 0.0)
        params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
        line = (f"{self.prefix}{trial.number:>5} {trial.state.name.lower():<9} {value:>9} "
                f"{'' if acc is None else f'{acc:.4f}':>8} "
                f"{trial.user_attrs.get('epochs', ''):>6} {seconds:>8.1f} {best:>9}  {params}")
        if trial.state == TrialState.FAIL:
            line += f"  [{trial.user_attrs.get('fail_reason', 'failed')}]"
        self.write(line)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@dataclass
class Summary:
    study_name: str
    n_complete: int
    n_pruned: int
    n_failed: int
    n_running: int
    best_number: int | None
    best_value: float | None
    best_val_acc: float | None
    best_params: dict[str, Any]
    fail_reasons: dict[str, int]

    def lines(self) -> list[str]:
        out = [f"study {self.study_name}: {self.n_complete} complete, {self.n_pruned} pruned, "
               f"{self.n_failed} failed" + (f", {self.n_running} running"
                                            if self.n_running else "")]
        if self.best_number is None:
            out.append("no trial completed")
        else:
            acc = "" if self.best_val_acc is None else f", val_acc {self.best_val_acc:.4f}"
            out.append(f"best trial {self.best_number}: val_loss {self.best_value:.4f}{acc}")
            out += [f"  {k} = {_fmt(v)}" for k, v in self.best_params.items()]
        for reason, n in sorted(self.fail_reasons.items(), key=lambda kv: -kv[1]):
            out.append(f"failed x{n}: {reason}")
        return out


def summarize(study: optuna.Study) -> Summary:
    trials = study.get_trials(deepcopy=False)
    by_state = {s: [t for t in trials if t.state == s] for s in TrialState}
    reasons: dict[str, int] = {}
    for t in by_state[TrialState.FAIL]:
        r = str(t.user_attrs.get("fail_reason", "worker stopped (no heartbeat) or crashed"))
        reasons[r] = reasons.get(r, 0) + 1
    best = _best_trial(study)
    return Summary(
        study_name=study.study_name,
        n_complete=len(by_state[TrialState.COMPLETE]), n_pruned=len(by_state[TrialState.PRUNED]),
        n_failed=len(by_state[TrialState.FAIL]), n_running=len(by_state[TrialState.RUNNING]),
        best_number=None if best is None else best.number,
        best_value=None if best is None else best.value,
        best_val_acc=None if best is None else best.user_attrs.get("val_acc"),
        best_params={} if best is None else dict(best.params), fail_reasons=reasons)


def _best_trial(study: optuna.Study) -> FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


def best_config(study_dir: Path, storage: str | None = None) -> tuple[TrainConfig, FrozenTrial]:
    """The best trial's full config, for retraining (``cifarlab train --from-study``)."""
    study = open_study(study_dir, storage)
    best = _best_trial(study)
    if best is None:
        raise StudyError(f"Study {study.study_name!r} has no completed trial yet.")
    return study_space(study).config_for(best.params), best
