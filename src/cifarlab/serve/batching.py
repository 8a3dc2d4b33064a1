"""Micro-batching: concurrent requests share one forward pass.

A dedicated forward thread (the scheduler, as in Triton's dynamic batcher) takes every request
already queued, up to ``max_batch``, runs one forward pass, hands the results back to the event
loop and goes straight on to the next batch. It never waits for the event loop, so under load the
model is busy while the loop parses requests and writes responses. An idle server answers at
once: a lone request never waits for company. ``max_wait`` only applies under load: when a batch
has more than one request but is not full, the thread waits up to ``max_wait`` seconds for more.
The queue is bounded, and a request's images are admitted all or nothing
(:meth:`MicroBatcher.submit_many`): a request with more images than the whole queue raises
:class:`TooManyImages` (413, always); one that does not fit right now raises :class:`QueueFull`
(503), and none of its images is computed. Batches are filled round-robin across requests, one
image from each in turn, so a single-image request never waits behind all of a large one: it
rides in the next forward pass. And while small requests keep arriving (one in the last
second), a batch takes at most ``fair_share`` images from any one request, so the forward pass a
newcomer waits for is short; a large request alone, with no small ones about, gets full batches.

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

__all__ = ["LRUCache", "MicroBatcher", "QueueFull", "TooManyImages"]


class QueueFull(Exception):
    """The batcher's queue has no room for the request now."""


class TooManyImages(QueueFull):
    """The request carries more images than the queue can ever hold."""


@dataclass
class _Item:
    image: np.ndarray  # H×W×3 uint8
    model: Any  # the Predictor the request was admitted under
    future: asyncio.Future[Any]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Group:
    """The images of one request, taken round-robin with other requests' images."""

    model: Any
    items: deque[_Item]


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
                 on_forward: Callable[[float], None] | None = None, fair_share: int = 4):
        if max_batch < 1 or max_queue < 1 or max_wait < 0 or fair_share < 1:
            raise ValueError("max_batch, max_queue and fair_share must be >= 1 and "
                             "max_wait >= 0")
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.fair_share = fair_share
        self._last_small = -1e9  # monotonic time a request of <= fair_share images came
        self.on_batch = on_batch  # (batch size, queue seconds of each item), forward thread
        self.on_forward = on_forward  # seconds of each forward pass, forward thread
        self._queue: deque[Any] = deque()  # _Group, _Job or _STOP, in arrival order
        self._depth = 0  # images queued
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
            futures = ([i.future for i in entry.items] if isinstance(entry, _Group)
                       else [entry.future] if isinstance(entry, _Job) else [])
            for f in futures:
                if not f.done():
                    f.set_exception(RuntimeError("the server is shutting down"))
        self._queue.clear()
        self._depth = 0

    @property
    def depth(self) -> int:
        return self._depth

    async def submit(self, image: np.ndarray, model: Any) -> np.ndarray:
        """The class probabilities of one image; raises :class:`QueueFull` when saturated."""
        return (await self.submit_many([image], model))[0]

    async def submit_many(self, images: list[np.ndarray], model: Any) -> list[np.ndarray]:
        """The class probabilities of a request's images, admitted all or nothing: raises
        :class:`TooManyImages` if they could never fit the queue, :class:`QueueFull` if they do
        not fit now (nothing is queued then)."""
        if self._thread is None or self._loop is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        self.check_size(len(images))
        if not images:
            return []
        items = [_Item(img, model, self._loop.create_future()) for img in images]
        if len(items) <= self.fair_share:
            self._last_small = time.monotonic()
        with self._cond:
            if self._depth + len(items) > self.max_queue:
                raise QueueFull(f"{self._depth} images are already waiting and this request "
                                f"brings {len(items)}; the queue holds {self.max_queue}")
            self._queue.append(_Group(model, deque(items)))
            self._depth += len(items)
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(i.future for i in items)))
        except BaseException:
            for i in items:  # the client went away or one failed: skip the rest
                i.future.cancel()
            raise

    def check_size(self, n: int) -> None:
        """Raise :class:`TooManyImages` if a request of ``n`` images could never be admitted
        (callers check before decoding, so a refused request costs no work)."""
        if n > self.max_queue:
            raise TooManyImages(f"{n} images in one request; at most {self.max_queue} "
                                "(`cifarlab serve --max-queue`)")

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
                head = self._queue[0]
                if head is _STOP:
                    return
                if isinstance(head, _Job):
                    self._queue.popleft()
                    job: _Job | None = head
                    batch: list[_Item] = []
                else:
                    job = None
                    taken: dict[int, int] = {}
                    self._take(batch := [], taken)
                    if 1 < len(batch) < self.max_batch and self.max_wait > 0:
                        deadline = time.monotonic() + self.max_wait
                        while len(batch) < self.max_batch:
                            remaining = deadline - time.monotonic()
                            if remaining <= 0 or not self._cond.wait(remaining):
                                break
                            self._take(batch, taken)
                        self._take(batch, taken)
            if job is not None:
                self._call(job)
            else:
                self._forward(batch)

    def _take(self, batch: list[_Item], taken: dict[int, int]) -> None:
        """Move queued images into ``batch`` (lock held): round-robin over the leading requests
        of one model, one image each per turn. A job, or a request for another model, ends the
        batch: order between models and jobs is kept. ``taken`` counts, per request, the
        images already in this batch."""
        q = self._queue
        model = batch[0].model if batch else None
        groups: list[_Group] = []
        for entry in q:
            if not isinstance(entry, _Group) or (model is not None and entry.model is not model):
                break
            if len(groups) >= self.max_batch - len(batch):
                break  # one image from each of these fills the batch: no need to look further
            model = entry.model
            groups.append(entry)
        # with small requests about, no request gets more than fair_share of one forward pass
        share = self.fair_share if time.monotonic() - self._last_small < 1.0 else self.max_batch
        while groups and len(batch) < self.max_batch:
            for g in list(groups):
                if len(batch) >= self.max_batch or taken.get(id(g), 0) >= share:
                    groups.remove(g)
                    continue
                taken[id(g)] = taken.get(id(g), 0) + 1
                batch.append(g.items.popleft())
                self._depth -= 1
                if not g.items:
                    groups.remove(g)
                    q.remove(g)

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
