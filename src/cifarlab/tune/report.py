"""``cifarlab tune report``: PNG and HTML plots of a study.

Four views: optimization history, parallel coordinates and parameter importances (Optuna's own
plots), and the surrogate view, which is cifarlab's: the Gaussian process the sampler is using,
drawn as posterior mean ± 2 standard deviations along each important hyperparameter with the
others held at the best trial's values, over the observed trials. It shows the user what the
search believes, and how sure it is, instead of only where it went.
"""

from __future__ import annotations

import html
import math
import warnings
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # Optuna's matplotlib plots draw through pyplot
import numpy as np
import optuna
from matplotlib.ticker import NullFormatter
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from cifarlab.errors import StudyError
from cifarlab.files import atomic_write, atomic_write_text
from cifarlab.tune.metric import study_metric
from cifarlab.tune.samplers import Surrogate, fit_surrogate
from cifarlab.tune.storage import open_study
from cifarlab.tune.summary import summarize

__all__ = ["surrogate_slices", "write_report"]

MAX_SLICES = 4


def write_report(study_dir: Path, out: Path, storage: str | None = None) -> list[Path]:
    """Write ``history``, ``parallel``, ``importances`` and ``surrogate`` as .png, and all four
    in ``index.html``. Returns the files written."""
    with warnings.catch_warnings():  # Optuna 5.0 marks its matplotlib plots and fANOVA
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        return _write_report(study_dir, out, storage)


def _write_report(study_dir: Path, out: Path, storage: str | None) -> list[Path]:
    study = open_study(study_dir, storage)
    completed = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not completed:
        raise StudyError(f"Study {study.study_name!r} has no completed trial to report on.")
    out.mkdir(parents=True, exist_ok=True)
    importances = _importances(study)
    important = list(importances)[:MAX_SLICES] or list(completed[-1].params)[:MAX_SLICES]
    surrogate = fit_surrogate(study)
    label = study_metric(study).axis

    figures: list[tuple[str, str, Any]] = []  # (name, title, plotly figure)
    written: list[Path] = []
    pv, pm = optuna.visualization, optuna.visualization.matplotlib

    def png(name: str, draw: Any) -> None:
        ax = draw()
        fig = ax.figure if hasattr(ax, "figure") else np.ravel(ax)[0].figure
        fig.set_size_inches(10, 6)
        fig.tight_layout()
        path = out / f"{name}.png"
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        written.append(path)

    png("history", lambda: pm.plot_optimization_history(study, target_name=label))
    figures.append(("history", "Optimization history",
                    pv.plot_optimization_history(study, target_name=label)))
    png("parallel", lambda: pm.plot_parallel_coordinate(study, params=important,
                                                        target_name=label))
    figures.append(("parallel", "Parallel coordinates",
                    pv.plot_parallel_coordinate(study, params=important, target_name=label)))
    if importances:
        png("importances", lambda: _importance_axes(importances, label))
        figures.append(("importances", "Parameter importances (fANOVA)",
                        _importance_plotly(importances, label)))
    if surrogate is not None:
        best = study.best_trial.params
        slices = surrogate_slices(surrogate, best, [p for p in important
                                                    if p in surrogate.search_space])
        if slices:
            png("surrogate", lambda: _surrogate_axes(slices, study, label))
            figures.append(("surrogate", "Surrogate model (GP posterior)",
                            _surrogate_plotly(slices, label)))
    index = out / "index.html"
    atomic_write_text(index, _html(study, figures))
    written.append(index)
    return written


def _importances(study: optuna.Study) -> dict[str, float]:
    try:
        return optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError):  # too few trials, or a single distinct value
        return {}


# ------------------------------------------------------------------------ surrogate view


def surrogate_slices(surrogate: Surrogate, anchor: dict[str, Any],
                     names: list[str], n: int = 120) -> list[dict[str, Any]]:
    """For each name: a grid along that parameter (others at ``anchor``), the posterior mean and
    std on it, and the observed trials' values."""
    out = []
    for name in names:
        dist = surrogate.search_space[name]
        if isinstance(dist, CategoricalDistribution):
            grid: list[Any] = list(dist.choices)
        elif isinstance(dist, FloatDistribution) and dist.step is None:
            grid = list(np.geomspace(dist.low, dist.high, n) if dist.log
                        else np.linspace(dist.low, dist.high, n))
        elif isinstance(dist, IntDistribution | FloatDistribution):
            step = dist.step or 1
            count = round((dist.high - dist.low) / step) + 1
            grid = [dist.low + i * step for i in range(count)]
            if isinstance(dist, IntDistribution):
                grid = [int(g) for g in grid]
        else:
            continue
        points = [{**anchor, name: g} for g in grid]
        points = [{k: p[k] for k in surrogate.search_space} for p in points]
        mean, std = surrogate.predict(points)
        obs = [(t.params[name], t.value, _kind(t)) for t in surrogate.observed]
        out.append({"name": name, "grid": grid, "mean": mean, "std": std, "observed": obs,
                    "anchor": anchor.get(name), "log": bool(getattr(dist, "log", False)),
                    "categorical": isinstance(dist, CategoricalDistribution)})
    return out


def _kind(t: optuna.trial.FrozenTrial) -> str:
    # observations_for_surrogate rebuilds pruned and failed trials with create_trial: number -1
    return "complete" if t.number >= 0 else "imputed"


def _surrogate_axes(slices: list[dict[str, Any]], study: optuna.Study, label: str) -> Any:
    cols = min(2, len(slices))
    rows = math.ceil(len(slices) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False)
    for ax, s in zip(np.ravel(axes), slices, strict=False):
        x = np.arange(len(s["grid"])) if s["categorical"] else np.asarray(s["grid"], float)
        lo, hi = s["mean"] - 2 * s["std"], s["mean"] + 2 * s["std"]
        ax.fill_between(x, lo, hi, alpha=0.25, label="mean ± 2 std")
        ax.plot(x, s["mean"], lw=2, label="posterior mean")
        for kind, marker, color in (("complete", "o", "k"), ("imputed", "x", "tab:red")):
            pts = [(o[0], o[1]) for o in s["observed"] if o[2] == kind]
            if pts:
                px = ([s["grid"].index(p[0]) for p in pts] if s["categorical"]
                      else [p[0] for p in pts])
                ax.scatter(px, [p[1] for p in pts], marker=marker, c=color, s=18, zorder=3,
                           label="trials" if kind == "complete" else "pruned/failed (imputed)")
        if s["categorical"]:
            ax.set_xticks(x, [str(g) for g in s["grid"]])
        elif s["log"]:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on short spans
        ax.axvline(s["grid"].index(s["anchor"]) if s["categorical"] and s["anchor"] in s["grid"]
                   else s["anchor"], ls=":", c="gray")
        ax.set_xlabel(s["name"])
        ax.set_ylabel(label)
    for ax in np.ravel(axes)[len(slices):]:
        ax.set_visible(False)
    np.ravel(axes)[0].legend(fontsize=7)
    fig.suptitle(f"{study.study_name}: GP surrogate along each important parameter "
                 "(others at the best trial)")
    return axes


def _surrogate_plotly(slices: list[dict[str, Any]], axis: str) -> Any:
    from plotly.subplots import make_subplots

    cols = min(2, len(slices))
    rows = math.ceil(len(slices) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[s["name"] for s in slices])
    for i, s in enumerate(slices):
        r, c = i // cols + 1, i % cols + 1
        x = [str(g) for g in s["grid"]] if s["categorical"] else list(map(float, s["grid"]))
        hi = s["mean"] + 2 * s["std"]
        lo = s["mean"] - 2 * s["std"]
        show = i == 0
        fig.add_scatter(x=x, y=hi.tolist(), mode="lines", line={"width": 0}, row=r, col=c,
                        showlegend=False, hoverinfo="skip")
        fig.add_scatter(x=x, y=lo.tolist(), mode="lines", line={"width": 0}, fill="tonexty",
                        fillcolor="rgba(31,119,180,0.25)", name="mean ± 2 std", row=r, col=c,
                        showlegend=show)
        fig.add_scatter(x=x, y=s["mean"].tolist(), mode="lines", name="posterior mean",
                        line={"color": "rgb(31,119,180)"}, row=r, col=c, showlegend=show)
        for kind, symbol, color, label in (("complete", "circle", "black", "trials"),
                                           ("imputed", "x", "red", "pruned/failed (imputed)")):
            pts = [o for o in s["observed"] if o[2] == kind]
            if pts:
                fig.add_scatter(x=[str(p[0]) if s["categorical"] else p[0] for p in pts],
                                y=[p[1] for p in pts], mode="markers", name=label,
                                marker={"symbol": symbol, "color": color, "size": 6},
                                row=r, col=c, showlegend=show)
        if s["log"]:
            fig.update_xaxes(type="log", row=r, col=c)
        fig.update_yaxes(title_text=axis, row=r, col=c)
    fig.update_layout(height=380 * rows, title="GP surrogate (others at the best trial)")
    return fig


def _importance_axes(importances: dict[str, float], label: str) -> Any:
    names = list(importances)[::-1]
    fig, ax = plt.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set_xlabel(f"importance for {label} (fANOVA)")
    fig.suptitle("Parameter importances")
    return ax


def _importance_plotly(importances: dict[str, float], label: str) -> Any:
    import plotly.graph_objects as go

    names = list(importances)[::-1]
    fig = go.Figure(go.Bar(x=[importances[n] for n in names], y=names, orientation="h"))
    fig.update_layout(xaxis_title=f"importance for {label} (fANOVA)")
    return fig


def _html(study: optuna.Study, figures: list[tuple[str, str, Any]]) -> str:
    summary = "<br>".join(html.escape(line) for line in summarize(study).lines())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cifarlab study {html.escape(study.study_name)}</title>",
        "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto}"
        "</style></head><body>",
        f"<h1>Study {html.escape(study.study_name)}</h1><p><code>{summary}</code></p>",
    ]
    for i, (name, title, fig) in enumerate(figures):
        parts.append(f"<h2 id='{name}'>{html.escape(title)}</h2>")
        # plotly.js inlined once: the report opens offline
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    parts.append("</body></html>")
    return "\n".join(parts)
