"""A decode worker told to stop (SIGTERM) mid-stream hands its running streams to the other
worker with their KV (live migration): every stream completes with the text an undisturbed run
gives, the other worker reads the KV rather than recompute it, and the draining worker exits
once its KV is read, without waiting for the streams to finish. With ``--drain-handoff
recompute`` the streams move the same way and the other worker recomputes their KV."""

import asyncio
import signal
import time

import pytest

from tests.chaos.test_migration import body, metric, run_all, worker_infos

NUM_STREAMS = 60


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("handoff", "sampling"),
    [
        ("kv", {"temperature": 0}),
        ("kv", {"temperature": 0.8, "seed": 7}),
        ("recompute", {"temperature": 0}),
    ],
)
async def test_a_draining_worker_moves_its_streams(
    start_cluster, etcd_server, namespace, handoff, sampling
):
    # speedup 0.2: 150 tokens take several seconds, so the streams are mid-way at SIGTERM.
    cluster = await start_cluster(
        num_workers=2, worker_args=("--speedup", "0.2", "--drain-handoff", handoff)
    )
    payloads = [body(i, **sampling) for i in range(NUM_STREAMS)]
    expected = await run_all(cluster.url, payloads)

    infos = await worker_infos(etcd_server.url, namespace)
    run = asyncio.create_task(run_all(cluster.url, payloads))
    await asyncio.sleep(1.5)  # every stream is placed and streaming
    assert not run.done()
    # The worker holding more streams (placement may well put most on one) is stopped.
    held = {i.pid: await metric(i.http_url, "baton_worker_in_flight") for i in infos}
    [victim] = [w for w in cluster.workers if w.pid == max(held, key=held.__getitem__)]
    [peer] = [i for i in infos if i.pid != victim.pid]
    assert held[victim.pid] > 0
    stopped_at = time.monotonic()
    victim.send_signal(signal.SIGTERM)
    async with asyncio.timeout(30):
        await victim.wait()
    drain_s = time.monotonic() - stopped_at
    got = await run

    assert got == expected  # no error, no repeated or missing token, the same text
    assert victim.returncode == 0
    moved = await metric(cluster.url, "baton_frontend_migrations_total")
    assert moved > 0
    moved_in = await metric(peer.http_url, "baton_worker_moved_in")
    if handoff == "kv":
        # Every moved stream's KV was read, none recomputed (no fallback).
        assert moved_in == moved
        assert await metric(peer.http_url, "baton_worker_moved_in_blocks") >= moved_in
        assert await metric(peer.http_url, "baton_worker_prefill_fallbacks") == 0
    else:
        assert moved_in == 0
    # The drain did not wait for the streams (150 tokens at this speed take far longer).
    assert drain_s < 10.0, drain_s
