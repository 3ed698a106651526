"""The prefill worker's own logic: compute prompts, hold their KV until a decode worker has
read it, and say where it lies."""

import asyncio
import logging
import time
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg

from proto.messages import (
    AbortRequest,
    InstanceId,
    KVRelease,
    KVStateRequest,
    PrefillDone,
    PrefillRequest,
    RequestId,
)
from shared.bus import Bus
from shared.codec import encode, prefill_inbound_decoder
from shared.engine.interface import Engine, EngineRequest, StepResult, prefill_sampling
from shared.engine_worker import EngineWorker
from shared.errors import EngineError, InvalidRequest, Overloaded, ServingError, Unavailable

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Pending:
    reply_subject: str
    arrived_s: float
    hold_timeout_s: float


class PrefillWorker(EngineWorker):
    """Answers ``PrefillRequest`` once the prompt is computed, with the descriptors of its
    blocks; frees them on ``KVRelease``, on ``AbortRequest`` or when the hold times out."""

    def __init__(
        self,
        bus: Bus,
        namespace: str,
        worker_id: InstanceId,
        engine: Engine,
        *,
        step_in_thread: bool,
        agent_name: str,
        max_waiting: int,
        max_hold_s: float,
    ) -> None:
        super().__init__(bus, namespace, worker_id, engine, step_in_thread=step_in_thread)
        self._agent_name = agent_name
        self._max_waiting = max_waiting
        self._max_hold_s = max_hold_s
        self._pending: dict[RequestId, _Pending] = {}
        self._held: dict[RequestId, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.num_hold_timeouts = 0

    async def start(self) -> None:
        await self.bus.subscribe(self.inbox, self._on_message)

    @property
    def num_in_flight(self) -> int:
        return len(self._pending) + len(self._held)

    async def _on_message(self, msg: Msg) -> None:
        try:
            message = prefill_inbound_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            logger.warning("bad prefill message subject=%s error=%s", msg.subject, exc)
            if msg.reply:
                error = InvalidRequest(f"malformed message: {exc}")
                await self.bus.publish_bytes(msg.reply, encode(error.to_reply()))
            return
        match message:
            case PrefillRequest():
                await self._admit(message, msg.reply)
            case KVRelease(request_id=request_id) | AbortRequest(request_id=request_id):
                await self._forget(request_id)
            case KVStateRequest():
                if msg.reply:
                    await self.bus.publish(msg.reply, await self.kv_state())

    async def _admit(self, request: PrefillRequest, reply_subject: str) -> None:
        rid = request.request_id
        try:
            if not reply_subject:
                raise InvalidRequest("a PrefillRequest needs a reply subject")
            if self.is_draining:
                raise Unavailable(f"prefill worker {self.worker_id} is draining")
            if rid in self._pending or rid in self._held:
                raise InvalidRequest(f"request {rid} is already here")
            if self.loop.stats().num_waiting >= self._max_waiting:
                raise Overloaded(f"prefill worker {self.worker_id} queue is full")
            await self.loop.add(
                EngineRequest(
                    request_id=rid,
                    token_ids=request.token_ids,
                    sampling=prefill_sampling(request.sampling),
                    arrival_time_s=time.monotonic(),
                    hold_kv=True,
                )
            )
        except ServingError as exc:
            if reply_subject:
                await self.bus.publish_bytes(reply_subject, encode(exc.to_reply()))
            return
        hold_s = min(request.hold_timeout_s, self._max_hold_s)
        self._pending[rid] = _Pending(reply_subject, time.monotonic(), hold_s)
        self.note_in_flight_changed()

    async def handle_outputs(self, result: StepResult) -> None:
        region = self.loop.engine.kv_region
        for out in result.outputs:
            pending = self._pending.pop(out.request_id, None)
            if pending is None or out.finish_reason is None:
                continue
            engine = self.loop.engine
            if region is None or not out.new_token_ids:
                engine.abort(out.request_id)
                error = EngineError("prefill produced no transferable KV")
                await self.bus.publish_bytes(pending.reply_subject, encode(error.to_reply()))
                continue
            blocks = engine.held_blocks(out.request_id)
            done = PrefillDone(
                request_id=out.request_id,
                worker_id=self.worker_id,
                first_token_id=out.new_token_ids[0],
                num_prompt_tokens=out.num_prompt_tokens,
                num_cached_tokens=out.num_cached_tokens,
                kv_agent=self._agent_name,
                block_descriptors=[(region.block_address(b), region.block_bytes) for b in blocks],
                queue_s=max(0.0, time.monotonic() - pending.arrived_s - result.duration_s),
                prefill_s=result.duration_s,
            )
            self._held[out.request_id] = asyncio.get_running_loop().call_later(
                pending.hold_timeout_s, self._hold_expired, out.request_id
            )
            await self.bus.publish_bytes(pending.reply_subject, encode(done))
        self.note_in_flight_changed()

    def _hold_expired(self, request_id: RequestId) -> None:
        """The decode worker never pulled (it died, say): free the blocks anyway."""
        if self._held.pop(request_id, None) is None:
            return
        self.num_hold_timeouts += 1
        logger.warning("KV hold timed out; releasing request_id=%s", request_id)
        # Between steps on the loop thread: the engine is not stepping unless in a thread.
        task = asyncio.get_running_loop().create_task(self._release(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _release(self, request_id: RequestId) -> None:
        async with self.loop.exclusive() as engine:
            engine.release(request_id)
        self.note_in_flight_changed()

    async def _forget(self, request_id: RequestId) -> None:
        """Free a request at any stage: queued or computing (abort) or held (release)."""
        timer = self._held.pop(request_id, None)
        if timer is not None:
            timer.cancel()
            await self._release(request_id)
            return
        if self._pending.pop(request_id, None) is not None:
            await self.loop.abort(request_id)
            self.note_in_flight_changed()

    async def abort_all(self, reason: str) -> None:
        for request_id in [*self._pending, *self._held]:
            pending = self._pending.get(request_id)
            if pending is not None:
                error = Unavailable(f"prefill worker {self.worker_id}: {reason}")
                await self.bus.publish_bytes(pending.reply_subject, encode(error.to_reply()))
            await self._forget(request_id)
