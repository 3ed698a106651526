"""Fixed-size KV blocks: allocation, reference counts and the prefix cache, with KV events.

A block is *free* (no owner, no hash), *in use* (ref count > 0) or *evictable* (ref count 0 but
still holding a cached prefix). Evictable blocks are reused in least-recently-freed order, and
only once no plain free block is left, so a finished request's prefix stays warm for as long as
memory allows. Reusing one emits ``BlockRemoved``; caching a computed full block emits
``BlockStored``. The KV-aware router replays these events, so they are recorded in order.

Block hashes chain: a full block's hash is ``blake2b-64(parent hash || its token ids)`` (see
``hash_block_tokens``), so one hash names a whole prefix, as in vLLM and Dynamo.
"""

import logging
from collections import OrderedDict, deque
from collections.abc import Sequence as SequenceABC

from proto.messages import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent
from shared.engine.sequence import Sequence
from shared.kv_hash import hash_block_tokens

logger = logging.getLogger(__name__)


class BlockManager:
    """Owns the KV blocks of one engine and its prefix cache.

    Verbs come in pairs (``can_allocate``/``allocate``/``deallocate``, ``can_append``/
    ``append_slot``): the scheduler asks first, then acts, and an act without room raises
    ``RuntimeError`` because that is a scheduler bug. Nothing here does I/O.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._ref_counts = [0] * num_blocks
        self._hash_of_block: list[BlockHash | None] = [None] * num_blocks
        self._block_of_hash: dict[BlockHash, int] = {}
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._events: list[KVEvent] = []

    # --- state -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds: plain free ones plus evictable cached ones."""
        return len(self._free_block_ids) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks holding a registered prefix hash, in use or evictable."""
        return len(self._block_of_hash)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by sequences (evictable blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        """How many sequences hold the block."""
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        """The prefix hash a block is cached under, or None."""
        return self._hash_of_block[block_id]

    def take_events(self) -> list[KVEvent]:
        """KV events since the last call, oldest first; the internal list is cleared."""
        events, self._events = self._events, []
        return events

    # --- prefix cache ------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence, num_tokens: int | None = None) -> list[int]:
        """Ids of cached blocks holding ``seq``'s longest cached prefix, in order, looking only
        at blocks wholly inside its first ``num_tokens`` tokens.

        By default (``None``) at least one token is left to compute, as in vLLM: the limit is
        ``len(seq.token_ids) - 1``. So when every block of a prompt is cached and the prompt
        fills its last block exactly, that last block is recomputed into a fresh block (its KV
        would otherwise be written into a block others share). A reservation, whose KV arrives
        by transfer and computes nothing, passes the whole prompt.
        """
        if num_tokens is None:
            num_tokens = len(seq.token_ids) - 1
        num_lookup_blocks = min(num_tokens, len(seq.token_ids)) // self.block_size
        self._ensure_hashes(seq, num_lookup_blocks)
        block_of_hash = self._block_of_hash
        hashes = seq.block_hashes
        block_ids: list[int] = []
        for i in range(num_lookup_blocks):
            block_id = block_of_hash.get(hashes[i])
            if block_id is None:
                break
            block_ids.append(block_id)
        return block_ids

    def num_cached_prefix_blocks(self, block_hashes: SequenceABC[BlockHash]) -> int:
        """How many leading blocks of a prompt (given by its chained hashes) are cached here."""
        block_of_hash = self._block_of_hash
        for i, block_hash in enumerate(block_hashes):
            if block_hash not in block_of_hash:
                return i
        return len(block_hashes)

    def cached_block_hashes(self) -> list[BlockHash]:
        """Every block hash in the prefix cache now (what a router's index should hold)."""
        return list(self._block_of_hash)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register ``seq``'s newly computed full blocks in the prefix cache.

        Call after a step has computed KV (``num_computed_tokens`` advanced). A block whose hash
        is already cached elsewhere (two equal prompts admitted together, or a recomputed last
        block) stays private. Each run of newly cached blocks becomes one ``BlockStored`` whose
        ``parent_hash`` is cached at that moment: if the parent's registered copy was evicted,
        the sequence's own private copies of the missing ancestors are registered first, so a
        router replaying the events never sees a block without its parent.
        """
        bs = self.block_size
        num_full = seq.num_computed_tokens // bs
        start = seq.num_committed_blocks
        if num_full <= start:
            return
        self._ensure_hashes(seq, num_full)
        hashes = seq.block_hashes
        table = seq.block_table
        block_of_hash = self._block_of_hash
        run: list[BlockHash] = []
        run_parent: BlockHash | None = None
        for i in range(start, num_full):
            if hashes[i] in block_of_hash:
                if run:
                    self._events.append(BlockStored(block_hashes=run, parent_hash=run_parent))
                    run = []
                continue
            if not run:
                first = i
                while first > 0 and hashes[first - 1] not in block_of_hash:
                    first -= 1
                run_parent = hashes[first - 1] if first > 0 else None
                for j in range(first, i):
                    self._register(hashes[j], table[j])
                    run.append(hashes[j])
            self._register(hashes[i], table[i])
            run.append(hashes[i])
        if run:
            self._events.append(BlockStored(block_hashes=run, parent_hash=run_parent))
        seq.num_committed_blocks = num_full

    def _register(self, block_hash: BlockHash, block_id: int) -> None:
        self._block_of_hash[block_hash] = block_id
        self._hash_of_block[block_id] = block_hash

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix and emit ``AllBlocksCleared``. Refuses (returns False) while
        any block is in use, since a running sequence's blocks cannot be forgotten safely."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block_id in self._evictable:
            self._hash_of_block[block_id] = None
            self._free_block_ids.append(block_id)
        self._evictable.clear()
        self._block_of_hash.clear()
        self._events.append(AllBlocksCleared())
        return True

    def _ensure_hashes(self, seq: Sequence, num_blocks: int) -> None:
        hashes = seq.block_hashes
        if len(hashes) >= num_blocks:
            return
        bs = self.block_size
        tokens = seq.token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_blocks):
            parent = hash_block_tokens(parent, tokens[i * bs : (i + 1) * bs])
            hashes.append(parent)

    # --- allocation --------------------------------------------------------------------------

    def can_allocate(self, seq: Sequence, cached_block_ids: list[int] | None = None) -> bool:
        """Whether ``allocate`` would succeed: free blocks cover every block the sequence needs,
        less the cached ones already held by others (cached evictable ones still use a free
        slot). ``cached_block_ids`` is ``match_prefix(seq)``'s answer, if already known."""
        if cached_block_ids is None:
            cached_block_ids = self.match_prefix(seq)
        ref_counts = self._ref_counts
        num_shared = sum(1 for block_id in cached_block_ids if ref_counts[block_id] > 0)
        return seq.num_blocks(self.block_size) - num_shared <= self.num_free_blocks

    def allocate(self, seq: Sequence, cached_block_ids: list[int] | None = None) -> None:
        """Give a waiting sequence blocks for all its tokens, reusing its cached prefix.

        Sets ``num_cached_tokens`` and ``num_computed_tokens`` to the prefix hit, so the step
        computes only the rest.
        """
        if seq.block_table:
            raise RuntimeError(f"{seq.request_id} already holds blocks")
        if cached_block_ids is None:
            cached_block_ids = self.match_prefix(seq)
        if not self.can_allocate(seq, cached_block_ids):
            raise RuntimeError(f"not enough free blocks for {seq.request_id}")
        ref_counts = self._ref_counts
        for block_id in cached_block_ids:
            if ref_counts[block_id] == 0:
                del self._evictable[block_id]
            ref_counts[block_id] += 1
        table = list(cached_block_ids)
        removed: list[BlockHash] = []
        for _ in range(seq.num_blocks(self.block_size) - len(table)):
            table.append(self._take_free_block(removed))
        if removed:
            self._events.append(BlockRemoved(block_hashes=removed))
        seq.block_table = table
        seq.num_committed_blocks = len(cached_block_ids)
        seq.num_cached_tokens = seq.num_computed_tokens = len(cached_block_ids) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        """Whether a decode step for ``seq`` has a slot: its last token fits its blocks, or a
        free block is left."""
        return (
            len(seq.block_table) * self.block_size >= len(seq.token_ids) or self.num_free_blocks > 0
        )

    def append_slot(self, seq: Sequence) -> None:
        """Make room for ``seq``'s last token, taking one new block when it starts a block."""
        if len(seq.block_table) * self.block_size >= len(seq.token_ids):
            return
        removed: list[BlockHash] = []
        seq.block_table.append(self._take_free_block(removed))
        if removed:
            self._events.append(BlockRemoved(block_hashes=removed))

    def deallocate(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks. Cached ones become evictable (tail first, so a shared
        prefix outlives its private suffix); the rest become free."""
        ref_counts = self._ref_counts
        hash_of_block = self._hash_of_block
        for block_id in reversed(seq.block_table):
            ref_counts[block_id] -= 1
            if ref_counts[block_id] == 0:
                if hash_of_block[block_id] is None:
                    self._free_block_ids.append(block_id)
                else:
                    self._evictable[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0

    def _take_free_block(self, removed: list[BlockHash]) -> int:
        if self._free_block_ids:
            block_id = self._free_block_ids.popleft()
        elif self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            block_hash = self._hash_of_block[block_id]
            assert block_hash is not None, "evictable blocks are cached"
            del self._block_of_hash[block_hash]
            self._hash_of_block[block_id] = None
            removed.append(block_hash)
        else:
            raise RuntimeError("no free KV block")
        self._ref_counts[block_id] = 1
        return block_id
