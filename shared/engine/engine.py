"""An ``Engine`` made of a ``Scheduler`` (what runs, in which blocks) and a ``Runner`` (run it).

``ScheduledEngine`` is the same for every model: it validates requests, asks the scheduler for a
batch, hands the plan to the runner, and turns the sampled tokens into outputs. It also carries
the disaggregation verbs (``reserve``/``commit`` on the decode side, ``hold_kv``/
``held_blocks``/``release`` on the prefill side), which only move block ownership, so they work
the same for the simulated and the torch runner.
"""

import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as SequenceABC

from proto.messages import BlockHash, FinishReason, KVEvent, RequestId
from shared.engine.interface import (
    EngineRequest,
    EngineStats,
    RequestOutput,
    Reservation,
    StepResult,
)
from shared.engine.runner import KVRegion, Runner
from shared.engine.scheduler import Scheduler, SchedulerConfig
from shared.engine.sequence import Sequence, SequenceStatus
from shared.engine.speed import StepBudget
from shared.engine.validation import RequestBounds, check_request
from shared.errors import InvalidRequest, Overloaded
from shared.kv_hash import hash_prompt_blocks

logger = logging.getLogger(__name__)

HELD = SequenceStatus.HELD


class ScheduledEngine:
    """An ``Engine`` (see ``shared.engine.interface``) over any ``Runner``.

    The runner learns of a request when it is added or reserved (``runner.add``) and forgets it
    when it finishes or is aborted (``runner.remove``), held requests included: their blocks
    belong to the scheduler, not to the runner.
    """

    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        runner: Runner,
        *,
        vocab_size: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.scheduler = Scheduler(scheduler_config)
        self.runner = runner
        self.vocab_size = vocab_size
        self.clock = clock  # what request deadlines are measured on

    @property
    def block_size(self) -> int:
        """Tokens per KV block (the router hashes prompts with the same size)."""
        return self.scheduler.config.block_size

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt plus output) one request may reach."""
        return self.scheduler.config.max_model_len

    @property
    def kv_region(self) -> KVRegion | None:
        """The runner's KV cache memory, for a transfer agent to register."""
        return self.runner.kv_region

    @property
    def features(self) -> frozenset[str]:
        """The runner's sampling features (``proto.messages.FEATURE_*``)."""
        return self.runner.features

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; raises ``InvalidRequest`` if it could never run here."""
        seq = self._new_sequence(request)
        self.runner.add(seq)
        self.scheduler.add(seq)

    def abort(self, request_id: RequestId) -> bool:
        """Drop a request (queued, running, reserved or held) and free its blocks now; False if
        it is unknown or already finished and released."""
        self.runner.remove(request_id)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        """Whether any request is queued or running (reserved and held ones never step)."""
        return self.scheduler.has_unfinished()

    def step(self) -> StepResult:
        """Shed waiting requests whose deadline passed, schedule a batch, run it, and apply
        one sampled token per scheduled sequence. The runner sees the KV usage during the step
        (blocks allocated for it included)."""
        scheduler = self.scheduler
        shed = [
            RequestOutput(seq.request_id, [], FinishReason.SHED, seq.num_prompt_tokens)
            for seq in scheduler.expire(self.clock())
        ]
        for out in shed:
            self.runner.remove(out.request_id)
        plan = scheduler.schedule()
        if plan.is_empty:
            return StepResult(outputs=shed)
        result = self.runner.execute(plan, scheduler.block_manager.usage)
        finished = scheduler.postprocess(plan, result.token_ids)
        outputs = [
            RequestOutput(
                seq.request_id,
                [token_id],
                seq.finish_reason,
                seq.num_prompt_tokens,
                seq.num_cached_tokens,
                scheduler.held_blocks(seq.request_id) if seq.status is HELD else None,
                seq.num_output_tokens,
            )
            for seq, token_id in zip(plan.seqs, result.token_ids, strict=True)
        ]
        if result.logprobs is not None:
            for out, report in zip(outputs, result.logprobs, strict=True):
                if report is not None:
                    out.logprobs = [report]
        for seq in finished:
            self.runner.remove(seq.request_id)
        return StepResult(
            outputs=shed + outputs if shed else outputs,
            duration_s=result.duration_s,
            num_prefill_tokens=plan.num_prefill_tokens,
            num_decode_tokens=plan.num_decode_seqs,
        )

    def stats(self) -> EngineStats:
        """Queue lengths and free blocks now (evictable cached blocks count as free; blocks of
        reserved and held requests do not)."""
        scheduler = self.scheduler
        bm = scheduler.block_manager
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
            num_reserved=scheduler.num_reserved,
            num_held=scheduler.num_held,
            num_waiting_tokens=scheduler.waiting.num_tokens,
        )

    def set_budget(self, budget: StepBudget) -> None:
        """Batch limits from the objectives for the coming steps (``Scheduler.set_budget``)."""
        self.scheduler.set_budget(budget)

    def num_tokens_ahead(self, priority: int) -> int:
        """Prompt tokens queued that a new request of ``priority`` would wait behind."""
        return self.scheduler.waiting.num_tokens_ahead(priority)

    def take_kv_events(self) -> list[KVEvent]:
        """The block manager's KV events since the last call, oldest first."""
        return self.scheduler.block_manager.take_events()

    # --- disaggregation ------------------------------------------------------------------------

    def held_blocks(self, request_id: RequestId) -> list[int]:
        """Blocks holding a held request's prompt KV, in order; ``KeyError`` if not held."""
        return self.scheduler.held_blocks(request_id)

    def release(self, request_id: RequestId) -> bool:
        """Free a held request's blocks (full ones stay cached); False if it is not held."""
        return self.scheduler.release(request_id) is not None

    def reserve(self, request: EngineRequest, *, is_moved: bool = False) -> Reservation:
        """Reserve blocks for a request whose prompt KV (``is_moved``: a running sequence's
        KV, all but its newest token) will be transferred in; raises ``InvalidRequest`` as
        ``add_request`` does and ``Overloaded`` when there is no room."""
        seq = self._new_sequence(request)
        if not self.scheduler.reserve(seq, is_moved=is_moved):
            stats = self.stats()
            raise Overloaded(
                f"cannot reserve {seq.num_blocks(self.block_size)} KV blocks for "
                f"{request.request_id}: {stats.num_free_blocks} free, "
                f"{stats.num_running + stats.num_reserved} sequences running or reserved"
            )
        self.runner.add(seq)
        num_kv_tokens = seq.num_tokens - 1 if is_moved else seq.num_tokens
        num_kv_blocks = -(-num_kv_tokens // self.block_size)
        return Reservation(
            block_ids=seq.block_table[:num_kv_blocks], num_cached_tokens=seq.num_cached_tokens
        )

    def resume(self, request_id: RequestId) -> None:
        """Put a reserved, moved-in request in the batch: its KV has arrived. ``KeyError`` if
        it is not reserved."""
        self.scheduler.resume(request_id)

    def detach(self, request_id: RequestId) -> tuple[list[int], int]:
        """Stop decoding a running request here and hold its KV for a peer (live migration):
        its blocks, in order, and how many tokens their KV covers. ``KeyError`` if it is not
        running, ``ValueError`` if it is still prefilling. ``release`` frees the blocks."""
        seq = self.scheduler.detach(request_id)
        self.runner.sync_kv(seq)
        self.runner.remove(request_id)
        num_blocks = -(-seq.num_computed_tokens // self.block_size)
        return seq.block_table[:num_blocks], seq.num_computed_tokens

    def commit(self, request_id: RequestId, first_token_id: int) -> RequestOutput | None:
        """Put a reserved request in the batch after its first token; returns its finishing
        output (no tokens) if that token ends it, else None. ``KeyError`` if not reserved."""
        if not 0 <= first_token_id < self.vocab_size:
            raise InvalidRequest(
                f"token id {first_token_id} is outside the vocabulary [0, {self.vocab_size})"
            )
        seq = self.scheduler.commit(request_id, first_token_id)
        if not seq.is_finished:
            return None
        self.runner.remove(request_id)
        return RequestOutput(
            request_id, [], seq.finish_reason, seq.num_prompt_tokens, seq.num_cached_tokens
        )

    def cached_prefix_tokens(self, token_ids: SequenceABC[int]) -> int:
        """Tokens of this prompt's longest prefix of full blocks already in the prefix cache."""
        size = self.block_size
        hashes = hash_prompt_blocks(token_ids, size)
        return self.scheduler.block_manager.num_cached_prefix_blocks(hashes) * size

    def cached_block_hashes(self) -> list[BlockHash]:
        """Every cached block's hash, for a router that must rebuild its view of this engine."""
        return self.scheduler.block_manager.cached_block_hashes()

    # --- validation ----------------------------------------------------------------------------

    def _new_sequence(self, request: EngineRequest) -> Sequence:
        self._validate(request)
        seq = Sequence(
            request.request_id,
            request.token_ids,
            request.sampling,
            request.arrival_time_s,
            hold_kv=request.hold_kv,
            priority=request.priority,
            deadline_s=request.deadline_s,
        )
        seq.token_ids.extend(request.resumed_token_ids)
        return seq

    def _validate(self, request: EngineRequest) -> None:
        config = self.scheduler.config
        bounds = RequestBounds(
            config.max_model_len, config.block_size, config.num_kv_blocks, self.vocab_size
        )
        check_request(request, bounds)
        if self.scheduler.get(request.request_id) is not None:
            raise InvalidRequest(f"request {request.request_id} is already running here")
