"""What prefill and decode workers share: owning an engine loop, publishing its KV events and
load, answering a router's resync, and draining.

A worker subclass handles its own inbox messages and what each step produced
(``handle_outputs``); this base publishes everything that is the same for both roles.
"""

import abc
import asyncio
import logging

from proto import subjects
from proto.messages import (
    InstanceId,
    KVEventBatch,
    KVState,
    LoadMetrics,
)
from shared.bus import Bus
from shared.engine.interface import Engine, StepResult
from shared.engine.loop import EngineLoop

logger = logging.getLogger(__name__)


class EngineWorker(abc.ABC):
    """An engine served on the bus under ``worker_id``."""

    def __init__(
        self,
        bus: Bus,
        namespace: str,
        worker_id: InstanceId,
        engine: Engine,
        *,
        step_in_thread: bool,
    ) -> None:
        self.worker_id = worker_id
        self.namespace = namespace
        self.inbox = subjects.worker_inbox(namespace, worker_id)
        self.bus = bus
        self.loop = EngineLoop(engine, self._on_step, step_in_thread=step_in_thread)
        self.is_draining = False
        self._kv_event_seq = 0
        self._idle = asyncio.Event()
        self._idle.set()

    # --- subclass hooks ------------------------------------------------------------------

    @property
    @abc.abstractmethod
    def num_in_flight(self) -> int:
        """Requests this worker still owes an answer or tokens to."""

    @abc.abstractmethod
    async def handle_outputs(self, result: StepResult) -> None:
        """Deliver what one step produced."""

    @abc.abstractmethod
    async def abort_all(self, reason: str) -> None:
        """End every request still in flight (the drain deadline passed)."""

    # --- shared behaviour ----------------------------------------------------------------

    def note_in_flight_changed(self) -> None:
        """Call after requests start or end, so ``drain`` wakes when the last one ends."""
        if self.num_in_flight:
            self._idle.clear()
        else:
            self._idle.set()

    async def run_engine(self) -> None:
        """Step the engine until cancelled."""
        await self.loop.run()

    async def _on_step(self, result: StepResult) -> None:
        await self.publish_kv_events()
        await self.handle_outputs(result)

    async def publish_kv_events(self) -> None:
        """Publish the blocks stored and removed since the last call, numbered for gap checks."""
        events = self.loop.engine.take_kv_events()
        if events:
            self._kv_event_seq += 1
            await self.bus.publish(
                subjects.kv_events(self.namespace, self.worker_id),
                KVEventBatch(worker_id=self.worker_id, seq=self._kv_event_seq, events=events),
            )

    async def kv_state(self) -> KVState:
        """Every cached block and the seq it reflects, consistent with the event stream: events
        not yet published are published first."""
        async with self.loop.exclusive() as engine:
            await self.publish_kv_events()
            return KVState(
                worker_id=self.worker_id,
                seq=self._kv_event_seq,
                block_hashes=engine.cached_block_hashes(),
            )

    def load_metrics(self) -> LoadMetrics:
        stats = self.loop.stats()
        return LoadMetrics(
            worker_id=self.worker_id,
            num_running=stats.num_running + stats.num_reserved,
            num_waiting=stats.num_waiting,
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            kv_usage=stats.kv_usage,
            is_draining=self.is_draining,
        )

    async def publish_load(self, interval_s: float) -> None:
        """Publish load metrics every ``interval_s`` until cancelled."""
        subject = subjects.load_metrics(self.namespace, self.worker_id)
        while True:
            await self.bus.publish(subject, self.load_metrics())
            await asyncio.sleep(interval_s)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, let in-flight requests finish for up to ``timeout_s``, then end the
        rest with a reason (so no client stream hangs)."""
        self.is_draining = True
        await self.bus.publish(
            subjects.load_metrics(self.namespace, self.worker_id), self.load_metrics()
        )
        self.note_in_flight_changed()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            logger.warning(
                "[shutdown] drain deadline passed; aborting num_requests=%d", self.num_in_flight
            )
            await self.abort_all("worker shut down")
