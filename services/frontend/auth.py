"""API keys: a gate that lets through only requests bearing a known key.

Clients send ``Authorization: Bearer <key>``, as the OpenAI SDK does with ``api_key=``. A
missing or wrong key gets 401 in OpenAI's shape (``invalid_request_error``,
``invalid_api_key``). Keys are compared as SHA-256 digests with ``hmac.compare_digest``, every
key every time, so the answer's timing says nothing about how much of a key was right, nor which.
"""

import hashlib
import hmac
import logging
from collections.abc import Iterable

from aiohttp import web

from services.frontend.http_errors import json_error
from shared.errors import ServingError

logger = logging.getLogger(__name__)

# Always open: liveness and readiness probes carry no key, and the API description is public.
OPEN_PATHS = frozenset({"/health", "/ready", "/openapi.json"})
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="baton"'}


class Unauthorized(ServingError):
    http_status = 401
    openai_type = "invalid_request_error"


def load_api_keys(api_key: str, api_key_file: str) -> list[str]:
    """Keys from a comma-separated list and a file of one key a line (blank lines and lines
    starting with ``#`` skipped). No keys at all: the API is open."""
    keys = [k.strip() for k in api_key.split(",") if k.strip()]
    if api_key_file:
        try:
            with open(api_key_file, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise ValueError(f"api_key_file {api_key_file!r}: {exc.strerror}") from exc
        from_file = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        if not from_file:
            raise ValueError(f"api_key_file {api_key_file!r} holds no keys")
        keys.extend(from_file)
    if any(any(c.isspace() for c in k) for k in keys):
        raise ValueError("API keys must not contain whitespace")
    return keys


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class KeyChecker:
    """Whether a presented key is one of the configured ones, in constant time."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]
        if not self._digests:
            raise ValueError("KeyChecker needs at least one key")

    def is_valid(self, key: str) -> bool:
        given = _digest(key)
        matched = False
        for digest in self._digests:  # no early exit: every key is compared
            matched |= hmac.compare_digest(given, digest)
        return matched


def _bearer(request: web.BaseRequest) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


class KeyGate:
    """``/health``, ``/ready``, ``/openapi.json`` (and ``/metrics`` while
    ``is_metrics_open``) are open; every other path needs a key. Asked by each handler first
    (``app.Gate``)."""

    def __init__(self, keys: Iterable[str], *, is_metrics_open: bool) -> None:
        self._checker = KeyChecker(keys)
        self._open_paths = OPEN_PATHS | {"/metrics"} if is_metrics_open else OPEN_PATHS

    def refuse(self, request: web.BaseRequest) -> web.Response | None:
        """401 for a request that needs a key and lacks a valid one; None for the others."""
        if request.path in self._open_paths:
            return None
        key = _bearer(request)
        if key is None:
            message = (
                "You didn't provide an API key. Send it in the Authorization header "
                "as 'Authorization: Bearer YOUR_KEY'."
            )
        elif self._checker.is_valid(key):
            return None
        else:
            message = "Incorrect API key provided."
        logger.debug("unauthorized method=%s path=%s", request.method, request.path)
        return json_error(Unauthorized(message), code="invalid_api_key", headers=_CHALLENGE)
