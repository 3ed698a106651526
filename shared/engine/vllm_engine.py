"""Baton's ``Engine`` over vLLM's V1 ``LLMEngine`` (``--engine vllm``; docs/vllm.md).

``VllmEngine`` is an adapter, synchronous and single-owner like every engine: the engine loop
calls ``step`` in a thread, and ``step`` runs one vLLM scheduler step in process
(``shared.engine.vllm_build`` starts it). Requests go in as token ids with vLLM sampling
parameters mapped from Baton's; vLLM returns each step's new tokens (``DELTA`` outputs), which
become ``RequestOutput``s with Baton's finish reasons.

What is Baton's and what is vLLM's:

- **Validation** is Baton's (the same rules and messages as ``ScheduledEngine``), so a request
  vLLM would truncate or refuse later is refused at ``add_request`` with ``InvalidRequest``.
- **EOS**: vLLM is started without a tokenizer, so it knows no EOS; the engine adds the
  tokenizer's first EOS id to each request's stop tokens unless ``ignore_eos`` (the torch
  engine stops on the same id). ``min_tokens`` masks it as vLLM masks every stop token.
- **Shedding** (``deadline_s``) is the adapter's: a request with no token yet at its deadline
  is aborted in vLLM and finishes with ``SHED``.
- **Load** (``stats``): running and waiting counts and KV usage are those vLLM's scheduler
  reported after the last step; requests added since count as waiting. Queued prompt tokens
  count every request with no output token yet (one being prefilled in chunks included).
- **Prefix cache**: KV events and the cached hashes come from ``KVEventTranslator``.
- **Sampling**: temperature, top-p, seed, penalties, logit bias and log-probabilities
  (vLLM's raw ones, before penalties and temperature, as Baton reports them) map one to one;
  a JSON schema (``response_format``) becomes vLLM's structured outputs.
- **Not supported yet** (the worker never calls them: this engine exposes no KV memory, so it
  gets no KV connector): disaggregation and live migration (``reserve``, ``commit``,
  ``resume``, ``detach``; ``hold_kv``). Objective budgets (``set_budget``) are recorded but
  vLLM's batch limits are fixed when it starts.
"""

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Final

from vllm import SamplingParams as VllmSamplingParams
from vllm.inputs import TokensPrompt
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from proto.messages import (
    FEATURE_LOGIT_BIAS,
    FEATURE_LOGPROBS,
    FEATURE_PENALTIES,
    FEATURE_STRUCTURED_OUTPUTS,
    BlockHash,
    FinishReason,
    KVEvent,
    RequestId,
    SamplingParams,
    TokenLogprobs,
)
from shared.engine.config import EngineConfig
from shared.engine.interface import (
    EngineRequest,
    EngineStats,
    RequestOutput,
    Reservation,
    StepResult,
)
from shared.engine.runner import KVRegion
from shared.engine.speed import StepBudget
from shared.engine.vllm_build import VllmLoad, start_vllm, vllm_block_size
from shared.engine.vllm_events import KVEventTranslator
from shared.errors import InvalidRequest
from shared.kv_hash import hash_prompt_blocks
from shared.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_FINISH_REASONS: Final = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "error": FinishReason.ERROR,
}
_UNSUPPORTED = "the vllm engine does not move KV between workers yet (docs/vllm.md)"


@dataclass(slots=True)
class _Live:
    """What the adapter tracks of one request vLLM holds."""

    num_prompt_tokens: int
    priority: int
    deadline_s: float | None
    num_resumed: int
    num_top_logprobs: int | None  # None: no log-probabilities asked for
    num_output_tokens: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmShape:
    """The sizes the adapter validates and reports in (Baton's blocks, not vLLM's)."""

    block_size: int
    max_model_len: int
    num_kv_blocks: int  # in Baton blocks
    vocab_size: int
    eos_token_id: int | None


class VllmEngine:
    """An ``Engine`` (``shared.engine.interface``) over an in-process vLLM ``LLMEngine``."""

    def __init__(
        self,
        llm: Any,
        shape: VllmShape,
        events: KVEventTranslator,
        load: VllmLoad,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._llm = llm  # vllm.v1.engine.llm_engine.LLMEngine
        self.shape = shape
        self._events = events
        self._load = load
        self._live: dict[RequestId, _Live] = {}
        self.budget: StepBudget | None = None  # recorded, not applied (see the module doc)
        self.clock = clock

    @property
    def block_size(self) -> int:
        """Tokens per Baton KV block (the router hashes prompts with this size)."""
        return self.shape.block_size

    @property
    def max_model_len(self) -> int:
        return self.shape.max_model_len

    @property
    def kv_region(self) -> KVRegion | None:
        """None: vLLM's KV cache is not registered with a transfer agent (yet)."""
        return None

    @property
    def features(self) -> frozenset[str]:
        """vLLM samples from real logits (log-probabilities, penalties, logit bias) and
        constrains them to a JSON schema (structured outputs, with its grammar backend)."""
        return frozenset(
            {FEATURE_LOGPROBS, FEATURE_PENALTIES, FEATURE_LOGIT_BIAS, FEATURE_STRUCTURED_OUTPUTS}
        )

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request in vLLM; ``InvalidRequest`` if it could never run here."""
        self._validate(request)
        resumed = request.resumed_token_ids
        prompt = [*request.token_ids, *resumed]
        try:
            self._llm.add_request(
                request.request_id,
                TokensPrompt(prompt_token_ids=prompt),
                self._sampling(request.sampling, len(resumed)),
                arrival_time=time.time(),
                priority=request.priority,
            )
        except (ValueError, TypeError) as exc:  # vLLM's own checks
            raise InvalidRequest(f"vLLM refused request {request.request_id}: {exc}") from exc
        self._live[request.request_id] = _Live(
            num_prompt_tokens=len(request.token_ids),
            priority=request.priority,
            deadline_s=request.deadline_s,
            num_resumed=len(resumed),
            num_top_logprobs=request.sampling.logprobs,
            num_output_tokens=len(resumed),
        )

    def abort(self, request_id: RequestId) -> bool:
        """Drop a request in vLLM (its blocks are freed at once); False if unknown here."""
        if self._live.pop(request_id, None) is None:
            return False
        self._llm.abort_request([request_id])
        return True

    def has_unfinished(self) -> bool:
        return bool(self._live)

    def step(self) -> StepResult:
        """Shed requests past their deadline, run one vLLM step, and return its new tokens."""
        started = time.perf_counter()
        outputs = self._expire()
        num_prefill_tokens = 0
        num_decode_tokens = 0
        if self._live:
            for out in self._llm.step():
                live = self._live.get(out.request_id)
                if live is None:  # aborted by us since: already forgotten
                    continue
                completion = out.outputs[0]
                new_token_ids = list(completion.token_ids)
                num_cached = out.num_cached_tokens or 0
                if live.num_output_tokens == live.num_resumed:
                    num_prefill_tokens += live.num_prompt_tokens + live.num_resumed - num_cached
                else:
                    num_decode_tokens += 1
                live.num_output_tokens += len(new_token_ids)
                reason = None
                if out.finished:
                    reason = _FINISH_REASONS.get(completion.finish_reason or "", FinishReason.STOP)
                    del self._live[out.request_id]
                outputs.append(
                    RequestOutput(
                        RequestId(out.request_id),
                        new_token_ids,
                        reason,
                        live.num_prompt_tokens,
                        num_cached,
                        None,
                        live.num_output_tokens,
                        _logprobs(completion, new_token_ids, live.num_top_logprobs),
                    )
                )
        return StepResult(
            outputs=outputs,
            duration_s=time.perf_counter() - started,
            num_prefill_tokens=num_prefill_tokens,
            num_decode_tokens=num_decode_tokens,
        )

    def stats(self) -> EngineStats:
        """vLLM's counts after the last step, plus requests added since (as waiting)."""
        load = self._load
        num_live = len(self._live)
        num_running = min(load.num_running, num_live)
        num_total = self.shape.num_kv_blocks
        num_used = round(load.kv_usage * num_total) if num_live else 0
        return EngineStats(
            num_running=num_running,
            num_waiting=num_live - num_running,
            num_free_blocks=num_total - num_used,
            num_total_blocks=num_total,
            num_waiting_tokens=self.num_tokens_ahead(2**62),
        )

    def set_budget(self, budget: StepBudget) -> None:
        """Kept for inspection only: vLLM's batch limits are fixed when it starts."""
        self.budget = budget

    def num_tokens_ahead(self, priority: int) -> int:
        """Prompt tokens of requests with no output yet that ``priority`` would wait behind
        (vLLM's priority policy serves a lower value first). Lock-free, like ``stats``: it
        reads a copy, taken at once, of what a step running in its thread may change."""
        return sum(
            live.num_prompt_tokens + live.num_resumed
            for live in list(self._live.values())
            if live.num_output_tokens == live.num_resumed and live.priority <= priority
        )

    def take_kv_events(self) -> list[KVEvent]:
        return self._events.take()

    def cached_prefix_tokens(self, token_ids: SequenceABC[int]) -> int:
        size = self.block_size
        return self._events.num_cached_prefix_blocks(hash_prompt_blocks(token_ids, size)) * size

    def cached_block_hashes(self) -> list[BlockHash]:
        return self._events.cached_block_hashes()

    def close(self) -> None:
        """Stop vLLM's engine core and its worker (a test process starts several engines)."""
        self._llm.engine_core.shutdown()

    # --- disaggregation and migration: not supported yet ---------------------------------------

    def held_blocks(self, request_id: RequestId) -> list[int]:
        """Nothing is ever held here (``hold_kv`` is refused): always ``KeyError``."""
        raise KeyError(request_id)

    def release(self, request_id: RequestId) -> bool:
        """Nothing is ever held here: False."""
        return False

    def reserve(self, request: EngineRequest, *, is_moved: bool = False) -> Reservation:
        raise NotImplementedError(_UNSUPPORTED)

    def commit(self, request_id: RequestId, first_token_id: int) -> RequestOutput | None:
        raise NotImplementedError(_UNSUPPORTED)

    def resume(self, request_id: RequestId) -> None:
        raise NotImplementedError(_UNSUPPORTED)

    def detach(self, request_id: RequestId) -> tuple[list[int], int]:
        raise NotImplementedError(_UNSUPPORTED)

    # --- helpers -------------------------------------------------------------------------------

    def _expire(self) -> list[RequestOutput]:
        """Requests still without a token past their deadline: aborted, finished as SHED."""
        shed: list[RequestOutput] = []
        now_s = self.clock()
        for request_id, live in list(self._live.items()):
            if (
                live.deadline_s is not None
                and live.deadline_s <= now_s
                and live.num_output_tokens == live.num_resumed
            ):
                self.abort(request_id)
                shed.append(
                    RequestOutput(request_id, [], FinishReason.SHED, live.num_prompt_tokens)
                )
        return shed

    def _sampling(self, sampling: SamplingParams, num_resumed: int) -> Any:
        stop_token_ids = list(sampling.stop_token_ids)
        eos = self.shape.eos_token_id
        if eos is not None and not sampling.ignore_eos and eos not in stop_token_ids:
            stop_token_ids.append(eos)
        return VllmSamplingParams(
            max_tokens=sampling.max_tokens - num_resumed,
            min_tokens=max(0, sampling.min_tokens - num_resumed),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            ignore_eos=sampling.ignore_eos,
            stop_token_ids=stop_token_ids,
            presence_penalty=sampling.presence_penalty,
            frequency_penalty=sampling.frequency_penalty,
            repetition_penalty=sampling.repetition_penalty,
            logit_bias=dict(sampling.logit_bias) or None,
            logprobs=sampling.logprobs,
            structured_outputs=(
                None
                if sampling.json_schema is None
                else StructuredOutputsParams(json=sampling.json_schema)
            ),
            detokenize=False,
            skip_special_tokens=False,
            output_kind=RequestOutputKind.DELTA,
        )

    def _validate(self, request: EngineRequest) -> None:
        shape = self.shape
        prompt = request.token_ids
        sampling = request.sampling
        num_prompt = len(prompt)
        if request.hold_kv:
            raise InvalidRequest(f"hold_kv: {_UNSUPPORTED}")
        if num_prompt == 0:
            raise InvalidRequest("prompt is empty")
        if sampling.max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {sampling.max_tokens}")
        if not 0 <= sampling.min_tokens <= sampling.max_tokens:
            raise InvalidRequest(
                f"min_tokens must be in [0, max_tokens={sampling.max_tokens}], "
                f"got {sampling.min_tokens}"
            )
        if not sampling.temperature >= 0:  # NaN too: it compares false with everything
            raise InvalidRequest(f"temperature must be >= 0, got {sampling.temperature}")
        if not 0 < sampling.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1], got {sampling.top_p}")
        if num_prompt + sampling.max_tokens > shape.max_model_len:
            raise InvalidRequest(
                f"prompt has {num_prompt} tokens and max_tokens is {sampling.max_tokens}; "
                f"together they exceed max_model_len {shape.max_model_len}"
            )
        num_blocks = -(-(num_prompt + sampling.max_tokens - 1) // shape.block_size)
        if num_blocks > shape.num_kv_blocks:
            raise InvalidRequest(
                f"prompt plus max_tokens needs {num_blocks} KV blocks; "
                f"the cache has {shape.num_kv_blocks}"
            )
        resumed = request.resumed_token_ids
        if len(resumed) >= sampling.max_tokens:
            raise InvalidRequest(
                f"{len(resumed)} tokens to resume after; max_tokens is {sampling.max_tokens}"
            )
        for token_ids in (prompt, resumed):
            if token_ids and (min(token_ids) < 0 or max(token_ids) >= shape.vocab_size):
                bad = min(token_ids) if min(token_ids) < 0 else max(token_ids)
                raise InvalidRequest(
                    f"token id {bad} is outside the vocabulary [0, {shape.vocab_size})"
                )
        if request.request_id in self._live:
            raise InvalidRequest(f"request {request.request_id} is already running here")


def _logprobs(
    completion: Any, token_ids: list[int], num_top: int | None
) -> list[TokenLogprobs] | None:
    """Baton's report per new token from vLLM's (a dict per position of token id to
    ``Logprob``: the chosen token and the ``num_top`` likeliest, each with its rank)."""
    if num_top is None or completion.logprobs is None:
        return None
    reports: list[TokenLogprobs] = []
    for token_id, position in zip(token_ids, completion.logprobs, strict=True):
        ranked = sorted(position.items(), key=lambda item: item[1].rank)
        top = [(tid, float(lp.logprob)) for tid, lp in ranked if lp.rank <= num_top][:num_top]
        reports.append(TokenLogprobs(float(position[token_id].logprob), top))
    return reports


def build_vllm_engine(config: EngineConfig, tokenizer: Tokenizer) -> VllmEngine:
    """Start vLLM for ``config`` and wrap it (see ``shared.engine.vllm_build``)."""
    started = time.monotonic()
    llm, events, load, vocab_size = start_vllm(config, tokenizer)
    eos = tokenizer.eos_token_ids
    # The blocks vLLM really made (one is its null block), in Baton blocks.
    num_vllm_blocks = int(llm.vllm_config.cache_config.num_gpu_blocks) - 1
    ratio = vllm_block_size(config.block_size) // config.block_size
    shape = VllmShape(
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        num_kv_blocks=num_vllm_blocks * ratio,
        vocab_size=vocab_size,
        eos_token_id=eos[0] if eos else None,
    )
    logger.info("vllm engine started in %.1f s", time.monotonic() - started)
    return VllmEngine(llm, shape, events, load)
