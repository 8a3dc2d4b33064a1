"""Loading run folders into the server, at start-up and on ``POST /v1/reload``, in one worker or
in every worker of ``--workers N``.

With one worker, the state is in memory. With several (``settings.state_dir`` set, a folder the
CLI creates for the server's lifetime), a reload writes the wanted run, with a generation
number, to ``target.json``; every worker polls that file, loads the run on its forward thread,
swaps it in and writes what it did to ``workers/<pid>.json``. ``GET /v1/reload`` (on any worker)
reads them all: the reload is ``loaded`` only when every live worker serves the new weights, so
after it completes no answer comes from the old version, whichever worker answers. A worker that
starts later (uvicorn restarts a dead one) loads the current target, not the start-up run.

Messages name runs relative to the runs root; no absolute path leaves the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.errors import CifarlabError
from cifarlab.files import atomic_write_text
from cifarlab.infer import Predictor
from cifarlab.serve.errors import ApiError
from cifarlab.serve.state import ServerState

__all__ = ["Reloads", "resolve_run"]

log = logging.getLogger(__name__)
POLL_SECONDS = 0.05


def resolve_run(runs_root: Path, run: str) -> Path:
    """The run folder ``run`` names (relative to the runs root, or absolute inside it); 400 for
    a malformed name, 403 outside the root. Errors never show the root's path."""
    if not run or "\x00" in run or len(run) > 4096:
        raise ApiError(400, "'run' must be a run folder's name under the runs root (no NUL "
                            "bytes, at most 4096 characters).")
    try:
        path = (runs_root / run).resolve() if not Path(run).is_absolute() \
            else Path(run).resolve()
    except (OSError, ValueError, RuntimeError):
        raise ApiError(400, f"{run!r} is not a usable path.") from None
    if not path.is_relative_to(runs_root) or path == runs_root:
        raise ApiError(403, f"{run!r}: only run folders under the server's runs root can be "
                            "loaded (`cifarlab serve --runs-root`).")
    return path


def _load_predictor(path: str, precision: str, tta: int | None) -> Predictor:
    """The run folder, loaded once, with one warm-up forward pass."""
    predictor = Predictor.from_run(path, tta=tta, precision=precision)
    predictor.probabilities(np.zeros((1, predictor.image_size, predictor.image_size, 3),
                                     np.uint8))
    return predictor


class Reloads:
    def __init__(self, state: ServerState):
        self.state = state
        self.root = state.runs_root
        d = state.settings.state_dir
        self.dir = Path(d) if d else None
        self.generation = 0
        self.local: dict[str, Any] = {"state": "idle"}
        self._poller: asyncio.Task[None] | None = None
        self._loading: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------- names

    def _name(self, path: str | Path) -> str:
        p = Path(path)
        return str(p.relative_to(self.root)) if p.is_relative_to(self.root) else p.name

    def _clean(self, message: str) -> str:
        return message.replace(str(self.root) + os.sep, "").replace(str(self.root), "<runs-root>")

    # ------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        run, generation = self.state.settings.run, 0
        if self.dir is not None:
            (self.dir / "workers").mkdir(parents=True, exist_ok=True)
            target = self._target()
            if target:
                run, generation = target["run"], target["generation"]
        await self._load(run, generation)
        if self.dir is not None:
            self._poller = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        for task in (self._poller, self._loading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.dir is not None:
            (self.dir / "workers" / f"{os.getpid()}.json").unlink(missing_ok=True)

    async def _load(self, run: str, generation: int) -> None:
        s = self.state.settings
        name = self._name(run)
        self._report({"state": "loading", "run": name, "generation": generation})
        try:
            # on the forward thread (see MicroBatcher.run); requests queued meanwhile wait
            model = await self.state.batcher.run(_load_predictor, run, s.precision, s.tta)
        except CifarlabError as exc:
            self._report({"state": "failed", "run": name, "generation": generation,
                          "error": self._clean(str(exc))})
            log.error("cannot load %s: %s", run, exc)
            return
        except Exception as exc:
            self._report({"state": "failed", "run": name, "generation": generation,
                          "error": self._clean(f"{type(exc).__name__}: {exc}")})
            log.exception("cannot load %s", run)
            return
        self.state.set_model(model)
        self._report({"state": "loaded", "run": name, "generation": generation,
                      "version": model.version})

    def _report(self, status: dict[str, Any]) -> None:
        self.generation = status["generation"]
        self.local = status
        if self.dir is not None:
            atomic_write_text(self.dir / "workers" / f"{os.getpid()}.json",
                              json.dumps({**status, "pid": os.getpid(), "time": time.time()}))

    # ------------------------------------------------------------------------ requests

    async def request(self, run: str) -> dict[str, Any]:
        """Start loading ``run`` (in every worker); 202's body."""
        path = resolve_run(self.root, run)
        if self.status()["state"] == "loading":
            raise ApiError(409, "A reload is already in progress; see GET /v1/reload.")
        generation = max(self.generation, (self._target() or {}).get("generation", 0)) + 1
        if self.dir is not None:
            atomic_write_text(self.dir / "target.json",
                              json.dumps({"run": str(path), "generation": generation}))
            self._report({"state": "loading", "run": self._name(path),
                          "generation": generation})  # the poller loads it
        else:
            self._report({"state": "loading", "run": self._name(path), "generation": generation})
            self._loading = asyncio.create_task(self._load(str(path), generation))
        return self.status()

    def status(self) -> dict[str, Any]:
        """The last reload's state across every live worker: ``loading`` until all are done."""
        if self.dir is None:
            return dict(self.local)
        target = self._target()
        workers = self._workers()
        if not target:
            states = {w["state"] for w in workers} or {self.local["state"]}
            return {"state": "loading" if "loading" in states else "idle",
                    "workers": len(workers)}
        g = target["generation"]
        done = [w for w in workers if w.get("generation") == g and w["state"] != "loading"]
        failed = [w for w in done if w["state"] == "failed"]
        out: dict[str, Any] = {"run": self._name(target["run"]), "generation": g,
                               "workers": len(workers), "done": len(done)}
        if len(done) < len(workers):
            out["state"] = "loading"
        elif failed:
            out.update(state="failed", error=failed[0].get("error", ""))
        else:
            out.update(state="loaded", version=done[0].get("version") if done else None)
        return out

    # ------------------------------------------------------------------- shared state

    def _target(self) -> dict[str, Any] | None:
        if self.dir is None:
            return None
        try:
            data = json.loads((self.dir / "target.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and "run" in data else None

    def _workers(self) -> list[dict[str, Any]]:
        assert self.dir is not None
        out = []
        for f in (self.dir / "workers").glob("*.json"):
            try:
                w = json.loads(f.read_text())
                os.kill(int(w["pid"]), 0)  # alive? (a dead worker's file is left behind)
            except ProcessLookupError:
                f.unlink(missing_ok=True)
                continue
            except (OSError, ValueError, KeyError):
                continue
            out.append(w)
        return out

    async def _poll(self) -> None:
        while True:
            target = self._target()
            if (target and target["generation"] > self.generation) or (
                    target and target["generation"] == self.generation
                    and self.local["state"] == "loading"):
                await self._load(target["run"], target["generation"])
            await asyncio.sleep(POLL_SECONDS)
