"""OpenAI response bodies and server-sent events (pure; no I/O).

The per-token event is the hot path: its constant JSON around the text is built once per
request and only the text is encoded per event.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import msgspec

from proto.messages import FinishReason, TokenLogprobs
from services.frontend.tool_calls import ToolCall
from shared.errors import ServingError

Kind = Literal["chat", "completion"]

_json = msgspec.json.Encoder()
DONE = b"data: [DONE]\n\n"

FINISH_REASONS: dict[FinishReason, str] = {
    FinishReason.STOP: "stop",
    FinishReason.LENGTH: "length",
    FinishReason.ABORT: "abort",
    FinishReason.ERROR: "error",
    FinishReason.SHED: "error",  # never rendered: a shed request is answered with a 429
}


def error_body(
    error: ServingError, param: str | None = None, code: str | int | None = None
) -> dict[str, Any]:
    """The OpenAI error object for an error; ``code`` defaults to the HTTP status."""
    return {
        "error": {
            "message": error.message,
            "type": error.openai_type,
            "param": param,
            "code": error.http_status if code is None else code,
        }
    }


def usage(
    num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int
) -> dict[str, Any]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
        "prompt_tokens_details": {"cached_tokens": num_cached_tokens},
    }


class LogprobsRenderer:
    """OpenAI ``logprobs`` objects for one choice's tokens. ``token_bytes`` gives a token's
    own bytes: they are ``bytes``, and its text is their UTF-8 decoding (a token that is part
    of a multi-byte character reads as a replacement character, as in OpenAI's)."""

    def __init__(self, kind: Kind, token_bytes: Callable[[int], bytes]) -> None:
        self.kind = kind
        self.token_bytes = token_bytes
        self.text_offset = 0  # completions: where the next token's text starts

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def _entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.token_bytes(token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    def render(self, token_ids: Sequence[int], reports: Sequence[TokenLogprobs]) -> dict[str, Any]:
        """The ``logprobs`` object of these tokens (one report each)."""
        if self.kind == "chat":
            content = []
            for token_id, report in zip(token_ids, reports, strict=True):
                entry = self._entry(token_id, report.logprob)
                entry["top_logprobs"] = [self._entry(t, lp) for t, lp in report.top]
                content.append(entry)
            return {"content": content}
        tokens: list[str] = []
        offsets: list[int] = []
        for token_id in token_ids:
            text = self.token_text(token_id)
            tokens.append(text)
            offsets.append(self.text_offset)
            self.text_offset += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [r.logprob for r in reports],
            "top_logprobs": [{self.token_text(t): lp for t, lp in r.top} for r in reports],
            "text_offset": offsets,
        }


def merge_logprobs(kind: Kind, parts: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """One choice's ``logprobs`` objects, rendered piece by piece, as one (non-streaming)."""
    if not parts:
        return None
    if kind == "chat":
        return {"content": [entry for part in parts for entry in part["content"]]}
    return {key: [item for part in parts for item in part[key]] for key in parts[0]}


@dataclass(frozen=True, slots=True)
class Choice:
    """One choice of a whole (non-streaming) response."""

    text: str
    finish_reason: str
    logprobs: dict[str, Any] | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)


# What follows a text event's content, by kind and by whether usage is streamed: the same
# bytes for every stream, so shared rather than kept by each.
_TEXT_SUFFIXES: dict[tuple[Kind, bool], bytes] = {
    (kind, include_usage): (b"}" if kind == "chat" else b"")
    + b',"logprobs":null,"finish_reason":null}]'
    + (b',"usage":null}\n\n' if include_usage else b"}\n\n")
    for kind in get_args(Kind)
    for include_usage in (False, True)
}


class Renderer:
    """Builds one request's response bodies and events. It lives as long as the stream, so
    it keeps only what cannot be shared: the request's id, time and model, and the prefix of
    its text events (the hot path)."""

    __slots__ = (
        "_text_prefix",
        "_text_suffix",
        "created",
        "include_usage",
        "kind",
        "model",
        "request_id",
    )

    def __init__(self, kind: Kind, request_id: str, model: str, *, include_usage: bool) -> None:
        self.kind: Kind = kind
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        head_json = _json.encode(self._head())[:-1]  # without the closing brace
        if kind == "chat":
            self._text_prefix = (
                b"data: " + head_json + b',"choices":[{"index":0,"delta":{"content":'
            )
        else:
            self._text_prefix = b"data: " + head_json + b',"choices":[{"index":0,"text":'
        self._text_suffix = _TEXT_SUFFIXES[kind, include_usage]

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.request_id

    def _head(self) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": "chat.completion.chunk" if self.kind == "chat" else "text_completion",
            "created": self.created,
            "model": self.model,
        }

    def _event(self, body: dict[str, Any]) -> bytes:
        return b"data: " + _json.encode(body) + b"\n\n"

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = self._head()
        body["choices"] = [choice] if choice else []
        if self.include_usage:
            body["usage"] = None
        return body

    def first_event(self, num_choices: int = 1) -> bytes:
        """Chat streams open with the assistant role (per choice); text completions send
        nothing first."""
        if self.kind != "chat":
            return b""
        return b"".join(
            self._event(
                self._chunk(
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                )
            )
            for index in range(num_choices)
        )

    def text_event(
        self, text: str, index: int = 0, logprobs: dict[str, Any] | None = None
    ) -> bytes:
        if index == 0 and logprobs is None:  # the hot path: one choice, no logprobs
            return self._text_prefix + _json.encode(text) + self._text_suffix
        if self.kind == "chat":
            choice: dict[str, Any] = {"index": index, "delta": {"content": text}}
        else:
            choice = {"index": index, "text": text}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = None
        return self._event(self._chunk(choice))

    def tool_calls_event(self, index: int, calls: Sequence[tuple[int, ToolCall]]) -> bytes:
        """A chat delta with whole tool calls (each numbered within its choice)."""
        delta = {"tool_calls": [call.as_openai(number) for number, call in calls]}
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        return self._event(self._chunk(choice))

    def finish_event(self, finish_reason: str, index: int = 0) -> bytes:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason}
        return self._event(self._chunk(choice))

    def usage_event(self, usage_body: dict[str, Any]) -> bytes:
        body = self._head()
        body["choices"] = []
        body["usage"] = usage_body
        return self._event(body)

    def error_event(self, error: ServingError) -> bytes:
        return self._event(error_body(error))

    def full_response(self, choices: Sequence[Choice], usage_body: dict[str, Any]) -> bytes:
        """The body of a non-streaming response."""
        rendered: list[dict[str, Any]] = []
        for index, choice in enumerate(choices):
            if self.kind == "chat":
                message: dict[str, Any] = {"role": "assistant", "content": choice.text}
                if choice.tool_calls:
                    message["content"] = choice.text if choice.text.strip() else None
                    message["tool_calls"] = [call.as_openai() for call in choice.tool_calls]
                rendered.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": choice.logprobs,
                        "finish_reason": choice.finish_reason,
                    }
                )
            else:
                rendered.append(
                    {
                        "index": index,
                        "text": choice.text,
                        "logprobs": choice.logprobs,
                        "finish_reason": choice.finish_reason,
                    }
                )
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return _json.encode(
            {
                "id": self.response_id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": rendered,
                "usage": usage_body,
            }
        )
