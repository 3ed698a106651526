"""OpenAI response bodies and server-sent events (pure; no I/O).

The per-token event is the hot path: its constant JSON around the text is built once per
request and only the text is encoded per event.
"""

import time
from typing import Any, Literal

import msgspec

from proto.messages import FinishReason
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


class Renderer:
    """Builds one request's response bodies and events."""

    def __init__(self, kind: Kind, request_id: str, model: str, *, include_usage: bool) -> None:
        self.kind = kind
        self.response_id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        head: dict[str, Any] = {
            "id": self.response_id,
            "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": self.created,
            "model": model,
        }
        self._head = head
        head_json = _json.encode(head)[:-1]  # without the closing brace
        tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        if kind == "chat":
            self._text_prefix = (
                b"data: " + head_json + b',"choices":[{"index":0,"delta":{"content":'
            )
            self._text_suffix = b'},"logprobs":null,"finish_reason":null}]' + tail
        else:
            self._text_prefix = b"data: " + head_json + b',"choices":[{"index":0,"text":'
            self._text_suffix = b',"logprobs":null,"finish_reason":null}]' + tail

    def _event(self, body: dict[str, Any]) -> bytes:
        return b"data: " + _json.encode(body) + b"\n\n"

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        body = dict(self._head)
        body["choices"] = [choice] if choice else []
        if self.include_usage:
            body["usage"] = None
        return body

    def first_event(self) -> bytes:
        """Chat streams open with the assistant role; text completions send nothing first."""
        if self.kind != "chat":
            return b""
        return self._event(
            self._chunk(
                {
                    "index": 0,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
        )

    def text_event(self, text: str) -> bytes:
        return self._text_prefix + _json.encode(text) + self._text_suffix

    def finish_event(self, finish_reason: str) -> bytes:
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "delta": {},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
        return self._event(self._chunk(choice))

    def usage_event(self, usage_body: dict[str, Any]) -> bytes:
        body = dict(self._head)
        body["choices"] = []
        body["usage"] = usage_body
        return self._event(body)

    def error_event(self, error: ServingError) -> bytes:
        return self._event(error_body(error))

    def full_response(self, text: str, finish_reason: str, usage_body: dict[str, Any]) -> bytes:
        """The body of a non-streaming response."""
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return _json.encode(
            {
                "id": self.response_id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [choice],
                "usage": usage_body,
            }
        )
