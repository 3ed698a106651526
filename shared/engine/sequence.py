"""One request's state inside an engine: its tokens, its KV blocks and where it is in its life."""

import enum

from proto.messages import BlockHash, FinishReason, RequestId, SamplingParams


class SequenceStatus(enum.Enum):
    """Where a sequence is: queued (new or preempted), in the batch, or done; or, in
    disaggregated serving, holding blocks outside the batch.

    ``RESERVED`` (decode side): blocks are reserved and its prompt KV is being pulled from a
    prefill worker; it joins the batch on commit. ``HELD`` (prefill side): it finished, but keeps
    its blocks until a decode worker has read them and the engine releases it.
    """

    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()
    RESERVED = enum.auto()
    HELD = enum.auto()


class Sequence:
    """A request's tokens (prompt then output, in one list) and its KV-cache bookkeeping.

    The scheduler owns ``status`` and ``finish_reason``; the block manager owns ``block_table``,
    ``block_hashes``, ``num_cached_tokens``, ``num_computed_tokens`` and
    ``num_committed_blocks``. ``block_hashes`` survives preemption (the tokens do not change), so
    each full block is hashed once per sequence, however often it is re-admitted. ``hold_kv``
    keeps the blocks after the sequence finishes (status ``HELD``) until the engine releases
    them, so that a decode worker can read its prompt's KV.
    """

    __slots__ = (
        "arrival_time_s",
        "block_hashes",
        "block_table",
        "deadline_s",
        "finish_reason",
        "hold_kv",
        "num_cached_tokens",
        "num_committed_blocks",
        "num_computed_tokens",
        "num_prompt_tokens",
        "priority",
        "queue_key",
        "request_id",
        "sampling",
        "status",
        "token_ids",
    )

    def __init__(
        self,
        request_id: RequestId,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        arrival_time_s: float = 0.0,
        *,
        hold_kv: bool = False,
        priority: int = 0,
        deadline_s: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt, then output appended
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.arrival_time_s = arrival_time_s
        self.hold_kv = hold_kv
        self.priority = priority  # lower is served first
        self.deadline_s = deadline_s  # first token due by then (engine clock), or shed
        self.queue_key: tuple[int, float, int] | None = None  # set by the waiting queue
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.block_table: list[int] = []
        self.block_hashes: list[BlockHash] = []  # chained hashes of the first full blocks
        self.num_cached_tokens = 0  # prefix-cache hit at the latest admission
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_committed_blocks = 0  # blocks of block_table offered to the prefix cache

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, status={self.status.name}, "
            f"num_tokens={self.num_tokens}, num_blocks={len(self.block_table)})"
        )

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far (kept across preemption)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        """A copy of the prompt."""
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        """A copy of the generated tokens."""
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def last_token_id(self) -> int:
        """The newest token: the one the next decode step feeds the model."""
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        """Whether the sequence is done generating (stopped, length-capped or aborted), whether
        or not it still holds its blocks (``HELD``)."""
        return self.status is SequenceStatus.FINISHED or self.status is SequenceStatus.HELD

    def num_blocks(self, block_size: int) -> int:
        """Blocks needed to hold the KV of every token so far."""
        return -(-len(self.token_ids) // block_size)
