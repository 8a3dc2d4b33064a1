"""Memory budgets: a weighted, first-come-first-served semaphore over bytes.

The server holds two: one for request bodies in flight (held from before a body is read until its
response is sent) and one for decoding (held while an image decodes or a v2 JSON body parses).
Work that would go over a budget waits for earlier work to give bytes back; work larger than the
whole budget is refused at once, so nothing waits forever. Together with the decode pool's size
they bound the server's memory by configuration (README, "Memory").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

__all__ = ["ByteBudget", "OverBudget"]


class OverBudget(Exception):
    """A single piece of work is larger than the whole budget."""


class ByteBudget:
    """``async with budget.hold(n):`` runs once ``n`` bytes are free, first come first served
    (a large request is not overtaken forever by small ones)."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("a budget needs at least one byte")
        self.capacity = self.free = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def used(self) -> int:
        return self.capacity - self.free

    async def acquire(self, n: int) -> None:
        if n > self.capacity:
            raise OverBudget(f"needs {n} bytes of a {self.capacity}-byte budget")
        if not self._waiters and n <= self.free:
            self.free -= n
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted just as we were cancelled
                self.release(n)
            else:
                self._waiters.remove((n, fut))
                self._wake()  # a large waiter leaving may unblock the ones behind it
            raise

    def release(self, n: int) -> None:
        self.free += n
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.free -= n
            fut.set_result(None)

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        await self.acquire(n)
        try:
            yield
        finally:
            self.release(n)
