"""The cheapest 429 there is: answered from the connection's ``data_received``.

A frontend sheds a completion request for two reasons: its own loop lags (``LoopPressure``;
then before the body is read, ``app._under_pressure``), or the workers' load reports say
no worker can give it its first token in time (the early check, ``app._early_check``).
Through aiohttp either answer still costs a request object, a task, the route, the handler
and a response object: about 400 µs of CPU each on this project's 2-core machine, against
about 70 µs for a bare protocol that writes a canned reply (``bench/shed_cost.py``). At ten
times a worker's capacity the sheds are most of what a frontend does, so their price
decides how much CPU is left for the streams it serves.

Here a connection's handler answers the plain case itself, from the raw bytes, before
aiohttp parses them: one whole ``POST`` to a completion path in one read, with a
``Content-Length`` body, on a keep-alive connection with no request in progress, and not
marked high priority. While the loop lags it sheds the fraction of such requests the lag
calls for, unread. While the early check has been shedding (its last answer was a shed), it
decodes the body and runs the same check (``EarlyShed.check``); a request the check
passes, or one with anything to say first (a bad body, an unknown model), goes on to aiohttp
and is decoded again there. Everything
else (a body still on its way, chunked bodies, pipelined requests, ``Expect``, HTTP/1.0, a
missing or wrong API key) goes through aiohttp and the handler's own checks, which give
the same 429 or the error that comes first. The handler reads a few of aiohttp's private
fields to know the connection is idle; ``is_supported`` says whether the installed aiohttp
still has them, and without them nothing changes.
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
    """What the early answer needs of a request: whether the client asked to close, the key
    it presented (None: no ``Authorization: Bearer``), whether it is a chat completion, its
    ``X-Baton-*`` headers, the only ones the check reads (names as sent, values decoded as
    Latin-1), and its body."""

    close: bool
    bearer: str | None
    is_chat: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


_BATON_HEADER = b"x-baton-"
_NOT_PLAIN = (b"transfer-encoding", b"expect", b"upgrade")


def plain_completion(data: bytes, max_header_bytes: int) -> PlainRequest | None:
    """``data`` read as exactly one whole completion request that may be shed here, or None
    (then aiohttp reads it). High priority (``X-Baton-Priority: high`` or a negative value)
    is never shed before reading, so it is None too. At ten times a worker's capacity this
    runs thousands of times a second: only the headers it acts on are decoded."""
    end = data.find(_HEADERS_END)
    if end < 0 or end > max_header_bytes:
        return None
    lines = data[:end].split(b"\r\n")
    if lines[0] not in COMPLETION_LINES:
        return None
    length = -1
    close = False
    bearer: str | None = None
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        raw_name, sep, value = line.partition(b":")
        if not sep:
            return None
        name = raw_name.strip().lower()
        if name == b"content-length":
            value = value.strip()
            if length >= 0 or not value.isdigit():
                return None
            length = int(value)
        elif name.startswith(_BATON_HEADER):
            text = value.strip().decode("latin-1")
            if name == b"x-baton-priority" and is_high_priority_header(text):
                return None
            headers.append((raw_name.strip().decode("latin-1"), text))
        elif name in _NOT_PLAIN:
            return None
        elif name == b"connection":
            close = b"close" in value.lower()
        elif name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                bearer = token.strip().decode("latin-1")
    start = end + len(_HEADERS_END)
    if length < 0 or len(data) != start + length:
        return None  # a body still on its way, or a second request behind this one
    is_chat = lines[0] == COMPLETION_LINES[1]
    return PlainRequest(close, bearer, is_chat, tuple(headers), data[start:])


def reply_429(body: bytes, *, close: bool, retry_after_s: int = 1) -> bytes:
    """The whole HTTP response: ``body`` (OpenAI's error shape) with ``Retry-After``."""
    head = (
        b"HTTP/1.1 429 Too Many Requests\r\n"
        b"Content-Type: application/json; charset=utf-8\r\n"
        b"Retry-After: %d\r\n"
        b"Content-Length: %d\r\n" % (retry_after_s, len(body))
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


# What ``EarlyShed.check`` answers for a request the early check sheds: the error body and
# its Retry-After in seconds.
CheckedShed = tuple[bytes, int]


class EarlyShed:
    """The decisions and the answers, shared by every connection of one server.

    ``is_shedding`` says whether to shed unread now (the loop lags) and ``draws_shed``
    whether this request is one of those shed (a process sheds a fraction while it lags:
    ``LoopPressure``); ``on_shed`` counts one such shed and returns the error body.
    ``is_checking`` says whether to run the early check on the connection now, and ``check``
    runs it: the answer for a request it sheds (counted), or None. ``keys``: with API keys,
    only a request that presents a valid one is answered here (the others get their 401
    from the handler, as they would otherwise)."""

    def __init__(
        self,
        is_shedding: Callable[[], bool],
        on_shed: Callable[[], bytes],
        *,
        max_header_bytes: int,
        keys: KeyChecker | None = None,
        is_checking: Callable[[], bool] = lambda: False,
        check: Callable[[PlainRequest], CheckedShed | None] = lambda _: None,
        draws_shed: Callable[[], bool] = lambda: True,
    ) -> None:
        self.is_shedding = is_shedding
        self.draws_shed = draws_shed
        # Whether the last ``answer`` drew for its request and let it pass: the handler then
        # does not draw again for it (read at once after the call, on the same loop).
        self.passed_draw = False
        self.on_shed = on_shed
        self.max_header_bytes = max_header_bytes
        self.keys = keys
        self.is_checking = is_checking
        self.check = check

    def is_active(self) -> bool:
        """Whether a connection should look at its bytes before aiohttp does."""
        return self.is_shedding() or self.is_checking()

    def answer(self, data: bytes) -> tuple[bytes, bool] | None:
        """The response to write for ``data`` and whether to close after it, or None."""
        self.passed_draw = False
        request = plain_completion(data, self.max_header_bytes)
        if request is None:
            return None
        if self.keys is not None and (
            request.bearer is None or not self.keys.is_valid(request.bearer)
        ):
            return None
        if self.is_shedding():
            if self.draws_shed():
                return reply_429(self.on_shed(), close=request.close), request.close
            self.passed_draw = True
        shed = self.check(request) if self.is_checking() else None
        if shed is None:
            return None
        body, retry_after_s = shed
        return reply_429(body, close=request.close, retry_after_s=retry_after_s), request.close


class _Handler(RequestHandler):
    """aiohttp's connection handler, answering the plain shed before aiohttp parses it."""

    __slots__ = ("_num_handled", "passed_lag_draw")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._num_handled = 0  # requests aiohttp parsed and answered whole on this connection
        # The request in the last bytes read was drawn for the lag shed here and passed
        # (``passed_lag_draw``): the handler does not draw for it again.
        self.passed_lag_draw = False
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
        self.passed_lag_draw = False
        if isinstance(server, _Server) and server.early.is_active() and self._is_idle():
            answer = server.early.answer(data)
            self.passed_lag_draw = server.early.passed_draw
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
