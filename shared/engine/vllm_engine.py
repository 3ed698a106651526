"""Baton's ``Engine`` over vLLM's V1 ``LLMEngine`` (``--engine vllm``; docs/vllm.md).

``VllmEngine`` is an adapter, synchronous and single-owner like every engine: the engine loop
calls ``step`` in a thread, and ``step`` runs one vLLM scheduler step in process
(``shared.engine.vllm_build`` starts it). Requests go in as token ids with vLLM sampling
parameters mapped from Baton's; vLLM returns each step's new tokens (``DELTA`` outputs), which
become ``RequestOutput``s with Baton's finish reasons (``shared.engine.vllm_outputs``).

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
- **Disaggregation** goes through Baton's KV connector for vLLM
  (``shared.engine.vllm_connector``): ``hold_kv`` keeps a finished prefill's blocks in vLLM
  until ``release``; ``reserve`` adds the request with its prompt and a placeholder for the
  first token (vLLM computes that token's KV itself, after the prompt's is loaded) and runs a
  scheduler step so that vLLM allocates its blocks now; ``commit`` writes the first token in
  place of the placeholder and lets vLLM schedule it. Block ids in ``held_blocks`` and
  ``Reservation`` are vLLM's (``vllm_block_size`` tokens each); ``make_connector`` gives the
  worker the matching ``KVConnector``.
- **Not supported**: live migration (``detach`` raises ``ValueError``, so a draining worker's
  requests move without their KV; ``resume`` and moved-in reservations are refused).
  Objective budgets (``set_budget``) are recorded but vLLM's batch limits are fixed when it
  starts.
"""

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass
from typing import Any, Final

from vllm.inputs import TokensPrompt

from proto.messages import (
    FEATURE_LOGIT_BIAS,
    FEATURE_LOGPROBS,
    FEATURE_PENALTIES,
    FEATURE_STRUCTURED_OUTPUTS,
    BlockHash,
    FinishReason,
    KVEvent,
    RequestId,
)
from shared.engine.config import EngineConfig
from shared.engine.interface import (
    EngineRequest,
    EngineStats,
    RequestOutput,
    Reservation,
    StepResult,
)
from shared.engine.kv_connector import KVConnector
from shared.engine.runner import KVRegion
from shared.engine.speed import StepBudget
from shared.engine.vllm_build import VllmLoad, start_vllm, vllm_block_size
from shared.engine.vllm_connector import (
    HOLD,
    RESERVE,
    EngineLink,
    VllmKVConnector,
    close_link,
)
from shared.engine.vllm_events import KVEventTranslator
from shared.engine.vllm_outputs import LiveRequest, step_outputs
from shared.engine.vllm_requests import (
    VllmShape,
    first_token_ends,
    sampling_params,
    validate,
    write_first_token,
)
from shared.errors import InvalidRequest, Overloaded
from shared.kv_hash import hash_prompt_blocks
from shared.kv_transfer import TransferAgent
from shared.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_NO_MIGRATION = "the vllm engine does not migrate running sequences (docs/vllm.md)"
_PLACEHOLDER: Final = 0  # stands for the first token in a reserved prompt until commit
# vLLM serves a lower priority value first. A reserved request's first token is already out:
# it goes ahead of requests not started yet, so that a queue of local prefills does not keep
# vLLM from allocating its blocks in the step ``reserve`` runs.
_RESERVED_PRIORITY: Final = -(2**31)


@dataclass(slots=True)
class _Reserving:
    """A reserved request waiting for its prompt's KV (``vllm_id`` is vLLM's request id)."""

    request: EngineRequest
    vllm_id: str
    num_cached_tokens: int
    is_full_hit: bool  # vLLM caches the whole prompt: added afresh at commit


class VllmEngine:
    """An ``Engine`` (``shared.engine.interface``) over an in-process vLLM ``LLMEngine``."""

    def __init__(
        self,
        llm: Any,
        shape: VllmShape,
        events: KVEventTranslator,
        load: VllmLoad,
        link: EngineLink | None = None,
        *,
        link_key: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._llm = llm  # vllm.v1.engine.llm_engine.LLMEngine
        self.shape = shape
        self._events = events
        self._load = load
        self._link = link if link is not None else EngineLink()
        self._link_key = link_key
        self._live: dict[RequestId, LiveRequest] = {}
        self._held: dict[RequestId, str] = {}  # finished hold_kv requests -> vLLM ids
        self._reserved: dict[RequestId, _Reserving] = {}
        self._buffered: list[Any] = []  # vLLM outputs of steps run by reserve, not yet returned
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
        """None: vLLM's KV cache is a tensor per layer, which ``make_connector`` serves."""
        return None

    @property
    def features(self) -> frozenset[str]:
        """vLLM samples from real logits (log-probabilities, penalties, logit bias) and
        constrains them to a JSON schema (structured outputs, with its grammar backend)."""
        return frozenset(
            {FEATURE_LOGPROBS, FEATURE_PENALTIES, FEATURE_LOGIT_BIAS, FEATURE_STRUCTURED_OUTPUTS}
        )

    def make_connector(self, agent: TransferAgent) -> KVConnector:
        """The worker's ``KVConnector`` over vLLM's KV tensors, registered with ``agent``
        (``ValueError`` if it cannot serve them: an shm agent serves only its own memory)."""
        caches = self._link.kv_caches
        if not caches:
            raise ValueError("vLLM gave no KV tensors to Baton's connector")
        shape = self.shape
        return VllmKVConnector.register(agent, caches, shape.num_vllm_blocks, shape.vllm_block_size)

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request in vLLM; ``InvalidRequest`` if it could never run here."""
        self._validate(request)
        resumed = request.resumed_token_ids
        mode = HOLD if request.hold_kv else None
        vllm_id = self._add(request, [*request.token_ids, *resumed], len(resumed), mode)
        self._live[request.request_id] = LiveRequest(
            num_prompt_tokens=len(request.token_ids),
            priority=request.priority,
            deadline_s=request.deadline_s,
            num_resumed=len(resumed),
            num_top_logprobs=request.sampling.logprobs,
            num_output_tokens=len(resumed),
            vllm_id=vllm_id,
            is_held=request.hold_kv,
        )

    def abort(self, request_id: RequestId) -> bool:
        """Drop a request in vLLM (its blocks are freed at once), or let a held request's
        blocks go, or end a reservation; False if unknown here."""
        if request_id in self._held:
            return self.release(request_id)
        reserving = self._reserved.pop(request_id, None)
        if reserving is not None:
            self._drop(reserving)
            return True
        live = self._live.pop(request_id, None)
        if live is None:
            return False
        self._llm.abort_request([request_id])
        # A hold that finished in a step ``reserve`` ran, whose outputs are not out yet.
        if self._link.held.pop(live.vllm_id, None) is not None:
            self._link.to_send.add(live.vllm_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self._live or self._buffered or self._link.has_reports)

    def step(self) -> StepResult:
        """Shed requests past their deadline, run one vLLM step, and return its new tokens."""
        started = time.perf_counter()
        outputs = self._expire()
        num_prefill_tokens = 0
        num_decode_tokens = 0
        if self.has_unfinished():
            raw = self._buffered
            self._buffered = []
            raw.extend(self._vllm_step())
            translated = step_outputs(raw, self._live, self._hold)
            outputs.extend(translated.outputs)
            num_prefill_tokens = translated.num_prefill_tokens
            num_decode_tokens = translated.num_decode_tokens
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
        close_link(self._link_key)

    # --- disaggregation: prefill side ----------------------------------------------------------

    def held_blocks(self, request_id: RequestId) -> list[int]:
        """vLLM's block ids holding a finished ``hold_kv`` request's prompt KV."""
        return list(self._link.held[self._held[request_id]])

    def release(self, request_id: RequestId) -> bool:
        """The connector reports the hold as sent at the next step: vLLM frees the blocks
        (its full ones stay in its prefix cache)."""
        vllm_id = self._held.pop(request_id, None)
        if vllm_id is None:
            return False
        self._link.held.pop(vllm_id, None)
        self._link.to_send.add(vllm_id)
        return True

    # --- disaggregation: decode side -----------------------------------------------------------

    def reserve(self, request: EngineRequest, *, is_moved: bool = False) -> Reservation:
        """Add the request with its prompt plus a placeholder for the first token, and run a
        vLLM step: the scheduler asks the connector, which has it load every prompt token
        past vLLM's own prefix hit, so vLLM allocates its blocks and parks it until commit.
        ``Overloaded`` when vLLM would not take it now (no free blocks, ``max_num_seqs``)."""
        if is_moved:
            raise InvalidRequest(_NO_MIGRATION)
        rid = request.request_id
        self._validate(request)
        num_prompt = len(request.token_ids)
        vllm_id = self._add(
            request, [*request.token_ids, _PLACEHOLDER], 1, RESERVE, _RESERVED_PRIORITY
        )
        self._buffered.extend(self._vllm_step())
        link = self._link
        reserved = link.reserved.get(vllm_id)
        if reserved is not None:
            reservation = Reservation(list(reserved.block_ids), reserved.num_cached_tokens)
            is_full_hit = False
        elif vllm_id in link.full_hits:  # nothing to load: added afresh at commit
            link.full_hits.discard(vllm_id)
            self._llm.abort_request([rid])
            reservation = Reservation([], num_prompt)
            is_full_hit = True
        else:
            link.full_hits.discard(vllm_id)
            self._llm.abort_request([rid])
            raise Overloaded(f"vLLM has no room now for request {rid}'s {num_prompt} tokens")
        self._reserved[rid] = _Reserving(
            request, vllm_id, reservation.num_cached_tokens, is_full_hit
        )
        return reservation

    def commit(self, request_id: RequestId, first_token_id: int) -> RequestOutput | None:
        """The prompt's KV is in the reserved blocks: write the first token in place of the
        placeholder and report the load done (vLLM schedules the request at the next step);
        or, if that token ends the request, drop it and return its finishing output."""
        if not 0 <= first_token_id < self.shape.vocab_size:
            raise InvalidRequest(
                f"token id {first_token_id} is outside the vocabulary [0, {self.shape.vocab_size})"
            )
        reserving = self._reserved.pop(request_id)
        request = reserving.request
        num_prompt = len(request.token_ids)
        reason = first_token_ends(self.shape, request.sampling, first_token_id, num_prompt)
        if reason is not None:
            self._drop(reserving)
            return RequestOutput(
                request_id, [], reason, num_prompt, reserving.num_cached_tokens, None, 1
            )
        vllm_id = reserving.vllm_id
        if reserving.is_full_hit:
            prompt = [*request.token_ids, first_token_id]
            vllm_id = self._add(request, prompt, 1, None, _RESERVED_PRIORITY)
        else:
            reserved = self._link.reserved.pop(vllm_id)
            write_first_token(reserved.request, first_token_id, self.shape.vllm_block_size)
            self._link.to_recv.add(vllm_id)
        self._live[request_id] = LiveRequest(
            num_prompt_tokens=num_prompt,
            priority=request.priority,
            deadline_s=None,  # its first token is out: never shed
            num_resumed=1,
            num_top_logprobs=request.sampling.logprobs,
            num_output_tokens=1,
            vllm_id=vllm_id,
            num_reserved_cached_tokens=reserving.num_cached_tokens,
        )
        return None

    # --- live migration: not supported ---------------------------------------------------------

    def resume(self, request_id: RequestId) -> None:
        raise NotImplementedError(_NO_MIGRATION)

    def detach(self, request_id: RequestId) -> tuple[list[int], int]:
        """``ValueError``: the worker then moves the request without its KV."""
        raise ValueError(_NO_MIGRATION)

    # --- helpers -------------------------------------------------------------------------------

    def _add(
        self,
        request: EngineRequest,
        prompt: list[int],
        num_resumed: int,
        mode: str | None,
        priority: int | None = None,
    ) -> str:
        """Add to vLLM (at the request's priority unless given); vLLM's own id for the
        request (the one its scheduler and the connector see)."""
        try:
            vllm_id = self._llm.add_request(
                request.request_id,
                TokensPrompt(prompt_token_ids=prompt),
                sampling_params(self.shape, request.sampling, num_resumed, mode),
                arrival_time=time.time(),
                priority=request.priority if priority is None else priority,
            )
        except (ValueError, TypeError) as exc:  # vLLM's own checks
            raise InvalidRequest(f"vLLM refused request {request.request_id}: {exc}") from exc
        return str(vllm_id)

    def _vllm_step(self) -> list[Any]:
        """One vLLM step. Reports the connector had no step to deliver in (vLLM steps only
        while it tracks a request) are dropped: they concern requests it no longer has."""
        link = self._link
        outputs = list(self._llm.step())
        if link.has_reports:
            logger.warning(
                "vllm connector reports dropped sent=%s received=%s", link.to_send, link.to_recv
            )
            link.to_send.clear()
            link.to_recv.clear()
        return outputs

    def _hold(self, request_id: RequestId, vllm_id: str) -> list[int] | None:
        """A held request just finished: the blocks vLLM keeps for it (None if it ended
        without running to its end: aborted, say)."""
        blocks = self._link.held.get(vllm_id)
        if blocks is None:
            return None
        self._held[request_id] = vllm_id
        return list(blocks)

    def _drop(self, reserving: _Reserving) -> None:
        """End a reservation: abort it in vLLM, which frees its blocks once the connector
        reports its load over."""
        if reserving.is_full_hit:
            return
        self._llm.abort_request([reserving.request.request_id])
        self._link.reserved.pop(reserving.vllm_id, None)
        self._link.to_recv.add(reserving.vllm_id)

    def _validate(self, request: EngineRequest) -> None:
        validate(self.shape, request)
        if request.request_id in self._live or request.request_id in self._reserved:
            raise InvalidRequest(f"request {request.request_id} is already running here")

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


def build_vllm_engine(config: EngineConfig, tokenizer: Tokenizer) -> VllmEngine:
    """Start vLLM for ``config`` and wrap it (see ``shared.engine.vllm_build``)."""
    started = time.monotonic()
    vllm = start_vllm(config, tokenizer)
    eos = tokenizer.eos_token_ids
    # The blocks vLLM really made (one is its null block), in Baton blocks.
    num_blocks = int(vllm.llm.vllm_config.cache_config.num_gpu_blocks)
    block_size = vllm_block_size(config.block_size)
    shape = VllmShape(
        block_size=config.block_size,
        max_model_len=config.max_model_len,
        num_kv_blocks=(num_blocks - 1) * (block_size // config.block_size),
        vocab_size=vllm.vocab_size,
        eos_token_id=eos[0] if eos else None,
        vllm_block_size=block_size,
        num_vllm_blocks=num_blocks,
    )
    logger.info("vllm engine started in %.1f s", time.monotonic() - started)
    return VllmEngine(vllm.llm, shape, vllm.events, vllm.load, vllm.link, link_key=vllm.key)
