"""HTTP handlers: parse and check, hand to the generator, render. State lives under AppKeys."""

import asyncio
import contextlib
import logging
import re
import socket
import time
from array import array
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Any, cast

import msgspec
from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proto.messages import (
    FinishReason,
    ModelCard,
    RequestId,
    SamplingParams,
    TokenLogprobs,
    TTFTBreakdown,
)
from services.frontend.auth import api_key_auth, load_api_keys
from services.frontend.config import FrontendConfig
from services.frontend.generate import Generator, new_request_id
from services.frontend.goodput import Outcome
from services.frontend.http_errors import header_limit, openai_errors
from services.frontend.metrics import FrontendMetrics
from services.frontend.metrics_merge import merged_metrics
from services.frontend.models import ModelRegistry
from services.frontend.objectives import RequestObjectives, request_objectives
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
from services.frontend.render import (
    DONE,
    FINISH_REASONS,
    Choice,
    Kind,
    LogprobsRenderer,
    Renderer,
    error_body,
    merge_logprobs,
    usage,
)
from services.frontend.tool_calls import ToolCall, ToolCallParser
from services.frontend.worker_pool import WorkerPool
from shared.errors import Cancelled, InvalidRequest, NotFound, Overloaded, ServingError, Shed
from shared.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1
_PATH_IN_ERROR = re.compile(r"at `\$\.?([^`]*)`")
# Unread bytes of a stream past which its writes get a deadline (aiohttp waits for the
# client itself once 64 KiB are pending: the buffer never grows past about that).
SLOW_READER_BYTES = 16 * 1024
# The kernel's send buffer of a stream (it doubles what is asked): room for thousands of
# events, so a reading client never waits on it.
STREAM_SEND_BUFFER_BYTES = 64 * 1024
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


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
    frontend_id: str = ""
    metrics_dir: str = ""  # where sibling processes share their metrics (--procs); "" alone
    write_timeout_s: float = 30.0  # a client reading nothing for this long is cut


STATE = web.AppKey("state", FrontendState)
LIMITS = web.AppKey("limits", RequestLimits)
OPENAPI = web.AppKey("openapi", bytes)
# Label of requests for a model the registry does not know: a client's invented name never
# becomes a label value (each would be a new series on /metrics, kept forever).
UNKNOWN_MODEL = "_unknown"


def error_response(error: ServingError, param: str | None = None) -> web.Response:
    headers = {}
    if param is None and isinstance(error, FieldError):
        param = error.param
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return web.Response(
        body=msgspec.json.encode(error_body(error, param)),
        status=error.http_status,
        content_type="application/json",
        headers=headers,
    )


def _decode_error(exc: msgspec.DecodeError) -> web.Response:
    text = str(exc)
    match = _PATH_IN_ERROR.search(text)
    param = match.group(1) if match else None
    if isinstance(exc, msgspec.ValidationError):
        return error_response(InvalidRequest(text), param)
    return error_response(InvalidRequest(f"request body is not valid JSON: {text}"))


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


def _under_pressure(request: web.Request) -> web.Response | None:
    """A 429 before the body is read, when this process is itself overloaded (its loop lags)
    and the server has a TTFT objective; a request marked high priority by header passes."""
    state = request.app[STATE]
    if state.pressure is None or not state.pressure.is_overloaded or state.ttft_s is None:
        return None
    priority = request.headers.get("X-Baton-Priority", "").strip().lower()
    if priority == "high" or priority.startswith("-"):
        return None
    state.metrics.overload_sheds.inc()
    return error_response(
        Shed(
            f"the frontend is overloaded (its loop runs {state.pressure.lag_s * 1000:.0f} ms "
            "late); retry shortly",
            retry_after_s=1.0,
        )
    )


async def chat_completions(request: web.Request) -> web.StreamResponse:
    refused = _under_pressure(request)
    if refused is not None:
        return refused
    try:
        body = chat_decoder.decode(await request.read())
    except msgspec.DecodeError as exc:
        return _decode_error(exc)
    return await _complete(request, "chat", body)


async def completions(request: web.Request) -> web.StreamResponse:
    refused = _under_pressure(request)
    if refused is not None:
        return refused
    try:
        body = completion_decoder.decode(await request.read())
    except msgspec.DecodeError as exc:
        return _decode_error(exc)
    return await _complete(request, "completion", body)


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
        return sum(1 if isinstance(p, int) else len(p) for p in prompt)
    assert isinstance(body, ChatCompletionRequest)
    size = 0
    for message in body.messages:
        content = message.content
        if isinstance(content, str):
            size += len(content)
        elif content is not None:
            size += sum(len(part.text or "") for part in content)
    return size // 4 + 1


async def _complete(request: web.Request, kind: Kind, body: SamplingFields) -> web.StreamResponse:
    state = request.app[STATE]
    endpoint = "chat" if kind == "chat" else "completions"
    started = time.monotonic()
    status = "error"
    state.num_in_flight += 1
    state.metrics.in_flight.inc()
    card: ModelCard | None = None
    call: _Call | None = None
    try:
        check_limits(body, request.app[LIMITS])
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
        objectives = request_objectives(
            server_ttft_s=state.ttft_s,
            server_tpot_s=state.tpot_s,
            body_ttft_ms=body.slo_ttft_ms,
            body_tpot_ms=body.slo_tpot_ms,
            body_priority=body.priority,
            headers=request.headers,
        )
        deadline_s = None
        if objectives.ttft_s is not None:
            deadline_s = started + objectives.ttft_s
            state.generator.check_capacity(
                card.name, objectives, _approx_prompt_tokens(body), deadline_s - time.monotonic()
            )
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
        state.metrics.prompt_tokens.inc(len(prompt_ids))
        call = _Call(
            request, state, kind, body, card, tokenizer, prompt_ids, sampling, stops, started
        )
        call.objectives, call.deadline_s = objectives, deadline_s
        del prompt_ids  # the call keeps a compact copy for the stream's life
        response = await (call.stream() if body.stream else call.collect())
        status = "ok"
        if call.error is not None:
            state.metrics.record_outcome(card.name, Outcome.ERROR)
        else:
            state.metrics.record_outcome(card.name, call.outcome())
        return response
    except ServingError as exc:
        status = str(exc.http_status)
        if card is not None:
            if isinstance(exc, Shed):
                state.metrics.record_outcome(card.name, Outcome.SHED)
                state.metrics.shed_latency.labels(exc.stage).observe(time.monotonic() - started)
            elif not isinstance(exc, InvalidRequest | NotFound):
                state.metrics.record_outcome(card.name, Outcome.ERROR)
        return error_response(exc)
    except asyncio.CancelledError:
        status = "cut" if call is not None and call.is_cut else "cancelled"
        raise
    finally:
        state.num_in_flight -= 1
        state.metrics.in_flight.dec()
        model = UNKNOWN_MODEL if card is None else card.name
        state.metrics.requests.labels(model, endpoint, status).inc()


@dataclass(slots=True)
class _Piece:
    """What arrived for one choice since its last piece."""

    index: int
    text: str
    done: bool
    logprobs: dict[str, Any] | None = None
    tool_calls: tuple[tuple[int, ToolCall], ...] = ()  # (its index in the choice, the call)


class _Choice:
    """One choice of a completion: its own request on a worker, detokenized, stop strings
    applied, its log-probabilities rendered."""

    __slots__ = (
        "call",
        "detokenizer",
        "finish_reason",
        "first_token_at",
        "index",
        "last_token_at",
        "logprobs",
        "num_cached_tokens",
        "num_output_tokens",
        "request_id",
        "sampling",
        "stop_matcher",
        "tools",
    )

    def __init__(
        self,
        call: "_Call",
        index: int,
        request_id: RequestId,
        sampling: SamplingParams,
        stops: list[str],
    ) -> None:
        self.call = call
        self.index = index
        self.request_id = request_id
        self.sampling = sampling
        self.detokenizer = IncrementalDetokenizer(call.tokenizer)
        self.stop_matcher = StopStringMatcher(stops) if stops else None
        self.logprobs = (
            LogprobsRenderer(call.kind, call.token_bytes) if sampling.logprobs is not None else None
        )
        self.tools = ToolCallParser() if call.uses_tools else None
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason = "stop"
        self.first_token_at = 0.0
        self.last_token_at = 0.0

    def tpot_s(self) -> float | None:
        """Time per output token after the first; None for fewer than two tokens."""
        if self.num_output_tokens < 2:
            return None
        return (self.last_token_at - self.first_token_at) / (self.num_output_tokens - 1)

    def _text(self, token_ids: list[int]) -> tuple[str, bool]:
        """New text for these tokens, and whether a stop string ended the stream."""
        text = self.detokenizer.push(token_ids)
        if self.stop_matcher is None:
            return text, False
        return self.stop_matcher.push(text)

    def _final_text(self) -> str:
        text = self.detokenizer.flush()
        if self.stop_matcher is None:
            return text
        emitted, stopped = self.stop_matcher.push(text)
        return emitted if stopped else emitted + self.stop_matcher.flush()

    def _render_logprobs(
        self, token_ids: list[int], reports: list[TokenLogprobs]
    ) -> dict[str, Any] | None:
        if self.logprobs is None or not token_ids:
            return None
        if len(reports) != len(token_ids):
            # Every chunk of an engine with the feature carries them; a stream resumed after
            # a migration may start with tokens whose reports came from the worker it left.
            logger.warning(
                "logprobs missing request_id=%s tokens=%d reports=%d",
                self.request_id,
                len(token_ids),
                len(reports),
            )
            token_ids = token_ids[len(token_ids) - len(reports) :] if reports else []
        return self.logprobs.render(token_ids, reports) if token_ids else None

    def _piece(self, text: str, done: bool, logprobs: dict[str, Any] | None) -> _Piece:
        """A piece of text, its tool calls read out when tools were offered."""
        tools = self.tools
        if tools is None:
            return _Piece(self.index, text, done, logprobs)
        first = tools.num_calls
        content, calls = tools.push(text)
        if done:
            rest, more = tools.flush()
            content += rest
            calls += more
            if tools.num_calls and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        numbered = tuple(enumerate(calls, start=first))
        return _Piece(self.index, content, done, logprobs, numbered)

    async def pieces(self) -> AsyncGenerator[_Piece, None]:
        """One piece per batch of arrived chunks; the last one is ``done``."""
        call = self.call
        generator = call.state.generator.generate(
            self.request_id,
            call.card.name,
            call.prompt_ids,
            self.sampling,
            call.objectives,
            call.deadline_s,
        )
        try:
            async for chunks in generator:
                token_ids: list[int] = []
                reports: list[TokenLogprobs] = []
                finish: FinishReason | None = None
                ttft: TTFTBreakdown | None = None
                for chunk in chunks:
                    token_ids.extend(chunk.token_ids)
                    if chunk.logprobs:
                        reports.extend(chunk.logprobs)
                    if chunk.ttft is not None:
                        ttft = chunk.ttft
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                        self.num_cached_tokens = chunk.num_cached_tokens
                call.observe(self, len(token_ids), ttft)
                logprobs = self._render_logprobs(token_ids, reports)
                text, stopped = self._text(token_ids)
                if stopped:
                    self.finish_reason = "stop"
                    yield self._piece(text, True, logprobs)
                    return
                if finish is not None:
                    self.finish_reason = FINISH_REASONS[finish]
                    yield self._piece(text + self._final_text(), True, logprobs)
                    return
                yield self._piece(text, False, logprobs)
            yield self._piece(self._final_text(), True, None)
        finally:
            await generator.aclose()


class _Call:
    """One completion being served: its ``n`` choices, merged into one response."""

    def __init__(
        self,
        request: web.Request,
        state: FrontendState,
        kind: Kind,
        body: SamplingFields,
        card: ModelCard,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        sampling: SamplingParams,
        stops: list[str],
        started: float,
    ) -> None:
        self.request = request
        self.state = state
        self.kind = kind
        self.card = card
        self.tokenizer = tokenizer
        # Held for the stream's life (a migration sends it again): 8 bytes a token, rather
        # than a list's pointer plus an int object each (about 36 bytes a token).
        self.prompt_ids = array("q", prompt_ids)
        self.started = started
        self.objectives = RequestObjectives()
        self.deadline_s: float | None = None
        self.uses_tools = uses_tools(body)
        self.choices = [
            _Choice(self, i, new_request_id(), _choice_sampling(sampling, i), stops)
            for i in range(body.n)
        ]
        self.request_id = self.choices[0].request_id
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.renderer = Renderer(kind, self.request_id, card.name, include_usage=include_usage)
        self.num_output_tokens = 0  # every choice's
        self.error: ServingError | None = None  # a stream that ended with an error event
        self.is_cut = False  # a client that stopped reading, cut after write_timeout_s

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes: from the tokenizer's byte table when it has one (no decode
        per token, and a piece of a multi-byte character keeps its real bytes)."""
        table = self.tokenizer.byte_table
        if table is not None:
            return table.token_bytes[token_id] if token_id < len(table.token_bytes) else b""
        return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()

    def outcome(self) -> Outcome:
        """Good if the first token and the pace (of the first choice) met the objectives (and
        the TPOT histogram gets that pace: one observation per request, none per token)."""
        if self.num_output_tokens == 0:
            return Outcome.ERROR
        first = min(c.first_token_at for c in self.choices if c.num_output_tokens)
        tpot_s = self.choices[0].tpot_s()
        if tpot_s is not None:
            self.state.metrics.tpot.observe(tpot_s)
        is_good = self.objectives.is_good(first - self.started, tpot_s)
        return Outcome.GOOD if is_good else Outcome.SLO_MISS

    def observe(self, choice: _Choice, num_new: int, ttft: TTFTBreakdown | None) -> None:
        now = time.monotonic()
        metrics = self.state.metrics
        if choice.num_output_tokens == 0:
            choice.first_token_at = now
            if ttft is not None and ttft.is_remote_prefill:
                metrics.remote_prefills.inc()
        if self.num_output_tokens == 0:
            total = now - self.started
            metrics.ttft.observe(total)
            if ttft is not None:
                phases = metrics.ttft_phase
                phases.labels("queue").observe(ttft.queue_s)
                phases.labels("prefill").observe(ttft.prefill_s)
                phases.labels("transfer").observe(ttft.transfer_s)
                rest = total - ttft.queue_s - ttft.prefill_s - ttft.transfer_s
                phases.labels("other").observe(max(0.0, rest))
        choice.last_token_at = now
        choice.num_output_tokens += num_new
        self.num_output_tokens += num_new
        metrics.num_output_tokens += num_new

    def _pieces(self) -> AsyncGenerator[_Piece, None]:
        """Every choice's pieces as they come: one choice's directly (the common case costs
        no extra layer), several through ``_merged``."""
        if len(self.choices) == 1:
            return self.choices[0].pieces()
        return self._merged()

    async def _merged(self) -> AsyncGenerator[_Piece, None]:
        """The pieces of several choices, each followed by its own task (closing this aborts
        every choice still running)."""
        # Bounded: each choice puts at most one piece per chunk batch of its own stream.
        queue: asyncio.Queue[_Piece | Exception] = asyncio.Queue()

        async def follow(choice: _Choice) -> None:
            try:
                async for piece in choice.pieces():
                    queue.put_nowait(piece)
            except Exception as exc:  # handed to the reader, which raises it
                queue.put_nowait(exc)

        tasks = [asyncio.create_task(follow(choice)) for choice in self.choices]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.done:
                    remaining -= 1
                yield item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _usage(self) -> dict[str, object]:
        return usage(
            len(self.prompt_ids), self.num_output_tokens, self.choices[0].num_cached_tokens
        )

    async def collect(self) -> web.Response:
        texts: list[list[str]] = [[] for _ in self.choices]
        logprobs: list[list[dict[str, Any]]] = [[] for _ in self.choices]
        calls: list[list[ToolCall]] = [[] for _ in self.choices]
        async for piece in self._pieces():
            texts[piece.index].append(piece.text)
            if piece.logprobs is not None:
                logprobs[piece.index].append(piece.logprobs)
            calls[piece.index].extend(call for _, call in piece.tool_calls)
        choices = [
            Choice(
                "".join(texts[c.index]),
                c.finish_reason,
                merge_logprobs(self.kind, logprobs[c.index]) if c.logprobs is not None else None,
                calls[c.index],
            )
            for c in self.choices
        ]
        body = self.renderer.full_response(choices, self._usage())
        return web.Response(body=body, content_type="application/json")

    async def _send(self, response: web.StreamResponse, data: bytes) -> None:
        """Write ``data``; a client that has left more than ``SLOW_READER_BYTES`` unread may
        take at most ``write_timeout_s`` to read enough for it, then it is cut (its stream is
        aborted on the worker). Below that, a write never waits, and costs no timer.

        A client that is gone (or cut) ends the handler as a disconnect does: cancelled, the
        request aborted on its worker, no traceback in the log."""
        transport = self.request.transport
        try:
            if transport is None or transport.get_write_buffer_size() < SLOW_READER_BYTES:
                await response.write(data)
                return
            async with asyncio.timeout(self.state.write_timeout_s):
                await response.write(data)
        except TimeoutError:
            assert transport is not None
            logger.warning(
                "client not reading; stream cut request_id=%s unread_bytes=%d",
                self.request_id,
                transport.get_write_buffer_size(),
            )
            self.is_cut = True
            transport.abort()
            raise asyncio.CancelledError from None
        except ConnectionResetError:  # the client closed the connection
            raise asyncio.CancelledError from None

    async def stream(self) -> web.StreamResponse:
        pieces = self._pieces()
        # Place the request before answering 200, so refusals still get a proper status.
        # (Every choice ends with a ``done`` piece, so there is always a first one.)
        first = await pieces.__anext__()
        response = web.StreamResponse(headers=_SSE_HEADERS)
        _bound_send_buffer(self.request)
        await response.prepare(self.request)
        renderer = self.renderer
        out = bytearray(renderer.first_event(len(self.choices)))
        remaining = len(self.choices)
        try:
            piece = first
            while True:
                if piece.text or piece.logprobs is not None:
                    out += renderer.text_event(piece.text, piece.index, piece.logprobs)
                if piece.tool_calls:
                    out += renderer.tool_calls_event(piece.index, piece.tool_calls)
                if piece.done:
                    out += renderer.finish_event(
                        self.choices[piece.index].finish_reason, piece.index
                    )
                    remaining -= 1
                    if not remaining:
                        break
                if out:
                    await self._send(response, bytes(out))
                    out.clear()
                piece = await pieces.__anext__()
            if renderer.include_usage:
                out += renderer.usage_event(self._usage())
            out += DONE
            await self._send(response, bytes(out))
        except ServingError as exc:
            if isinstance(exc, Cancelled):
                raise
            logger.warning("stream ended with error request_id=%s error=%s", self.request_id, exc)
            self.error = exc
            out += renderer.error_event(exc) + DONE
            await self._send(response, bytes(out))
        finally:
            await pieces.aclose()
        await response.write_eof()
        return response


def _choice_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Choice ``index``'s sampling: a seeded request's choices draw from seeds ``seed``,
    ``seed + 1``, ... (so they differ, and each is reproducible on its own)."""
    if index == 0 or sampling.seed is None:
        return sampling
    return msgspec.structs.replace(sampling, seed=(sampling.seed + index) & _SEED_MASK)


def _bound_send_buffer(request: web.Request) -> None:
    """Cap the kernel's send buffer of a streaming connection: by default it grows to 4 MiB
    for a client that does not read, per connection, before the write deadline can see it."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SEND_BUFFER_BYTES)


def build_app(state: FrontendState, config: FrontendConfig | None = None) -> web.Application:
    """The HTTP application; ``config`` sets its limits and API keys (None: the defaults,
    no keys)."""
    config = config or FrontendConfig()
    middlewares: list[Middleware] = [openai_errors, header_limit(config.max_header_bytes)]
    keys = load_api_keys(config.api_key, config.api_key_file)
    if keys:
        middlewares.append(api_key_auth(keys, is_metrics_open=not config.metrics_require_key))
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    app[STATE] = state
    app[LIMITS] = RequestLimits(
        max_messages=config.max_messages,
        max_prompt_chars=config.max_prompt_chars,
        max_stop_strings=config.max_stop_strings,
    )
    is_metrics_open = not (keys and config.metrics_require_key)
    app[OPENAPI] = msgspec.json.encode(
        openapi_document(has_api_keys=bool(keys), is_metrics_open=is_metrics_open)
    )
    app.router.add_get("/openapi.json", openapi_json)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app
