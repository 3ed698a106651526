"""/health, /ready and /metrics of the router and of both worker roles, on a real cluster: what
they report is what the processes did (requests served, bad messages, held KV that timed out,
the engine canary)."""

import asyncio

import aiohttp
import pytest

from proto import subjects
from proto.messages import PrefillRequest, RequestId, SamplingParams, WorkerInfo, WorkerRole
from shared.bus import Bus
from shared.codec import prefill_reply_decoder, worker_info_decoder
from shared.discovery import Discovery
from tests.e2e.args import ALWAYS_REMOTE
from tests.metrics import metric

MODEL = "baton-sim"
SIM = ("--speedup", "20")
NUM_BAD = 7


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    async with session.get(url) as resp:
        return resp.status, await resp.json()


async def until(predicate, timeout_s: float = 15.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not await predicate():  # noqa: ASYNC110 - polling another process's HTTP
            await asyncio.sleep(0.1)


async def workers(etcd_url: str, namespace: str) -> dict[WorkerRole, WorkerInfo]:
    async with Discovery.connect(etcd_url) as discovery:
        values = await discovery.get_prefix(subjects.etcd_workers(namespace))
    infos = [worker_info_decoder.decode(v) for v in values.values()]
    return {info.role: info for info in infos}


async def complete(session: aiohttp.ClientSession, api: str, first: int) -> None:
    prompt = list(range(first, first + 60))
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 3, "ignore_eos": True}
    async with session.post(f"{api}/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()


@pytest.mark.timeout(120)
async def test_router_and_workers_report_health_readiness_and_their_counters(
    start_cluster, nats_server, etcd_server, namespace
):
    cluster = await start_cluster(
        num_workers=1,
        worker_args=SIM,
        num_prefill=1,
        prefill_args=(*SIM, "--max-hold-s", "0.5"),
        num_routers=1,
        router_args=ALWAYS_REMOTE,
        frontend_args=("--route-timeout-s", "10"),
    )
    [router] = cluster.router_urls
    by_role = await workers(etcd_server.url, namespace)
    decode, prefill = by_role[WorkerRole.DECODE], by_role[WorkerRole.PREFILL]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        # Alive and ready; a worker that has never stepped proves its engine with a canary.
        for url in (router, decode.http_url, prefill.http_url):
            assert await get(session, f"{url}/health") == (200, {"status": "ok"})
        status, body = await get(session, f"{router}/ready")
        assert status == 200, body
        assert body["subscribed"]
        assert body["bus_connected"]
        assert body["workers"] == 2
        assert body["models"] == 1
        for info in (decode, prefill):
            status, body = await get(session, f"{info.http_url}/ready")
            assert status == 200, body
            assert body["engine"] == {"ok": True, "how": "canary", "detail": ""}
            assert await metric(info.http_url, "baton_worker_canaries", session) == 1
            assert await metric(info.http_url, "baton_worker_canary_failures", session) == 0

        # The decode worker learns of the prefill worker from its own etcd watch, which can
        # lag the cluster's readiness on a busy machine (it then prefills locally): first
        # wait for one request prefilled remotely, then count from there.
        warm_ups = iter(range(5000, 100_000, 100))

        async def prefills_remotely() -> bool:
            await complete(session, cluster.api, next(warm_ups))
            return await metric(decode.http_url, "baton_worker_remote_prefills", session) >= 1

        await until(prefills_remotely)
        names = (
            (decode.http_url, "baton_worker_remote_prefills"),
            (decode.http_url, "baton_worker_prefill_fallbacks"),
            (router, "baton_router_worker_choices_total"),
        )
        before = [await metric(url, name, session) for url, name in names]
        # Served requests show: remote prefills on the decode worker, steps, decisions.
        for i in range(3):
            await complete(session, cluster.api, 100 * (i + 1))
        after = [await metric(url, name, session) for url, name in names]
        remote, fallbacks, choices = (a - b for a, b in zip(after, before, strict=True))
        assert remote == 3
        assert fallbacks == 0
        assert await metric(decode.http_url, "baton_worker_steps", session) >= 3
        # Two choices per request: its decode worker and its prefill worker.
        assert choices == 6
        assert await metric(router, "baton_router_kv_event_batches_total", session) >= 1
        status, body = await get(session, f"{decode.http_url}/ready")
        assert body["engine"]["how"] == "step", body  # it stepped just now: no canary needed

        # Bad messages are counted where they land.
        async with Bus.connect(nats_server.url) as bus:
            for i in range(NUM_BAD):
                await bus.publish_bytes(decode.subject, b"\xc1" * (i + 1))
                await bus.publish_bytes(subjects.router_requests(namespace), b"\x01")
                await bus.publish_bytes(subjects.kv_events(namespace, "nobody"), b"")
            # A prefill no decode worker ever reads: its hold times out (--max-hold-s 0.5).
            data = await bus.request(
                prefill.subject,
                PrefillRequest(
                    request_id=RequestId("held"),
                    token_ids=list(range(40, 80)),
                    sampling=SamplingParams(max_tokens=1),
                ),
                timeout_s=10,
            )
            assert prefill_reply_decoder.decode(data).request_id == "held"

        async def counted() -> bool:
            return (
                await metric(decode.http_url, "baton_worker_bad_messages", session) == NUM_BAD
                and await metric(router, "baton_router_bad_route_requests_total", session)
                == NUM_BAD
                and await metric(router, "baton_router_bad_kv_events_total", session) == NUM_BAD
                and await metric(prefill.http_url, "baton_worker_hold_timeouts", session) == 1
            )

        await until(counted)
        # The flood of bad messages logged one line per kind, the rest suppressed and counted.
        assert await metric(decode.http_url, "baton_worker_log_lines_suppressed", session) >= (
            NUM_BAD - 1
        )
        assert await metric(router, "baton_router_log_lines_suppressed_total", session) >= (
            2 * (NUM_BAD - 1)
        )
