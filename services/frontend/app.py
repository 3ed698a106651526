"""HTTP handlers: parse and check, hand to the generator, render. State lives under AppKeys.

There are no aiohttp middlewares: a middleware's frame lives as long as every stream it
wraps. Each handler asks the ``Gate`` first (431 for oversized headers, 401 without a valid
key) and renders its own errors in OpenAI's shape: the short ones through ``guarded``, the
completions in ``complete`` itself; a catch-all route answers unknown paths and methods.
"""

import asyncio
import functools
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from multidict import CIMultiDict
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proto.messages import ModelCard
from services.frontend.auth import KeyChecker, KeyGate, load_api_keys
from services.frontend.call import Call
from services.frontend.config import FrontendConfig
from services.frontend.conn_memory import release_body_buffer
from services.frontend.early_shed import CheckedShed, EarlyShed, PlainRequest
from services.frontend.generate import FrontendShed, Generator
from services.frontend.goodput import Outcome
from services.frontend.http_errors import (
    error_for,
    headers_too_large,
    json_error,
    no_route,
    retry_after_seconds,
)
from services.frontend.metrics import FrontendMetrics
from services.frontend.metrics_merge import merged_metrics
from services.frontend.models import ModelRegistry
from services.frontend.objectives import (
    RequestObjectives,
    is_high_priority_header,
    request_objectives,
)
from services.frontend.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    FieldError,
    RequestLimits,
    SamplingFields,
    chat_decoder,
    chat_messages,
    check_features,
    check_limits,
    check_tools,
    completion_decoder,
    completion_prompt,
    sampling_params,
    stop_strings,
    uses_tools,
)
from services.frontend.openapi import openapi_document
from services.frontend.pressure import LoopPressure
from services.frontend.render import Kind, error_body
from services.frontend.worker_pool import Passed, WorkerPool
from shared.errors import InvalidRequest, NotFound, Overloaded, ServingError, Shed
from shared.tokenizer import Tokenizer

_PATH_IN_ERROR = re.compile(r"at `\$\.?([^`]*)`")


@dataclass(slots=True)
class FrontendState:
    models: ModelRegistry
    pool: WorkerPool
    generator: Generator
    metrics: FrontendMetrics
    max_in_flight: int
    tokenize_in_thread_chars: int
    ttft_s: float | None = None  # the server's objectives (None: none)
    tpot_s: float | None = None
    pressure: LoopPressure | None = None
    is_ready: bool = False
    is_draining: bool = False
    num_in_flight: int = 0
    # Since start, for the planner (FrontendLoad): completion requests, and those shed (429).
    num_requests: int = 0
    num_shed: int = 0
    frontend_id: str = ""
    metrics_dir: str = ""  # where sibling processes share their metrics (--procs); "" alone
    write_timeout_s: float = 30.0  # a client reading nothing for this long is cut


@dataclass(frozen=True, slots=True)
class Gate:
    """What every request passes before its handler's work: its headers' size, and its API
    key where keys are set."""

    max_header_bytes: int
    keys: KeyGate | None = None

    def refuse(self, request: web.BaseRequest) -> web.Response | None:
        """The refusal (431 or 401) for ``request``, or None to serve it."""
        refused = headers_too_large(request, self.max_header_bytes)
        if refused is None and self.keys is not None:
            refused = self.keys.refuse(request)
        return refused


STATE = web.AppKey("state", FrontendState)
GATE = web.AppKey("gate", Gate)
LIMITS = web.AppKey("limits", RequestLimits)
OPENAPI = web.AppKey("openapi", bytes)
# Label of requests for a model the registry does not know: a client's invented name never
# becomes a label value (each would be a new series on /metrics, kept forever).
UNKNOWN_MODEL = "_unknown"


def error_response(error: ServingError, param: str | None = None) -> web.Response:
    """``json_error`` for ``error``, naming the field a ``FieldError`` is about."""
    if param is None and isinstance(error, FieldError):
        param = error.param
    return json_error(error, param=param)


def _decode_error(exc: msgspec.DecodeError) -> web.Response:
    text = str(exc)
    match = _PATH_IN_ERROR.search(text)
    param = match.group(1) if match else None
    if isinstance(exc, msgspec.ValidationError):
        return error_response(InvalidRequest(text), param)
    return error_response(InvalidRequest(f"request body is not valid JSON: {text}"))


def guarded(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Handler:
    """``handler`` behind the gate, its errors in OpenAI's shape (for the short routes; a
    completion does both itself, so that no wrapper's frame lives as long as its stream)."""

    async def guard(request: web.Request) -> web.StreamResponse:
        refused = request.app[GATE].refuse(request)
        if refused is not None:
            return refused
        try:
            return await handler(request)
        except Exception as exc:
            return _error_answer(request, exc)

    return guard


def _error_answer(request: web.BaseRequest, exc: Exception) -> web.Response:
    """``exc``'s answer in OpenAI's shape (``error_for``); ``exc`` raised again where there is
    none (a client that went away)."""
    response = error_for(request, exc)
    if response is None:
        raise exc
    return response


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    ok = state.is_ready and not state.is_draining
    body = {"ready": ok, "workers": len(state.pool), "frontend_id": state.frontend_id}
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.metrics_dir:  # one of several processes on this port: answer for all of them
        body = await asyncio.to_thread(merged_metrics, state.metrics.registry, state.metrics_dir)
    else:
        body = await asyncio.to_thread(generate_latest, state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    served = state.pool.models()
    data = [
        {
            "id": card.name,
            "object": "model",
            "created": card.created,
            "owned_by": "baton",
            "max_model_len": card.context_length,
        }
        for card in state.models.cards()
        if card.name in served
    ]
    return web.json_response({"object": "list", "data": data})


def _is_overloaded(state: FrontendState) -> bool:
    """Whether completion requests are shed before being read now (a fraction of them:
    ``_draws_shed``): this process's loop lags, and the server has a TTFT objective
    (without one, requests queue)."""
    pressure = state.pressure
    return pressure is not None and pressure.is_overloaded and state.ttft_s is not None


def _draws_shed(state: FrontendState) -> bool:
    """Whether the request at hand is one of those shed while the loop lags (one draw;
    ask only while ``_is_overloaded``)."""
    return state.pressure is not None and state.pressure.should_shed()


def _overload_shed(state: FrontendState, where: str) -> Shed:
    """Count one request shed before being read (``where``: "connection" or "handler")."""
    assert state.pressure is not None
    state.num_shed += 1
    state.metrics.child(state.metrics.overload_sheds, where).inc()
    return Shed(
        f"the frontend is overloaded (its loop runs {state.pressure.lag_s * 1000:.0f} ms "
        "late); retry shortly",
        retry_after_s=1.0,
    )


def early_shed(state: FrontendState, config: FrontendConfig, keys: list[str]) -> EarlyShed:
    """The connection-level answer of the same shed (``early_shed.EarlyShed``); ``keys``
    are the API keys (``load_api_keys``; none: the API is open)."""

    def on_shed() -> bytes:
        state.num_requests += 1  # a request complete() never sees
        return msgspec.json.encode(error_body(_overload_shed(state, "connection"), None))

    limits = request_limits(config)

    def check(request: PlainRequest) -> CheckedShed | None:
        started = time.monotonic()
        if len(request.body) > config.max_body_bytes:
            return None  # the handler's 413
        body: SamplingFields
        try:  # whatever fails here fails in the handler too, which answers it
            if request.is_chat:
                body = chat_decoder.decode(request.body)
            else:
                body = completion_decoder.decode(request.body)
            card = _card_for(state, limits, body)
            objectives = _objectives(state, body, CIMultiDict(request.headers))
        except Exception:
            return None
        try:
            passed = _early_check(state, body, card, objectives, started)[1]
        except FrontendShed as shed:
            state.num_requests += 1  # a request complete() never sees
            endpoint = "chat" if request.is_chat else "completions"
            state.metrics.child(state.metrics.requests, card.name, endpoint, "429").inc()
            state.metrics.connection_checks.inc()
            _count_shed(state, card.name, shed, started)
            retry_after_s = retry_after_seconds(shed.retry_after_s or 1.0)
            return msgspec.json.encode(error_body(shed)), retry_after_s
        if passed is not None:
            passed.release()  # the handler checks it again
        return None

    return EarlyShed(
        lambda: _is_overloaded(state),
        on_shed,
        max_header_bytes=config.max_header_bytes,
        keys=KeyChecker(keys) if keys else None,
        is_checking=lambda: state.generator.is_shedding_early,
        check=check,
        draws_shed=lambda: _draws_shed(state),
    )


def _count_shed(state: FrontendState, model: str, shed: Shed, started: float) -> None:
    """Count a request shed for ``model`` (its outcome and how long it took to answer)."""
    state.num_shed += 1
    metrics = state.metrics
    metrics.record_outcome(model, Outcome.SHED)
    metrics.child(metrics.shed_latency, shed.stage).observe(time.monotonic() - started)


def _under_pressure(request: web.Request) -> web.Response | None:
    """A 429 before the body is read, when this process is itself overloaded (its loop lags)
    and the server has a TTFT objective; a request marked high priority by header passes.
    (Most such requests are answered earlier still, by their connection: ``early_shed``.)"""
    state = request.app[STATE]
    if not _is_overloaded(state):
        return None
    if getattr(request.protocol, "passed_lag_draw", False) or not _draws_shed(state):
        return None  # drawn once, by its connection, or not drawn to be shed now
    if is_high_priority_header(request.headers.get("X-Baton-Priority", "")):
        return None
    return error_response(_overload_shed(state, "handler"))


async def _tokenize(state: FrontendState, size: int, work: Callable[[], list[int]]) -> list[int]:
    """Tokenize on the loop when the text is short, in a thread when it is long."""
    if size >= state.tokenize_in_thread_chars:
        return await asyncio.to_thread(work)
    return work()


async def _prompt_ids(
    state: FrontendState, kind: Kind, body: SamplingFields, tokenizer: Tokenizer
) -> list[int]:
    if isinstance(body, ChatCompletionRequest):
        messages = chat_messages(body)
        size = sum(len(cast(str, m["content"])) for m in messages)
        template_kwargs: dict[str, object] = {}
        if uses_tools(body):
            template_kwargs["tools"] = msgspec.to_builtins(body.tools)
        return await _tokenize(
            state,
            size,
            lambda: tokenizer.encode(
                tokenizer.apply_chat_template(messages, True, **template_kwargs),
                add_special_tokens=False,
            ),
        )
    assert isinstance(body, CompletionRequest)
    prompt = completion_prompt(body)
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must not be empty")
        return await _tokenize(state, len(prompt), lambda: tokenizer.encode(prompt))
    bad = [t for t in prompt if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise InvalidRequest(
            f"prompt holds token ids outside [0, {tokenizer.vocab_size}): {bad[:5]}"
        )
    return prompt


def _approx_prompt_tokens(body: SamplingFields) -> int:
    """A cheap guess of the prompt's length, for shedding before tokenizing: about four
    characters a token for text, exact for token ids."""
    if isinstance(body, CompletionRequest):
        prompt = body.prompt
        if isinstance(prompt, str):
            return len(prompt) // 4 + 1
        if isinstance(prompt[0], int):
            return len(prompt)  # token ids (``_prompt_chars`` says why only the first is read)
        return sum(
            1 if isinstance(p, int) else len(p) // 4 + 1 if isinstance(p, str) else len(p)
            for p in prompt
        )
    assert isinstance(body, ChatCompletionRequest)
    size = 0
    for message in body.messages:
        content = message.content
        if isinstance(content, str):
            size += len(content)
        elif content is not None:
            size += sum(len(part.text or "") for part in content)
    return size // 4 + 1


async def _read_body(request: web.Request) -> bytearray:
    """The request's body, read as ``request.read()`` reads it (a body over the app's
    ``client_max_size`` is refused with 413), without the copy aiohttp would keep on the
    request for as long as the stream is open."""
    limit = request.client_max_size
    body = bytearray()
    while chunk := await request.content.readany():
        body += chunk
        if limit and len(body) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(body))
    release_body_buffer(request.content)
    return body


def _card_for(state: FrontendState, limits: RequestLimits, body: SamplingFields) -> ModelCard:
    """The card of the model ``body`` asks for, once the request passes the checks that need
    no tokenizer: its limits, the model's features, this frontend's own room."""
    check_limits(body, limits)
    card = state.models.card(body.model)
    if card is None:
        raise NotFound(f"model {body.model!r} does not exist")
    check_features(body, card.name, card.features)
    if state.is_draining:
        raise Overloaded("this frontend is shutting down", retry_after_s=1.0)
    if state.num_in_flight > state.max_in_flight:
        raise Overloaded(
            f"frontend has {state.max_in_flight} requests in flight", retry_after_s=1.0
        )
    return card


def _objectives(
    state: FrontendState, body: SamplingFields, headers: Mapping[str, str]
) -> RequestObjectives:
    return request_objectives(
        server_ttft_s=state.ttft_s,
        server_tpot_s=state.tpot_s,
        body_ttft_ms=body.slo_ttft_ms,
        body_tpot_ms=body.slo_tpot_ms,
        body_priority=body.priority,
        headers=headers,
    )


def _early_check(
    state: FrontendState,
    body: SamplingFields,
    card: ModelCard,
    objectives: RequestObjectives,
    started: float,
) -> tuple[float | None, Passed | None]:
    """The first token's deadline (None: no TTFT objective), and the pass of the check
    against the workers' load reports (``Generator.check_capacity``; raises
    ``FrontendShed``), before any tokenizing. The handler runs it, and so does a connection
    while the check has been shedding (``early_shed``)."""
    if objectives.ttft_s is None:
        return None, None
    deadline_s = started + objectives.ttft_s
    passed = state.generator.check_capacity(
        card.name, objectives, _approx_prompt_tokens(body), deadline_s - time.monotonic()
    )
    return deadline_s, passed


async def _new_call(
    request: web.Request, kind: Kind, body: SamplingFields, card: ModelCard, started: float
) -> Call:
    """The call serving ``body``: its objectives (shed here when no worker can meet them),
    its prompt tokenized and its sampling checked. Separate from ``complete`` so that none of
    its locals stay in the frame that lives as long as the stream."""
    state = request.app[STATE]
    objectives = _objectives(state, body, request.headers)
    deadline_s, passed = _early_check(state, body, card, objectives, started)
    try:
        tokenizer = await state.models.tokenizer(card)
        check_tools(body, tokenizer.chat_template)
        prompt_ids = await _prompt_ids(state, kind, body, tokenizer)
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        sampling = sampling_params(
            body, max_tokens, len(prompt_ids), card.context_length, tokenizer.vocab_size
        )
        stops = stop_strings(body.stop, request.app[LIMITS].max_stop_strings)
    except BaseException:
        if passed is not None:
            passed.release()
        raise
    state.metrics.prompt_tokens.inc(len(prompt_ids))
    return Call(
        request,
        state,
        kind,
        body,
        card,
        tokenizer,
        prompt_ids,
        sampling,
        stops,
        started,
        objectives,
        deadline_s,
        passed,
    )


async def complete(request: web.Request, kind: Kind) -> web.StreamResponse:
    """``POST /v1/chat/completions`` (``kind`` "chat") and ``/v1/completions``. One coroutine
    from the route to the stream: its frame lives as long as the stream, and so would every
    wrapper's (hence the gate and the error answers here, not in a wrapper)."""
    refused = request.app[GATE].refuse(request)
    if refused is not None:
        return refused
    request.app[STATE].num_requests += 1
    refused = _under_pressure(request)
    if refused is not None:
        return refused
    body: SamplingFields
    try:
        if kind == "chat":
            body = chat_decoder.decode(await _read_body(request))
        else:
            body = completion_decoder.decode(await _read_body(request))
    except msgspec.DecodeError as exc:
        return _decode_error(exc)
    except Exception as exc:  # a body over the limit (413), say
        return _error_answer(request, exc)
    state = request.app[STATE]
    endpoint = "chat" if kind == "chat" else "completions"
    started = time.monotonic()
    status = "error"
    state.num_in_flight += 1
    state.metrics.in_flight.inc()
    card: ModelCard | None = None
    call: Call | None = None
    try:
        card = _card_for(state, request.app[LIMITS], body)
        call = await _new_call(request, kind, body, card, started)
        streams = body.stream
        del body  # the call keeps what it needs of the request, not the request itself
        response = await (call.stream() if streams else call.collect())
        status = "ok"
        if call.error is not None:
            state.metrics.record_outcome(card.name, Outcome.ERROR)
        else:
            state.metrics.record_outcome(card.name, call.outcome())
        return response
    except ServingError as exc:
        status = str(exc.http_status)
        if isinstance(exc, Shed):
            if card is not None:
                _count_shed(state, card.name, exc, started)
            else:
                state.num_shed += 1
        elif card is not None and not isinstance(exc, InvalidRequest | NotFound):
            state.metrics.record_outcome(card.name, Outcome.ERROR)
        return error_response(exc)
    except asyncio.CancelledError:
        status = "cut" if call is not None and call.is_cut else "cancelled"
        raise
    except Exception as exc:  # unexpected: a 500, and the log says why
        return _error_answer(request, exc)
    finally:
        if call is not None:
            if call.passed is not None:
                call.passed.release()  # never sent (the client left first, say)
            call.close()
        state.num_in_flight -= 1
        state.metrics.in_flight.dec()
        model = UNKNOWN_MODEL if card is None else card.name
        state.metrics.child(state.metrics.requests, model, endpoint, status).inc()


def request_limits(config: FrontendConfig) -> RequestLimits:
    return RequestLimits(
        max_messages=config.max_messages,
        max_prompt_chars=config.max_prompt_chars,
        max_stop_strings=config.max_stop_strings,
    )


def build_app(
    state: FrontendState, config: FrontendConfig | None = None, keys: list[str] | None = None
) -> web.Application:
    """The HTTP application; ``config`` sets its limits and API keys (None: the defaults,
    no keys). ``keys``, when given, are its keys already loaded (``load_api_keys``)."""
    config = config or FrontendConfig()
    if keys is None:
        keys = load_api_keys(config.api_key, config.api_key_file)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[STATE] = state
    app[GATE] = Gate(
        config.max_header_bytes,
        KeyGate(keys, is_metrics_open=not config.metrics_require_key) if keys else None,
    )
    app[LIMITS] = request_limits(config)
    is_metrics_open = not (keys and config.metrics_require_key)
    app[OPENAPI] = msgspec.json.encode(
        openapi_document(has_api_keys=bool(keys), is_metrics_open=is_metrics_open)
    )
    routes: dict[str, frozenset[str]] = {}
    for path, handler in (
        ("/openapi.json", openapi_json),
        ("/health", health),
        ("/ready", ready),
        ("/metrics", metrics),
        ("/v1/models", list_models),
    ):
        app.router.add_get(path, guarded(handler))
        routes[path] = frozenset({"GET", "HEAD"})
    completions: tuple[tuple[str, Kind], ...] = (
        ("/v1/chat/completions", "chat"),
        ("/v1/completions", "completion"),
    )
    for path, kind in completions:
        app.router.add_post(path, functools.partial(complete, kind=kind))
        routes[path] = frozenset({"POST"})
    app.router.add_route("*", "/{path:.*}", guarded(no_route(routes)))
    return app
