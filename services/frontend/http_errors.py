"""Every HTTP error in OpenAI's shape, also those no handler raised on purpose.

aiohttp answers some errors itself in plain text: an unknown path (404), a wrong method (405),
a body over ``client_max_size`` (413). The middleware here renders them, oversized headers
(431) and any unexpected exception (500) as ``{"error": {"message", "type", "param", "code"}}``.
"""

import logging
from collections.abc import Mapping
from typing import TypedDict

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

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
        out["Retry-After"] = str(max(1, round(error.retry_after_s)))
    return web.Response(
        body=msgspec.json.encode(body),
        status=status,
        content_type="application/json",
        headers=out,
    )


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
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


def openai_errors(max_header_bytes: int) -> Middleware:
    """The outermost middleware: whatever goes wrong, the client gets an OpenAI error, and
    a request whose headers total over ``max_header_bytes`` (names, values and their
    separators, as on the wire) gets 431. One middleware for both, since each one's frame
    lives as long as the stream it wraps."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        size = sum(len(name) + len(value) + 4 for name, value in request.raw_headers)
        if size > max_header_bytes:
            return json_error(
                HeadersTooLarge(
                    f"request headers total {size} bytes; the limit is {max_header_bytes}"
                )
            )
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _from_http_exception(request, exc)
        except ServingError as exc:
            return json_error(exc)
        except ConnectionError:
            raise  # the client went away: nobody to answer
        except Exception:
            logger.exception("unhandled error method=%s path=%s", request.method, request.path)
            return json_error(ServingError("internal error; see the frontend's log"))

    return errors


class ParserLimits(TypedDict):
    max_line_size: int
    max_field_size: int


def parser_limits(max_header_bytes: int) -> ParserLimits:
    """aiohttp's own parser bounds, as keyword arguments of ``web.AppRunner``: past them aiohttp
    answers a plain-text 400 itself (before any middleware runs), so they sit well above
    ``max_header_bytes``, whose 431 is in OpenAI's shape."""
    return ParserLimits(max_line_size=4 * max_header_bytes, max_field_size=4 * max_header_bytes)
