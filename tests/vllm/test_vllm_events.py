"""vLLM's prefix-cache events translated to Baton's block hashes (pure: runs without vLLM)."""

import pytest

from proto.messages import AllBlocksCleared, BlockRemoved, BlockStored
from shared.engine.vllm_events import KVEventTranslator
from shared.kv_hash import hash_prompt_blocks


def test_translator_rehashes_stored_blocks_with_baton_hashes():
    tokens = list(range(100, 164))  # two vLLM blocks of 32, four Baton blocks of 16
    translator = KVEventTranslator(block_size=16, vllm_block_size=32)
    translator.stored([b"v1", b"v2"], None, tokens)
    expected = hash_prompt_blocks(tokens, 16)
    assert translator.take() == [BlockStored(block_hashes=expected, parent_hash=None)]
    assert translator.take() == []
    assert sorted(translator.cached_block_hashes()) == sorted(expected)
    assert translator.num_cached_prefix_blocks(hash_prompt_blocks([*tokens, 1, 2, 3], 16)) == 4


def test_translator_chains_a_later_block_from_its_parent():
    tokens = list(range(64))
    translator = KVEventTranslator(block_size=16, vllm_block_size=32)
    translator.stored([b"v1"], None, tokens[:32])
    translator.stored([b"v2"], b"v1", tokens[32:])
    expected = hash_prompt_blocks(tokens, 16)
    events = translator.take()
    assert events[1] == BlockStored(block_hashes=expected[2:], parent_hash=expected[1])


def test_translator_drops_a_block_whose_parent_it_never_saw():
    translator = KVEventTranslator(block_size=16, vllm_block_size=32)
    translator.stored([b"v2"], b"unknown", list(range(32)))
    assert translator.take() == []
    assert translator.num_unknown_parents == 1


def test_translator_removes_baton_hashes_when_the_last_vllm_copy_goes():
    tokens = list(range(32))
    translator = KVEventTranslator(block_size=16, vllm_block_size=32)
    translator.stored([7], None, tokens)
    translator.stored([7], None, tokens)  # a second block with the same content
    translator.take()
    translator.removed([7])
    assert translator.take() == []
    translator.removed([7, 8])  # 8: never stored
    assert translator.take() == [BlockRemoved(block_hashes=hash_prompt_blocks(tokens, 16))]
    assert translator.cached_block_hashes() == []


def test_translator_clear_forgets_everything():
    translator = KVEventTranslator(block_size=32, vllm_block_size=32)
    translator.stored([1], None, list(range(32)))
    translator.cleared()
    assert translator.take()[-1] == AllBlocksCleared()
    assert translator.cached_block_hashes() == []


def test_translator_refuses_block_sizes_that_do_not_divide():
    with pytest.raises(ValueError, match="multiple"):
        KVEventTranslator(block_size=24, vllm_block_size=32)
    translator = KVEventTranslator(block_size=16, vllm_block_size=32)
    with pytest.raises(ValueError, match="carry"):
        translator.stored([1], None, list(range(16)))
