"""What aiohttp keeps for each connection while its stream is open, trimmed.

A frontend holds tens of thousands of streams open at once, each for minutes, so whatever a
connection keeps for its life is multiplied by that. aiohttp keeps a few things sized for
busier connections than a stream's; the helpers here replace them once they can no longer
be used. They touch aiohttp's private fields, and ``tests/unit/test_conn_memory.py`` checks
the installed aiohttp against each assumption made here, so that an upgrade that breaks one
fails in CI rather than in production.
"""

from typing import Any

from aiohttp import StreamReader
from aiohttp.helpers import TimerNoop
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

# What a request body's reader holds once it has been read to its end: nothing more can
# arrive (aiohttp asserts that nothing is fed after the end), and reads find it empty. A
# tuple, not a shared deque: anything that tried to add to it would fail loudly rather
# than hand one connection's bytes to another.
_READ_TO_END: tuple[bytes, ...] = ()


class MessageQueue(list[Any]):
    """aiohttp's queue of the requests parsed on one connection and not yet handled, as a
    list: it is almost always empty or one deep, and an empty deque holds a block of 64
    slots (760 bytes) for as long as the connection is open. aiohttp uses only ``append``,
    ``popleft``, ``len`` and truth on it."""

    __slots__ = ()

    def popleft(self) -> Any:
        return self.pop(0)


class _NoCallbacks(list[Any]):
    """The end-of-body callbacks of a reader at its end: always empty (aiohttp runs a callback
    added after the end at once), shared, and loud if anything tries to add one."""

    __slots__ = ()

    def append(self, callback: Any) -> None:
        raise RuntimeError("a request body at its end takes no more callbacks")


_NO_CALLBACKS = _NoCallbacks()
_NO_TIMER = TimerNoop()  # stateless: one serves every reader


def release_body_buffer(reader: StreamReader) -> None:
    """Drop what a request body read to its end keeps until the response ends, a stream's
    whole life: an empty deque of 64 slots (760 bytes), an empty list of callbacks, and a
    no-op timer of its own."""
    if reader.is_eof() and not reader._buffer:
        reader._buffer = _READ_TO_END  # type: ignore[assignment]
        if not reader._eof_callbacks:
            reader._eof_callbacks = _NO_CALLBACKS
        if type(reader._timer) is TimerNoop:
            reader._timer = _NO_TIMER


def stop_idle_timer(handler: RequestHandler) -> None:
    """Cancel a connection's keep-alive timer once a request has been parsed on it. The timer
    closes a connection left idle; while a request is queued or handled it can do nothing,
    yet aiohttp keeps it (about 550 bytes with its handle and context) until it first fires,
    75 s into a stream. aiohttp starts it again after each response."""
    timer = handler._keepalive_handle
    if timer is not None and handler._messages:
        timer.cancel()
        handler._keepalive_handle = None


# What aiohttp's request may hold in its cache other than values it computed from the
# message: what ``clone()`` or an absolute-form target set, which cannot be computed again.
_CACHE_OVERRIDES = ("url", "host", "scheme", "remote")


def release_request_cache(request: BaseRequest) -> None:
    """Empty a request's cache of computed properties (its path, headers, URL, keep-alive...)
    once its response has started: aiohttp computes each again if asked, and nothing asks
    during a stream, while the cache's table (about 300 bytes) would be kept for its life.
    Values that could not be computed again are kept."""
    cache = request._cache
    kept = {name: cache[name] for name in _CACHE_OVERRIDES if name in cache}
    cache.clear()  # ``clear`` frees the table; removing keys one by one would not
    cache.update(kept)
