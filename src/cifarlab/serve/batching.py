"""Micro-batching: concurrent requests share one forward pass.

A dedicated forward thread (the scheduler, as in Triton's dynamic batcher) takes every request
already queued, up to ``max_batch``, runs one forward pass, hands the results back to the event
loop and goes straight on to the next batch. It never waits for the event loop, so under load the
model is busy while the loop parses requests and writes responses. An idle server answers at
once: a lone request never waits for company. ``max_wait`` only applies under load: when a batch
has more than one request but is not full, the thread waits up to ``max_wait`` seconds for more.
The queue is bounded; a full queue raises :class:`QueueFull`, which the app turns into 503.

Each request carries the model it was admitted under, and a batch never mixes models, so a
reload cannot change the answer to a request that is already queued.

All of the server's torch work runs on this one thread (:meth:`MicroBatcher.run` loads models
there too): every thread that runs torch ops gets its own OpenMP team, and on a small CPU the
teams of other threads slow the forward pass (measured on 2 cores: 5.5 ms instead of 3.6 ms for
one image).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LRUCache", "MicroBatcher", "QueueFull"]


class QueueFull(Exception):
    """The batcher's queue is at its bound."""


@dataclass
class _Item:
    image: np.ndarray  # H×W×3 uint8
    model: Any  # the Predictor the request was admitted under
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Job:
    """A call to run on the forward thread (model loading)."""

    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]


_STOP = object()


class MicroBatcher:
    """Groups concurrent :meth:`submit` calls into batched ``model.forward`` calls."""

    def __init__(self, max_batch: int = 64, max_wait: float = 0.002, max_queue: int = 1024,
                 on_batch: Callable[[int, list[float]], None] | None = None,
                 on_forward: Callable[[float], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.on_batch = on_batch  # (batch size, queue seconds of each item), forward thread
        self.on_forward = on_forward  # seconds of each forward pass, forward thread
        self._queue: deque[Any] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._work, name="cifarlab-forward", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        if self._thread is None:
            return
        with self._cond:
            self._queue.appendleft(_STOP)
            self._cond.notify()
        await asyncio.to_thread(self._thread.join)
        self._thread = None
        for entry in self._queue:  # never run: their callers are told, not left hanging
            if isinstance(entry, (_Item, _Job)) and not entry.future.done():
                entry.future.set_exception(RuntimeError("the server is shutting down"))
        self._queue.clear()

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def submit(self, image: np.ndarray, model: Any) -> np.ndarray:
        """The class probabilities of one image; raises :class:`QueueFull` when saturated."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        item = _Item(image, model, self._loop.create_future())
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already waiting")
            self._queue.append(item)
            self._cond.notify()
        return await item.future

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the forward thread, after the batches already queued."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        job = _Job(fn, args, self._loop.create_future())
        with self._cond:
            self._queue.append(job)
            self._cond.notify()
        return await job.future

    # ---------------------------------------------------------------- the forward thread

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                first = self._queue.popleft()
                if first is _STOP:
                    return
                if isinstance(first, _Job):
                    batch: list[_Item] = []
                else:
                    batch = [first]
                    self._take(batch)
                    if 1 < len(batch) < self.max_batch and self.max_wait > 0:
                        deadline = time.monotonic() + self.max_wait
                        while len(batch) < self.max_batch:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0 or not self._cond.wait(remaining):
                                break
                            self._take(batch)
                        self._take(batch)
            if isinstance(first, _Job):
                self._call(first)
            else:
                self._forward(batch)

    def _take(self, batch: list[_Item]) -> None:
        """Move queued requests of the batch's model into ``batch`` (lock held). A request for
        another model, or a job, ends the batch: order is kept."""
        model = batch[0].model
        q = self._queue
        while q and len(batch) < self.max_batch:
            nxt = q[0]
            if not isinstance(nxt, _Item) or nxt.model is not model:
                break
            batch.append(q.popleft())

    def _call(self, job: _Job) -> None:
        try:
            result = job.fn(*job.args)
        except BaseException as exc:  # handed to the awaiting caller
            self._deliver(job.future, None, exc)
        else:
            self._deliver(job.future, result, None)

    def _forward(self, items: list[_Item]) -> None:
        live = [i for i in items if not i.future.cancelled()]  # client went away
        if not live:
            return
        now = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(len(live), [now - i.enqueued for i in live])
        try:
            probs = live[0].model.probabilities(np.stack([i.image for i in live]))
        except Exception as exc:  # a model error fails its batch, never the batcher
            for i in live:
                self._deliver(i.future, None, exc)
            return
        if self.on_forward is not None:
            self.on_forward(time.perf_counter() - now)
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_set_results, live, probs)

    def _deliver(self, future: asyncio.Future[Any], result: Any,
                 exc: BaseException | None) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _set_results(items: list[_Item], probs: np.ndarray) -> None:
    for i, p in zip(items, probs, strict=True):
        if not i.future.done():
            i.future.set_result(p)


class LRUCache:
    """A bounded mapping that evicts the least recently used entry. Not thread-safe: the app
    uses it from the event loop only."""

    def __init__(self, capacity: int):
        self.capacity = max(0, capacity)
        self._data: OrderedDict[Any, Any] = OrderedDict()

    def get(self, key: Any) -> Any | None:
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: Any, value: Any) -> None:
        if self.capacity == 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
