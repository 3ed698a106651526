"""serve(): wires the decode worker's resources, tasks and graceful shutdown."""

import asyncio
import gc
import logging
import os
import socket

import msgspec

from proto import subjects
from proto.messages import InstanceId, ModelCard, WorkerInfo, WorkerRole
from services.decode.config import DecodeConfig
from services.decode.worker import DecodeWorker
from shared.bus import Bus
from shared.codec import encode
from shared.discovery import Discovery
from shared.engine.sim import SimEngine, SimEngineConfig
from shared.engine.timing import TimingModel
from shared.lifecycle import shutdown_event
from shared.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def build_engine(config: DecodeConfig, tokenizer: Tokenizer) -> SimEngine:
    eos = tokenizer.eos_token_ids
    return SimEngine(
        SimEngineConfig(
            num_kv_blocks=config.num_kv_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            vocab_size=tokenizer.vocab_size,
            output_token_ids=tuple(tokenizer.word_token_ids()),
            eos_token_id=eos[0] if eos else None,
            mean_output_tokens=config.mean_output_tokens,
            seed=config.seed,
            timing=TimingModel(speedup=config.speedup),
        )
    )


async def serve(config: DecodeConfig, stopping: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT (or ``stopping``), then drain and exit cleanly."""
    stopping = stopping or shutdown_event()
    worker_id = InstanceId(config.worker_id)
    tokenizer = await asyncio.to_thread(Tokenizer.load, config.tokenizer)
    engine = build_engine(config, tokenizer)
    card = ModelCard(
        name=config.model,
        tokenizer=config.tokenizer,
        context_length=config.max_model_len,
        kv_block_size=config.block_size,
        eos_token_ids=tokenizer.eos_token_ids,
    )
    info = WorkerInfo(
        worker_id=worker_id,
        model=config.model,
        role=WorkerRole.AGGREGATED,
        subject=subjects.worker_inbox(config.namespace, worker_id),
        max_num_seqs=config.max_num_seqs,
        num_kv_blocks=config.num_kv_blocks,
        host=socket.gethostname(),
        pid=os.getpid(),
    )
    async with (
        Bus.connect(config.nats_url, name=worker_id) as bus,
        Discovery.connect(config.etcd_url) as discovery,
    ):
        worker = DecodeWorker(
            bus, worker_id, config.namespace, engine, max_waiting=config.max_waiting
        )
        await worker.start()
        async with asyncio.TaskGroup() as tg:
            loop_task = tg.create_task(worker.run_engine(), name="engine-loop")
            load_task = tg.create_task(worker.publish_load(config.load_interval_s), name="load")
            await discovery.put_model(config.namespace, card)
            registration = await discovery.register(
                subjects.etcd_worker(config.namespace, worker_id),
                encode(info),
                ttl_s=config.lease_ttl_s,
            )
            gc.freeze()  # start-up objects live forever: keep them out of every collection
            logger.info("worker ready worker_id=%s model=%s", worker_id, config.model)
            await stopping.wait()
            logger.info("[shutdown] worker draining worker_id=%s", worker_id)
            # 1. Frontends and routers stop choosing us, but keep our streams: the key stays
            # (marked draining) until the drain ends, so a crash mid-drain still shows.
            await registration.update(encode(msgspec.structs.replace(info, is_draining=True)))
            await worker.drain(config.drain_timeout_s)  # 2. finish in-flight work
            await registration.revoke()  # 3. gone
            for task in (load_task, loop_task):
                task.cancel()
            await bus.flush()
    logger.info("[shutdown] worker stopped worker_id=%s", worker_id)
