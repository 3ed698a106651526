"""shared.discovery against a real etcd: keys, leases, watches, models and an etcd restart."""

import asyncio
import logging
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client

from proto.messages import InstanceId, ModelCard, WorkerInfo, WorkerRole
from proto.subjects import etcd_model, etcd_prefix, etcd_worker, worker_inbox
from shared.discovery import Discovery
from shared.errors import Unavailable
from shared.servers import ServerProcess, free_port, start_etcd

WAIT_S = 5.0


@pytest.fixture
async def discovery(etcd_server: ServerProcess) -> AsyncIterator[Discovery]:
    async with Discovery.connect(etcd_server.url) as discovery:
        yield discovery


@pytest.fixture
async def raw_etcd(etcd_server: ServerProcess) -> AsyncIterator[Etcd3Client]:
    """A plain etcd3aio client, to act behind Discovery's back (revoke a lease, read one)."""
    async with Etcd3Client([etcd_server.url.removeprefix("http://")]) as client:
        yield client


def make_worker(worker_id: str, namespace: str) -> WorkerInfo:
    return WorkerInfo(
        worker_id=InstanceId(worker_id),
        model="tiny",
        role=WorkerRole.AGGREGATED,
        subject=worker_inbox(namespace, worker_id),
        max_num_seqs=8,
        num_kv_blocks=64,
    )


def discovery_tasks() -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("etcd-")]


async def retry_until_available(call: Callable[[], Awaitable[None]]) -> None:
    """Run ``call`` until etcd answers it; for the moments after a restart, when no event
    exists to wait on. The caller bounds it with asyncio.timeout."""
    while True:
        try:
            await call()
            return
        except Unavailable:
            await asyncio.sleep(0.1)


async def test_put_get_delete_and_get_prefix_round_trip(
    discovery: Discovery, namespace: str
) -> None:
    prefix = f"{etcd_prefix(namespace)}kv/"
    await discovery.put(f"{prefix}a", b"1")
    await discovery.put(f"{prefix}b", b"2")
    await discovery.put(f"{etcd_prefix(namespace)}kv0", b"outside")  # sorts just past the prefix

    assert await discovery.get(f"{prefix}a") == b"1"
    assert await discovery.get(f"{prefix}missing") is None
    assert await discovery.get_prefix(prefix) == {f"{prefix}a": b"1", f"{prefix}b": b"2"}

    assert await discovery.delete(f"{prefix}a") is True
    assert await discovery.delete(f"{prefix}a") is False
    assert await discovery.get_prefix(prefix) == {f"{prefix}b": b"2"}


async def test_connect_raises_unavailable_when_nothing_listens() -> None:
    with pytest.raises(Unavailable, match="etcd connect failed"):
        async with Discovery.connect(f"http://127.0.0.1:{free_port()}", call_timeout_s=1.0):
            pass
    with pytest.raises(ValueError, match="http\\(s\\)://host:port"):
        async with Discovery.connect("ftp://127.0.0.1:2379"):
            pass


async def test_register_makes_key_visible_and_revoke_removes_it(
    discovery: Discovery, namespace: str
) -> None:
    key = etcd_worker(namespace, "w1")
    registration = await discovery.register(key, b"hello", ttl_s=5)
    assert await discovery.get(key) == b"hello"

    await registration.revoke()
    assert await discovery.get(key) is None
    await registration.revoke()  # idempotent
    assert not discovery_tasks()


async def test_registration_update_puts_new_value_under_same_lease(
    discovery: Discovery, raw_etcd: Etcd3Client, namespace: str
) -> None:
    key = etcd_worker(namespace, "w1")
    registration = await discovery.register(key, b"v1", ttl_s=5)
    await registration.update(b"v2")

    assert raw_etcd.kv is not None
    response = await raw_etcd.kv.get(key, timeout=WAIT_S)
    assert response.kvs[0].value == b"v2"
    assert response.kvs[0].lease == registration.lease_id
    await registration.revoke()


async def test_registration_key_expires_after_ttl_when_owner_closes_without_revoke(
    etcd_server: ServerProcess, discovery: Discovery, namespace: str
) -> None:
    key = etcd_worker(namespace, "crashed")
    async with Discovery.connect(etcd_server.url) as owner:
        await owner.register(key, b"alive", ttl_s=2)
        await owner.close()  # and again on leaving the block: close is idempotent
    assert not discovery_tasks()  # closing stopped the keepalive
    assert await discovery.get(key) == b"alive"  # the lease still holds it: no revoke ran

    async with discovery.watch_prefix(key) as view, asyncio.timeout(WAIT_S):
        await view.wait_for(lambda: key not in view.items)


async def test_registration_registers_again_when_its_lease_is_lost(
    discovery: Discovery, raw_etcd: Etcd3Client, namespace: str
) -> None:
    key = etcd_worker(namespace, "w1")
    registration = await discovery.register(key, b"v", ttl_s=2)
    lost_lease_id = registration.lease_id

    async with discovery.watch_prefix(key) as view:
        assert raw_etcd.lease is not None
        await raw_etcd.lease.revoke(lost_lease_id, timeout=WAIT_S)  # as if it had expired
        async with asyncio.timeout(WAIT_S):
            await view.wait_for(
                lambda: registration.lease_id != lost_lease_id and view.items.get(key) == b"v"
            )

    assert raw_etcd.kv is not None
    response = await raw_etcd.kv.get(key, timeout=WAIT_S)
    assert response.kvs[0].lease == registration.lease_id
    await registration.revoke()


async def test_watch_prefix_loads_snapshot_then_applies_puts_and_deletes_in_order(
    discovery: Discovery, namespace: str
) -> None:
    prefix = f"{etcd_prefix(namespace)}watch/"
    a, b, c = f"{prefix}a", f"{prefix}b", f"{prefix}c"
    await discovery.put(a, b"1")
    await discovery.put(b, b"1")

    async with discovery.watch_prefix(prefix) as view, asyncio.timeout(WAIT_S):
        assert view.items == {a: b"1", b: b"1"}  # the initial list, before any event

        await discovery.put(c, b"1")
        await view.wait_for(lambda: c in view.items)
        await discovery.delete(a)
        await view.wait_for(lambda: a not in view.items)

        # Applied out of order, this burst would end anywhere but at b=4.
        for value in (b"2", b"3", None, b"4"):
            await (discovery.delete(b) if value is None else discovery.put(b, value))
        await view.wait_for(lambda: view.items == {b: b"4", c: b"1"})
        assert view.revision > 0


async def test_watch_prefix_loses_no_put_made_while_it_starts(
    discovery: Discovery, namespace: str
) -> None:
    prefix = f"{etcd_prefix(namespace)}race/"
    keys = [f"{prefix}{i:03d}" for i in range(60)]

    async def write_all() -> None:
        for key in keys:
            await discovery.put(key, b"x")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(write_all())
        async with discovery.watch_prefix(prefix) as view, asyncio.timeout(WAIT_S):
            await view.wait_for(lambda: len(view.items) == len(keys))
    assert sorted(view.items) == keys


async def test_watch_workers_decodes_worker_info_and_skips_bad_values(
    discovery: Discovery, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    w1, w2 = make_worker("w1", namespace), make_worker("w2", namespace)
    first = await discovery.register_worker(namespace, w1, ttl_s=5)
    await discovery.put(etcd_worker(namespace, "bad"), b"\xc1not msgpack")

    async with discovery.watch_workers(namespace) as directory, asyncio.timeout(WAIT_S):
        assert directory.workers == {"w1": w1}
        assert "undecodable etcd value skipped" in caplog.text

        second = await discovery.register_worker(namespace, w2, ttl_s=5)
        await directory.wait_for(lambda: "w2" in directory.workers)
        assert directory.workers == {"w1": w1, "w2": w2}

        await first.revoke()
        await directory.wait_for(lambda: "w1" not in directory.workers)
        assert directory.workers == {"w2": w2}
        await second.revoke()


async def test_model_registry_round_trip(discovery: Discovery, namespace: str) -> None:
    tiny = ModelCard(name="tiny", tokenizer="builtin", context_length=2048, kv_block_size=16)
    org = ModelCard(
        name="org/model-b", tokenizer="/models/b", context_length=8192, kv_block_size=32
    )
    await discovery.put_model(namespace, tiny)
    await discovery.put_model(namespace, org)
    await discovery.put(etcd_model(namespace, "broken"), b"\xc1")

    assert await discovery.get_model(namespace, "tiny") == tiny
    assert await discovery.get_model(namespace, "org/model-b") == org
    assert await discovery.get_model(namespace, "absent") is None
    assert await discovery.list_models(namespace) == [org, tiny]  # name order, broken skipped

    longer = ModelCard(name="tiny", tokenizer="builtin", context_length=4096, kv_block_size=16)
    await discovery.put_model(namespace, longer)  # a worker of a newer version re-puts it
    assert await discovery.get_model(namespace, "tiny") == longer


async def test_discovery_recovers_after_etcd_kill_and_restart(
    tmp_path: Path, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shared.discovery")
    server = await asyncio.to_thread(start_etcd, data_dir=str(tmp_path / "etcd"))
    prefix = etcd_prefix(namespace)
    worker_key, model_key = etcd_worker(namespace, "w1"), etcd_model(namespace, "tiny")
    orphan_key, later_key = etcd_worker(namespace, "orphan"), etcd_model(namespace, "later")
    try:
        async with Discovery.connect(server.url, call_timeout_s=1.0) as discovery:
            registration = await discovery.register(worker_key, b"w", ttl_s=3)
            async with Discovery.connect(server.url) as orphan_owner:  # dies before the crash
                await orphan_owner.register(orphan_key, b"o", ttl_s=2)

            async with discovery.watch_prefix(prefix) as view:
                assert set(view.items) == {worker_key, orphan_key}
                await discovery.put(model_key, b"m")
                async with asyncio.timeout(WAIT_S):  # the watch stream is up, not just the list
                    await view.wait_for(lambda: model_key in view.items)

                server.kill()
                with pytest.raises(Unavailable):  # bounded by call_timeout_s, not hung
                    await discovery.put(later_key, b"during")
                server = await asyncio.to_thread(start_etcd, server.port, data_dir=server.data_dir)

                async with asyncio.timeout(15):
                    await retry_until_available(lambda: discovery.put(later_key, b"after"))
                    # The orphan's lease expires after the restart; ours is kept alive.
                    await view.wait_for(
                        lambda: (
                            view.items == {worker_key: b"w", model_key: b"m", later_key: b"after"}
                        )
                    )
                with pytest.raises(TimeoutError):  # more than one TTL later it is still there
                    async with asyncio.timeout(3.5):
                        await view.wait_for(lambda: worker_key not in view.items)
                assert await discovery.get(worker_key) == b"w"
                assert "watch re-listed" in caplog.text  # it rebuilt the watch, not just resumed
                await registration.revoke()
                async with asyncio.timeout(WAIT_S):
                    await view.wait_for(lambda: worker_key not in view.items)
        assert not discovery_tasks()
    finally:
        server.kill()
        shutil.rmtree(tmp_path / "etcd", ignore_errors=True)
