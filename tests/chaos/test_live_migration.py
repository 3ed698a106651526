"""A decode worker told to stop (SIGTERM) mid-stream hands its running streams to the other
worker with their KV (live migration): every stream completes with the text an undisturbed run
gives, the other worker reads the KV rather than recompute it, and the draining worker exits
once its KV is read, without waiting for the streams to finish."""

import asyncio
import signal
import time

import pytest

from proto import subjects
from proto.messages import WorkerInfo
from shared.codec import worker_info_decoder
from shared.discovery import Discovery
from tests.chaos.test_migration import body, metric, run_all

NUM_STREAMS = 60


async def worker_infos(etcd_url: str, namespace: str) -> list[WorkerInfo]:
    async with Discovery.connect(etcd_url) as discovery:
        values = await discovery.get_prefix(subjects.etcd_workers(namespace))
    return [worker_info_decoder.decode(v) for v in values.values()]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 7}])
async def test_a_draining_worker_moves_its_streams_with_their_kv(
    start_cluster, etcd_server, namespace, sampling
):
    # speedup 0.2: 150 tokens take several seconds, so the streams are mid-way at SIGTERM.
    cluster = await start_cluster(num_workers=2, worker_args=("--speedup", "0.2"))
    payloads = [body(i, **sampling) for i in range(NUM_STREAMS)]
    expected = await run_all(cluster.url, payloads)

    victim = cluster.workers[0]
    [peer] = [i for i in await worker_infos(etcd_server.url, namespace) if i.pid != victim.pid]
    run = asyncio.create_task(run_all(cluster.url, payloads))
    await asyncio.sleep(1.5)  # every stream is placed and streaming
    assert not run.done()
    stopped_at = time.monotonic()
    victim.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        await victim.wait()
    drain_s = time.monotonic() - stopped_at
    got = await run

    assert got == expected  # no error, no repeated or missing token, the same text
    assert victim.returncode == 0
    moved_in = await metric(peer.http_url, "baton_worker_moved_in ")
    assert moved_in > 0
    assert await metric(peer.http_url, "baton_worker_moved_in_blocks") >= moved_in
    # The moved streams' KV was read, not recomputed; none of them fell back.
    assert await metric(peer.http_url, "baton_worker_prefill_fallbacks") == 0
    assert await metric(cluster.url, "baton_frontend_migrations_total") >= moved_in
    # The drain did not wait for the streams (150 tokens at this speed take far longer).
    assert drain_s < 10.0, drain_s
