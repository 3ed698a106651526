"""Every HTTP error in OpenAI's shape, also those no handler raised on purpose.

aiohttp answers some errors itself in plain text: an unknown path (404), a wrong method (405),
a body over ``client_max_size`` (413). The helpers here render them, oversized headers (431)
and any unexpected exception (500) as ``{"error": {"message", "type", "param", "code"}}``.
They are called by the handlers (``app.guarded``, ``app.complete``) and by a catch-all route
(``no_route``), not from an aiohttp middleware: a middleware's coroutine frame lives as long
as each stream it wraps (about 400 bytes a stream, two with aiohttp's own that comes with any
middleware), and a frontend holds tens of thousands of streams.
"""

import logging
from collections.abc import Mapping
from typing import TypedDict

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler

from services.frontend.render import error_body
from shared.errors import InvalidRequest, ServingError

logger = logging.getLogger(__name__)

# Response headers of an aiohttp error worth keeping on its OpenAI-shaped replacement.
_KEPT_HEADERS = ("Allow", "Retry-After", "WWW-Authenticate")
_OPENAI_TYPES = {401: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


class BodyTooLarge(InvalidRequest):
    http_status = 413


class HeadersTooLarge(InvalidRequest):
    http_status = 431


class HTTPStatusError(ServingError):
    """An error aiohttp raised (a route or method that does not exist, say), carried with its
    own status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def retry_after_seconds(retry_after_s: float) -> int:
    """A ``Retry-After`` header's whole seconds for ``retry_after_s``: at least 1."""
    return max(1, round(retry_after_s))


def json_error(
    error: ServingError,
    *,
    param: str | None = None,
    code: str | int | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """The OpenAI error response for ``error``, with its status and ``Retry-After``."""
    status = error.status if isinstance(error, HTTPStatusError) else error.http_status
    body = error_body(error, param, status if code is None else code)
    if isinstance(error, HTTPStatusError):
        body["error"]["type"] = _OPENAI_TYPES.get(status, "invalid_request_error")
    out = dict(headers or {})
    if error.retry_after_s is not None:
        out["Retry-After"] = str(retry_after_seconds(error.retry_after_s))
    return web.Response(
        body=msgspec.json.encode(body),
        status=status,
        content_type="application/json",
        headers=out,
    )


def _from_http_exception(request: web.BaseRequest, exc: web.HTTPException) -> web.Response:
    path = request.path if len(request.path) <= 200 else request.path[:200] + "..."
    if exc.status == 404:
        message = f"no such endpoint: {request.method} {path}"
    elif exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        message = f"method {request.method} is not allowed on {path} (allowed: {allowed})"
    elif exc.status == 413:
        message = f"request body is larger than {request.client_max_size} bytes"
    else:
        message = exc.reason if exc.text is None else exc.text
    headers = {name: exc.headers[name] for name in _KEPT_HEADERS if name in exc.headers}
    if exc.status == 413:
        return json_error(BodyTooLarge(message))
    return json_error(HTTPStatusError(exc.status, message), headers=headers)


def headers_too_large(request: web.BaseRequest, max_header_bytes: int) -> web.Response | None:
    """431 for a request whose headers total over ``max_header_bytes`` (names, values and
    their separators, as on the wire); None for the others."""
    size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
    if size <= max_header_bytes:
        return None
    return json_error(
        HeadersTooLarge(f"request headers total {size} bytes; the limit is {max_header_bytes}")
    )


def error_for(request: web.BaseRequest, exc: Exception) -> web.Response | None:
    """The answer to an exception a handler raised, or None where it must propagate (a
    redirect, a client that went away: there is nobody to answer)."""
    if isinstance(exc, web.HTTPException):
        return None if exc.status < 400 else _from_http_exception(request, exc)
    if isinstance(exc, ServingError):
        return json_error(exc)
    if isinstance(exc, ConnectionError):
        return None
    logger.error("unhandled error method=%s path=%s", request.method, request.path, exc_info=exc)
    return json_error(ServingError("internal error; see the frontend's log"))


def no_route(routes: Mapping[str, frozenset[str]]) -> Handler:
    """The handler of every request no route matched: 405 naming the allowed methods where
    the path has routes (``routes``: path to its methods), else 404."""

    async def answer(request: web.Request) -> web.StreamResponse:
        methods = routes.get(request.path)
        if methods is None:
            raise web.HTTPNotFound()
        raise web.HTTPMethodNotAllowed(request.method, methods)

    return answer


class ParserLimits(TypedDict):
    max_line_size: int
    max_field_size: int


def parser_limits(max_header_bytes: int) -> ParserLimits:
    """aiohttp's own parser bounds, as keyword arguments of ``web.AppRunner``: past them aiohttp
    answers a plain-text 400 itself (before any handler runs), so they sit well above
    ``max_header_bytes``, whose 431 is in OpenAI's shape."""
    return ParserLimits(max_line_size=4 * max_header_bytes, max_field_size=4 * max_header_bytes)
