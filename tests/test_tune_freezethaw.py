"""Freeze-thaw studies end to end (``cifarlab tune --sampler freeze-thaw``): trials trained at
the target budget in moves, paused as WAITING trials and continued from their checkpoints, on
real SQLite with the real trainer."""

from __future__ import annotations

import os
import socket
import uuid

import optuna
import pytest
from optuna.trial import TrialState

from cifarlab.config import DataConfig
from cifarlab.data import load_data
from cifarlab.trainer import train
from cifarlab.tune import open_study
from cifarlab.tune.interrupt import StopFlag
from cifarlab.tune.metric import study_metric
from cifarlab.tune.mfstudy import (
    FT_ATTR,
    RUNGS,
    FreezeThawObjective,
    FreezeThawRunner,
    checkpoint_folder,
    params_key,
)
from cifarlab.tune.target import answer, open_target, target_config
from helpers import call
from test_tune import SPACE, _popen, tune_args

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]


@pytest.fixture
def space_file(tmp_path):
    f = tmp_path / "space.yaml"
    f.write_text(SPACE)
    return f


def test_freeze_thaw_study_continues_trials_to_the_target(capsys, learnable, tmp_path,
                                                          space_file):
    study_dir = tmp_path / "ft"
    code, out, err = call(capsys, *tune_args(learnable, study_dir, "--sampler", "freeze-thaw",
                                             "--trials", "3", "--target-epochs", "3",
                                             "--pruner", "asha", space=space_file))
    assert code == 0, err
    assert "--pruner asha is not used with --sampler freeze-thaw" in err
    assert " paused " in out and "11%" in out  # a row per move, the budget reached
    study = open_study(study_dir)
    trials = study.get_trials(deepcopy=False)
    spent = sum(t.user_attrs[FT_ATTR]["budget"] for t in trials)
    assert 3 <= spent < 3 + 1  # --trials counts target budgets trained (the last move may
    # cross it)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    paused = [t for t in trials if t.state == TrialState.WAITING]
    assert done and paused  # some reached the target, others wait to be continued
    for t in trials:
        ft = t.user_attrs[FT_ATTR]
        assert ft["budget"] in RUNGS and ft["budgets"] == sorted(ft["budgets"])
        steps = sorted(t.intermediate_values)
        # the whole curve: every epoch's end and every move's end, in one trial
        assert len(steps) == len(ft["budgets"]) >= len(ft["moves"])
        assert [t.intermediate_values[s] for s in steps] == pytest.approx(ft["values"])
        assert ft["budgets"][-1] == pytest.approx(ft["budget"], abs=0.05)
    for t in paused:
        assert t.user_attrs[FT_ATTR]["budget"] < 1
    for t in done:
        assert t.user_attrs[FT_ATTR]["budget"] == 1.0 and t.value == pytest.approx(
            t.user_attrs[FT_ATTR]["values"][-1])
    # a paused trial keeps its checkpoint; a finished one needs it no more
    kept = {p for p in (study_dir / "checkpoints").iterdir()}
    assert {checkpoint_folder(study_dir / "checkpoints", t.number, t.params)
            for t in paused} == kept
    continued = [t for t in done if len(t.user_attrs[FT_ATTR]["moves"]) >= 2]
    assert continued, "no trial was continued from a pause"

    # a continued trial ends where a run straight through at the target ends, exactly
    t = continued[0]
    cfg = target_config(study, "candidate", t.number)
    cfg.seed = 0
    base_data = DataConfig(source=str(learnable), val_size=48)
    straight = train(cfg.with_values({"data.source": str(learnable), "data.val_size": 48}),
                     data=load_data(base_data), evaluate_test=False, progress=False)
    metric = study_metric(study)
    assert metric.value({"val_loss": straight.val_loss, "val_acc": straight.val_acc,
                         "val_cal_loss": straight.val_cal_loss}) == t.value

    # the answer: the baseline ran at the target, the finished trials are copied as candidates
    target = open_target(study)
    roles = sorted(str(x.user_attrs["role"]) for x in target.trials)
    assert roles[0] == "baseline" and set(roles[1:]) == {"candidate"}
    assert all(x.user_attrs.get("copied") for x in target.trials
               if x.user_attrs["role"] == "candidate")
    assert answer(study).best is not None

    # the sampler is the study's: resuming with more budget continues it
    code, _, err = call(capsys, *tune_args(learnable, study_dir, "--sampler", "freeze-thaw",
                                           "--trials", "4", "--target-epochs", "3"))
    assert code == 0, err
    assert sum(t.user_attrs[FT_ATTR]["budget"] for t in open_study(study_dir).trials) >= 4


def test_a_configuration_is_never_started_twice_and_a_finite_space_runs_out(capsys, learnable,
                                                                          tmp_path):
    """Four configurations in all: each is trained once (a second start would repeat its curve
    and, before, shared its checkpoint folder), and the study ends when all four are finished,
    under a budget of six."""
    space = tmp_path / "grid.yaml"
    space.write_text("""
fidelity: {model: tutorial, epochs: 3, train_fraction: 1.0}
params:
  lr: {type: categorical, choices: [0.5, 2.0]}
  label_smoothing: {type: categorical, choices: [0.0, 0.2]}
fixed: {batch_size: 32}
""")
    study_dir = tmp_path / "grid"
    code, out, err = call(capsys, *tune_args(learnable, study_dir, "--sampler", "freeze-thaw",
                                             "--trials", "6", "--target-epochs", "2",
                                             space=space))
    assert code == 0, err
    assert "every configuration of the search space has been started" in out
    trials = open_study(study_dir).get_trials(deepcopy=False)
    assert sorted(tuple(sorted(t.params.items())) for t in trials) == sorted(
        (("label_smoothing", s), ("lr", lr)) for s in (0.0, 0.2) for lr in (0.5, 2.0))
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sum(t.user_attrs[FT_ATTR]["budget"] for t in trials) == 4


def test_two_trials_with_the_same_parameters_keep_their_checkpoints_apart(tmp_path) -> None:
    params = {"lr": 0.5, "label_smoothing": 0.0}
    a, b = (checkpoint_folder(tmp_path, n, params) for n in (3, 7))
    assert a != b and a.parent == b.parent == tmp_path
    # a trial paused by an earlier cifarlab (a folder named by the digest alone) continues there
    (tmp_path / params_key(params)).mkdir()
    assert checkpoint_folder(tmp_path, 3, params) == tmp_path / params_key(params)


def test_freeze_thaw_needs_a_study_of_its_own_and_unconditional_parameters(capsys, learnable,
                                                                           tmp_path,
                                                                           space_file):
    study_dir = tmp_path / "gp"
    code, _, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "1",
                                           "--target-epochs", "1", space=space_file))
    assert code == 0, err
    code, _, err = call(capsys, *tune_args(learnable, study_dir, "--sampler", "freeze-thaw",
                                           "--trials", "2", "--target-epochs", "1"))
    assert code == 5 and "was made with --sampler gp" in err

    cond = tmp_path / "cond.yaml"
    cond.write_text("""
fidelity: {model: tutorial, epochs: 3, train_fraction: 1.0}
params:
  lr: {type: float, low: 0.05, high: 20.0, log: true}
  ema: {type: categorical, choices: [true, false]}
  ema_start_frac: {type: float, low: 0.1, high: 0.6, when: {ema: true}}
fixed: {batch_size: 32}
""")
    code, _, err = call(capsys, *tune_args(learnable, tmp_path / "c", "--sampler",
                                           "freeze-thaw", "--trials", "2", "--target-epochs",
                                           "1", space=cond))
    assert code != 0 and "'ema_start_frac' is conditional" in err


POSTGRES = os.environ.get("CIFARLAB_TEST_POSTGRES")


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
def test_a_paused_trial_is_continued_by_another_process(learnable, tmp_path, space_file,
                                                        storage):
    """A worker process leaves paused trials behind; another process that shares only the
    storage and the study folder (where the checkpoints are) continues one from its pause, and
    it ends exactly where a run straight through ends."""
    extra: list[str] = []
    if storage == "postgres":
        if not POSTGRES:
            if os.environ.get("CI"):
                pytest.fail("CI must provide CIFARLAB_TEST_POSTGRES (see .ci/postgres.sh)")
            pytest.skip("set CIFARLAB_TEST_POSTGRES (`.ci/run` starts a server)")
        extra = ["--storage", POSTGRES, "--name", f"ft{uuid.uuid4().hex[:10]}"]
    study_dir = tmp_path / "shared"
    p = _popen(tune_args(learnable, study_dir, "--sampler", "freeze-thaw", "--trials", "1",
                         "--target-epochs", "3", *extra, space=space_file))
    _out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    study = open_study(study_dir, POSTGRES if storage == "postgres" else None)  # (study.json
    # keeps no password)
    paused = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.WAITING]
    assert paused, "the first process left no paused trial"
    t = paused[0]
    assert {m[2] for m in t.user_attrs[FT_ATTR]["moves"]} == {f"{socket.gethostname()}:{p.pid}"}

    # this process, another worker: claims the paused trial and continues it to the target
    data = load_data(DataConfig(source=str(learnable), val_size=48))
    objective = FreezeThawObjective(study, data, StopFlag(), study_dir / "checkpoints")
    runner = FreezeThawRunner(study, objective, seed=1, n_startup=1, worker=1,
                              own_trials_only=False)
    assert study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
    assert not study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)  # taken
    while study._storage.get_trial(t._trial_id).state != TrialState.COMPLETE:
        ft = study._storage.get_trial(t._trial_id).user_attrs[FT_ATTR]
        runner._run(t._trial_id, runner.policy.next_rung(ft["budget"]))
        if study._storage.get_trial(t._trial_id).state == TrialState.WAITING:
            assert study._storage.set_trial_state_values(t._trial_id, TrialState.RUNNING)
    done = study._storage.get_trial(t._trial_id)
    movers = [m[2] for m in done.user_attrs[FT_ATTR]["moves"]]
    assert movers[0].endswith(f":{p.pid}") and movers[-1].endswith(f":{os.getpid()}")
    # the continued trial read the first process's checkpoint: the straight run agrees exactly
    cfg = target_config(study, "candidate", done.number)
    cfg.seed = 0
    straight = train(cfg, data=data, evaluate_test=False, progress=False)
    assert study_metric(study).value({"val_loss": straight.val_loss, "val_acc": straight.val_acc,
                                      "val_cal_loss": straight.val_cal_loss}) == done.value
