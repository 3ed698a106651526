"""The decode role: generate requests in from the bus, tokens out per engine step.

A request the router placed with a ``prefill_worker_id`` is prefilled there and its KV pulled
here (``handoff.RemotePrefill``); any other is prefilled here. The router alone decides which;
this role only falls back to a local prefill when the handoff fails.

Live migration: a request that carries a ``kv_source`` moved from a draining peer, and its KV is
pulled from there (``RemotePrefill.start_move``). When this worker drains, ``hand_off`` gives
its own running streams up the same way (``lender.KVLender``).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import ClassVar

import msgspec

from proto import subjects
from proto.messages import (
    ACCEPT_HOLD_S,
    FinishReason,
    GenerateAccepted,
    GenerateRequest,
    RequestId,
    TokenBatch,
    TokenChunk,
    WorkerRole,
)
from services.worker.handoff import RemotePrefill
from services.worker.inflight import InFlight
from services.worker.lender import Detached, KVLender
from services.worker.objectives import Admission
from services.worker.role import Role, WorkerContext
from shared.codec import encode
from shared.engine.interface import EngineRequest, StepResult
from shared.errors import InvalidRequest, ServingError, Shed
from shared.logs import RateLimitedLog
from shared.streams import encode_batches, group_chunks

logger = logging.getLogger(__name__)

# Errors a handoff is expected to meet (a peer refused, died, timed out; a transfer or a
# reply failed); anything else is a bug, logged with its traceback before the fallback.
_EXPECTED = (ServingError, TimeoutError, KeyError, msgspec.DecodeError)
# NATS refuses a control line (PUB <subject> <reply> <size>) over 4 KiB by closing the
# connection: a stream subject stays far below that.
_MAX_STREAM_SUBJECT_CHARS = 256
MOVED = "the worker is draining or changing role; the stream moves to another worker"
# How long a drain waits for the step boundary at which its streams move.
_BOUNDARY_TIMEOUT_S = 5.0
# Acceptances sent on their own go in messages of at most this many ids.
_MAX_ACCEPTED_PER_BATCH = 4096


class DecodeRole(Role):
    """Streams each request's tokens to its frontend (``GenerateRequest.stream_subject``)."""

    kind: ClassVar[WorkerRole] = WorkerRole.DECODE
    request_type: ClassVar[type[GenerateRequest]] = GenerateRequest

    def __init__(self, context: WorkerContext) -> None:
        self.context = context
        self.in_flight: InFlight[str] = InFlight()  # request id -> stream subject
        self.remote: RemotePrefill | None = None  # set when this worker can receive KV
        self.lender: KVLender | None = None  # set when it can give KV (live migration out)
        self.has_peer: Callable[[], bool] = lambda: False  # a live decode peer to move to?
        self.num_fallbacks = 0
        self.num_moved_out = 0  # streams handed off at drain, with their KV or without
        # Requests that finished here with output, and their output tokens (resumed included).
        self.num_finished = 0
        self.num_finished_output_tokens = 0
        self.hold_timeout_s = 30.0  # how long moved streams' KV waits for their new workers
        self.drain_handoff = "kv"  # what a drain does with the streams (see the config)
        self._log = RateLimitedLog(logger)
        self._moving: asyncio.Future[None] | None = None  # set while a drain moves streams
        # Steps faster than this go out together: a step's chunks wait (at most this long,
        # or one step more) for the next ones, one message per frontend for all (see
        # ``deliver``). 0: every step's at once.
        self.publish_interval_s = 0.0
        self._pending: list[TokenChunk] = []
        self._published_s = 0.0  # when chunks last went out (time.monotonic)
        self._holds: bool | None = None  # holds_output's decision for the coming deliver
        # One publish at a time: a publish awaits the bus once per destination, and the bus
        # yields when its outbound buffer is over its limit; another publish interleaved then
        # (an abort's ``end`` sending what is held, say) could put a stream's later chunks on
        # the bus before its earlier ones.
        self._publish_lock = asyncio.Lock()
        # Requests taken with ``answer_on_stream`` that no chunk has told of yet -> their
        # stream subject; ``_accept_held`` tells of those left every ACCEPT_HOLD_S.
        self._unanswered: dict[RequestId, str] = {}
        self._acceptor: asyncio.Task[None] | None = None

    @property
    def num_handoffs(self) -> int:
        return len(self.remote) if self.remote is not None else 0

    def prefills_here(self, request: GenerateRequest) -> bool:
        # A resumed (migrated) request recomputes its KV here, unless it moved live (its KV
        # comes from the peer it left): its tokens are not a prompt a prefill worker would
        # sample the same first token for.
        if self.remote is None:
            return True
        if request.kv_source is not None:
            return False
        return request.prefill_worker_id is None or bool(request.resume_token_ids)

    async def admit(
        self, request: GenerateRequest, reply_subject: str, admission: Admission
    ) -> None:
        rid = request.request_id
        self._check_stream_subject(request.stream_subject)
        engine_request = EngineRequest(
            request_id=rid,
            token_ids=request.token_ids,
            sampling=request.sampling,
            arrival_time_s=time.monotonic(),
            priority=admission.priority,
            deadline_s=admission.deadline_s,
            resumed_token_ids=request.resume_token_ids,
        )
        remote = None if self.prefills_here(request) else self.remote
        if remote is None:
            await self.context.loop.add(engine_request)  # raises InvalidRequest at once
        self.in_flight.add(rid, request.stream_subject)
        if remote is not None:
            if request.kv_source is not None:
                remote.start_move(engine_request, request.kv_source)
            else:
                assert request.prefill_worker_id is not None
                remote.start(engine_request, request.prefill_worker_id, admitted=request.admitted)
        if request.answer_on_stream:
            self._unanswered[rid] = request.stream_subject
            if self._acceptor is None or self._acceptor.done():
                self._acceptor = asyncio.create_task(self._accept_held(), name="accept-held")
        elif reply_subject:
            accepted = GenerateAccepted(
                request_id=rid,
                worker_id=self.context.worker_id,
                num_prompt_tokens=len(request.token_ids),
            )
            await self.context.bus.publish_bytes(reply_subject, encode(accepted))

    async def _accept_held(self) -> None:
        """Every ACCEPT_HOLD_S while any is left, tell each frontend of the requests it sent
        that no chunk has told of: one ``TokenBatch`` with no chunks a frontend, however many
        requests (a request that ended meanwhile is left out)."""
        while self._unanswered:
            await asyncio.sleep(ACCEPT_HOLD_S)
            held, self._unanswered = self._unanswered, {}
            by_subject: dict[str, list[RequestId]] = {}
            for rid, subject in held.items():
                if rid in self.in_flight:
                    by_subject.setdefault(subject, []).append(rid)
            for subject, ids in by_subject.items():
                for start in range(0, len(ids), _MAX_ACCEPTED_PER_BATCH):
                    batch = TokenBatch(
                        worker_id=self.context.worker_id,
                        chunks=[],
                        accepted=ids[start : start + _MAX_ACCEPTED_PER_BATCH],
                    )
                    try:
                        await self.context.bus.publish_bytes(subject, encode(batch))
                    except ServingError as exc:  # the frontend times them out and moves on
                        self._log.log(
                            "accept", "acceptances not sent subject=%s error=%s", subject, exc
                        )

    def _check_stream_subject(self, subject: str) -> None:
        """Tokens go only to a stream inbox of this namespace: any other string could be a
        subject NATS refuses (whitespace: the client raises; past its control-line limit: the
        server drops our connection) or one that is not a stream's (a wildcard, a service's
        inbox)."""
        frontend_id = subject.rpartition(".")[2]
        try:
            expected = subjects.stream_inbox(self.context.namespace, frontend_id)
        except ValueError:
            expected = ""
        if not subject or subject != expected or len(subject) > _MAX_STREAM_SUBJECT_CHARS:
            raise InvalidRequest(
                f"stream_subject must be a stream inbox of namespace {self.context.namespace} "
                f"of at most {_MAX_STREAM_SUBJECT_CHARS} characters, got {subject[:80]!r}"
            )

    def holds_output(self) -> bool:
        self._holds = self._should_hold()
        return self._holds

    def _should_hold(self) -> bool:
        moving = self._moving is not None and not self._moving.done()
        return (
            self.publish_interval_s > 0
            and not moving
            and time.monotonic() - self._published_s < self.publish_interval_s
            and self.context.loop.has_work()
        )

    async def deliver(self, result: StepResult) -> None:
        """Publish a step's chunks, or hold them for the next step's: each message costs the
        worker, the bus and the frontend a fixed price whatever it carries, and an engine
        that steps faster than ``publish_interval_s`` would pay it for a token or two. They
        go out once the interval has passed since the last message, when the engine has
        nothing left to step (so a last chunk never waits for a step that will not come), or
        with anything else this role publishes (in order: ``publish`` and ``end`` send what
        is held first). The decision is the one ``holds_output`` took for this step, if it
        was asked (the shell holds the step's KV events by it)."""
        holds = self._holds if self._holds is not None else self._should_hold()
        self._holds = None
        chunks = [
            TokenChunk(
                out.request_id,
                out.new_token_ids,
                out.finish_reason,
                out.num_prompt_tokens,
                out.num_cached_tokens,
                num_output_tokens=out.num_output_tokens,
                logprobs=out.logprobs,
            )
            for out in result.outputs
        ]
        if holds:
            self._pending += chunks
        else:
            await self.publish(chunks)
        if self._moving is not None and not self._moving.done():
            await self._move_out()  # a step boundary with every output published

    # --- live migration out (drain) ------------------------------------------------------------

    async def move_out(self) -> int:
        """Move every stream to a peer at the next step boundary (see ``lender``): running
        ones with their KV (``drain_handoff`` "kv", when this worker can give KV) or without
        it ("recompute"). Returns how many streams moved; 0, changing nothing, for "finish"
        or when no decode peer is live (the streams then finish here). The moved streams' KV
        stays lent until the peers release it (``hand_off`` and ``settle`` wait for that)."""
        if self.drain_handoff == "finish" or not self.in_flight or not self.has_peer():
            return 0
        num_before = self.num_moved_out
        self._moving = asyncio.get_running_loop().create_future()
        async with self.context.loop.exclusive() as engine:
            is_stepping = engine.has_unfinished()
        if is_stepping:
            try:  # the engine loop's next delivery moves them
                async with asyncio.timeout(_BOUNDARY_TIMEOUT_S):
                    await asyncio.shield(self._moving)
            except TimeoutError:
                await self._move_out()
        else:
            await self._move_out()
        return self.num_moved_out - num_before

    async def hand_off(self) -> int:
        """At drain: ``move_out``, then wait until the peers have read the KV (at most
        ``hold_timeout_s``). Returns how many streams moved."""
        num_moved = await self.move_out()
        if self.lender is not None:
            await self.lender.wait_released(self.hold_timeout_s)
        return num_moved

    async def settle(self, timeout_s: float) -> None:
        """Retired: the streams not moved finish here (or end at ``timeout_s``: the frontend
        moves them on), and the KV lent to peers is read or freed after ``hold_timeout_s``."""
        await super().settle(timeout_s)
        if self.lender is not None:
            await self.lender.wait_released(self.hold_timeout_s)

    def counters(self) -> dict[str, float]:
        remote, lender = self.remote, self.lender
        return {
            "baton_worker_remote_prefills": remote.num_remote if remote is not None else 0,
            "baton_worker_prefill_fallbacks": self.num_fallbacks,
            "baton_worker_moved_in": remote.num_moved_in if remote is not None else 0,
            "baton_worker_moved_in_blocks": remote.num_moved_blocks if remote is not None else 0,
            "baton_worker_moved_in_bytes": remote.num_moved_bytes if remote is not None else 0,
            "baton_worker_moved_out": self.num_moved_out,
            "baton_worker_finished_requests": self.num_finished,
            "baton_worker_finished_output_tokens": self.num_finished_output_tokens,
            "baton_worker_lent_kv_blocks": lender.num_lent_blocks if lender is not None else 0,
        }

    async def _move_out(self) -> None:
        moving, lender = self._moving, self.lender
        if moving is None or moving.done():
            return
        remote = self.remote
        async with self.context.loop.exclusive() as engine:
            request_ids = list(self.in_flight)
            in_handoff = [rid for rid in request_ids if remote is not None and rid in remote]
            in_engine = [rid for rid in request_ids if rid not in in_handoff]
            if lender is not None and self.drain_handoff == "kv":
                detached = lender.detach(engine, in_engine)
            else:
                detached = Detached({}, in_engine)
            for rid in detached.without_kv:
                engine.abort(rid)
        for rid in in_handoff:  # its cleanup frees the reservation and the prefill worker
            assert remote is not None
            remote.cancel(rid)
        chunks = [
            TokenChunk(rid, [], FinishReason.ABORT, error=MOVED, moved_kv=handle)
            for rid, handle in detached.handles.items()
        ]
        chunks += [
            TokenChunk(rid, [], FinishReason.ABORT, error=MOVED)
            for rid in (*detached.without_kv, *in_handoff)
        ]
        self.num_moved_out += len(chunks)
        moving.set_result(None)
        logger.info(
            "[shutdown] streams move num_with_kv=%d num_without=%d",
            len(detached.handles),
            len(chunks) - len(detached.handles),
        )
        await self.publish(chunks)

    async def release(self, request_id: RequestId) -> None:
        if self.lender is not None:
            await self.lender.release(request_id)

    async def publish(self, chunks: list[TokenChunk]) -> None:
        """Send chunks to their frontends, one message per destination; a finished request
        leaves ``in_flight``. A destination that cannot be reached (a chunk over the bus's
        payload limit, a closed connection) ends only its own requests. Chunks that
        ``deliver`` held go first; publishes go out in the order they are called."""
        async with self._publish_lock:
            if self._pending:
                chunks = self._pending + chunks
                self._pending = []
            self._published_s = time.monotonic()
            await self._publish(chunks)

    async def _publish(self, chunks: list[TokenChunk]) -> None:
        pairs = []
        in_flight = self.in_flight
        unanswered = self._unanswered
        for chunk in chunks:
            subject = in_flight.get(chunk.request_id)
            if subject is None:
                continue  # ended while the step ran
            if unanswered:
                unanswered.pop(chunk.request_id, None)  # its chunk tells it was taken
            if chunk.finish_reason is not None:
                in_flight.pop(chunk.request_id)
                if chunk.num_output_tokens:  # not shed before its first token
                    self.num_finished += 1
                    self.num_finished_output_tokens += chunk.num_output_tokens
            pairs.append((subject, chunk))
        bus = self.context.bus
        for subject, group in group_chunks(pairs).items():
            try:
                for payload in encode_batches(self.context.worker_id, group, bus.max_payload):
                    await bus.publish_bytes(subject, payload)
            except ServingError as exc:
                self._log.log(
                    "not delivered", "chunks not delivered subject=%s error=%s", subject, exc
                )
                for chunk in group:
                    await self._abort(chunk.request_id)

    async def end(
        self, request_id: RequestId, reason: FinishReason, error: str | None = None
    ) -> None:
        if self._pending:  # the tokens it had before it ended go first
            await self.publish([])
        subject = self.in_flight.pop(request_id)
        if subject is None:
            return
        self._unanswered.pop(request_id, None)  # its error chunk, or nobody, is told
        await self._abort(request_id)
        if error is None:
            return
        chunk = TokenChunk(request_id, [], reason, error=error)
        try:
            payloads = encode_batches(self.context.worker_id, [chunk], self.context.bus.max_payload)
            async with self._publish_lock:  # after any publish already on its way
                for payload in payloads:
                    await self.context.bus.publish_bytes(subject, payload)
        except ServingError as exc:
            self._log.log(
                "end not delivered", "end not delivered request_id=%s error=%s", request_id, exc
            )

    async def _abort(self, request_id: RequestId) -> None:
        self.in_flight.pop(request_id)
        if self.remote is not None:
            self.remote.cancel(request_id)
        if self.lender is not None and request_id in self.lender.lent:
            await self.lender.release(request_id)  # its move was not delivered
            return
        await self.context.loop.abort(request_id)

    # --- handoff outcomes ----------------------------------------------------------------------

    async def on_handoff_ready(self, chunk: TokenChunk) -> None:
        await self.publish([chunk])

    async def on_handoff_failed(self, request: EngineRequest, error: BaseException) -> None:
        """Prefill here instead; if even that fails, end the request with the error. A
        request the prefill worker shed, or whose deadline has passed, is shed here too."""
        rid = request.request_id
        if rid not in self.in_flight:
            return  # ended meanwhile
        deadline = request.deadline_s
        if isinstance(error, Shed) or (deadline is not None and time.monotonic() >= deadline):
            await self.end(rid, FinishReason.SHED, str(error))
            return
        self.num_fallbacks += 1
        if isinstance(error, _EXPECTED):
            self._log.log(
                "fallback",
                "remote prefill failed; prefilling here request_id=%s error=%r num_fallbacks=%d",
                rid,
                error,
                self.num_fallbacks,
            )
        else:
            logger.error(
                "remote prefill broke; prefilling here request_id=%s",
                rid,
                exc_info=(type(error), error, error.__traceback__),
            )
        try:
            await self.context.loop.add(request)
        except ServingError as exc:
            await self.end(rid, FinishReason.ERROR, str(exc))

    async def close(self) -> None:
        if self._pending:
            await self.publish([])
        if self._acceptor is not None:
            self._acceptor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceptor
        if self.remote is not None:
            await self.remote.close()
