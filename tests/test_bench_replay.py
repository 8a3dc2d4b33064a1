"""The learning-curve replay's bookkeeping (``bench/mf_replay.py``): what a move costs."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load_replay() -> ModuleType:
    """Import the bench script with its folder on the path only while it loads: the folder
    holds ``keras.py``, which must not hide the Keras package from the other tests."""
    before = list(sys.path)
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("mf_replay")
    finally:
        sys.path[:] = before


mf_replay = _load_replay()


@pytest.fixture(scope="module")
def table() -> mf_replay.TabularProblem:
    return mf_replay.TabularProblem(BENCH / "data/cifar-curves-cpu.json")


def _twin(p: mf_replay.TabularProblem, row: int) -> np.ndarray:
    """A point other than the row's own that maps to the row."""
    u = p.x[row].copy()
    nearest_other = np.sort(np.sum((p.x - u) ** 2, axis=1))[1]
    u = u + np.sqrt(nearest_other) / 10 / np.sqrt(len(u))
    assert p.row(u) == row and not np.array_equal(u, p.x[row])
    return u


def test_a_row_trained_again_costs_only_what_it_adds(table: mf_replay.TabularProblem) -> None:
    r = mf_replay.Replay(table)
    u, v = table.x[7], _twin(table, 7)
    r.train(u, 0.0, 1 / 9)
    assert r.spent == pytest.approx(1 / 9)
    assert r.train(v, 0.0, 1 / 9) == table.value(u, 1 / 9)  # the same row, answered from memory
    assert r.spent == pytest.approx(1 / 9)
    r.train(v, 1 / 9, 1 / 3)  # beyond what the row had: charged
    assert r.spent == pytest.approx(1 / 3)
    r.train(u, 1 / 9, 1 / 3)  # the row already had 1/3
    assert r.spent == pytest.approx(1 / 3)
    r.train(u, 1 / 3, 1.0)
    assert r.spent == pytest.approx(1.0)
    assert r.trace == [(1.0, table.value(u, 1.0) - table.fmin)]
    r.train(table.x[8], 0.0, 1.0)  # another row pays in full
    assert r.spent == pytest.approx(2.0)


def test_a_run_that_only_repeats_ends(table: mf_replay.TabularProblem) -> None:
    r = mf_replay.Replay(table)
    r.train(table.x[3], 0.0, 1.0)
    for _ in range(mf_replay.MAX_FREE - 1):
        r.train(table.x[3], 0.0, 1.0)
        assert not r.out
    r.train(table.x[3], 0.0, 1.0)
    assert r.out and r.spent == pytest.approx(1.0)


def test_continuous_problems_charge_every_move() -> None:
    p = mf_replay.PROBLEMS["mf-branin"]
    r = mf_replay.Replay(p)
    u = np.array([0.5, 0.5])
    r.train(u, 0.0, 1 / 3)
    r.train(u, 0.0, 1 / 3)
    assert r.spent == pytest.approx(2 / 3)
