"""IncrementalDetokenizer: pushes add up to ``decode`` of all ids, and never split a character."""

import random

import pytest
import tokenizers
from tokenizers import decoders, models, normalizers

from shared.tokenizer import IncrementalDetokenizer, Tokenizer
from shared.tokenizer.byte_level import byte_to_char, token_to_bytes


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load("builtin")


def stream(detokenizer: IncrementalDetokenizer, ids: list[int], rng: random.Random) -> list[str]:
    """Push ``ids`` in random-sized chunks (mostly single tokens), then flush."""
    pieces = []
    start = 0
    while start < len(ids):
        size = rng.choice([1, 1, 1, 1, 2, 3, 5])
        pieces.append(detokenizer.push(ids[start : start + size]))
        start += size
    pieces.append(detokenizer.flush())
    return pieces


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_pushes_concatenate_to_decode_on_random_ids(tokenizer, skip_special_tokens):
    rng = random.Random(1234)
    for _ in range(500):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(1, 40))]
        detokenizer = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
        text = "".join(stream(detokenizer, ids, rng))
        assert text == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens), ids


def test_pushes_concatenate_to_decode_on_random_bytes(tokenizer):
    # Byte tokens alone make every kind of broken and overlong UTF-8.
    rng = random.Random(99)
    for _ in range(500):
        ids = [
            4
            + rng.choice([0x41, 0x80, 0xBF, 0xC3, 0xE4, 0xED, 0xF0, 0xF4, 0xFF, rng.randrange(256)])
            for _ in range(rng.randrange(1, 12))
        ]
        text = "".join(stream(IncrementalDetokenizer(tokenizer), ids, rng))
        assert text == tokenizer.decode(ids), ids


@pytest.mark.parametrize(
    "text", ["你好😀 世界", "emoji 👍🏽🇯🇵 done", "naïve привет 日本語", "a\u0301 e\u0308"]
)
def test_multibyte_text_streams_whole_characters_only(tokenizer, text):
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.push([token_id]) for token_id in tokenizer.encode(text)]
    assert "".join(pieces) + detokenizer.flush() == text
    assert not any("\ufffd" in piece for piece in pieces)


def test_character_split_across_tokens_is_held_until_complete(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    # "😀" is F0 9F 98 80: tokens "ðŁ" (F0 9F), "ĺ" (98), "Ģ" (80).
    assert [detokenizer.push([i]) for i in [4984, 5408, 156, 132]] == ["你好", "", "", "😀"]


def test_flush_turns_unfinished_character_into_replacement(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push([4 + 0xE4, 4 + 0xBD]) == ""
    assert detokenizer.flush() == "\ufffd" == tokenizer.decode([4 + 0xE4, 4 + 0xBD])
    assert detokenizer.push([4 + ord("a")]) == "a"  # a flushed stream starts afresh


def test_special_tokens_are_skipped_unless_asked(tokenizer):
    ids = tokenizer.encode("<|im_start|>hi<|im_end|>")
    assert IncrementalDetokenizer(tokenizer).push(ids) == "hi"
    keep = IncrementalDetokenizer(tokenizer, skip_special_tokens=False)
    assert keep.push(ids) == "<|startoftext|><|im_start|>hi<|im_end|>"


def test_unknown_ids_are_skipped_like_decode(tokenizer):
    detokenizer = IncrementalDetokenizer(tokenizer)
    assert detokenizer.push([tokenizer.vocab_size + 7]) == ""
    assert detokenizer.push([-1, 4 + ord("x"), 10**9]) == "x"


def test_byte_table_matches_decode_of_each_token(tokenizer):
    table = tokenizer.byte_table
    assert table is not None
    assert table.num_ids == tokenizer.vocab_size
    for token_id in range(tokenizer.vocab_size):
        expected = tokenizer.decode([token_id], skip_special_tokens=False)
        assert table.token_bytes[token_id].decode(errors="replace") == expected
    assert table.special_ids == {0, 1, 2, 3}
    assert token_to_bytes(byte_to_char()[0x20] + "a") == b" a"


def sentencepiece_like() -> Tokenizer:
    """A Llama-2-style tokenizer: "▁" for spaces and <0xNN> byte-fallback tokens."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += ["▁", "▁Hello", "▁world", "Hello", "!", "▁the", "▁a", "e", "l", "o"]
    model = models.BPE(
        vocab={piece: i for i, piece in enumerate(pieces)},
        merges=[],
        unk_token="<unk>",
        byte_fallback=True,
    )
    hf = tokenizers.Tokenizer(model)
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    hf.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(hf)


def test_non_byte_level_tokenizer_uses_window_decoding():
    tokenizer = sentencepiece_like()
    assert tokenizer.byte_table is None
    detokenizer = IncrementalDetokenizer(tokenizer)
    # "▁Hello" loses its space at the start, "▁world" keeps it; 你 is three byte tokens.
    ids = [1, 260, 261, 3 + 0xE4, 3 + 0xBD, 3 + 0xA0, 263]
    assert [detokenizer.push([i]) for i in ids] == ["", "Hello", " world", "", "", "你", "!"]


def test_window_decoding_concatenates_to_decode_on_random_text():
    # Random ids would not do: ByteFallback turns a whole run of byte tokens into U+FFFD when
    # any of it is invalid, so decode itself is not prefix-stable there. Text is.
    tokenizer = sentencepiece_like()
    rng = random.Random(7)
    words = ["Hello", "world", "the", "a", "!", "lol", "你好", "😀", "é", "\n"]
    for _ in range(300):
        text = " ".join(rng.choice(words) for _ in range(rng.randrange(1, 12)))
        ids = tokenizer.encode(text)
        streamed = "".join(stream(IncrementalDetokenizer(tokenizer), ids, rng))
        assert streamed == tokenizer.decode(ids) == text, ids
