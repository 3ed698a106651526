"""serve(): wires the planner's connections, feeds, decision loop, HTTP server and shutdown."""

import asyncio
import logging

from aiohttp import web

from proto import subjects
from services.planner.app import build_app
from services.planner.config import PlannerConfig
from services.planner.connectors import open_connector
from services.planner.planner import Planner
from shared.bus import Bus
from shared.discovery import Discovery
from shared.lifecycle import shutdown_event

logger = logging.getLogger(__name__)


async def serve(config: PlannerConfig, stopping: asyncio.Event | None = None) -> None:
    """Plan until SIGTERM/SIGINT (or ``stopping``)."""
    stopping = stopping or shutdown_event()
    ns = config.namespace
    async with (
        Bus.connect(config.nats_url, name=config.planner_id, security=config.security.nats) as bus,
        Discovery.connect(config.etcd_url, security=config.security.etcd) as discovery,
        discovery.watch_workers(ns) as directory,
        open_connector(config, bus) as connector,
    ):
        planner = Planner(config, connector, bus)
        planner.observer.sync_workers(directory.workers)
        runner = web.AppRunner(build_app(planner, bus), access_log=None)
        await runner.setup()
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(
                    directory.follow(lambda _: planner.observer.sync_workers(directory.workers))
                ),
                tg.create_task(planner.run(), name="planner"),
            ]
            try:
                subscription = await bus.subscribe(subjects.load_metrics_all(ns), planner.on_load)
                frontends = await bus.subscribe(
                    subjects.frontend_load_all(ns), planner.on_frontend_load
                )
                site = web.TCPSite(runner, config.host, config.port)
                await site.start()
                planner.is_started = True
                logger.info(
                    "planner ready planner_id=%s mode=%s connector=%s pools=%s "
                    "metrics=http://%s:%d/metrics",
                    config.planner_id,
                    config.mode,
                    config.connector,
                    ",".join(role.value for role in planner.pools),
                    config.host,
                    runner.addresses[0][1],
                )
                await stopping.wait()
                await subscription.unsubscribe()
                await frontends.unsubscribe()
            finally:
                planner.is_started = False
                await runner.cleanup()
                for task in tasks:
                    task.cancel()
    logger.info("[shutdown] planner stopped planner_id=%s", config.planner_id)
