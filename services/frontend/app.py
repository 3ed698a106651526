"""HTTP handlers: parse and check, hand to the generator, render. State lives under AppKeys."""

import asyncio
import logging
import re
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proto.messages import FinishReason, ModelCard, RequestId, SamplingParams, TTFTBreakdown
from services.frontend.generate import Generator, new_request_id
from services.frontend.goodput import Outcome
from services.frontend.metrics import FrontendMetrics
from services.frontend.models import ModelRegistry
from services.frontend.objectives import RequestObjectives, request_objectives
from services.frontend.openai_types import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    chat_decoder,
    chat_messages,
    completion_decoder,
    completion_prompt,
    sampling_params,
    stop_strings,
)
from services.frontend.pressure import LoopPressure
from services.frontend.render import DONE, FINISH_REASONS, Kind, Renderer, error_body, usage
from services.frontend.worker_pool import WorkerPool
from shared.errors import Cancelled, InvalidRequest, NotFound, Overloaded, ServingError, Shed
from shared.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

logger = logging.getLogger(__name__)

_PATH_IN_ERROR = re.compile(r"at `\$\.?([^`]*)`")
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


STATE = web.AppKey("state", FrontendState)


def error_response(error: ServingError, param: str | None = None) -> web.Response:
    headers = {}
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
    return web.json_response({"ready": ok, "workers": len(state.pool)}, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await asyncio.to_thread(generate_latest, state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


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
        size = sum(len(m["content"]) for m in messages)
        return await _tokenize(
            state,
            size,
            lambda: tokenizer.encode(
                tokenizer.apply_chat_template(messages), add_special_tokens=False
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
    try:
        card = state.models.card(body.model)
        if card is None:
            raise NotFound(f"model {body.model!r} does not exist")
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
        prompt_ids = await _prompt_ids(state, kind, body, tokenizer)
        max_tokens = body.max_tokens
        if isinstance(body, ChatCompletionRequest) and body.max_completion_tokens is not None:
            max_tokens = body.max_completion_tokens
        sampling = sampling_params(body, max_tokens, len(prompt_ids), card.context_length)
        stops = stop_strings(body.stop)
        state.metrics.prompt_tokens.inc(len(prompt_ids))
        call = _Call(
            request, state, kind, body, card, tokenizer, prompt_ids, sampling, stops, started
        )
        call.objectives, call.deadline_s = objectives, deadline_s
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
        status = "cancelled"
        raise
    finally:
        state.num_in_flight -= 1
        state.metrics.in_flight.dec()
        state.metrics.requests.labels(body.model, endpoint, status).inc()


class _Call:
    """One completion being served: follows the stream, detokenizes, applies stop strings."""

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
        self.request_id: RequestId = new_request_id()
        self.card = card
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.detokenizer = IncrementalDetokenizer(tokenizer)
        self.stop_matcher = StopStringMatcher(stops) if stops else None
        self.started = started
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.renderer = Renderer(kind, self.request_id, card.name, include_usage=include_usage)
        self.num_output_tokens = 0
        self.num_cached_tokens = 0
        self.finish_reason = "stop"
        self.objectives = RequestObjectives()
        self.deadline_s: float | None = None
        self.error: ServingError | None = None  # a stream that ended with an error event
        self._first_token_at = 0.0
        self._last_token_at = 0.0

    def outcome(self) -> Outcome:
        """Good if the first token and the pace met the objectives."""
        if self.num_output_tokens == 0:
            return Outcome.ERROR
        ttft_s = self._first_token_at - self.started
        tpot_s = None
        if self.num_output_tokens > 1:
            tpot_s = (self._last_token_at - self._first_token_at) / (self.num_output_tokens - 1)
        return Outcome.GOOD if self.objectives.is_good(ttft_s, tpot_s) else Outcome.SLO_MISS

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

    def _observe(self, num_new: int, ttft: TTFTBreakdown | None) -> None:
        now = time.monotonic()
        metrics = self.state.metrics
        if self.num_output_tokens == 0:
            self._first_token_at = now
            total = now - self.started
            metrics.ttft.observe(total)
            if ttft is not None:
                phases = metrics.ttft_phase
                phases.labels("queue").observe(ttft.queue_s)
                phases.labels("prefill").observe(ttft.prefill_s)
                phases.labels("transfer").observe(ttft.transfer_s)
                rest = total - ttft.queue_s - ttft.prefill_s - ttft.transfer_s
                phases.labels("other").observe(max(0.0, rest))
                if ttft.is_remote_prefill:
                    metrics.remote_prefills.inc()
        elif num_new:
            metrics.itl.observe((now - self._last_token_at) / num_new)
        self._last_token_at = now
        self.num_output_tokens += num_new
        metrics.output_tokens.inc(num_new)

    async def _chunks(self) -> AsyncGenerator[tuple[str, bool], None]:
        """(text, finish reason or None) per batch of arrived chunks."""
        generator = self.state.generator.generate(
            self.request_id,
            self.card.name,
            self.prompt_ids,
            self.sampling,
            self.objectives,
            self.deadline_s,
        )
        try:
            async for chunks in generator:
                token_ids: list[int] = []
                finish: FinishReason | None = None
                ttft: TTFTBreakdown | None = None
                for chunk in chunks:
                    token_ids.extend(chunk.token_ids)
                    if chunk.ttft is not None:
                        ttft = chunk.ttft
                    if chunk.finish_reason is not None:
                        finish = chunk.finish_reason
                        self.num_cached_tokens = chunk.num_cached_tokens
                self._observe(len(token_ids), ttft)
                text, stopped = self._text(token_ids)
                if stopped:
                    self.finish_reason = "stop"
                    yield text, True
                    return
                if finish is not None:
                    self.finish_reason = FINISH_REASONS[finish]
                    yield text + self._final_text(), True
                    return
                yield text, False
        finally:
            await generator.aclose()

    def _usage(self) -> dict[str, object]:
        return usage(len(self.prompt_ids), self.num_output_tokens, self.num_cached_tokens)

    async def collect(self) -> web.Response:
        parts = []
        async for text, _ in self._chunks():
            parts.append(text)
        body = self.renderer.full_response("".join(parts), self.finish_reason, self._usage())
        return web.Response(body=body, content_type="application/json")

    async def stream(self) -> web.StreamResponse:
        chunks = self._chunks()
        # Place the request before answering 200, so refusals still get a proper status.
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = ("", True)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(self.request)
        renderer = self.renderer
        out = bytearray(renderer.first_event())
        try:
            item: tuple[str, bool] | None = first
            while item is not None:
                text, done = item
                if text:
                    out += renderer.text_event(text)
                if done:
                    out += renderer.finish_event(self.finish_reason)
                    if renderer.include_usage:
                        out += renderer.usage_event(self._usage())
                    out += DONE
                    await response.write(bytes(out))
                    break
                if out:
                    await response.write(bytes(out))
                    out.clear()
                item = await chunks.__anext__()
        except ServingError as exc:
            if isinstance(exc, Cancelled):
                raise
            logger.warning("stream ended with error request_id=%s error=%s", self.request_id, exc)
            self.error = exc
            out += renderer.error_event(exc) + DONE
            await response.write(bytes(out))
        finally:
            await chunks.aclose()
        await response.write_eof()
        return response


def build_app(state: FrontendState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app
