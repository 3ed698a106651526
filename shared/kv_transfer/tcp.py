"""Transport that works anywhere: the owner serves reads over TCP, the reader receives in place.

The owner's read server runs an asyncio loop on a thread of its own, so reads are served while
the owner's own loop is busy; it streams each requested range straight from registered memory
(``sock_sendall`` of a view, no copy). The reader keeps one connection per remote and pipelines
requests on it; responses arrive in request order and are received straight into the local
destination (``sock_recv_into``), at most ``RECV_CHUNK_BYTES`` per loop turn.

Wire: request = ``!I`` length + msgpack ``ReadRequest``; response = ``!BQ`` (status, length) +
that many bytes (the ranges' bytes in order, or a UTF-8 error message).
"""

import asyncio
import contextlib
import logging
import socket
import struct
import threading
from typing import Final

import msgspec

from shared.kv_transfer.base import (
    RemoteUnavailable,
    SingleTransportAgent,
    TransportUnavailable,
)
from shared.kv_transfer.metadata import AgentMetadata, TcpEndpoint, encoder, host_name
from shared.kv_transfer.regions import RegionSet, Transfer, first_uncovered
from shared.kv_transfer.tcp_connection import Connection, memory_view

logger = logging.getLogger(__name__)

REQUEST_HEADER: Final = struct.Struct("!I")
RESPONSE_HEADER: Final = struct.Struct("!BQ")
STATUS_OK: Final = 0
STATUS_NOT_REGISTERED: Final = 1
MAX_REQUEST_BYTES: Final = 64 * 1024 * 1024


class ReadRequest(msgspec.Struct, frozen=True, array_like=True):
    """Ranges of the owner's memory to stream back, in order."""

    ranges: list[tuple[int, int]]


request_decoder: Final = msgspec.msgpack.Decoder(ReadRequest)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    """``n`` bytes, or fewer only at end of stream."""
    buffer = bytearray(n)
    view = memoryview(buffer)
    received = 0
    while received < n:
        count = await loop.sock_recv_into(sock, view[received:])
        if count == 0:
            break
        received += count
    return bytes(buffer[:received])


class ReadServer:
    """Answers read requests for ``regions`` on ``(host, port)`` from its own thread.

    Started by the constructor (the port is bound before it returns); ``stop`` is idempotent
    and joins the thread.
    """

    def __init__(self, agent_name: str, regions: RegionSet, host: str, port: int) -> None:
        self._regions = regions
        self._sock = socket.create_server((host, port), backlog=128)
        self._sock.setblocking(False)
        self.port: int = self._sock.getsockname()[1]
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), name=f"kv-tcp-{agent_name}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=10.0):
            raise TransportUnavailable(f"kv tcp server for {agent_name!r} did not start")

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None and self._thread.is_alive():
            # RuntimeError: the loop closed between the check and the call.
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():
            logger.warning("kv tcp server thread did not stop port=%d", self.port)

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()
        self._ready.set()
        try:
            async with asyncio.TaskGroup() as tg:
                accepting = tg.create_task(self._accept(connections))
                await self._stopping.wait()
                accepting.cancel()
        finally:
            for task in connections:
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            self._sock.close()

    async def _accept(self, connections: set[asyncio.Task[None]]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # out of fds, say: keep serving the connections we have
                logger.warning("kv tcp accept failed port=%d error=%r", self.port, exc)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._handle(conn))
            connections.add(task)
            task.add_done_callback(connections.discard)

    async def _handle(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with conn:
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while await self._serve_one(loop, conn):
                    pass
            except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.debug("kv tcp connection dropped error=%r", exc)

    async def _serve_one(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> bool:
        """Answer one request; False at end of stream."""
        header = await _recv_exactly(loop, conn, REQUEST_HEADER.size)
        if len(header) < REQUEST_HEADER.size:
            return False
        (size,) = REQUEST_HEADER.unpack(header)
        if size > MAX_REQUEST_BYTES:
            raise msgspec.DecodeError(f"request of {size} bytes; at most {MAX_REQUEST_BYTES}")
        body = await _recv_exactly(loop, conn, size)
        if len(body) < size:
            return False
        ranges = request_decoder.decode(body).ranges
        bad = first_uncovered(self._regions, ranges)
        if bad is not None:
            message = f"address={bad[0]:#x} length={bad[1]} is not registered".encode()
            await loop.sock_sendall(
                conn, RESPONSE_HEADER.pack(STATUS_NOT_REGISTERED, len(message)) + message
            )
            return True
        total = sum(length for _, length in ranges)
        await loop.sock_sendall(conn, RESPONSE_HEADER.pack(STATUS_OK, total))
        for address, length in ranges:
            await loop.sock_sendall(conn, memory_view(address, length))
        return True


class TcpAgent(SingleTransportAgent):
    """Serves registered memory over TCP and reads peers' the same way.

    ``host`` is where the server binds and what peers are told to connect to (a wildcard bind
    advertises this machine's hostname). Any local memory can be registered; keep it mapped
    until ``close()``.
    """

    kind = "tcp"

    def __init__(self, name: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(name)
        self._server = ReadServer(name, self._local, host, port)
        self._host = host_name() if host in ("", "0.0.0.0", "::") else host
        self._connections: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Lock] = {}

    def describe(self) -> AgentMetadata:
        endpoint = TcpEndpoint(host=self._host, port=self._server.port)
        return msgspec.structs.replace(super().describe(), tcp=endpoint)

    def _attach(self, remote: AgentMetadata, previous: AgentMetadata | None) -> None:
        if remote.tcp is None:
            raise TransportUnavailable(
                f"{remote.name!r} offers no tcp endpoint", remote_name=remote.name
            )
        if previous is not None and previous.tcp != remote.tcp:
            self._detach(remote.name)

    def _detach(self, name: str) -> None:
        connection = self._connections.pop(name, None)
        if connection is not None:
            connection.close(f"remote {name!r} was removed")

    async def _connection(self, remote: AgentMetadata) -> Connection:
        connection = self._connections.get(remote.name)
        if connection is not None and connection.error is None:
            return connection
        lock = self._connecting.setdefault(remote.name, asyncio.Lock())
        async with lock:
            connection = self._connections.get(remote.name)
            if connection is None or connection.error is not None:
                assert remote.tcp is not None  # _attach checked
                connection = await Connection.open(remote.name, remote.tcp.host, remote.tcp.port)
                if self.is_closed or remote.name not in self._remotes:
                    connection.close("agent closed or remote removed while connecting")
                    raise RemoteUnavailable(
                        f"{remote.name!r} is no longer reachable from {self.name!r}",
                        remote_name=remote.name,
                    )
                self._connections[remote.name] = connection
            return connection

    async def _read(self, remote: AgentMetadata, transfers: list[Transfer]) -> None:
        connection = await self._connection(remote)
        body = encoder.encode(ReadRequest([(address, length) for address, _, length in transfers]))
        try:
            await connection.request(
                REQUEST_HEADER.pack(len(body)) + body,
                [(local, length) for _, local, length in transfers],
            )
        finally:
            if connection.error is not None and self._connections.get(remote.name) is connection:
                del self._connections[remote.name]

    def _close(self) -> None:
        self._server.stop()
        for name in list(self._connections):
            self._detach(name)
