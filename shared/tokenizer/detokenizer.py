"""Incremental detokenization: token ids in, only the new complete text out, per stream.

For byte-level tokenizers, a push is a lookup in the tokenizer's token -> bytes table (built
once per tokenizer) and a call to Python's incremental UTF-8 decoder, which holds back the bytes
of a character split across tokens until it is complete. Other tokenizers (SentencePiece-style,
with byte fallback) decode a short window of recent ids and emit what grew, as vLLM does.

For byte-level tokenizers the concatenated output of ``push`` calls and ``flush`` equals
``tokenizer.decode(all_ids)`` for any ids: invalid UTF-8 becomes U+FFFD just as there, and
unknown ids are skipped. The fallback matches ``decode`` wherever ``decode`` is prefix-stable,
which holds for valid text (ByteFallback turns a whole run of byte tokens into U+FFFD when any
byte of it is invalid, so a broken run can differ).
"""

import codecs
from collections.abc import Sequence

from shared.tokenizer.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class _WindowDecoder:
    """Fallback for non-byte-level tokenizers: decode a window of ids and emit what grew.

    The window starts one emitted chunk back, so tokenizers that drop the leading space of the
    first token still spell later tokens' spaces right; text ending in U+FFFD (an unfinished
    character) waits for more ids.
    """

    __slots__ = ("_hf_tokenizer", "_num_read", "_skip_special_tokens", "_window")

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool) -> None:
        self._hf_tokenizer = tokenizer.hf_tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._window: list[int] = []  # ids from the start of the last emitted chunk
        self._num_read = 0  # ids of the window whose text has been emitted

    def _new_text(self) -> str:
        decode = self._hf_tokenizer.decode
        skip = self._skip_special_tokens
        read_text = decode(self._window[: self._num_read], skip_special_tokens=skip)
        text = decode(self._window, skip_special_tokens=skip)
        return text[len(read_text) :]

    def push(self, token_ids: Sequence[int]) -> str:
        self._window.extend(token_ids)
        new_text = self._new_text()
        if not new_text or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        del self._window[: self._num_read]
        self._num_read = len(self._window)
        return new_text

    def flush(self) -> str:
        new_text = self._new_text()
        self._window.clear()
        self._num_read = 0
        return new_text


class IncrementalDetokenizer:
    """Turns one stream's token ids into text as they arrive; one instance per stream.

    ``push`` never returns part of a character: the bytes of a character split across tokens
    are held until it is complete. ``flush`` returns what is held (as U+FFFD when it never
    completed) and resets the stream. Special tokens are left out unless
    ``skip_special_tokens=False``. Ids the tokenizer does not have are skipped.
    """

    # It lives as long as its stream: it keeps the decoder, not its bound ``decode`` (64 bytes
    # more), and the table's length is read when needed, not kept as an int of its own.
    __slots__ = ("_decoder", "_table", "_window_decoder")

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True) -> None:
        """Start a stream; the tokenizer's byte table is built on the first stream, then shared."""
        byte_table = tokenizer.byte_table
        self._window_decoder: _WindowDecoder | None = None
        self._table: Sequence[bytes] = ()
        if byte_table is None:
            self._window_decoder = _WindowDecoder(tokenizer, skip_special_tokens)
        elif skip_special_tokens:
            self._table = byte_table.text_bytes
        else:
            self._table = byte_table.token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: Sequence[int]) -> str:
        """Add ``token_ids``; return the text they complete (often all of it, maybe ``""``)."""
        if self._window_decoder is not None:
            return self._window_decoder.push(token_ids)
        table = self._table
        num_ids = len(table)
        if len(token_ids) == 1:
            token_id = token_ids[0]
            return self._decoder.decode(table[token_id] if 0 <= token_id < num_ids else b"")
        data = b"".join([table[i] if 0 <= i < num_ids else b"" for i in token_ids])
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End the stream: return the held text, with U+FFFD for an unfinished character."""
        if self._window_decoder is not None:
            return self._window_decoder.flush()
        return self._decoder.decode(b"", True)
