"""serve(): wires the router's connections, watches, metrics server and shutdown."""

import asyncio
import gc
import logging

from aiohttp import web

from services.router.app import build_app
from services.router.config import RouterConfig
from services.router.placement import PlacementService
from shared.bus import Bus
from shared.discovery import Discovery
from shared.lifecycle import shutdown_event
from shared.routing.cost import RoutingMode, RoutingPolicy
from shared.routing.router import Router

logger = logging.getLogger(__name__)


def policy(config: RouterConfig) -> RoutingPolicy:
    return RoutingPolicy(
        mode=RoutingMode(config.mode),
        prefill_weight=config.prefill_weight,
        decode_weight=config.decode_weight,
        max_kv_usage=config.max_kv_usage,
        max_num_waiting=config.max_num_waiting,
        temperature=config.temperature,
    )


async def serve(config: RouterConfig, stopping: asyncio.Event | None = None) -> None:
    """Route until SIGTERM/SIGINT (or ``stopping``)."""
    stopping = stopping or shutdown_event()
    ns = config.namespace
    routing = policy(config)
    # A prefill worker does not decode: only its queue and cache matter.
    prefill_policy = RoutingPolicy(
        mode=routing.mode,
        prefill_weight=routing.prefill_weight,
        decode_weight=0.0,
        max_kv_usage=routing.max_kv_usage,
        max_num_waiting=routing.max_num_waiting,
        temperature=routing.temperature,
    )
    async with (
        Bus.connect(config.nats_url, name=config.router_id, security=config.security.nats) as bus,
        Discovery.connect(config.etcd_url, security=config.security.etcd) as discovery,
        discovery.watch_workers(ns) as workers_view,
        discovery.watch_models(ns) as models_view,
    ):
        service = PlacementService(
            bus,
            ns,
            Router(routing, max_entries=config.max_index_entries),
            prefill_policy=prefill_policy,
            disagg=config.disagg_policy(),
            resync_timeout_s=config.resync_timeout_s,
        )
        service.sync_workers(dict(workers_view.items))
        service.sync_models(dict(models_view.items))
        runner = web.AppRunner(build_app(service), access_log=None)
        await runner.setup()
        async with asyncio.TaskGroup() as tg:
            followers = [
                tg.create_task(workers_view.follow(service.sync_workers)),
                tg.create_task(models_view.follow(service.sync_models)),
            ]
            try:
                await service.start()
                site = web.TCPSite(runner, config.host, config.port)
                await site.start()
                gc.freeze()
                logger.info(
                    "router ready router_id=%s mode=%s metrics=http://%s:%d/metrics",
                    config.router_id,
                    config.mode,
                    config.host,
                    runner.addresses[0][1],
                )
                await stopping.wait()
            finally:
                await runner.cleanup()
                for task in followers:
                    task.cancel()
                await service.close()  # its resyncs: they use the bus, closed below
    logger.info("[shutdown] router stopped router_id=%s", config.router_id)
