"""Chained block hashes: the identity of a KV block, shared by engines and routers (pure).

A prompt's blocks hash as a chain (each block's hash covers its parent's), so equal hashes mean
equal prefixes, and a prefix is a path of hashes.
"""

import hashlib
from array import array
from collections.abc import Sequence

from proto.messages import BlockHash


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """The chained hash of one full block: 64 bits of BLAKE2b over the parent's hash (8 bytes,
    little-endian; absent for the first block) then the token ids as little-endian int64s.

    Why BLAKE2b rather than ``hash()``: the router and every worker must compute the same value
    in different processes and across restarts, and ``hash()`` of a tuple mixes in per-build
    constants and is not specified. A first block and a later one can never collide by layout,
    because every full block has the same number of tokens and only later ones carry a parent.
    """
    digest = hashlib.blake2b(digest_size=8)
    if parent_hash is not None:
        digest.update(parent_hash.to_bytes(8, "little"))
    digest.update(array("q", token_ids).tobytes())
    return BlockHash(int.from_bytes(digest.digest(), "little"))


def hash_prompt_blocks(token_ids: Sequence[int], block_size: int) -> list[BlockHash]:
    """The chained hashes of every full block of ``token_ids``."""
    hashes: list[BlockHash] = []
    parent: BlockHash | None = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        hashes.append(parent)
    return hashes
