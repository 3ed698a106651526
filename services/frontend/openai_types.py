"""OpenAI-compatible request bodies, validated on decode, and their mapping to SamplingParams.

msgspec checks types as it parses, so ``{"max_tokens": "ten"}`` fails with
"Expected `int | null`, got `str` - at `$.max_tokens`" before any handler logic runs.
Unknown fields are ignored (clients send many we do not use); fields we cannot honour with a
value other than their default are refused, never silently dropped.
"""

from collections.abc import Collection
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from proto.messages import (
    FEATURE_LOGIT_BIAS,
    FEATURE_LOGPROBS,
    FEATURE_PENALTIES,
    FEATURE_STRUCTURED_OUTPUTS,
    SamplingParams,
)
from shared.errors import InvalidRequest

MAX_STOP_STRINGS = 16
MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries


class FieldError(InvalidRequest):
    """An invalid request blamed on one field, which the OpenAI error names in ``param``."""

    def __init__(self, message: str, *, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLimits:
    """Bounds on one completion request's body, checked before any tokenizing."""

    max_messages: int = 2048
    max_prompt_chars: int = 1_000_000
    max_stop_strings: int = MAX_STOP_STRINGS


# Ranges msgspec checks on decode; they also go into the OpenAPI description (openapi.py).
PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]
Bias = Annotated[float, Meta(ge=-100.0, le=100.0)]
TopLogprobs = Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)]
Priority = Annotated[int, Meta(ge=-1_000_000, le=1_000_000)]
Milliseconds = Annotated[float, Meta(gt=0.0, le=86_400_000.0)]
TokenId = Annotated[int, Meta(ge=0)]


class ContentPart(msgspec.Struct, frozen=True, kw_only=True):
    type: str
    text: str | None = None


class CalledFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    arguments: str


class MessageToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """A tool call an earlier assistant turn made (sent back by the client)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant turn's
    tool_call_id: str | None = None  # a tool turn's: the call it answers


class StreamOptions(msgspec.Struct, frozen=True, kw_only=True):
    include_usage: bool = False


class ResponseFormat(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ToolFunction(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(msgspec.Struct, frozen=True, kw_only=True):
    type: Literal["function"]
    function: ToolFunction


class SamplingFields(msgspec.Struct, frozen=True, kw_only=True):
    """The fields chat and text completions share."""

    model: str
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    best_of: Annotated[int, Meta(ge=1, le=MAX_N, description="only equal to n")] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0)] = 0
    user: str | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: (
        Annotated[dict[str, Bias], Meta(max_length=MAX_LOGIT_BIAS, description="token id -> bias")]
        | None
    ) = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extensions
    repetition_penalty: RepetitionPenalty | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=MAX_STOP_STRINGS * 4)] | None = None

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives to report per output token (0: the chosen token's only); None: none."""
        return None

    # Baton's extensions (docs/admission.md): lower priority is served first and shed last
    # (vLLM's convention); objectives may only tighten the server's.
    priority: Priority = 0
    slo_ttft_ms: Milliseconds | None = None
    slo_tpot_ms: Milliseconds | None = None


class ChatCompletionRequest(SamplingFields, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None

    @property
    def num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs:
                raise FieldError("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0


class CompletionRequest(SamplingFields, frozen=True, kw_only=True):
    prompt: (
        Annotated[str, Meta(min_length=1)]
        | Annotated[list[TokenId | str | list[TokenId]], Meta(min_length=1)]
    )
    echo: bool = False
    logprobs: TopLogprobs | None = None
    suffix: str | None = None

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


chat_decoder = msgspec.json.Decoder(ChatCompletionRequest)
completion_decoder = msgspec.json.Decoder(CompletionRequest)


def chat_messages(request: ChatCompletionRequest) -> list[dict[str, object]]:
    """Messages as the plain dicts a chat template expects, text parts joined (tool calls and
    names passed on for templates that render them)."""
    if not request.messages:
        raise InvalidRequest("messages must hold at least one message")
    out = []
    for i, message in enumerate(request.messages):
        if message.content is None:
            text = ""
        elif isinstance(message.content, str):
            text = message.content
        else:
            parts = []
            for part in message.content:
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(
                        f"messages[{i}].content: only text parts are supported, got {part.type!r}"
                    )
                parts.append(part.text)
            text = "".join(parts)
        entry: dict[str, object] = {"role": message.role, "content": text}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = msgspec.to_builtins(message.tool_calls)
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


def uses_tools(request: SamplingFields) -> bool:
    """Whether the model is offered tools: they go into its prompt and its output is read for
    calls (``tool_choice`` "none": neither)."""
    return (
        isinstance(request, ChatCompletionRequest)
        and bool(request.tools)
        and request.tool_choice != "none"
    )


def check_tools(request: SamplingFields, chat_template: str | None) -> None:
    """Refuse tools a model cannot be offered: a template that never renders ``tools`` would
    drop them silently, and forcing a call ("required", or a named function) needs
    constrained decoding, which no engine here has."""
    if not isinstance(request, ChatCompletionRequest):
        if request.tools or request.tool_choice is not None:
            raise FieldError("tools are for chat completions", param="tools")
        return
    choice = request.tool_choice
    if choice not in (None, "none", "auto"):
        if not request.tools:
            raise FieldError("tool_choice needs tools", param="tool_choice")
        raise FieldError(
            'tool_choice: only "auto" and "none" are supported (forcing a call needs '
            "constrained decoding)",
            param="tool_choice",
        )
    if uses_tools(request) and (chat_template is None or "tools" not in chat_template):
        raise FieldError("tools: this model's chat template does not render tools", param="tools")


def completion_prompt(request: CompletionRequest) -> str | list[int]:
    """The one prompt of a text completion: a string or a list of token ids."""
    if request.echo:
        raise FieldError("echo is not supported", param="echo")
    if request.suffix:
        raise FieldError("suffix is not supported", param="suffix")
    prompt = request.prompt
    if isinstance(prompt, str):
        return prompt
    if not prompt:
        raise InvalidRequest("prompt must not be empty")
    ids = [p for p in prompt if isinstance(p, int)]
    if len(ids) == len(prompt):
        return ids
    if len(prompt) == 1 and not isinstance(prompt[0], int):
        return prompt[0]
    if ids:
        raise InvalidRequest("prompt: a list must hold only token ids, or prompts")
    raise InvalidRequest(f"prompt: one prompt per request is supported, got {len(prompt)}")


def stop_strings(
    stop: str | list[str] | None, max_stop_strings: int = MAX_STOP_STRINGS
) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if len(stops) > max_stop_strings:
        raise FieldError(
            f"stop: at most {max_stop_strings} strings, got {len(stops)}", param="stop"
        )
    if any(not s for s in stops):
        raise InvalidRequest("stop: strings must not be empty")
    return stops


def _prompt_chars(request: SamplingFields) -> int:
    """Characters of text in the prompt (token ids count none: the context bounds them)."""
    if isinstance(request, CompletionRequest):
        prompt = request.prompt
        if isinstance(prompt, str):
            return len(prompt)
        if isinstance(prompt[0], int):
            # Token ids (the schema's lists are never empty). Only a list of ids is a valid
            # list starting with one: ``completion_prompt`` refuses any other before it is
            # tokenized, so it is not read element by element here, on every request.
            return 0
        return sum(len(p) for p in prompt if isinstance(p, str))
    assert isinstance(request, ChatCompletionRequest)
    size = 0
    for message in request.messages:
        if isinstance(message.content, str):
            size += len(message.content)
        elif message.content is not None:
            size += sum(len(part.text or "") for part in message.content)
    return size


def check_limits(request: SamplingFields, limits: RequestLimits) -> None:
    """Refuse a request past the server's limits, cheaply, before it is tokenized."""
    if isinstance(request, ChatCompletionRequest) and len(request.messages) > limits.max_messages:
        raise FieldError(
            f"messages: at most {limits.max_messages} messages, got {len(request.messages)}",
            param="messages",
        )
    num_chars = _prompt_chars(request)
    if num_chars > limits.max_prompt_chars:
        raise FieldError(
            f"the prompt has {num_chars} characters; the limit is {limits.max_prompt_chars}",
            param="messages" if isinstance(request, ChatCompletionRequest) else "prompt",
        )
    stop_strings(request.stop, limits.max_stop_strings)
    if request.best_of is not None and request.best_of != request.n:
        raise FieldError(
            f"best_of: only equal to n ({request.n}) is supported, got {request.best_of}",
            param="best_of",
        )


def check_features(request: SamplingFields, model: str, features: Collection[str]) -> None:
    """Refuse (400) a field whose model's engine cannot honour it, rather than ignore it."""

    def need(feature: str, param: str, what: str) -> None:
        if feature not in features:
            engines = ", ".join(sorted(features)) or "none"
            raise FieldError(
                f"{what} is not supported by the engine serving {model!r} "
                f"(its features: {engines})",
                param=param,
            )

    if request.num_logprobs is not None:
        need(FEATURE_LOGPROBS, "logprobs", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(request, name):
            need(FEATURE_PENALTIES, name, name)
    if request.repetition_penalty not in (None, 1.0):
        need(FEATURE_PENALTIES, "repetition_penalty", "repetition_penalty")
    if request.logit_bias:
        need(FEATURE_LOGIT_BIAS, "logit_bias", "logit_bias")
    if request.response_format is not None and request.response_format.type != "text":
        need(
            FEATURE_STRUCTURED_OUTPUTS,
            "response_format",
            f"response_format {request.response_format.type}",
        )


_ANY_OBJECT = '{"type":"object"}'


def _json_schema(response_format: ResponseFormat | None) -> str | None:
    """The JSON Schema (text) a ``response_format`` constrains the output to; None: none."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return _ANY_OBJECT
    spec = response_format.json_schema or {}
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise FieldError(
            'response_format: json_schema needs a "schema" object', param="response_format"
        )
    return msgspec.json.encode(schema).decode()


def _check_token_id(token_id: int, vocab_size: int, param: str) -> None:
    if not 0 <= token_id < vocab_size:
        raise FieldError(
            f"{param}: token id {token_id} is outside the vocabulary [0, {vocab_size})",
            param=param,
        )


def _logit_bias(fields: SamplingFields, vocab_size: int) -> dict[int, float]:
    if not fields.logit_bias:
        return {}
    bias: dict[int, float] = {}
    for key, value in fields.logit_bias.items():
        try:
            token_id = int(key)
        except ValueError:
            raise FieldError(
                f"logit_bias: keys are token ids, got {key[:40]!r}", param="logit_bias"
            ) from None
        _check_token_id(token_id, vocab_size, "logit_bias")
        bias[token_id] = value
    return bias


def sampling_params(
    fields: SamplingFields,
    max_tokens: int | None,
    num_prompt_tokens: int,
    context_length: int,
    vocab_size: int = 1 << 31,
) -> SamplingParams:
    """Check the sampling fields against the model and build the engine's SamplingParams.

    ``max_tokens`` defaults to what the context leaves after the prompt. Whether the engine
    has the features asked for is ``check_features``'s question.
    """
    num_logprobs = fields.num_logprobs
    stop_token_ids = list(fields.stop_token_ids or ())
    for token_id in stop_token_ids:
        _check_token_id(token_id, vocab_size, "stop_token_ids")
    temperature = 1.0 if fields.temperature is None else fields.temperature
    if not 0.0 <= temperature <= 2.0:
        raise InvalidRequest(f"temperature must be in [0, 2], got {temperature}")
    top_p = 1.0 if fields.top_p is None else fields.top_p
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p must be in (0, 1], got {top_p}")
    if fields.seed is not None and not -(2**63) <= fields.seed < 2**64:
        raise InvalidRequest(f"seed must fit in 64 bits, got {fields.seed}")
    room = context_length - num_prompt_tokens
    if room < 1:
        raise InvalidRequest(
            f"prompt has {num_prompt_tokens} tokens; the model's context is {context_length}"
        )
    if max_tokens is None:
        max_tokens = room
    elif max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
    elif max_tokens > room:
        raise InvalidRequest(
            f"prompt ({num_prompt_tokens} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {context_length} tokens"
        )
    if not 0 <= fields.min_tokens <= max_tokens:
        raise InvalidRequest(f"min_tokens must be in [0, max_tokens], got {fields.min_tokens}")
    return SamplingParams(
        max_tokens=max_tokens,
        min_tokens=fields.min_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=fields.seed,
        ignore_eos=fields.ignore_eos,
        stop_token_ids=stop_token_ids,
        presence_penalty=fields.presence_penalty or 0.0,
        frequency_penalty=fields.frequency_penalty or 0.0,
        repetition_penalty=fields.repetition_penalty or 1.0,
        logit_bias=_logit_bias(fields, vocab_size),
        logprobs=num_logprobs,
        json_schema=_json_schema(fields.response_format),
    )
