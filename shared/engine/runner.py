"""The model half of an engine: what runs a scheduled batch (simulated or a real transformer).

An engine is a ``Scheduler`` (which requests run this step, with which KV blocks) plus a
``Runner`` (compute the step and sample one token per scheduled sequence). The simulated
runner models time and emits deterministic tokens; the torch runner runs a real Llama-style
transformer over a paged KV cache. Both see the same ``BatchPlan``.
"""

from dataclasses import dataclass
from typing import Protocol

from proto.messages import RequestId, TokenLogprobs
from shared.engine.scheduler import BatchPlan
from shared.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class KVRegion:
    """Where a runner's KV cache lives, so that a transfer agent can register it.

    The cache is **block-major**: block ``i`` (every layer's K and V for its ``block_size``
    tokens) is the contiguous byte range ``[address + i * block_bytes, +block_bytes)``. One
    descriptor per block is then enough to move it between workers.
    """

    address: int
    num_blocks: int
    block_bytes: int
    device: str = "cpu"  # "cpu" or "cuda:N"

    @property
    def size_bytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def block_address(self, block_id: int) -> int:
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} outside [0, {self.num_blocks})")
        return self.address + block_id * self.block_bytes


@dataclass(slots=True)
class RunResult:
    """One sampled token per scheduled sequence (in ``plan.seqs`` order) and the step's time:
    modelled time for a simulated runner, the measured time for a real one; with the tokens'
    log-probabilities, in the same order, when any sequence asked for them (None for one that
    did not)."""

    token_ids: list[int]
    duration_s: float
    logprobs: list[TokenLogprobs | None] | None = None


class Runner(Protocol):
    """Computes batches for a ``ScheduledEngine`` (``shared.engine.engine``), which owns the
    blocks: a runner only reads and writes the KV memory that ``seq.block_table`` names."""

    def add(self, seq: Sequence) -> None:
        """A request joined (queued, or reserved for a KV transfer on a decode worker): set up
        its per-request state (its sampler, say). It is scheduled from its next token on, which
        for a committed reservation is its second output token."""

    def remove(self, request_id: RequestId) -> None:
        """A request finished or was aborted: drop its per-request state. Idempotent. A held
        request (``hold_kv``) is removed when it finishes; its blocks, which the scheduler
        owns, outlive it until released."""

    def execute(self, plan: BatchPlan, kv_usage: float) -> RunResult:
        """Compute the KV of every scheduled token (writing it into each sequence's blocks,
        ``seq.block_table``) and sample the next token of every sequence in ``plan.seqs``.

        A sequence with ``num_new_tokens[i] > 1`` (or a prefill) computes its uncached tokens
        ``seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n]``; the scheduler
        advances ``num_computed_tokens`` after the call. It should not sample EOS or a stop token
        before ``sampling.min_tokens`` outputs (mask them); the scheduler never finishes a
        sequence before then, nor on EOS when ``sampling.ignore_eos``.
        """

    def sync_kv(self, seq: Sequence) -> None:
        """Make the KV memory of ``seq``'s blocks current (its KV is about to be read by a
        peer): what ``execute`` left for later, it writes now. Called between steps."""

    @property
    def kv_region(self) -> KVRegion | None:
        """The KV cache memory, or None when the runner has none to transfer."""

    @property
    def features(self) -> frozenset[str]:
        """What it can do beyond plain sampling (``proto.messages.FEATURE_*``)."""
