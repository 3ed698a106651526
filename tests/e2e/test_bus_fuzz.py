"""Bus fuzz: garbage on every subject a service listens to, and the services stay up.

A real cluster (router, prefill worker, decode worker, frontend; their own processes, logs in
files) gets, on each subject it subscribes to, with and without a reply subject: random bytes,
truncated valid messages, payloads just under the server's max_payload, valid msgpack of the
wrong shape (every message type with each field of each wrong type), and well-typed requests
with hostile values (empty prompts, token ids past int64, NaN, subjects that are not inboxes).
Then a flood of undecodable messages. Afterwards:

- every process still runs, and a real completion (prefilled remotely) is served;
- every message that the subscriber cannot decode, sent with a reply subject to a subject that
  answers requests (worker inboxes, the router's queue), got an ``ErrorReply`` back;
- the logs hold no traceback, and the flood left O(1) lines, not one per message.
"""

import asyncio
import contextlib
import math
import random
import re
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from nats.aio.msg import Msg

from proto import subjects
from proto.messages import (
    AbortRequest,
    AllBlocksCleared,
    BlockHash,
    BlockRemoved,
    BlockStored,
    ErrorCode,
    ErrorReply,
    FinishReason,
    GenerateAccepted,
    GenerateRequest,
    InstanceId,
    KVEventBatch,
    KVRelease,
    KVState,
    KVStateRequest,
    LoadMetrics,
    PrefillDone,
    PrefillRequest,
    RequestId,
    RouteDecision,
    RouteRequest,
    SamplingParams,
    TokenBatch,
    TokenChunk,
    TTFTBreakdown,
)
from services.launcher.cluster import ClusterSpec, LocalCluster, local_cluster
from shared.bus import Bus
from shared.codec import (
    kv_event_batch_decoder,
    load_metrics_decoder,
    route_request_decoder,
    token_batch_decoder,
    worker_inbound_decoder,
)
from shared.servers import ServerProcess
from tests.e2e.args import ALWAYS_REMOTE

MODEL = "baton-sim"
SEED = 20240611
FRONTEND_ID = "fuzzfe"
DECODE_ID = "fuzz-decode"
PREFILL_ID = "fuzz-prefill"
DECODE, PREFILL, ROUTER = "decode inbox", "prefill inbox", "router route"  # target names
FLOOD = 2000  # undecodable messages per subject in the flood
MAX_LOG_LINES = 40  # per process, for everything this test does: O(1), not O(messages)
REPLY_PREFIX = "_INBOX.fuzz"
REPLY_TYPES = ErrorReply | GenerateAccepted | PrefillDone | KVState | RouteDecision
reply_decoder = msgspec.msgpack.Decoder(REPLY_TYPES)


@dataclass(frozen=True)
class Target:
    """A subject some service subscribes to, with the decoder that service applies; when it
    answers requests, an undecodable one must get an ErrorReply."""

    name: str
    subject: str
    decoder: msgspec.msgpack.Decoder[Any]
    answers_requests: bool


def targets(ns: str) -> list[Target]:
    return [
        Target(DECODE, subjects.worker_inbox(ns, DECODE_ID), worker_inbound_decoder, True),
        Target(PREFILL, subjects.worker_inbox(ns, PREFILL_ID), worker_inbound_decoder, True),
        Target(ROUTER, subjects.router_requests(ns), route_request_decoder, True),
        Target("router kv events", subjects.kv_events(ns, "fuzz-w"), kv_event_batch_decoder, False),
        # Load reports reach the router and the frontend (both subscribe to load.*).
        Target("load metrics", subjects.load_metrics(ns, "fuzz-w"), load_metrics_decoder, False),
        Target(
            "frontend stream", subjects.stream_inbox(ns, FRONTEND_ID), token_batch_decoder, False
        ),
    ]


def samples(sink: str) -> list[msgspec.Struct]:
    """One valid message of every type on the wire (the fuzz starts from these)."""
    rid = RequestId("fuzz-sample")
    worker = InstanceId("fuzz-w")
    sampling = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, stop_token_ids=[2])
    return [
        GenerateRequest(
            request_id=rid, model=MODEL, token_ids=[11, 12, 13], sampling=sampling,
            stream_subject=sink, prefill_worker_id=InstanceId(PREFILL_ID), ttft_budget_s=5.0,
            tpot_s=0.1, resume_token_ids=[14],
        ),
        AbortRequest(request_id=rid),
        GenerateAccepted(request_id=rid, worker_id=worker, num_prompt_tokens=3),
        ErrorReply(code=ErrorCode.OVERLOADED, message="x", retry_after_s=1.0),
        PrefillRequest(
            request_id=rid, token_ids=[11, 12, 13], sampling=sampling, hold_timeout_s=1.0,
            ttft_budget_s=5.0,
        ),
        PrefillDone(
            request_id=rid, worker_id=worker, first_token_id=5, num_prompt_tokens=3,
            num_cached_tokens=0, kv_agent="a", block_descriptors=[(4096, 64)],
        ),
        KVRelease(request_id=rid),
        RouteRequest(request_id=rid, model=MODEL, token_ids=[11, 12, 13]),
        RouteDecision(request_id=rid, worker_id=worker, prefill_worker_id=worker),
        TokenBatch(
            worker_id=worker,
            chunks=[
                TokenChunk(rid, [5, 6], FinishReason.STOP, 3, 0, "e", TTFTBreakdown(0.1, 0.2))
            ],
        ),
        LoadMetrics(
            worker_id=worker, num_running=1, num_waiting=0, num_free_blocks=9,
            num_total_blocks=10, kv_usage=0.1,
        ),
        KVStateRequest(),
        KVState(worker_id=worker, seq=1, block_hashes=[BlockHash(7)]),
        KVEventBatch(
            worker_id=worker,
            seq=1,
            events=[
                BlockStored([BlockHash(1), BlockHash(2)], BlockHash(3)),
                BlockRemoved([BlockHash(1)]),
                AllBlocksCleared(),
            ],
        ),
    ]  # fmt: skip


WRONG_VALUES: list[Any] = [None, True, -1, 2**64 - 1, 1.5, "x", b"\x00", [], {}, [1, "a"]]


def wrongly_typed(sink: str) -> list[bytes]:
    """Valid msgpack of the wrong shape: each field of each message set to each wrong value,
    fields missing, unknown tags, and top-level values that are not maps."""
    out = [msgspec.msgpack.encode(v) for v in [*WRONG_VALUES, {"type": "nope"}, {"type": 3}]]
    for message in samples(sink):
        as_dict = msgspec.to_builtins(message)
        if isinstance(as_dict, dict):
            for name in as_dict:
                out.append(msgspec.msgpack.encode({k: v for k, v in as_dict.items() if k != name}))
                out.extend(msgspec.msgpack.encode({**as_dict, name: v}) for v in WRONG_VALUES)
        else:  # array_like structs: each position
            for i in range(len(as_dict)):
                out.extend(
                    msgspec.msgpack.encode([*as_dict[:i], v, *as_dict[i + 1 :]])
                    for v in WRONG_VALUES
                )
    return out


def truncated(rng: random.Random, sink: str) -> list[bytes]:
    out = []
    for message in samples(sink):
        data = msgspec.msgpack.encode(message)
        out.extend(data[: rng.randrange(len(data))] for _ in range(6))
    return out


def random_bytes(rng: random.Random, count: int) -> list[bytes]:
    return [rng.randbytes(rng.choice([0, 1, 2, 3, 7, 16, 64, 300, 4096])) for _ in range(count)]


def unrefused(payloads: list[bytes]) -> list[tuple[bytes, str]]:
    return [(p, "") for p in payloads]


def hostile(sink: str) -> list[tuple[bytes, str]]:
    """Well-typed requests with values no real sender sends, each with the target that must
    refuse it with an ErrorReply ("" where accepting it, or ignoring it, is fine)."""
    sampling = SamplingParams(max_tokens=4, ignore_eos=True)
    rid = RequestId("fuzz-hostile")
    generate = GenerateRequest(
        request_id=rid, model=MODEL, token_ids=[11, 12], sampling=sampling, stream_subject=sink
    )
    prefill = PrefillRequest(request_id=rid, token_ids=[11, 12], sampling=sampling)
    route = RouteRequest(request_id=rid, model=MODEL, token_ids=list(range(40)))
    replace = msgspec.structs.replace
    big = 2**64 - 1
    variants: list[tuple[msgspec.Struct, str]] = [
        (replace(generate, token_ids=[]), DECODE),
        (replace(generate, token_ids=[-5, 3]), DECODE),
        (replace(generate, token_ids=[big] * 40), DECODE),
        (replace(generate, token_ids=[2**63] * 40), DECODE),
        (replace(generate, sampling=SamplingParams(max_tokens=0)), DECODE),
        (replace(generate, sampling=SamplingParams(max_tokens=-1)), DECODE),
        (replace(generate, sampling=SamplingParams(max_tokens=big)), DECODE),
        (replace(generate, sampling=SamplingParams(max_tokens=4, temperature=math.nan)), ""),
        (replace(generate, sampling=SamplingParams(max_tokens=4, top_p=-1.0, seed=big)), ""),
        (replace(generate, sampling=SamplingParams(max_tokens=4, min_tokens=-3)), DECODE),
        (replace(generate, stream_subject="baton.fuzz stream"), DECODE),
        (replace(generate, stream_subject="baton.fuzz.stream\r\nPUB x 1\r\nA"), DECODE),
        (replace(generate, stream_subject="baton.*.stream.>"), DECODE),
        (replace(generate, stream_subject=sink[:-4] + "x" * 100_000), DECODE),
        (replace(generate, stream_subject=""), DECODE),
        (replace(generate, ttft_budget_s=math.nan, tpot_s=-1.0, priority=-(2**63)), ""),
        (replace(generate, ttft_budget_s=-1.0), ""),
        (replace(generate, resume_token_ids=[big]), DECODE),
        (replace(generate, prefill_worker_id=InstanceId("nobody")), ""),
        (replace(generate, model="no-such-model"), ""),
        (replace(prefill, hold_timeout_s=math.nan), PREFILL),
        (replace(prefill, hold_timeout_s=-1.0), PREFILL),
        (replace(prefill, token_ids=[big] * 40), PREFILL),
        (replace(prefill, ttft_budget_s=math.inf), ""),
        (replace(route, token_ids=[big] * 40), ROUTER),
        (replace(route, token_ids=[-1] * 40), ROUTER),
        (replace(route, token_ids=[]), ""),
        (replace(route, model="no-such-model"), ROUTER),
        (AbortRequest(request_id=RequestId("x" * 10_000)), ""),
        (KVRelease(request_id=RequestId("")), ""),
        (
            LoadMetrics(
                worker_id=InstanceId("fuzz-w"), num_running=-1, num_waiting=big,
                num_free_blocks=-1, num_total_blocks=0, kv_usage=math.nan,
            ),
            "",
        ),
        (KVEventBatch(worker_id=InstanceId("fuzz-w"), seq=-1, events=[BlockStored([], None)]), ""),
        (TokenBatch(worker_id=InstanceId("fuzz-w"), chunks=[TokenChunk(rid, [big])]), ""),
    ]  # fmt: skip
    # Distinct ids, so that no variant is refused only as a duplicate of the one before.
    return [
        (
            msgspec.msgpack.encode(
                replace(v, request_id=RequestId(f"fuzz-hostile-{i}"))
                if isinstance(v, GenerateRequest | PrefillRequest | RouteRequest)
                else v
            ),
            refuser,
        )
        for i, (v, refuser) in enumerate(variants)
    ]


def oversized(rng: random.Random, max_payload: int, sink: str) -> list[tuple[bytes, str]]:
    """Just under the limit: random bytes, and requests whose prompts fill it (too long for
    any model: refused)."""
    size = max_payload - 512
    tokens = [1000] * (size // 3 - 64)  # 3 bytes each in msgpack
    generate = GenerateRequest(
        request_id=RequestId("fuzz-big"), model=MODEL, token_ids=tokens, stream_subject=sink
    )
    route = RouteRequest(request_id=RequestId("fuzz-big"), model=MODEL, token_ids=tokens)
    return [
        (rng.randbytes(size), ""),
        (msgspec.msgpack.encode(generate), DECODE),
        (msgspec.msgpack.encode(route), ROUTER),
    ]


@dataclass
class Replies:
    """Every reply to the fuzz, by the reply subject it was sent to."""

    by_subject: dict[str, list[bytes]] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def on_reply(self, msg: Msg) -> None:
        self.by_subject.setdefault(msg.subject, []).append(msg.data)
        self.arrived.set()


@dataclass
class Sent:
    counts: Counter[str] = field(default_factory=Counter)
    # reply subject -> (target name, the ErrorReply's code; None: any code)
    must_answer: dict[str, tuple[str, ErrorCode | None]] = field(default_factory=dict)


def is_decodable(decoder: msgspec.msgpack.Decoder[Any], data: bytes) -> bool:
    try:
        decoder.decode(data)
    except msgspec.DecodeError:
        return False
    return True


@pytest.fixture
async def fuzz_cluster(
    nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str, tmp_path: Path
) -> AsyncIterator[LocalCluster]:
    sim = ("--speedup", "20", "--max-hold-s", "2")
    spec = ClusterSpec(
        namespace=namespace,
        nats_url=nats_server.url,
        etcd_url=etcd_server.url,
        num_routers=1,
        num_prefill_workers=1,
        num_workers=1,
        router_args=ALWAYS_REMOTE,
        prefill_args=(*sim, "--worker-id", PREFILL_ID),
        decode_args=(*sim, "--worker-id", DECODE_ID),
        frontend_args=("--frontend-id", FRONTEND_ID, "--route-timeout-s", "10"),
        log_dir=str(tmp_path),
        log_level="warning",
        ready_timeout_s=30.0,
        stop_timeout_s=15.0,
    )
    async with local_cluster(spec) as cluster:
        yield cluster


async def complete(api: str) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": list(range(20, 120)), "max_tokens": 4, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{api}/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())


async def send_all(
    bus: Bus, target: Target, payloads: list[tuple[bytes, str]], sent: Sent, with_reply: bool
) -> None:
    for i, (payload, refuser) in enumerate(payloads):
        reply = ""
        if with_reply:
            reply = f"{REPLY_PREFIX}.{sum(sent.counts.values())}"
            if target.answers_requests and not is_decodable(target.decoder, payload):
                sent.must_answer[reply] = (target.name, ErrorCode.INVALID_REQUEST)
            elif refuser == target.name:
                sent.must_answer[reply] = (target.name, None)
        await bus.publish_bytes(target.subject, payload, reply=reply)
        sent.counts[target.name] += 1
        if i % 500 == 499:
            await bus.flush()  # pace the burst: the services share two cores with us


def log_lines(tmp_path: Path) -> dict[str, list[str]]:
    return {p.stem: p.read_text(errors="replace").splitlines() for p in tmp_path.glob("*.log")}


@pytest.mark.timeout(180)
async def test_services_survive_bus_fuzz_and_answer_with_typed_errors(
    fuzz_cluster: LocalCluster, nats_server: ServerProcess, namespace: str, tmp_path: Path
):
    cluster = fuzz_cluster
    rng = random.Random(SEED)
    sink = subjects.stream_inbox(namespace, "fuzzsink")
    replies = Replies()
    sent = Sent()
    assert (await complete(cluster.api))["usage"]["completion_tokens"] == 4
    async with Bus.connect(nats_server.url) as bus:
        await bus.subscribe(f"{REPLY_PREFIX}.>", replies.on_reply)
        await bus.subscribe(sink, replies.on_reply)  # tokens of accepted hostile requests
        corpus = [
            *unrefused(random_bytes(rng, 40)),
            *unrefused(truncated(rng, sink)),
            *unrefused(wrongly_typed(sink)),
            *hostile(sink),
            *oversized(rng, bus.max_payload, sink),
        ]
        for target in targets(namespace):
            # Each payload twice: with a reply subject, and without.
            await send_all(bus, target, corpus, sent, with_reply=True)
            await send_all(bus, target, corpus, sent, with_reply=False)
        await bus.flush()

        # Every undecodable request got an ErrorReply (INVALID_REQUEST) from its service.
        async def answered() -> bool:
            return all(s in replies.by_subject for s in sent.must_answer)

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                while not await answered():
                    replies.arrived.clear()
                    await replies.arrived.wait()
        missing = Counter(
            n for s, (n, _) in sent.must_answer.items() if s not in replies.by_subject
        )
        assert not missing, f"no ErrorReply for bad requests: {dict(missing)}"
        for reply_subject, (name, code) in sent.must_answer.items():
            [data] = replies.by_subject[reply_subject]
            reply = reply_decoder.decode(data)
            assert isinstance(reply, ErrorReply), (name, reply)
            assert code is None or reply.code is code, (name, reply)
        for reply_subject, datas in replies.by_subject.items():
            if reply_subject.startswith(REPLY_PREFIX):
                for data in datas:
                    reply_decoder.decode(data)  # every reply is a typed message

        # A flood of garbage, then the logs: O(1) lines, not one per message.
        flood = unrefused(random_bytes(rng, FLOOD))
        for target in targets(namespace):
            await send_all(bus, target, flood, sent, with_reply=False)
        await bus.flush()

        # Still serving, the prefill worker included (the router always places it remotely).
        reply = await complete(cluster.api)
        assert reply["usage"]["completion_tokens"] == 4
    for child in cluster.children:
        assert child.proc.returncode is None, f"{child.name} exited"
    lines = log_lines(tmp_path)
    print(f"fuzz messages sent per subject: {dict(sent.counts)}")  # noqa: T201
    print({name: len(text) for name, text in lines.items()})  # noqa: T201
    for name, text in lines.items():
        tracebacks = [line for line in text if re.search(r"Traceback|handler failed", line)]
        assert not tracebacks, f"{name}: {tracebacks[:3]}"
        assert len(text) <= MAX_LOG_LINES, f"{name} logged {len(text)} lines:\n" + "\n".join(
            text[:20]
        )
