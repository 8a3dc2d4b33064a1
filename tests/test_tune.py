"""Studies end to end: the real trainer on a tiny synthetic set, real SQLite (and PostgreSQL when
CI provides one), real worker processes, real SIGKILL and SIGINT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from cifarlab.models import default_config
from cifarlab.tune import open_study
from cifarlab.tune.target import answer, candidates, open_target, target_config
from helpers import CIFARLAB, call

optuna.logging.set_verbosity(optuna.logging.ERROR)
pytestmark = [pytest.mark.slow,  # studies run trainings, workers and subprocesses
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

SPACE = """
fidelity: {model: tutorial, epochs: 3, train_fraction: 1.0}
params:
  lr: {type: float, low: 0.05, high: 20.0, log: true}
  momentum: {type: float, low: 0.5, high: 0.95}
  label_smoothing: {type: float, low: 0.0, high: 0.3}
fixed: {batch_size: 32}
"""


def tune_args(data: Path, study_dir: Path, *extra: str, space: Path | None = None) -> list[str]:
    args = ["tune", "--data", str(data), "--study-dir", str(study_dir), "--val-size", "48",
            "--seed", "0"]
    if space is not None:
        args += ["--space", str(space)]
    return args + list(extra)


@pytest.fixture
def space_file(tmp_path) -> Path:
    f = tmp_path / "space.yaml"
    f.write_text(SPACE)
    return f


def states(study_dir: Path) -> dict[str, int]:
    study = open_study(study_dir)
    out: dict[str, int] = {}
    for t in study.trials:
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def test_study_finds_a_better_configuration_and_reports(capsys, learnable, tmp_path, space_file):
    study_dir = tmp_path / "s"
    code, out, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "10",
                                             "--pruner", "none", space=space_file))
    assert code == 0, err
    assert "trial state" in out and "best trial" in out  # the live table and the summary
    study = open_study(study_dir)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 10
    # better than where the search started (the first trial), found after the start-up trials
    assert study.best_value < study.trials[0].value
    assert study.best_value < min(t.value for t in study.trials[:4])
    # stored as plain Optuna: the dashboard, or anyone, can load it by name
    raw = optuna.load_study(study_name="s", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert raw.best_trial.user_attrs["val_acc"] > 0.25
    # a new study minimises the validation loss at its calibrated temperature, never above
    # the plain loss, and says so in its table
    assert raw.user_attrs["cifarlab:metric"] == "calibrated-loss" and "val_cal_loss" in out
    for t in done:
        assert t.value == t.user_attrs["val_cal_loss"] <= t.user_attrs["val_loss"] + 1e-9
    assert json.loads((study_dir / "study.json").read_text())["study_name"] == "s"

    code, out, _ = call(capsys, "tune", "report", str(study_dir))
    assert code == 0
    for name in ("history", "parallel", "importances", "surrogate"):
        png = study_dir / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    page = (study_dir / "report" / "index.html").read_text()
    assert "posterior mean" in page and "Optimization history" in page

    # the baseline (the recipe) ran first and the top 2 after the search, at the target
    # budget: the recipe's 10 epochs on the whole training split
    target = open_target(study)
    roles = [(t.user_attrs["role"], t.user_attrs["source_trial"], t.user_attrs["epochs"])
             for t in target.trials]
    assert roles[0] == ("baseline", None, 10)
    # (a training run's loss is declared noisy: the posterior mean's best comes first)
    assert sorted(r[1] for r in roles[1:]) == sorted(t.number for t in candidates(study, 2,
                                                                                   noisy=True))
    assert all(r[2] == 10 for r in roles) and target.trials[0].datetime_complete < min(
        t.datetime_start for t in study.trials)
    ans = answer(study)
    assert ans.best.value <= ans.baseline.value
    assert "at the target budget (10 epochs" in page and "&lt;- answer" in page

    code, out, err = call(capsys, "train", "--from-study", str(study_dir), "--data",
                          str(learnable), "--runs-dir", str(tmp_path / "runs"), "-q")
    assert code == 0, err
    assert "on train + validation, 10 epochs" in out and "test: loss" in out
    cfg = json.loads((tmp_path / "runs" / "s-best" / "config.json").read_text())
    assert cfg["data"]["val_size"] == 0 and cfg["optim"]["epochs"] == 10
    expected = target_config(study, "baseline" if ans.is_baseline else "candidate",
                             ans.source_trial)
    assert cfg["optim"]["lr"] == pytest.approx(expected.optim.lr)

    code, out, _ = call(capsys, "tune", "show", str(study_dir), "--json")
    shown = json.loads(out)
    assert code == 0 and shown["n_complete"] == 10
    assert shown["answer"] in ("baseline", f"trial {ans.source_trial}")
    assert shown["baseline_value"] == pytest.approx(ans.baseline.value)

    # the same study with another fidelity is refused before any training
    code, _, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "12", "--epochs",
                                           "5", space=space_file))
    assert code == 5 and "different search space" in err
    # ... and so is another metric: the stored values would not compare
    code, _, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "12", "--metric",
                                           "loss"))
    assert code == 5 and "minimises calibrated-loss" in err
    assert len(open_study(study_dir).trials) == 10


def test_when_nothing_beats_the_baseline_the_baseline_is_the_answer(capsys, learnable,
                                                                     tmp_path):
    space = tmp_path / "hopeless.yaml"  # a learning rate too small to learn anything
    space.write_text("""
fidelity: {model: tutorial, epochs: 1, train_fraction: 1.0}
params:
  lr: {type: float, low: 1.0e-6, high: 2.0e-6, log: true}
fixed: {batch_size: 32}
""")
    study_dir = tmp_path / "hopeless"
    code, out, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "4",
                                             "--target-epochs", "4", "--sampler", "random",
                                             "--metric", "error", space=space))
    assert code == 0, err
    assert "answer: the baseline. No configuration found by the search beat it" in out
    for t in open_study(study_dir).trials:  # the metric asked for: validation error
        assert t.value == pytest.approx(1 - t.user_attrs["val_acc"])
    assert "val_error (validation error (1 - accuracy))" in out
    code, out, err = call(capsys, "train", "--from-study", str(study_dir), "--data",
                          str(learnable), "--runs-dir", str(tmp_path / "runs"), "-q")
    assert code == 0, err
    assert "retraining the baseline: no configuration of the search beat" in out
    cfg = json.loads((tmp_path / "runs" / "hopeless-best" / "config.json").read_text())
    recipe = default_config("tutorial")
    assert cfg["optim"]["lr"] == recipe.optim.lr and cfg["optim"]["batch_size"] == (
        recipe.optim.batch_size) and cfg["optim"]["epochs"] == 4
    # a different target for the same study is refused before any training
    code, _, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "4",
                                           "--target-epochs", "5", space=space))
    assert code == 5 and "answers for 4 epochs" in err


def test_nan_trial_is_failed_with_its_reason_and_the_study_goes_on(capsys, learnable,
                                                                    tmp_path):
    space = tmp_path / "nan.yaml"
    space.write_text("""
fidelity: {model: tutorial, epochs: 2, train_fraction: 1.0}
params:
  lr: {type: categorical, choices: [1.0e+12, 2.0]}
fixed: {batch_size: 32, label_smoothing: 0.0}
""")
    study_dir = tmp_path / "nan"
    code, out, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "6",
                                             "--sampler", "random", space=space))
    assert code == 0, err
    study = open_study(study_dir)
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert failed and complete
    for t in failed:
        assert t.params["lr"] == 1e12
        assert t.user_attrs["fail_kind"] == "nonfinite"
        assert "non-finite" in t.user_attrs["fail_reason"].lower() or "nan" in t.user_attrs[
            "fail_reason"].lower()
        # the doctor's finding travels with the failed trial, naming where NaN/Inf appeared
        assert t.user_attrs["doctor"][0]["rule"] == "nonfinite-loss", t.user_attrs["doctor"]
        assert "first appear in" in t.user_attrs["doctor"][0]["message"]
    assert all(t.params["lr"] == 2.0 for t in complete)
    assert "failed x" in out  # the summary lists the reasons


def test_a_repeated_configuration_is_answered_from_its_earlier_trial(capsys, learnable,
                                                                     tmp_path):
    """Two configurations in all and five trials: samplers propose tried ones again, and every
    trial trains with the same seed, so a repeat takes the earlier trial's result instead of
    training again."""
    space = tmp_path / "two.yaml"
    space.write_text("""
fidelity: {model: tutorial, epochs: 1, train_fraction: 1.0}
params:
  lr: {type: categorical, choices: [0.5, 2.0]}
fixed: {batch_size: 32}
""")
    study_dir = tmp_path / "two"
    code, out, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "5",
                                             "--sampler", "random", "--target-epochs", "1",
                                             space=space))
    assert code == 0, err
    trials = open_study(study_dir).trials
    assert len(trials) == 5 and all(t.state == TrialState.COMPLETE for t in trials)
    trained = [t for t in trials if "repeat_of" not in t.user_attrs]
    assert sorted(t.params["lr"] for t in trained) == [0.5, 2.0]
    for t in trials:
        if "repeat_of" in t.user_attrs:
            twin = trials[t.user_attrs["repeat_of"]]
            assert twin.params == t.params and twin.value == t.value
            assert t.user_attrs["val_acc"] == twin.user_attrs["val_acc"]
            assert "worker" in t.user_attrs and t.duration.total_seconds() < 1.0
    assert f"[the parameters of trial {trained[0].number}: its result]" in out or (
        f"[the parameters of trial {trained[1].number}: its result]" in out)


def test_bad_space_fails_before_any_training(capsys, learnable, tmp_path):
    space = tmp_path / "bad.toml"
    space.write_text('[params.lr]\ntype = "float"\nlow = 5.0\nhigh = 1.0\n')
    code, _, err = call(capsys, *tune_args(learnable, tmp_path / "x", space=space))
    assert code == 2 and "params.lr" in err and "must be below high" in err
    assert not (tmp_path / "x" / "study.db").exists()


def _wait_for(study_dir: Path, ok, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ok(states(study_dir)):
                return
        except Exception:
            pass  # the study may not exist yet
        time.sleep(0.2)
    raise AssertionError(f"timed out; states: {states(study_dir)}")


def _popen(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([CIFARLAB, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=os.environ.copy())


SLOW_SPACE = SPACE.replace("epochs: 3", "epochs: 20")


def test_study_resumes_after_sigkill_keeping_every_completed_trial(learnable, tmp_path):
    space = tmp_path / "slow.yaml"
    space.write_text(SLOW_SPACE)
    study_dir = tmp_path / "killed"
    args = tune_args(learnable, study_dir, "--trials", "4", "--heartbeat", "1", "--pruner",
                     "none", space=space)
    proc = _popen(args)
    _wait_for(study_dir, lambda s: s.get("COMPLETE", 0) >= 2 and s.get("RUNNING", 0) == 1)
    # kill it while training, not in the instant between creating a trial and sampling it
    deadline = time.monotonic() + 60
    while not any(t.state == TrialState.RUNNING and t.params
                  for t in open_study(study_dir).trials):
        assert time.monotonic() < deadline, "no trial ever started training"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = {t.number: t.value for t in open_study(study_dir).trials
              if t.state == TrialState.COMPLETE}
    assert len(before) >= 2

    done = subprocess.run([CIFARLAB, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    trials = open_study(study_dir).trials
    after = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}
    assert all(after[n] == v for n, v in before.items())  # nothing completed was lost
    dead = [t for t in trials if t.state == TrialState.FAIL]
    assert len(dead) == 1 and "fail_reason" not in dead[0].user_attrs
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == dead[0].number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    assert retry[0].params == dead[0].params  # the dead worker's trial was retried as it was
    assert len(after) == 4
    assert not any(t.state == TrialState.RUNNING for t in trials)


def test_ctrl_c_marks_the_running_trial_and_stops(learnable, tmp_path):
    space = tmp_path / "slow.yaml"
    space.write_text(SLOW_SPACE)
    study_dir = tmp_path / "interrupted"
    proc = _popen(tune_args(learnable, study_dir, "--trials", "10", space=space))
    _wait_for(study_dir, lambda s: s.get("COMPLETE", 0) >= 1 and s.get("RUNNING", 0) == 1)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by Ctrl-C" in err
    trials = open_study(study_dir).trials
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 1 and stopped[0].user_attrs["fail_kind"] == "interrupted"
    assert not any(t.state == TrialState.RUNNING for t in trials)


def _check_shared(study: optuna.Study, n: int, n_workers: int) -> None:
    finished = [t for t in study.trials if t.state.is_finished()]
    assert n <= len(finished) <= n + n_workers - 1  # workers may all start the last trial
    # the work was shared: one worker may have spent the search on the baseline's long trial
    target = [t for t in open_target(study).trials if t.state == TrialState.COMPLETE]
    workers = {t.user_attrs["worker"] for t in finished + target}
    assert len(workers) >= 2, workers
    roles = [t.user_attrs["role"] for t in target]
    assert roles.count("baseline") == 1 and roles.count("candidate") == 2, roles
    assert len({t.number for t in study.trials}) == len(study.trials)


def test_parallel_workers_share_sqlite(learnable, tmp_path, space_file):
    study_dir = tmp_path / "par"
    done = subprocess.run([CIFARLAB, *tune_args(learnable, study_dir, "--trials", "8",
                                                "--workers", "2", space=space_file)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "w0 " in done.stdout and "w1 " in done.stdout
    _check_shared(open_study(study_dir), 8, 2)


POSTGRES = os.environ.get("CIFARLAB_TEST_POSTGRES")


@pytest.mark.skipif(not POSTGRES and not os.environ.get("CI"),
                    reason="set CIFARLAB_TEST_POSTGRES (`.ci/run` starts a server)")
def test_two_machines_join_one_postgres_study(learnable, tmp_path, space_file):
    assert POSTGRES, "CI must provide CIFARLAB_TEST_POSTGRES (see .ci/postgres.sh)"
    name = f"t{uuid.uuid4().hex[:10]}"
    # the same command on two "machines": two processes with their own study folders; the
    # second places one worker per device (two CPU "devices" here)
    extra = [[], ["--devices", "cpu,cpu"]]
    procs = [_popen(tune_args(learnable, tmp_path / f"m{i}", "--trials", "8", "--storage",
                              POSTGRES, "--name", name, *extra[i], space=space_file))
             for i in range(2)]
    for p in procs:
        _out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name=name, storage=POSTGRES)
    _check_shared(study, 8, 3)
    # the folder records where the study lives, without a password
    ref = json.loads((tmp_path / "m0" / "study.json").read_text())
    assert ref["study_name"] == name and ":cifarlab@" not in ref["storage"]


def test_same_seed_same_study(capsys, learnable, tmp_path, space_file):
    """One worker, one seed: the same trials in the same order with the same results."""
    runs = []
    for name in ("a", "b"):
        code, _, err = call(capsys, *tune_args(learnable, tmp_path / name, "--trials", "6",
                                               "--startup", "3", space=space_file))
        assert code == 0, err
        runs.append([(t.params, t.value, t.state) for t in open_study(tmp_path / name).trials])
    assert runs[0] == runs[1]


def test_timeout_leaves_time_for_the_target_trials(capsys, learnable, tmp_path, space_file):
    study_dir = tmp_path / "timed"
    t0 = time.monotonic()
    code, out, err = call(capsys, *tune_args(learnable, study_dir, "--trials", "1000",
                                             "--timeout", "20", "--target-epochs", "6",
                                             space=space_file))
    took = time.monotonic() - t0
    assert code == 0, err
    study = open_study(study_dir)
    assert 1 <= len(study.trials) < 1000  # the clock, not the trial budget, ended the search
    roles = [t.user_attrs.get("role") for t in open_target(study).trials
             if t.state == TrialState.COMPLETE]
    assert roles[0] == "baseline" and roles.count("candidate") == 2
    assert "answer:" in out
    # the search stopped early enough for the two target trials: about the timeout in all
    # (trials and data loading on a loaded machine take a few seconds more)
    assert took < 20 + 30, took
