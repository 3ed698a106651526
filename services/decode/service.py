"""serve(): wires the decode worker's resources, tasks and graceful shutdown."""

import asyncio
import logging

from proto.messages import InstanceId, WorkerRole
from services.decode.config import DecodeConfig
from services.decode.disagg import DisaggPolicy
from services.decode.remote_prefill import RemotePrefill
from services.decode.worker import DecodeWorker
from shared.lifecycle import shutdown_event
from shared.worker_pool import WorkerPool
from shared.worker_runtime import model_card, serve_worker, worker_info, worker_runtime

logger = logging.getLogger(__name__)


async def serve(config: DecodeConfig, stopping: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stopping``), then drain and exit cleanly."""
    stopping = stopping or shutdown_event()
    w, e = config.worker, config.engine
    worker_id = InstanceId(w.worker_id)
    async with (
        worker_runtime(w, e, worker_id) as runtime,
        runtime.discovery.watch_workers(w.namespace) as workers_view,
    ):
        remote = None
        pool = WorkerPool(runtime.bus, w.namespace)
        if runtime.agent is not None:
            await pool.start()
            remote = RemotePrefill(
                runtime.bus,
                pool,
                runtime.agent,
                DisaggPolicy(
                    min_remote_tokens=config.min_remote_prefill_tokens,
                    min_remote_fraction=config.min_remote_prefill_fraction,
                ),
                e.model,
                prefill_timeout_s=config.prefill_timeout_s,
                transfer_timeout_s=config.transfer_timeout_s,
            )
        worker = DecodeWorker(
            runtime.bus,
            w.namespace,
            worker_id,
            runtime.built.engine,
            step_in_thread=runtime.built.step_in_thread,
            max_waiting=w.max_waiting,
            remote_prefill=remote,
        )
        await worker.start()
        follow = asyncio.create_task(workers_view.follow(pool.sync), name="follow-workers")
        try:
            info = worker_info(runtime, w, e, worker_id, WorkerRole.DECODE)
            await serve_worker(runtime, worker, info, model_card(runtime, e), w, stopping)
        finally:
            follow.cancel()
