"""A draining decode worker's side of live migration: it gives up its running sequences and
lends their KV to whichever peers they move to.

At one step boundary (every output of the last step already published) each running sequence
is detached from the batch with its blocks held (``Engine.detach``) and described as a
``KVHandle``; its stream gets a last chunk, an abort carrying the handle, and the frontend
places it again with the tokens it has and the handle. The peer reads the blocks with one-sided
reads and sends ``KVRelease``. A sequence that has no KV to give (still queued, or waiting for a
remote prefill) gets the same abort without a handle and is computed again where it lands.

The lender keeps the held blocks until each is released, or until the hold deadline: a peer
that never reads them (it died, or fell back to computing the KV) costs the wait, not a leak.
"""

import asyncio
import logging
from dataclasses import dataclass

from proto.messages import InstanceId, KVHandle, RequestId
from services.worker.inflight import InFlight
from shared.engine.interface import Engine
from shared.engine.kv_connector import KVConnector
from shared.engine.loop import EngineLoop

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Detached:
    """What one boundary gave up: a handle per sequence whose KV moves, and the requests
    that move without KV."""

    handles: dict[RequestId, KVHandle]
    without_kv: list[RequestId]


class KVLender:
    """Detaches sequences for live migration and holds their blocks until released."""

    def __init__(
        self,
        loop: EngineLoop,
        connector: KVConnector,
        agent_name: str,
        worker_id: InstanceId,
    ) -> None:
        self._loop = loop
        self._connector = connector
        self._agent_name = agent_name
        self._worker_id = worker_id
        self.lent: InFlight[None] = InFlight()  # request id -> nothing: held for a peer
        self.num_lent = 0
        self.num_lent_blocks = 0
        self.num_hold_timeouts = 0

    def detach(self, engine: Engine, request_ids: list[RequestId]) -> Detached:
        """Under the engine lock, at a step boundary: detach each running request and hold
        its KV; the others (queued, reserved) are left for the caller to end."""
        handles: dict[RequestId, KVHandle] = {}
        without_kv: list[RequestId] = []
        for rid in request_ids:
            try:
                block_ids, num_kv_tokens = engine.detach(rid)
            except (KeyError, ValueError):
                without_kv.append(rid)
                continue
            handles[rid] = KVHandle(
                worker_id=self._worker_id,
                request_id=rid,
                kv_agent=self._agent_name,
                block_descriptors=self._connector.describe(block_ids),
                num_kv_tokens=num_kv_tokens,
            )
            self.lent.add(rid, None)
            self.num_lent += 1
            self.num_lent_blocks += len(block_ids)
        return Detached(handles, without_kv)

    async def release(self, request_id: RequestId) -> None:
        """A peer has read (or given up on) the blocks: free them."""
        if request_id not in self.lent:
            return
        async with self._loop.exclusive() as engine:
            engine.release(request_id)
        self.lent.pop(request_id)

    async def wait_released(self, timeout_s: float) -> None:
        """Wait until every hold is released, at most ``timeout_s``; then free the rest."""
        try:
            async with asyncio.timeout(timeout_s):
                await self.lent.idle.wait()
        except TimeoutError:
            left = list(self.lent)
            self.num_hold_timeouts += len(left)
            logger.warning(
                "KV holds not released in %.1f s; freeing num_holds=%d", timeout_s, len(left)
            )
            for rid in left:
                await self.release(rid)
