"""vLLM's prefix-cache events in Baton's terms: block hashes the router can match (pure).

vLLM names a cached block by its own hash (over its own key layout, maybe salted per process),
so a router that hashes prompts with ``shared.kv_hash`` could never match it. Each vLLM
``BlockStored`` event, though, carries the token ids of the blocks it stores, so this module
hashes them again with ``hash_block_tokens``, chained from the parent block's Baton hash, and
remembers which Baton hashes each vLLM hash stands for, so that a later ``BlockRemoved`` (which
carries vLLM hashes only) can name the same blocks.

vLLM's block may be larger than Baton's (vLLM on CPU wants multiples of 32 tokens; Baton's
router hashes 16-token blocks by default): a vLLM block of ``ratio * block_size`` tokens is
``ratio`` Baton blocks, stored and removed together. Since whole vLLM blocks come and go, a
router sees only prefixes vLLM can really reuse.

Nothing here imports vLLM: the adapter feeds plain values in (``VllmKVEvents`` in
``shared.engine.vllm_build`` does), so the translation is tested without it.
"""

import logging
from collections.abc import Hashable, Sequence

from proto.messages import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, KVEvent
from shared.kv_hash import hash_block_tokens

logger = logging.getLogger(__name__)

VllmBlockHash = Hashable  # bytes or int, as vLLM publishes it


class KVEventTranslator:
    """Turns vLLM's stored/removed/cleared events into Baton ``KVEvent``s, and knows the Baton
    hashes of every block vLLM caches now (``cached_block_hashes``)."""

    def __init__(self, block_size: int, vllm_block_size: int) -> None:
        if block_size < 1 or vllm_block_size % block_size:
            raise ValueError(
                f"vLLM's block size ({vllm_block_size}) must be a multiple of "
                f"Baton's ({block_size})"
            )
        self.block_size = block_size
        self.vllm_block_size = vllm_block_size
        # vLLM hash -> (the Baton hashes of its sub-blocks, how many vLLM blocks hold it)
        self._blocks: dict[VllmBlockHash, tuple[list[BlockHash], int]] = {}
        self._cached: set[BlockHash] = set()
        self._events: list[KVEvent] = []
        self.num_unknown_parents = 0  # stored events dropped: their parent was never seen

    def stored(
        self,
        block_hashes: Sequence[VllmBlockHash],
        parent_hash: VllmBlockHash | None,
        token_ids: Sequence[int],
    ) -> None:
        """vLLM cached ``block_hashes`` (full blocks, in prefix order) holding ``token_ids``
        after the block ``parent_hash`` (None: they start the sequence)."""
        parent: BlockHash | None = None
        if parent_hash is not None:
            known = self._blocks.get(parent_hash)
            if known is None:
                # Its prefix is not in our view: Baton's chain cannot be computed. The router
                # never needs it (it matches prefixes from the first block on).
                self.num_unknown_parents += 1
                logger.debug("kv event dropped: unknown parent block")
                return
            parent = known[0][-1]
        size = self.vllm_block_size
        if len(token_ids) != size * len(block_hashes):
            raise ValueError(
                f"{len(block_hashes)} blocks of {size} tokens carry {len(token_ids)} token ids"
            )
        first_parent = parent
        new: list[BlockHash] = []
        for i, vllm_hash in enumerate(block_hashes):
            block_tokens = token_ids[i * size : (i + 1) * size]
            subs: list[BlockHash] = []
            for start in range(0, size, self.block_size):
                parent = hash_block_tokens(parent, block_tokens[start : start + self.block_size])
                subs.append(parent)
            known = self._blocks.get(vllm_hash)
            self._blocks[vllm_hash] = (subs, known[1] + 1 if known is not None else 1)
            self._cached.update(subs)
            new.extend(subs)
        self._events.append(BlockStored(block_hashes=new, parent_hash=first_parent))

    def removed(self, block_hashes: Sequence[VllmBlockHash]) -> None:
        """vLLM evicted these blocks; a Baton hash goes once no vLLM block holds it."""
        gone: list[BlockHash] = []
        for vllm_hash in block_hashes:
            known = self._blocks.get(vllm_hash)
            if known is None:
                continue
            subs, count = known
            if count > 1:
                self._blocks[vllm_hash] = (subs, count - 1)
                continue
            del self._blocks[vllm_hash]
            self._cached.difference_update(subs)
            gone.extend(subs)
        if gone:
            self._events.append(BlockRemoved(block_hashes=gone))

    def cleared(self) -> None:
        """vLLM dropped its whole prefix cache."""
        self._blocks.clear()
        self._cached.clear()
        self._events.append(AllBlocksCleared())

    def take(self) -> list[KVEvent]:
        """Events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def cached_block_hashes(self) -> list[BlockHash]:
        """The Baton hash of every block vLLM caches now (as of its last event)."""
        return list(self._cached)

    def num_cached_prefix_blocks(self, hashes: Sequence[BlockHash]) -> int:
        """How many of ``hashes`` (a prompt's chain) are cached, counting from the first."""
        for i, block_hash in enumerate(hashes):
            if block_hash not in self._cached:
                return i
        return len(hashes)
