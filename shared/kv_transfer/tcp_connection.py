"""The reader's side of the TCP transport: one pipelined connection to one remote.

Requests go out in order; responses come back in the same order and each is received by the
read that asked for it, when its turn comes (no background task). A read cancelled midway
leaves a debt instead of a broken stream: the rest of its response (or the whole of it, if it
had not started) is skipped by whichever read comes next. Bytes land in a read's destination
only inside its own ``sock_recv_into`` calls, so nothing is written there after it returns.
"""

import asyncio
import contextlib
import ctypes
import socket
import struct
from collections import deque
from typing import Final, Self

from shared.kv_transfer.base import RangeNotRegistered, RemoteUnavailable, TransferError

RESPONSE_HEADER: Final = struct.Struct("!BQ")
STATUS_OK: Final = 0
RECV_CHUNK_BYTES: Final = 1024 * 1024
"""At most this much is received per loop turn (~0.2 ms of copying)."""

SOCKET_BUFFER_BYTES: Final = 4 * 1024 * 1024


def memory_view(address: int, length: int) -> memoryview:
    """A writable view of ``length`` bytes at ``address`` in this process (no copy)."""
    return memoryview((ctypes.c_char * length).from_address(address)).cast("B")


class _Pending:
    """A request on the wire; ``turn`` resolves when its response is next."""

    __slots__ = ("is_abandoned", "turn")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.turn: asyncio.Future[None] = loop.create_future()
        self.is_abandoned = False


class Connection:
    """A pipelined connection to a remote's read server.

    After ``error`` is set (peer gone, protocol broken, closed) every read on it fails with
    that error; the agent then opens a new one.
    """

    def __init__(self, remote_name: str, sock: socket.socket) -> None:
        self._remote_name = remote_name
        self._sock = sock
        self._send_lock = asyncio.Lock()
        self._queue: deque[_Pending] = deque()
        self._header = bytearray(RESPONSE_HEADER.size)
        self._header_filled = 0  # a header read can be cancelled halfway too
        self._owed_responses = 0  # whole responses of abandoned reads, still to skip
        self._owed_bytes = 0  # the unread rest of the response being received
        self._scratch = bytearray(64 * 1024)
        self._num_active = 0  # reads between sending and their end; the last closes the socket
        self.error: TransferError | None = None

    @classmethod
    async def open(cls, remote_name: str, host: str, port: int) -> Self:
        """Connect; an unreachable server raises ``RemoteUnavailable``."""
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            family, kind, proto, _, address = infos[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise RemoteUnavailable(
                f"cannot resolve {remote_name!r} at {host}:{port}: {exc}", remote_name=remote_name
            ) from exc
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER_BYTES)
            await loop.sock_connect(sock, address)
        except BaseException as exc:
            sock.close()
            if isinstance(exc, OSError):
                raise RemoteUnavailable(
                    f"cannot connect to {remote_name!r} at {host}:{port}: {exc}",
                    remote_name=remote_name,
                ) from exc
            raise
        return cls(remote_name, sock)

    def close(self, reason: str) -> None:
        """Fail every read on this connection with ``RemoteUnavailable(reason)``. Idempotent."""
        if self.error is None:
            self.error = RemoteUnavailable(reason, remote_name=self._remote_name)
            # Shut down, not close: a read waiting in sock_recv_into wakes with end of stream,
            # whereas closing the fd under it would leave it waiting for its deadline.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._close_socket_if_idle()
            for pending in self._queue:
                if not pending.turn.done():
                    pending.turn.set_result(None)  # wake it; it sees ``error``
            self._queue.clear()

    async def request(self, frame: bytes, destinations: list[tuple[int, int]]) -> None:
        """Send ``frame`` and receive its response into ``destinations`` (address, length)."""
        loop = asyncio.get_running_loop()
        pending = _Pending(loop)
        async with self._send_lock:
            self._raise_if_broken()
            self._queue.append(pending)
            if len(self._queue) == 1:
                pending.turn.set_result(None)
            self._num_active += 1
            try:
                await loop.sock_sendall(self._sock, frame)
            except BaseException as exc:
                self.close(f"sending to {self._remote_name!r} failed: {exc!r}")  # half a frame
                self._num_active -= 1
                self._close_socket_if_idle()
                if isinstance(exc, OSError):
                    self._raise_if_broken(exc)
                raise
        has_header = False
        try:
            await pending.turn
            self._raise_if_broken()
            await self._skip_owed(loop)
            status, length = await self._next_header(loop)
            has_header = True
            self._owed_bytes = length  # ours now; whatever is left if we stop is skipped later
            if status != STATUS_OK:
                message = await self._receive_message(loop, length)
                raise RangeNotRegistered(
                    f"{self._remote_name!r} refused the read: {message}",
                    remote_name=self._remote_name,
                )
            expected = sum(n for _, n in destinations)
            if length != expected:
                self.close(f"{self._remote_name!r} answered {length} bytes; asked {expected}")
                self._raise_if_broken()
            for address, n in destinations:
                await self._receive_into(loop, memory_view(address, n))
        except BaseException as exc:
            if isinstance(exc, OSError):
                self.close(f"receiving from {self._remote_name!r} failed: {exc!r}")
                self._raise_if_broken(exc)
            if self.error is None and not has_header:
                if self._queue and self._queue[0] is pending:
                    self._owed_responses += 1
                else:
                    pending.is_abandoned = True
            raise
        finally:
            self._num_active -= 1
            if self.error is None and self._queue and self._queue[0] is pending:
                self._advance()
            self._close_socket_if_idle()

    def _close_socket_if_idle(self) -> None:
        if self.error is not None and self._num_active == 0:
            self._sock.close()

    def _raise_if_broken(self, cause: BaseException | None = None) -> None:
        if self.error is not None:
            raise RemoteUnavailable(self.error.message, remote_name=self._remote_name) from cause

    def _advance(self) -> None:
        """Pass the turn to the next read that still wants its response."""
        self._queue.popleft()
        while self._queue and self._queue[0].is_abandoned:
            self._queue.popleft()
            self._owed_responses += 1
        if self._queue and not self._queue[0].turn.done():
            self._queue[0].turn.set_result(None)

    async def _recv_into(self, loop: asyncio.AbstractEventLoop, view: memoryview) -> int:
        count = await loop.sock_recv_into(self._sock, view)
        if count == 0:
            self.close(f"{self._remote_name!r} closed the connection")
            self._raise_if_broken()
        return count

    async def _next_header(self, loop: asyncio.AbstractEventLoop) -> tuple[int, int]:
        view = memoryview(self._header)
        while self._header_filled < RESPONSE_HEADER.size:
            self._header_filled += await self._recv_into(loop, view[self._header_filled :])
        self._header_filled = 0
        status, length = RESPONSE_HEADER.unpack(self._header)
        return status, length

    async def _skip_owed(self, loop: asyncio.AbstractEventLoop) -> None:
        scratch = memoryview(self._scratch)
        while self._owed_bytes or self._owed_responses:
            if self._owed_bytes:
                self._owed_bytes -= await self._recv_into(loop, scratch[: self._owed_bytes])
            else:
                _, length = await self._next_header(loop)
                self._owed_responses -= 1
                self._owed_bytes = length

    async def _receive_message(self, loop: asyncio.AbstractEventLoop, length: int) -> str:
        message = bytearray(length)
        view = memoryview(message)
        while self._owed_bytes:
            start = length - self._owed_bytes
            self._owed_bytes -= await self._recv_into(loop, view[start:])
        return message.decode(errors="replace")

    async def _receive_into(self, loop: asyncio.AbstractEventLoop, view: memoryview) -> None:
        position = 0
        while position < len(view):
            count = await self._recv_into(loop, view[position : position + RECV_CHUNK_BYTES])
            position += count
            self._owed_bytes -= count
