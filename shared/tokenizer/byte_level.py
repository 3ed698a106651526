"""The byte-level BPE alphabet, and each token's bytes for fast detokenization.

Byte-level BPE tokenizers (GPT-2, Llama 3, Qwen) spell every byte as one printable character so
that a vocabulary of strings can hold arbitrary bytes: printable Latin-1 bytes stand for
themselves and the other 68 bytes are moved to code points from U+0100 up, in byte order (so a
space is ``Ġ`` and a newline ``Ċ``). Undoing that map per token gives a table from token id to
bytes, which turns streaming detokenization into a list lookup and an incremental UTF-8 decode.
"""

from dataclasses import dataclass
from functools import cache

import tokenizers
from tokenizers import decoders


@cache
def byte_to_char() -> tuple[str, ...]:
    """The byte-level alphabet: entry ``b`` is the character that spells byte ``b``."""
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    chars: list[str] = []
    num_moved = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + num_moved))
            num_moved += 1
    return tuple(chars)


@cache
def char_to_byte() -> dict[str, int]:
    """The inverse of ``byte_to_char``: alphabet character -> byte."""
    return {char: byte for byte, char in enumerate(byte_to_char())}


def token_to_bytes(token: str) -> bytes:
    """The bytes a byte-level token stands for.

    A token with a character outside the alphabet (an added token such as ``<|im_end|>`` can be
    any text) stands for its own UTF-8 encoding, as in the ``tokenizers`` ByteLevel decoder.
    """
    table = char_to_byte()
    try:
        return bytes([table[char] for char in token])
    except KeyError:
        return token.encode()


@dataclass(frozen=True, slots=True)
class ByteTable:
    """Token id -> bytes for one byte-level tokenizer, built once and shared by every stream.

    ``text_bytes`` maps special tokens to ``b""`` (what ``decode(skip_special_tokens=True)``
    shows); ``token_bytes`` maps them to their content. Ids the tokenizer does not use map to
    ``b""`` in both, as ``decode`` skips them.
    """

    token_bytes: tuple[bytes, ...]
    text_bytes: tuple[bytes, ...]
    special_ids: frozenset[int]

    @property
    def num_ids(self) -> int:
        """Length of both tables: the largest token id plus one."""
        return len(self.token_bytes)


def is_byte_level(hf_tokenizer: tokenizers.Tokenizer) -> bool:
    """Whether ``hf_tokenizer`` decodes with the ByteLevel decoder alone (ByteTable is exact)."""
    return isinstance(hf_tokenizer.decoder, decoders.ByteLevel)


def build_byte_table(hf_tokenizer: tokenizers.Tokenizer) -> ByteTable | None:
    """Each token's bytes, or None when the tokenizer is not byte-level."""
    if not is_byte_level(hf_tokenizer):
        return None
    vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
    num_ids = max(vocab.values(), default=-1) + 1
    token_bytes = [b""] * num_ids
    for token, token_id in vocab.items():
        token_bytes[token_id] = token_to_bytes(token)
    special_ids = frozenset(
        token_id
        for token_id, added in hf_tokenizer.get_added_tokens_decoder().items()
        if added.special
    )
    text_bytes = list(token_bytes)
    for token_id in special_ids:
        text_bytes[token_id] = b""
    return ByteTable(
        token_bytes=tuple(token_bytes), text_bytes=tuple(text_bytes), special_ids=special_ids
    )
