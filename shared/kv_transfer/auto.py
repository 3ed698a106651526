"""Choosing a transport: ``create_agent`` and the ``auto`` agent that picks one per remote.

The right transport depends on the pair (reader, owner), so an ``auto`` agent serves all of
its transports at once and the reader picks when it adds a remote: shm when the owner's
segments are visible here (same host and ``/dev/shm``), else nixl when both sides have it,
else tcp. Its memory comes from shared memory, which every transport can serve.
"""

import logging
from typing import assert_never

from shared.kv_transfer.base import (
    AgentKind,
    RemoteUnavailable,
    SingleTransportAgent,
    TransferAgent,
    TransportUnavailable,
    decode_metadata,
)
from shared.kv_transfer.metadata import AgentMetadata, encoder
from shared.kv_transfer.nixl import NixlAgent, nixl_status
from shared.kv_transfer.regions import Transfer
from shared.kv_transfer.shm import ShmAgent
from shared.kv_transfer.tcp import TcpAgent

logger = logging.getLogger(__name__)


def available_kinds() -> list[str]:
    """The transports this process can use, in the order ``auto`` prefers them."""
    return ["shm", "nixl", "tcp"] if nixl_status()[0] else ["shm", "tcp"]


class AutoAgent(TransferAgent):
    """Serves its memory over shm, tcp and (if installed) nixl; reads each remote over the best
    transport the two share. ``transport_of`` says which one a remote got."""

    kind = "auto"

    def __init__(
        self,
        name: str,
        *,
        tcp_host: str = "127.0.0.1",
        tcp_port: int = 0,
        use_nixl: bool | None = None,
    ) -> None:
        self._name = name
        self._transports: list[SingleTransportAgent] = []
        self._routes: dict[str, SingleTransportAgent] = {}
        self.is_closed = False
        try:
            self._shm = ShmAgent(name)
            self._transports.append(self._shm)
            if use_nixl or (use_nixl is None and nixl_status()[0]):
                try:
                    self._transports.append(NixlAgent(name))
                except TransportUnavailable:
                    if use_nixl:
                        raise
                    logger.warning("kv nixl installed but unusable; serving shm and tcp only")
            self._transports.append(TcpAgent(name, host=tcp_host, port=tcp_port))
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self._name

    def transport_of(self, remote_name: str) -> str:
        """The kind of transport reads from ``remote_name`` use."""
        return self._routes[remote_name].kind

    def allocate(self, num_bytes: int) -> memoryview:
        return self._shm.allocate(num_bytes)

    def register(self, address: int, length: int, device: str = "cpu") -> None:
        """Register with every transport; shm goes first, as it accepts the least memory."""
        for transport in self._transports:
            transport.register(address, length, device)

    def metadata(self) -> bytes:
        described = [transport.describe() for transport in self._transports]
        return encoder.encode(
            AgentMetadata(
                kind=self.kind,
                name=self._name,
                host=described[0].host,
                regions=described[0].regions,
                shm=next((d.shm for d in described if d.shm is not None), None),
                tcp=next((d.tcp for d in described if d.tcp is not None), None),
                nixl=next((d.nixl for d in described if d.nixl is not None), None),
            )
        )

    def add_remote(self, metadata: bytes) -> str:
        """Attach with the first transport in preference order that reaches the remote."""
        remote = decode_metadata(metadata)
        reasons = []
        for transport in self._transports:
            try:
                transport.add_remote(metadata)
            except TransportUnavailable as exc:
                reasons.append(exc.message)
                continue
            previous = self._routes.get(remote.name)
            if previous is not None and previous is not transport:
                previous.remove_remote(remote.name)
            self._routes[remote.name] = transport
            return remote.name
        raise TransportUnavailable(
            f"no transport reaches {remote.name!r}: " + "; ".join(reasons),
            remote_name=remote.name,
        )

    def remove_remote(self, name: str) -> None:
        transport = self._routes.pop(name, None)
        if transport is not None:
            transport.remove_remote(name)

    async def read(self, remote_name: str, transfers: list[Transfer]) -> None:
        transport = self._routes.get(remote_name)
        if self.is_closed:
            raise RemoteUnavailable(f"agent {self._name!r} is closed", remote_name=remote_name)
        if transport is None:
            raise RemoteUnavailable(
                f"no remote agent named {remote_name!r}; call add_remote first",
                remote_name=remote_name,
            )
        await transport.read(remote_name, transfers)

    def close(self) -> None:
        self.is_closed = True
        for transport in reversed(self._transports):
            transport.close()
        self._routes.clear()


def create_agent(
    kind: AgentKind,
    name: str,
    *,
    tcp_host: str = "127.0.0.1",
    tcp_port: int = 0,
    use_nixl: bool | None = None,
    nixl_progress_thread: bool = False,
) -> TransferAgent:
    """An agent of ``kind``; ``auto`` serves every transport and picks per remote.

    ``tcp_host``/``tcp_port`` are where a tcp server binds (port 0: any free port) and what
    peers are told; ``use_nixl`` (auto only) forces NIXL on or off, by default on where
    installed; ``nixl_progress_thread`` is needed only when peers reach a nixl owner over
    UCX's TCP transport. Raises ``TransportUnavailable`` for nixl without NIXL installed.
    """
    match kind:
        case "auto":
            return AutoAgent(name, tcp_host=tcp_host, tcp_port=tcp_port, use_nixl=use_nixl)
        case "shm":
            return ShmAgent(name)
        case "tcp":
            return TcpAgent(name, host=tcp_host, port=tcp_port)
        case "nixl":
            return NixlAgent(name, progress_thread=nixl_progress_thread)
        case _:
            assert_never(kind)
