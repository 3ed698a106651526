"""serve(): wires the frontend's connections, watches, HTTP server and graceful shutdown."""

import asyncio
import gc
import logging
import time

from aiohttp import web

from proto import subjects
from proto.messages import InstanceId
from services.frontend.app import FrontendState, build_app
from services.frontend.config import FrontendConfig
from services.frontend.generate import Generator
from services.frontend.metrics import FrontendMetrics
from services.frontend.models import ModelRegistry
from services.frontend.pressure import LoopPressure
from services.frontend.worker_pool import WorkerPool
from shared.bus import Bus
from shared.discovery import Discovery
from shared.errors import Unavailable
from shared.lifecycle import shutdown_event
from shared.streams import StreamDemux

logger = logging.getLogger(__name__)


async def serve(config: FrontendConfig, stopping: asyncio.Event | None = None) -> None:
    """Serve HTTP until SIGTERM/SIGINT (or ``stopping``), then drain open streams and exit."""
    stopping = stopping or shutdown_event()
    frontend_id = InstanceId(config.frontend_id)
    inbox = subjects.stream_inbox(config.namespace, frontend_id)
    async with (
        Bus.connect(config.nats_url, name=frontend_id) as bus,
        Discovery.connect(config.etcd_url) as discovery,
        discovery.watch_workers(config.namespace) as worker_view,
        discovery.watch_models(config.namespace) as model_view,
    ):
        demux = StreamDemux(bus, inbox)
        pool = WorkerPool(bus, config.namespace)
        pool.on_removed = lambda worker_id: _fail_streams(demux, worker_id)
        models = ModelRegistry()
        await demux.start()
        await pool.start()
        metrics = FrontendMetrics(config.goodput_window_s)
        state = FrontendState(
            models=models,
            pool=pool,
            generator=Generator(
                bus,
                demux,
                pool,
                config.namespace,
                admission_timeout_s=config.admission_timeout_s,
                route_timeout_s=config.route_timeout_s,
                on_route_fallback=metrics.route_fallbacks.inc,
                admit_fraction=config.slo.slo_admit_fraction,
                migration_limit=config.migration_limit,
                on_migration=metrics.migrations.inc,
            ),
            metrics=metrics,
            ttft_s=config.slo.ttft_s,
            tpot_s=config.slo.tpot_s,
            pressure=LoopPressure(config.max_loop_lag_ms / 1000)
            if config.max_loop_lag_ms
            else None,
            max_in_flight=config.max_in_flight,
            tokenize_in_thread_chars=config.tokenize_in_thread_chars,
        )
        runner = web.AppRunner(
            build_app(state),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=config.drain_timeout_s,
        )
        await runner.setup()
        async with asyncio.TaskGroup() as tg:
            followers = [
                tg.create_task(worker_view.follow(pool.sync), name="follow-workers"),
                tg.create_task(model_view.follow(models.sync), name="follow-models"),
                tg.create_task(demux.expire_idle(config.stream_idle_timeout_s), name="idle"),
                tg.create_task(
                    _watch_silence(pool, demux, metrics, config.worker_silence_s), name="silence"
                ),
            ]
            if state.pressure is not None:
                followers.append(tg.create_task(state.pressure.run(), name="pressure"))
            try:
                site = web.TCPSite(runner, config.host, config.port, backlog=4096)
                await site.start()
                url = f"http://{config.host}:{runner.addresses[0][1]}"
                gc.freeze()  # start-up objects live forever: keep them out of every collection
                state.is_ready = True
                logger.info("frontend ready url=%s frontend_id=%s", url, frontend_id)
                await stopping.wait()
                logger.info("[shutdown] frontend draining open=%d", len(demux))
                state.is_draining = True
            finally:
                # Stops accepting, waits up to drain_timeout_s for open requests, cancels the rest.
                await runner.cleanup()
                for task in followers:
                    task.cancel()
    logger.info("[shutdown] frontend stopped frontend_id=%s", frontend_id)


def _fail_streams(demux: StreamDemux, worker_id: InstanceId) -> None:
    failed = demux.fail_worker(worker_id, Unavailable(f"worker {worker_id} went away"))
    if failed:
        logger.warning("worker gone; streams failed worker_id=%s num_streams=%d", worker_id, failed)


async def _watch_silence(
    pool: WorkerPool, demux: StreamDemux, metrics: FrontendMetrics, silence_s: float
) -> None:
    """Find workers whose load reports stopped (dead, hung, cut off) within ~1.2 x
    ``silence_s`` and move their streams, rather than wait for their etcd lease to expire."""
    interval_s = silence_s / 5
    woke_s = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        now_s = time.monotonic()
        lag_s, woke_s = now_s - woke_s - interval_s, now_s
        if lag_s > interval_s:
            # This loop was busy: load reports may be waiting unread, so silence proves
            # nothing now. Look again next time.
            continue
        for worker_id in pool.find_silent(silence_s, now_s):
            metrics.silent_workers.inc()
            failed = demux.fail_worker(
                worker_id, Unavailable(f"worker {worker_id} stopped reporting for {silence_s} s")
            )
            logger.warning(
                "worker silent; its streams move worker_id=%s num_streams=%d", worker_id, failed
            )
