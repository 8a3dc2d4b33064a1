"""The ``cifarlab`` command: parse, call the library, map errors to exit codes.

Heavy modules (torch) are imported inside commands so that ``cifarlab --help`` stays fast.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from cifarlab import __version__
from cifarlab.errors import CifarlabError

MODEL_HELP = ("A registered model (`cifarlab models`), a .keras file, or a builder: "
              "FILE.py:function or package.module:function.")


class ModelParam(click.ParamType):
    """``--model``: checked for its form here (cheap: nothing is imported or built)."""

    name = "model"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        from cifarlab.builders import model_kind

        try:
            model_kind(str(value))
        except CifarlabError as exc:
            self.fail(str(exc), param, ctx)
        return str(value)


MODEL = ModelParam()


def _model_args(items: tuple[str, ...]) -> dict[str, Any]:
    """``--model-arg units=256 --model-arg dropout=0.3``: values read as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip().isidentifier():
            raise CifarlabError(f"--model-arg {item!r}: expected NAME=VALUE, e.g. units=256.")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


_model_arg_option = click.option(
    "--model-arg", "model_arg", multiple=True, metavar="NAME=VALUE",
    help="A keyword argument of the model's builder (repeatable), e.g. --model-arg units=256.")


def _data_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--data", "data", type=click.Path(path_type=Path), default=None,
                     help="Dataset: cifar-10-python.tar.gz, cifar-10-batches-py/, or an "
                          "image-folder tree or .tar/.tar.gz/.zip of one. Default: "
                          "$CIFARLAB_DATA, then the user cache (downloading CIFAR-10)."),
        click.option("--image-size", type=click.IntRange(8), default=None,
                     help="Resize (center-crop + resize) images that are not this size "
                          "[default: 32; for evaluate, the run's]."),
        click.option("--skip-bad", is_flag=True,
                     help="Skip corrupt images and list them instead of failing."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _data_config(data: Path | None, image_size: int | None, skip_bad: bool) -> Any:
    from cifarlab.config import DataConfig

    return DataConfig(source=str(data) if data else None, image_size=image_size or 32,
                      skip_bad=skip_bad)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cifarlab")
@click.option("-v", "--verbose", is_flag=True, help="Log more detail.")
def cli(verbose: bool) -> None:
    """cifarlab: tune, train, diagnose and serve image classifiers."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


# -------------------------------------------------------------------------------- train


@cli.command()
@click.option("--model", type=MODEL, default="airnet", show_default=True, help=MODEL_HELP)
@_model_arg_option
@click.option("--recipe", default=None, help="A named recipe of the model (`cifarlab models` "
              "lists them) [default: the model's default recipe].")
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path),
              help="A config file: a run folder's config.json, or one you wrote in JSON, YAML or "
                   "TOML (any subset of the keys); options given here override it.")
@click.option("--from-study", type=click.Path(path_type=Path), default=None,
              help="Retrain a study's answer (its best configuration at the target budget, "
                   "never one that lost to the baseline there) on train + validation and "
                   "evaluate it on test, for the target epochs unless --epochs is given.")
@click.option("--baseline", "study_baseline", is_flag=True,
              help="With --from-study: train the study's baseline instead of its answer.")
@_data_options
@click.option("--val-size", type=int, default=None, help="Validation images taken from train "
              "(default 10% of it, at most 5000; 0 trains on every training image).")
@click.option("--train-fraction", type=float, default=None, help="Stratified subsample of train.")
@click.option("--epochs", type=float, default=None, help="Epochs (fractions allowed).")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Learning rate per 1024 examples "
              "(decoupled from momentum).")
@click.option("--momentum", type=float, default=None, help="Nesterov momentum.")
@click.option("--weight-decay", type=float, default=None, help="Per 1024 examples, "
              "decoupled from lr.")
@click.option("--label-smoothing", type=float, default=None)
@click.option("--warmup-frac", type=float, default=None, help="Fraction of steps to peak lr.")
@click.option("--width", type=float, default=None, help="Width multiplier.")
@click.option("--cutout", type=int, default=None, help="Cutout square side in pixels (0 = off).")
@click.option("--translate", type=int, default=None, help="Random-crop translation in pixels.")
@click.option("--flip/--no-flip", default=None, help="Alternating horizontal flip.")
@click.option("--precision", type=click.Choice(["auto", "bf16", "fp32"]), default=None,
              help="auto = bf16 where the hardware has bf16 units.")
@click.option("--channels-last/--no-channels-last", default=None)
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N.")
@click.option("--tta", type=click.IntRange(0, 2), default=None,
              help="Test-time augmentation: 0 none, 1 mirror, 2 mirror + translate.")
@click.option("--seed", type=int, default=None)
@click.option("--name", default=None, help="Run folder name (default: <model>-<timestamp>).")
@click.option("--runs-dir", type=click.Path(path_type=Path), default=Path("runs"),
              show_default=True)
@click.option("--no-test", is_flag=True, help="Do not evaluate on the test split at the end.")
@click.option("-q", "--quiet", is_flag=True, help="No per-epoch table or progress bar.")
@click.option("--no-doctor", is_flag=True, help="Do not run the doctor's training monitors.")
@click.option("--tensorboard", is_flag=True,
              help="Write TensorBoard event files into RUN/tensorboard (losses, accuracy, lr, "
                   "and what the doctor's monitors saw); needs cifarlab[tensorboard].")
@click.option("--engine", type=click.Choice(["cifarlab", "keras"]), default="cifarlab",
              show_default=True, help="keras: train a Keras model with model.fit on cifarlab's "
              "batches (no doctor monitors, no weight averaging, whole epochs).")
def train(model: str, recipe: str | None, config_file: Path | None, from_study: Path | None,
          study_baseline: bool, data: Path | None,
          image_size: int | None, skip_bad: bool, runs_dir: Path, name: str | None,
          no_test: bool, quiet: bool, no_doctor: bool, tensorboard: bool, engine: str,
          **overrides: Any) -> None:
    """Train a model and write a run folder (config, weights, metrics, summary)."""
    from cifarlab.builders import require
    from cifarlab.callbacks import EpochTable
    from cifarlab.data import load_data
    from cifarlab.doctor import DoctorMonitor
    from cifarlab.runs import RunWriter, default_run_name
    from cifarlab.tblog import TensorBoardWriter
    from cifarlab.trainer import train as run_training

    if config_file is not None and from_study is not None:
        raise CifarlabError("Give --config or --from-study, not both.")
    if recipe is not None and (config_file is not None or from_study is not None):
        raise CifarlabError("--recipe starts from a model's recipe; --config and --from-study "
                            "bring their own. Give one of them.")
    if study_baseline and from_study is None:
        raise CifarlabError("--baseline goes with --from-study STUDY.")
    if from_study is not None:
        from cifarlab.tune import retrain_config

        chosen = retrain_config(from_study, baseline=study_baseline)
        cfg = chosen.config
        click.echo(f"retraining {chosen.reason}; on train + validation, "
                   f"{cfg.optim.epochs:g} epochs")
        name = name or f"{from_study.resolve().name}-" + (
            "baseline" if study_baseline else "best")
    else:
        cfg = _base_config(model, config_file, recipe)
    cfg = _with_options(cfg, data, image_size, skip_bad, overrides)
    require(cfg.model)
    run_dir = runs_dir / (name or default_run_name(cfg.model))
    writer = RunWriter(run_dir)  # refuses a finished run's folder before any work
    split = load_data(cfg.data)
    if engine == "keras":
        from cifarlab.kerasfit import train_with_keras as run_training  # type: ignore[assignment]

        if tensorboard:
            raise CifarlabError("--tensorboard goes with the cifarlab engine; with --engine "
                                "keras add Keras's own keras.callbacks.TensorBoard.")
        no_doctor = True  # its monitors hook the torch optimizer, which model.fit does not use
    monitor = None if no_doctor else DoctorMonitor(num_classes=len(split.classes))
    board = TensorBoardWriter(run_dir / "tensorboard", monitor) if tensorboard else None
    callbacks = [cb for cb in ([] if quiet else [EpochTable()]) + [monitor, board, writer] if cb]
    result = run_training(cfg, callbacks, data=split, evaluate_test=not no_test,
                          progress=not quiet)
    for label, loss, acc in (("val", result.val_loss, result.val_acc),
                             ("test", result.test_loss, result.test_acc)):
        if acc is not None:
            click.echo(f"{label}: loss {loss:.4f}  accuracy {acc * 100:.2f}%"
                       + (f" (tta={cfg.tta})" if cfg.tta else ""))
    click.echo(f"trained in {result.train_seconds:.1f} s ({result.precision}, {result.device})")
    if result.stopped_early:
        click.echo(f"stopped early: {result.stopped_early}")
    for f in result.extras.get("doctor", []):
        if f["severity"] in ("warning", "error", "critical"):
            click.echo(f"doctor: [{f['severity']}] {f['title']}: {f['message']} "
                       f"(fix: {f['fix']})")
    click.echo(f"run folder: {run_dir}")


def _base_config(model: str, config_file: Path | None, recipe: str | None = None) -> Any:
    """A config file's settings, or the model's recipe (its default, or the named one)."""
    from cifarlab.config import load_config_file
    from cifarlab.models import default_config

    if config_file is not None:
        return load_config_file(config_file)
    return default_config(model, recipe)


def _with_options(cfg: Any, data: Path | None, image_size: int | None, skip_bad: bool,
                  overrides: dict[str, Any]) -> Any:
    """The config with the command's options applied, each through the config's own checked
    path (``--lr`` sets ``optim.lr``), then validated."""
    model_args = _model_args(overrides.pop("model_arg", ()) or ())
    values = {k: v for k, v in overrides.items() if v is not None}
    if model_args:
        values["model_args"] = {**cfg.model_args, **model_args}
    if data is not None:
        values["data.source"] = str(data)
    if image_size is not None:
        values["data.image_size"] = image_size
    if skip_bad:
        values["data.skip_bad"] = True
    return cfg.with_values(values).validate()


# ------------------------------------------------------------------------------- doctor


@cli.command()
@click.option("--model", type=MODEL, default="airnet", show_default=True, help=MODEL_HELP)
@_model_arg_option
@click.option("--recipe", default=None, help="A named recipe of the model (`cifarlab models` "
              "lists them) [default: the model's default recipe].")
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="A config file: a run folder's config.json, or one you wrote "
                                 "in JSON, YAML or TOML.")
@_data_options
@click.option("--epochs", type=float, default=1.0, show_default=True,
              help="Monitored training run after the preflight checks (0: preflight only).")
@click.option("--val-size", type=int, default=None, help="Validation images taken from train "
              "(default 10% of it, at most 5000).")
@click.option("--train-fraction", type=float, default=None, help="Stratified subsample of train.")
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None, help="Learning rate per 1024 examples.")
@click.option("--weight-decay", type=float, default=None)
@click.option("--label-smoothing", type=float, default=None)
@click.option("--width", type=float, default=None, help="Width multiplier.")
@click.option("--seed", type=int, default=None)
@click.option("--no-behaviour", is_flag=True,
              help="Skip the behavioural tests (overfit one batch, label signal, LR range).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Write the report as JSON.")
@click.option("--html", "html_path", type=click.Path(path_type=Path), default=None,
              help="Write the report as one HTML page with plots.")
def doctor(model: str, recipe: str | None, config_file: Path | None, data: Path | None, image_size: int | None,
           skip_bad: bool, epochs: float, no_behaviour: bool, json_path: Path | None,
           html_path: Path | None, **overrides: Any) -> None:
    """Diagnose why a network is not learning: preflight checks on the data and the model,
    behavioural tests, then a monitored training run. Exit code 1 on an error (for CI)."""
    from cifarlab.builders import require
    from cifarlab.data import load_data
    from cifarlab.doctor import diagnose_config
    from cifarlab.doctor.html import render_html
    from cifarlab.files import atomic_write_text

    cfg = _with_options(_base_config(model, config_file, recipe), data, image_size, skip_bad,
                        overrides)
    require(cfg.model)
    report = diagnose_config(cfg, load_data(cfg.data), epochs=epochs,
                             behaviour=not no_behaviour)
    click.echo(report.to_text())
    if json_path is not None:
        atomic_write_text(json_path, report.to_json())
        click.echo(f"JSON report: {json_path}")
    if html_path is not None:
        atomic_write_text(html_path, render_html(report, f"cifarlab doctor: {cfg.model}"))
        click.echo(f"HTML report: {html_path}")
    sys.exit(report.exit_code())


# --------------------------------------------------------------------------------- tune


@cli.group(invoke_without_command=True)
@click.option("--name", default=None, help="Study name [default: the study folder's name].")
@click.option("--study-dir", type=click.Path(path_type=Path), default=None,
              help="Study folder [default: studies/<name>, or studies/study].")
@click.option("--space", "space_file", type=click.Path(path_type=Path), default=None,
              help="Search space file (.yaml, .yml or .toml) [default: the built-in space].")
@click.option("--model", type=MODEL, default=None,
              help="Fidelity: model [default: the space file's, or airnet]. " + MODEL_HELP)
@click.option("--epochs", type=float, default=None,
              help="Fidelity: epochs per trial [default: the space file's, or 2].")
@click.option("--train-fraction", type=float, default=None,
              help="Fidelity: fraction of the training split per trial [default: 0.25].")
@click.option("--trials", "n_trials", type=click.IntRange(1), default=20, show_default=True,
              help="Finished search trials the study aims for, over all workers (the baseline "
                   "and the --top-k re-evaluations come on top).")
@click.option("--target-epochs", type=float, default=None,
              help="The budget the answer is for: epochs on all training images. The baseline "
                   "and the search's best are trained there and the answer is chosen there "
                   "[default: the recipe's epochs].")
@click.option("--top-k", type=click.IntRange(1), default=2, show_default=True,
              help="Best search configurations re-evaluated at the target budget.")
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="A config file (JSON, YAML or TOML) the study starts from: "
                                 "its baseline, and the base of every trial [default: the "
                                 "model's recipe].")
@click.option("--metric", type=click.Choice(["calibrated-loss", "loss", "error"]), default=None,
              help="What the study minimises on validation: cross-entropy at its best "
                   "temperature (calibrated-loss; the default for a new study), plain "
                   "cross-entropy (loss), or 1 - accuracy (error) [default: the study's own "
                   "when resuming, else calibrated-loss].")
@click.option("--sampler", type=click.Choice(["gp", "tpe", "random", "freeze-thaw"]),
              default="gp", show_default=True,
              help="freeze-thaw: multi-fidelity; every trial trains at the target budget in "
                   "moves (to 1/9, 1/3, all of it), paused and continued from a checkpoint, "
                   "chosen by a learning-curve GP by expected improvement per second; "
                   "--trials then counts target budgets trained, and the fidelity options "
                   "(--epochs, --train-fraction) are not used.")
@click.option("--pruner", type=click.Choice(["none", "median", "asha", "hyperband"]),
              default=None, help="[default: median; none with --sampler freeze-thaw, which "
                                 "decides itself how far each trial trains]")
@click.option("--startup", type=click.IntRange(0), default=None,
              help="Random trials before the surrogate [default: max(4, min(10, trials/4))].")
@click.option("--storage", default=None,
              help="Database URL shared by workers, e.g. postgresql://user@host/db "
                   "[default: an SQLite file in the study folder].")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Worker processes on this machine.")
@click.option("--devices", default=None,
              help="Comma-separated devices, one worker each, e.g. cuda:0,cuda:1.")
@click.option("--timeout", type=float, default=None, help="Stop starting search trials after "
              "this many seconds, less the time the top-k target trials will take (as long as "
              "the baseline took each), so the answer is checked within it.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--heartbeat", type=click.IntRange(1), default=10, show_default=True,
              help="Seconds between a running trial's heartbeats; a trial silent for 3x this "
                   "belongs to a dead worker and is failed and retried.")
@_data_options
@click.option("--val-size", type=click.IntRange(1), default=None,
              help="Validation images taken from train [default: 10% of it, at most 5000].")
@click.option("-q", "--quiet", is_flag=True, help="No live table of trials.")
@click.option("--deterministic-objective", is_flag=True,
              help="The objective repeats exactly for a configuration: let the GP sampler take "
                   "trust-region steps (local searches around the best trial). Off by default: "
                   "a training run's validation loss is noisy, and a local step centred on a "
                   "lucky draw is wasted.")
@click.option("--tensorboard", is_flag=True,
              help="Write each trial's TensorBoard event files into STUDY/tensorboard/ "
                   "(trial-N, target-N); needs cifarlab[tensorboard].")
@click.pass_context
def tune(ctx: click.Context, name: str | None, study_dir: Path | None, space_file: Path | None,
         model: str | None, epochs: float | None, train_fraction: float | None, n_trials: int,
         target_epochs: float | None, top_k: int, config_file: Path | None, metric: str | None,
         sampler: str, pruner: str | None, startup: int | None, storage: str | None, workers: int,
         devices: str | None, timeout: float | None, seed: int, heartbeat: int,
         data: Path | None,
         image_size: int | None, skip_bad: bool, val_size: int | None, quiet: bool,
         deterministic_objective: bool, tensorboard: bool) -> None:
    """Find hyperparameters by Bayesian optimization of a validation loss (--metric).

    Runs a study (or resumes the one in --study-dir, or joins the one in --storage), prints a
    row per finished trial and a summary. The test split is never used. Subcommands:
    `tune report STUDY` (plots), `tune show STUDY` (summary).
    """
    if ctx.invoked_subcommand is not None:
        return
    from cifarlab.tune import TuneSettings, default_space, load_space, run_study, summarize

    study_dir = study_dir or Path("studies") / (name or "study")
    base = None
    if config_file is not None:
        from cifarlab.config import load_config_file

        base = load_config_file(config_file).validate()
        model = model or base.model
    if space_file is not None:
        space = load_space(space_file, model=model, epochs=epochs, train_fraction=train_fraction)
    elif model is None and epochs is None and train_fraction is None:
        space = None  # the study's own space when it exists (resume, join), else the built-in
    else:
        space = default_space(model or "airnet", epochs if epochs is not None else 2.0,
                              train_fraction if train_fraction is not None else 0.25)
    if space is not None:
        from cifarlab.builders import require

        require(space.fidelity.model)  # a Keras model without Keras: say so before any trial
    if sampler == "freeze-thaw" and pruner not in (None, "none"):
        click.echo(f"note: --pruner {pruner} is not used with --sampler freeze-thaw: it decides "
                   "itself how far each configuration trains, and continues paused ones.",
                   err=True)
    pruner = ("none" if sampler == "freeze-thaw" else "median") if pruner is None or (
        sampler == "freeze-thaw") else pruner
    cfg = _data_config(data, image_size, skip_bad)
    cfg.val_size = val_size
    settings = TuneSettings(
        study_dir=study_dir, study_name=name, storage=storage, n_trials=n_trials,
        sampler=sampler, noisy=not deterministic_objective, pruner=pruner, n_startup=startup,
        seed=seed, workers=workers,
        devices=[d.strip() for d in devices.split(",") if d.strip()] if devices else [],
        timeout=timeout, data=cfg, quiet=quiet, heartbeat_interval=heartbeat,
        grace_period=3 * heartbeat, target_epochs=target_epochs, top_k=top_k,
        base=None if base is None else base.to_dict(), tensorboard=tensorboard, metric=metric)
    study, interrupted = run_study(settings, space, announce=None if quiet else click.echo)
    for line in summarize(study).lines():
        click.echo(line)
    click.echo(f"study folder: {study_dir}")
    if interrupted:
        click.echo("stopped by Ctrl-C; run the same command again to resume", err=True)
        sys.exit(130)
    click.echo(f"next: cifarlab tune report {study_dir}   |   "
               f"cifarlab train --from-study {study_dir}")


@tune.command("show")
@click.argument("study", type=click.Path(path_type=Path))
@click.option("--storage", default=None, help="Override the storage URL in STUDY/study.json.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def tune_show(study: Path, storage: str | None, as_json: bool) -> None:
    """Summarize a study: trial counts, best trial, failure reasons."""
    from dataclasses import asdict

    from cifarlab.tune import open_study, summarize

    summary = summarize(open_study(study, storage))
    if as_json:
        click.echo(json.dumps(asdict(summary), indent=2))
    else:
        for line in summary.lines():
            click.echo(line)


@tune.command("report")
@click.argument("study", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output folder [default: STUDY/report].")
@click.option("--storage", default=None, help="Override the storage URL in STUDY/study.json.")
def tune_report(study: Path, out: Path | None, storage: str | None) -> None:
    """Write PNG and HTML plots: history, parallel coordinates, importances, surrogate."""
    from cifarlab.tune.report import write_report

    files = write_report(study, out or study / "report", storage)
    for f in files:
        click.echo(str(f))


# -------------------------------------------------------------------------------- serve


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True,
              help="Server processes, each with its own model, batcher and cache; reloads "
                   "reach all of them and /metrics sums them.")
@click.option("--model-name", default=None,
              help="The name KServe v2 clients use; it stays across reloads [default: the "
                   "run's model, e.g. airnet].")
@click.option("--max-batch", type=click.IntRange(1), default=64, show_default=True,
              help="Most images in one forward pass (1 turns micro-batching off).")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=2.0, show_default=True,
              help="Under load, how long a partial batch waits for more (never when idle).")
@click.option("--max-queue", type=click.IntRange(1), default=1024, show_default=True,
              help="Images waiting for a forward pass; also the most images one request may "
                   "carry (413 beyond). A request that does not fit now gets 503.")
@click.option("--cache-size", type=click.IntRange(0), default=10_000, show_default=True,
              help="Predictions cached by SHA-256 of the upload and model version (LRU).")
@click.option("--max-upload-mb", type=click.FloatRange(0, min_open=True), default=10.0,
              show_default=True, help="Largest request body; bigger ones get 413.")
@click.option("--max-inflight-upload-mb", type=click.FloatRange(0, min_open=True),
              default=256.0, show_default=True,
              help="Memory for all request bodies at once; requests beyond it wait unread.")
@click.option("--max-files", type=click.IntRange(1), default=64, show_default=True,
              help="Most files in one /v1/predict request (413 beyond).")
@click.option("--max-pixels", type=click.IntRange(1), default=40_000_000, show_default=True,
              help="Most pixels in one image, read from its header before decoding (413).")
@click.option("--max-decode-mb", type=click.FloatRange(0, min_open=True), default=512.0,
              show_default=True,
              help="Memory for decoding images (and parsing large v2 JSON) across all "
                   "requests at once; decodes beyond it wait.")
@click.option("--max-request-decode-mb", type=click.FloatRange(0, min_open=True),
              default=256.0, show_default=True,
              help="Decode memory one request's images may need together (413 beyond).")
@click.option("--decode-threads", type=click.IntRange(0), default=0, show_default=True,
              help="Threads that decode large images (0: one per core).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              show_default=True)
@click.option("--tta", type=click.IntRange(0, 2), default=None,
              help="Test-time augmentation per image (0 none, 1 mirror, 2 + translations) "
                   "[default: the run's, the one its test accuracy was measured with].")
@click.option("--runs-root", type=click.Path(path_type=Path), default=None,
              help="Folder whose run folders POST /v1/reload may load [default: RUN's parent].")
@click.option("--admin-token", envvar="CIFARLAB_ADMIN_TOKEN", default=None,
              help="Token that POST /v1/reload requires (Authorization: Bearer TOKEN); reload "
                   "is off without one. Also read from $CIFARLAB_ADMIN_TOKEN.")
@click.option("--max-header-kb", type=click.FloatRange(1), default=16.0, show_default=True,
              help="Largest request head (request line and headers); 431 beyond.")
@click.option("--max-headers", type=click.IntRange(1), default=100, show_default=True,
              help="Most header fields in a request; 431 beyond.")
@click.option("--keep-alive", type=click.FloatRange(0.1), default=5.0, show_default=True,
              help="Seconds an idle connection (also one that never sent a request) stays open.")
@click.option("--header-timeout", type=click.FloatRange(0.1), default=10.0, show_default=True,
              help="Seconds a request's headers may take to arrive; 408 beyond.")
@click.option("--max-connections", type=click.IntRange(1), default=1024, show_default=True,
              help="Open connections per worker; beyond it, uvicorn answers 503.")
def serve(run: Path, host: str, port: int, workers: int, model_name: str | None,
          max_batch: int, max_wait_ms: float, max_queue: int, cache_size: int,
          max_upload_mb: float, max_inflight_upload_mb: float, max_files: int, max_pixels: int,
          max_decode_mb: float, max_request_decode_mb: float, decode_threads: int,
          precision: str, tta: int | None, runs_root: Path | None, admin_token: str | None,
          max_header_kb: float, max_headers: int, keep_alive: float, header_timeout: float,
          max_connections: int) -> None:
    """Serve a run folder: a web page at / and a REST API (/v1/predict, KServe v2, /metrics)."""
    import os
    import tempfile

    import uvicorn

    from cifarlab.builders import display_name
    from cifarlab.runs import read_run
    from cifarlab.serve.app import create_app
    from cifarlab.serve.protocol import guarded_protocol
    from cifarlab.serve.settings import ENV_SETTINGS, ServeSettings, settings_json

    # A bad run folder fails here, with its message, before the port is bound. Only the config
    # and summary are read: the server loads the weights once, on its forward thread.
    loaded = read_run(run)
    mib = 2**20
    if max_request_decode_mb > max_decode_mb:
        raise CifarlabError(f"--max-request-decode-mb ({max_request_decode_mb:g}) cannot be "
                            f"more than --max-decode-mb ({max_decode_mb:g}).")
    settings = ServeSettings(
        run=str(run.resolve()), runs_root=str(runs_root.resolve()) if runs_root else None,
        model_name=model_name or display_name(loaded.config.model), max_batch=max_batch,
        max_wait_ms=max_wait_ms, max_queue=max_queue, cache_size=cache_size,
        max_upload_bytes=int(max_upload_mb * mib),
        max_inflight_upload_bytes=int(max_inflight_upload_mb * mib), max_files=max_files,
        max_pixels=max_pixels, max_decode_bytes=int(max_decode_mb * mib),
        max_request_decode_bytes=int(max_request_decode_mb * mib),
        decode_threads=decode_threads, precision=precision, tta=tta, admin_token=admin_token,
        max_header_bytes=int(max_header_kb * 1024), max_headers=max_headers,
        header_timeout=header_timeout, keep_alive=keep_alive, max_connections=max_connections)
    limits: dict[str, Any] = dict(host=host, port=port, log_level="warning",
                                  timeout_keep_alive=keep_alive)
    click.echo(f"serving {run} at http://{host}:{port}/  (Ctrl-C stops)")
    if workers == 1:
        protocol = guarded_protocol(settings.max_header_bytes, max_headers, header_timeout,
                                    max_connections)
        uvicorn.run(create_app(settings), http=protocol, **limits)
        return
    with tempfile.TemporaryDirectory(prefix="cifarlab-serve-") as shared:
        # every worker polls state/ for reloads and writes its metrics to metrics/
        settings.state_dir = os.path.join(shared, "state")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(shared, "metrics")
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"])
        os.environ[ENV_SETTINGS] = settings_json(settings)
        uvicorn.run("cifarlab.serve.app:app_from_env", factory=True, workers=workers,
                    http="cifarlab.serve.protocol:FromEnv", **limits)


# ----------------------------------------------------------------------- evaluate / predict


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@_data_options
@click.option("--split", type=click.Choice(["test", "train"]), default="test", show_default=True)
@click.option("--tta", type=click.IntRange(0, 2), default=None, help="Default: the run's.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              show_default=True, help="Inference precision (fp32: the same numbers as predict "
                                      "and serve give).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def evaluate(run: Path, data: Path | None, image_size: int | None, skip_bad: bool, split: str,
             tta: int | None, precision: str, device: str, as_json: bool) -> None:
    """Evaluate a run folder on a dataset's test (or train) split."""
    from cifarlab.data import prepare
    from cifarlab.infer import Predictor
    from cifarlab.runs import load_run

    loaded = load_run(run)
    predictor = Predictor.from_run(loaded, tta=tta, precision=precision, device=device)
    source = str(data) if data else loaded.config.data.source
    prepared = prepare(source, _data_config(None, image_size or predictor.image_size, skip_bad))
    out = predictor.evaluate(prepared.test if split == "test" else prepared.train)
    out["split"] = split
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"{run}: {split} loss {out['loss']:.4f}  accuracy "
                   f"{out['accuracy'] * 100:.2f}% on {out['images']} images (tta={out['tta']})")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compare(runs: tuple[Path, ...], as_json: bool) -> None:
    """Runs side by side: test accuracy, training time, and the settings that differ."""
    from cifarlab.runs import config_differences, read_run

    infos = [read_run(r) for r in runs]
    keys = config_differences(infos)
    rows: list[dict[str, Any]] = [
        {"run": str(i.path), "test_acc": i.summary.get("test_acc"), "tta": i.tta,
         "val_acc": i.summary.get("val_acc"), "train_seconds": i.summary.get("train_seconds"),
         "differs": {k: i.config.get(k) for k in keys}} for i in infos]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    width = max(len(r["run"]) for r in rows)
    click.echo(f"{'run':<{width}}  {'test acc':>9}  {'tta':>3}  {'train s':>8}  differs")
    for r in rows:
        acc = "-" if r["test_acc"] is None else f"{r['test_acc'] * 100:.2f}%"
        secs = "-" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}"
        diff = " ".join(f"{k.split('.')[-1]}={_short(v)}" for k, v in r["differs"].items())
        click.echo(f"{r['run']:<{width}}  {acc:>9}  {r['tta']:>3}  {secs:>8}  {diff}")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-k", "--top-k", type=click.IntRange(1), default=5, show_default=True)
@click.option("--tta", type=click.IntRange(0, 2), default=None, help="Default: the run's.")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32",
              show_default=True)
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: the same shape as the server's POST /v1/predict.")
def predict(run: Path, images: tuple[Path, ...], top_k: int, tta: int | None, precision: str,
            as_json: bool) -> None:
    """Print the top-k classes of image files (any common format and size)."""
    from cifarlab.infer import Predictor

    for img in images:
        if not img.is_file():
            raise CifarlabError(f"{img}: no such image file.")
    out = Predictor.from_run(run, tta=tta, precision=precision).predict_files(list(images),
                                                                              top_k)
    if as_json:
        click.echo(json.dumps(out, indent=2))
        return
    for r in out["predictions"]:
        tops = "  ".join(f"{t['class']} {t['probability'] * 100:5.1f}%" for t in r["top"])
        click.echo(f"{r['filename']}: {tops}")


# ------------------------------------------------------------------------------------ data


@cli.group()
def data() -> None:
    """Inspect and export datasets."""


@data.command("info")
@_data_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def data_info(data: Path | None, image_size: int | None, skip_bad: bool, as_json: bool) -> None:
    """Counts per class, image size, per-channel mean and std (of the train split)."""
    from cifarlab.data import channel_stats, prepare

    p = prepare(None, _data_config(data, image_size, skip_bad))
    mean, std = channel_stats(p.train.images)
    info = {
        "source": p.source,
        "data_sha256": p.data_sha256,
        "image_size": list(p.train.images.shape[1:]),
        "classes": p.train.classes,
        "train_counts": p.train.class_counts(),
        "test_counts": p.test.class_counts(),
        "mean": mean,
        "std": std,
        "skipped": p.skipped,
    }
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    h, w, c = info["image_size"]
    click.echo(f"source: {p.source}\nsha256: {p.data_sha256}\nimages: {h}x{w}x{c}, "
               f"{len(p.train)} train, {len(p.test)} test")
    click.echo(f"{'class':<16}{'train':>8}{'test':>8}")
    for name, a, b in zip(p.train.classes, info["train_counts"], info["test_counts"], strict=True):
        click.echo(f"{name:<16}{a:>8}{b:>8}")
    click.echo("mean (R,G,B): " + ", ".join(f"{v:.4f}" for v in mean))
    click.echo("std  (R,G,B): " + ", ".join(f"{v:.4f}" for v in std))
    for s in p.skipped:
        click.echo(f"skipped: {s}")


@data.command("export")
@_data_options
@click.option("--to", "to", required=True, type=click.Path(path_type=Path),
              help="Folder to write train/<class>/*.png and test/<class>/*.png into.")
def data_export(data: Path | None, image_size: int | None, skip_bad: bool, to: Path) -> None:
    """Write every image as PNG in class folders."""
    from cifarlab.data import export_png, prepare

    p = prepare(None, _data_config(data, image_size, skip_bad))
    n = export_png(p, to)
    click.echo(f"wrote {n} PNG files under {to}")


@data.command("dupes")
@_data_options
@click.option("--by", type=click.Choice(["pixels", "files"]), default="pixels", show_default=True,
              help="Compare SHA-256 of decoded pixels, or of the source files' bytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--show", type=int, default=10, show_default=True,
              help="How many groups of each kind to list in the text report.")
def data_dupes(data: Path | None, image_size: int | None, skip_bad: bool, by: str,
               as_json: bool, show: int) -> None:
    """Exact duplicates within each split and test images that also appear in train."""
    from cifarlab.data import prepare
    from cifarlab.dupes import find_duplicates

    report = find_duplicates(prepare(None, _data_config(data, image_size, skip_bad)), by=by)
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    s = report["summary"]
    click.echo(f"source: {report['source']}  (compared by SHA-256 of {by})")
    click.echo(f"train: {s['train_duplicate_groups']} groups of identical images; "
               f"test: {s['test_duplicate_groups']}; test images also in train: "
               f"{s['test_images_in_train']}; groups with conflicting labels: "
               f"{s['groups_with_conflicting_labels']}")
    for split in ("train", "test"):
        for g in report["within"][split][:show]:
            click.echo(f"  {split} duplicates: " + ", ".join(f"{e['file']} ({e['label']})"
                                                          for e in g))
    for leak in report["across"][:show]:
        click.echo(f"  leak: test {leak['test']} ({leak['test_label']}) = train "
                   + ", ".join(leak["train"]))
    click.echo(f"note: {report['note']}")


@cli.command("models")
def models_cmd() -> None:
    """List the registered models (and the other forms --model takes)."""
    from cifarlab.models import get_spec, list_models

    for name in list_models():
        spec = get_spec(name)
        click.echo(f"{name:<12} {spec.description}  [recipes: {', '.join(spec.recipes)}]")
    click.echo("also: --model FILE.keras (a saved Keras model), --model FILE.py:function or "
               "package.module:function (a builder returning a Keras model or a torch module; "
               "needs cifarlab[keras] for Keras)")


# ------------------------------------------------------------------------------- export


@cli.command()
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["keras", "onnx"]), required=True,
              help="keras: a .keras file plain Keras loads (Keras models); onnx: through "
                   "torch.onnx (needs cifarlab[onnx]).")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output file [default: RUN/model.keras or RUN/model.onnx].")
def export(run: Path, fmt: str, out: Path | None) -> None:
    """Write a trained run as a file other tools load. It takes RGB pixels in 0..255 at the
    run's image size (N×H×W×3 for Keras, N×3×H×W for ONNX) and returns class probabilities;
    the run's normalization is inside. No test-time augmentation (as `predict --tta 0`)."""
    from cifarlab.export import export_run

    path = export_run(run, fmt, out)
    click.echo(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become a message and a non-zero exit, never a traceback."""
    try:
        cli.main(args=argv, prog_name="cifarlab", standalone_mode=False)
    except CifarlabError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
