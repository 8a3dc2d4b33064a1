"""The target budget's bookkeeping on a real SQLite study, without training: which search
trials become candidates, what is queued, and what the answer is (never worse than the baseline
on validation at the target budget)."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from cifarlab.errors import StudyError
from cifarlab.models import default_config
from cifarlab.tune.metric import METRIC_ATTR, study_metric
from cifarlab.tune.space import load_space
from cifarlab.tune.storage import SPACE_ATTR
from cifarlab.tune.summary import retrain_config, summarize
from cifarlab.tune.target import (
    TARGET_ATTR,
    Target,
    answer,
    candidates,
    enqueue_baseline,
    enqueue_candidates,
    open_target,
    target_config,
)

optuna.logging.set_verbosity(optuna.logging.ERROR)

SPACE = """
fidelity: {model: tutorial, epochs: 1, train_fraction: 0.5}
params:
  lr: {type: float, low: 0.01, high: 1.0, log: true}
fixed: {batch_size: 32}
"""
LR = FloatDistribution(0.01, 1.0, log=True)


@pytest.fixture
def study(tmp_path) -> optuna.Study:
    (tmp_path / "space.yaml").write_text(SPACE)
    s = optuna.create_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}")
    s.set_user_attr(SPACE_ATTR, load_space(tmp_path / "space.yaml").to_dict())
    s.set_user_attr(TARGET_ATTR, Target(4.0, top_k=2).to_dict())
    (tmp_path / "study.json").write_text(json.dumps({"storage": "sqlite:///study.db",
                                                     "study_name": "s"}))
    open_target(s)
    return s


def _search(study: optuna.Study, *points: tuple[float, float | None]) -> None:
    for lr, value in points:
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions={"lr": LR}, value=value,
            state=TrialState.COMPLETE if value is not None else TrialState.FAIL))


def _finish(target: optuna.Study, values: list[float]) -> None:
    """Run the queued target trials in order with the given validation losses."""
    for v in values:
        t = target.ask()
        target.tell(t, v)


def test_candidates_are_the_best_distinct_completed_trials(study):
    _search(study, (0.1, 1.0), (0.2, 0.5), (0.2, 0.5), (0.3, None), (0.4, 0.7))
    assert [t.params["lr"] for t in candidates(study, 2)] == [0.2, 0.4]
    assert len(candidates(study, 10)) == 3  # duplicates and failures do not count


def test_baseline_is_queued_once_and_again_after_ctrl_c(study):
    target = open_target(study)
    assert enqueue_baseline(study, target) and not enqueue_baseline(study, target)
    t = target.ask()
    assert t.user_attrs["role"] == "baseline"
    t.set_user_attr("fail_kind", "interrupted")
    target.tell(t, state=TrialState.FAIL)
    assert enqueue_baseline(study, target)  # Ctrl-C is not a verdict on the baseline


def test_target_configs_are_the_full_split_at_the_target_epochs(study):
    _search(study, (0.25, 0.5))
    base = target_config(study, "baseline", None)
    recipe = default_config("tutorial")
    assert base.optim.lr == recipe.optim.lr and base.optim.batch_size == recipe.optim.batch_size
    cand = target_config(study, "candidate", 0)
    assert cand.optim.lr == 0.25 and cand.optim.batch_size == 32  # the space's fixed values
    for cfg in (base, cand):
        assert cfg.optim.epochs == 4.0 and cfg.data.train_fraction == 1.0


def test_a_candidate_must_beat_the_baseline_to_be_the_answer(study, tmp_path):
    target = open_target(study)
    enqueue_baseline(study, target)
    _finish(target, [0.60])
    _search(study, (0.1, 0.9), (0.2, 0.8), (0.3, 0.85))
    assert enqueue_candidates(study, target, 2) == 2
    assert enqueue_candidates(study, target, 2) == 0  # queued once
    _finish(target, [0.61, 0.60])  # worse, then a tie: neither is an improvement
    ans = answer(study)
    assert ans.is_baseline and ans.improvement == 0.0
    lines = summarize(study).lines()
    assert any(line.startswith("answer: the baseline. No configuration") for line in lines)
    chosen = retrain_config(tmp_path)
    assert chosen.what == "baseline" and chosen.config.optim.lr == default_config(
        "tutorial").optim.lr
    assert chosen.config.data.val_size == 0 and chosen.config.optim.epochs == 4.0


def test_the_best_candidate_that_beats_the_baseline_is_the_answer(study, tmp_path):
    target = open_target(study)
    enqueue_baseline(study, target)
    _search(study, (0.1, 0.9), (0.2, 0.8), (0.3, 0.85))
    enqueue_candidates(study, target, 2)
    _finish(target, [0.60, 0.55, 0.50])  # baseline, trial 1 (lr 0.2), trial 2 (lr 0.3)
    ans = answer(study)
    assert not ans.is_baseline and ans.source_trial == 2
    assert ans.improvement == pytest.approx(0.10)
    s = summarize(study)
    assert s.answer == "trial 2" and s.baseline_value == 0.60
    chosen = retrain_config(tmp_path)
    assert chosen.what == "trial 2" and chosen.config.optim.lr == 0.3
    assert retrain_config(tmp_path, baseline=True).what == "baseline"


def test_no_answer_before_the_baseline_is_measured(study, tmp_path):
    _search(study, (0.2, 0.8))
    target = open_target(study)
    enqueue_candidates(study, target, 1)
    _finish(target, [0.5])
    assert summarize(study).answer is None
    with pytest.raises(StudyError, match="not yet measured its baseline"):
        retrain_config(tmp_path)


def test_a_search_winner_equal_to_the_recipe_is_not_queued_twice(study, tmp_path):
    recipe_lr = default_config("tutorial").optim.lr
    space_file = tmp_path / "space.yaml"
    space_file.write_text(SPACE.replace("fixed: {batch_size: 32}", "fixed: {batch_size: 256}")
                          .replace("high: 1.0", f"high: {max(1.0, recipe_lr)}"))
    study.set_user_attr(SPACE_ATTR, load_space(space_file).to_dict())
    assert default_config("tutorial").optim.batch_size == 256
    study.add_trial(optuna.trial.create_trial(
        params={"lr": recipe_lr}, distributions={"lr": FloatDistribution(
            0.01, max(1.0, recipe_lr), log=True)}, value=0.5))
    assert enqueue_candidates(study, open_target(study), 2) == 0


def test_a_target_trial_queued_twice_runs_once(study):
    """Two machines starting one study at the same instant may both queue the baseline."""
    from cifarlab.tune.target import is_duplicate

    target = open_target(study)
    for _ in range(2):
        target.enqueue_trial({}, user_attrs={"role": "baseline", "source_trial": None})
    first = target.ask()
    assert not is_duplicate(target, first.number)
    second = target.ask()  # the other machine, while the first still runs
    assert is_duplicate(target, second.number)
    target.tell(first, 0.5)
    assert is_duplicate(target, second.number)


def test_a_study_made_before_metrics_existed_keeps_plain_validation_loss(study, tmp_path):
    # studies stored before --metric hold plain cross-entropy values, and are read as such
    assert study_metric(study).name == "loss"
    target = open_target(study)
    enqueue_baseline(study, target)
    _finish(target, [0.60])
    assert "answer: the baseline" in "\n".join(summarize(study).lines())
    assert "val_loss (validation cross-entropy)" in "\n".join(summarize(study).lines())
    study.set_user_attr(METRIC_ATTR, "calibrated-loss")
    assert "val_cal_loss (validation cross-entropy at its best temperature)" in "\n".join(
        summarize(study).lines())
    study.set_user_attr(METRIC_ATTR, "accuracy@5")  # written by a newer cifarlab, say
    with pytest.raises(StudyError, match="minimises 'accuracy@5'.*upgrade cifarlab"):
        summarize(study)


def test_noisy_candidates_put_the_best_posterior_mean_before_a_lucky_draw(study):
    """A noisy objective's best observation far from the trend (a lucky seed) is not the first
    candidate: the GP's posterior-mean best is, and the lucky draw is still checked second."""
    rng = np.random.default_rng(0)
    lrs = np.geomspace(0.01, 1.0, 24)
    values = (np.log10(lrs) + 1.0) ** 2 + rng.normal(0, 0.05, len(lrs))
    lucky = int(np.argmin(np.abs(lrs - 0.9)))
    values[lucky] = values.min() - 0.05
    _search(study, *zip(lrs.tolist(), values.tolist(), strict=True))
    observed = candidates(study, 2)
    assert observed[0].params["lr"] == pytest.approx(lrs[lucky])
    first, second = candidates(study, 2, noisy=True)
    assert abs(np.log10(first.params["lr"]) + 1.0) < 0.3  # near the trend's minimum, lr 0.1
    assert second.number == observed[0].number
    # each queued candidate says why it was picked, and `tune show` prints it
    target = open_target(study)
    enqueue_baseline(study, target)
    assert enqueue_candidates(study, target, 2, noisy=True) == 2
    _finish(target, [0.9, 0.5, 0.6])
    why = [t.user_attrs.get("picked_by") for t in target.trials]
    assert why[0] is None and why[1].startswith("posterior mean #1, observed #")
    assert why[2].endswith(", observed #1") and "posterior mean #1," not in why[2]
    lines = summarize(study).lines()
    assert any(f"trial {first.number} " in line and "(posterior mean #1" in line
               for line in lines)


def test_noisy_candidates_fall_back_to_observations_without_a_gp(study):
    _search(study, (0.1, 1.0), (0.2, 0.5))
    assert [t.params["lr"] for t in candidates(study, 2, noisy=True)] == [0.2, 0.1]


def test_noisy_candidates_handle_integer_and_categorical_parameters(tmp_path):
    """A mixed space (and trials from before a parameter was added) still gives distinct,
    completed candidates, posterior mean first."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    s = optuna.create_study(storage=f"sqlite:///{tmp_path / 'mixed.db'}")
    dists = {"lr": LR, "cutout": IntDistribution(0, 12, step=4),
             "opt": CategoricalDistribution(["sgd", "muon"])}
    rng = np.random.default_rng(1)
    s.add_trial(optuna.trial.create_trial(params={"lr": 0.1}, distributions={"lr": LR},
                                          value=-5.0))  # an older trial: lr only
    for _ in range(30):
        p = {"lr": float(10 ** rng.uniform(-2, 0)), "cutout": int(rng.choice([0, 4, 8, 12])),
             "opt": str(rng.choice(["sgd", "muon"]))}
        v = (np.log10(p["lr"]) + 1) ** 2 + 0.1 * (p["opt"] == "sgd") + rng.normal(0, 0.05)
        s.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=float(v)))
    got = candidates(s, 3, noisy=True)
    assert len(got) == 3 and len({t.number for t in got}) == 3
    assert got[1].number == 0  # the best observation (the older trial) is checked second
    assert got[0].number != 0  # the posterior mean (on the parameters all trials share) differs


def test_queued_candidates_are_not_picked_again(study, monkeypatch):
    """Once the top k are queued, a worker that looks again fits no GP."""
    import cifarlab.tune.target as target_mod

    _search(study, *[(lr, (np.log10(lr) + 1.0) ** 2) for lr in np.geomspace(0.01, 1.0, 8)])
    target = open_target(study)
    assert enqueue_candidates(study, target, 2, noisy=True) == 2

    def no_fit(*args, **kwargs):
        raise AssertionError("the GP was fitted again")

    monkeypatch.setattr(target_mod, "rank_by_posterior_mean", no_fit)
    assert enqueue_candidates(study, target, 2, noisy=True) == 0
