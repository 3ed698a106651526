"""The KV-aware router end to end: prefix placement, replicas, lost events, dead workers."""

import asyncio
import random

import aiohttp

from proto import subjects
from proto.messages import BlockHash, BlockStored, InstanceId, KVEventBatch
from shared.bus import Bus
from shared.codec import load_metrics_decoder
from tests.metrics import metric

MODEL = "baton-sim"
SIM = ("--speedup", "20")


async def complete(session: aiohttp.ClientSession, api: str, prompt: list[int]) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 4, "ignore_eos": True}
    async with session.post(f"{api}/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def until(predicate, timeout_s: float = 15.0) -> None:
    """Poll an HTTP-observed condition (there is no event to wait on across processes)."""
    async with asyncio.timeout(timeout_s):
        while not await predicate():  # noqa: ASYNC110 - polling another process's HTTP
            await asyncio.sleep(0.1)


def cached_tokens(reply: dict) -> int:
    return int(reply["usage"]["prompt_tokens_details"]["cached_tokens"])


async def test_prefix_sharing_requests_go_where_the_prefix_is_cached(start_cluster):
    cluster = await start_cluster(num_workers=3, worker_args=SIM, num_routers=2)
    rng = random.Random(3)
    prefix = [rng.randrange(10, 6000) for _ in range(512)]
    async with aiohttp.ClientSession() as session:
        first = await complete(session, cluster.api, [*prefix, 1])
        assert cached_tokens(first) == 0

        async def indexed() -> bool:
            entries = [
                await metric(u, "baton_router_index_entries", session) for u in cluster.router_urls
            ]
            return entries[0] == entries[1] >= 32

        await until(indexed)  # both replicas heard the 32 stored blocks
        replies = [await complete(session, cluster.api, [*prefix, 100 + i, 7]) for i in range(12)]
        assert [cached_tokens(r) for r in replies] == [512] * 12
        hit_rates = [
            await metric(u, "baton_router_overlap_hit_rate", session) for u in cluster.router_urls
        ]
        assert max(hit_rates) > 0.5


async def test_router_resyncs_after_lost_events_and_forgets_dead_workers(start_cluster):
    cluster = await start_cluster(
        num_workers=2, worker_args=(*SIM, "--lease-ttl-s", "2"), num_routers=1
    )
    router = cluster.router_urls[0]
    rng = random.Random(5)
    async with aiohttp.ClientSession() as session, Bus.connect(cluster.nats_url) as bus:
        for _ in range(6):
            await complete(session, cluster.api, [rng.randrange(10, 6000) for _ in range(160)])

        seen: list[float] = []

        async def settled() -> bool:
            # The prompts' 60 blocks, and no event still on its way (the outputs' full blocks
            # arrive after the prompts'): the same count twice, a quarter second apart.
            seen.append(await metric(router, "baton_router_index_entries", session))
            await asyncio.sleep(0.25)
            return seen[-1] >= 60 and len(seen) > 1 and seen[-1] == seen[-2]

        await until(settled)
        before = await metric(router, "baton_router_index_entries", session)
        assert before == seen[-1]
        # A batch from the future: the router sees a gap in worker 0's numbering, must ask the
        # worker for its real state, and must not keep the bogus block.
        workers_url = f"{cluster.url}/ready"
        async with session.get(workers_url) as resp:
            assert (await resp.json())["workers"] == 2
        victim = await _any_worker_id(bus, cluster.namespace)
        bogus = KVEventBatch(
            worker_id=victim, seq=10_000, events=[BlockStored(block_hashes=[BlockHash(12345)])]
        )
        await bus.publish(subjects.kv_events(cluster.namespace, victim), bogus)

        async def resynced() -> bool:
            return await metric(router, "baton_router_resyncs_total", session) >= 1

        await until(resynced)
        assert await metric(router, "baton_router_index_entries", session) == before
        # Dead workers' blocks leave the index when their leases expire.
        for worker in cluster.workers:
            worker.kill()

        async def emptied() -> bool:
            return await metric(router, "baton_router_index_entries", session) == 0

        await until(emptied, timeout_s=20)


async def _any_worker_id(bus: Bus, namespace: str) -> InstanceId:
    """The id of a live worker, from its load reports."""
    found: asyncio.Future[InstanceId] = asyncio.get_running_loop().create_future()

    async def on_load(msg) -> None:
        if not found.done():
            found.set_result(load_metrics_decoder.decode(msg.data).worker_id)

    await bus.subscribe(subjects.load_metrics_all(namespace), on_load)
    async with asyncio.timeout(5):
        return await found
