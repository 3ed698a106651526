"""Start Baton's services through their CLIs against the session's nats-server and etcd."""

import contextlib

import pytest

from services.launcher.cluster import ClusterSpec, LocalCluster, local_cluster
from shared.servers import ServerProcess


@pytest.fixture
async def start_cluster(nats_server: ServerProcess, etcd_server: ServerProcess, namespace: str):
    """A factory: ``await start_cluster(num_workers=2, worker_args=(...))`` -> a ready
    LocalCluster; every cluster it started is stopped when the test ends."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(
            num_workers: int = 2,
            worker_args: tuple[str, ...] = (),
            frontend_args: tuple[str, ...] = (),
            num_prefill: int = 0,
            prefill_args: tuple[str, ...] = (),
            num_routers: int = 0,
            router_args: tuple[str, ...] = (),
            namespace: str = namespace,
            num_frontends: int = 1,
        ) -> LocalCluster:
            spec = ClusterSpec(
                namespace=namespace,
                nats_url=nats_server.url,
                etcd_url=etcd_server.url,
                num_routers=num_routers,
                num_prefill_workers=num_prefill,
                num_workers=num_workers,
                num_frontends=num_frontends,
                router_args=router_args,
                prefill_args=prefill_args,
                decode_args=worker_args,
                frontend_args=frontend_args,
                log_level="warning",
                ready_timeout_s=30.0,
                stop_timeout_s=15.0,
            )
            return await stack.enter_async_context(local_cluster(spec))

        yield start
