"""The frontend's tokenizer: a Hugging Face ``tokenizers`` model plus its config files.

``Tokenizer.load("builtin")`` opens the small byte-level BPE shipped in ``shared/assets/tokenizer``
(built by ``tools/make_tokenizer.py``), so nothing is downloaded; any other argument is a local
directory in Hugging Face layout:

- ``tokenizer.json`` (required)
- ``tokenizer_config.json``: ``chat_template``, ``bos_token``, ``eos_token``, ``model_max_length``
- ``chat_template.jinja``: the chat template, where newer models keep it
- ``generation_config.json``: ``eos_token_id``, an int or a list, added to the eos ids
"""

import json
import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Final, Self

import tokenizers

from shared.errors import InvalidRequest
from shared.tokenizer.byte_level import ByteTable, build_byte_table
from shared.tokenizer.chat_template import ChatTemplate

logger = logging.getLogger(__name__)

BUILTIN: Final = "builtin"

# tokenizer_config.json says "no limit" with a huge number (int(1e30)).
_UNSET_MAX_LENGTH: Final = 10**12


def builtin_dir() -> Traversable:
    """The shipped tokenizer's directory, found as package data of ``shared``."""
    return resources.files("shared").joinpath("assets", "tokenizer")


def _read_json(directory: Traversable, name: str) -> dict[str, object]:
    file = directory.joinpath(name)
    if not file.is_file():
        return {}
    document = json.loads(file.read_text(encoding="utf-8"))
    if not isinstance(document, dict):
        raise ValueError(f"{name} must hold a JSON object, got {type(document).__name__}")
    return document


def _token_content(value: object) -> str | None:
    """A special token from tokenizer_config.json: a string or a serialized AddedToken."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template_source(directory: Traversable, config: Mapping[str, object]) -> str | None:
    jinja_file = directory.joinpath("chat_template.jinja")
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    source = config.get("chat_template")
    if isinstance(source, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
        source = named.get("default")
    return source if isinstance(source, str) else None


def _int_ids(value: object) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, int)]
    return []


class Tokenizer:
    """Text <-> token ids, the chat template and the stop ids of one model.

    Thread-safe. Encoding a long prompt takes milliseconds, so code on an event loop calls
    ``encode`` and ``apply_chat_template`` in a thread (``asyncio.to_thread``).
    """

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
        extra_eos_token_ids: Sequence[int] = (),
        model_max_length: int | None = None,
    ) -> None:
        """Wrap ``hf_tokenizer``; prefer ``Tokenizer.load``, which reads these from config files.

        Truncation and padding are turned off, so ``encode`` always returns every token.
        """
        hf_tokenizer.no_truncation()
        hf_tokenizer.no_padding()
        self.hf_tokenizer: Final = hf_tokenizer
        self._encode_fast = getattr(hf_tokenizer, "encode_batch_fast", None)
        self.bos_token: Final = bos_token
        self.eos_token: Final = eos_token
        self.model_max_length: Final = model_max_length
        self.bos_token_id: Final = self._special_id(bos_token)
        eos_ids = [self._special_id(eos_token), *extra_eos_token_ids]
        self._eos_token_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))
        self._chat_template = (
            ChatTemplate(chat_template, bos_token=bos_token, eos_token=eos_token)
            if chat_template is not None
            else None
        )

    @classmethod
    def load(cls, path_or_builtin: str) -> Self:
        """Load ``"builtin"`` (the shipped tokenizer) or a local Hugging Face model directory."""
        if path_or_builtin == BUILTIN:
            directory: Traversable = builtin_dir()
        else:
            directory = Path(path_or_builtin)
            if not directory.joinpath("tokenizer.json").is_file():
                raise FileNotFoundError(f"no tokenizer.json in {path_or_builtin!r}")
        hf_tokenizer = tokenizers.Tokenizer.from_str(
            directory.joinpath("tokenizer.json").read_text(encoding="utf-8")
        )
        config = _read_json(directory, "tokenizer_config.json")
        generation_config = _read_json(directory, "generation_config.json")
        max_length = config.get("model_max_length")
        tokenizer = cls(
            hf_tokenizer,
            chat_template=_chat_template_source(directory, config),
            bos_token=_token_content(config.get("bos_token")),
            eos_token=_token_content(config.get("eos_token")),
            extra_eos_token_ids=_int_ids(generation_config.get("eos_token_id")),
            model_max_length=(
                int(max_length)
                if isinstance(max_length, int | float) and max_length < _UNSET_MAX_LENGTH
                else None
            ),
        )
        if not tokenizer.eos_token_ids:
            logger.warning(
                "tokenizer has no eos token; output ends at max_tokens path=%s", directory
            )
        return tokenizer

    def _special_id(self, token: str | None) -> int | None:
        return None if token is None else self.hf_tokenizer.token_to_id(token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Ids that end generation: ``eos_token``'s, then generation_config's, without repeats."""
        return list(self._eos_token_ids)

    @cached_property
    def vocab_size(self) -> int:
        """The size of the id space: the largest id (added tokens included) plus one."""
        return max(self.hf_tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def chat_template(self) -> str | None:
        """The chat template's Jinja source, or None when the model has none."""
        return None if self._chat_template is None else self._chat_template.source

    @cached_property
    def byte_table(self) -> ByteTable | None:
        """Token id -> bytes, built on first use; None unless the tokenizer is byte-level."""
        return build_byte_table(self.hf_tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds what the post-processor adds (bos).

        Special tokens written in ``text`` (such as ``<|im_end|>``) encode as themselves.
        Where ``tokenizers`` has it (0.21 on), this goes through ``encode_batch_fast``, which
        leaves out the character offsets nothing here reads: the same ids for about a fifth
        less CPU on a 200-token prompt (a frontend tokenizes every prompt).
        """
        if self._encode_fast is not None:
            ids: list[int] = self._encode_fast([text], add_special_tokens=add_special_tokens)[0].ids
            return ids
        return self.hf_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``token_ids``; invalid UTF-8 becomes U+FFFD and unknown ids are skipped."""
        return self.hf_tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, object]],
        add_generation_prompt: bool = True,
        **template_kwargs: object,
    ) -> str:
        """Render ``messages`` (``role`` and ``content``: a string or text parts) as prompt text.

        The text already holds whatever special tokens the template writes (bos included), so
        encode it with ``add_special_tokens=False``. Raises InvalidRequest when the model has no
        template or the template rejects the messages.
        """
        if self._chat_template is None:
            raise InvalidRequest("this model has no chat template; use the completions API")
        return self._chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs
        )

    @cached_property
    def _word_token_ids(self) -> tuple[int, ...]:
        special_ids = {
            token_id
            for token_id, added in self.hf_tokenizer.get_added_tokens_decoder().items()
            if added.special
        }
        table = self.byte_table
        word_ids: list[int] = []
        for token_id in range(self.vocab_size):
            if token_id in special_ids:
                continue
            if table is not None:
                try:
                    text = table.token_bytes[token_id].decode()
                except UnicodeDecodeError:
                    continue
            else:
                text = self.hf_tokenizer.decode([token_id])
            word = text.removeprefix(" ")
            if word.isalpha():
                word_ids.append(token_id)
        return tuple(word_ids)

    def word_token_ids(self) -> list[int]:
        """Ids whose text is letters, maybe after one space: what a simulated engine may emit.

        Sampling from these gives output that reads like (made-up) words. Computed once.
        """
        return list(self._word_token_ids)
