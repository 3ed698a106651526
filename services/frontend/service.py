"""serve(): wires the frontend's connections, watches, HTTP server and graceful shutdown."""

import asyncio
import contextlib
import gc
import logging
import os
import time

from aiohttp import web
from prometheus_client import disable_created_metrics

from proto import subjects
from proto.messages import AbortRequest, FrontendLoad, InstanceId, RequestId
from services.frontend.app import FrontendState, build_app, early_shed
from services.frontend.auth import load_api_keys
from services.frontend.config import FrontendConfig
from services.frontend.early_shed import EarlyShedRunner
from services.frontend.generate import Generator
from services.frontend.http_errors import parser_limits
from services.frontend.metrics import FrontendMetrics
from services.frontend.metrics_merge import SNAPSHOT_INTERVAL_S, write_snapshot
from services.frontend.models import ModelRegistry
from services.frontend.pressure import LoopPressure
from services.frontend.worker_pool import WorkerPool
from shared.bus import Bus
from shared.discovery import Discovery
from shared.errors import DeadlineExceeded, ServingError, Unavailable
from shared.lifecycle import shutdown_event
from shared.streams import StreamDemux

logger = logging.getLogger(__name__)


async def serve(config: FrontendConfig, stopping: asyncio.Event | None = None) -> None:
    """Serve HTTP until SIGTERM/SIGINT (or ``stopping``), then drain open streams and exit."""
    stopping = stopping or shutdown_event()
    frontend_id = InstanceId(config.frontend_id)
    inbox = subjects.stream_inbox(config.namespace, frontend_id)
    async with (
        Bus.connect(config.nats_url, name=frontend_id, security=config.security.nats) as bus,
        Discovery.connect(config.etcd_url, security=config.security.etcd) as discovery,
        discovery.watch_workers(config.namespace) as worker_view,
        discovery.watch_models(config.namespace) as model_view,
    ):
        demux = StreamDemux(bus, inbox)
        pool = WorkerPool(bus, config.namespace)
        pool.on_removed = lambda worker_id: _fail_streams(demux, worker_id)
        models = ModelRegistry()
        await demux.start()
        await pool.start()
        # No *_created series: summed across processes they would add up timestamps.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        metrics = FrontendMetrics(config.goodput_window_s)
        metrics.watch_demux(demux)
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
                queue_timeout_s=config.queue_timeout_s,
                on_late_acceptance=metrics.late_acceptances.inc,
            ),
            metrics=metrics,
            ttft_s=config.slo.ttft_s,
            tpot_s=config.slo.tpot_s,
            pressure=LoopPressure(config.max_loop_lag_ms / 1000)
            if config.max_loop_lag_ms
            else None,
            max_in_flight=config.max_in_flight,
            tokenize_in_thread_chars=config.tokenize_in_thread_chars,
            frontend_id=frontend_id,
            write_timeout_s=config.write_timeout_s,
            metrics_dir=config.metrics_dir,
        )
        if state.pressure is not None:
            pressure = state.pressure
            pid = str(os.getpid())
            metrics.loop_lag.labels(pid).set_function(lambda: pressure.lag_s)
            metrics.lag_shed_fraction.labels(pid).set_function(lambda: pressure.shed_fraction)
        pool.on_load = state.generator.on_worker_report
        demux.on_batch = lambda worker_id: pool.heard_from(worker_id, time.monotonic())
        demux.worker_quiet_s = lambda worker_id: pool.quiet_s(worker_id, time.monotonic())
        bus.on_reconnected(demux.mark_reconnected)
        keys = load_api_keys(config.api_key, config.api_key_file)  # read once, for both
        runner = EarlyShedRunner(
            build_app(state, config, keys),
            early_shed(state, config, keys),
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=config.drain_timeout_s,
            **parser_limits(config.max_header_bytes),
        )
        await runner.setup()
        async with asyncio.TaskGroup() as tg:
            followers = [
                tg.create_task(worker_view.follow(pool.sync), name="follow-workers"),
                tg.create_task(model_view.follow(models.sync), name="follow-models"),
                tg.create_task(
                    demux.expire_idle(config.stream_idle_timeout_s, config.stream_max_idle_s),
                    name="idle",
                ),
                tg.create_task(
                    _watch_silence(bus, pool, demux, metrics, config.worker_silence_s),
                    name="silence",
                ),
            ]
            if state.pressure is not None:
                followers.append(tg.create_task(state.pressure.run(), name="pressure"))
            load_subject = subjects.frontend_load(config.namespace, frontend_id)
            followers.append(tg.create_task(_publish_load(bus, state, load_subject), name="load"))
            if config.metrics_dir:
                followers.append(
                    tg.create_task(_share_metrics(metrics, config.metrics_dir), name="metrics")
                )
            try:
                site = web.TCPSite(
                    runner, config.host, config.port, backlog=4096, reuse_port=config.reuse_port
                )
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


LOAD_INTERVAL_S = 0.5  # how often a frontend process publishes its FrontendLoad


async def _publish_load(bus: Bus, state: FrontendState, subject: str) -> None:
    """Publish this process's request and shed counters for the planner until cancelled (a
    lost bus is skipped: the counters carry on, and the next report has them)."""
    while True:
        report = FrontendLoad(
            frontend_id=InstanceId(state.frontend_id),
            num_requests=state.num_requests,
            num_shed=state.num_shed,
        )
        with contextlib.suppress(ServingError):
            await bus.publish(subject, report)
        await asyncio.sleep(LOAD_INTERVAL_S)


async def _share_metrics(metrics: FrontendMetrics, directory: str) -> None:
    """Keep this process's snapshot fresh for its siblings' /metrics."""
    while True:
        await asyncio.to_thread(write_snapshot, metrics.registry, directory)
        await asyncio.sleep(SNAPSHOT_INTERVAL_S)


def _fail_streams(demux: StreamDemux, worker_id: InstanceId) -> None:
    failed = demux.fail_worker(worker_id, Unavailable(f"worker {worker_id} went away"))
    if failed:
        logger.warning("worker gone; streams failed worker_id=%s num_streams=%d", worker_id, failed)


async def _watch_silence(
    bus: Bus, pool: WorkerPool, demux: StreamDemux, metrics: FrontendMetrics, silence_s: float
) -> None:
    """Find dead workers within about ``silence_s`` and move their streams, rather than wait
    for their etcd lease to expire.

    A worker gone quiet (``WorkerPool.find_silent``) gets no new requests, and is probed: a
    request on its inbox that NATS answers at once with "no responders" when its
    subscription is gone (the process died or lost the bus). Only then do its streams move.
    A worker that is still subscribed is alive but slow (a loaded machine, huge steps): its
    streams stay, since moving thousands of them onto the other workers would overload those
    too. It is probed again each round while quiet; a hung one is dropped when its lease
    expires."""
    interval_s = silence_s / 5
    woke_s = time.monotonic()
    gone: set[InstanceId] = set()
    while True:
        await asyncio.sleep(interval_s)
        now_s = time.monotonic()
        lag_s, woke_s = now_s - woke_s - interval_s, now_s
        if lag_s > interval_s:
            # This loop was busy: load reports may be waiting unread, so silence proves
            # nothing now. Look again next time.
            continue
        pool.find_silent(silence_s, now_s)
        suspects = [w for w in pool.silent_ids() if w not in gone]
        gone &= set(pool.silent_ids())  # heard again, or removed: forget it
        if not suspects:
            continue
        probes = [_is_gone(bus, pool, worker_id, interval_s) for worker_id in suspects]
        for worker_id, is_gone in zip(suspects, await asyncio.gather(*probes), strict=True):
            if not is_gone:
                continue
            gone.add(worker_id)
            metrics.silent_workers.inc()
            failed = demux.fail_worker(
                worker_id, Unavailable(f"worker {worker_id} went quiet and left the bus")
            )
            logger.warning(
                "worker gone from the bus; its streams move worker_id=%s num_streams=%d",
                worker_id,
                failed,
            )


# Sent to probe a quiet worker: any message would do (what matters is whether NATS finds a
# subscriber); an abort of a request that does not exist changes nothing there.
_PROBE = AbortRequest(request_id=RequestId("liveness-probe"))


async def _is_gone(bus: Bus, pool: WorkerPool, worker_id: InstanceId, timeout_s: float) -> bool:
    state = pool.get(worker_id)
    if state is None:
        return False  # removed meanwhile: its streams were failed on removal
    try:
        await bus.request(state.info.subject, _PROBE, timeout_s=timeout_s)
    except Unavailable:
        return True  # no responders: nobody is subscribed to its inbox
    except DeadlineExceeded:
        return False  # subscribed, did not answer (an abort has no answer): alive
    return False
