"""Continuous batching: which sequences run in the next step, and what their tokens mean.

Each step decodes every running sequence (one token each) and then admits waiting ones for
prefill, in the waiting queue's order (priority, then earliest deadline, then arrival; see
``waiting``), while the prefill token budget, ``max_num_seqs`` and free blocks allow. When a
decode finds no free block, the most recently admitted sequence is preempted: its blocks are
freed and it goes back to the queue, ahead of everything that arrived after it, to be
recomputed, keeping its generated tokens, so its output does not change.

Objectives tighten two limits from outside, step by step (``set_budget``): the running batch
is capped where a step would outlast the time-per-output-token objective, and so is the
number of prompt tokens prefilled beside it. A waiting sequence whose time-to-first-token
deadline passes before it starts is shed (``expire``): it finishes with ``SHED`` and is never
served late.

Prefill is not chunked: a sequence's whole uncached prompt runs in one step. A prompt longer
than ``max_num_batched_tokens`` is admitted when it is the first prefill of its step, so it runs
alone (beside the decodes) rather than never.

Disaggregated serving adds two states outside the queue and the batch. A prefill-side sequence
with ``hold_kv`` that finishes is *held*: its blocks stay allocated (and its full blocks cached)
until ``release``, while a decode worker reads them. A decode-side sequence is *reserved*: it
gets blocks for its prompt (reusing the cached prefix) while the KV is pulled, then ``commit``
puts it in the batch with its first token, as if this engine had prefilled it.
"""

import logging
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

from proto.messages import FinishReason, RequestId, SamplingParams
from shared.engine.block_manager import BlockManager
from shared.engine.sequence import Sequence, SequenceStatus
from shared.engine.speed import StepBudget
from shared.engine.waiting import WaitingQueue

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchedulerConfig:
    """Batch limits and cache shape. ``eos_token_id`` None means no token ends a sequence by
    itself (only stop tokens and length do)."""

    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "num_kv_blocks",
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(slots=True)
class BatchPlan:
    """One step's work. ``seqs`` lists the prefills first, then the decodes, and
    ``num_new_tokens[i]`` is how many tokens of ``seqs[i]`` the step computes (1 for a decode).
    Every scheduled sequence samples one token; ``preempted`` were sent back to the queue."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_prefill_seqs: int = 0
    num_prefill_tokens: int = 0
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def prefill_seqs(self) -> list[Sequence]:
        """Sequences whose uncached tokens this step computes (new or resumed)."""
        return self.seqs[: self.num_prefill_seqs]

    @property
    def decode_seqs(self) -> list[Sequence]:
        """Sequences this step extends by one token."""
        return self.seqs[self.num_prefill_seqs :]

    @property
    def num_decode_seqs(self) -> int:
        """The decode batch size (one token each)."""
        return len(self.seqs) - self.num_prefill_seqs

    @property
    def is_empty(self) -> bool:
        """Whether the step has nothing to run."""
        return not self.seqs


class Scheduler:
    """Owns the waiting queue, the running batch and the block manager of one engine.

    ``running`` is a dict in admission order, so the newest is preempted in O(1) and an abort
    removes in O(1). ``waiting`` is a ``WaitingQueue`` (lazy removal, exact counts).
    ``reserved`` and ``held`` hold blocks but are never scheduled, so they do not make
    ``has_unfinished`` true (the engine loop must not spin on them).
    """

    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_kv_blocks, config.block_size)
        self.waiting = WaitingQueue()
        self.running: dict[RequestId, Sequence] = {}
        self.reserved: dict[RequestId, Sequence] = {}
        self.held: dict[RequestId, Sequence] = {}
        self._seqs: dict[RequestId, Sequence] = {}  # every waiting or running sequence
        self.budget = StepBudget()
        self.num_preemptions = 0
        self.num_shed = 0

    @property
    def num_waiting(self) -> int:
        """Live sequences queued (new or preempted), not counting aborted leftovers."""
        return len(self.waiting)

    def set_budget(self, budget: StepBudget) -> None:
        """Limits from the objectives for the steps to come (see the module docstring)."""
        self.budget = budget

    def expire(self, now_s: float) -> list[Sequence]:
        """Shed every waiting sequence whose deadline is before ``now_s`` and that has not
        produced a token: it finishes with ``SHED`` (it holds no blocks while waiting)."""
        expired = self.waiting.pop_expired(now_s)
        for seq in expired:
            del self._seqs[seq.request_id]
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = FinishReason.SHED
        self.num_shed += len(expired)
        return expired

    @property
    def num_running(self) -> int:
        """Sequences holding blocks and decoding."""
        return len(self.running)

    @property
    def num_reserved(self) -> int:
        """Sequences holding blocks while their prompt KV is transferred in."""
        return len(self.reserved)

    @property
    def num_held(self) -> int:
        """Finished sequences still holding their blocks for a transfer out."""
        return len(self.held)

    def has_unfinished(self) -> bool:
        """Whether any sequence is waiting or running (reserved and held ones never step)."""
        return bool(self._seqs)

    def get(self, request_id: RequestId) -> Sequence | None:
        """The sequence with this id that holds or may hold blocks (waiting, running, reserved
        or held), or None."""
        seq = self._seqs.get(request_id)
        if seq is None:
            seq = self.reserved.get(request_id) or self.held.get(request_id)
        return seq

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence at the back; the caller (``ScheduledEngine``) validated it."""
        if self.get(seq.request_id) is not None:
            raise ValueError(f"request {seq.request_id} is already scheduled")
        seq.status = SequenceStatus.WAITING
        self._seqs[seq.request_id] = seq
        self.waiting.push(seq)

    def abort(self, request_id: RequestId) -> Sequence | None:
        """Finish a sequence with ABORT and free its blocks now; None if it is unknown.

        A held sequence is released instead (it already finished, so its reason stays).
        """
        seq = self._seqs.pop(request_id, None) or self.reserved.pop(request_id, None)
        if seq is None:
            return self.release(request_id)
        if seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        else:
            self.running.pop(request_id, None)
            self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = FinishReason.ABORT
        return seq

    # --- disaggregation ------------------------------------------------------------------------

    def reserve(self, seq: Sequence, *, is_moved: bool = False) -> bool:
        """Give a new sequence blocks for its whole prompt, outside the batch, while its KV is
        pulled from a prefill worker. Returns False, changing nothing, when there is no room:
        too few free blocks, or ``max_num_seqs`` sequences already running or reserved.

        Every cached full block of the prompt is reused (``seq.num_cached_tokens`` says how
        many tokens need no transfer): nothing is computed here, so even a last block that the
        prompt fills exactly can be shared. The other blocks are private until ``commit``.

        ``is_moved``: a running sequence moving in from a peer (live migration; its tokens are
        prompt and output). Its KV covers every token but the newest, which the next step
        computes here, so the cached prefix stops before that token (as for a new sequence);
        ``resume`` puts it in the batch.
        """
        if self.get(seq.request_id) is not None:
            raise ValueError(f"request {seq.request_id} is already scheduled")
        if len(self.running) + len(self.reserved) >= self.config.max_num_seqs:
            return False
        bm = self.block_manager
        cached_block_ids = bm.match_prefix(seq, num_tokens=None if is_moved else seq.num_tokens)
        if not bm.can_allocate(seq, cached_block_ids):
            return False
        bm.allocate(seq, cached_block_ids)
        seq.status = SequenceStatus.RESERVED
        self.reserved[seq.request_id] = seq
        return True

    def commit(self, request_id: RequestId, first_token_id: int) -> Sequence:
        """The reserved sequence's prompt KV has arrived: cache its full prompt blocks, append
        its first token and put it in the batch, or finish it at once if that token ends it
        (check ``seq.is_finished``). Raises ``KeyError`` if it is not reserved."""
        seq = self.reserved.pop(request_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.cache_full_blocks(seq)
        seq.token_ids.append(first_token_id)
        seq.status = SequenceStatus.RUNNING
        self.running[request_id] = seq
        self._seqs[request_id] = seq
        reason = self._check_finish(seq, first_token_id)
        if reason is not None:
            self._finish(seq, reason)
        return seq

    def resume(self, request_id: RequestId) -> Sequence:
        """The reserved, moved-in sequence's KV has arrived (every token but its newest): cache
        its full blocks and put it in the batch, where the next step feeds it its newest token.
        Raises ``KeyError`` if it is not reserved."""
        seq = self.reserved.pop(request_id)
        seq.num_computed_tokens = seq.num_tokens - 1
        self.block_manager.cache_full_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.running[request_id] = seq
        self._seqs[request_id] = seq
        return seq

    def detach(self, request_id: RequestId) -> Sequence:
        """Take a decoding sequence out of the batch and hold its blocks (``HELD``, finished
        with ``ABORT`` here) for a peer to read until ``release``. The KV of its first
        ``num_computed_tokens`` tokens (all but the newest) is in the first blocks.
        Raises ``KeyError`` if it is not running, ``ValueError`` if it is still prefilling (its
        KV would not cover all but its newest token)."""
        seq = self.running[request_id]
        if seq.num_computed_tokens != seq.num_tokens - 1:
            raise ValueError(f"{request_id} is still prefilling")
        del self.running[request_id]
        del self._seqs[request_id]
        seq.status = SequenceStatus.HELD
        seq.finish_reason = FinishReason.ABORT
        self.held[request_id] = seq
        return seq

    def held_blocks(self, request_id: RequestId) -> list[int]:
        """A held sequence's blocks covering its whole prompt (the last one maybe partial), in
        order. Raises ``KeyError`` if it is not held."""
        seq = self.held[request_id]
        num_prompt_blocks = -(-seq.num_prompt_tokens // self.config.block_size)
        return seq.block_table[:num_prompt_blocks]

    def release(self, request_id: RequestId) -> Sequence | None:
        """Free a held sequence's blocks (cached ones stay in the prefix cache, evictable);
        None if it is not held."""
        seq = self.held.pop(request_id, None)
        if seq is None:
            return None
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.FINISHED
        return seq

    # --- scheduling ----------------------------------------------------------------------------

    def schedule(self) -> BatchPlan:
        """Plan the next step: decode every running sequence, preempting the newest when blocks
        run out, then admit waiting ones (none in a step that preempted, so a sequence just sent
        back is not re-admitted at once)."""
        plan = BatchPlan()
        decode_seqs = self._schedule_decodes(plan.preempted)
        if not plan.preempted:
            self._schedule_prefills(plan)
        plan.seqs.extend(decode_seqs)
        plan.num_new_tokens.extend([1] * len(decode_seqs))
        return plan

    def _schedule_decodes(self, preempted: list[Sequence]) -> list[Sequence]:
        seqs = list(self.running.values())
        bm = self.block_manager
        bs = self.config.block_size
        # Fast path: a sequence needs a block only when its last token starts one.
        needy = [seq for seq in seqs if len(seq.block_table) * bs < len(seq.token_ids)]
        if len(needy) <= bm.num_free_blocks:
            for seq in needy:
                bm.append_slot(seq)
            return seqs
        lo, hi = 0, len(seqs)
        while lo < hi:
            seq = seqs[lo]
            if bm.can_append(seq):
                bm.append_slot(seq)
                lo += 1
                continue
            hi -= 1
            victim = seqs[hi]
            self._preempt(victim)
            preempted.append(victim)
        return seqs[:lo]

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.request_id]
        self.block_manager.deallocate(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.push(seq)
        self.num_preemptions += 1
        logger.debug(
            "sequence preempted request_id=%s num_tokens=%d", seq.request_id, seq.num_tokens
        )

    def _schedule_prefills(self, plan: BatchPlan) -> None:
        bm = self.block_manager
        bs = self.config.block_size
        budget = self.config.max_num_batched_tokens
        max_num_seqs = self.config.max_num_seqs
        limits = self.budget
        if limits.max_num_running is not None:
            max_num_seqs = min(max_num_seqs, limits.max_num_running)
        # The objective's token budget may be overrun by the step's first prompt only while
        # some budget is left or nothing runs, so that a long prompt is not starved forever.
        slo_tokens = limits.max_prefill_tokens
        if slo_tokens is not None:
            if slo_tokens <= 0 and self.running:
                return
            budget = min(budget, max(slo_tokens, 1))
        waiting = self.waiting
        while len(self.running) < max_num_seqs:
            seq = waiting.peek()
            if seq is None:
                break
            cached_block_ids = bm.match_prefix(seq)
            num_new = len(seq.token_ids) - len(cached_block_ids) * bs
            if num_new > budget and plan.num_prefill_seqs:
                break
            if not bm.can_allocate(seq, cached_block_ids):
                break
            waiting.pop()
            bm.allocate(seq, cached_block_ids)
            seq.status = SequenceStatus.RUNNING
            self.running[seq.request_id] = seq
            plan.seqs.append(seq)
            plan.num_new_tokens.append(num_new)
            plan.num_prefill_seqs += 1
            plan.num_prefill_tokens += num_new
            budget -= num_new

    # --- results -------------------------------------------------------------------------------

    def postprocess(self, plan: BatchPlan, token_ids: SequenceABC[int]) -> list[Sequence]:
        """Apply one step's sampled tokens (``token_ids[i]`` for ``plan.seqs[i]``): record the
        computed KV in the prefix cache, append each token, finish sequences that are done and
        free their blocks (or hold them, for ``hold_kv``). Returns the sequences finished by this
        step.

        Finish order, as vLLM's stop checker: no stop before ``min_tokens`` output tokens; then
        EOS (unless ``ignore_eos``) or a ``stop_token_ids`` token -> STOP; then ``max_tokens``
        or ``max_model_len`` reached -> LENGTH. The stopping token stays in the output.
        """
        if len(token_ids) != len(plan.seqs):
            raise ValueError(f"got {len(token_ids)} tokens for {len(plan.seqs)} sequences")
        bm = self.block_manager
        bs = self.config.block_size
        eos_token_id = self.config.eos_token_id
        max_model_len = self.config.max_model_len
        running = SequenceStatus.RUNNING
        finished: list[Sequence] = []
        for seq, num_new, token_id in zip(plan.seqs, plan.num_new_tokens, token_ids, strict=True):
            if seq.status is not running:  # aborted since schedule()
                continue
            seq.num_computed_tokens += num_new
            if seq.num_computed_tokens // bs > seq.num_committed_blocks:
                bm.cache_full_blocks(seq)
            tokens = seq.token_ids
            tokens.append(token_id)
            sampling = seq.sampling
            # Cheap screen first: most tokens end nothing.
            if (
                token_id == eos_token_id
                or sampling.stop_token_ids
                or len(tokens) - seq.num_prompt_tokens >= sampling.max_tokens
                or len(tokens) >= max_model_len
            ):
                reason = self._check_finish(seq, token_id)
                if reason is not None:
                    self._finish(seq, reason)
                    finished.append(seq)
        return finished

    def _check_finish(self, seq: Sequence, token_id: int) -> FinishReason | None:
        config = self.config
        return finish_reason(
            seq.sampling,
            token_id,
            num_output=len(seq.token_ids) - seq.num_prompt_tokens,
            num_tokens=len(seq.token_ids),
            eos_token_id=config.eos_token_id,
            max_model_len=config.max_model_len,
        )

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish_reason = reason
        del self.running[seq.request_id]
        del self._seqs[seq.request_id]
        if seq.hold_kv:
            seq.status = SequenceStatus.HELD
            self.held[seq.request_id] = seq
        else:
            seq.status = SequenceStatus.FINISHED
            self.block_manager.deallocate(seq)


def finish_reason(
    sampling: SamplingParams,
    token_id: int,
    *,
    num_output: int,
    num_tokens: int,
    eos_token_id: int | None,
    max_model_len: int,
) -> FinishReason | None:
    """Whether ``token_id``, the ``num_output``-th output token (``num_tokens`` in all, prompt
    included), ends its request, the way vLLM's stop checker decides: no stop before
    ``min_tokens``; then EOS (unless ``ignore_eos``) or a stop token -> STOP; then
    ``max_tokens`` or the context -> LENGTH. Every engine applies this one rule."""
    if num_output >= sampling.min_tokens:
        if token_id == eos_token_id and not sampling.ignore_eos:
            return FinishReason.STOP
        if sampling.stop_token_ids and token_id in sampling.stop_token_ids:
            return FinishReason.STOP
    if num_output >= sampling.max_tokens or num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None
