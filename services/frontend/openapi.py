"""The frontend's OpenAPI 3.1 description, served at ``GET /openapi.json`` (pure).

Request bodies come from the msgspec types the handlers decode with
(``msgspec.json.schema_components``), so the description cannot drift from what is accepted.
Responses are declared here as msgspec types too: render.py builds its bodies by hand for
speed, and the fuzz test (tests/e2e/test_http_fuzz.py) checks every answer against these.
"""

from typing import Any, Literal

import msgspec

from services.frontend.openai_types import ChatCompletionRequest, CompletionRequest


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | int | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every 4xx and 5xx answer, as OpenAI shapes it."""

    error: ErrorDetail


class PromptTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CalledFunction(msgspec.Struct, kw_only=True):
    name: str
    arguments: str


class ResponseToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] = []


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenLogprob]


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(msgspec.Struct, kw_only=True):
    """A whole chat completion (``stream`` false)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class TextChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    logprobs: TextLogprobs | None
    finish_reason: str


class TextCompletion(msgspec.Struct, kw_only=True):
    """A whole text completion (``stream`` false)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[Model]


class Health(msgspec.Struct, kw_only=True):
    status: str


class Readiness(msgspec.Struct, kw_only=True):
    ready: bool
    workers: int
    frontend_id: str = ""


_REF = "#/components/schemas/{name}"
_TYPES: tuple[type, ...] = (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ChatCompletion,
    TextCompletion,
    ModelList,
    Health,
    Readiness,
)
_ERRORS = {
    400: "invalid request: bad JSON, a wrong type, a value out of range, over a limit",
    401: "missing or wrong API key (only when the server has API keys)",
    404: "unknown model, or no such endpoint",
    413: "request body larger than --max-body-bytes",
    429: "shed: no worker can meet the request's objectives now (see Retry-After)",
    431: "request headers larger than --max-header-bytes",
    500: "internal error",
    503: "overloaded or unavailable (see Retry-After)",
    504: "deadline exceeded",
}
# One server-sent event (OpenAPI before 3.2 has ``schema`` describe each event of a stream).
_STREAM = {
    "text/event-stream": {
        "schema": {
            "type": "object",
            "properties": {
                "data": {
                    "type": "string",
                    "description": "a completion chunk (JSON), an error object, and [DONE] last",
                }
            },
            "required": ["data"],
        }
    }
}
_PRIORITY_HEADERS = [
    {
        "name": "X-Baton-Priority",
        "in": "header",
        "required": False,
        "description": "lower is served first and shed last; overrides the body's priority",
        "schema": {
            "anyOf": [
                {"type": "integer", "minimum": -1_000_000, "maximum": 1_000_000},
                {"enum": ["high", "normal", "low"]},
            ]
        },
    },
    *(
        {
            "name": name,
            "in": "header",
            "required": False,
            "description": "tighten the server's objective for this request (milliseconds)",
            "schema": {"type": "number", "exclusiveMinimum": 0},
        }
        for name in ("X-Baton-SLO-TTFT-Ms", "X-Baton-SLO-TPOT-Ms")
    ),
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(name=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(s): _json("ErrorResponse", _ERRORS[s]) for s in statuses}


def _completion(request: str, response: str, summary: str) -> dict[str, Any]:
    ok = _json(response, "the completion; with stream true, server-sent events instead")
    ok["content"].update(_STREAM)
    return {
        "post": {
            "summary": summary,
            "parameters": _PRIORITY_HEADERS,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request)}},
            },
            "responses": {"200": ok, **_errors(400, 401, 404, 413, 429, 431, 500, 503, 504)},
        }
    }


def _get(summary: str, responses: dict[str, Any], *, is_open: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": summary,
        "responses": {**responses, **_errors(*((431, 500) if is_open else (401, 431, 500)))},
    }
    if is_open:
        operation["security"] = []  # no key needed, even when the server has keys
    return {"get": operation}


def openapi_document(*, has_api_keys: bool, is_metrics_open: bool) -> dict[str, Any]:
    """The description of this server as configured: with API keys, every operation but the
    open ones requires ``Authorization: Bearer``."""
    _, schemas = msgspec.json.schema_components(_TYPES, ref_template=_REF)
    metrics_text = {
        "description": "Prometheus text exposition",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    paths = {
        "/health": _get("alive", {"200": _json("Health", "the process is up")}, is_open=True),
        "/ready": _get(
            "ready to serve: connected, not draining, with the number of workers",
            {
                "200": _json("Readiness", "ready"),
                "503": _json("Readiness", "not ready (starting or draining)"),
            },
            is_open=True,
        ),
        "/metrics": _get("Prometheus metrics", {"200": metrics_text}, is_open=is_metrics_open),
        "/openapi.json": _get(
            "this description",
            {"200": {"description": "OpenAPI 3.1", "content": {"application/json": {}}}},
            is_open=True,
        ),
        "/v1/models": _get(
            "the models served", {"200": _json("ModelList", "the models")}, is_open=False
        ),
        "/v1/chat/completions": _completion(
            "ChatCompletionRequest", "ChatCompletion", "create a chat completion"
        ),
        "/v1/completions": _completion(
            "CompletionRequest", "TextCompletion", "create a text completion"
        ),
    }
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "Baton frontend",
            "version": "1",
            "description": "OpenAI-compatible API of Baton (docs/security.md#http for limits).",
        },
        "paths": paths,
        "components": {"schemas": schemas},
    }
    if has_api_keys:
        document["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        document["security"] = [{"bearer": []}]
    return document
