"""The asyncio shell around a synchronous engine: step it, pace it, hand the results on.

``EngineLoop`` is the engine's only owner. Everything that touches the engine (adding,
aborting, reserving and committing blocks, reading its cache) runs under ``exclusive()``,
which the loop also holds for each step, so the engine never sees two callers at once even
when its steps run in a thread (a real model) rather than inline on the event loop (the
simulator). The loop sleeps while the engine is idle and, for a simulated engine, waits out
each step's modelled duration.

``on_step`` runs after the lock is released: what a step produced is plain data
(``StepResult``), so the callback may publish, and may itself take ``exclusive()`` (to abort
a request it could not deliver, say) without deadlocking. The next step waits for it.
"""

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from proto.messages import RequestId
from shared.engine.interface import Engine, EngineRequest, EngineStats, StepResult

logger = logging.getLogger(__name__)

StepCallback = Callable[[StepResult], Awaitable[None]]


class EngineLoop:
    """Runs ``engine.step()`` while there is work and passes each result to ``on_step``."""

    def __init__(self, engine: Engine, *, step_in_thread: bool) -> None:
        self._engine = engine
        self._step_in_thread = step_in_thread
        self._lock = asyncio.Lock()
        self._has_work = asyncio.Event()
        self.num_steps = 0

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[Engine]:
        """The engine, between two steps; wake the loop afterwards (there may be work)."""
        async with self._lock:
            yield self._engine
        self._has_work.set()

    async def add(self, request: EngineRequest) -> None:
        """Queue a request; raises ``InvalidRequest`` at once if it can never run."""
        async with self.exclusive() as engine:
            engine.add_request(request)

    async def abort(self, request_id: RequestId) -> bool:
        async with self.exclusive() as engine:
            return engine.abort(request_id)

    def num_tokens_ahead(self, priority: int) -> int:
        """Prompt tokens queued ahead of a new request of ``priority``; like ``stats``, a
        lock-free read (admission must not wait for a step to end)."""
        return self._engine.num_tokens_ahead(priority)

    def has_work(self) -> bool:
        """Whether the loop will step again without a new request (lock-free, as ``stats``)."""
        return self._engine.has_unfinished()

    def stats(self) -> EngineStats:
        """A snapshot; safe between steps and good enough during one (plain int reads)."""
        return self._engine.stats()

    async def run(self, on_step: StepCallback) -> None:
        """Step until cancelled, awaiting ``on_step`` with each result before the next step.
        An idle engine costs nothing: the loop waits for work."""
        loop = asyncio.get_running_loop()
        while True:
            if not self._engine.has_unfinished():
                self._has_work.clear()
                await self._has_work.wait()
                continue
            started = loop.time()
            async with self._lock:
                if self._step_in_thread:
                    result = await asyncio.to_thread(self._engine.step)
                else:
                    result = self._engine.step()
                self.num_steps += 1
            # The step's results exist once its (modelled) time has passed; always yield, so
            # handlers run between steps even when the step costs no time.
            await asyncio.sleep(max(0.0, started + result.duration_s - loop.time()))
            await on_step(result)
