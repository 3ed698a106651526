"""The decode worker's own logic: requests in from the bus, tokens out per engine step.

It serves aggregated (prefill and decode here) and, when prefill workers exist, hands long
uncached prompts to one of them (``RemotePrefill``) and decodes once the KV has arrived.
"""

import asyncio
import logging
import time

import msgspec
from nats.aio.msg import Msg

from proto.messages import (
    AbortRequest,
    ErrorReply,
    FinishReason,
    GenerateAccepted,
    GenerateRequest,
    InstanceId,
    KVStateRequest,
    RequestId,
    TokenChunk,
)
from services.decode.remote_prefill import RemotePrefill
from shared.bus import Bus
from shared.codec import encode, worker_inbound_decoder
from shared.engine.interface import Engine, EngineRequest, StepResult
from shared.engine_worker import EngineWorker
from shared.errors import InvalidRequest, Overloaded, ServingError, Unavailable
from shared.streams import group_chunks, publish_chunks

logger = logging.getLogger(__name__)


class DecodeWorker(EngineWorker):
    """Serves one engine on the worker's inbox subject.

    A ``GenerateRequest`` is answered at once (accepted, or a typed ``ErrorReply``); its tokens
    then go to the request's ``stream_subject`` in one ``TokenBatch`` per step per frontend.
    """

    def __init__(
        self,
        bus: Bus,
        namespace: str,
        worker_id: InstanceId,
        engine: Engine,
        *,
        step_in_thread: bool,
        max_waiting: int,
        remote_prefill: RemotePrefill | None = None,
    ) -> None:
        super().__init__(bus, namespace, worker_id, engine, step_in_thread=step_in_thread)
        self._max_waiting = max_waiting
        self._remote = remote_prefill
        self.destinations: dict[RequestId, str] = {}
        self._prefill_tasks: dict[RequestId, asyncio.Task[None]] = {}

    async def start(self) -> None:
        await self.bus.subscribe(self.inbox, self._on_message)

    @property
    def num_in_flight(self) -> int:
        return len(self.destinations)

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
                await self.abort(request_id)
            case KVStateRequest():
                if msg.reply:
                    await self.bus.publish(msg.reply, await self.kv_state())

    async def _admit(self, request: GenerateRequest) -> GenerateAccepted | ErrorReply:
        rid = request.request_id
        try:
            if self.is_draining:
                raise Unavailable(f"worker {self.worker_id} is draining", retry_after_s=1.0)
            if not request.stream_subject:
                raise InvalidRequest("stream_subject is required")
            if rid in self.destinations:
                raise InvalidRequest(f"request {rid} is already running here")
            if self.loop.stats().num_waiting >= self._max_waiting:
                raise Overloaded(
                    f"worker {self.worker_id} has {self._max_waiting} requests waiting",
                    retry_after_s=1.0,
                )
            engine_request = EngineRequest(
                request_id=rid,
                token_ids=request.token_ids,
                sampling=request.sampling,
                arrival_time_s=time.monotonic(),
            )
            prefill = self._remote.choose(self.loop.engine, request) if self._remote else None
            if prefill is None:
                await self.loop.add(engine_request)
        except ServingError as exc:
            return exc.to_reply()
        self.destinations[rid] = request.stream_subject
        self.note_in_flight_changed()
        if prefill is not None:
            assert self._remote is not None
            task = asyncio.create_task(
                self._remote.run(self, engine_request, prefill), name=f"prefill {rid}"
            )
            self._prefill_tasks[rid] = task
            task.add_done_callback(lambda _: self._prefill_tasks.pop(rid, None))
        return GenerateAccepted(
            request_id=rid, worker_id=self.worker_id, num_prompt_tokens=len(request.token_ids)
        )

    async def _reply(self, msg: Msg, reply: GenerateAccepted | ErrorReply) -> None:
        await self.bus.publish_bytes(msg.reply, encode(reply))

    async def abort(self, request_id: RequestId) -> None:
        """The client left: stop the request wherever it is (remote prefill, queue, batch)."""
        if self.destinations.pop(request_id, None) is None:
            return
        task = self._prefill_tasks.pop(request_id, None)
        if task is not None:
            task.cancel()  # its cleanup frees the remote and the reserved blocks
        await self.loop.abort(request_id)
        self.note_in_flight_changed()
        logger.debug("request aborted request_id=%s", request_id)

    async def publish(self, chunks: list[TokenChunk]) -> None:
        """Send chunks to their frontends; a finished request stops being in flight."""
        pairs = []
        for chunk in chunks:
            subject = self.destinations.get(chunk.request_id)
            if subject is None:
                continue  # aborted while the step ran
            if chunk.finish_reason is not None:
                del self.destinations[chunk.request_id]
            pairs.append((subject, chunk))
        if pairs:
            await publish_chunks(self.bus, self.worker_id, group_chunks(pairs))
            self.note_in_flight_changed()

    async def handle_outputs(self, result: StepResult) -> None:
        await self.publish(
            [
                TokenChunk(
                    out.request_id,
                    out.new_token_ids,
                    out.finish_reason,
                    out.num_prompt_tokens,
                    out.num_cached_tokens,
                )
                for out in result.outputs
            ]
        )

    async def abort_all(self, reason: str) -> None:
        leftover = list(self.destinations)
        for task in list(self._prefill_tasks.values()):
            task.cancel()
        for request_id in leftover:
            await self.loop.abort(request_id)
        await self.publish(
            [TokenChunk(rid, [], FinishReason.ABORT, error=reason) for rid in leftover]
        )
