"""The reader's side of the TCP transport: one pipelined connection to one remote.

Requests go out in order; responses come back in the same order and each is received by the
read that asked for it, when its turn comes (no background task). A read cancelled midway
leaves a debt instead of a broken stream: the rest of its request is sent, and the rest of its
response (or all of it) skipped, by whichever read comes next. Bytes land in a read's
destination only inside its own ``recv_into`` calls, so nothing is written there after it
returns.
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
MAX_IOVECS: Final = 512
"""Destinations per ``recvmsg_into``/``sendmsg`` call (Linux allows 1,024)."""

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
        self._outgoing = bytearray()  # request bytes not yet sent
        self._num_queued_bytes = 0
        self._num_sent_bytes = 0
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
        self._raise_if_broken()
        pending = _Pending(asyncio.get_running_loop())
        # Queue the request and its bytes in one step, so wire order is queue order.
        self._queue.append(pending)
        self._outgoing += frame
        self._num_queued_bytes += len(frame)
        frame_end = self._num_queued_bytes
        self._num_active += 1
        if len(self._queue) == 1:
            pending.turn.set_result(None)
        has_header = False
        try:
            if self._num_sent_bytes < frame_end:
                await self._flush(frame_end)
            await pending.turn
            self._raise_if_broken()
            await self._skip_owed()
            status, length = await self._next_header()
            has_header = True
            self._owed_bytes = length  # ours now; whatever is left if we stop is skipped later
            if status != STATUS_OK:
                message = await self._receive_message(length)
                raise RangeNotRegistered(
                    f"{self._remote_name!r} refused the read: {message}",
                    remote_name=self._remote_name,
                )
            expected = sum(n for _, n in destinations)
            if length != expected:
                self.close(f"{self._remote_name!r} answered {length} bytes; asked {expected}")
                self._raise_if_broken()
            await self._receive_into([memory_view(address, n) for address, n in destinations])
        except BaseException as exc:
            if isinstance(exc, OSError):
                self.close(f"connection to {self._remote_name!r} failed: {exc!r}")
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

    async def _ready(self, *, is_write: bool) -> None:
        """Wait until the socket is readable (or writable) without consuming anything.

        Not ``loop.sock_recv_into``: if a read is cancelled just after that call received
        bytes, the count is lost with the exception and the stream falls out of step. Here
        bytes are only consumed by synchronous ``recv_into`` calls whose counts are recorded
        before the next await.
        """
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        fd = self._sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if is_write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if is_write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)

    async def _flush(self, frame_end: int) -> None:
        """Send queued request bytes until ``frame_end`` bytes in all have gone out. Progress
        lives in the connection, so a flush cut short by cancellation is finished by the next."""
        async with self._send_lock:
            while self._num_sent_bytes < frame_end:
                try:
                    count = self._sock.send(self._outgoing)
                except (BlockingIOError, InterruptedError):
                    await self._ready(is_write=True)
                    continue
                del self._outgoing[:count]
                self._num_sent_bytes += count

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                count = self._sock.recv_into(view)
            except (BlockingIOError, InterruptedError):
                await self._ready(is_write=False)
                continue
            if count == 0:
                self.close(f"{self._remote_name!r} closed the connection")
                self._raise_if_broken()
            return count

    async def _next_header(self) -> tuple[int, int]:
        view = memoryview(self._header)
        while self._header_filled < RESPONSE_HEADER.size:
            count = await self._recv_into(view[self._header_filled :])
            self._header_filled += count
        self._header_filled = 0
        status, length = RESPONSE_HEADER.unpack(self._header)
        return status, length

    async def _skip_owed(self) -> None:
        scratch = memoryview(self._scratch)
        while self._owed_bytes or self._owed_responses:
            if self._owed_bytes:
                count = await self._recv_into(scratch[: self._owed_bytes])
                self._owed_bytes -= count
            else:
                _, length = await self._next_header()
                self._owed_responses -= 1
                self._owed_bytes = length

    async def _receive_message(self, length: int) -> str:
        message = bytearray(length)
        view = memoryview(message)
        while self._owed_bytes:
            count = await self._recv_into(view[length - self._owed_bytes :])
            self._owed_bytes -= count
        return message.decode(errors="replace")

    async def _receive_into(self, views: list[memoryview]) -> None:
        """Fill ``views`` in order, scattering each ``recvmsg_into`` over up to ``MAX_IOVECS``
        destinations and ``RECV_CHUNK_BYTES`` (one syscall for many small KV blocks)."""
        index, offset = 0, 0
        num_unyielded = 0
        while index < len(views):
            buffers: list[memoryview] = []
            room = RECV_CHUNK_BYTES
            j, start = index, offset
            while j < len(views) and room > 0 and len(buffers) < MAX_IOVECS:
                piece = views[j][start : start + room]
                buffers.append(piece)
                room -= len(piece)
                j, start = j + 1, 0
            count = await self._recv_into_many(buffers)
            self._owed_bytes -= count
            num_unyielded += count
            while count:  # advance (index, offset) past what arrived
                step = min(count, len(views[index]) - offset)
                count -= step
                offset += step
                if offset == len(views[index]):
                    index, offset = index + 1, 0
            if num_unyielded >= RECV_CHUNK_BYTES and index < len(views):
                num_unyielded = 0
                await asyncio.sleep(0)  # data keeps coming without a wait: let the loop run

    async def _recv_into_many(self, buffers: list[memoryview]) -> int:
        while True:
            try:
                count = self._sock.recvmsg_into(buffers)[0]
            except (BlockingIOError, InterruptedError):
                await self._ready(is_write=False)
                continue
            if count == 0:
                self.close(f"{self._remote_name!r} closed the connection")
                self._raise_if_broken()
            return count
