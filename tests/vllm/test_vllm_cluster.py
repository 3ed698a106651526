"""A real cluster serving with ``--engine vllm``: services started by their CLIs, a chat
completion streamed over HTTP, and the worker's prefix-cache events on the bus in Baton's
hashes."""

import asyncio

import openai
import pytest

pytest.importorskip("vllm")

from proto import subjects
from proto.messages import BlockStored, KVEventBatch
from services.launcher.cluster import ClusterSpec, local_cluster
from shared.bus import Bus
from shared.codec import kv_event_batch_decoder
from shared.kv_hash import hash_prompt_blocks
from tests.e2e.args import ALWAYS_REMOTE, WAIT_FOR_ROUTER
from tests.e2e.test_disaggregated import complete_all, prompts, remote_prefills

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.timeout(600),
    pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning"),
]

MODEL = "baton-sim"
VLLM = ("--engine", "vllm", "--num-kv-blocks", "512", "--max-model-len", "1024")
# For prompts of up to 2,000 tokens (tests.e2e.test_disaggregated's).
VLLM_LONG = ("--engine", "vllm", "--num-kv-blocks", "2048", "--max-model-len", "4096")


@pytest.fixture
async def cluster(nats_server, etcd_server, namespace):
    spec = ClusterSpec(
        namespace=namespace,
        nats_url=nats_server.url,
        etcd_url=etcd_server.url,
        num_routers=1,
        num_workers=1,
        decode_args=VLLM,
        log_level="warning",
        ready_timeout_s=300.0,  # vLLM takes 20-60 s to start on a busy 2-core machine
        stop_timeout_s=30.0,
    )
    async with local_cluster(spec) as started:
        yield started


async def test_vllm_worker_streams_a_chat_completion(cluster, nats_server, namespace):
    client = openai.AsyncOpenAI(base_url=cluster.api, api_key="unused", max_retries=0, timeout=120)
    prompt = list(range(100, 300))
    first_block = hash_prompt_blocks(prompt, 16)[0]
    announced = asyncio.Event()  # the worker published the prompt's first block
    async with Bus.connect(nats_server.url) as bus:

        async def on_batch(msg) -> None:
            batch: KVEventBatch = kv_event_batch_decoder.decode(msg.data)
            for event in batch.events:
                if isinstance(event, BlockStored) and first_block in event.block_hashes:
                    announced.set()

        await bus.subscribe(subjects.kv_events_all(namespace), on_batch)
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Tell me a story about a baton. " * 8}],
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert [reason for reason in finish if reason] == ["length"]
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.completion_tokens == 12
        assert usage.prompt_tokens > 64
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text

        # Greedy is deterministic, and the prompt's blocks reach the bus in Baton's hashes
        # (what the router indexes).
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        first = await client.completions.create(**kwargs, extra_body={"ignore_eos": True})
        second = await client.completions.create(**kwargs, extra_body={"ignore_eos": True})
        await client.close()
        assert first.choices[0].text == second.choices[0].text
        assert first.usage.completion_tokens == 6
        async with asyncio.timeout(10):
            await announced.wait()


async def test_vllm_disaggregated_text_equals_aggregated(nats_server, etcd_server, namespace):
    """A prefill and a decode vLLM worker over tcp (vLLM's KV tensors are not in shm) give
    every prompt the greedy text one aggregated vLLM worker gives, and every prompt went
    through the prefill worker. The prefill worker is left at ``--kv-transfer auto``, which
    is tcp for vLLM."""
    batch = prompts()
    engine = (*VLLM_LONG, "--kv-transfer", "tcp")

    def spec(suffix: str, **kwargs) -> ClusterSpec:
        return ClusterSpec(
            namespace=f"{namespace}{suffix}",
            nats_url=nats_server.url,
            etcd_url=etcd_server.url,
            log_level="warning",
            ready_timeout_s=300.0,
            stop_timeout_s=30.0,
            **kwargs,
        )

    async with local_cluster(spec("agg", num_workers=1, decode_args=VLLM_LONG)) as aggregated:
        expected = await complete_all(aggregated.api, batch)
    disaggregated = spec(
        "dis",
        num_workers=1,
        decode_args=engine,
        num_prefill_workers=1,
        prefill_args=VLLM_LONG,
        router_args=ALWAYS_REMOTE,
        frontend_args=WAIT_FOR_ROUTER,
    )
    async with local_cluster(disaggregated) as cluster:
        got = await complete_all(cluster.api, batch)
        num_remote = await remote_prefills(cluster.url)
    assert got == expected
    assert num_remote == len(batch)
