"""The micro-batcher and the prediction cache on their own, with stand-in models (the batching
is what is under test)."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from cifarlab.serve.batching import LRUCache, MicroBatcher, QueueFull, TooManyImages


class _Recorder:
    """A stand-in model that records batch sizes and contents (the batcher is what is under
    test)."""

    def __init__(self, delay: float = 0.0):
        self.sizes: list[int] = []
        self.batches: list[list[int]] = []  # the first pixel of each image, per batch
        self.delay = delay

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        time.sleep(self.delay)
        self.sizes.append(len(images))
        self.batches.append([int(i[0, 0, 0]) for i in images])
        return images.reshape(len(images), -1)[:, :2].astype(np.float32)


def test_micro_batcher_groups_concurrent_requests():
    async def main():
        b = MicroBatcher(max_batch=8, max_wait=0.01, max_queue=100)
        await b.start()
        model = _Recorder(delay=0.02)
        imgs = [np.full((2, 2, 3), i, np.uint8) for i in range(20)]
        outs = await asyncio.gather(*(b.submit(x, model) for x in imgs))
        await b.stop()
        return model.sizes, outs

    sizes, outs = asyncio.run(main())
    assert sum(sizes) == 20 and max(sizes) <= 8 and len(sizes) < 20
    assert [int(o[0]) for o in outs] == list(range(20))  # each caller gets its own row


def test_idle_request_does_not_wait():
    async def main():
        b = MicroBatcher(max_batch=64, max_wait=0.5, max_queue=10)
        await b.start()
        t0 = time.perf_counter()
        await b.submit(np.zeros((2, 2, 3), np.uint8), _Recorder())
        dt = time.perf_counter() - t0
        await b.stop()
        return dt

    assert asyncio.run(main()) < 0.1  # far below max_wait


def test_full_queue_and_model_swap():
    async def main():
        b = MicroBatcher(max_batch=4, max_wait=0.0, max_queue=2)
        await b.start()
        slow, new = _Recorder(delay=0.2), _Recorder()
        x = np.zeros((2, 2, 3), np.uint8)
        first = asyncio.ensure_future(b.submit(x, slow))
        await asyncio.sleep(0.05)  # the first batch is now running on the slow model
        queued = [asyncio.ensure_future(b.submit(x, m)) for m in (slow, new)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit(x, new)
        await asyncio.gather(first, *queued)
        await b.stop()
        return slow.sizes, new.sizes

    slow_sizes, new_sizes = asyncio.run(main())
    assert slow_sizes == [1, 1] and new_sizes == [1]  # a batch never mixes two models


def test_lru_cache_evicts_least_recently_used():
    c = LRUCache(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert c.get("b") is None and c.get("a") == 1 and c.get("c") == 3 and len(c) == 2
    zero = LRUCache(0)
    zero.put("a", 1)
    assert zero.get("a") is None


def test_a_model_error_fails_its_batch_and_the_batcher_goes_on():
    class Broken:
        def probabilities(self, images: np.ndarray) -> np.ndarray:
            raise RuntimeError("boom")

    async def main():
        b = MicroBatcher(max_batch=4, max_wait=0.0, max_queue=10)
        await b.start()
        x = np.zeros((2, 2, 3), np.uint8)
        with pytest.raises(RuntimeError, match="boom"):
            await b.submit(x, Broken())
        ok = await b.submit(x, _Recorder())
        loaded = await b.run(lambda v: v + 1, 41)  # calls run on the forward thread too
        await b.stop()
        return ok, loaded

    ok, loaded = asyncio.run(main())
    assert ok.shape == (2,) and loaded == 42


def test_batcher_refuses_impossible_settings():
    with pytest.raises(ValueError):
        MicroBatcher(max_batch=0)
    with pytest.raises(ValueError):
        MicroBatcher(max_queue=0)


def test_requests_are_admitted_all_or_nothing():
    async def main():
        b = MicroBatcher(max_batch=4, max_wait=0.0, max_queue=5)
        await b.start()
        model = _Recorder(delay=0.1)
        x = [np.zeros((2, 2, 3), np.uint8)] * 6
        with pytest.raises(TooManyImages, match="at most 5"):
            await b.submit_many(x, model)  # could never fit
        running = asyncio.ensure_future(b.submit_many(x[:3], model))
        await asyncio.sleep(0.02)  # the first 3 are in the forward pass; the queue is empty
        waiting = asyncio.ensure_future(b.submit_many(x[:4], model))
        await asyncio.sleep(0)
        assert b.depth == 4
        with pytest.raises(QueueFull, match="brings 2"):
            await b.submit_many(x[:2], model)  # 4 + 2 > 5: refused whole
        assert b.depth == 4  # nothing of the refused request was queued
        await asyncio.gather(running, waiting)
        await b.stop()
        return model.sizes

    assert sum(asyncio.run(main())) == 7  # the refused images were never computed


def test_a_small_request_rides_the_next_forward_pass():
    """Round-robin across requests, and with small requests about, at most fair_share images
    of any one request per forward pass: a one-image request queued behind a 40-image one is
    computed in the next pass, not after all 40."""
    async def main():
        b = MicroBatcher(max_batch=64, max_wait=0.0, max_queue=100, fair_share=4)
        await b.start()
        model = _Recorder(delay=0.01)
        await b.submit(np.full((2, 2, 3), 200, np.uint8), model)  # a small request was seen
        bulk = asyncio.ensure_future(b.submit_many(
            [np.full((2, 2, 3), i, np.uint8) for i in range(40)], model))
        await asyncio.sleep(0.005)
        small = await b.submit(np.full((2, 2, 3), 99, np.uint8), model)
        await bulk
        await b.stop()
        return model.batches, small

    batches, small = asyncio.run(main())
    assert int(small[0]) == 99
    where = next(k for k, batch in enumerate(batches) if 99 in batch)
    assert where <= 3  # its batch came right after the one in flight
    assert all(len(batch) <= 5 for batch in batches[1:])  # 4 bulk + the small one at most
    assert sorted(i for batch in batches for i in batch if i < 40) == list(range(40))


def test_a_large_request_alone_gets_full_batches():
    async def main():
        b = MicroBatcher(max_batch=16, max_wait=0.0, max_queue=100, fair_share=4)
        await b.start()
        model = _Recorder()
        await b.submit_many([np.zeros((2, 2, 3), np.uint8)] * 48, model)
        await b.stop()
        return model.sizes

    assert asyncio.run(main()) == [16, 16, 16]
