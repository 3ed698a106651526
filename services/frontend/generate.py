"""Send one request to a worker and follow its token stream; abort it if the client leaves."""

import asyncio
import logging
import time
import uuid
from array import array
from collections.abc import AsyncGenerator, Callable, Sequence
from collections.abc import Set as AbstractSet

from proto import subjects
from proto.messages import (
    AbortRequest,
    ErrorReply,
    FinishReason,
    GenerateRequest,
    InstanceId,
    KVHandle,
    RequestId,
    RouteDecision,
    RouteRequest,
    SamplingParams,
    TokenChunk,
)
from services.frontend.objectives import RequestObjectives
from services.frontend.waiting_room import WaitingRoom
from services.frontend.worker_pool import Passed, WorkerPool, WorkerState
from shared.bus import Bus
from shared.codec import route_reply_decoder
from shared.errors import (
    DeadlineExceeded,
    EngineError,
    InvalidRequest,
    Overloaded,
    ServingError,
    Shed,
    Unavailable,
)
from shared.logs import RateLimitedLog
from shared.streams import StreamDemux, StreamGap, TokenStream

logger = logging.getLogger(__name__)

NO_OBJECTIVES = RequestObjectives()
# The workers a stream left, until it leaves one. Shared: this Python makes a new 216-byte
# object of every ``frozenset()``, which a stream would hold for its whole life.
NO_WORKERS_LEFT: frozenset[InstanceId] = frozenset()


class StreamDropped(Exception):
    """A worker ended the stream with an error or an abort of its own (it is shutting down,
    say): the request migrates rather than fail."""


class StreamMoved(StreamDropped):
    """A draining worker gave the stream up and holds its KV (``kv``) for the next worker:
    a live migration, not a failure (it does not count against the migration limit)."""

    def __init__(self, message: str, kv: KVHandle) -> None:
        super().__init__(message)
        self.kv = kv


def _take_contiguous(chunks: list[TokenChunk], emitted: "array[int]") -> int:
    """Add to ``emitted`` the tokens of the leading ``chunks`` that follow on from it without
    a gap (a chunk that does not say its count is taken as following); how many it took. One
    pass over the chunks: this is the token path."""
    for i, chunk in enumerate(chunks):
        count = chunk.num_output_tokens
        if count and count != len(emitted) + len(chunk.token_ids):
            return i
        emitted.fromlist(chunk.token_ids)
    return len(chunks)


class FrontendShed(Shed):
    """Shed by this frontend, from the workers' load reports, before any worker saw it."""

    stage = "frontend"


class SendingShed(FrontendShed):
    """Shed by this frontend as it was about to send the request: what went to the worker
    since the first check (while the prompt was tokenized and routed) leaves too little."""

    stage = "sending"


class WorkersFull(Overloaded):
    """Every worker tried refused the request because its queue is full."""


class WaitingShed(Shed):
    """Admitted by a worker, then shed: its deadline passed before it started there, or it
    had to move (its worker left) and no other worker can start it by then."""

    stage = "waiting"


# Kept back from the time-to-first-token budget a worker is given: the first token still has
# to reach this process and the client after the worker produced it.
DEADLINE_MARGIN_S = 0.02
EARLY_SHED_MARGIN = 0.75
# As it is about to be sent, a request that passed that check is shed only past the
# workers' own bound: one between the two would be taken there, and shedding it now, after
# its tokenizing and routing, would only make a slower 429.
SENDING_SHED_MARGIN = 1.0


def new_request_id() -> RequestId:
    return RequestId(uuid.uuid4().hex)


class Generator:
    """Places requests on workers and yields their chunks."""

    def __init__(
        self,
        bus: Bus,
        demux: StreamDemux,
        pool: WorkerPool,
        namespace: str,
        *,
        admission_timeout_s: float,
        route_timeout_s: float = 0.0,
        on_route_fallback: Callable[[], None] = lambda: None,
        max_attempts: int = 3,
        admit_fraction: float = 1.0,
        migration_limit: int = 3,
        on_migration: Callable[[], None] = lambda: None,
        queue_timeout_s: float = 0.0,
        on_late_acceptance: Callable[[], None] = lambda: None,
    ) -> None:
        self._queue_timeout_s = queue_timeout_s
        self._on_late_acceptance = on_late_acceptance
        self._log = RateLimitedLog(logger, level=logging.INFO)
        self._room = WaitingRoom()
        self._migration_limit = migration_limit
        self._on_migration = on_migration
        self._bus = bus
        self._admit_fraction = admit_fraction
        self._demux = demux
        self._pool = pool
        self._admission_timeout_s = admission_timeout_s
        self._max_attempts = max_attempts
        self._route_timeout_s = route_timeout_s
        self._router_subject = subjects.router_requests(namespace)
        self._on_route_fallback = on_route_fallback
        # Whether check_capacity's last answer was a shed: while it is, the connections run
        # the check on a request's bytes before aiohttp parses them (``early_shed``).
        self.is_shedding_early = False

    @property
    def num_queued(self) -> int:
        """Requests waiting in this process for a worker with room."""
        return len(self._room)

    def on_worker_report(self, worker: WorkerState) -> None:
        """A worker reported its load: let through as many queued requests as it has room."""
        room = worker.room
        if room > 0 and worker.is_usable:
            self._room.admit(worker.info.model, room)

    def check_capacity(
        self, model: str, objectives: RequestObjectives, num_tokens: int, budget_s: float
    ) -> Passed | None:
        """Shed now, before tokenizing or routing, if no worker's last load report (plus what
        was sent it since) leaves ``budget_s`` for the first token. Only for normal and low
        priorities: a worker's reported wait counts the whole queue, and a high priority
        request would jump it (its worker decides exactly). A request that passes counts
        against the best worker until it is sent (give the ``Passed`` to ``generate``) or
        given up (release it)."""
        if objectives.ttft_s is None or objectives.priority < 0:
            return None
        candidates = self._pool.candidates(model)
        if not candidates:
            return None  # placing it says why
        now_s = time.monotonic()
        best = min(candidates, key=lambda w: w.predicted_wait_s(num_tokens, now_s))
        self.is_shedding_early = True
        self._check_wait(best, num_tokens, budget_s, now_s)
        self.is_shedding_early = False
        return Passed(best)

    def _check_wait(
        self,
        worker: WorkerState,
        num_tokens: int,
        budget_s: float,
        now_s: float,
        kind: type[FrontendShed] = FrontendShed,
        margin: float = EARLY_SHED_MARGIN,
    ) -> None:
        """Raise ``kind`` if ``worker``, by its last report and what was sent it since,
        cannot start the request within ``margin`` of the workers' bound on ``budget_s``.
        By default a little stricter than the workers: a request the reports already place
        near a worker's own limit is answered here, cheaply, instead of being tokenized,
        routed, sent and refused there. (It raises rather than returns the shed: a frame
        that holds the exception it raises makes a reference cycle through the traceback,
        and at thousands of sheds a second those cycles are what the garbage collector
        stops the process for.)"""
        wait_s = worker.predicted_wait_s(num_tokens, now_s)
        budget_s *= self._admit_fraction * margin
        if wait_s <= budget_s:
            return
        # check_capacity checks the best worker; a request about to be sent, the one chosen.
        who = (
            f"every worker for {worker.info.model!r} is at least"
            if kind is FrontendShed
            else f"worker {worker.info.worker_id} is"
        )
        raise kind(
            f"{who} {wait_s * 1000:.0f} ms from a first token; the objective leaves "
            f"{max(budget_s, 0.0) * 1000:.0f} ms",
            retry_after_s=max(1.0, wait_s - budget_s),
        )

    async def generate(
        self,
        request_id: RequestId,
        model: str,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        objectives: RequestObjectives = NO_OBJECTIVES,
        deadline_s: float | None = None,
        passed: Passed | None = None,
    ) -> AsyncGenerator[list[TokenChunk], None]:
        """Yield the request's chunks as they arrive until one carries a finish reason.

        ``deadline_s`` (``time.monotonic``) is when the first token is due; each worker is
        told the time left, and a request no worker can serve by then is answered with
        ``Shed``. Closing the iterator early (client gone, stop string matched) aborts the
        request on its worker.

        A worker that vanishes (its lease goes, or its load reports stop), goes silent past
        the demux's idle sweep, or drops the stream (an error or an abort of its own) does not
        end the stream: the request migrates, up to ``migration_limit`` times, to another
        worker with the tokens streamed so far, and that worker continues after them, so the
        caller sees neither an error nor a repeated or missing token.

        ``passed``: from ``check_capacity``, released once the request is sent or given up.
        """
        stream = self._demux.open(request_id)
        worker: WorkerState | None = None
        finished = False
        emitted = array("i")  # tokens streamed so far, 4 bytes each: a move resends them
        # Workers the stream left for good; its own set only once there is one (most never
        # move, and an empty set costs 216 bytes for the stream's life).
        left_behind: AbstractSet[InstanceId] = NO_WORKERS_LEFT
        num_moves = 0
        moved_because = ""  # why the stream last had to move
        moved_kv: KVHandle | None = None  # where its KV waits, after a live migration
        try:
            while True:
                try:
                    worker = await self._place(
                        stream,
                        request_id,
                        model,
                        token_ids,
                        sampling,
                        objectives,
                        None if emitted else deadline_s,
                        emitted,
                        left_behind,
                        kv_source=moved_kv,
                        admitted=bool(moved_because),
                        passed=passed,
                    )
                    moved_kv = None  # the new worker reads it (or gives it up) at once
                except ServingError as exc:
                    if not moved_because:
                        raise
                    text = f"{moved_because}; no other worker took it: {exc}"
                    if isinstance(exc, Shed):  # it cannot make its deadline anywhere now
                        raise WaitingShed(text, retry_after_s=exc.retry_after_s) from exc
                    raise Unavailable(text) from exc
                try:
                    while True:
                        chunks = stream.take()
                        while not chunks:  # bounded by StreamDemux.expire_idle
                            await stream.arrival()
                            chunks = stream.take()
                        last = chunks[-1]
                        reason = last.finish_reason
                        if reason is FinishReason.SHED:
                            finished = True
                            raise WaitingShed(
                                "the request waited past its time-to-first-token objective",
                                retry_after_s=1.0,
                            )
                        if reason is FinishReason.ERROR or (
                            reason is FinishReason.ABORT and last.error
                        ):
                            if len(chunks) > 1:  # tokens that came before the drop
                                for chunk in chunks[:-1]:
                                    emitted.fromlist(chunk.token_ids)
                                yield chunks[:-1]
                            if last.moved_kv is not None:
                                raise StreamMoved(last.error or "moved", last.moved_kv)
                            raise StreamDropped(last.error or "the worker dropped the stream")
                        taken = _take_contiguous(chunks, emitted)
                        if taken < len(chunks):
                            if taken:
                                yield chunks[:taken]
                            gap = chunks[taken]
                            raise StreamGap(
                                f"tokens after the {len(emitted)}th were lost on the bus "
                                f"(the next chunk brought {len(gap.token_ids)} and said "
                                f"{gap.num_output_tokens} in all)"
                            )
                        finished = reason is not None
                        yield chunks
                        if finished:
                            return
                except (Unavailable, DeadlineExceeded, StreamDropped) as exc:
                    moved_kv = exc.kv if isinstance(exc, StreamMoved) else None
                    if moved_kv is None:
                        if num_moves >= self._migration_limit:
                            if isinstance(exc, StreamDropped):
                                raise EngineError(str(exc)) from exc
                            raise
                        num_moves += 1
                    if not isinstance(exc, StreamGap):  # that worker is fine: it may stay
                        left_behind = {*left_behind, worker.info.worker_id}
                    worker.in_flight -= 1
                    if moved_kv is None:  # it may be alive: free its KV
                        await self._abort(worker, stream.request_id)
                    logger.log(
                        logging.INFO if moved_kv is not None else logging.WARNING,
                        "stream migrates request_id=%s from=%s num_tokens=%d with_kv=%s error=%s",
                        request_id,
                        worker.info.worker_id,
                        len(emitted),
                        moved_kv is not None,
                        exc,
                    )
                    worker = None
                    moved_because = str(exc)
                    self._on_migration()
                    if len(emitted) >= sampling.max_tokens:  # only its finish was lost
                        finished = True
                        yield [TokenChunk(request_id, [], FinishReason.LENGTH)]
                        return
        finally:
            if passed is not None:
                passed.release()
            self._demux.close(stream.request_id)
            if worker is not None:
                worker.in_flight -= 1
                if not finished:
                    await self._abort(worker, stream.request_id)

    async def _place(
        self,
        stream: TokenStream,
        request_id: RequestId,
        model: str,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        objectives: RequestObjectives,
        deadline_s: float | None,
        resume_token_ids: Sequence[int],
        left_behind: AbstractSet[InstanceId],
        *,
        kv_source: KVHandle | None = None,
        admitted: bool = False,
        passed: Passed | None = None,
    ) -> WorkerState:
        """Place the request on a worker. With a deadline, a full fleet sheds it; without
        one, it waits its turn in the waiting room (behind those already there) until a
        worker reports room, for up to ``queue_timeout_s``. ``admitted``: a worker took it
        before and it moved (``GenerateRequest.admitted``)."""
        request = (stream, request_id, model, token_ids, sampling, objectives)
        if deadline_s is not None or self._queue_timeout_s <= 0:
            return await self._try_place(
                *request, deadline_s, resume_token_ids, left_behind, kv_source, admitted, passed
            )
        queued_until = time.monotonic() + self._queue_timeout_s
        if self._room.is_queued(model):
            await self._queue(model, queued_until, first=False)
        while True:
            try:
                return await self._try_place(
                    *request, None, resume_token_ids, left_behind, kv_source, admitted
                )
            except WorkersFull:
                # Let through but refused all the same (another frontend took the room):
                # keep its place at the head.
                await self._queue(model, queued_until, first=True)

    async def _queue(self, model: str, queued_until: float, *, first: bool) -> None:
        try:
            await self._room.wait(model, queued_until - time.monotonic(), first=first)
        except TimeoutError:
            raise Overloaded(
                f"every worker for {model!r} stayed full for {self._queue_timeout_s:g} s",
                retry_after_s=1.0,
            ) from None

    async def _try_place(
        self,
        stream: TokenStream,
        request_id: RequestId,
        model: str,
        token_ids: Sequence[int],
        sampling: SamplingParams,
        objectives: RequestObjectives,
        deadline_s: float | None,
        resume_token_ids: Sequence[int],
        left_behind: AbstractSet[InstanceId],
        kv_source: KVHandle | None,
        admitted: bool = False,
        passed: Passed | None = None,
    ) -> WorkerState:
        candidates = [
            c for c in self._pool.candidates(model) if c.info.worker_id not in left_behind
        ]
        if not candidates:
            raise Overloaded(f"no live worker serves model {model!r}", retry_after_s=1.0)
        decision = await self._route(request_id, model, token_ids)
        routed: WorkerState | None = None  # the router's decode worker, tried first
        routed_prefill_id: InstanceId | None = None
        if decision is not None:
            chosen = self._pool.get(decision.worker_id)
            if chosen is not None and chosen in candidates:
                candidates.remove(chosen)
                candidates.insert(0, chosen)
                routed, routed_prefill_id = chosen, decision.prefill_worker_id
        last_error: ServingError = Overloaded("no worker accepted the request", retry_after_s=1.0)
        shed: Shed | None = None  # the first worker's refusal by its objectives, if any
        prompt = list(token_ids)  # the message's copy; the caller keeps a compact one
        # As check_capacity: normal and low priorities, not a request a worker took before.
        check_first = objectives.ttft_s is not None and objectives.priority >= 0 and not admitted
        for worker in candidates[: self._max_attempts]:
            if passed is not None:  # sent or shed now: counted as sent from here on
                passed.release()
            budget_s = None
            if deadline_s is not None:
                now_s = time.monotonic()
                budget_s = deadline_s - now_s - DEADLINE_MARGIN_S
                if budget_s <= 0:
                    raise FrontendShed(
                        "no worker took the request within its objective", retry_after_s=1.0
                    )
                if check_first:
                    # The check before tokenizing, again with what was sent since, at the
                    # worker's own bound: under load the tokenizing and routing take long
                    # enough for many more to pass it, and a refusal by the worker costs a
                    # bus round trip.
                    try:
                        self._check_wait(
                            worker, len(prompt), budget_s, now_s, SendingShed, SENDING_SHED_MARGIN
                        )
                    except SendingShed as early:
                        if shed is None:
                            shed = early
                        continue
            # The router's prefill worker was chosen for its decode worker only; any other
            # worker (a fallback after a refusal) prefills locally.
            message = GenerateRequest(
                request_id=self._demux.new_attempt(stream),
                model=model,
                token_ids=prompt,
                sampling=sampling,
                stream_subject=self._demux.subject,
                prefill_worker_id=(
                    routed_prefill_id if worker is routed and kv_source is None else None
                ),
                priority=objectives.priority,
                ttft_budget_s=budget_s,
                tpot_s=objectives.tpot_s,
                resume_token_ids=list(resume_token_ids),
                kv_source=kv_source,
                admitted=admitted,
                answer_on_stream=True,
            )
            # Bound before it is sent: its chunks answer for it, and only this worker's count.
            stream.rebind(worker.info.worker_id, asyncio.get_running_loop().time())
            worker.in_flight += 1
            worker.sent_since_report += 1
            try:
                error = await self._send(worker, stream, message)
                if isinstance(error, (Unavailable, DeadlineExceeded)):
                    raise error
            except (Unavailable, DeadlineExceeded) as exc:
                if isinstance(exc, DeadlineExceeded) and stream.has_chunks:
                    # Its tokens came, though the timeout fired first (a busy frontend read
                    # them late, after the timer): the worker took it and is serving it. Keep
                    # it there; aborting would throw that work away.
                    worker.last_heard_s = time.monotonic()
                    self._on_late_acceptance()
                    self._log.log(
                        "late",
                        "accepted after the admission timeout, its tokens first: kept "
                        "request_id=%s worker_id=%s",
                        stream.origin_id,
                        worker.info.worker_id,
                    )
                    return worker
                worker.in_flight -= 1
                last_error = exc
                if isinstance(exc, DeadlineExceeded):
                    # A busy worker may still take it from its inbox: this abort follows it
                    # there (same subject and connection: NATS keeps them in order).
                    await self._abort(worker, stream.request_id)
                continue
            except BaseException:
                worker.in_flight -= 1
                raise
            worker.last_heard_s = time.monotonic()
            if error is None:
                return worker
            worker.in_flight -= 1
            if isinstance(error, InvalidRequest):
                raise error
            last_error = error
            if isinstance(error, Shed) and shed is None:
                shed = error
        try:
            if shed is not None:
                # A worker that can serve it says it cannot in time: that is the answer
                # (429), whatever the others said (one switching role or too busy to answer
                # is no better news).
                raise shed
            if isinstance(last_error, DeadlineExceeded):
                # Too busy to answer in admission_timeout_s: as full as a refusal says.
                raise WorkersFull(
                    f"no worker for {model!r} answered: {last_error}", retry_after_s=1.0
                )
            if isinstance(last_error, Unavailable):
                raise Overloaded(
                    f"no worker for {model!r} answered: {last_error}", retry_after_s=1.0
                )
            if type(last_error) is Overloaded:
                raise WorkersFull(last_error.message, retry_after_s=last_error.retry_after_s)
            raise last_error
        finally:
            # The exception goes out with this frame in its traceback: a frame still holding
            # it would be a reference cycle, left for the garbage collector (_check_wait).
            del shed, last_error

    async def _send(
        self, worker: WorkerState, stream: TokenStream, message: GenerateRequest
    ) -> ServingError | None:
        """Send a placement and wait for the worker's answer: None when it took the request,
        else why not. It answers on the stream (``answer_on_stream``): a refusal to the
        placement's reply subject at once, its taking by the first chunk or, if that is
        slow, an acceptance batched with others (a message a request fewer than a reply
        each). ``DeadlineExceeded`` after ``admission_timeout_s`` without an answer."""
        answer = stream.expect_answer()
        try:
            await self._bus.publish(
                worker.info.subject, message, reply=self._demux.answer_subject(stream)
            )
            async with asyncio.timeout(self._admission_timeout_s):
                return await answer
        except TimeoutError:
            return DeadlineExceeded(
                f"no answer from worker {worker.info.worker_id} within "
                f"{self._admission_timeout_s} s"
            )
        finally:
            stream.answer(None)  # stops waiting (nothing if answered)

    async def _route(
        self, request_id: RequestId, model: str, token_ids: Sequence[int]
    ) -> RouteDecision | None:
        """Ask the routers where to go; None (place it ourselves) if none answers in time."""
        if self._route_timeout_s <= 0:
            return None
        try:
            data = await self._bus.request(
                self._router_subject,
                RouteRequest(request_id=request_id, model=model, token_ids=list(token_ids)),
                timeout_s=self._route_timeout_s,
            )
            reply = route_reply_decoder.decode(data)
        except (Unavailable, DeadlineExceeded) as exc:
            self._on_route_fallback()
            logger.debug("no route; placing locally request_id=%s error=%s", request_id, exc)
            return None
        if isinstance(reply, ErrorReply):
            self._on_route_fallback()
            logger.debug("router refused request_id=%s error=%s", request_id, reply.message)
            return None
        return reply

    async def _abort(self, worker: WorkerState, request_id: RequestId) -> None:
        try:
            await self._bus.publish(worker.info.subject, AbortRequest(request_id=request_id))
        except ServingError as exc:
            logger.warning("abort not sent request_id=%s error=%s", request_id, exc)
