"""serve(): wires a worker's resources, its role, the shell, and graceful shutdown."""

import asyncio
import logging

import msgspec

from proto.messages import InstanceId, WorkerRole
from services.worker.config import WorkerServiceConfig
from services.worker.decode import DecodeRole
from services.worker.handoff import RemotePrefill
from services.worker.http import http_server
from services.worker.lender import KVLender
from services.worker.prefill import PrefillRole
from services.worker.role import Role, WorkerContext
from services.worker.runtime import WorkerRuntime, model_card, worker_info, worker_runtime
from services.worker.shell import WorkerShell
from shared.discovery.watch import WorkerDirectory
from shared.engine.loop import EngineLoop
from shared.errors import Unavailable
from shared.lifecycle import shutdown_event

logger = logging.getLogger(__name__)


async def serve(config: WorkerServiceConfig, stopping: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stopping``), then drain and exit cleanly."""
    stopping = stopping or shutdown_event()
    w, e = config.worker, config.engine
    worker_id = InstanceId(w.worker_id)
    async with (
        worker_runtime(w, e, worker_id) as runtime,
        runtime.discovery.watch_workers(w.namespace) as directory,
    ):
        built = runtime.built
        loop = EngineLoop(built.engine, step_in_thread=built.step_in_thread)
        context = WorkerContext(runtime.bus, w.namespace, worker_id, loop)
        role = make_role(config, context, runtime, directory)
        shell = WorkerShell(context, role, w, max_num_batched_tokens=e.max_num_batched_tokens)
        async with http_server(shell, w.http_host, w.http_port) as http_port:
            info = worker_info(runtime, w, e, worker_id, role.kind)
            if http_port is not None:
                info = msgspec.structs.replace(info, http_url=f"http://{w.http_host}:{http_port}")
            await shell.serve(runtime.discovery, info, model_card(runtime, e), stopping)


def make_role(
    config: WorkerServiceConfig,
    context: WorkerContext,
    runtime: WorkerRuntime,
    directory: WorkerDirectory,
) -> Role:
    if config.worker_role is WorkerRole.PREFILL:
        if runtime.connector is None or runtime.agent is None:
            raise Unavailable("a prefill worker needs a KV transfer agent and KV memory")
        return PrefillRole(
            context, runtime.connector, runtime.agent.name, max_hold_s=config.max_hold_s
        )
    role = DecodeRole(context)
    role.hold_timeout_s = config.max_hold_s
    role.drain_handoff = config.drain_handoff
    if runtime.connector is not None and runtime.agent is not None:
        agent_name = runtime.agent.name
        role.lender = KVLender(context.loop, runtime.connector, agent_name, context.worker_id)
    model = config.engine.model
    role.has_peer = lambda: any(
        info.role is WorkerRole.DECODE
        and not info.is_draining
        and info.model == model
        and info.worker_id != context.worker_id
        for info in directory.workers.values()
    )
    if runtime.connector is not None:
        role.remote = RemotePrefill(
            context.bus,
            context.namespace,
            context.worker_id,
            context.loop,
            runtime.connector,
            lambda: directory.workers,
            prefill_timeout_s=config.prefill_timeout_s,
            transfer_timeout_s=config.transfer_timeout_s,
            on_ready=role.on_handoff_ready,
            on_failed=role.on_handoff_failed,
        )
    return role
