"""serve(): wires the prefill worker's resources, tasks and graceful shutdown."""

import asyncio
import logging

from proto.messages import InstanceId, WorkerRole
from services.prefill.config import PrefillConfig
from services.prefill.worker import PrefillWorker
from shared.errors import Unavailable
from shared.lifecycle import shutdown_event
from shared.worker_runtime import model_card, serve_worker, worker_info, worker_runtime

logger = logging.getLogger(__name__)


async def serve(config: PrefillConfig, stopping: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stopping``), then drain and exit cleanly."""
    stopping = stopping or shutdown_event()
    w, e = config.worker, config.engine
    worker_id = InstanceId(w.worker_id)
    async with worker_runtime(w, e, worker_id) as runtime:
        if runtime.agent is None or runtime.built.engine.kv_region is None:
            raise Unavailable("a prefill worker needs a KV transfer agent and KV memory")
        worker = PrefillWorker(
            runtime.bus,
            w.namespace,
            worker_id,
            runtime.built.engine,
            step_in_thread=runtime.built.step_in_thread,
            agent_name=runtime.agent.name,
            max_waiting=w.max_waiting,
            max_hold_s=config.max_hold_s,
        )
        await worker.start()
        info = worker_info(runtime, w, e, worker_id, WorkerRole.PREFILL)
        await serve_worker(runtime, worker, info, model_card(runtime, e), w, stopping)
