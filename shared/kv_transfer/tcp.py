"""Transport that works anywhere: the owner serves reads over TCP, the reader receives in place.

The owner's read server (``tcp_server``) streams each requested range straight from registered
memory. The reader (``tcp_connection``) keeps one connection per remote and pipelines requests
on it; responses are received straight into the local destinations, at most
``RECV_CHUNK_BYTES`` per loop turn.
"""

import asyncio
import logging

import msgspec

from shared.kv_transfer.base import (
    RemoteUnavailable,
    SingleTransportAgent,
    TransportUnavailable,
)
from shared.kv_transfer.metadata import AgentMetadata, TcpEndpoint, encoder, host_name
from shared.kv_transfer.regions import Transfer
from shared.kv_transfer.tcp_connection import Connection
from shared.kv_transfer.tcp_server import REQUEST_HEADER, ReadRequest, ReadServer

logger = logging.getLogger(__name__)


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
        self._connecting.pop(name, None)
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
