"""The decode side of prefill-first disaggregation: one owned task per request whose prompt
the router sent to a prefill worker.

1. ``PrefillRequest`` to that worker (request-reply): it computes the prompt, samples the first
   token, holds the blocks and answers ``PrefillDone`` with one descriptor per block.
2. ``Engine.reserve``: blocks here for the prompt, reusing the prefix this engine caches. The
   request now waits in the engine for its KV (``RESERVED``).
3. ``KVConnector.pull``: one-sided reads of the missing blocks from the prefill worker.
4. ``KVRelease`` frees them there; ``Engine.commit`` puts the request in the batch.

A live migration in (``start_move``: a draining peer gave up a running sequence and holds its
KV) takes the same path without step 1: reserve blocks for the prompt and the output so far,
pull the KV of all but the newest token from the peer, ``KVRelease`` it there (success or not),
``Engine.resume``. The next step here computes the newest token and streams the one after.

The outcome goes back to the role through exactly one of two callbacks: ``on_ready`` with the
first chunk (a move has none: its tokens come from the steps), or ``on_failed`` with the error
(any error: a peer that refused, died or timed out, a transfer that failed, a reply that does
not decode, a bug). Cleanup of both sides runs before either, and on cancellation (the client
left, the worker stops). ``close`` cancels and awaits every task, so none outlives the worker.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from proto.messages import (
    AbortRequest,
    ErrorReply,
    InstanceId,
    KVHandle,
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
from shared.errors import InvalidRequest, ServingError, Shed, Unavailable, from_reply

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
        self.num_moved_in = 0  # live migrations whose KV arrived
        self.num_moved_blocks = 0  # blocks those read (the rest were cached here)
        self.num_moved_bytes = 0

    def __len__(self) -> int:
        return len(self._tasks)

    def start(
        self, request: EngineRequest, prefill_worker_id: InstanceId, *, admitted: bool = False
    ) -> None:
        """Begin the handoff; its outcome arrives through ``on_ready`` or ``on_failed``.
        ``admitted``: the request was admitted before, on a worker it has left (the prefill
        worker checks it against its whole time left, not admission's share)."""
        rid = request.request_id
        run = self._run(request, prefill_worker_id, admitted)
        task = asyncio.create_task(run, name=f"prefill {rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._tasks.pop(rid, None))

    def start_move(self, request: EngineRequest, source: KVHandle) -> None:
        """Begin a live migration in (see the module docstring); a failure arrives through
        ``on_failed``, success through nothing (the request is in the batch)."""
        rid = request.request_id
        task = asyncio.create_task(self._run_move(request, source), name=f"move in {rid}")
        self._tasks[rid] = task
        task.add_done_callback(lambda _: self._tasks.pop(rid, None))

    def __contains__(self, request_id: RequestId) -> bool:
        return request_id in self._tasks

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

    async def _run(
        self, request: EngineRequest, prefill_worker_id: InstanceId, admitted: bool
    ) -> None:
        try:
            chunk = await self._handoff(request, prefill_worker_id, admitted)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # every failure takes the one path back to the role
            await self._on_failed(request, exc)
            return
        self.num_remote += 1
        await self._on_ready(chunk)

    async def _run_move(self, request: EngineRequest, source: KVHandle) -> None:
        try:
            num_blocks = await self._move_in(request, source)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._on_failed(request, exc)
            return
        self.num_moved_in += 1
        self.num_moved_blocks += num_blocks
        if source.block_descriptors:  # every block has one size
            self.num_moved_bytes += num_blocks * source.block_descriptors[0][1]

    async def _move_in(self, request: EngineRequest, handle: KVHandle) -> int:
        rid = request.request_id
        info = self._workers().get(handle.worker_id)
        if info is None:
            raise Unavailable(f"worker {handle.worker_id} holding the KV is not registered")
        num_tokens = len(request.token_ids) + len(request.resumed_token_ids)
        is_reserved = False
        try:
            if not request.resumed_token_ids or handle.num_kv_tokens != num_tokens - 1:
                raise InvalidRequest(
                    f"the KV covers {handle.num_kv_tokens} tokens; this request has {num_tokens}"
                )
            async with self._loop.exclusive() as engine:
                reservation = engine.reserve(request, is_moved=True)
            is_reserved = True
            source = KVSource(
                worker_id=handle.worker_id,
                agent_name=handle.kv_agent,
                agent_metadata=info.kv_agent_metadata,
                block_descriptors=handle.block_descriptors,
            )
            async with asyncio.timeout(self._transfer_timeout_s):
                num_blocks = await self._connector.pull(source, reservation)
            async with self._loop.exclusive() as engine:
                engine.resume(rid)
            is_reserved = False
        except BaseException:
            if is_reserved:
                async with self._loop.exclusive() as engine:
                    engine.abort(rid)
            raise
        finally:
            try:  # read or not, the peer may let the blocks go now
                await self._bus.publish(info.subject, KVRelease(request_id=handle.request_id))
            except ServingError as exc:
                logger.warning("KV release not sent request_id=%s error=%s", rid, exc)
        return num_blocks

    async def _handoff(
        self, request: EngineRequest, prefill_worker_id: InstanceId, admitted: bool
    ) -> TokenChunk:
        rid = request.request_id
        info = self._workers().get(prefill_worker_id)
        if info is None:
            raise Unavailable(f"prefill worker {prefill_worker_id} is not registered")
        subject = info.subject
        is_held = False  # the prefill worker holds blocks for us
        is_reserved = False
        try:
            done = await self._prefill(subject, request, admitted)
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
            logprobs=[done.first_token_logprobs] if done.first_token_logprobs else None,
        )

    async def _prefill(self, subject: str, request: EngineRequest, admitted: bool) -> PrefillDone:
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
            admitted=admitted,
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
