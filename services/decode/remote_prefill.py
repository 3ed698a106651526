"""Prefill on a prefill worker, then pull the KV here (prefill-first, one-sided reads).

1. ``PrefillRequest`` to a prefill worker (request-reply); it computes the prompt, samples the
   first token, holds the blocks and answers ``PrefillDone`` with one descriptor per block.
2. Reserve blocks here (the prefix this engine already caches needs no transfer).
3. Read the missing blocks from the prefill worker's memory with the transfer agent.
4. ``KVRelease`` frees them there; ``commit`` puts the request in this engine's batch and the
   first token goes to the client.

Any failure before the commit falls back to prefilling here, so a request never hangs on a
peer; a client abort cancels the task, which frees both sides.
"""

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from proto.messages import (
    AbortRequest,
    ErrorReply,
    FinishReason,
    GenerateRequest,
    InstanceId,
    KVRelease,
    PrefillDone,
    PrefillRequest,
    RequestId,
    TokenChunk,
    TTFTBreakdown,
    WorkerRole,
)
from services.decode.disagg import DisaggPolicy
from shared.bus import Bus
from shared.codec import prefill_reply_decoder
from shared.engine.interface import Engine, EngineRequest, Reservation
from shared.errors import ServingError, from_reply
from shared.kv_transfer import TransferAgent, TransferError
from shared.worker_pool import WorkerPool, WorkerState

if TYPE_CHECKING:
    from services.decode.worker import DecodeWorker

logger = logging.getLogger(__name__)


class RemotePrefill:
    """Chooses prefill workers and runs the handoff for one decode worker."""

    def __init__(
        self,
        bus: Bus,
        pool: WorkerPool,
        agent: TransferAgent,
        policy: DisaggPolicy,
        model: str,
        *,
        prefill_timeout_s: float,
        transfer_timeout_s: float,
    ) -> None:
        self._bus = bus
        self._pool = pool
        self._agent = agent
        self._policy = policy
        self._model = model
        self._prefill_timeout_s = prefill_timeout_s
        self._transfer_timeout_s = transfer_timeout_s
        self._known_agents: set[str] = set()
        self.num_remote = 0
        self.num_fallbacks = 0

    def choose(self, engine: Engine, request: GenerateRequest) -> WorkerState | None:
        """The prefill worker for this request, or None to prefill here."""
        candidates = self._pool.candidates(self._model, roles=(WorkerRole.PREFILL,))
        if not candidates or engine.kv_region is None:
            return None
        num_cached = engine.cached_prefix_tokens(request.token_ids)
        if not self._policy.is_remote(len(request.token_ids), num_cached):
            return None
        if request.prefill_worker_id is not None:
            for state in candidates:
                if state.info.worker_id == request.prefill_worker_id:
                    return state
        return candidates[0]

    async def run(
        self, worker: "DecodeWorker", request: EngineRequest, prefill: WorkerState
    ) -> None:
        """The whole handoff for one request; falls back to a local prefill on failure."""
        rid = request.request_id
        done: PrefillDone | None = None
        is_held = False  # the prefill worker holds blocks for us
        try:
            done = await self._prefill(prefill, request, worker.worker_id)
            is_held = True
            async with worker.loop.exclusive() as engine:
                reservation = engine.reserve(request)
            started = time.monotonic()
            async with asyncio.timeout(self._transfer_timeout_s):
                num_blocks = await self._pull(prefill, done, reservation, worker.loop.engine)
            modelled_s = worker.loop.engine.modelled_transfer_s(num_blocks)
            await asyncio.sleep(max(0.0, started + modelled_s - time.monotonic()))
            transfer_s = time.monotonic() - started
            is_held = False
            await self._release(prefill, rid)
            async with worker.loop.exclusive() as engine:
                finished = engine.commit(rid, done.first_token_id)
        except asyncio.CancelledError:
            await self._cleanup(prefill, rid, is_held)
            raise
        except (ServingError, TransferError, KeyError, TimeoutError) as exc:
            await self._cleanup(prefill, rid, is_held)
            await worker.loop.abort(rid)  # a reservation, if one was made
            await self._fall_back(worker, request, exc)
            return
        self.num_remote += 1
        ttft = TTFTBreakdown(
            queue_s=done.queue_s,
            prefill_s=done.prefill_s,
            transfer_s=transfer_s,
            is_remote_prefill=True,
        )
        await worker.publish(
            [
                TokenChunk(
                    rid,
                    [done.first_token_id],
                    finished.finish_reason if finished else None,
                    len(request.token_ids),
                    reservation.num_cached_tokens,
                    None,
                    ttft,
                )
            ]
        )

    async def _prefill(
        self, prefill: WorkerState, request: EngineRequest, decode_id: InstanceId
    ) -> PrefillDone:
        message = PrefillRequest(
            request_id=request.request_id,
            token_ids=request.token_ids,
            sampling=request.sampling,
            decode_worker_id=decode_id,
        )
        prefill.in_flight += 1
        prefill.sent_since_report += 1
        try:
            data = await self._bus.request(
                prefill.info.subject, message, timeout_s=self._prefill_timeout_s
            )
        finally:
            prefill.in_flight -= 1
        reply = prefill_reply_decoder.decode(data)
        if isinstance(reply, ErrorReply):
            raise from_reply(reply)
        return reply

    async def _pull(
        self, prefill: WorkerState, done: PrefillDone, reservation: Reservation, engine: Engine
    ) -> int:
        """Read the blocks this engine does not cache; returns how many moved."""
        region = engine.kv_region
        if region is None:
            raise TransferError("this engine has no KV memory to receive into")
        if len(done.block_descriptors) != len(reservation.block_ids):
            raise TransferError(
                f"prefill sent {len(done.block_descriptors)} blocks; "
                f"{len(reservation.block_ids)} were reserved"
            )
        if done.kv_agent not in self._known_agents:
            self._agent.add_remote(prefill.info.kv_agent_metadata)
            self._known_agents.add(done.kv_agent)
        first = reservation.num_cached_tokens // engine.block_size
        transfers = []
        for (address, length), block_id in zip(
            done.block_descriptors[first:], reservation.block_ids[first:], strict=True
        ):
            if length != region.block_bytes:
                raise TransferError(f"block of {length} bytes; ours are {region.block_bytes}")
            transfers.append((address, region.block_address(block_id), length))
        if transfers:
            await self._agent.read(done.kv_agent, transfers)
        return len(transfers)

    async def _release(self, prefill: WorkerState, request_id: RequestId) -> None:
        await self._bus.publish(prefill.info.subject, KVRelease(request_id=request_id))

    async def _cleanup(self, prefill: WorkerState, request_id: RequestId, is_held: bool) -> None:
        """Free what the prefill worker holds (or is still computing) for this request."""
        try:
            if is_held:
                await self._release(prefill, request_id)
            else:
                await self._bus.publish(prefill.info.subject, AbortRequest(request_id=request_id))
        except ServingError as exc:
            logger.warning("prefill cleanup not sent request_id=%s error=%s", request_id, exc)

    async def _fall_back(
        self, worker: "DecodeWorker", request: EngineRequest, error: BaseException
    ) -> None:
        rid = request.request_id
        if rid not in worker.destinations:
            return  # aborted meanwhile
        self.num_fallbacks += 1
        logger.warning("remote prefill failed; prefilling here request_id=%s error=%r", rid, error)
        try:
            await worker.loop.add(request)
        except ServingError as exc:
            await worker.publish([TokenChunk(rid, [], FinishReason.ERROR, error=str(exc))])
