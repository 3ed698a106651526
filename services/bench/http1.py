"""A lean HTTP/1.1 client for the load generator: keep-alive connections, one request at a
time on each, and the response read in the connection's ``data_received`` callback.

The load client shares the machine with the server it measures, so every microsecond it
spends is taken from the server. Through aiohttp's client a refused request cost this client
about 680 µs of CPU on this project's 2-core machine, and at ten times a worker's capacity
(2,000 requests a second) the client alone needed more than a core. Here a request is one
pre-built ``bytes`` written to the socket; the status line, the headers, a
``Content-Length`` or chunked body and its lines are parsed as they arrive, with no task,
stream reader or response object per request. Plain ``http://`` only (the client keeps
aiohttp for ``https://``).
"""

import asyncio
import collections
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

_CRLF = b"\r\n"
_MAX_HEAD_BYTES = 64 * 1024
_MAX_LINE_BYTES = 16 * 1024 * 1024  # one SSE line (an event); more is a broken server


class ProtocolError(Exception):
    """The server's bytes are not an HTTP/1.1 response this client can read."""


class Response:
    """One response as it arrives: ``done`` resolves once the whole body is in. A 200's body
    goes line by line to ``on_line`` (without the line ending) as it arrives; any other
    status's body is kept whole (``body``)."""

    __slots__ = (
        "_buffer",
        "_left",
        "_line",
        "_state",
        "body",
        "done",
        "headers",
        "keep_alive",
        "on_line",
        "status",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop, on_line: Callable[[bytes], None]) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.on_line = on_line
        self.status = 0
        self.headers: dict[str, str] = {}
        self.keep_alive = True
        self.body = bytearray()
        self._buffer = bytearray()
        self._line = bytearray()
        self._state = "head"  # head, length, chunk-size, chunk, chunk-end, trailer, eof, done
        self._left = 0  # body bytes still to come in this length or chunk

    def feed(self, data: bytes) -> None:
        """Parse what arrived; raises ``ProtocolError`` on a malformed response."""
        buffer = self._buffer
        buffer += data
        while buffer and self._state != "done":
            state = self._state
            if state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > _MAX_HEAD_BYTES:
                        raise ProtocolError("response headers too long")
                    return
                self._read_head(bytes(buffer[:end]))
                del buffer[: end + 4]
            elif state in ("length", "chunk"):  # ``_left`` more bytes of body
                take = min(self._left, len(buffer))
                self._body(bytes(buffer[:take]))
                del buffer[:take]
                self._left -= take
                if self._left:
                    continue
                if state == "length":
                    self._finish()
                else:
                    self._state = "chunk-end"
            elif state == "eof":  # read to the end of the connection
                self._body(bytes(buffer))
                buffer.clear()
            elif state == "chunk-size":
                end = buffer.find(_CRLF)
                if end < 0:
                    return
                size_text = bytes(buffer[:end]).split(b";", 1)[0].strip()
                try:
                    size = int(size_text, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
                del buffer[: end + 2]
                self._left = size
                self._state = "chunk" if size else "trailer"
            elif state == "chunk-end":
                if len(buffer) < 2:
                    return
                if buffer[:2] != _CRLF:
                    raise ProtocolError("chunk not followed by CRLF")
                del buffer[:2]
                self._state = "chunk-size"
            elif state == "trailer":  # trailer fields, if any, then an empty line
                end = buffer.find(_CRLF)
                if end < 0:
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._finish()
        if self._state == "done" and buffer:
            raise ProtocolError("bytes after the response")

    def eof(self) -> None:
        """The connection ended: the end of a body read to the end, else a truncated one."""
        if self._state == "eof":
            self._finish()
        elif self._state != "done":
            raise ConnectionResetError("the server closed the connection mid-response")

    def _read_head(self, head: bytes) -> None:
        lines = head.split(_CRLF)
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        self.status, self.headers = status, headers
        connection = headers.get("connection", "").lower()
        self.keep_alive = parts[0] == b"HTTP/1.1" and "close" not in connection
        if 100 <= status < 200:
            raise ProtocolError(f"interim response {status} (not sent for, not read)")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self._state = "chunk-size"
        elif "content-length" in headers:
            length = headers["content-length"]
            if not length.isdigit():
                raise ProtocolError(f"bad Content-Length {length[:20]!r}")
            self._left = int(length)
            self._state = "length" if self._left else "done"
        elif status in (204, 304):
            self._state = "done"
        else:
            self._state, self.keep_alive = "eof", False
        if self._state == "done":
            self._finish()

    def _body(self, data: bytes) -> None:
        if self.status != 200:
            self.body += data
            return
        line = self._line
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                line += data[start:]
                if len(line) > _MAX_LINE_BYTES:
                    raise ProtocolError("a line of the stream is too long")
                return
            if line:
                line += data[start:end]
                whole = bytes(line).rstrip(b"\r")
                line.clear()
            else:
                whole = data[start:end].rstrip(b"\r")
            self.on_line(whole)
            start = end + 1

    def _finish(self) -> None:
        self._state = "done"
        if self._line:
            self.on_line(bytes(self._line).rstrip(b"\r"))
            self._line.clear()
        if not self.done.done():
            self.done.set_result(None)


class _Connection(asyncio.Protocol):
    __slots__ = ("closed", "response", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # nothing asked: a server talking out of turn
            self.abort()
            return
        try:
            response.feed(data)
        except Exception as exc:
            self._fail(exc)

    def eof_received(self) -> bool:
        response = self.response
        if response is not None:
            try:
                response.eof()
            except Exception as exc:
                self._fail(exc)
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        response = self.response
        if response is not None and not response.done.done():
            self._fail(exc or ConnectionResetError("the server closed the connection"))

    def _fail(self, exc: BaseException) -> None:
        response = self.response
        assert response is not None
        if not response.done.done():
            response.done.set_exception(exc)
        self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class Client:
    """Keep-alive connections to one ``http://host:port``; a connection is reused once its
    response is read whole, and dropped on any trouble."""

    def __init__(
        self,
        url: str,
        *,
        local_addr: tuple[str, int] | None = None,
        connect_timeout_s: float | None = None,
    ) -> None:
        """``local_addr``: connect from this address (a load client spreads its processes
        over 127.0.0.x, each with its own ephemeral ports); ``connect_timeout_s`` bounds a
        new connection's handshake (``TimeoutError``), inside whatever bounds the request."""
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"http1.Client speaks plain http://, not {url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path_prefix = parts.path.rstrip("/")
        authority = self.host if parts.port is None else f"{self.host}:{parts.port}"
        self._host_header = authority.encode("idna")
        self.local_addr = local_addr
        self.connect_timeout_s = connect_timeout_s
        self._idle: collections.deque[_Connection] = collections.deque()

    def post_bytes(self, path: str, body: bytes, content_type: str = "application/json") -> bytes:
        """The whole request, built once (before it is due)."""
        target = (self.path_prefix + path).encode("ascii")
        return (
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Accept: text/event-stream, application/json\r\n\r\n%s"
            % (target, self._host_header, content_type.encode("ascii"), len(body), body)
        )

    async def send(self, request: bytes, response: Response) -> bool:
        """Write ``request`` on an idle connection (or a new one) and read ``response`` to
        its end; whether it opened a new connection for it. Raises ``OSError`` /
        ``ProtocolError`` (the connection is then dropped). Cancelled, the connection is
        dropped too (half a response must not be reused)."""
        loop = asyncio.get_running_loop()
        connection = self._take_idle()
        opened = connection is None
        if connection is None:
            async with asyncio.timeout(self.connect_timeout_s):
                _, connection = await loop.create_connection(
                    _Connection, self.host, self.port, local_addr=self.local_addr
                )
        assert connection.transport is not None
        connection.response = response
        try:
            connection.transport.write(request)
            await response.done
        except BaseException:
            connection.response = None  # nobody waits for it any more
            connection.abort()
            raise
        connection.response = None
        if response.keep_alive and not connection.closed:
            self._idle.append(connection)
        else:
            connection.abort()
        return opened

    def _take_idle(self) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    def close(self) -> None:
        while self._idle:
            self._idle.pop().abort()
