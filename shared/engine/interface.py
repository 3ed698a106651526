"""The contract every engine serves (simulated now, torch next), so services work with either.

An engine is synchronous and single-owner: one asyncio task (``shared.engine.loop``) owns it,
applies queued adds and aborts between steps, calls ``step()`` and publishes what it returns.
Nothing here does I/O.

Disaggregated serving (prefill first) splits a request across two engines. The prefill engine
runs it with ``hold_kv`` and ``prefill_sampling(sampling)`` (one token), publishes the first
token and keeps the prompt's blocks (``held_blocks``) until the decode side has read them
(``release``). The decode engine ``reserve``s blocks for the prompt, pulls the KV of every block
past ``Reservation.num_cached_tokens`` into them, then ``commit``s the first token; its later
steps emit the rest, exactly the tokens one engine would have produced alone.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from proto.messages import (
    BlockHash,
    FinishReason,
    KVEvent,
    RequestId,
    SamplingParams,
    TokenLogprobs,
)
from shared.engine.runner import KVRegion
from shared.engine.speed import StepBudget


@dataclass(slots=True)
class EngineRequest:
    """One request as an engine sees it. ``hold_kv`` (prefill side of disaggregation) keeps
    its blocks after it finishes, until ``Engine.release``. A lower ``priority`` is served
    first; a request still waiting for its prefill at ``deadline_s`` (on the engine's clock,
    ``time.monotonic`` by default) is shed: it finishes with ``FinishReason.SHED``."""

    request_id: RequestId
    token_ids: list[int]
    sampling: SamplingParams
    arrival_time_s: float = 0.0
    hold_kv: bool = False
    priority: int = 0
    deadline_s: float | None = None
    # A migrated request: the output tokens another worker already produced (and the client
    # already has). The engine recomputes their KV with the prompt's and continues after them,
    # as after a preemption, so greedy and seeded outputs are what one worker would produce.
    resumed_token_ids: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Reservation:
    """Blocks a decode engine reserved for a request's prompt (see ``Engine.reserve``).

    ``block_ids`` cover the whole prompt in order (for a moved-in sequence, every token but
    its newest), the last one maybe partial. The first
    ``num_cached_tokens // block_size`` of them already hold this prefix in the decode engine's
    own cache (``num_cached_tokens`` is a multiple of the block size), so only the rest need
    their KV transferred.
    """

    block_ids: list[int]
    num_cached_tokens: int


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request. ``finish_reason`` set means it is done and its
    blocks are already freed (or returned to the prefix cache), unless it was added with
    ``hold_kv``: then ``held_block_ids`` lists the blocks holding its prompt KV, in order, kept
    until ``Engine.release`` (the caller never has to ask the engine for them mid-step)."""

    request_id: RequestId
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    held_block_ids: list[int] | None = None
    num_output_tokens: int = 0  # its output tokens so far, this step's (and resumed ones) included
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the sampling asks


@dataclass(slots=True)
class StepResult:
    """The outputs of one step and how long the step takes on the modelled hardware.

    ``duration_s`` is the simulated device time: the caller waits until that much time has
    passed since the step began before it publishes the outputs. A real engine returns the
    time it actually took (so the caller waits no more).
    """

    outputs: list[RequestOutput] = field(default_factory=list)
    duration_s: float = 0.0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


@dataclass(slots=True, frozen=True)
class EngineStats:
    """Load of one engine. Blocks of reserved and held requests count as used (not free)."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_reserved: int = 0
    num_held: int = 0
    num_waiting_tokens: int = 0  # prompt (and, if preempted, output) tokens queued

    @property
    def kv_usage(self) -> float:
        if self.num_total_blocks == 0:
            return 0.0
        return 1.0 - self.num_free_blocks / self.num_total_blocks


class Engine(Protocol):
    """A continuous-batching engine."""

    @property
    def block_size(self) -> int: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def kv_region(self) -> KVRegion | None:
        """The KV cache memory a transfer agent registers, or None when there is none."""

    @property
    def features(self) -> frozenset[str]:
        """What it can do beyond plain sampling (``proto.messages.FEATURE_*``); the frontend
        refuses a request that needs one its model's engine lacks."""

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request. Raises ``shared.errors.InvalidRequest`` if it can never run
        (prompt plus max_tokens over the context, or more blocks than the whole cache)."""

    def abort(self, request_id: RequestId) -> bool:
        """Drop a request and free its blocks, whether queued, running, reserved or held;
        False if it was unknown (already finished and not held)."""

    def has_unfinished(self) -> bool:
        """Whether any request is queued or running, so ``step`` has work. Reserved and held
        requests do not count: they wait on a transfer, not on a step."""

    def step(self) -> StepResult:
        """Schedule one batch, run it, and return what it produced."""

    def stats(self) -> EngineStats: ...

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """Tokens of this prompt's longest block-aligned prefix already cached here."""

    def cached_block_hashes(self) -> list[BlockHash]:
        """Every block hash in the prefix cache now (a router resyncs its index from it)."""

    def take_kv_events(self) -> list[KVEvent]:
        """KV events since the last call, in order (blocks stored, removed, cache cleared)."""

    def set_budget(self, budget: StepBudget) -> None:
        """Limits for the coming steps that keep a time-per-output-token objective: the most
        sequences running and prompt tokens prefilled per step (``shared.engine.speed``)."""

    def num_tokens_ahead(self, priority: int) -> int:
        """Prompt tokens queued that a new request of ``priority`` would wait behind."""

    # --- disaggregation: prefill side -----------------------------------------------------------

    def held_blocks(self, request_id: RequestId) -> list[int]:
        """Block ids holding a finished ``hold_kv`` request's prompt KV, in order (the last one
        maybe partial), for a decode worker to read. Raises ``KeyError`` if it is not held."""

    def release(self, request_id: RequestId) -> bool:
        """Let a held request's blocks go (its full blocks stay in the prefix cache, as after
        any request). False if it is not held. Call once the decode side has read them."""

    # --- disaggregation: decode side ------------------------------------------------------------

    def reserve(self, request: EngineRequest, *, is_moved: bool = False) -> Reservation:
        """Reserve blocks for a request's prompt while its KV is pulled from a prefill worker
        (``is_moved``: for a running sequence's KV, pulled from a draining peer; see ``resume``).

        The request is validated as ``add_request`` does (``InvalidRequest``) and takes no part
        in steps until ``commit``. Raises ``shared.errors.Overloaded`` when there is no room now
        (too few free blocks, or ``max_num_seqs`` requests running or reserved), so that the
        caller can pick another worker rather than wait.
        """

    def commit(self, request_id: RequestId, first_token_id: int) -> RequestOutput | None:
        """The reserved request's prompt KV is in its blocks: cache its full prompt blocks
        (``BlockStored``) and continue it from ``first_token_id`` (sampled by the prefill
        worker), which no ``RequestOutput`` ever carries, since the caller already has it.

        Returns None when the request goes on decoding (its next tokens come from ``step``), or
        its finishing output (no new tokens; blocks freed) when the first token ends it.
        Raises ``KeyError`` if the request is not reserved (aborted meanwhile, say) and
        ``InvalidRequest`` for a token outside the vocabulary.
        """

    def resume(self, request_id: RequestId) -> None:
        """A moved-in request's KV is in its reserved blocks (every token but its newest, which
        the caller's ``resumed_token_ids`` ended with): put it in the batch, where the next
        step computes that token and samples the one after. ``KeyError`` if not reserved."""

    # --- live migration: the side giving a sequence up ------------------------------------------

    def detach(self, request_id: RequestId) -> tuple[list[int], int]:
        """Stop decoding a running request and hold its blocks for a peer to read (``release``
        frees them): the block ids, in order, and how many tokens their KV covers (all but the
        newest). ``KeyError`` if it is not running; ``ValueError`` if it is still prefilling."""


def prefill_sampling(sampling: SamplingParams) -> SamplingParams:
    """Sampling for the prefill half of a disaggregated request: one token, sampled exactly as
    the whole request would sample its first.

    ``max_tokens`` becomes 1, so ``min_tokens`` must be capped at 1. For a runner that masks
    EOS and stop tokens before ``min_tokens`` outputs that changes nothing (the first token is
    masked for any ``min_tokens >= 1``). The simulated runner, though, lets EOS be the
    ``min_tokens``-th token, so a cap to 1 would let EOS come first where the full request
    forbids it; ``ignore_eos`` (when ``min_tokens >= 2``) says so. The finish reason on the
    prefill side means nothing: the decode side keeps the original parameters, and its
    ``commit`` decides whether the first token ends the request.
    """
    return msgspec.structs.replace(
        sampling,
        max_tokens=1,
        min_tokens=min(sampling.min_tokens, 1),
        ignore_eos=sampling.ignore_eos or sampling.min_tokens > 1,
    )
