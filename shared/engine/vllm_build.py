"""Start vLLM's V1 engine in this process for ``--engine vllm`` (docs/vllm.md).

vLLM is imported here and in ``shared.engine.vllm_engine`` only, and only when a worker asks
for this engine, so the other engines install and start without it (``pip install -e
'.[vllm]'``). What this module sets up, and why (docs/decisions/0005-vllm.md):

- **In-process engine core** (``multiprocess_mode=False``, uni-process executor): one Baton
  step is one vLLM scheduler step, run in the engine loop's thread; no second process competes
  for the cores. vLLM reads this choice from the environment (``VLLM_ENABLE_V1_MULTIPROCESSING``),
  so it is set before the config is built.
- **KV events in process**: vLLM's scheduler hands each step's prefix-cache events to a
  publisher of the kind its ``KVEventsConfig`` names. A publisher registered under ``baton``
  (``VllmKVEvents``) feeds them straight to a ``KVEventTranslator``, during the step, so the
  events of a step are there when it returns (no socket, no thread, no lag).
- **Load from the stats logger**: a ``StatLoggerBase`` (``VllmLoadLogger``) keeps the last
  step's running and waiting counts and KV usage.
- **Model**: ``--model-path random`` writes a small random Llama once per host
  (``shared.engine.tiny_llama``, the torch engine's ``random`` weights); otherwise a Hugging
  Face directory. vLLM never tokenizes: prompts arrive as token ids and outputs leave as ids.
- **KV connector**: vLLM loads ``shared.engine.vllm_connector.BatonConnector`` (role
  ``kv_both``), which lends Baton vLLM's block allocation for disaggregation; the adapter and
  the connector share an ``EngineLink`` under a key unique to the engine.
- **KV cache size** from ``--num-kv-blocks``: vLLM on CPU wants blocks of a multiple of 32
  tokens, so its block is the smallest multiple of 32 that is a multiple of Baton's block size,
  and the cache holds as many tokens as ``num_kv_blocks`` Baton blocks would.
"""

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from shared.engine.config import EngineConfig
from shared.engine.model import ModelConfig
from shared.engine.vllm_events import KVEventTranslator
from shared.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PUBLISHER_NAME: Final = "baton"
CPU_BLOCK_MULTIPLE: Final = 32  # vLLM's CPU attention takes blocks of a multiple of this
_DTYPE_BYTES: Final = {"float32": 4, "bfloat16": 2, "float16": 2}
# Translators waiting for the publisher vLLM builds during engine start-up, by topic.
_pending_sinks: dict[str, KVEventTranslator] = {}


@dataclass(slots=True)
class VllmLoad:
    """The last step's scheduler view, as vLLM's stats logger reports it."""

    num_running: int = 0
    kv_usage: float = 0.0


def vllm_block_size(block_size: int) -> int:
    """vLLM's block size for Baton's ``block_size``: the smallest multiple of 32 tokens that
    is a whole number of Baton blocks."""
    size = block_size
    while size % CPU_BLOCK_MULTIPLE:
        size += block_size
    return size


def kv_bytes_per_token(hf_config: dict[str, Any], dtype: str) -> int:
    """Bytes of K and V one token takes over every layer of a Hugging Face Llama config."""
    num_heads = int(hf_config["num_attention_heads"])
    num_kv_heads = int(hf_config.get("num_key_value_heads") or num_heads)
    head_dim = int(hf_config.get("head_dim") or int(hf_config["hidden_size"]) // num_heads)
    num_layers = int(hf_config["num_hidden_layers"])
    return 2 * num_layers * num_kv_heads * head_dim * _DTYPE_BYTES[dtype]


def model_dir(config: EngineConfig, tokenizer: Tokenizer) -> Path:
    """The checkpoint directory vLLM loads: ``model_path``, or for ``random`` the torch
    engine's random model (same seed, same shape) written once to the temp directory."""
    if config.model_path != "random":
        return Path(config.model_path)
    from shared.engine.tiny_llama import cached_tiny_llama

    shape = ModelConfig(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=config.max_model_len
    )
    return cached_tiny_llama(shape, seed=config.seed, dtype=config.dtype)


@dataclass(slots=True)
class StartedVllm:
    """vLLM's ``LLMEngine`` and what the adapter reads beside it."""

    llm: Any  # vllm.v1.engine.llm_engine.LLMEngine
    events: KVEventTranslator  # fed by its KV events
    load: VllmLoad  # kept by its stats logger
    vocab_size: int  # the model's
    link: Any  # shared.engine.vllm_connector.EngineLink: shared with its KV connector
    key: str  # the link's key (close_link when the engine stops)


def start_vllm(config: EngineConfig, tokenizer: Tokenizer) -> StartedVllm:
    """vLLM's ``LLMEngine`` for ``config``, started in this process."""
    # vLLM reads these from the environment; a value the operator set wins.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in process: see the docstring
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # never phone home
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # share the host's cores
    from vllm import EngineArgs
    from vllm.config import KVEventsConfig, KVTransferConfig
    from vllm.v1.engine.llm_engine import LLMEngine
    from vllm.v1.executor.abstract import Executor

    from shared.engine import vllm_connector

    _register_publisher()
    path = model_dir(config, tokenizer)
    hf = json.loads((path / "config.json").read_text())
    vocab_size = int(hf["vocab_size"])
    if vocab_size < tokenizer.vocab_size:
        raise ValueError(
            f"model vocabulary ({vocab_size}) is smaller than the tokenizer's "
            f"({tokenizer.vocab_size})"
        )
    block_size = vllm_block_size(config.block_size)
    num_tokens = config.num_kv_blocks * config.block_size
    num_blocks = -(-num_tokens // block_size) + 1  # vLLM keeps one block aside
    topic = f"baton-{uuid.uuid4().hex}"
    translator = KVEventTranslator(config.block_size, block_size)
    load = VllmLoad()
    args = EngineArgs(
        model=str(path),
        # The tokenizer only serves structured outputs (grammars are compiled over the
        # vocabulary's strings); prompts still arrive as ids and outputs leave as ids.
        skip_tokenizer_init=False,
        generation_config="vllm",  # no sampling defaults from generation_config.json
        dtype=config.dtype,
        seed=config.seed,
        max_model_len=config.max_model_len,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_model_len),
        block_size=block_size,
        kv_cache_memory_bytes=num_blocks * block_size * kv_bytes_per_token(hf, config.dtype),
        enable_prefix_caching=True,
        enforce_eager=True,
        scheduling_policy="priority",
        kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="zmq", topic=topic),
        kv_transfer_config=KVTransferConfig(
            kv_connector=vllm_connector.CONNECTOR_NAME,
            kv_connector_module_path=vllm_connector.__name__,
            kv_role="kv_both",
            kv_connector_extra_config={vllm_connector.KEY_FIELD: topic},
        ),
    )
    vllm_config = args.create_engine_config()
    # Validated as a zmq publisher's config; served by ours (vLLM's config type lists only
    # its own publishers, its factory takes any registered name).
    vllm_config.kv_events_config.publisher = PUBLISHER_NAME
    _pending_sinks[topic] = translator
    link = vllm_connector.open_link(topic)
    try:
        engine = LLMEngine(
            vllm_config=vllm_config,
            executor_class=Executor.get_class(vllm_config),
            log_stats=True,
            stat_loggers=[_load_logger_factory(load)],
            multiprocess_mode=False,
        )
    except BaseException:
        vllm_connector.close_link(topic)
        raise
    finally:
        _pending_sinks.pop(topic, None)
        vllm_connector.started(topic)
    return StartedVllm(engine, translator, load, vocab_size, link, topic)


def _register_publisher() -> None:
    from vllm.distributed.kv_events import (
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        EventBatch,
        EventPublisher,
        EventPublisherFactory,
    )

    # vLLM's classes are Any where vLLM is not installed (mypy runs without it).
    class VllmKVEvents(EventPublisher):  # type: ignore[misc,unused-ignore]
        """Hands each batch of vLLM KV events to the translator of its engine, in the
        scheduler's own thread (no queue: the batch is translated before ``step`` returns)."""

        def __init__(self, data_parallel_rank: int = 0, *, topic: str, **_: Any) -> None:
            super().__init__(data_parallel_rank)
            translator = _pending_sinks.pop(topic, None)
            if translator is None:
                raise RuntimeError(f"no Baton engine waits for KV events on topic {topic!r}")
            self._translator = translator

        def publish(self, events: EventBatch) -> None:
            translator = self._translator
            for event in events.events:
                if isinstance(event, BlockStored):
                    translator.stored(event.block_hashes, event.parent_block_hash, event.token_ids)
                elif isinstance(event, BlockRemoved):
                    translator.removed(event.block_hashes)
                elif isinstance(event, AllBlocksCleared):
                    translator.cleared()

        def shutdown(self) -> None:
            return

    # KeyError: registered by an engine started earlier in this process.
    with contextlib.suppress(KeyError):
        EventPublisherFactory.register_publisher(PUBLISHER_NAME, VllmKVEvents)


def _load_logger_factory(load: VllmLoad) -> Callable[[Any, int], Any]:
    from vllm.v1.metrics.loggers import StatLoggerBase

    class VllmLoadLogger(StatLoggerBase):  # type: ignore[misc,unused-ignore]
        """Keeps the scheduler's counts after each step in ``load``."""

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self._load = load

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            if scheduler_stats is None:
                return
            load = self._load
            load.num_running = scheduler_stats.num_running_reqs
            load.kv_usage = scheduler_stats.kv_cache_usage

        def log_engine_initialized(self) -> None:
            return

    return VllmLoadLogger
