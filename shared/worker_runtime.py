"""The start-up and shutdown every engine worker (prefill or decode) goes through.

``worker_runtime`` opens what a worker needs, in order: tokenizer, KV transfer agent, engine
(its KV cache in memory the agent can serve), NATS and etcd; ``serve_worker`` then runs the
worker until SIGTERM and drains it: mark the etcd entry draining (routers and frontends stop
choosing it but keep its streams), finish in-flight work up to the deadline, revoke the lease,
stop the tasks. Leaving the runtime closes everything in reverse order.
"""

import asyncio
import contextlib
import gc
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

import msgspec

from proto import subjects
from proto.messages import InstanceId, ModelCard, WorkerInfo, WorkerRole
from shared.bus import Bus
from shared.codec import encode
from shared.discovery import Discovery
from shared.engine.config import EngineConfig, WorkerConfig
from shared.engine.factory import BuiltEngine, build_engine
from shared.engine_worker import EngineWorker
from shared.kv_transfer import AgentKind, TransferAgent, create_agent
from shared.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerRuntime:
    bus: Bus
    discovery: Discovery
    tokenizer: Tokenizer
    built: BuiltEngine
    agent: TransferAgent | None


@contextlib.asynccontextmanager
async def worker_runtime(
    worker: WorkerConfig, engine: EngineConfig, worker_id: InstanceId
) -> AsyncIterator[WorkerRuntime]:
    tokenizer = await asyncio.to_thread(Tokenizer.load, engine.tokenizer)
    agent = (
        None
        if worker.kv_transfer == "none"
        else create_agent(
            cast(AgentKind, worker.kv_transfer),  # WorkerConfig checked it is one of these
            worker_id,
            tcp_host=worker.kv_transfer_host,
        )
    )
    try:
        allocate = agent.allocate if agent is not None else None
        built = await asyncio.to_thread(build_engine, engine, tokenizer, allocate)
        region = built.engine.kv_region
        if agent is not None and region is not None:
            agent.register(region.address, region.size_bytes, region.device)
        async with (
            Bus.connect(worker.nats_url, name=worker_id) as bus,
            Discovery.connect(worker.etcd_url) as discovery,
        ):
            yield WorkerRuntime(bus, discovery, tokenizer, built, agent)
    finally:
        if agent is not None:
            agent.close()


def worker_info(
    runtime: WorkerRuntime,
    worker: WorkerConfig,
    engine: EngineConfig,
    worker_id: InstanceId,
    role: WorkerRole,
) -> WorkerInfo:
    agent = runtime.agent
    has_kv = agent is not None and runtime.built.engine.kv_region is not None
    return WorkerInfo(
        worker_id=worker_id,
        model=engine.model,
        role=role,
        subject=subjects.worker_inbox(worker.namespace, worker_id),
        max_num_seqs=engine.max_num_seqs,
        num_kv_blocks=engine.num_kv_blocks,
        host=socket.gethostname(),
        pid=os.getpid(),
        kv_agent=agent.name if has_kv and agent is not None else "",
        kv_agent_metadata=agent.metadata() if has_kv and agent is not None else b"",
        kv_block_size=engine.block_size,
    )


def model_card(runtime: WorkerRuntime, engine: EngineConfig) -> ModelCard:
    return ModelCard(
        name=engine.model,
        tokenizer=engine.tokenizer,
        context_length=engine.max_model_len,
        kv_block_size=engine.block_size,
        eos_token_ids=runtime.tokenizer.eos_token_ids,
    )


async def serve_worker(
    runtime: WorkerRuntime,
    worker: EngineWorker,
    info: WorkerInfo,
    card: ModelCard,
    config: WorkerConfig,
    stopping: asyncio.Event,
) -> None:
    """Run ``worker`` until ``stopping`` is set, then drain it (see the module docstring)."""
    async with asyncio.TaskGroup() as tg:
        tasks = [
            tg.create_task(worker.run_engine(), name="engine-loop"),
            tg.create_task(worker.publish_load(config.load_interval_s), name="load"),
        ]
        await runtime.discovery.put_model(config.namespace, card)
        registration = await runtime.discovery.register(
            subjects.etcd_worker(config.namespace, info.worker_id),
            encode(info),
            ttl_s=config.lease_ttl_s,
        )
        gc.freeze()  # start-up objects live forever: keep them out of every collection
        logger.info("worker ready worker_id=%s role=%s", info.worker_id, info.role.name)
        await stopping.wait()
        logger.info("[shutdown] draining worker_id=%s", info.worker_id)
        await registration.update(encode(msgspec.structs.replace(info, is_draining=True)))
        await worker.drain(config.drain_timeout_s)
        await registration.revoke()
        for task in tasks:
            task.cancel()
        await runtime.bus.flush()
    logger.info("[shutdown] worker stopped worker_id=%s", info.worker_id)
