"""The decode side of prefill-first disaggregation: one owned task per request whose prompt
the router sent to a prefill worker.

1. ``PrefillRequest`` to that worker (request-reply): it computes the prompt, samples the first
   token, holds the blocks and answers ``PrefillDone`` with one descriptor per block.
2. ``Engine.reserve``: blocks here for the prompt, reusing the prefix this engine caches. The
   request now waits in the engine for its KV (``RESERVED``).
3. ``KVConnector.pull``: one-sided reads of the missing blocks from the prefill worker.
4. ``KVRelease`` frees them there; ``Engine.commit`` puts the request in the batch.

The outcome goes back to the role through exactly one of two callbacks: ``on_ready`` with the
first chunk, or ``on_failed`` with the error (any error: a peer that refused, died or timed
out, a transfer that failed, a reply that does not decode, a bug). Cleanup of both sides runs
before either, and on cancellation (the client left, the worker stops). ``close`` cancels and
awaits every task, so none outlives the worker.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from proto.messages import (
    AbortRequest,
    ErrorReply,
    InstanceId,
    KVRelease,
    PrefillDone,
    PrefillRequest,
    RequestId,
    TokenChunk,
    TTFTBreakdown,
    WorkerInfo,
)
from shared.bus import Bus
from shared.codec import prefill_reply_decoder
from shared.engine.interface import EngineRequest
from shared.engine.kv_connector import KVConnector, KVSource
from shared.engine.loop import EngineLoop
from shared.errors import ServingError, Shed, Unavailable, from_reply

logger = logging.getLogger(__name__)

OnReady = Callable[[TokenChunk], Awaitable[None]]
OnFailed = Callable[[EngineRequest, BaseException], Awaitable[None]]


class RemotePrefill:
    """Runs handoffs for one decode worker (see the module docstring)."""

    def __init__(
        self,
        bus: Bus,
        namespace: str,
        worker_id: InstanceId,
        loop: EngineLoop,
        connector: KVConnector,
        workers: Callable[[], Mapping[InstanceId, WorkerInfo]],
        *,
        prefill_timeout_s: float,
        transfer_timeout_s: float,
        on_ready: OnReady,
        on_failed: OnFailed,
    ) -> None:
        self._bus = bus
        self._namespace = namespace
        self._worker_id = worker_id
        self._loop = loop
        self._connector = connector
        self._workers = workers
        self._prefill_timeout_s = prefill_timeout_s
        self._transfer_timeout_s = transfer_timeout_s
        self._on_ready = on_ready
        self._on_failed = on_failed
        self._tasks: dict[RequestId, asyncio.Task[None]] = {}
        self.num_remote = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, request: EngineRequest, prefill_worker_id: InstanceId) -> None:
        """Begin the handoff; its outcome arrives through ``on_ready`` or ``on_failed``."""
        rid = request.request_id
        task = asyncio.create_task(self._run(request, prefill_worker_id), name=f"prefill {rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._tasks.pop(rid, None))

    def cancel(self, request_id: RequestId) -> None:
        """Stop a handoff (its cleanup frees both sides); no callback follows."""
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, request: EngineRequest, prefill_worker_id: InstanceId) -> None:
        try:
            chunk = await self._handoff(request, prefill_worker_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure takes the one path back to the role
            await self._on_failed(request, exc)
            return
        self.num_remote += 1
        await self._on_ready(chunk)

    async def _handoff(self, request: EngineRequest, prefill_worker_id: InstanceId) -> TokenChunk:
        rid = request.request_id
        info = self._workers().get(prefill_worker_id)
        if info is None:
            raise Unavailable(f"prefill worker {prefill_worker_id} is not registered")
        subject = info.subject
        is_held = False  # the prefill worker holds blocks for us
        is_reserved = False
        try:
            done = await self._prefill(subject, request)
            is_held = True
            async with self._loop.exclusive() as engine:
                reservation = engine.reserve(request)
            is_reserved = True
            source = KVSource(
                worker_id=done.worker_id,
                agent_name=done.kv_agent,
                agent_metadata=info.kv_agent_metadata,
                block_descriptors=done.block_descriptors,
            )
            started = time.monotonic()
            async with asyncio.timeout(self._transfer_timeout_s):
                await self._connector.pull(source, reservation)
            transfer_s = time.monotonic() - started
            is_held = False
            await self._bus.publish(subject, KVRelease(request_id=rid))
            async with self._loop.exclusive() as engine:
                finished = engine.commit(rid, done.first_token_id)
            is_reserved = False
        except BaseException:
            await self._clean_up(subject, rid, is_held=is_held, is_reserved=is_reserved)
            raise
        return TokenChunk(
            rid,
            [done.first_token_id],
            finished.finish_reason if finished else None,
            len(request.token_ids),
            reservation.num_cached_tokens,
            None,
            TTFTBreakdown(
                queue_s=done.queue_s,
                prefill_s=done.prefill_s,
                transfer_s=transfer_s,
                is_remote_prefill=True,
            ),
        )

    async def _prefill(self, subject: str, request: EngineRequest) -> PrefillDone:
        budget_s = None
        if request.deadline_s is not None:
            budget_s = request.deadline_s - time.monotonic()
            if budget_s <= 0:
                raise Shed(f"request {request.request_id} is past its deadline")
        message = PrefillRequest(
            request_id=request.request_id,
            token_ids=request.token_ids,
            sampling=request.sampling,
            priority=request.priority,
            ttft_budget_s=budget_s,
        )
        data = await self._bus.request(subject, message, timeout_s=self._prefill_timeout_s)
        reply = prefill_reply_decoder.decode(data)
        if isinstance(reply, ErrorReply):
            raise from_reply(reply)
        if reply.request_id != request.request_id:
            raise Unavailable(
                f"prefill answered for {reply.request_id}; asked for {request.request_id}"
            )
        return reply

    async def _clean_up(
        self, subject: str, request_id: RequestId, *, is_held: bool, is_reserved: bool
    ) -> None:
        """Free what the prefill worker holds (or is still computing) and our reservation."""
        if is_reserved:
            async with self._loop.exclusive() as engine:
                engine.abort(request_id)
        message = (
            KVRelease(request_id=request_id) if is_held else AbortRequest(request_id=request_id)
        )
        try:
            await self._bus.publish(subject, message)
        except ServingError as exc:
            logger.warning("prefill cleanup not sent request_id=%s error=%s", request_id, exc)
