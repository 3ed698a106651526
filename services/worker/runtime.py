"""What a worker opens before it serves, in order, and closes in reverse: the tokenizer, the
KV transfer agent, the engine (its KV cache in memory the agent can serve), NATS and etcd."""

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import cast

from proto import subjects
from proto.messages import InstanceId, ModelCard, WorkerInfo, WorkerRole
from shared.bus import Bus
from shared.discovery import Discovery
from shared.engine.config import EngineConfig, WorkerConfig
from shared.engine.factory import BuiltEngine, build_engine
from shared.engine.kv_connector import KVConnector, RegionConnector
from shared.kv_transfer import AgentKind, SimulatedTimeAgent, TransferAgent, create_agent
from shared.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class WorkerRuntime:
    bus: Bus
    discovery: Discovery
    tokenizer: Tokenizer
    built: BuiltEngine
    agent: TransferAgent | None
    connector: KVConnector | None  # None: this worker cannot move KV


@contextlib.asynccontextmanager
async def worker_runtime(
    worker: WorkerConfig, engine: EngineConfig, worker_id: InstanceId
) -> AsyncIterator[WorkerRuntime]:
    tokenizer = await asyncio.to_thread(Tokenizer.load, engine.tokenizer)
    agent: TransferAgent | None = None
    kind = worker.kv_transfer
    if kind != "none":
        agent = create_agent(
            cast(AgentKind, kind),  # WorkerConfig checked it is one of these
            worker_id,
            tcp_host=worker.kv_transfer_host,
            # NIXL READs of GPU memory need the owner's progress thread (docs/gpu.md)
            nixl_progress_thread=engine.device.startswith("cuda"),
        )
    try:
        allocate = agent.allocate if agent is not None else None
        built = await asyncio.to_thread(build_engine, engine, tokenizer, allocate)
        region = built.engine.kv_region
        connector: KVConnector | None = None
        if agent is not None and built.make_connector is not None:
            try:
                connector = built.make_connector(agent)
            except ValueError as exc:  # an shm agent cannot serve memory it did not allocate
                logger.warning(
                    "KV cache not served by the %s transport; this worker cannot move KV "
                    "(try --kv-transfer tcp): %s",
                    kind,
                    exc,
                )
        elif agent is not None and region is not None:
            agent.register(region.address, region.size_bytes, region.device)
            if built.transfer_time_s is not None:
                agent = SimulatedTimeAgent(agent, built.transfer_time_s)
            connector = RegionConnector(agent, region, built.engine.block_size)
        async with (
            Bus.connect(worker.nats_url, name=worker_id, security=worker.security.nats) as bus,
            Discovery.connect(worker.etcd_url, security=worker.security.etcd) as discovery,
        ):
            yield WorkerRuntime(bus, discovery, tokenizer, built, agent, connector)
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
    agent = runtime.agent if runtime.connector is not None else None
    return WorkerInfo(
        worker_id=worker_id,
        model=engine.model,
        role=role,
        subject=subjects.worker_inbox(worker.namespace, worker_id),
        max_num_seqs=engine.max_num_seqs,
        num_kv_blocks=engine.num_kv_blocks,
        host=socket.gethostname(),
        pid=os.getpid(),
        kv_agent=agent.name if agent is not None else "",
        kv_agent_metadata=agent.metadata() if agent is not None else b"",
        kv_block_size=engine.block_size,
    )


def model_card(runtime: WorkerRuntime, engine: EngineConfig) -> ModelCard:
    return ModelCard(
        name=engine.model,
        tokenizer=engine.tokenizer,
        context_length=engine.max_model_len,
        kv_block_size=engine.block_size,
        eos_token_ids=runtime.tokenizer.eos_token_ids,
        features=sorted(runtime.built.engine.features),
    )
