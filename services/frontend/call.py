"""One completion being served: its ``n`` choices generated, detokenized and merged, then
sent whole or as a stream (SSE) to a client that may read slowly."""

import asyncio
import contextlib
import logging
import socket
import time
from array import array
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web

from proto.messages import (
    FinishReason,
    ModelCard,
    RequestId,
    SamplingParams,
    TokenChunk,
    TokenLogprobs,
    TTFTBreakdown,
)
from services.frontend.conn_memory import release_request_cache
from services.frontend.generate import new_request_id
from services.frontend.goodput import Outcome
from services.frontend.objectives import RequestObjectives
from services.frontend.openai_types import SamplingFields, uses_tools
from services.frontend.render import (
    DONE,
    FINISH_REASONS,
    Kind,
    LogprobsRenderer,
    Renderer,
    merge_logprobs,
    usage,
)
from services.frontend.render import Choice as ResponseChoice
from services.frontend.tool_calls import ToolCall, ToolCallParser
from services.frontend.worker_pool import Passed
from shared.errors import Cancelled, ServingError
from shared.tokenizer import IncrementalDetokenizer, StopStringMatcher, Tokenizer

if TYPE_CHECKING:
    from services.frontend.app import FrontendState

logger = logging.getLogger(__name__)

_SEED_MASK = (1 << 64) - 1
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
class Piece:
    """What arrived for one choice since its last piece."""

    index: int
    text: str
    done: bool
    logprobs: dict[str, Any] | None = None
    tool_calls: tuple[tuple[int, ToolCall], ...] = ()  # (its index in the choice, the call)


class Choice:
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
        call: "Call",
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

    def _piece(self, text: str, done: bool, logprobs: dict[str, Any] | None) -> Piece:
        """A piece of text, its tool calls read out when tools were offered."""
        tools = self.tools
        if tools is None:
            return Piece(self.index, text, done, logprobs)
        first = tools.num_calls
        content, calls = tools.push(text)
        if done:
            rest, more = tools.flush()
            content += rest
            calls += more
            if tools.num_calls and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"
        numbered = tuple(enumerate(calls, start=first))
        return Piece(self.index, content, done, logprobs, numbered)

    def open(self) -> AsyncGenerator[list[TokenChunk], None]:
        """The choice's request, placed on a worker as it is first iterated: its chunks as
        they arrive (``Generator.generate``). Closing it aborts the request."""
        call = self.call
        return call.state.generator.generate(
            self.request_id,
            call.card.name,
            call.prompt_ids,
            self.sampling,
            call.objectives,
            call.deadline_s,
            call.passed,
        )

    def piece(self, chunks: list[TokenChunk]) -> Piece:
        """The piece for a batch of arrived chunks: ``done`` when they end the choice (a
        finish reason, or a stop string matched)."""
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
        self.call.observe(self, len(token_ids), ttft)
        logprobs = self._render_logprobs(token_ids, reports)
        text, stopped = self._text(token_ids)
        if stopped:
            self.finish_reason = "stop"
            return self._piece(text, True, logprobs)
        if finish is not None:
            self.finish_reason = FINISH_REASONS[finish]
            return self._piece(text + self._final_text(), True, logprobs)
        return self._piece(text, False, logprobs)

    def last_piece(self) -> Piece:
        """The ``done`` piece of a choice whose chunks ended without a finish reason."""
        return self._piece(self._final_text(), True, None)

    async def pieces(self) -> AsyncGenerator[Piece, None]:
        """One piece per batch of arrived chunks; the last one is ``done``."""
        chunks = self.open()
        try:
            async for batch in chunks:
                piece = self.piece(batch)
                yield piece
                if piece.done:
                    return
            yield self.last_piece()
        finally:
            await chunks.aclose()


class Call:
    """One completion being served: its ``n`` choices, merged into one response."""

    __slots__ = (
        "card",
        "choices",
        "deadline_s",
        "error",
        "is_cut",
        "kind",
        "num_output_tokens",
        "objectives",
        "passed",
        "prompt_ids",
        "renderer",
        "request",
        "request_id",
        "started",
        "state",
        "tokenizer",
        "uses_tools",
    )

    def __init__(
        self,
        request: web.Request,
        state: "FrontendState",
        kind: Kind,
        body: SamplingFields,
        card: ModelCard,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        sampling: SamplingParams,
        stops: list[str],
        started: float,
        objectives: RequestObjectives,
        deadline_s: float | None,
        passed: Passed | None = None,
    ) -> None:
        self.request = request
        self.state = state
        self.kind = kind
        self.card = card
        self.tokenizer = tokenizer
        # Held for the stream's life (a migration sends it again): 4 bytes a token (ids are
        # checked against the vocabulary, far below 2**31), rather than a list's pointer
        # plus an int object each (about 36 bytes a token).
        self.prompt_ids = array("i", prompt_ids)
        self.started = started
        self.objectives = objectives
        self.deadline_s = deadline_s  # when the first token is due (None: no objective)
        self.passed = passed  # the first check's count on a worker, until it is sent
        self.uses_tools = uses_tools(body)
        self.choices = tuple(
            Choice(self, i, new_request_id(), _choice_sampling(sampling, i), stops)
            for i in range(body.n)
        )
        self.request_id = self.choices[0].request_id
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.renderer = Renderer(kind, self.request_id, card.name, include_usage=include_usage)
        self.num_output_tokens = 0  # every choice's
        self.error: ServingError | None = None  # a stream that ended with an error event
        self.is_cut = False  # a client that stopped reading, cut after write_timeout_s

    def close(self) -> None:
        """Drop the choices once the call is answered: each holds the call, and the pair
        would otherwise wait, with the request and everything else the call holds, for the
        garbage collector."""
        self.choices = ()

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

    def observe(self, choice: Choice, num_new: int, ttft: TTFTBreakdown | None) -> None:
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
                metrics.child(phases, "queue").observe(ttft.queue_s)
                metrics.child(phases, "prefill").observe(ttft.prefill_s)
                metrics.child(phases, "transfer").observe(ttft.transfer_s)
                rest = total - ttft.queue_s - ttft.prefill_s - ttft.transfer_s
                metrics.child(phases, "other").observe(max(0.0, rest))
        choice.last_token_at = now
        choice.num_output_tokens += num_new
        self.num_output_tokens += num_new
        metrics.num_output_tokens += num_new

    def _pieces(self) -> AsyncGenerator[Piece, None]:
        """Every choice's pieces as they come: one choice's directly (the common case costs
        no extra layer), several through ``_merged``."""
        if len(self.choices) == 1:
            return self.choices[0].pieces()
        return self._merged()

    async def _merged(self) -> AsyncGenerator[Piece, None]:
        """The pieces of several choices, each followed by its own task (closing this aborts
        every choice still running)."""
        # Bounded: each choice puts at most one piece per chunk batch of its own stream.
        queue: asyncio.Queue[Piece | Exception] = asyncio.Queue()

        async def follow(choice: Choice) -> None:
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
            ResponseChoice(
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
        # One choice (nearly every request) is read straight from its chunks: a generator of
        # pieces between them would be one more frame, and one more entry in the loop's
        # registry of async generators, for the stream's whole life.
        one = self.choices[0] if len(self.choices) == 1 else None
        chunks = one.open() if one is not None else None
        merged = self._merged() if one is None else None
        renderer = self.renderer
        response: web.StreamResponse | None = None
        out = bytearray()
        remaining = len(self.choices)
        try:
            while True:
                if one is not None and chunks is not None:
                    try:
                        piece = one.piece(await chunks.__anext__())
                    except StopAsyncIteration:
                        piece = one.last_piece()
                else:
                    assert merged is not None
                    piece = await merged.__anext__()
                if response is None:
                    # Placed: only now answer 200, so that a refusal still gets its own
                    # status. (Every choice ends with a ``done`` piece: there is a first.)
                    response = web.StreamResponse(headers=_SSE_HEADERS)
                    _bound_send_buffer(self.request)
                    await response.prepare(self.request)
                    # Written out (aiohttp reads them no more, and this server keeps no
                    # access log): their dict would hold about 700 bytes for the stream's life.
                    response.headers.clear()
                    release_request_cache(self.request)
                    out += renderer.first_event(len(self.choices))
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
            if renderer.include_usage:
                out += renderer.usage_event(self._usage())
            out += DONE
            await self._send(response, bytes(out))
        except ServingError as exc:
            if isinstance(exc, Cancelled) or response is None:
                raise
            logger.warning("stream ended with error request_id=%s error=%s", self.request_id, exc)
            self.error = exc
            out += renderer.error_event(exc) + DONE
            await self._send(response, bytes(out))
        finally:
            if chunks is not None:
                await chunks.aclose()
            if merged is not None:
                await merged.aclose()
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
