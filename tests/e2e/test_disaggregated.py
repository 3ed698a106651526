"""Disaggregated prefill/decode end to end: the same tokens as aggregated serving, over every
KV transport, and no KV block leaked after thousands of requests with aborts."""

import asyncio
import json
import random

import aiohttp
import pytest

from proto import subjects
from proto.messages import LoadMetrics, PrefillDone, PrefillRequest, RequestId, SamplingParams
from shared.bus import Bus
from shared.codec import load_metrics_decoder, prefill_reply_decoder
from shared.kv_transfer import available_kinds
from tests.e2e.args import TORCH, start_remote_prefill

MODEL = "baton-sim"
TRANSPORTS = [
    pytest.param(
        kind,
        marks=pytest.mark.skipif(
            kind not in available_kinds(), reason=f"{kind} is not installed here"
        ),
    )
    for kind in ("shm", "tcp", "nixl")
]


def prompts() -> list[list[int]]:
    """100 prompts from 1 to 2,000 tokens: block edges, long ones, and random lengths."""
    rng = random.Random(7)
    lengths = [1, 2, 15, 16, 17, 31, 32, 33, 255, 256, 257, 1000, 1999, 2000]
    lengths += [rng.randint(1, 300) for _ in range(100 - len(lengths))]
    return [[rng.randrange(10, 6000) for _ in range(n)] for n in lengths]


async def complete_all(api: str, batch: list[list[int]], max_tokens: int = 6) -> list[str]:
    async with aiohttp.ClientSession() as session:

        async def one(prompt: list[int]) -> str:
            body = {
                "model": MODEL,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            async with session.post(f"{api}/completions", json=body) as resp:
                payload = await resp.json()
                assert resp.status == 200, payload
                assert payload["usage"]["completion_tokens"] == max_tokens
                return str(payload["choices"][0]["text"])

        return await asyncio.gather(*[one(p) for p in batch])


@pytest.fixture(scope="module")
def torch_available():
    pytest.importorskip("torch")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_disaggregated_output_equals_aggregated(start_cluster, torch_available, transport):
    batch = prompts()
    aggregated = await start_cluster(num_workers=1, worker_args=TORCH, namespace=f"agg{transport}")
    expected = await complete_all(aggregated.api, batch)
    disagg = await start_remote_prefill(
        start_cluster, (*TORCH, "--kv-transfer", transport), namespace=f"dis{transport}"
    )
    got = await complete_all(disagg.api, batch)
    assert got == expected
    # Every prompt went through the prefill worker (thresholds of one token).
    assert await remote_prefills(disagg.url) == len(batch)


async def remote_prefills(url: str) -> float:
    """The frontend's count of prompts prefilled on a prefill worker (it must be exported).
    Each such prompt's first token also came with the workers' breakdown of its time to first
    token, one observation in every phase: those counts must match it."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        metrics = await resp.text()
    remote = [
        line
        for line in metrics.splitlines()
        if line.startswith("baton_frontend_remote_prefills_total")
    ]
    assert remote, "baton_frontend_remote_prefills_total is not exported"
    num_remote = float(remote[0].split()[-1])
    for phase in ("queue", "prefill", "transfer", "other"):
        line = f'baton_frontend_ttft_phase_seconds_count{{phase="{phase}"}} {num_remote}'
        assert line in metrics, line
    return num_remote


async def test_no_kv_block_leaks_after_many_requests_with_aborts(start_cluster):
    sim = ("--speedup", "20", "--num-kv-blocks", "4096")
    cluster = await start_cluster(
        num_workers=2,
        worker_args=sim,
        num_prefill=1,
        prefill_args=sim,
        num_routers=1,
        router_args=("--min-remote-prefill-tokens", "64", "--min-remote-prefill-fraction", "0.3"),
    )
    loads: dict[str, LoadMetrics] = {}
    arrived: asyncio.Queue[None] = asyncio.Queue()

    async def until(predicate, timeout_s: float = 30) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await arrived.get()

    def idle() -> bool:
        return len(loads) == 3 and all(
            m.num_running == 0 and m.num_waiting == 0 for m in loads.values()
        )

    rng = random.Random(11)
    system = [rng.randrange(10, 6000) for _ in range(96)]  # a shared prefix for caching
    async with Bus.connect(cluster.nats_url) as bus:

        async def on_load(msg):
            load = load_metrics_decoder.decode(msg.data)
            loads[load.worker_id] = load
            arrived.put_nowait(None)

        await bus.subscribe(subjects.load_metrics_all(cluster.namespace), on_load)
        await until(idle)
        free_before = {w: m.num_free_blocks for w, m in loads.items()}
        assert all(free == 4096 for free in free_before.values())

        limit = asyncio.Semaphore(100)
        outcomes = {"done": 0, "aborted": 0}
        async with aiohttp.ClientSession() as session:

            async def one(i: int) -> None:
                n = rng.randint(1, 300)
                prompt = (system if i % 2 else []) + [rng.randrange(10, 6000) for _ in range(n)]
                abort = rng.random() < 0.3
                body = {
                    "model": MODEL,
                    "prompt": prompt,
                    "max_tokens": 24,
                    "stream": True,
                    "ignore_eos": True,
                }
                async with limit, session.post(f"{cluster.api}/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                    events = 0
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            assert "error" not in json.loads(line[6:])
                            events += 1
                            if abort and events == 2:
                                outcomes["aborted"] += 1
                                return  # closing the response aborts the request
                    outcomes["done"] += 1

            await asyncio.gather(*[one(i) for i in range(2000)])
        assert outcomes["done"] + outcomes["aborted"] == 2000
        assert 450 < outcomes["aborted"] < 750
        await until(idle)
        await until(lambda: {w: m.num_free_blocks for w, m in loads.items()} == free_before)
        # Both paths ran: long uncached prompts went to the prefill worker, short ones did not
        # (aborted requests may end before their first token is counted).
        assert 300 < await remote_prefills(cluster.url) < 1900


async def test_requests_fall_back_to_local_prefill_when_the_prefill_worker_dies(start_cluster):
    cluster = await start_remote_prefill(start_cluster, ("--speedup", "20"))
    batch = prompts()[:20]
    before = await complete_all(cluster.api, batch)
    # Killed without a goodbye: its etcd entry lives on for the lease TTL, so the router still
    # picks it, the decode worker gets no answer, and must prefill locally instead of hanging.
    cluster.prefills[0].kill()
    async with asyncio.timeout(10):
        await cluster.prefills[0].wait()
    after = await complete_all(cluster.api, batch)
    assert after == before
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{cluster.url}/metrics") as resp:
            metrics = await resp.text()
    remote = next(
        line
        for line in metrics.splitlines()
        if line.startswith("baton_frontend_remote_prefills_total")
    )
    assert float(remote.split()[-1]) == len(batch)  # the first round only


async def test_prefill_worker_frees_blocks_no_decode_worker_reads(start_cluster):
    cluster = await start_cluster(
        num_workers=1,
        worker_args=("--speedup", "20"),
        num_prefill=1,
        prefill_args=("--speedup", "20", "--max-hold-s", "1", "--num-kv-blocks", "512"),
    )
    loads: dict[str, LoadMetrics] = {}
    arrived: asyncio.Queue[None] = asyncio.Queue()
    async with Bus.connect(cluster.nats_url) as bus:

        async def on_load(msg):
            load = load_metrics_decoder.decode(msg.data)
            loads[load.worker_id] = load
            arrived.put_nowait(None)

        await bus.subscribe(subjects.load_metrics_all(cluster.namespace), on_load)
        async with asyncio.timeout(10):
            while not any(m.num_total_blocks == 512 for m in loads.values()):
                await arrived.get()
        prefill_id = next(w for w, m in loads.items() if m.num_total_blocks == 512)
        # A decode worker that asks for a prefill and then dies before reading it.
        request = PrefillRequest(
            request_id=RequestId("orphan"),
            token_ids=list(range(10, 330)),
            sampling=SamplingParams(max_tokens=1),
        )
        reply = prefill_reply_decoder.decode(
            await bus.request(
                subjects.worker_inbox(cluster.namespace, prefill_id), request, timeout_s=10
            )
        )
        assert isinstance(reply, PrefillDone)
        assert len(reply.block_descriptors) == 20  # 320 tokens in blocks of 16
        async with asyncio.timeout(10):
            while loads[prefill_id].num_free_blocks != 512 - 20:
                await arrived.get()  # held: the blocks are in use
            while loads[prefill_id].num_free_blocks != 512:
                await arrived.get()  # freed after --max-hold-s
