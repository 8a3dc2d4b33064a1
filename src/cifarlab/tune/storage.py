"""Where a study lives: an ordinary Optuna storage (an SQLite file in the study's folder by
default, or any database URL such as PostgreSQL), found again through ``study.json`` in the
study's folder. What cifarlab needs to rebuild a trial's configuration travels inside the study
as user attributes (the search space, the fidelity, the data's hash), so a worker on another
machine needs only the storage URL and the study name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, ProgrammingError

from cifarlab.config import DataConfig
from cifarlab.errors import StudyError
from cifarlab.tune.space import SearchSpace

__all__ = ["DATA_ATTR", "SETTINGS_ATTR", "SPACE_ATTR", "STUDY_FILE", "StudyRef", "TuneSettings",
           "connect", "open_study", "redact", "study_space"]

SPACE_ATTR = "cifarlab:space"
DATA_ATTR = "cifarlab:data_sha256"
SETTINGS_ATTR = "cifarlab:settings"
STUDY_FILE = "study.json"


@dataclass
class TuneSettings:
    """Everything ``cifarlab tune`` needs besides the search space."""

    study_dir: Path
    study_name: str | None = None  # default: the folder's name
    storage: str | None = None  # default: sqlite:///<study_dir>/study.db
    n_trials: int = 20  # finished trials (complete, pruned or failed) the study aims for
    sampler: str = "gp"
    # a training run's validation loss is noisy (another seed, another loss): the GP sampler
    # then takes no trust-region steps (cifarlab.tune.samplers); False for an objective that
    # repeats exactly and may have ripples finer than a global GP resolves
    noisy: bool = True
    pruner: str = "median"
    n_startup: int | None = None  # random trials before the surrogate; default_startup()
    seed: int = 0
    workers: int = 1
    devices: list[str] = field(default_factory=list)
    timeout: float | None = None  # seconds per worker; the search stops early enough for the
    #                              target trials to fit (see workers._out_of_time)
    data: DataConfig = field(default_factory=DataConfig)
    heartbeat_interval: int = 10  # seconds between a running trial's heartbeats
    grace_period: int = 30  # a RUNNING trial silent this long belongs to a dead worker
    quiet: bool = False
    target_epochs: float | None = None  # the budget the answer is for; default: the recipe's
    top_k: int = 2  # search winners re-evaluated at the target budget
    target_trials: bool = True  # False: no baseline and no re-evaluation (plain Optuna; for
    #                             benchmarks that compare against it)
    base: dict[str, Any] | None = None  # the config the study starts from (--config); default
    #                                     the model's recipe
    tensorboard: bool = False  # each trial writes event files into study_dir/tensorboard/
    metric: str | None = None  # what the study minimises (cifarlab.tune.metric); None: the
    #                            stored study's, or the default for a new one

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


def connect(url: str, settings: TuneSettings | None = None) -> optuna.storages.RDBStorage:
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
    for attempt in range(_SCHEMA_RACE_RETRIES + 1):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except (IntegrityError, ProgrammingError) as exc:
            # Two machines starting on an empty database both create Optuna's tables; the
            # loser's CREATE fails on a duplicate name (PostgreSQL: pg_type_typname_nsp_index).
            # The tables exist by then, so connecting again succeeds.
            if attempt == _SCHEMA_RACE_RETRIES:
                raise _storage_error(url, exc) from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as exc:  # sqlalchemy's connection and driver errors
            raise _storage_error(url, exc) from None
    raise AssertionError("unreachable")  # pragma: no cover


_SCHEMA_RACE_RETRIES = 5


def _storage_error(url: str, exc: Exception) -> StudyError:
    return StudyError(f"Cannot open study storage {redact(url)}: "
                      f"{type(exc).__name__}: {str(exc).splitlines()[0]}")


def redact(url: str) -> str:
    """The URL without its password, fit for files and messages."""
    try:
        return make_url(url).render_as_string(hide_password=True).replace("***", "")
    except Exception:
        return url


def open_study(study_dir: Path, storage: str | None = None) -> optuna.Study:
    """Load an existing study from its folder (or ``storage`` when the folder's URL needs a
    password: libpq also reads ``PGPASSWORD`` and ``~/.pgpass``)."""
    ref = StudyRef.from_dir(study_dir, storage)
    try:
        return optuna.load_study(study_name=ref.study_name, storage=connect(ref.storage))
    except KeyError:
        raise StudyError(f"No study named {ref.study_name!r} in {redact(ref.storage)}.") from None


def study_space(study: optuna.Study) -> SearchSpace:
    raw = study.user_attrs.get(SPACE_ATTR)
    if raw is None:
        raise StudyError(f"Study {study.study_name!r} was not made by cifarlab (it has no "
                         "search space attribute).")
    return SearchSpace.from_dict(raw, f"study {study.study_name}")
