"""Pause and resume a training run: the trainer's whole state in a folder.

A checkpoint holds everything the rest of the run reads: the model's weights and buffers, the
optimizer's per-parameter state and groups, the schedule's position, the loader's random stream
and epoch count, torch's global random stream, whether weight averaging had started, and the
history so far. Taken inside an epoch, it also holds how many of the epoch's batches were done
(the loader's stream is then the one from the epoch's start, so the epoch's order and
augmentation are drawn again identically) and the averaged weights, which inside an epoch differ
from the net's. Continued with the same config, a run
gives the same weights as one that ran straight through (bitwise on the CPU; tested).

On disk (no pickle anywhere):

* ``state.json``: the config, counters, history, optimizer groups, schedule state, and the
  name and SHA-256 of the tensors file;
* ``tensors-<step>.safetensors``: every tensor, by name (``model.*``, ``optim.<i>.<key>``,
  ``rng.*``).

The tensors file is written first under a new name, then ``state.json`` is replaced
atomically: that rename is the commit, so a crash leaves the previous checkpoint whole. Older
tensors files are removed after it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cifarlab.config import TrainConfig, flatten
from cifarlab.errors import ConfigError, RunError
from cifarlab.files import atomic_write, atomic_write_text

__all__ = ["STATE_FILE", "Checkpoint", "load_checkpoint", "save_checkpoint"]

STATE_FILE = "state.json"
VERSION = 1


@dataclass
class Checkpoint:
    """The trainer's state after ``epoch`` epochs (``step`` optimizer steps)."""

    config: dict[str, Any]
    epoch: int
    step: int
    train_seconds: float
    history: list[dict[str, Any]]
    averaging: bool  # weight averaging (lookahead) had started
    loader_epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch's Optimizer.state_dict() layout
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # "torch", "loader"
    in_epoch: int = 0  # batches of epoch ``epoch`` (0-based) already done; 0 at a boundary
    averaged: dict[str, torch.Tensor] | None = None  # lookahead's weights, inside an epoch


def save_checkpoint(folder: Path, ck: Checkpoint) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for k, v in ck.model.items():
        tensors[f"model.{k}"] = v.detach()
    optim_state: dict[str, dict[str, Any]] = {}
    for idx, entries in ck.optimizer["state"].items():
        plain: dict[str, Any] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value.detach()
                plain[key] = {"tensor": f"optim.{idx}.{key}"}
            else:
                plain[key] = value
        optim_state[str(idx)] = plain
    for k, v in ck.rng.items():
        tensors[f"rng.{k}"] = v
    for k, v in (ck.averaged or {}).items():
        tensors[f"avg.{k}"] = v.detach()
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}
    name = f"tensors-{ck.step}.safetensors"
    atomic_write(folder / name, lambda tmp: save_file(tensors, str(tmp)))
    state = {
        "version": VERSION, "config": ck.config, "epoch": ck.epoch, "step": ck.step,
        "train_seconds": ck.train_seconds, "history": ck.history, "averaging": ck.averaging,
        "loader_epoch": ck.loader_epoch, "optimizer": {
            "state": optim_state, "param_groups": ck.optimizer["param_groups"]},
        "scheduler": ck.scheduler, "rng": sorted(ck.rng), "in_epoch": ck.in_epoch,
        "averaged": ck.averaged is not None,
        "tensors": name, "tensors_sha256": _sha256(folder / name),
    }
    atomic_write_text(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")
    for old in folder.glob("tensors-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(folder: Path, config: TrainConfig) -> Checkpoint | None:
    """The checkpoint in ``folder`` (None if it holds none), checked against ``config``: a
    run continues only with the config it started with (the device aside)."""
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
        name = state["tensors"]
        if state.get("version") != VERSION:
            raise RunError(f"{path}: checkpoint version {state.get('version')!r}; this "
                           f"cifarlab reads version {VERSION}.")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunError(f"{path}: damaged checkpoint ({exc}); delete {folder} to start the run "
                       "again.") from None
    tensors_path = folder / name
    if not tensors_path.is_file() or _sha256(tensors_path) != state.get("tensors_sha256"):
        raise RunError(f"{tensors_path}: missing or not the file {path} was written with; "
                       f"delete {folder} to start the run again.")
    _check_same_config(path, state["config"], config)
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError) as exc:
        raise RunError(f"{tensors_path}: unreadable ({exc}).") from None
    optim_state: dict[int, dict[str, Any]] = {}
    for idx, entries in state["optimizer"]["state"].items():
        optim_state[int(idx)] = {
            key: tensors[v["tensor"]] if isinstance(v, dict) and "tensor" in v else v
            for key, v in entries.items()}
    return Checkpoint(
        config=state["config"], epoch=int(state["epoch"]), step=int(state["step"]),
        train_seconds=float(state["train_seconds"]), history=state["history"],
        averaging=bool(state["averaging"]), loader_epoch=int(state["loader_epoch"]),
        model={k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
        optimizer={"state": optim_state, "param_groups": state["optimizer"]["param_groups"]},
        scheduler=state["scheduler"],
        rng={k: tensors[f"rng.{k}"] for k in state["rng"]},
        in_epoch=int(state.get("in_epoch", 0)),
        averaged=({k[len("avg."):]: v for k, v in tensors.items() if k.startswith("avg.")}
                  if state.get("averaged") else None),
    )


def _check_same_config(path: Path, stored_raw: dict[str, Any], config: TrainConfig) -> None:
    stored, ours = flatten(stored_raw), flatten(config.to_dict())
    diffs = [k for k in sorted(set(stored) | set(ours))
             if k != "device" and stored.get(k) != ours.get(k)]
    if diffs:
        detail = "; ".join(f"{k}: {stored.get(k)!r} there, {ours.get(k)!r} here"
                           for k in diffs[:3])
        raise ConfigError(f"{path} was written by a run with another config ({detail}); "
                          "continue it with the same config, or start a new run elsewhere.")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
