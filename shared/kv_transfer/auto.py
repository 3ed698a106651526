"""Choosing a transport: ``create_agent`` and the ``auto`` agent that picks one per remote.

The right transport depends on the pair (reader, owner) and on where the memory is, so an
``auto`` agent serves all of its transports at once and the reader picks when it adds a remote,
among the transports that handle both sides' devices:

- host memory: shm when the owner's segments are visible here (same host and ``/dev/shm``),
  else nixl when both sides have it, else tcp. The memory comes from shared memory
  (``allocate``), which every one of them can serve.
- GPU memory: cuda_ipc when the owner runs on this machine, else nixl (VRAM; GPU-direct RDMA
  where UCX has it). shm and tcp cannot serve GPU memory.

NIXL and CUDA IPC are set up when the first region is registered, so an agent that serves only
host memory never imports torch, and NIXL gets the progress thread that GPU memory needs.
"""

import logging
from collections.abc import Iterable
from typing import assert_never

from shared.kv_transfer.base import (
    AgentKind,
    RemoteUnavailable,
    SingleTransportAgent,
    TransferAgent,
    TransferError,
    TransportUnavailable,
    decode_metadata,
)
from shared.kv_transfer.cuda_ipc import CudaIpcAgent, cuda_ipc_status
from shared.kv_transfer.metadata import AgentMetadata, RegionDesc, encoder
from shared.kv_transfer.nixl import NixlAgent, nixl_status
from shared.kv_transfer.regions import Transfer, parse_device
from shared.kv_transfer.shm import ShmAgent
from shared.kv_transfer.tcp import TcpAgent

logger = logging.getLogger(__name__)


def available_kinds(device: str = "cpu") -> list[str]:
    """The transports this process can use for memory of ``device`` ("cpu" or "cuda"), in the
    order ``auto`` prefers them. For "cuda" this imports torch."""
    has_nixl = nixl_status()[0]
    if parse_device(device)[0] == "cuda":
        return (["cuda_ipc"] if cuda_ipc_status()[0] else []) + (["nixl"] if has_nixl else [])
    return ["shm", "nixl", "tcp"] if has_nixl else ["shm", "tcp"]


def candidates(
    transports: Iterable[SingleTransportAgent], device_types: set[str]
) -> list[SingleTransportAgent]:
    """The transports, in order, that serve every one of ``device_types``."""
    return [t for t in transports if device_types <= t.device_types]


class AutoAgent(TransferAgent):
    """Serves its memory over every transport that can serve it; reads each remote over the
    best transport the two share for their devices. ``transport_of`` says which one a remote
    got."""

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
        self._use_nixl = use_nixl
        self._shm: ShmAgent | None = None
        self._tcp: TcpAgent | None = None
        self._nixl: NixlAgent | None = None
        self._cuda_ipc: CudaIpcAgent | None = None
        self._is_nixl_decided = not (use_nixl or (use_nixl is None and nixl_status()[0]))
        self._routes: dict[str, SingleTransportAgent] = {}
        self._regions: list[RegionDesc] = []
        self.is_closed = False
        if use_nixl and not nixl_status()[0]:
            raise TransportUnavailable(nixl_status()[1])
        try:
            self._shm = ShmAgent(name)
            self._tcp = TcpAgent(name, host=tcp_host, port=tcp_port)
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self._name

    @property
    def _transports(self) -> list[SingleTransportAgent]:
        """Every transport made so far, in preference order."""
        ordered = [self._cuda_ipc, self._shm, self._nixl, self._tcp]
        return [t for t in ordered if t is not None]

    def transport_of(self, remote_name: str) -> str:
        """The kind of transport reads from ``remote_name`` use."""
        return self._routes[remote_name].kind

    def allocate(self, num_bytes: int) -> memoryview:
        if self._shm is None:
            raise ValueError("shm was dropped (memory it did not allocate was registered)")
        return self._shm.allocate(num_bytes)

    def _decide_nixl(self, *, progress_thread: bool) -> None:
        """Make the NIXL agent once, with a progress thread when it is to serve GPU memory
        (without one, NIXL READs of GPU memory never completed on an H200)."""
        if self._is_nixl_decided:
            return
        self._is_nixl_decided = True
        try:
            self._nixl = NixlAgent(self._name, progress_thread=progress_thread)
        except TransportUnavailable:
            if self._use_nixl:
                raise
            logger.warning("kv nixl installed but unusable; serving without it")

    def _drop(self, transport: SingleTransportAgent, why: Exception) -> None:
        """Stop offering a transport that failed to register memory (unless it was asked for):
        shm for memory it did not allocate (an engine's own KV tensors), nixl or cuda_ipc
        where they cannot serve it."""
        if transport is self._nixl and self._use_nixl:
            raise why
        logger.warning(
            "kv transport dropped kind=%s agent=%s error=%s", transport.kind, self._name, why
        )
        transport.close()
        if transport is self._nixl:
            self._nixl = None
        elif transport is self._cuda_ipc:
            self._cuda_ipc = None
        elif transport is self._shm:
            self._shm = None

    def register(self, address: int, length: int, device: str = "cpu") -> None:
        """Register with every transport that serves ``device``; shm goes first among host
        transports, as it accepts the least memory. GPU memory sets up cuda_ipc (where CUDA
        works) and NIXL with VRAM; ``ValueError`` when no transport here can serve it."""
        if self.is_closed:
            raise RemoteUnavailable(f"agent {self._name!r} is closed")
        device_type = parse_device(device)[0]
        reasons = []
        if device_type == "cuda" and self._cuda_ipc is None:
            try:
                self._cuda_ipc = CudaIpcAgent(self._name)
            except TransportUnavailable as exc:
                reasons.append(f"cuda_ipc: {exc.message}")
        self._decide_nixl(progress_thread=device_type == "cuda")
        serving = candidates(self._transports, {device_type})
        for transport in serving:
            try:
                transport.register(address, length, device)
            except (ValueError, TransferError) as exc:
                if transport.kind == "tcp":  # it serves any host memory: a real failure
                    raise
                self._drop(transport, exc)
                reasons.append(f"{transport.kind}: {exc}")
        if not candidates(self._transports, {device_type}):
            raise ValueError(
                f"no transport here serves {device} memory: " + "; ".join(reasons or ["none"])
            )
        self._regions.append(RegionDesc(address, length, device))

    def metadata(self) -> bytes:
        self._decide_nixl(progress_thread=False)
        described = [transport.describe() for transport in self._transports]
        return encoder.encode(
            AgentMetadata(
                kind=self.kind,
                name=self._name,
                host=described[0].host,
                regions=self._regions,
                shm=next((d.shm for d in described if d.shm is not None), None),
                tcp=next((d.tcp for d in described if d.tcp is not None), None),
                nixl=next((d.nixl for d in described if d.nixl is not None), None),
                cuda_ipc=next((d.cuda_ipc for d in described if d.cuda_ipc is not None), None),
            )
        )

    def add_remote(self, metadata: bytes) -> str:
        """Attach with the first transport, in preference order, that serves both sides'
        devices and reaches the remote."""
        remote = decode_metadata(metadata)
        self._decide_nixl(progress_thread=False)
        devices = {parse_device(r.device)[0] for r in [*remote.regions, *self._regions]}
        reasons = []
        usable = candidates(self._transports, devices)
        for transport in usable:
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
        if not usable:
            reasons.append(
                "no transport of ours serves " + " and ".join(sorted(devices)) + " memory"
            )
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
        self._is_nixl_decided = True
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
    UCX's TCP transport, or when they read GPU memory (``auto`` sets it for GPU memory itself).
    Raises ``TransportUnavailable`` for nixl without NIXL installed and for cuda_ipc without
    CUDA.
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
        case "cuda_ipc":
            return CudaIpcAgent(name)
        case _:
            assert_never(kind)
