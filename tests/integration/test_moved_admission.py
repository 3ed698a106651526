"""A request that has to move before it starts (its worker changes role or drains) was
admitted once: the next worker is told so (``GenerateRequest.admitted``), and if no worker
can start it within its deadline it is shed (429), not failed (503). A new request one worker
sheds and another cannot take (it is switching role) is shed too. Two hand-written workers on
a real NATS server answer the frontend's ``Generator``."""

import asyncio
import time

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
from services.frontend.generate import Generator, WaitingShed
from services.frontend.objectives import RequestObjectives
from services.frontend.worker_pool import WorkerPool
from shared.bus import Bus
from shared.codec import encode, worker_inbound_decoder
from shared.errors import Shed, Unavailable
from shared.streams import StreamDemux, group_chunks, publish_chunks

MAX_TOKENS = 4


class Worker:
    """Accepts a request, then either leaves it (an ABORT with the reason a role switch
    gives), serves it, or refuses it at admission (``Shed``)."""

    def __init__(self, bus: Bus, worker_id: str, behaviour: str) -> None:
        self.bus = bus
        self.worker_id = InstanceId(worker_id)
        self.behaviour = behaviour
        self.requests: list[GenerateRequest] = []

    async def on_message(self, msg: Msg) -> None:
        message = worker_inbound_decoder.decode(msg.data)
        if isinstance(message, AbortRequest):
            return
        assert isinstance(message, GenerateRequest)
        self.requests.append(message)
        if self.behaviour in ("shed", "switching"):
            refusal = (
                Shed("predicted time to first token 900 ms is over 100%", retry_after_s=2.0)
                if self.behaviour == "shed"
                else Unavailable(f"worker {self.worker_id} is switching to prefill")
            )
            await self.bus.publish_bytes(msg.reply, encode(refusal.to_reply()))
            return
        accepted = GenerateAccepted(
            request_id=message.request_id, worker_id=self.worker_id, num_prompt_tokens=3
        )
        await self.bus.publish_bytes(msg.reply, encode(accepted))
        asyncio.get_running_loop().create_task(self.stream(message))

    async def stream(self, request: GenerateRequest) -> None:
        await asyncio.sleep(0.01)
        if self.behaviour == "leave":
            chunk = TokenChunk(
                request.request_id,
                [],
                FinishReason.ABORT,
                error="the worker is draining or changing role; the stream moves",
            )
            await self._publish(request, chunk)
            return
        for n in range(1, MAX_TOKENS + 1):
            reason = FinishReason.LENGTH if n == MAX_TOKENS else None
            await self._publish(
                request, TokenChunk(request.request_id, [100 + n], reason, num_output_tokens=n)
            )

    async def _publish(self, request: GenerateRequest, chunk: TokenChunk) -> None:
        await publish_chunks(
            self.bus, self.worker_id, group_chunks([(request.stream_subject, chunk)])
        )


async def run(
    nats_url: str, namespace: str, second: str, first: str = "leave"
) -> tuple[Worker, Worker, list[int]]:
    async with Bus.connect(nats_url) as frontend, Bus.connect(nats_url) as bus:
        first_worker, second_worker = Worker(bus, "w1", first), Worker(bus, "w2", second)
        pool = WorkerPool(frontend, namespace)
        infos = {}
        for worker in (first_worker, second_worker):
            subject = subjects.worker_inbox(namespace, worker.worker_id)
            await bus.subscribe(subject, worker.on_message)
            infos[worker.worker_id] = WorkerInfo(
                worker_id=worker.worker_id,
                model="m",
                role=WorkerRole.DECODE,
                subject=subject,
                max_num_seqs=8,
                num_kv_blocks=64,
            )
        await bus.flush()
        pool.sync(infos)
        demux = StreamDemux(frontend, subjects.stream_inbox(namespace, "f1"))
        await demux.start()
        generator = Generator(frontend, demux, pool, namespace, admission_timeout_s=2.0)
        # w1 first: the other is busier by this frontend's own count.
        pool.get(second_worker.worker_id).in_flight += 5  # type: ignore[union-attr]
        sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        objectives = RequestObjectives(ttft_s=4.0)
        tokens: list[int] = []
        async with asyncio.timeout(10):
            stream = generator.generate(
                RequestId("r"), "m", [1, 2, 3], sampling, objectives, time.monotonic() + 4.0
            )
            async for chunks in stream:
                for chunk in chunks:
                    tokens.extend(chunk.token_ids)
        return first_worker, second_worker, tokens


async def test_a_request_that_moves_before_it_starts_is_marked_admitted(nats_server, namespace):
    first, second, tokens = await run(nats_server.url, namespace, "serve")
    assert tokens == [101, 102, 103, 104]
    assert [r.admitted for r in first.requests] == [False]  # a new request: admission's share
    assert [r.admitted for r in second.requests] == [True]  # moved: its whole time left
    assert second.requests[0].ttft_budget_s is not None


async def test_a_moved_request_no_worker_can_start_in_time_is_shed_not_failed(
    nats_server, namespace
):
    with pytest.raises(WaitingShed, match="no other worker took it") as shed:
        await run(nats_server.url, namespace, "shed")
    assert shed.value.http_status == 429
    assert shed.value.retry_after_s == 2.0


async def test_a_shed_outweighs_a_worker_that_could_not_answer(nats_server, namespace):
    """w1 sheds the new request, w2 is switching role: the answer is the shed (429 with its
    Retry-After), not 503 because the last worker tried was unavailable."""
    with pytest.raises(Shed, match="over 100%") as shed:
        await run(nats_server.url, namespace, "switching", first="shed")
    assert shed.value.http_status == 429
    assert shed.value.retry_after_s == 2.0
