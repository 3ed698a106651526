"""The token-stream path: engine steps -> TokenBatch messages -> per-request streams.

Built for tens of thousands of concurrent streams:

- a worker sends **one message per engine step per destination process** (``group_chunks`` then
  ``publish_chunks``), never one message per token or per request;
- a frontend holds **one subscription for all its streams** (``StreamDemux``) and hands each
  chunk to the request's ``TokenStream`` in O(1).
"""

import asyncio
import logging
import math
from collections.abc import Callable, Iterable

from nats.aio.msg import Msg

from proto import subjects
from proto.messages import (
    ErrorReply,
    GenerateAccepted,
    InstanceId,
    RequestId,
    TokenBatch,
    TokenChunk,
)
from shared.bus import NATS_STATUS, Bus
from shared.codec import encode, generate_reply_decoder, token_batch_decoder
from shared.errors import (
    DeadlineExceeded,
    PayloadTooLarge,
    ServingError,
    Unavailable,
    from_reply,
)
from shared.logs import BadMessages, RateLimitedLog

logger = logging.getLogger(__name__)


def group_chunks(pairs: Iterable[tuple[str, TokenChunk]]) -> dict[str, list[TokenChunk]]:
    """Group (destination subject, chunk) pairs by destination, keeping order."""
    grouped: dict[str, list[TokenChunk]] = {}
    for subject, chunk in pairs:
        chunks = grouped.get(subject)
        if chunks is None:
            grouped[subject] = [chunk]
        else:
            chunks.append(chunk)
    return grouped


def encode_batches(
    worker_id: InstanceId, chunks: list[TokenChunk], max_payload: int
) -> list[bytes]:
    """Encode chunks as few TokenBatch payloads as fit under ``max_payload``, splitting in
    halves when one is too large. A single chunk that alone exceeds it is a bug upstream
    (prompts are never echoed), so it raises ``PayloadTooLarge``."""
    payload = encode(TokenBatch(worker_id=worker_id, chunks=chunks))
    if len(payload) <= max_payload:
        return [payload]
    if len(chunks) == 1:
        raise PayloadTooLarge(len(payload), max_payload)
    middle = len(chunks) // 2
    return encode_batches(worker_id, chunks[:middle], max_payload) + encode_batches(
        worker_id, chunks[middle:], max_payload
    )


async def publish_chunks(
    bus: Bus, worker_id: InstanceId, grouped: dict[str, list[TokenChunk]]
) -> None:
    """Publish one step's chunks: one TokenBatch per destination (more only if too large)."""
    for subject, chunks in grouped.items():
        for payload in encode_batches(worker_id, chunks, bus.max_payload):
            await bus.publish_bytes(subject, payload)


# After NATS reconnects, a placed stream with no chunk for this long may have lost its last
# ones (published while this process was cut off, then nothing more to come): it resumes.
RECONNECT_GRACE_S = 3.0


def is_idle(
    silent_s: float, worker_quiet_s: float, idle_timeout_s: float, max_idle_s: float
) -> bool:
    """Whether the idle sweep fails a placed stream that has had no chunk for ``silent_s``
    and whose worker has been quiet (no load report, token batch or answer) for
    ``worker_quiet_s`` (infinite when it is gone or unknown).

    Silence alone is not enough: a worker that is heard from is alive and may simply hold
    the request in its queue, behind a full batch, for minutes under a burst. So the stream
    fails once both it and its worker have been silent for ``idle_timeout_s`` (a hung
    worker), or once the stream alone has been for ``max_idle_s`` (a request its live worker
    lost, or an engine stuck while its process still reports). A ``max_idle_s`` no longer
    than ``idle_timeout_s`` makes the stream's own silence enough. The worker's window is
    ``idle_timeout_s`` too, not a short one: a busy frontend reads load reports late, and
    queued streams are the many. (A dead worker's streams move far sooner, by the
    frontend's silence probe or the lease, not here.)"""
    if silent_s <= idle_timeout_s:
        return False
    return worker_quiet_s > idle_timeout_s or silent_s > max_idle_s


class StreamGap(Unavailable):
    """Tokens of a stream may have been lost on the bus (its chunks' counts skip, or it went
    quiet across a reconnection): it resumes after the last token it has, on any worker."""


class TokenStream:
    """The chunks of one request, in order, waiting for the handler that streams them out."""

    __slots__ = (
        "_answer",
        "_chunks",
        "_error",
        "_waiter",
        "last_active_s",
        "num_attempts",
        "origin_id",
        "request_id",
        "worker_id",
    )

    def __init__(self, request_id: RequestId, now_s: float) -> None:
        # The id its chunks carry: the request's own at first, a new one for each later
        # placement (StreamDemux.new_attempt), so that an abandoned attempt's chunks are dropped.
        self.request_id = request_id
        self.origin_id = request_id
        self.num_attempts = 0  # placements tried
        self.worker_id: InstanceId | None = None
        self.last_active_s = now_s  # when the last chunk arrived (event-loop clock)
        # A list, swapped out whole by ``take``, and none while there is nothing (an empty
        # deque costs ~600 bytes a stream, an empty list 56).
        self._chunks: list[TokenChunk] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: ServingError | None = None
        # While a placement waits for the worker's answer (``expect_answer``).
        self._answer: asyncio.Future[ServingError | None] | None = None

    def put(self, chunk: TokenChunk, now_s: float) -> None:
        if self._chunks is None:
            self._chunks = [chunk]
        else:
            self._chunks.append(chunk)
        self.last_active_s = now_s
        if self._answer is not None:
            self.answer(None)  # a chunk says the worker took it
        self._wake()

    def fail(self, error: ServingError) -> None:
        """End the stream with an error (its worker vanished, say); ``get`` raises it."""
        self._error = error
        self.answer(error)
        self._wake()

    def expect_answer(self) -> "asyncio.Future[ServingError | None]":
        """A future for the answer to the placement being sent: None once the worker took it
        (its first chunk, or its id in a batch's ``accepted``), or the error it was refused
        with (or failed by, as ``fail``)."""
        answer = self._answer = asyncio.get_running_loop().create_future()
        return answer

    def answer(self, error: ServingError | None) -> None:
        """The worker's answer to the placement awaited (none awaited: ignored)."""
        answer = self._answer
        if answer is not None:
            self._answer = None
            if not answer.done():
                answer.set_result(error)

    def rebind(self, worker_id: InstanceId, now_s: float) -> None:
        """Follow ``worker_id`` from now on (the request was placed, or migrated there): a
        past failure is forgotten, and chunks from any other worker are dropped."""
        self.worker_id = worker_id
        self.last_active_s = now_s
        self._error = None

    @property
    def has_chunks(self) -> bool:
        """Whether chunks have arrived that ``get`` has not taken yet."""
        return bool(self._chunks)

    def drop_chunks(self) -> int:
        """Forget the chunks not yet taken (they belong to an abandoned attempt); how many."""
        num = len(self._chunks) if self._chunks is not None else 0
        self._chunks = None
        return num

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def take(self) -> list[TokenChunk]:
        """Every chunk that has arrived, none waited for (an empty list: none yet); a failed
        stream raises its error once its chunks are taken."""
        chunks = self._chunks
        if chunks is None:
            if self._error is not None:
                raise self._error
            return []
        self._chunks = None
        return chunks

    def arrival(self) -> "asyncio.Future[None]":
        """A future done when a chunk or an error arrives. The token path awaits it directly
        (``take`` first, this while there is nothing): a coroutine between them would be one
        more frame kept for the stream's life. The wait is bounded by the demux's
        ``expire_idle`` (one sweep for all streams, rather than a timer per wait)."""
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        return waiter

    async def get(self) -> list[TokenChunk]:
        """Every chunk that has arrived, waiting for at least one (``take`` and ``arrival``)."""
        chunks = self.take()
        while not chunks:
            await self.arrival()
            chunks = self.take()
        return chunks


class StreamDemux:
    """One subscription on this process's token inbox, feeding every open ``TokenStream``."""

    def __init__(self, bus: Bus, subject: str) -> None:
        self.subject = subject
        self._bus = bus
        self._streams: dict[RequestId, TokenStream] = {}
        self.num_orphan_chunks = 0
        self.num_stale_chunks = 0
        self.bad_messages = BadMessages(RateLimitedLog(logger), "token batch")
        # Told the sender of every batch (the frontend: that worker is alive).
        self.on_batch: Callable[[InstanceId], None] | None = None
        # How long a worker has been quiet, in seconds (infinite if gone), for the idle
        # sweep (``is_idle``); unset, every worker counts as quiet.
        self.worker_quiet_s: Callable[[InstanceId], float] | None = None

    async def start(self) -> None:
        await self._bus.subscribe(self.subject, self._on_message)
        await self._bus.subscribe(subjects.answer_inboxes(self.subject), self._on_answer)

    def answer_subject(self, stream: TokenStream) -> str:
        """The reply subject of the stream's placement now sent (``answer_inbox``)."""
        return subjects.answer_inbox(self.subject, stream.request_id)

    def __len__(self) -> int:
        return len(self._streams)

    def open(self, request_id: RequestId) -> TokenStream:
        """Register a stream before its request is sent, so no early chunk is lost."""
        if request_id in self._streams:
            raise ValueError(f"stream {request_id} is already open")
        stream = TokenStream(request_id, asyncio.get_running_loop().time())
        self._streams[request_id] = stream
        return stream

    def close(self, request_id: RequestId) -> None:
        self._streams.pop(request_id, None)

    def new_attempt(self, stream: TokenStream) -> RequestId:
        """The id for the stream's next placement: its request's own id the first time,
        ``<id>-<n>`` after that. A worker that took an earlier attempt late (after its
        admission timed out) or that the stream left may still send chunks under the old id:
        no longer registered, they are dropped, never mixed into this attempt's tokens; so are
        those that arrived before this call and are still waiting in the stream (an attempt
        that ended in a gap or an error goes on sending until the abort reaches it)."""
        if stream.num_attempts:
            if self._streams.get(stream.request_id) is stream:
                del self._streams[stream.request_id]
            self.num_stale_chunks += stream.drop_chunks()
            stream.request_id = RequestId(f"{stream.origin_id}-{stream.num_attempts}")
            self._streams[stream.request_id] = stream
        stream.num_attempts += 1
        return stream.request_id

    def fail_worker(self, worker_id: InstanceId, error: ServingError) -> int:
        """Fail every stream served by a worker that is gone; returns how many."""
        failed = [s for s in self._streams.values() if s.worker_id == worker_id]
        for stream in failed:
            stream.fail(error)
        return len(failed)

    def fail_idle(self, idle_timeout_s: float, now_s: float, max_idle_s: float = math.inf) -> int:
        """Fail every placed stream that ``is_idle``: no chunk for ``idle_timeout_s`` while
        its worker was quiet as long, or none for ``max_idle_s``. Returns how many."""
        quiet_s = self.worker_quiet_s
        idle = []
        for stream in self._streams.values():
            worker_id = stream.worker_id
            silent_s = now_s - stream.last_active_s
            if worker_id is None or silent_s <= idle_timeout_s:
                continue  # the common case, decided without asking about the worker
            worker_quiet_s = math.inf if quiet_s is None else quiet_s(worker_id)
            if is_idle(silent_s, worker_quiet_s, idle_timeout_s, max_idle_s):
                idle.append((stream, worker_quiet_s))
        for stream, worker_quiet_s in idle:
            if worker_quiet_s > idle_timeout_s:
                why = f"for {idle_timeout_s} s, and nothing else from it either"
            else:
                why = f"for {max_idle_s} s, though it is alive"
            stream.fail(DeadlineExceeded(f"no tokens from worker {stream.worker_id} {why}"))
        return len(idle)

    def mark_reconnected(self) -> None:
        """NATS is back after a disconnection: what was published to this inbox meanwhile is
        lost. A gap shows in the next chunk's count; a stream that gets no next chunk within
        ``RECONNECT_GRACE_S`` (its last chunks were the lost ones) is failed with
        ``StreamGap`` then, and resumes."""
        loop = asyncio.get_running_loop()
        loop.call_later(RECONNECT_GRACE_S, self._fail_quiet_since, loop.time())

    def _fail_quiet_since(self, since_s: float) -> None:
        quiet = [
            s
            for s in self._streams.values()
            if s.worker_id is not None and s.last_active_s < since_s
        ]
        for stream in quiet:
            stream.fail(StreamGap("no tokens since the bus reconnected; some may be lost"))
        if quiet:
            logger.warning(
                "streams quiet since the bus reconnected resume num_streams=%d", len(quiet)
            )

    async def expire_idle(self, idle_timeout_s: float, max_idle_s: float = math.inf) -> None:
        """Sweep for idle streams (``fail_idle``) until cancelled; one is caught within a
        quarter of ``idle_timeout_s`` past its limit."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(idle_timeout_s / 4)
            failed = self.fail_idle(idle_timeout_s, loop.time(), max_idle_s)
            if failed:
                logger.warning("silent streams failed num_streams=%d", failed)

    @property
    def num_bad_messages(self) -> int:
        return self.bad_messages.num_bad

    async def _on_message(self, msg: Msg) -> None:
        batch = self.bad_messages.decode(token_batch_decoder, msg.data, msg.subject)
        if batch is None:
            return
        streams = self._streams
        now_s = asyncio.get_running_loop().time()
        worker_id = batch.worker_id
        if self.on_batch is not None:
            self.on_batch(worker_id)
        for chunk in batch.chunks:
            stream = streams.get(chunk.request_id)
            if stream is None:
                self.num_orphan_chunks += 1  # its client left; the abort is on its way
            elif stream.worker_id is not None and stream.worker_id != worker_id:
                self.num_stale_chunks += 1  # from a worker the request migrated away from
            else:
                stream.put(chunk, now_s)
        for request_id in batch.accepted:
            stream = streams.get(request_id)
            if stream is not None and stream.worker_id == worker_id:
                stream.answer(None)

    async def _on_answer(self, msg: Msg) -> None:
        """A reply to a placement: the worker's refusal, or NATS's word that nobody listens
        on its inbox (status 503, no payload). Keyed by the placement's own id, so a late
        answer to an earlier placement finds no stream."""
        stream = self._streams.get(RequestId(msg.subject.rpartition(".")[2]))
        if stream is None:
            return
        if not msg.data:
            if msg.headers and msg.headers.get(NATS_STATUS) == "503":
                stream.answer(Unavailable(f"no responder on worker {stream.worker_id}"))
            return
        reply = self.bad_messages.decode(generate_reply_decoder, msg.data, msg.subject)
        match reply:
            case ErrorReply():
                stream.answer(from_reply(reply))
            case GenerateAccepted():  # a worker that answers at once anyway
                stream.answer(None)
