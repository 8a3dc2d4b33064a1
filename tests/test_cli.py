"""The CLI end to end: the installed console script in a subprocess, plus in-process calls."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from helpers import call, run_cli, write_tree


@pytest.mark.parametrize("cmd", [[], ["train"], ["evaluate"], ["predict"], ["data"],
                                 ["data", "info"], ["data", "export"], ["models"], ["tune"],
                                 ["tune", "report"], ["tune", "show"], ["doctor"],
                                 ["serve"]])
def test_every_command_has_help(capsys, cmd):
    code, out, _ = call(capsys, *cmd, "--help")
    assert code == 0 and "Usage:" in out


@pytest.mark.slow
def test_train_evaluate_predict_end_to_end(learnable, tmp_path):
    r = run_cli("train", "--data", str(learnable), "--width", "0.25", "--epochs", "4",
                "--batch-size", "64", "--val-size", "40", "--precision", "fp32", "--tta", "1",
                "--name", "e2e", "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["epoch", "step", "train_loss", "val_loss", "val_acc",
                                "seconds", "img/s"]
    assert sum(1 for line in lines if line.strip()[:1].isdigit()) == 4  # one row per epoch
    assert "test: loss" in r.stdout and f"run folder: {tmp_path / 'runs' / 'e2e'}" in r.stdout
    run = tmp_path / "runs" / "e2e"

    r = run_cli("evaluate", str(run), "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    summary = json.loads((run / "summary.json").read_text())
    assert ev["accuracy"] == pytest.approx(summary["test_acc"])

    img = tmp_path / "x.webp"
    from cifarlab.data import prepare

    Image.fromarray(prepare(str(learnable)).test.images[0]).resize((50, 40)).save(img)
    r = run_cli("predict", str(run), str(img), "-k", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{img}: ") and r.stdout.count("%") == 2

    r = run_cli("predict", str(run), str(tmp_path / "missing.png"))
    assert r.returncode != 0 and "missing.png: no such image file" in r.stderr

    (tmp_path / "notimage.png").write_text("hello")
    r = run_cli("predict", str(run), str(tmp_path / "notimage.png"))
    assert r.returncode == 3 and "notimage.png: not a readable image" in r.stderr
    assert "Traceback" not in r.stderr

    # --config reuses a run's config; a finished run folder is never overwritten
    r = run_cli("train", "--config", str(run / "config.json"), "--epochs", "0.2", "--name",
                "e2e", "--runs-dir", str(tmp_path / "runs"), "-q")
    assert r.returncode != 0 and "already holds a finished run" in r.stderr
    assert json.loads((run / "summary.json").read_text()) == summary

    # compare: the runs side by side, with the settings where they differ
    r = run_cli("train", "--config", str(run / "config.json"), "--epochs", "1", "--lr", "0.5",
                "--name", "other", "--runs-dir", str(tmp_path / "runs"), "-q")
    assert r.returncode == 0, r.stderr
    r = run_cli("compare", str(run), str(tmp_path / "runs" / "other"), "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert rows[0]["test_acc"] == pytest.approx(summary["test_acc"])
    assert rows[0]["differs"] == {"optim.epochs": 4.0, "optim.lr": run_lr(run)}
    assert rows[1]["differs"] == {"optim.epochs": 1.0, "optim.lr": 0.5}
    r = run_cli("compare", str(run), str(tmp_path / "runs" / "nope"))
    assert r.returncode == 4 and "no such run folder" in r.stderr


def run_lr(run) -> float:
    return json.loads((run / "config.json").read_text())["optim"]["lr"]


def test_data_info_and_export(tree, tmp_path, capsys):
    code, out, _ = call(capsys, "data", "info", "--data", str(tree), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["train_counts"] == [12, 12, 12, 12] and info["image_size"] == [32, 32, 3]
    assert len(info["mean"]) == 3 and all(0 < s < 1 for s in info["std"])
    code, out, _ = call(capsys, "data", "info", "--data", str(tree))
    assert code == 0 and "circle" in out and "mean (R,G,B)" in out
    code, out, _ = call(capsys, "data", "export", "--data", str(tree), "--to", str(tmp_path / "o"))
    assert code == 0 and "wrote 64 PNG files" in out
    assert len(list((tmp_path / "o" / "test").rglob("*.png"))) == 16


def test_user_errors_are_clean_messages(tmp_path, capsys):
    code, _, err = call(capsys, "data", "info", "--data", str(tmp_path / "nowhere"))
    assert code == 3 and "nowhere: no such file or folder" in err
    code, _, err = call(capsys, "train", "--model", "vgg")
    assert code == 2 and "Unknown model 'vgg'" in err and "a .keras file, or a builder" in err
    code, _, err = call(capsys, "evaluate", str(tmp_path))
    assert code == 4 and "missing config.json" in err
    code, _, err = call(capsys, "train", "--data", str(tmp_path), "--epochs", "-1")
    assert code == 2 and "optim.epochs must be > 0" in err


def test_models_command(capsys):
    code, out, _ = call(capsys, "models")
    assert code == 0 and out.split()[0] == "airnet"


@pytest.mark.slow
def test_doctor_cli_writes_json_and_html_and_sets_the_exit_code(capsys, learnable, tmp_path):
    args = ["--width", "0.25", "--epochs", "1", "--val-size", "40", "--batch-size", "64"]
    code, out, err = call(capsys, "doctor", "--data", str(learnable), *args,
                          "--json", str(tmp_path / "d.json"), "--html", str(tmp_path / "d.html"))
    assert code == 0, out + err
    report = json.loads((tmp_path / "d.json").read_text())
    assert "cannot-overfit" in report["checks_run"] and "plateau" in report["checks_run"]
    assert not [f for f in report["findings"] if f["severity"] in ("error", "critical")]
    page = (tmp_path / "d.html").read_text()
    assert "data:image/png;base64," in page and "https://" not in page  # offline, with plots
    assert "checks run" in out
    # test images copied from train: a leak is an error, so exit code 1
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (40, 32, 32, 3), np.uint8)
    labels = np.repeat(np.arange(2), 20)
    write_tree(tmp_path / "tree", images, labels, "train", classes=["a", "b"])
    write_tree(tmp_path / "tree", images[::5], labels[::5], "test", classes=["a", "b"])
    code, out, _ = call(capsys, "doctor", "--data", str(tmp_path / "tree"), "--epochs", "0",
                        "--no-behaviour", "--val-size", "10")
    assert code == 1 and "train-test-leak" in out, out
