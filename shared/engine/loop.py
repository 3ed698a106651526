"""The asyncio shell around a synchronous engine: step it, pace it, hand the results on.

``EngineLoop`` is the engine's only owner. Handlers add and abort requests between steps
(on the same event loop, so the engine never sees two callers at once); the loop sleeps while
the engine is idle and, for a simulated engine, waits out each step's modelled duration.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable

from proto.messages import RequestId
from shared.engine.interface import Engine, EngineRequest, EngineStats, StepResult

logger = logging.getLogger(__name__)

StepCallback = Callable[[StepResult], Awaitable[None]]


class EngineLoop:
    """Runs ``engine.step()`` while there is work and passes each result to ``on_step``."""

    def __init__(self, engine: Engine, on_step: StepCallback) -> None:
        self.engine = engine
        self._on_step = on_step
        self._has_work = asyncio.Event()
        self.num_steps = 0

    def add(self, request: EngineRequest) -> None:
        """Queue a request; raises ``InvalidRequest`` at once if it can never run."""
        self.engine.add_request(request)
        self._has_work.set()

    def abort(self, request_id: RequestId) -> bool:
        return self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def is_idle(self) -> bool:
        return not self.engine.has_unfinished()

    async def run(self) -> None:
        """Step until cancelled. An idle engine costs nothing: the loop waits for ``add``."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.engine.has_unfinished():
                self._has_work.clear()
                await self._has_work.wait()
                continue
            started = loop.time()
            result = self.engine.step()
            self.num_steps += 1
            await self._on_step(result)
            # Wait out the rest of the modelled step; always yield so handlers run between steps.
            await asyncio.sleep(max(0.0, started + result.duration_s - loop.time()))
