"""The learning-curve surrogate and the freeze-thaw decision rule (cifarlab.tune.curves and
cifarlab.tune.freezethaw): what they predict and decide on curves whose truth is known."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from cifarlab.tune import load_space
from cifarlab.tune.curves import budget_coordinate, fit_curves, fit_decay_curves
from cifarlab.tune.freezethaw import DONE, PAUSED, CostModel, Curve, FreezeThaw, log_ei
from cifarlab.tune.mfstudy import distributions, snap_to_grid

RUNGS = (1 / 9, 1 / 3, 1.0)


def truth(x: np.ndarray, b: float) -> float:
    """A 2-D family of learning curves: the loss at the target is a bowl around (0.3, 0.6); the
    extra loss of a short run decays as b^-0.5 - 1 at a speed that depends on x, so curves cross."""
    target = 0.5 + 2.0 * ((x[0] - 0.3) ** 2 + (x[1] - 0.6) ** 2)
    speed = 0.2 + 0.6 * x[0]
    return float(target + speed * (b ** -0.5 - 1.0))


def observe(xs: np.ndarray, budgets: tuple[float, ...]):
    pts = [(x, b, truth(x, b)) for x in xs for b in budgets]
    return (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]),
            np.array([p[2] for p in pts]))


def test_budget_coordinate_runs_from_the_smallest_budget_to_the_target() -> None:
    s = budget_coordinate(np.array([1 / 9, 1 / 3, 1.0, 1 / 27]), 1 / 9)
    assert np.allclose(s, [0.0, 0.5, 1.0, 0.0])  # log-spaced; below the smallest is clipped


FITTERS = pytest.mark.parametrize("fit", [fit_curves, fit_decay_curves], ids=["joint", "decay"])


@FITTERS
def test_curve_model_predicts_the_target_from_short_runs_better_than_their_last_loss(fit) -> None:
    rng = np.random.RandomState(0)
    full = rng.random_sample((12, 2))  # configurations seen to the target
    short = rng.random_sample((10, 2))  # seen only at the first rung
    x1, b1, y1 = observe(full, RUNGS)
    x2, b2, y2 = observe(short, RUNGS[:1])
    model = fit(np.vstack([x1, x2]), np.r_[b1, b2], np.r_[y1, y2], RUNGS[0])
    assert model is not None
    mean, sd = model.predict(short, 1.0)
    true_target = np.array([truth(x, 1.0) for x in short])
    naive = y2  # a pruned trial imputed as its last loss
    assert np.mean(np.abs(mean - true_target)) < 0.3 * np.mean(np.abs(naive - true_target))
    # losses fall with budget in the model as in the data
    assert np.all(mean < y2)
    assert np.all(sd > 0)
    # where it has seen the target, it reproduces it
    seen, _ = model.predict(full, 1.0)
    assert np.allclose(seen, [truth(x, 1.0) for x in full], atol=0.02)


@FITTERS
def test_curve_model_ranks_short_runs_by_their_target_not_their_start(fit) -> None:
    from scipy.stats import spearmanr

    rng = np.random.RandomState(1)
    full = rng.random_sample((15, 2))
    short = rng.random_sample((20, 2))
    x1, b1, y1 = observe(full, RUNGS)
    x2, b2, y2 = observe(short, RUNGS[:2])
    model = fit(np.vstack([x1, x2]), np.r_[b1, b2], np.r_[y1, y2], RUNGS[0])
    assert model is not None
    mean, _ = model.predict(short, 1.0)
    true_target = [truth(x, 1.0) for x in short]
    last = [truth(x, RUNGS[1]) for x in short]
    assert spearmanr(mean, true_target).statistic > spearmanr(last, true_target).statistic
    assert spearmanr(mean, true_target).statistic > 0.9


@FITTERS
def test_fit_curves_drops_non_finite_losses_and_needs_three_points(fit) -> None:
    x = np.array([[0.1, 0.2], [0.5, 0.5], [0.9, 0.1]])
    assert fit(x, np.ones(3), np.array([1.0, math.nan, 2.0]), 1 / 9) is None
    assert fit(x, np.ones(3), np.array([1.0, 1.5, 2.0]), 1 / 9) is not None


def test_log_ei_is_the_closed_form_expected_improvement() -> None:
    mean = np.array([0.5, 1.0, 1.5, 3.0])
    sd = np.array([0.2, 0.5, 0.3, 0.4])
    best = 1.0
    z = (best - mean) / sd
    ei = (best - mean) * norm.cdf(z) + sd * norm.pdf(z)
    assert np.allclose(np.exp(log_ei(mean, sd, best)), ei, rtol=1e-6)
    assert np.isfinite(log_ei(np.array([100.0]), np.array([0.1]), 0.0)).all()  # far tail


def test_cost_model_learns_a_start_cost_and_a_rate() -> None:
    moves = [(b, 4.0 + 30.0 * b) for b in (1 / 9, 2 / 9, 2 / 3, 1 / 9, 1.0)]
    cost = CostModel.learn(moves)
    assert cost.start == pytest.approx(4.0) and cost.rate == pytest.approx(30.0)
    assert cost.seconds(1 / 3, 1.0) == pytest.approx(4.0 + 20.0)
    assert CostModel.learn(moves[:1], CostModel(rate=7.0)).rate == 7.0  # too few: the default


def _policy(seed: int = 0, n_startup: int = 4) -> FreezeThaw:
    return FreezeThaw(RUNGS, lambda rng, n: rng.random_sample((n, 2)), n_startup=n_startup,
                      seed=seed)


def test_the_first_moves_start_random_configurations_at_the_first_rung() -> None:
    d = _policy().decide([], CostModel())
    assert d.index is None and d.to_budget == RUNGS[0] and d.x.shape == (2,)


def test_it_continues_the_promising_paused_curve_and_leaves_the_poor_one() -> None:
    rng = np.random.RandomState(3)
    curves = []
    for x in rng.random_sample((14, 2)):  # the landscape, seen to the target
        curves.append(Curve(x=x, budgets=list(RUNGS), values=[truth(x, b) for b in RUNGS],
                            state=DONE))
    good, poor = np.array([0.3, 0.6]), np.array([0.95, 0.05])
    for x in (good, poor):
        curves.append(Curve(x=x, budgets=[RUNGS[0]], values=[truth(x, RUNGS[0])],
                            state=PAUSED))
    d = _policy().decide(curves, CostModel(rate=1.0))
    assert d.index == len(curves) - 2  # the good one, to the next rung
    assert d.to_budget == RUNGS[1]


def test_a_running_or_finished_curve_is_never_continued() -> None:
    x = np.array([0.3, 0.6])
    curves = [Curve(x=np.array(p), budgets=list(RUNGS), values=[truth(np.array(p), b)
                                                               for b in RUNGS], state=DONE)
              for p in ([0.1, 0.1], [0.9, 0.9], [0.5, 0.2], [0.2, 0.9])]
    curves.append(Curve(x=x, budgets=[RUNGS[0]], values=[truth(x, RUNGS[0])], state="running"))
    d = _policy().decide(curves, CostModel())
    assert d.index is None


def test_a_configuration_in_the_study_is_never_started_again() -> None:
    """A space of nine configurations (two parameters of three values each): the policy starts
    each at most once, continues the paused ones when every one is started, and has no move left
    when none is paused."""
    grid = np.array([[a, b] for a in (0.0, 0.5, 1.0) for b in (0.0, 0.5, 1.0)])

    def sample(rng: np.random.RandomState, n: int) -> np.ndarray:
        return grid[rng.randint(len(grid), size=n)]

    def snap(x: np.ndarray) -> np.ndarray:
        return np.round(np.asarray(x) * 2) / 2

    policy = FreezeThaw(RUNGS, sample, n_startup=4, seed=0, snap=snap)
    curves: list[Curve] = []
    started: list[tuple[float, ...]] = []
    moves = 0
    while (d := policy.decide(curves, CostModel(rate=1.0))) is not None:
        moves += 1
        assert moves <= 9 * len(RUNGS)
        if d.index is None:
            assert tuple(d.x) not in started
            started.append(tuple(d.x))
            curves.append(Curve(x=d.x))
        c = curves[-1] if d.index is None else curves[d.index]
        assert d.to_budget > c.budget
        c.budgets.append(d.to_budget)
        c.values.append(truth(c.x, d.to_budget))
        c.state = DONE if d.to_budget >= 1.0 else PAUSED
    assert len(started) == 9 and all(c.state == DONE for c in curves)


def test_the_policy_with_the_decay_kernel_decides_from_its_model() -> None:
    rng = np.random.RandomState(3)
    curves = [Curve(x=x, budgets=list(RUNGS), values=[truth(x, b) for b in RUNGS], state=DONE)
              for x in rng.random_sample((14, 2))]
    policy = FreezeThaw(RUNGS, lambda r, n: r.random_sample((n, 2)), n_startup=4, seed=0,
                        kernel="decay")
    d = policy.decide(curves, CostModel(rate=1.0))
    assert d.index is None and np.isfinite(d.log_score)  # a new configuration, by the model
    assert np.linalg.norm(d.x - np.array([0.3, 0.6])) < 0.15  # near the optimum at the target


def test_rungs_and_kernel_are_checked() -> None:
    with pytest.raises(ValueError, match="rungs"):
        FreezeThaw((0.5, 0.2), lambda rng, n: rng.random_sample((n, 2)))
    with pytest.raises(ValueError, match="kernel"):
        FreezeThaw((0.5, 1.0), lambda rng, n: rng.random_sample((n, 2)), kernel="rbf")
    assert FreezeThaw((0.25, 0.5), lambda rng, n: rng.random_sample((n, 2))).rungs[-1] == 1.0


def test_every_candidate_is_snapped_onto_the_spaces_steps() -> None:
    from pathlib import Path

    from optuna._gp.search_space import SearchSpace as GPSpace

    space = load_space(Path(__file__).resolve().parent.parent / "examples/demo-space.yaml")
    dists = distributions(space)  # cutout: int, step 4
    gp_space = GPSpace(dists)
    snap = snap_to_grid(gp_space)

    def contained(u: np.ndarray) -> bool:
        params = gp_space.get_unnormalized_param(u)
        return all(dists[k]._contains(dists[k].to_internal_repr(v)) for k, v in params.items())

    policy = FreezeThaw(RUNGS, lambda r, n: gp_space.sample_normalized_params(n, r), seed=0,
                        is_categorical=gp_space.is_categorical, snap=snap)
    local = policy._local(gp_space.sample_normalized_params(1, np.random.RandomState(0))[0], 512)
    assert not all(contained(u) for u in local)  # cutout 0 nudged becomes 1 or 2: Optuna
    assert all(contained(u) for u in snap(local))  # refuses such a trial; snapped, it is 0 or 4
    seen: list[int] = []
    policy.snap = lambda x: (seen.append(len(x)), snap(x))[1]
    rng = np.random.RandomState(2)
    curves = [Curve(x=x, budgets=[RUNGS[0]], values=[float(np.sum((x - 0.4) ** 2))], state=DONE)
              for x in gp_space.sample_normalized_params(12, rng)]
    d = policy.decide(curves, CostModel())
    assert seen == [policy.n_candidates + policy.n_candidates // 4] and contained(d.x)


# ------------------------------------------------------------------ budget as schedule progress


def test_schedule_progress_is_the_share_of_the_schedules_rates_spent() -> None:
    from cifarlab.config import TrainConfig
    from cifarlab.optim import schedule_factor, schedule_progress

    total = 9000
    for warmup, start, end in ((0.0, 0.2, 0.07), (0.23, 0.2, 0.07), (0.5, 0.0, 1.0), (1.0, 0.1, 0.0)):
        cfg = TrainConfig().with_values({"optim.warmup_frac": warmup, "optim.lr_start": start,
                                         "optim.lr_end": end})
        rates = np.cumsum([schedule_factor(cfg, total)(i) for i in range(total)])
        for b in (1 / 9, 1 / 3, 0.5, 0.9):
            spent = rates[round(b * total) - 1] / rates[-1]
            assert schedule_progress(b, warmup, start, end) == pytest.approx(spent, abs=2e-3)
        assert schedule_progress(1.0, warmup, start, end) == pytest.approx(1.0)
    b = np.linspace(0.01, 1, 50)
    assert np.all(np.diff(schedule_progress(b, 0.3, 0.2, 0.07)) > 0)
    # a long warm-up has spent less of its rates after the same share of its steps
    assert schedule_progress(1 / 9, 0.5, 0.2, 0.07) < schedule_progress(1 / 9, 0.0, 0.2, 0.07) / 2


def test_the_policy_measures_budget_by_progress_and_answers_on_its_scale() -> None:
    def progress(x: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(b, dtype=float) ** (1.0 + x[:, 0])  # slower for larger x[0]

    rng = np.random.RandomState(3)
    curves = [Curve(x=x, budgets=list(RUNGS), values=[truth(x, b) for b in RUNGS], state=DONE)
              for x in rng.random_sample((10, 2))]
    policy = FreezeThaw(RUNGS, lambda r, n: r.random_sample((n, 2)), seed=0, progress=progress)
    with pytest.raises(RuntimeError, match="before fit"):
        policy.predict(curves[0].x)
    model = policy.fit(curves)
    assert model is not None
    xs = np.array([c.x for c in curves])
    assert model.min_budget == pytest.approx(progress(xs, np.full(len(xs), RUNGS[0])).min())
    for b in (RUNGS[0], 0.5):
        got = policy.predict(xs, b)
        want = model.predict(xs, progress(xs, np.full(len(xs), b)))
        np.testing.assert_allclose(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1])
    np.testing.assert_allclose(policy.predict(xs, 1.0)[0], model.predict(xs, 1.0)[0])


def test_losses_are_warped_before_the_fit_unless_turned_off() -> None:
    from cifarlab.tune.warping import warp_values

    rng = np.random.RandomState(5)
    curves = [Curve(x=x, budgets=[1.0], values=[math.exp(8 * x[0])], state=DONE)  # 1 to 3000
              for x in rng.random_sample((12, 2))]
    ys = np.array([c.values[0] for c in curves])
    xs = np.array([c.x for c in curves])
    for warp, scale in ((True, warp_values(ys)), (False, ys)):
        policy = FreezeThaw(RUNGS, lambda r, n: r.random_sample((n, 2)), seed=0, warp=warp)
        policy.fit(curves)
        mean, _ = policy.predict(xs, 1.0)
        # the model interpolates its observations, on the warped scale when warping
        assert np.corrcoef(mean, scale)[0, 1] > 0.99
        assert int(np.argmin(mean)) == int(np.argmin(ys))


def test_a_studys_progress_reads_the_schedule_from_each_row_or_the_base() -> None:
    from pathlib import Path

    from optuna._gp.search_space import SearchSpace as GPSpace

    from cifarlab.models import default_config
    from cifarlab.optim import schedule_progress
    from cifarlab.tune.mfstudy import progress_of
    from cifarlab.tune.space import SearchSpace

    base = default_config("airnet")
    space = load_space(Path(__file__).resolve().parent.parent / "examples/demo-space.yaml")
    gp_space = GPSpace(distributions(space))
    rows = gp_space.get_normalized_params(
        [None, None],  # type: ignore[list-item]
        [{"lr": 10.0, "weight_decay": 0.01, "momentum": 0.9, "label_smoothing": 0.1,
          "warmup_frac": w, "cutout": 4} for w in (0.0, 0.5)])
    cfg = space.base_config(base)
    got = progress_of(space, base)(rows, np.full(2, 1 / 9))
    want = schedule_progress(1 / 9, np.array([0.0, 0.5]), cfg.optim.lr_start, cfg.optim.lr_end)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[1] < got[0]
    # a space that does not search the schedule: the base config's, the same for every row
    plain = SearchSpace.from_dict({"params": {"lr": {"type": "float", "low": 1.0, "high": 40.0,
                                                      "log": True}}})
    plain_gp = GPSpace(distributions(plain))
    x = plain_gp.get_normalized_params([None, None], [{"lr": 2.0}, {"lr": 30.0}])  # type: ignore[list-item]
    pcfg = plain.base_config(base)
    np.testing.assert_allclose(
        progress_of(plain, base)(x, np.full(2, 1 / 3)),
        schedule_progress(1 / 3, pcfg.optim.warmup_frac, pcfg.optim.lr_start, pcfg.optim.lr_end))


def test_a_studys_progress_reads_categorical_and_integer_schedule_parameters() -> None:
    from optuna._gp.search_space import SearchSpace as GPSpace

    from cifarlab.models import default_config
    from cifarlab.optim import schedule_progress
    from cifarlab.tune.mfstudy import progress_of
    from cifarlab.tune.space import SearchSpace

    space = SearchSpace.from_dict({"params": {
        "warmup_frac": {"type": "categorical", "choices": [0.0, 0.3]},
        "lr_end": {"type": "int", "low": 0, "high": 1}}})
    gp_space = GPSpace(distributions(space))
    rows = gp_space.get_normalized_params(
        [None, None],  # type: ignore[list-item]
        [{"warmup_frac": 0.3, "lr_end": 1}, {"warmup_frac": 0.0, "lr_end": 0}])
    start = space.base_config(default_config("airnet")).optim.lr_start
    np.testing.assert_allclose(
        progress_of(space, default_config("airnet"))(rows, np.full(2, 1 / 3)),
        schedule_progress(1 / 3, np.array([0.3, 0.0]), start, np.array([1.0, 0.0])))


# ------------------------------------------------------------------ the option to stop


def test_the_joint_posterior_agrees_with_the_marginal_one() -> None:
    rng = np.random.RandomState(4)
    x, b, y = observe(rng.random_sample((12, 2)), RUNGS)
    model = fit_curves(x, b, y, RUNGS[0])
    assert model is not None
    xq = rng.random_sample((7, 2))
    budgets = np.column_stack([np.full(7, RUNGS[0]), np.full(7, 0.5), np.ones(7)])
    mean, cov = model.joint(xq, budgets)
    for j in range(3):
        m, sd = model.predict(xq, budgets[:, j])
        np.testing.assert_allclose(mean[:, j], m, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np.sqrt(np.diagonal(cov, axis1=1, axis2=2)[:, j]), sd,
                                   rtol=1e-6, atol=1e-9)
    corr = cov[:, 0, 2] / np.sqrt(cov[:, 0, 0] * cov[:, 2, 2])
    assert np.all(corr > 0) and np.all(corr <= 1 + 1e-9)  # a curve's points move together
    assert model.noise_var > 0


def test_a_move_short_of_the_target_is_worth_more_than_ei_per_second_to_the_end() -> None:
    rng = np.random.RandomState(3)
    curves = [Curve(x=x, budgets=list(RUNGS), values=[truth(x, b) for b in RUNGS], state=DONE)
              for x in rng.random_sample((10, 2))]
    curves += [Curve(x=x, budgets=[RUNGS[0]], values=[truth(x, RUNGS[0])], state=PAUSED)
               for x in rng.random_sample((4, 2))]
    with_option, without = _policy(), _policy()
    with_option.option = True
    assert not without.option  # the default: EI per second to the target
    for p in (with_option, without):
        p.fit(curves)
    xs = np.array([c.x for c in curves[10:]])
    best = float(with_option.predict(np.array([c.x for c in curves]), 1.0)[0].min())
    cost = CostModel(rate=1.0)
    for budget in (0.0, RUNGS[0]):
        opt = with_option._log_index(xs, budget, best, cost)
        plain = without._log_index(xs, budget, best, cost)
        m, sd = without.predict(xs, 1.0)
        np.testing.assert_allclose(plain, log_ei(m, sd, best) - math.log(1.0 - budget))
        assert np.all(opt > plain)  # the option to stop after the next rung is worth something
        first_stage = cost.seconds(budget, with_option.next_rung(budget))
        assert np.all(opt <= log_ei(m, sd, best) - math.log(first_stage) + 1e-9)
    # finishing a run has no option left: both score it alike
    np.testing.assert_allclose(with_option._log_index(xs, RUNGS[1], best, cost),
                               without._log_index(xs, RUNGS[1], best, cost))
