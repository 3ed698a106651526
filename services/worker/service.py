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
from services.worker.switch import RoleSwitcher
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

        def role_of(kind: WorkerRole) -> Role:
            return make_role(config, kind, context, runtime, directory)

        role = role_of(config.worker_role)
        shell = WorkerShell(context, role, w, max_num_batched_tokens=e.max_num_batched_tokens)
        shell.switcher = RoleSwitcher(
            shell,
            role_of,
            can_prefill=runtime.connector is not None and runtime.agent is not None,
            has_decode_peer=lambda: has_decode_peer(directory, e.model, worker_id),
            # A retired role's requests finish, and its held KV is read, within this (the
            # prefill sweep and the lender free a hold after max_hold_s anyway).
            settle_timeout_s=w.drain_timeout_s,
        )
        async with http_server(shell, w.http_host, w.http_port) as http_port:
            info = worker_info(runtime, w, e, worker_id, role.kind)
            if http_port is not None:
                info = msgspec.structs.replace(info, http_url=f"http://{w.http_host}:{http_port}")
            await shell.serve(runtime.discovery, info, model_card(runtime, e), stopping)


def has_decode_peer(directory: WorkerDirectory, model: str, worker_id: InstanceId) -> bool:
    """Whether another live decode worker serves ``model`` (one that streams could move to)."""
    return any(
        info.role is WorkerRole.DECODE
        and not info.is_draining
        and info.model == model
        and info.worker_id != worker_id
        for info in directory.workers.values()
    )


def make_role(
    config: WorkerServiceConfig,
    kind: WorkerRole,
    context: WorkerContext,
    runtime: WorkerRuntime,
    directory: WorkerDirectory,
) -> Role:
    """A new role object of ``kind`` around the worker's engine loop and transfer agent (at
    start, and at each role switch: both roles run on the one engine as it was built)."""
    if kind is WorkerRole.PREFILL:
        if runtime.connector is None or runtime.agent is None:
            raise Unavailable("a prefill worker needs a KV transfer agent and KV memory")
        return PrefillRole(
            context, runtime.connector, runtime.agent.name, max_hold_s=config.max_hold_s
        )
    role = DecodeRole(context)
    role.hold_timeout_s = config.max_hold_s
    role.drain_handoff = config.drain_handoff
    role.publish_interval_s = config.publish_interval_ms / 1000
    if runtime.connector is not None and runtime.agent is not None:
        agent_name = runtime.agent.name
        role.lender = KVLender(context.loop, runtime.connector, agent_name, context.worker_id)
    role.has_peer = lambda: has_decode_peer(directory, config.engine.model, context.worker_id)
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
