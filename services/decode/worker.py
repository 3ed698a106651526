"""The decode worker's own logic: requests in from the bus, tokens out per engine step."""

import asyncio
import logging
import time

import msgspec
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import (
    AbortRequest,
    ErrorReply,
    FinishReason,
    GenerateAccepted,
    GenerateRequest,
    InstanceId,
    KVEventBatch,
    LoadMetrics,
    RequestId,
    TokenChunk,
)
from shared.bus import Bus
from shared.codec import encode, worker_inbound_decoder
from shared.engine.interface import Engine, EngineRequest, StepResult
from shared.engine.loop import EngineLoop
from shared.errors import InvalidRequest, Overloaded, ServingError, Unavailable
from shared.streams import group_chunks, publish_chunks

logger = logging.getLogger(__name__)


class DecodeWorker:
    """Serves one engine on the worker's inbox subject.

    A ``GenerateRequest`` is answered at once (accepted, or a typed ``ErrorReply``); its tokens
    then go to the request's ``stream_subject`` in one ``TokenBatch`` per step per frontend.
    """

    def __init__(
        self,
        bus: Bus,
        worker_id: InstanceId,
        namespace: str,
        engine: Engine,
        *,
        max_waiting: int,
        step_in_thread: bool = False,
    ) -> None:
        self.worker_id = worker_id
        self.inbox = subjects.worker_inbox(namespace, worker_id)
        self._namespace = namespace
        self._bus = bus
        self._loop = EngineLoop(engine, self.on_step, step_in_thread=step_in_thread)
        self._max_waiting = max_waiting
        self._destinations: dict[RequestId, str] = {}
        self._kv_event_seq = 0
        self._drained = asyncio.Event()
        self.is_draining = False

    async def start(self) -> None:
        await self._bus.subscribe(self.inbox, self._on_message)

    async def run_engine(self) -> None:
        """Step the engine until cancelled."""
        await self._loop.run()

    @property
    def num_in_flight(self) -> int:
        return len(self._destinations)

    async def _on_message(self, msg: Msg) -> None:
        try:
            message = worker_inbound_decoder.decode(msg.data)
        except msgspec.DecodeError as exc:
            logger.warning("bad worker message subject=%s error=%s", msg.subject, exc)
            if msg.reply:
                await self._reply(msg, InvalidRequest(f"malformed message: {exc}").to_reply())
            return
        match message:
            case GenerateRequest():
                reply = await self._admit(message)
                if msg.reply:
                    await self._reply(msg, reply)
            case AbortRequest(request_id=request_id):
                if self._destinations.pop(request_id, None) is not None:
                    await self._loop.abort(request_id)
                    logger.debug("request aborted request_id=%s", request_id)
                    if self.is_draining and not self._destinations:
                        self._drained.set()

    async def _admit(self, request: GenerateRequest) -> GenerateAccepted | ErrorReply:
        try:
            if self.is_draining:
                raise Unavailable(f"worker {self.worker_id} is draining", retry_after_s=1.0)
            if not request.stream_subject:
                raise InvalidRequest("stream_subject is required")
            if request.request_id in self._destinations:
                raise InvalidRequest(f"request {request.request_id} is already running here")
            if self._loop.stats().num_waiting >= self._max_waiting:
                raise Overloaded(
                    f"worker {self.worker_id} has {self._max_waiting} requests waiting",
                    retry_after_s=1.0,
                )
            await self._loop.add(
                EngineRequest(
                    request_id=request.request_id,
                    token_ids=request.token_ids,
                    sampling=request.sampling,
                    arrival_time_s=time.monotonic(),
                )
            )
        except ServingError as exc:
            return exc.to_reply()
        self._destinations[request.request_id] = request.stream_subject
        return GenerateAccepted(
            request_id=request.request_id,
            worker_id=self.worker_id,
            num_prompt_tokens=len(request.token_ids),
        )

    async def _reply(self, msg: Msg, reply: GenerateAccepted | ErrorReply) -> None:
        await self._bus.publish_bytes(msg.reply, encode(reply))

    async def on_step(self, result: StepResult) -> None:
        """Publish one step's tokens (one message per frontend) and its KV events."""
        destinations = self._destinations
        pairs = []
        for out in result.outputs:
            subject = destinations.get(out.request_id)
            if subject is None:
                continue  # aborted while the step ran
            if out.finish_reason is not None:
                del destinations[out.request_id]
                if self.is_draining and not destinations:
                    self._drained.set()
            pairs.append(
                (
                    subject,
                    TokenChunk(
                        out.request_id,
                        out.new_token_ids,
                        out.finish_reason,
                        out.num_prompt_tokens,
                        out.num_cached_tokens,
                    ),
                )
            )
        if pairs:
            await publish_chunks(self._bus, self.worker_id, group_chunks(pairs))
        events = self._loop.engine.take_kv_events()
        if events:
            self._kv_event_seq += 1
            await self._bus.publish(
                subjects.kv_events(self._namespace, self.worker_id),
                KVEventBatch(worker_id=self.worker_id, seq=self._kv_event_seq, events=events),
            )

    def load_metrics(self) -> LoadMetrics:
        stats = self._loop.stats()
        return LoadMetrics(
            worker_id=self.worker_id,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            num_free_blocks=stats.num_free_blocks,
            num_total_blocks=stats.num_total_blocks,
            kv_usage=stats.kv_usage,
            is_draining=self.is_draining,
        )

    async def publish_load(self, interval_s: float) -> None:
        """Publish load metrics every ``interval_s`` until cancelled."""
        subject = subjects.load_metrics(self._namespace, self.worker_id)
        while True:
            await self._bus.publish(subject, self.load_metrics())
            await asyncio.sleep(interval_s)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new work, let in-flight requests finish for up to ``timeout_s``, then end the
        rest with an ABORT chunk that says why (so no client stream hangs)."""
        self.is_draining = True
        await self._bus.publish(
            subjects.load_metrics(self._namespace, self.worker_id), self.load_metrics()
        )
        if not self._destinations:
            self._drained.set()
        try:
            async with asyncio.timeout(timeout_s):
                await self._drained.wait()
        except TimeoutError:
            pass
        leftover = list(self._destinations.items())
        self._destinations.clear()
        for request_id, _ in leftover:
            await self._loop.abort(request_id)
        if leftover:
            logger.warning("drain deadline passed; aborting num_requests=%d", len(leftover))
            await publish_chunks(
                self._bus,
                self.worker_id,
                group_chunks(
                    (subject, TokenChunk(rid, [], FinishReason.ABORT, error="worker shut down"))
                    for rid, subject in leftover
                ),
            )
