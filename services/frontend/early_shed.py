"""The cheapest 429 there is: answered from the connection's ``data_received``.

While this frontend's own loop lags (``LoopPressure``), completion requests are shed before
their body is read (``app._under_pressure``). Through aiohttp, that answer still costs a
request object, a task, the route, the handler and a response object: about 370 µs of
CPU each on this project's 2-core machine, against about 70 µs for a bare protocol that
writes a canned reply. At ten times a worker's capacity the sheds are most of what a
frontend does, so their price decides how much CPU is left for the streams it serves.

Here a connection's handler answers the plain case itself, from the raw bytes, before
aiohttp parses them: one whole ``POST`` to a completion path in one read, with a
``Content-Length`` body, on a keep-alive connection with no request in progress, and not
marked high priority. Everything else (a body still on its way, chunked bodies, pipelined
requests, ``Expect``, HTTP/1.0, a missing or wrong API key) goes through aiohttp and the
handler's own check, which gives the same 429 or the error that comes first. The handler
reads a few of aiohttp's private fields to know the connection is idle; ``is_supported``
says whether the installed aiohttp still has them, and without them nothing changes.
"""

import asyncio
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from services.frontend.auth import KeyChecker
from services.frontend.conn_memory import MessageQueue, stop_idle_timer
from services.frontend.objectives import is_high_priority_header

COMPLETION_LINES = (b"POST /v1/completions HTTP/1.1", b"POST /v1/chat/completions HTTP/1.1")
_HEADERS_END = b"\r\n\r\n"
# aiohttp's RequestHandler fields read here (``__slots__`` names).
_FIELDS: tuple[str, ...] = ("_messages", "_payload_parser", "_upgraded", "_close")
_FIELDS += ("_force_close", "_keepalive_timeout", "_next_keepalive_close_time", "_loop")
_FIELDS += ("_request_count", "_keepalive_handle")


@dataclass(frozen=True, slots=True)
class PlainRequest:
    """What the early answer needs of a request: whether the client asked to close, and the
    key it presented (None: no ``Authorization: Bearer``)."""

    close: bool
    bearer: str | None


def plain_completion(data: bytes, max_header_bytes: int) -> PlainRequest | None:
    """``data`` read as exactly one whole completion request that may be shed here, or None
    (then aiohttp reads it). High priority (``X-Baton-Priority: high`` or a negative value)
    is never shed before reading, so it is None too."""
    end = data.find(_HEADERS_END)
    if end < 0 or end > max_header_bytes:
        return None
    lines = data[:end].split(b"\r\n")
    if lines[0] not in COMPLETION_LINES:
        return None
    length = -1
    close = False
    bearer: str | None = None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        name = name.strip().lower()
        value = value.strip()
        if name == b"content-length":
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name in (b"transfer-encoding", b"expect", b"upgrade"):
            return None
        elif name == b"connection":
            close = b"close" in value.lower()
        elif name == b"x-baton-priority":
            if is_high_priority_header(value.decode("latin-1")):
                return None
        elif name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip().decode("latin-1")
    if length < 0 or len(data) != end + len(_HEADERS_END) + length:
        return None  # a body still on its way, or a second request behind this one
    return PlainRequest(close, bearer)


def reply_429(body: bytes, *, close: bool) -> bytes:
    """The whole HTTP response: ``body`` (OpenAI's error shape) with ``Retry-After: 1``."""
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Retry-After: 1\r\n"
        b"Content-Length: %d\r\n" % len(body)
    )
    if close:
        head += b"Connection: close\r\n"
    return head + b"\r\n" + body


def is_supported() -> bool:
    """Whether the installed aiohttp's connection handler has the fields read here, and the
    method that ends each answer to a parsed request (counted by ``_Handler``)."""
    slots: set[str] = set()
    for cls in RequestHandler.__mro__:
        slots.update(getattr(cls, "__slots__", ()))
    has_fields = all(name in slots for name in _FIELDS)
    return has_fields and inspect.iscoroutinefunction(
        getattr(RequestHandler, "finish_response", None)
    )


class EarlyShed:
    """The decision and the answer, shared by every connection of one server.

    ``is_shedding`` says whether to shed now; ``on_shed`` counts one shed and returns the
    error body. ``keys``: with API keys, only a request that presents a valid one is shed
    here (the others get their 401 from the handler, as they would without the lag)."""

    def __init__(
        self,
        is_shedding: Callable[[], bool],
        on_shed: Callable[[], bytes],
        *,
        max_header_bytes: int,
        keys: KeyChecker | None = None,
    ) -> None:
        self.is_shedding = is_shedding
        self.on_shed = on_shed
        self.max_header_bytes = max_header_bytes
        self.keys = keys

    def answer(self, data: bytes) -> tuple[bytes, bool] | None:
        """The response to write for ``data`` and whether to close after it, or None."""
        request = plain_completion(data, self.max_header_bytes)
        if request is None:
            return None
        if self.keys is not None and (
            request.bearer is None or not self.keys.is_valid(request.bearer)
        ):
            return None
        return reply_429(self.on_shed(), close=request.close), request.close


class _Handler(RequestHandler):
    """aiohttp's connection handler, answering the plain shed before aiohttp parses it."""

    __slots__ = ("_num_handled",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._num_handled = 0  # requests aiohttp parsed and answered whole on this connection
        self._messages = MessageQueue()  # type: ignore[assignment]

    async def finish_response(
        self, request: BaseRequest, resp: StreamResponse, start_time: float | None
    ) -> tuple[StreamResponse, bool]:
        """aiohttp's last step for every request it answers (after the handler returned),
        counted here: an override around the handler would keep one more coroutine frame
        alive for each stream's whole life."""
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._num_handled += 1

    def data_received(self, data: bytes) -> None:
        server = self._manager
        if isinstance(server, _Server) and server.early.is_shedding() and self._is_idle():
            answer = server.early.answer(data)
            if answer is not None:
                response, close = answer
                assert self.transport is not None  # data arrives only while connected
                self.transport.write(response)
                if close:
                    self.transport.close()
                elif self._keepalive_timeout > 0:
                    # The idle timer measures from this answer, as from a handler's.
                    self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
                return
        super().data_received(data)
        stop_idle_timer(self)

    def _is_idle(self) -> bool:
        """No request queued or in progress: every request aiohttp parsed on this connection
        has been answered whole (its response written to the end), so an answer written now
        cannot overtake one. Then the bytes that come next start a request, unless a client
        sends the rest of a body after its request was answered: those bytes go to aiohttp
        (they are not a whole completion request: ``plain_completion``)."""
        if self._messages or self._payload_parser is not None or self._upgraded:
            return False
        if self._close or self._force_close:
            return False
        return self._num_handled == self._request_count


class _Server(web.Server):
    """aiohttp's server, whose connections are ``_Handler``\\ s."""

    def __init__(self, early: EarlyShed, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.early = early

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class EarlyShedRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer the plain shed early (``EarlyShed``);
    where ``is_supported()`` is false, a plain ``web.AppRunner``."""

    def __init__(self, app: web.Application, early: EarlyShed, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._early = early

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if not is_supported():
            return server
        return _Server(
            self._early,
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **server._kwargs,
        )
