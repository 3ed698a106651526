"""The prefill role: compute prompts, hold their KV until a decode worker has read it, and
say where it lies."""

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import ClassVar

from proto.messages import (
    FinishReason,
    PrefillDone,
    PrefillRequest,
    RequestId,
    WorkerRole,
)
from services.worker.inflight import InFlight
from services.worker.objectives import Admission
from services.worker.role import Role, WorkerContext
from shared.codec import encode
from shared.engine.interface import EngineRequest, RequestOutput, StepResult, prefill_sampling
from shared.engine.kv_connector import KVConnector
from shared.errors import EngineError, InvalidRequest, ServingError, Shed, Unavailable
from shared.logs import RateLimitedLog

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Prefill:
    reply_subject: str
    arrived_s: float
    hold_timeout_s: float
    hold_deadline_s: float | None = None  # set once computed: its blocks are then held


class PrefillRole(Role):
    """Answers ``PrefillRequest`` once the prompt is computed, with the descriptors of its
    blocks; frees them on ``KVRelease``, on ``AbortRequest`` or when the hold times out."""

    kind: ClassVar[WorkerRole] = WorkerRole.PREFILL
    request_type: ClassVar[type[PrefillRequest]] = PrefillRequest

    def __init__(
        self,
        context: WorkerContext,
        connector: KVConnector,
        agent_name: str,
        *,
        max_hold_s: float,
        sweep_interval_s: float = 0.25,
    ) -> None:
        self.context = context
        self.in_flight: InFlight[_Prefill] = InFlight()
        self._connector = connector
        self._agent_name = agent_name
        self._max_hold_s = max_hold_s
        self._sweep_interval_s = sweep_interval_s
        self.num_hold_timeouts = 0
        self.num_served = 0  # prompts computed and described to a decode worker
        self._log = RateLimitedLog(logger)

    async def admit(
        self, request: PrefillRequest, reply_subject: str, admission: Admission
    ) -> None:
        if not reply_subject:
            raise InvalidRequest("a PrefillRequest needs a reply subject")
        if not request.hold_timeout_s > 0:  # also NaN: a hold that never ends leaks its blocks
            raise InvalidRequest(f"hold_timeout_s must be > 0, got {request.hold_timeout_s}")
        rid = request.request_id
        await self.context.loop.add(
            EngineRequest(
                request_id=rid,
                token_ids=request.token_ids,
                sampling=prefill_sampling(request.sampling),
                arrival_time_s=time.monotonic(),
                hold_kv=True,
                priority=admission.priority,
                deadline_s=admission.deadline_s,
            )
        )
        hold_s = min(request.hold_timeout_s, self._max_hold_s)
        self.in_flight.add(rid, _Prefill(reply_subject, time.monotonic(), hold_s))

    async def deliver(self, result: StepResult) -> None:
        for out in result.outputs:
            entry = self.in_flight.get(out.request_id)
            if entry is None or out.finish_reason is None or entry.hold_deadline_s is not None:
                continue
            if out.finish_reason is FinishReason.SHED:
                await self.end(out.request_id, FinishReason.SHED, "its deadline passed")
                continue
            try:
                done = self._done(out, entry, result.duration_s)
            except ServingError as exc:
                await self.end(out.request_id, FinishReason.ERROR, str(exc))
                continue
            entry.hold_deadline_s = time.monotonic() + entry.hold_timeout_s
            self.num_served += 1
            try:
                await self.context.bus.publish_bytes(entry.reply_subject, encode(done))
            except ServingError as exc:
                self._log.log(
                    "not delivered",
                    "prefill not delivered request_id=%s error=%s",
                    out.request_id,
                    exc,
                )
                await self.end(out.request_id, FinishReason.ERROR)

    def _done(self, out: RequestOutput, entry: _Prefill, duration_s: float) -> PrefillDone:
        if not out.new_token_ids or out.held_block_ids is None:
            raise EngineError("prefill produced no transferable KV")
        return PrefillDone(
            request_id=out.request_id,
            worker_id=self.context.worker_id,
            first_token_id=out.new_token_ids[0],
            num_prompt_tokens=out.num_prompt_tokens,
            num_cached_tokens=out.num_cached_tokens,
            kv_agent=self._agent_name,
            block_descriptors=self._connector.describe(out.held_block_ids),
            queue_s=max(0.0, time.monotonic() - entry.arrived_s - duration_s),
            prefill_s=duration_s,
            first_token_logprobs=out.logprobs[0] if out.logprobs else None,
        )

    async def release(self, request_id: RequestId) -> None:
        await self.end(request_id, FinishReason.STOP)

    async def end(
        self, request_id: RequestId, reason: FinishReason, error: str | None = None
    ) -> None:
        """Free a request at any stage: queued or computing (abort) or held (release); a
        requester still waiting for ``PrefillDone`` gets the error instead."""
        entry = self.in_flight.pop(request_id)
        if entry is None:
            return
        async with self.context.loop.exclusive() as engine:
            engine.abort(request_id)  # releases a held request's blocks
        if entry.hold_deadline_s is None and error is not None:
            where = f"prefill worker {self.context.worker_id}: {error}"
            cls = Shed if reason is FinishReason.SHED else Unavailable
            reply = cls(where).to_reply()
            try:
                await self.context.bus.publish_bytes(entry.reply_subject, encode(reply))
            except ServingError as exc:
                self._log.log(
                    "error not sent",
                    "prefill error not sent request_id=%s error=%s",
                    request_id,
                    exc,
                )

    def counters(self) -> dict[str, float]:
        return {
            "baton_worker_hold_timeouts": self.num_hold_timeouts,
            "baton_worker_prefills_served": self.num_served,
        }

    async def run(self) -> None:
        """Free holds no decode worker released in time (it died, say)."""
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            now = time.monotonic()
            expired = [
                rid
                for rid in self.in_flight
                if (entry := self.in_flight.get(rid)) is not None
                and entry.hold_deadline_s is not None
                and entry.hold_deadline_s <= now
            ]
            for rid in expired:
                self.num_hold_timeouts += 1
                self._log.log(
                    "hold timeout",
                    "KV hold timed out; releasing request_id=%s num_hold_timeouts=%d",
                    rid,
                    self.num_hold_timeouts,
                )
                await self.end(rid, FinishReason.STOP)
