"""The transfer agent interface, its errors, and the bookkeeping every transport shares.

```
TransferError (Unavailable, 503)
 ├─ RemoteUnavailable      the owner is gone, unreachable, closed, or was never added
 ├─ RangeNotRegistered     a remote or local range outside registered memory
 └─ TransportUnavailable   this transport cannot be used (not installed, no common endpoint,
                           undecodable metadata)
```
"""

import logging
import mmap
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar, Literal, Self

import msgspec

from shared.errors import Unavailable
from shared.kv_transfer.metadata import (
    AgentMetadata,
    RegionDesc,
    encoder,
    host_name,
    metadata_decoder,
)
from shared.kv_transfer.regions import (
    RegionSet,
    Transfer,
    coalesce,
    first_uncovered,
    parse_device,
)

logger = logging.getLogger(__name__)

AgentKind = Literal["auto", "shm", "tcp", "nixl", "cuda_ipc"]


class TransferError(Unavailable):
    """A KV read that cannot be done; ``remote_name`` names the peer ("" when local)."""

    def __init__(self, message: str, *, remote_name: str = "") -> None:
        super().__init__(message)
        self.remote_name = remote_name


class RemoteUnavailable(TransferError):
    """The owner exited, closed, cannot be reached, or was never added."""


class RangeNotRegistered(TransferError):
    """A remote range outside the owner's registered memory, or a local one outside ours."""


class TransportUnavailable(TransferError):
    """This transport cannot be used here or with this peer."""


class TransferAgent(ABC):
    """Moves KV blocks between processes: register memory, publish metadata, read remote blocks.

    Modelled on NIXL: an owner registers the memory peers may read and publishes ``metadata()``
    (msgpack bytes, carried in ``WorkerInfo.kv_agent_metadata``); a reader calls ``add_remote``
    with those bytes once, then ``read`` copies remote ranges into its own registered memory,
    one-sided where the transport allows. Registered memory must stay mapped until ``close()``.
    Completion is ``read`` returning; the owner learns it over the bus (``KVRelease``).
    """

    kind: ClassVar[str]

    @property
    @abstractmethod
    def name(self) -> str:
        """Unique among the agents that talk to each other."""

    @abstractmethod
    def allocate(self, num_bytes: int) -> memoryview:
        """Zeroed memory this agent can serve (a shared-memory segment for shm), freed by
        ``close()``; release views of it (and slices) before then."""

    @abstractmethod
    def register(self, address: int, length: int, device: str = "cpu") -> None:
        """Let peers read ``[address, address + length)`` and let reads land there.

        Raises ``ValueError`` if this agent cannot serve that memory (shm: outside its
        segments) or the device is not supported.
        """

    @abstractmethod
    def metadata(self) -> bytes:
        """msgpack ``AgentMetadata``: kind, name, host, endpoints and registered regions.

        Register first: peers see the regions registered when this was called.
        """

    @abstractmethod
    def add_remote(self, metadata: bytes) -> str:
        """Learn a peer from its ``metadata()`` and return its name.

        Idempotent: the same bytes again are a no-op; newer metadata of the same name replaces
        the old (more regions, a restarted owner). Raises ``TransportUnavailable`` when there is
        no transport to reach it, ``RemoteUnavailable`` when it is visibly gone.
        """

    @abstractmethod
    def remove_remote(self, name: str) -> None:
        """Forget a peer and release what reaching it held (mappings, connection). Idempotent."""

    @abstractmethod
    async def read(self, remote_name: str, transfers: list[Transfer]) -> None:
        """Copy each ``(remote_address, local_address, length)`` from the peer into this process.

        Both ranges must be registered (remote: in the metadata last added). Bounded by the
        caller's ``asyncio.timeout``; on return or cancellation no copy into local memory is
        still running, except as a transport documents. Raises ``RangeNotRegistered``,
        ``RemoteUnavailable`` (owner gone, agent closed) or another ``TransferError``.
        """

    @abstractmethod
    def close(self) -> None:
        """Stop serving, drop peers and free allocated memory. Idempotent."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def decode_metadata(metadata: bytes) -> AgentMetadata:
    """Validate a peer's metadata; a malformed or foreign blob (an unknown device included)
    raises ``TransportUnavailable``."""
    try:
        described = metadata_decoder.decode(metadata)
        for region in described.regions:
            parse_device(region.device)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
        raise TransportUnavailable(f"agent metadata could not be decoded: {exc}") from exc
    return described


class SingleTransportAgent(TransferAgent):
    """The bookkeeping shared by one-transport agents: local regions, known peers, range checks
    and coalescing. Subclasses fill in the transport through the ``_`` hooks and say in
    ``device_types`` which memory they serve."""

    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})

    def __init__(self, name: str) -> None:
        self._name = name
        self._local = RegionSet()
        self._remotes: dict[str, tuple[bytes, AgentMetadata, RegionSet]] = {}
        self._anonymous: list[mmap.mmap] = []
        self.is_closed = False

    @property
    def name(self) -> str:
        return self._name

    def allocate(self, num_bytes: int) -> memoryview:
        """Anonymous, page-aligned memory; transports with stricter needs override this."""
        self._check_open()
        buffer = mmap.mmap(-1, num_bytes)
        self._anonymous.append(buffer)
        return memoryview(buffer)

    def register(self, address: int, length: int, device: str = "cpu") -> None:
        self._check_open()
        region = RegionDesc(address, length, device)
        if parse_device(device)[0] not in self.device_types:
            raise ValueError(
                f"{self.kind} agents serve {', '.join(sorted(self.device_types))} memory only, "
                f"got device {device!r}"
            )
        self._check_servable(region)
        self._register(region)
        self._local.add(region)

    def metadata(self) -> bytes:
        self._check_open()
        return encoder.encode(self.describe())

    def describe(self) -> AgentMetadata:
        """This agent's metadata as a struct (``AutoAgent`` merges its transports' endpoints)."""
        return AgentMetadata(
            kind=self.kind, name=self._name, host=host_name(), regions=self._local.regions
        )

    def add_remote(self, metadata: bytes) -> str:
        self._check_open()
        described = decode_metadata(metadata)
        known = self._remotes.get(described.name)
        if known is not None and known[0] == metadata:
            return described.name
        self._attach(described, None if known is None else known[1])
        self._remotes[described.name] = (bytes(metadata), described, RegionSet(described.regions))
        logger.info("kv remote added kind=%s remote=%s", self.kind, described.name)
        return described.name

    def remove_remote(self, name: str) -> None:
        if self._remotes.pop(name, None) is not None:
            self._detach(name)

    async def read(self, remote_name: str, transfers: list[Transfer]) -> None:
        if self.is_closed:
            raise RemoteUnavailable(f"agent {self._name!r} is closed", remote_name=remote_name)
        known = self._remotes.get(remote_name)
        if known is None:
            raise RemoteUnavailable(
                f"no remote agent named {remote_name!r}; call add_remote first",
                remote_name=remote_name,
            )
        merged = coalesce(transfers)
        bad = first_uncovered(known[2], ((remote, n) for remote, _, n in merged))
        if bad is not None:
            raise RangeNotRegistered(
                f"remote range address={bad[0]:#x} length={bad[1]} is outside the memory "
                f"{remote_name!r} registered",
                remote_name=remote_name,
            )
        bad = first_uncovered(self._local, ((local, n) for _, local, n in merged))
        if bad is not None:
            raise RangeNotRegistered(
                f"local range address={bad[0]:#x} length={bad[1]} is outside the memory "
                f"{self._name!r} registered"
            )
        if merged:
            await self._read(known[1], merged)

    def close(self) -> None:
        if self.is_closed:
            return
        self.is_closed = True
        for name in list(self._remotes):
            self.remove_remote(name)
        self._close()
        for buffer in self._anonymous:
            try:
                buffer.close()
            except BufferError:
                logger.warning("kv memory still viewed at close agent=%s", self._name)
        self._anonymous.clear()
        logger.info("kv agent closed kind=%s agent=%s", self.kind, self._name)

    def _check_open(self) -> None:
        if self.is_closed:
            raise RemoteUnavailable(f"agent {self._name!r} is closed")

    # Hooks for transports.

    def _check_servable(self, region: RegionDesc) -> None:
        """Raise ``ValueError`` if this transport cannot serve ``region``."""

    def _register(self, region: RegionDesc) -> None:
        """Register ``region`` with the transport (NIXL pins it)."""

    @abstractmethod
    def _attach(self, remote: AgentMetadata, previous: AgentMetadata | None) -> None:
        """Set up reaching ``remote`` (replacing ``previous`` of the same name, if any)."""

    @abstractmethod
    def _detach(self, name: str) -> None:
        """Release what reaching ``name`` held."""

    @abstractmethod
    async def _read(self, remote: AgentMetadata, transfers: list[Transfer]) -> None:
        """Copy validated, coalesced transfers."""

    @abstractmethod
    def _close(self) -> None:
        """Stop the transport (remotes are already detached)."""
