"""Build the engine a worker's config asks for. torch is imported only for the torch engine
(and vLLM only for the vllm one), so a simulated cluster installs and starts without it."""

from collections.abc import Callable
from dataclasses import dataclass

from shared.engine.config import EngineConfig
from shared.engine.engine import ScheduledEngine
from shared.engine.interface import Engine
from shared.engine.kv_connector import KVConnector
from shared.engine.scheduler import SchedulerConfig
from shared.engine.sim import SimEngine, SimEngineConfig
from shared.engine.timing import TimingModel
from shared.kv_transfer import TransferAgent
from shared.tokenizer import Tokenizer

# A caller that wants the KV cache in memory of its choosing (a transfer agent's shared
# segment, say) passes this: it receives the cache size in bytes and returns the memory.
Allocate = Callable[[int], memoryview]


@dataclass(slots=True)
class BuiltEngine:
    engine: Engine
    step_in_thread: bool  # a real model's step blocks for milliseconds: run it off the loop
    # A simulated engine's KV moves few real bytes: the time a transfer of ``n`` of them would
    # take on the modelled hardware (the worker pads its transfer agent's reads to it).
    transfer_time_s: Callable[[int], float] | None = None
    # An engine whose KV cache is not one block-major ``KVRegion`` (vLLM's: a tensor per
    # layer) brings its own connector: it registers the cache with the agent (``ValueError``
    # if the agent cannot serve that memory). None: the worker builds a ``RegionConnector``.
    make_connector: Callable[[TransferAgent], KVConnector] | None = None


def scheduler_config(config: EngineConfig, eos_token_id: int | None) -> SchedulerConfig:
    return SchedulerConfig(
        num_kv_blocks=config.num_kv_blocks,
        block_size=config.block_size,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        max_model_len=config.max_model_len,
        eos_token_id=eos_token_id,
    )


def build_engine(
    config: EngineConfig, tokenizer: Tokenizer, allocate: Allocate | None = None
) -> BuiltEngine:
    eos = tokenizer.eos_token_ids
    eos_token_id = eos[0] if eos else None
    if config.engine == "sim":
        sim_config = SimEngineConfig(
            num_kv_blocks=config.num_kv_blocks,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
            vocab_size=tokenizer.vocab_size,
            output_token_ids=tuple(tokenizer.word_token_ids()),
            eos_token_id=eos_token_id,
            mean_output_tokens=config.mean_output_tokens,
            seed=config.seed,
            timing=TimingModel(speedup=config.speedup),
        )
        buffer = allocate(config.num_kv_blocks * sim_config.kv_block_bytes) if allocate else None
        engine = SimEngine(sim_config, kv_buffer=buffer)
        return BuiltEngine(engine, step_in_thread=False, transfer_time_s=engine.transfer_time_s)
    if config.engine == "vllm":  # vLLM is imported only here (the [vllm] extra)
        from shared.engine.vllm_engine import build_vllm_engine

        vllm_engine = build_vllm_engine(config, tokenizer)
        return BuiltEngine(
            vllm_engine, step_in_thread=True, make_connector=vllm_engine.make_connector
        )
    return _build_torch(config, tokenizer, eos_token_id, allocate)


def _build_torch(
    config: EngineConfig,
    tokenizer: Tokenizer,
    eos_token_id: int | None,
    allocate: Allocate | None,
) -> BuiltEngine:
    import torch

    from shared.engine.checkpoint import load_pretrained, random_model
    from shared.engine.model import ModelConfig
    from shared.engine.torch_runner import TorchRunner, kv_block_bytes

    dtype = getattr(torch, config.dtype)
    if config.model_path == "random":
        model = random_model(
            ModelConfig(
                vocab_size=tokenizer.vocab_size, max_position_embeddings=config.max_model_len
            ),
            config.seed,
            device=config.device,
            dtype=dtype,
        )
    else:
        model = load_pretrained(config.model_path, device=config.device, dtype=dtype)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocabulary ({model.config.vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size})"
        )
    buffer = None
    if allocate is not None and model.device.type == "cpu":
        block_bytes = kv_block_bytes(model.config, config.block_size, model.dtype)
        buffer = allocate(config.num_kv_blocks * block_bytes)
    runner = TorchRunner(
        model,
        num_kv_blocks=config.num_kv_blocks,
        block_size=config.block_size,
        eos_token_id=eos_token_id,
        kv_buffer=buffer,
        num_threads=config.torch_threads or None,
    )
    engine = ScheduledEngine(
        scheduler_config(config, eos_token_id), runner, vocab_size=model.config.vocab_size
    )
    return BuiltEngine(engine, step_in_thread=True)
