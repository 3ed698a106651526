"""The worker shell and the KV handoff in one process, on a real nats-server: prefill and
decode roles over simulated engines whose KV moves through a real (tcp) transfer agent.

Each failure path of the handoff must end (or fall back) at once, well inside the minute
that a prefill or a transfer may take, and leave no block reserved or held.
"""

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import (
    ACCEPT_HOLD_S,
    AbortRequest,
    BlockStored,
    ErrorCode,
    ErrorReply,
    FinishReason,
    GenerateAccepted,
    GenerateRequest,
    InstanceId,
    PrefillDone,
    PrefillRequest,
    RequestId,
    SamplingParams,
    TokenChunk,
    WorkerInfo,
    WorkerRole,
)
from services.worker.canary import EngineCanary
from services.worker.decode import DecodeRole
from services.worker.handoff import RemotePrefill
from services.worker.prefill import PrefillRole
from services.worker.role import Role, WorkerContext
from services.worker.shell import WorkerShell
from shared.bus import Bus
from shared.codec import (
    encode,
    generate_reply_decoder,
    kv_event_batch_decoder,
    prefill_reply_decoder,
    token_batch_decoder,
)
from shared.engine.config import WorkerConfig
from shared.engine.kv_connector import RegionConnector
from shared.engine.loop import EngineLoop
from shared.engine.sim import SimEngine, SimEngineConfig
from shared.engine.timing import TimingModel
from shared.kv_hash import hash_prompt_blocks
from shared.kv_transfer import TransferAgent, create_agent
from shared.servers import ServerProcess
from shared.slo import SLOConfig

NUM_BLOCKS = 256
PROMPT = list(range(100, 400))  # 300 tokens: 19 blocks of 16
SAMPLING = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0)
FAST = 5.0  # seconds: every path here must end long before a prefill or transfer timeout


def sim_engine(agent: TransferAgent, speedup: float) -> SimEngine:
    config = SimEngineConfig(
        num_kv_blocks=NUM_BLOCKS, vocab_size=1000, timing=TimingModel(speedup=speedup)
    )
    engine = SimEngine(config, kv_buffer=agent.allocate(NUM_BLOCKS * config.kv_block_bytes))
    region = engine.kv_region
    assert region is not None
    agent.register(region.address, region.size_bytes)
    return engine


@dataclass
class Worker:
    worker_id: InstanceId
    shell: WorkerShell
    engine: SimEngine
    agent: TransferAgent
    connector: RegionConnector
    info: WorkerInfo

    @property
    def inbox(self) -> str:
        return self.shell.inbox


@dataclass
class Peers:
    """The directory decode workers look prefill workers up in (etcd's, in a real worker):
    every worker this test started, plus what a test adds."""

    infos: dict[InstanceId, WorkerInfo] = field(default_factory=dict)


StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
def peers() -> Peers:
    return Peers()


@pytest.fixture
async def bus(nats_server: ServerProcess) -> AsyncIterator[Bus]:
    async with Bus.connect(nats_server.url) as connected:
        yield connected


@pytest.fixture
async def start_worker(bus: Bus, namespace: str, peers: Peers) -> AsyncIterator[StartWorker]:
    """A factory of running workers (shell, role and engine loop), stopped at the end."""
    stack = contextlib.AsyncExitStack()

    async def start(
        role: WorkerRole,
        *,
        max_waiting: int = 64,
        max_hold_s: float = 30.0,
        speedup: float = 50.0,
        slo_tpot_ms: float = 0.0,
        publish_interval_s: float = 0.0,
    ) -> Worker:
        worker_id = InstanceId(f"{role.name.lower()}-{len(peers.infos)}")
        agent = stack.enter_context(create_agent("tcp", worker_id))
        engine = sim_engine(agent, speedup)
        region = engine.kv_region
        assert region is not None
        connector = RegionConnector(agent, region, engine.block_size)
        loop = EngineLoop(engine, step_in_thread=False)
        context = WorkerContext(bus, namespace, worker_id, loop)
        worker_role: Role
        if role is WorkerRole.PREFILL:
            worker_role = PrefillRole(context, connector, agent.name, max_hold_s=max_hold_s)
        else:
            decode = DecodeRole(context)
            decode.publish_interval_s = publish_interval_s
            decode.remote = RemotePrefill(
                bus,
                namespace,
                worker_id,
                loop,
                connector,
                lambda: peers.infos,
                prefill_timeout_s=60.0,
                transfer_timeout_s=60.0,
                on_ready=decode.on_handoff_ready,
                on_failed=decode.on_handoff_failed,
            )
            worker_role = decode
        shell = WorkerShell(
            context,
            worker_role,
            WorkerConfig(
                namespace=namespace,
                max_waiting=max_waiting,
                slo=SLOConfig(slo_tpot_ms=slo_tpot_ms),
            ),
        )
        await shell.start()
        info = WorkerInfo(
            worker_id=worker_id,
            model="baton-sim",
            role=role,
            subject=shell.inbox,
            max_num_seqs=256,
            num_kv_blocks=NUM_BLOCKS,
            kv_agent=agent.name,
            kv_agent_metadata=agent.metadata(),
        )
        peers.infos[worker_id] = info
        task = asyncio.create_task(loop.run(shell.on_step))

        async def stop() -> None:
            await worker_role.close()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        stack.push_async_callback(stop)
        return Worker(worker_id, shell, engine, agent, connector, info)

    async with stack:
        yield start


@dataclass
class Stream:
    subject: str
    chunks: dict[RequestId, list[TokenChunk]] = field(default_factory=dict)
    finished: dict[RequestId, asyncio.Event] = field(default_factory=dict)

    def done(self, request_id: str) -> asyncio.Event:
        return self.finished.setdefault(RequestId(request_id), asyncio.Event())

    def tokens(self, request_id: str) -> list[int]:
        return [t for c in self.chunks.get(RequestId(request_id), []) for t in c.token_ids]

    def last(self, request_id: str) -> TokenChunk:
        return self.chunks[RequestId(request_id)][-1]


@pytest.fixture
async def stream(bus: Bus, namespace: str) -> Stream:
    result = Stream(subjects.stream_inbox(namespace, "fe"))

    async def on_batch(msg: Msg) -> None:
        for chunk in token_batch_decoder.decode(msg.data).chunks:
            result.chunks.setdefault(chunk.request_id, []).append(chunk)
            if chunk.finish_reason is not None:
                result.done(chunk.request_id).set()

    await bus.subscribe(result.subject, on_batch)
    return result


async def generate(
    bus: Bus,
    worker: Worker,
    stream: Stream,
    request_id: str,
    *,
    prefill_worker_id: InstanceId | None = None,
    prompt: list[int] = PROMPT,
    ttft_budget_s: float | None = None,
    priority: int = 0,
    sampling: SamplingParams = SAMPLING,
) -> GenerateAccepted | ErrorReply:
    request = generate_request(
        stream,
        request_id,
        token_ids=prompt,
        sampling=sampling,
        prefill_worker_id=prefill_worker_id,
        ttft_budget_s=ttft_budget_s,
        priority=priority,
    )
    return generate_reply_decoder.decode(await bus.request(worker.inbox, request, timeout_s=FAST))


def generate_request(stream: Stream, request_id: str, **fields: Any) -> GenerateRequest:
    """A request of PROMPT and SAMPLING (unless ``fields`` say otherwise) for ``stream``."""
    defaults: dict[str, Any] = {"model": "baton-sim", "token_ids": PROMPT, "sampling": SAMPLING}
    return GenerateRequest(
        request_id=RequestId(request_id),
        stream_subject=stream.subject,
        **(defaults | fields),
    )


async def eventually(predicate: Callable[[], bool]) -> None:
    """Wait, bounded by FAST, for what another task or process is about to make true."""
    async with asyncio.timeout(FAST):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


async def finish(stream: Stream, request_id: str) -> TokenChunk:
    async with asyncio.timeout(FAST):
        await stream.done(request_id).wait()
    return stream.last(request_id)


def assert_no_blocks_in_use(*workers: Worker) -> None:
    for worker in workers:
        stats = worker.engine.stats()
        assert (stats.num_running, stats.num_reserved, stats.num_held) == (0, 0, 0)
        assert stats.num_free_blocks == NUM_BLOCKS
        assert len(worker.shell.role.in_flight) == 0


@contextlib.asynccontextmanager
async def fake_prefill(
    bus: Bus, subject: str, answer: Callable[[PrefillRequest], bytes | None]
) -> AsyncIterator[list[bytes]]:
    """A peer on the prefill worker's subject that answers with ``answer`` (None: never) and
    records every message it gets (aborts and releases included)."""
    seen: list[bytes] = []

    async def on_message(msg: Msg) -> None:
        seen.append(msg.data)
        message = msgspec.msgpack.decode(msg.data)
        if message.get("type") == "prefill" and msg.reply:
            payload = answer(msgspec.msgpack.decode(msg.data, type=PrefillRequest))
            if payload is not None:
                await bus.publish_bytes(msg.reply, payload)

    sub = await bus.subscribe(subject, on_message)
    try:
        yield seen
    finally:
        await sub.unsubscribe()


# --- the shell -------------------------------------------------------------------------------


async def test_shell_answers_a_malformed_message_with_a_typed_error_and_keeps_serving(
    bus, start_worker, stream
):
    decode = await start_worker(WorkerRole.DECODE)
    reply = generate_reply_decoder.decode(
        await bus_request_bytes(bus, decode.inbox, b"\x93\x01\x02")
    )
    assert isinstance(reply, ErrorReply)
    assert reply.code == ErrorCode.INVALID_REQUEST
    assert decode.shell.num_bad_messages == 1

    assert isinstance(await generate(bus, decode, stream, "after"), GenerateAccepted)
    assert (await finish(stream, "after")).finish_reason == FinishReason.LENGTH
    assert len(stream.tokens("after")) == SAMPLING.max_tokens


async def bus_request_bytes(bus: Bus, subject: str, payload: bytes) -> bytes:
    """A request with a raw payload (``Bus.request`` only sends typed messages)."""
    inbox = f"_INBOX.test.{id(payload)}"
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def on_reply(msg: Msg) -> None:
        if not got.done():
            got.set_result(msg.data)

    sub = await bus.subscribe(inbox, on_reply)
    try:
        await bus.publish_bytes(subject, payload, reply=inbox)
        async with asyncio.timeout(FAST):
            return await got
    finally:
        await sub.unsubscribe()


async def test_shell_refuses_duplicates_wrong_role_and_past_the_waiting_cap(
    bus, start_worker, stream
):
    decode = await start_worker(WorkerRole.DECODE, max_waiting=0)
    # max_waiting=0: every new request is past the cap while none has been scheduled.
    refused = await generate(bus, decode, stream, "a")
    assert isinstance(refused, ErrorReply)
    assert refused.code == ErrorCode.OVERLOADED

    # Modelled time (speedup 1): 100 tokens take 0.6 s, so "b" still runs when its duplicate
    # comes (at speedup 50, 8 tokens could finish first on a busy machine).
    decode = await start_worker(WorkerRole.DECODE, speedup=1.0)
    long = msgspec.structs.replace(SAMPLING, max_tokens=100)
    assert isinstance(await generate(bus, decode, stream, "b", sampling=long), GenerateAccepted)
    duplicate = await generate(bus, decode, stream, "b", sampling=long)
    assert isinstance(duplicate, ErrorReply)
    assert duplicate.code == ErrorCode.INVALID_REQUEST
    assert "already running" in duplicate.message
    # The first one is untouched by the refused duplicate.
    assert (await finish(stream, "b")).finish_reason == FinishReason.LENGTH
    assert len(stream.tokens("b")) == long.max_tokens

    wrong = PrefillRequest(request_id=RequestId("c"), token_ids=PROMPT)
    reply = generate_reply_decoder.decode(await bus.request(decode.inbox, wrong, timeout_s=FAST))
    assert isinstance(reply, ErrorReply)
    assert "decode worker" in reply.message
    assert_no_blocks_in_use(decode)


async def test_shell_drain_ends_what_is_left_with_a_reason(bus, start_worker, stream):
    decode = await start_worker(WorkerRole.DECODE, speedup=1.0)  # 3,000 tokens take seconds
    long = msgspec.structs.replace(SAMPLING, max_tokens=3000)
    request = GenerateRequest(
        request_id=RequestId("slow"),
        model="baton-sim",
        token_ids=PROMPT,
        sampling=long,
        stream_subject=stream.subject,
    )
    await bus.request(decode.inbox, request, timeout_s=FAST)
    await decode.shell.drain(timeout_s=0.2)
    last = await finish(stream, "slow")
    assert last.finish_reason == FinishReason.ABORT
    assert last.error == "worker shut down"
    refused = await generate(bus, decode, stream, "late")
    assert isinstance(refused, ErrorReply)
    assert refused.code == ErrorCode.UNAVAILABLE
    assert_no_blocks_in_use(decode)


# --- the handoff -----------------------------------------------------------------------------


async def local_tokens(bus: Bus, start_worker: StartWorker, stream: Stream) -> list[int]:
    alone = await start_worker(WorkerRole.DECODE)
    await generate(bus, alone, stream, "local")
    await finish(stream, "local")
    return stream.tokens("local")


async def test_handoff_pulls_the_prompt_kv_and_decodes_the_same_tokens(bus, start_worker, stream):
    expected = await local_tokens(bus, start_worker, stream)
    prefill = await start_worker(WorkerRole.PREFILL)
    decode = await start_worker(WorkerRole.DECODE)

    await generate(bus, decode, stream, "r", prefill_worker_id=prefill.worker_id)
    await finish(stream, "r")

    assert stream.tokens("r") == expected
    first = stream.chunks[RequestId("r")][0]
    assert first.ttft is not None
    assert first.ttft.is_remote_prefill
    role = decode.shell.role
    assert isinstance(role, DecodeRole)
    assert role.remote is not None
    assert (role.remote.num_remote, role.num_fallbacks) == (1, 0)
    # The prompt's blocks arrived byte for byte: the decode worker now caches the prefix.
    assert decode.engine.cached_prefix_tokens(PROMPT) == len(PROMPT) // 16 * 16
    await eventually(lambda: prefill.engine.stats().num_held == 0)  # KVRelease on its way
    assert_no_blocks_in_use(prefill, decode)


def impostor(peers: Peers, real: Worker, name: str) -> InstanceId:
    """Register a prefill worker ``name`` that lives at its own subject, with the agent
    metadata of ``real``; returns its id."""
    worker_id = InstanceId(name)
    peers.infos[worker_id] = msgspec.structs.replace(
        real.info, worker_id=worker_id, subject=f"{real.inbox}-{name}"
    )
    return worker_id


async def test_handoff_falls_back_at_once_when_the_prefill_worker_is_gone(
    bus, start_worker, stream, peers
):
    expected = await local_tokens(bus, start_worker, stream)
    decode = await start_worker(WorkerRole.DECODE)
    prefill = await start_worker(WorkerRole.PREFILL)
    # Still in the directory (its lease has not expired), but nobody listens any more.
    gone = impostor(peers, prefill, "gone")

    await generate(bus, decode, stream, "x", prefill_worker_id=gone)
    last = await finish(stream, "x")

    assert last.finish_reason == FinishReason.LENGTH
    assert stream.tokens("x") == expected
    role = decode.shell.role
    assert isinstance(role, DecodeRole)
    assert role.num_fallbacks == 1
    assert_no_blocks_in_use(decode)


def prefill_done(request: PrefillRequest, descriptors: list[tuple[int, int]]) -> bytes:
    return encode(
        PrefillDone(
            request_id=request.request_id,
            worker_id=InstanceId("fake"),
            first_token_id=5,
            num_prompt_tokens=len(request.token_ids),
            num_cached_tokens=0,
            kv_agent="prefill-0",
            block_descriptors=descriptors,
        )
    )


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(lambda req: b"\xc1 not msgpack", id="malformed-reply"),
        pytest.param(
            lambda req: encode(
                PrefillDone(
                    request_id=req.request_id,
                    worker_id="x",
                    first_token_id=-1,
                    num_prompt_tokens=0,
                    num_cached_tokens=0,
                    kv_agent="",
                    block_descriptors=[],
                )
            ).replace(b"block_descriptors", b"block_descriptorz"),
            id="reply-missing-a-field",
        ),
        pytest.param(
            lambda req: encode(ErrorReply(code=ErrorCode.OVERLOADED, message="full")),
            id="refused",
        ),
        pytest.param(
            lambda req: prefill_done(req, [(1 << 40, 64)] * 19),  # memory nobody registered
            id="transfer-fails",
        ),
        pytest.param(
            lambda req: prefill_done(req, [(0, 64)] * 3),  # not one per prompt block
            id="wrong-block-count",
        ),
    ],
)
async def test_handoff_failure_falls_back_to_a_local_prefill_at_once(
    bus, start_worker, stream, peers, answer
):
    expected = await local_tokens(bus, start_worker, stream)
    decode = await start_worker(WorkerRole.DECODE)
    real = await start_worker(WorkerRole.PREFILL)
    fake = impostor(peers, real, "fake")
    async with fake_prefill(bus, peers.infos[fake].subject, answer) as seen:
        await generate(bus, decode, stream, "f", prefill_worker_id=fake)
        last = await finish(stream, "f")
        await eventually(lambda: len(seen) >= 2)  # the cleanup after the PrefillRequest
    assert last.finish_reason == FinishReason.LENGTH
    assert stream.tokens("f") == expected
    role = decode.shell.role
    assert isinstance(role, DecodeRole)
    assert role.num_fallbacks == 1
    cleanup = msgspec.msgpack.decode(seen[1])
    assert cleanup["type"] in ("abort", "kv_release")
    assert cleanup["request_id"] == "f"
    assert_no_blocks_in_use(decode)


async def test_client_abort_during_the_prefill_ends_both_sides(bus, start_worker, stream, peers):
    decode = await start_worker(WorkerRole.DECODE)
    real = await start_worker(WorkerRole.PREFILL)
    silent = impostor(peers, real, "silent")
    async with fake_prefill(bus, peers.infos[silent].subject, lambda req: None) as seen:
        await generate(bus, decode, stream, "c", prefill_worker_id=silent)
        await eventually(lambda: bool(seen))
        await bus.publish(decode.inbox, AbortRequest(request_id=RequestId("c")))
        await eventually(lambda: len(seen) >= 2)
    assert msgspec.msgpack.decode(seen[1]) == {"type": "abort", "request_id": "c"}
    role = decode.shell.role
    assert isinstance(role, DecodeRole)
    assert role.remote is not None
    await eventually(lambda: len(role.remote) == 0)
    assert RequestId("c") not in stream.chunks  # an abort sends nothing back
    assert role.num_fallbacks == 0
    assert_no_blocks_in_use(decode)


# --- answers on the stream ---------------------------------------------------------------------


async def test_a_request_answered_on_the_stream_is_told_by_its_chunk_or_a_batched_acceptance(
    bus, start_worker, stream, peers
):
    """``answer_on_stream``: no reply for a request taken (its first chunk says it, or, held
    past ACCEPT_HOLD_S without one, its id in a chunkless batch); a refusal to the reply
    subject at once."""
    decode = await start_worker(WorkerRole.DECODE)
    real = await start_worker(WorkerRole.PREFILL)
    silent = impostor(peers, real, "silent")
    replies: list[bytes] = []
    accepted: list[tuple[InstanceId, list[RequestId], int]] = []

    async def on_reply(msg: Msg) -> None:
        replies.append(msg.data)

    async def on_batch(msg: Msg) -> None:
        batch = token_batch_decoder.decode(msg.data)
        if batch.accepted:
            accepted.append((batch.worker_id, batch.accepted, len(batch.chunks)))

    await bus.subscribe(subjects.answer_inboxes(stream.subject), on_reply)
    await bus.subscribe(stream.subject, on_batch)

    async def send(request_id: str, **fields: Any) -> None:
        request = generate_request(stream, request_id, answer_on_stream=True, **fields)
        reply = subjects.answer_inbox(stream.subject, request_id)
        await bus.publish(decode.inbox, request, reply=reply)

    # Prefilled here: its chunks come and say it all; no reply, no acceptance of its own.
    await send("local")
    assert (await finish(stream, "local")).finish_reason == FinishReason.LENGTH
    # Prefilled by a peer that never answers: nothing for it to stream, so its acceptance
    # goes out alone, once the hold has passed.
    async with fake_prefill(bus, peers.infos[silent].subject, lambda req: None):
        sent_s = time.monotonic()
        await send("held", prefill_worker_id=silent)
        await eventually(lambda: bool(accepted))
        waited_s = time.monotonic() - sent_s
        # A duplicate is refused, at once, to its reply subject.
        await send("held", prefill_worker_id=silent)
        await eventually(lambda: bool(replies))
        await bus.publish(decode.inbox, AbortRequest(request_id=RequestId("held")))
    assert accepted == [(decode.worker_id, ["held"], 0)]
    assert waited_s >= ACCEPT_HOLD_S
    refusal = generate_reply_decoder.decode(replies[0])
    assert isinstance(refusal, ErrorReply)
    assert refusal.code == ErrorCode.INVALID_REQUEST
    assert len(replies) == 1  # nothing for "local"
    role = decode.shell.role
    assert isinstance(role, DecodeRole)
    await eventually(lambda: not role.in_flight)
    assert_no_blocks_in_use(decode)


# --- objectives ------------------------------------------------------------------------------


async def test_admission_sheds_at_once_what_would_miss_its_first_token_deadline(
    bus, start_worker, stream
):
    # Modelled time (speedup 1): a 300-token prompt costs ~10 ms to prefill; a burst of 150
    # of them is ~45,000 tokens, far more than a 150 ms objective lets one worker prefill.
    decode = await start_worker(WorkerRole.DECODE, speedup=1.0, max_waiting=1000)
    for i in range(12):  # the worker learns its speed from these steps
        await generate(bus, decode, stream, f"warm{i}")
        await finish(stream, f"warm{i}")
    assert decode.shell.objectives.speed_model.speed.is_known

    replies = await asyncio.gather(
        *[generate(bus, decode, stream, f"b{i}", ttft_budget_s=0.15) for i in range(150)]
    )
    accepted = [f"b{i}" for i, r in enumerate(replies) if isinstance(r, GenerateAccepted)]
    shed = [r for r in replies if isinstance(r, ErrorReply)]

    assert accepted
    assert shed
    assert all(r.code == ErrorCode.SHED for r in shed)
    assert all(r.retry_after_s is not None and r.retry_after_s >= 1.0 for r in shed)
    # Every admitted request ends: served, or shed before its first token (never late).
    for rid in accepted:
        last = await finish(stream, rid)
        if last.finish_reason is FinishReason.SHED:
            assert stream.tokens(rid) == []
        else:
            assert len(stream.tokens(rid)) == SAMPLING.max_tokens
    served = [rid for rid in accepted if stream.last(rid).finish_reason == FinishReason.LENGTH]
    assert len(served) >= len(accepted) // 2  # the prediction admits mostly what it can serve
    assert_no_blocks_in_use(decode)


async def test_a_waiting_request_is_shed_when_its_deadline_passes(bus, start_worker, stream):
    # No speed known yet, so admission lets it in; high-priority work ahead of it keeps it
    # waiting, and the engine sheds it at its deadline.
    decode = await start_worker(WorkerRole.DECODE, speedup=1.0, max_waiting=1000)
    blockers = [
        GenerateRequest(
            request_id=RequestId(f"big{i}"),
            model="baton-sim",
            token_ids=[10 + (i * 7 + j) % 900 for j in range(1990)],
            sampling=SAMPLING,
            stream_subject=stream.subject,
            priority=-1,
        )
        for i in range(2)
    ]
    for blocker in blockers:  # 250 of the 256 blocks: "late" cannot start before they end
        reply = generate_reply_decoder.decode(
            await bus.request(decode.inbox, blocker, timeout_s=FAST)
        )
        assert isinstance(reply, GenerateAccepted)
    reply = await generate(bus, decode, stream, "late", ttft_budget_s=0.05)
    assert isinstance(reply, GenerateAccepted)

    last = await finish(stream, "late")

    assert last.finish_reason is FinishReason.SHED
    assert stream.tokens("late") == []
    role = decode.shell.role
    assert RequestId("late") not in role.in_flight


async def test_tpot_objective_caps_the_batch_from_measured_speed(bus, start_worker, stream):
    decode = await start_worker(WorkerRole.DECODE, speedup=1.0, slo_tpot_ms=10.0)
    for wave, size in enumerate([1, 3, 6, 12, 24]):  # batches of several sizes to learn from
        rids = [f"w{wave}-{i}" for i in range(size)]
        await asyncio.gather(*[generate(bus, decode, stream, rid) for rid in rids])
        for rid in rids:
            await finish(stream, rid)

    objectives = decode.shell.objectives
    budget, speed = objectives.budget, objectives.speed_model.speed
    # Modelled decode steps cost ~6 ms at least: an 8 ms target (80 % of 10) leaves room for
    # a small batch and a few prompt tokens, which the measured speed says fit.
    assert budget.max_num_running is not None
    assert budget.max_prefill_tokens is not None
    assert speed.step_s(budget.max_num_running, 0) <= 0.008 + 1e-9
    assert speed.base_s > 0.003
    load = decode.shell.load_metrics()
    assert load.max_num_running == budget.max_num_running
    assert load.step_per_seq_s == speed.per_seq_s
    # The arrival counters the planner takes rates of: every request, every prompt token.
    assert load.num_arrived == 1 + 3 + 6 + 12 + 24
    assert load.num_arrived_prefill_tokens == load.num_arrived * len(PROMPT)
    # And the finish counters it reads the output length from.
    assert load.num_finished == load.num_arrived
    assert load.num_finished_output_tokens == load.num_finished * SAMPLING.max_tokens


async def test_canary_proves_an_idle_engine_serves_and_fails_when_its_loop_is_stuck(
    bus, start_worker, stream
):
    decode = await start_worker(WorkerRole.DECODE)
    canary = decode.shell.canary
    first = await canary.check()  # never stepped: a one-token request goes through the engine
    assert (first.is_ok, first.how) == (True, "canary")
    assert canary.num_canaries == 1
    assert canary.last_step_s is not None
    assert (await canary.check()).how == "step"  # that step is recent: no second canary
    assert canary.num_canaries == 1
    assert not stream.chunks  # the canary's output reached no one
    assert_no_blocks_in_use(decode)

    # An engine whose loop does not run (no step ever completes) fails its canary in time.
    engine = SimEngine(SimEngineConfig(num_kv_blocks=NUM_BLOCKS, vocab_size=1000))
    stuck = EngineCanary(EngineLoop(engine, step_in_thread=False), decode.worker_id, timeout_s=0.3)
    async with asyncio.timeout(FAST):
        result = await stuck.check()
    assert (result.is_ok, result.how) == (False, "canary")
    assert stuck.num_failures == 1
    assert not engine.has_unfinished()  # the failed canary was aborted
    assert engine.stats().num_free_blocks == NUM_BLOCKS


async def test_decode_refuses_a_stream_subject_that_is_not_a_stream_inbox(
    bus, start_worker, stream, namespace
):
    decode = await start_worker(WorkerRole.DECODE)
    bad_subjects = [
        "",
        "baton.x stream",  # NATS clients refuse whitespace (a step's other requests would fail)
        f"{stream.subject}\r\nPUB x 1",  # protocol injection
        f"baton.{namespace}.stream.>",  # a wildcard
        subjects.worker_inbox(namespace, "other"),  # not a stream inbox
        subjects.stream_inbox("elsewhere", "fe"),  # another namespace
        subjects.stream_inbox(namespace, "f" * 5000),  # past NATS' control line limit
    ]
    for i, subject in enumerate(bad_subjects):
        request = GenerateRequest(
            request_id=RequestId(f"bad-{i}"),
            model="baton-sim",
            token_ids=PROMPT,
            sampling=SAMPLING,
            stream_subject=subject,
        )
        reply = generate_reply_decoder.decode(
            await bus.request(decode.inbox, request, timeout_s=FAST)
        )
        assert isinstance(reply, ErrorReply), subject
        assert reply.code == ErrorCode.INVALID_REQUEST
    assert isinstance(await generate(bus, decode, stream, "good"), GenerateAccepted)
    assert (await finish(stream, "good")).finish_reason == FinishReason.LENGTH
    assert_no_blocks_in_use(decode)


async def test_prefill_refuses_a_hold_timeout_that_never_ends(bus, start_worker):
    prefill = await start_worker(WorkerRole.PREFILL)
    for hold_s in (math.nan, 0.0, -1.0):
        request = PrefillRequest(
            request_id=RequestId(f"hold-{hold_s}"), token_ids=PROMPT, hold_timeout_s=hold_s
        )
        reply = prefill_reply_decoder.decode(
            await bus.request(prefill.inbox, request, timeout_s=FAST)
        )
        assert isinstance(reply, ErrorReply)
        assert reply.code == ErrorCode.INVALID_REQUEST
        assert "hold_timeout_s" in reply.message
    assert_no_blocks_in_use(prefill)


# --- publishing: steps faster than the interval go out together ------------------------------


async def _count_messages(bus: Bus, subject: str) -> list[int]:
    """Chunks per message on ``subject``, one entry a message."""
    sizes: list[int] = []

    async def on_batch(msg: Msg) -> None:
        sizes.append(len(token_batch_decoder.decode(msg.data).chunks))

    await bus.subscribe(subject, on_batch)
    return sizes


async def test_steps_faster_than_the_publish_interval_go_out_together(bus, start_worker, stream):
    fast = await start_worker(WorkerRole.DECODE, speedup=1e6, publish_interval_s=0.05)
    sizes = await _count_messages(bus, stream.subject)
    sampling = SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.0)
    for i in range(4):
        prompt = PROMPT[: 20 + i]
        reply = await generate(bus, fast, stream, f"r{i}", prompt=prompt, sampling=sampling)
        assert isinstance(reply, GenerateAccepted)
    for i in range(4):
        assert (await finish(stream, f"r{i}")).finish_reason is FinishReason.LENGTH
        assert len(stream.tokens(f"r{i}")) == 40
        counts = [c.num_output_tokens for c in stream.chunks[RequestId(f"r{i}")]]
        assert counts == sorted(counts)  # in order
        assert counts[-1] == 40  # none lost
    await bus.flush()
    # 160 tokens from about 40 steps; a message carries many steps' chunks.
    assert sum(sizes) == sum(len(stream.chunks[RequestId(f"r{i}")]) for i in range(4))
    assert len(sizes) <= 20
    assert_no_blocks_in_use(fast)


async def test_kv_events_are_held_with_the_chunks_and_go_out_before_them(
    bus, start_worker, namespace, stream
):
    fast = await start_worker(WorkerRole.DECODE, speedup=1e6, publish_interval_s=0.05)
    arrivals: list[tuple[str, object]] = []  # in the order this connection got them

    async def on_kv(msg: Msg) -> None:
        batch = kv_event_batch_decoder.decode(msg.data)
        stored = {h for e in batch.events if isinstance(e, BlockStored) for h in e.block_hashes}
        arrivals.append(("kv", stored))

    async def on_tokens(msg: Msg) -> None:
        batch = token_batch_decoder.decode(msg.data)
        arrivals.append(("tokens", {c.request_id for c in batch.chunks}))

    await bus.subscribe(subjects.kv_events(namespace, fast.worker_id), on_kv)
    await bus.subscribe(stream.subject, on_tokens)
    sampling = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0)
    prompts = {RequestId(f"r{i}"): PROMPT[i : 20 + 3 * i] for i in range(8)}
    for rid, prompt in prompts.items():  # each fills its blocks at other steps
        reply = await generate(bus, fast, stream, rid, prompt=prompt, sampling=sampling)
        assert isinstance(reply, GenerateAccepted)
    for rid in prompts:
        assert (await finish(stream, rid)).finish_reason is FinishReason.LENGTH
    await fast.shell.publish_kv_events()
    await bus.flush()
    kv = [stored for kind, stored in arrivals if kind == "kv"]
    tokens = [rids for kind, rids in arrivals if kind == "tokens"]
    # Dozens of steps store a block; their events go out with the few token messages.
    assert len(kv) <= len(tokens) + 1
    # A router hears of a prompt's blocks before a client could see its first token.
    announced: set[int] = set()
    for kind, items in arrivals:
        if kind == "kv":
            announced |= items  # type: ignore[operator]
            continue
        for rid in items:  # type: ignore[attr-defined]
            assert hash_prompt_blocks(prompts[rid], fast.engine.block_size)[0] in announced
    assert_no_blocks_in_use(fast)


async def test_a_last_chunk_never_waits_for_the_interval(bus, start_worker, stream):
    worker = await start_worker(WorkerRole.DECODE, speedup=1e6, publish_interval_s=60.0)
    started = time.monotonic()
    reply = await generate(bus, worker, stream, "r")
    assert isinstance(reply, GenerateAccepted)
    last = await finish(stream, "r")  # bounded by FAST, far below the interval
    assert last.finish_reason is FinishReason.LENGTH
    assert len(stream.tokens("r")) == SAMPLING.max_tokens
    assert time.monotonic() - started < FAST
