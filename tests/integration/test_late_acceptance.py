"""A worker's acceptance can reach a busy frontend after the admission timeout while the
request's tokens already have (replies and tokens travel on different subscriptions). The
frontend keeps such a request where it is: every token once, from that worker, no abort."""

import asyncio

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
from shared.streams import StreamDemux, group_chunks, publish_chunks

MAX_TOKENS = 6
ADMISSION_TIMEOUT_S = 0.2


class LateReplyWorker:
    """Streams each request's tokens at once and answers its acceptance only after the
    frontend's admission timeout has passed."""

    def __init__(self, bus: Bus, worker_id: InstanceId) -> None:
        self.bus = bus
        self.worker_id = worker_id
        self.requests: list[RequestId] = []
        self.aborted: list[RequestId] = []
        self.tasks: list[asyncio.Task[None]] = []

    async def on_message(self, msg: Msg) -> None:
        message = worker_inbound_decoder.decode(msg.data)
        if isinstance(message, AbortRequest):
            self.aborted.append(message.request_id)
            return
        assert isinstance(message, GenerateRequest)
        self.requests.append(message.request_id)
        self.tasks.append(asyncio.create_task(self.serve(message, msg.reply)))

    async def serve(self, request: GenerateRequest, reply: str) -> None:
        for n in range(1, MAX_TOKENS + 1):
            reason = FinishReason.LENGTH if n == MAX_TOKENS else None
            chunk = TokenChunk(request.request_id, [100 + n], reason, num_output_tokens=n)
            pairs = [(request.stream_subject, chunk)]
            await publish_chunks(self.bus, self.worker_id, group_chunks(pairs))
            if n == 2:
                await asyncio.sleep(3 * ADMISSION_TIMEOUT_S)
                accepted = GenerateAccepted(
                    request_id=request.request_id, worker_id=self.worker_id, num_prompt_tokens=3
                )
                await self.bus.publish_bytes(reply, encode(accepted))


async def test_tokens_before_a_late_acceptance_keep_the_request_on_its_worker(
    nats_server, namespace
):
    worker_id = InstanceId("w1")
    async with Bus.connect(nats_server.url) as frontend, Bus.connect(nats_server.url) as bus:
        worker = LateReplyWorker(bus, worker_id)
        subject = subjects.worker_inbox(namespace, worker_id)
        await bus.subscribe(subject, worker.on_message)
        demux = StreamDemux(frontend, subjects.stream_inbox(namespace, "f1"))
        await demux.start()
        pool = WorkerPool(frontend, namespace)
        info = WorkerInfo(
            worker_id=worker_id,
            model="m",
            role=WorkerRole.DECODE,
            subject=subject,
            max_num_seqs=8,
            num_kv_blocks=64,
        )
        pool.sync({worker_id: info})
        late: list[int] = []
        generator = Generator(
            frontend,
            demux,
            pool,
            namespace,
            admission_timeout_s=ADMISSION_TIMEOUT_S,
            on_late_acceptance=lambda: late.append(1),
        )
        sampling = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
        tokens: list[int] = []
        async with asyncio.timeout(10):
            async for chunks in generator.generate(RequestId("r"), "m", [1, 2, 3], sampling):
                for chunk in chunks:
                    tokens.extend(chunk.token_ids)
                last = chunks[-1]
            await asyncio.gather(*worker.tasks)
    assert tokens == [100 + n for n in range(1, MAX_TOKENS + 1)]
    assert last.finish_reason is FinishReason.LENGTH
    assert worker.requests == ["r"]  # placed once
    assert worker.aborted == []  # and never stopped
    assert late == [1]
    assert pool.get(worker_id) is not None
    assert pool.get(worker_id).in_flight == 0  # type: ignore[union-attr]
