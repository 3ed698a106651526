"""Requests that found every worker full, waiting in arrival order for one to have room.

Without a time-to-first-token objective a burst is queued, not refused: a request that every
worker turned away (each has ``max_waiting`` queued) waits here until a load report shows
room, then tries again. Reports arrive every ~100 ms per worker; each lets through as many
waiters as the worker says it still has room for, oldest first. A waiter gives up after the
caller's deadline. Bounded by the frontend's ``max_in_flight``: a waiter is an open request.
"""

import asyncio
from collections import deque


class WaitingRoom:
    """FIFO queues of waiters, one per model. Not thread-safe; one per event loop."""

    def __init__(self) -> None:
        self._queues: dict[str, deque[asyncio.Future[None]]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def is_queued(self, model: str) -> bool:
        """Whether requests for ``model`` wait already (a newcomer then queues behind them)."""
        queue = self._queues.get(model)
        while queue and queue[0].done():  # left by waiters that timed out or were cancelled
            queue.popleft()
        return bool(queue)

    async def wait(self, model: str, timeout_s: float, *, first: bool = False) -> None:
        """Wait until :meth:`admit` lets this request through; ``TimeoutError`` after
        ``timeout_s``. ``first``: go to the head of the queue (a request let through that a
        worker refused all the same keeps its place)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues.setdefault(model, deque())
        if first:
            queue.appendleft(waiter)
        else:
            queue.append(waiter)
        try:
            async with asyncio.timeout(timeout_s):
                await waiter
        finally:
            if not waiter.done():
                waiter.cancel()  # skipped by admit() and is_queued()

    def admit(self, model: str, count: int) -> int:
        """Let up to ``count`` waiters for ``model`` through, oldest first; how many went."""
        queue = self._queues.get(model)
        admitted = 0
        while queue and admitted < count:
            waiter = queue.popleft()
            if not waiter.done():
                waiter.set_result(None)
                admitted += 1
        if queue is not None and not queue:
            del self._queues[model]
        return admitted
