"""A frontend's stream keeps every token once, in order, when the bus or its own lateness
gets in the way:

- tokens the bus dropped (a frontend cut off as a slow consumer loses what was published to
  it meanwhile) are noticed from the chunks' counts, and the stream resumes after its last
  token;
- a worker that streams a request's tokens and never says it took it otherwise (an
  ``answer_on_stream`` acceptance is its first chunk) keeps it where it is, even when its
  tokens take longer than the admission timeout to end."""

import asyncio

import pytest
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import (
    AbortRequest,
    FinishReason,
    GenerateAccepted,
    GenerateRequest,
    InstanceId,
    RequestId,
    SamplingParams,
    TokenChunk,
    WorkerInfo,
    WorkerRole,
)
from services.frontend.generate import Generator
from services.frontend.worker_pool import WorkerPool
from shared.bus import Bus
from shared.codec import encode, worker_inbound_decoder
from shared.errors import ServingError
from shared.streams import StreamDemux, group_chunks, publish_chunks

WORKER = InstanceId("w1")
MAX_TOKENS = 8
ADMISSION_TIMEOUT_S = 0.2  # the late-acceptance test's


class ScriptedWorker:
    """Takes GenerateRequests like a worker, each served by ``serve`` in its own task, and
    records them and the aborts that come."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.requests: list[GenerateRequest] = []
        self.aborted: list[RequestId] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def on_message(self, msg: Msg) -> None:
        message = worker_inbound_decoder.decode(msg.data)
        if isinstance(message, AbortRequest):
            self.aborted.append(message.request_id)
            return
        assert isinstance(message, GenerateRequest)
        self.requests.append(message)
        self.tasks.append(asyncio.create_task(self.serve(message, msg.reply)))

    async def serve(self, request: GenerateRequest, reply: str) -> None:
        raise NotImplementedError

    async def accept(self, request: GenerateRequest, reply: str) -> None:
        accepted = GenerateAccepted(
            request_id=request.request_id, worker_id=WORKER, num_prompt_tokens=3
        )
        await self.bus.publish_bytes(reply, encode(accepted))

    async def send(self, request: GenerateRequest, n: int) -> None:
        """The request's ``n``-th token (100 + n), the last one at MAX_TOKENS."""
        reason = FinishReason.LENGTH if n == MAX_TOKENS else None
        chunk = TokenChunk(request.request_id, [100 + n], reason, num_output_tokens=n)
        await publish_chunks(self.bus, WORKER, group_chunks([(request.stream_subject, chunk)]))


class LossyWorker(ScriptedWorker):
    """Its first attempt's tokens 3 and 4 are lost on the way (never published), as a
    disconnected subscriber would lose them."""

    async def serve(self, request: GenerateRequest, reply: str) -> None:
        await self.accept(request, reply)
        is_first = request is self.requests[0]
        for n in range(len(request.resume_token_ids) + 1, MAX_TOKENS + 1):
            if is_first and n in (3, 4):
                continue  # published while the frontend was cut off: gone
            await self.send(request, n)
            await asyncio.sleep(0.01)


async def generate(generator: Generator) -> tuple[list[int], TokenChunk]:
    """Request "r" (MAX_TOKENS tokens) and read its stream: its tokens and its last chunk."""
    sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    tokens: list[int] = []
    async with asyncio.timeout(10):
        async for chunks in generator.generate(RequestId("r"), "m", [1, 2, 3], sampling):
            for chunk in chunks:
                tokens.extend(chunk.token_ids)
            last = chunks[-1]
    return tokens, last


def pool_of_one(frontend: Bus, namespace: str, subject: str) -> WorkerPool:
    """A frontend's view of one decode worker, ``WORKER``, listening on ``subject``."""
    pool = WorkerPool(frontend, namespace)
    info = WorkerInfo(
        worker_id=WORKER,
        model="m",
        role=WorkerRole.DECODE,
        subject=subject,
        max_num_seqs=8,
        num_kv_blocks=64,
    )
    pool.sync({WORKER: info})
    return pool


async def test_a_gap_in_a_stream_resumes_it_after_its_last_token(nats_server, namespace):
    async with Bus.connect(nats_server.url) as frontend, Bus.connect(nats_server.url) as bus:
        worker = LossyWorker(bus)
        subject = subjects.worker_inbox(namespace, WORKER)
        await bus.subscribe(subject, worker.on_message)
        await bus.flush()
        demux = StreamDemux(frontend, subjects.stream_inbox(namespace, "f1"))
        await demux.start()
        pool = pool_of_one(frontend, namespace, subject)
        generator = Generator(frontend, demux, pool, namespace, admission_timeout_s=2.0)
        tokens, last = await generate(generator)
    # Every token once, in order; the end is the real one.
    assert tokens == [100 + n for n in range(1, MAX_TOKENS + 1)]
    assert last.finish_reason is FinishReason.LENGTH
    # Resumed on the same (healthy) worker, under a new id, after the two tokens it had.
    assert [(r.request_id, list(r.resume_token_ids)) for r in worker.requests] == [
        ("r", []),
        ("r-1", [101, 102]),
    ]
    assert "r" in worker.aborted  # the first attempt was stopped


class TokensFirstWorker(ScriptedWorker):
    """Answers on the stream as the frontend asks: streams each request's tokens at once,
    with no acceptance of its own, and pauses past the admission timeout after the second."""

    async def serve(self, request: GenerateRequest, reply: str) -> None:
        assert request.answer_on_stream
        for n in range(1, MAX_TOKENS + 1):
            await self.send(request, n)
            if n == 2:
                await asyncio.sleep(3 * ADMISSION_TIMEOUT_S)


async def test_a_first_chunk_is_the_acceptance_and_keeps_the_request_on_its_worker(
    nats_server, namespace
):
    async with Bus.connect(nats_server.url) as frontend, Bus.connect(nats_server.url) as bus:
        worker = TokensFirstWorker(bus)
        subject = subjects.worker_inbox(namespace, WORKER)
        await bus.subscribe(subject, worker.on_message)
        demux = StreamDemux(frontend, subjects.stream_inbox(namespace, "f1"))
        await demux.start()
        pool = pool_of_one(frontend, namespace, subject)
        late: list[int] = []
        generator = Generator(
            frontend,
            demux,
            pool,
            namespace,
            admission_timeout_s=ADMISSION_TIMEOUT_S,
            on_late_acceptance=lambda: late.append(1),
        )
        tokens, last = await generate(generator)
        async with asyncio.timeout(10):
            await asyncio.gather(*worker.tasks)
    assert tokens == [100 + n for n in range(1, MAX_TOKENS + 1)]
    assert last.finish_reason is FinishReason.LENGTH
    assert [r.request_id for r in worker.requests] == ["r"]  # placed once
    assert worker.aborted == []  # and never stopped
    assert late == []  # taken by its first chunk, well inside the timeout
    assert pool.get(WORKER) is not None
    assert pool.get(WORKER).in_flight == 0  # type: ignore[union-attr]


async def test_a_worker_nobody_listens_for_is_known_at_once_not_after_the_timeout(
    nats_server, namespace
):
    """A placement is published with a reply subject under the frontend's stream inbox, so
    NATS's "no responders" still comes back at once when the worker's inbox has no
    subscriber (a worker dead before its lease ran out)."""
    async with Bus.connect(nats_server.url) as frontend:
        demux = StreamDemux(frontend, subjects.stream_inbox(namespace, "f1"))
        await demux.start()
        pool = pool_of_one(frontend, namespace, subjects.worker_inbox(namespace, WORKER))
        generator = Generator(frontend, demux, pool, namespace, admission_timeout_s=60.0)
        with pytest.raises(ServingError, match="no responder"):
            await generate(generator)  # bounded by 10 s there
    assert pool.get(WORKER).in_flight == 0  # type: ignore[union-attr]
