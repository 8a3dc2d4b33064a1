"""Micro-batching: concurrent requests share one forward pass.

A single consumer task takes every request already queued (up to ``max_batch``) and runs one
forward pass on a dedicated thread, so the event loop keeps accepting requests meanwhile; those
requests form the next batch. An idle server therefore answers at once: a lone request never
waits for company. ``max_wait`` only applies under load: when a batch has more than one request
but is not full, the consumer waits up to ``max_wait`` seconds for more. The queue is bounded;
a full queue raises :class:`QueueFull`, which the app turns into 503.

Each request carries the model it was admitted under, and a batch never mixes models, so a
reload cannot change the answer to a request that is already queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LRUCache", "MicroBatcher", "QueueFull"]


class QueueFull(Exception):
    """The batcher's queue is at its bound."""


@dataclass
class _Item:
    image: np.ndarray  # H×W×3 uint8
    model: Any  # the ServedModel the request was admitted under
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Groups concurrent :meth:`submit` calls into batched ``model.forward`` calls."""

    def __init__(self, max_batch: int = 64, max_wait: float = 0.002, max_queue: int = 1024,
                 on_batch: Callable[[int, list[float]], None] | None = None):
        if max_batch < 1 or max_queue < 1 or max_wait < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait >= 0")
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait, max_queue
        self.on_batch = on_batch  # (batch size, queue seconds of each item) for metrics
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cifarlab-forward")

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._task = asyncio.create_task(self._run(), name="cifarlab-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._pool.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return 0 if self._queue is None else self._queue.qsize()

    async def submit(self, image: np.ndarray, model: Any) -> np.ndarray:
        """The class probabilities of one image; raises :class:`QueueFull` when saturated."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        item = _Item(image, model, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise QueueFull(f"{self.max_queue} requests are already waiting") from None
        return await item.future

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            while len(batch) < self.max_batch and not queue.empty():
                batch.append(queue.get_nowait())
            if 1 < len(batch) < self.max_batch and self.max_wait > 0:
                deadline = loop.time() + self.max_wait
                while len(batch) < self.max_batch:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        batch.append(await asyncio.wait_for(queue.get(), remaining))
                    except TimeoutError:
                        break
            # one model per forward pass: requests admitted before a reload use the old one
            groups: dict[int, list[_Item]] = {}
            for item in batch:
                groups.setdefault(id(item.model), []).append(item)
            for items in groups.values():
                await self._forward(loop, items)

    async def _forward(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        live = [i for i in items if not i.future.cancelled()]  # client went away
        if not live:
            return
        now = time.perf_counter()
        if self.on_batch is not None:
            self.on_batch(len(live), [now - i.enqueued for i in live])
        images = np.stack([i.image for i in live])
        try:
            probs = await loop.run_in_executor(self._pool, live[0].model.forward, images)
        except Exception as exc:  # a model error fails its batch, never the batcher
            for i in live:
                if not i.future.done():
                    i.future.set_exception(exc)
            return
        for i, p in zip(live, probs, strict=True):
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
