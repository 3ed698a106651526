"""Same-host transport: the owner's memory lives in POSIX shared memory that readers map.

A read is a ``memmove`` from the reader's read-only mapping of the owner's segment; the
owner's Python code does nothing per read. Before and after each copy the reader checks that
the owner is alive (a pidfd) and has not unlinked the segment (``st_nlink`` of the open fd),
so a dead or closed owner raises ``RemoteUnavailable`` instead of yielding stale bytes.

Readers map segments with ``mmap(2)`` directly, not ``SharedMemory(name)``: on Python 3.11 an
attaching ``SharedMemory`` registers with the resource tracker, which unlinks the segment when
the reader exits, and the usual cure (``resource_tracker.unregister``) removes the *owner's*
registration too when both processes share a tracker (multiprocessing children do).
"""

import bisect
import ctypes
import logging
import mmap
import os
import secrets
import select
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory

import msgspec

from shared.kv_transfer.base import (
    RangeNotRegistered,
    RemoteUnavailable,
    SingleTransportAgent,
    TransportUnavailable,
)
from shared.kv_transfer.liveness import open_owner_pidfd
from shared.kv_transfer.memcopy import Copier, Copy
from shared.kv_transfer.metadata import (
    AgentMetadata,
    RegionDesc,
    ShmEndpoint,
    ShmSegmentDesc,
    pid_namespace,
    process_start_time,
    shm_domain,
)
from shared.kv_transfer.regions import Transfer

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "baton-kv-"
"""Every segment an shm agent creates is ``/dev/shm/baton-kv-<hex>``."""

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


@dataclass(slots=True)
class _Mapping:
    """One remote segment mapped read-only here; the fd stays open to watch ``st_nlink``."""

    desc: ShmSegmentDesc
    fd: int
    address: int


@dataclass(slots=True)
class _RemoteSegments:
    """A remote's mapped segments, sorted by owner address, and its liveness watch."""

    name: str
    pid: int
    mappings: list[_Mapping]
    pidfd: int | None
    num_reads: int = 0  # reads in flight; unmapping waits for zero
    is_retired: bool = False
    starts: list[int] = field(default_factory=list)
    # Quoted: select.poll is a function at run time, a class only to type checkers.
    exit_watch: "select.poll | None" = None  # the pidfd turns readable when the owner exits

    def __post_init__(self) -> None:
        if self.pidfd is not None:
            self.exit_watch = select.poll()
            self.exit_watch.register(self.pidfd, select.POLLIN)

    def translate(self, address: int, length: int) -> int:
        """The local address of the owner's ``address``; the range must fit one segment."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            mapping = self.mappings[i]
            offset = address - mapping.desc.address
            if offset + length <= mapping.desc.size_bytes:
                return mapping.address + offset
        raise RangeNotRegistered(
            f"remote range address={address:#x} length={length} is in no shared-memory segment "
            f"of {self.name!r}",
            remote_name=self.name,
        )

    def check_alive(self) -> None:
        """Raise ``RemoteUnavailable`` if the owner exited or unlinked a segment (closed)."""
        if self.exit_watch is not None and self.exit_watch.poll(0):
            raise RemoteUnavailable(
                f"{self.name!r} (pid {self.pid}) has exited", remote_name=self.name
            )
        for mapping in self.mappings:
            if os.fstat(mapping.fd).st_nlink == 0:
                raise RemoteUnavailable(
                    f"{self.name!r} unlinked segment {mapping.desc.name} (it closed)",
                    remote_name=self.name,
                )

    def unmap(self) -> None:
        for mapping in self.mappings:
            _libc.munmap(mapping.address, mapping.desc.size_bytes)
            os.close(mapping.fd)
        self.mappings = []
        self.starts = []
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
            self.exit_watch = None


def _map(desc: ShmSegmentDesc, name: str) -> _Mapping:
    """Map a remote segment read-only (a reader bug then faults instead of corrupting KV)."""
    try:
        fd = os.open(f"/dev/shm/{desc.name}", os.O_RDONLY)
    except FileNotFoundError as exc:
        raise RemoteUnavailable(f"{name!r} segment {desc.name} is gone", remote_name=name) from exc
    if os.fstat(fd).st_size < desc.size_bytes:
        os.close(fd)
        raise TransportUnavailable(f"{name!r} segment {desc.name} is smaller than advertised")
    address = _libc.mmap(None, desc.size_bytes, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == _MAP_FAILED:
        errno = ctypes.get_errno()
        os.close(fd)
        raise TransportUnavailable(f"mmap of {desc.name} failed: {os.strerror(errno)}")
    return _Mapping(desc, fd, address)


class ShmAgent(SingleTransportAgent):
    """Serves memory from shared-memory segments it allocates; reads same-host peers' segments.

    ``allocate`` creates a segment (pages reserved up front, so a full ``/dev/shm`` fails here
    with ``OSError`` rather than as SIGBUS later); ``register`` accepts only ranges inside
    them. ``close`` unlinks the segments; a crashed owner's are unlinked by its resource tracker.
    """

    kind = "shm"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._segments: list[tuple[SharedMemory, int]] = []  # (segment, mapped address)
        self._remote_segments: dict[str, _RemoteSegments] = {}
        self._copier = Copier(name)

    def allocate(self, num_bytes: int) -> memoryview:
        self._check_open()
        segment = SharedMemory(
            name=f"{SEGMENT_PREFIX}{secrets.token_hex(8)}", create=True, size=num_bytes
        )
        try:
            fd = os.open(f"/dev/shm/{segment.name}", os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, num_bytes)
            finally:
                os.close(fd)
        except OSError:
            segment.close()
            segment.unlink()
            raise
        buffer = segment.buf
        assert buffer is not None  # None only after close()
        address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
        self._segments.append((segment, address))
        logger.info("kv shm segment created name=%s size_bytes=%d", segment.name, num_bytes)
        return buffer

    def describe(self) -> AgentMetadata:
        endpoint = ShmEndpoint(
            domain=shm_domain(),
            pid=os.getpid(),
            pid_namespace=pid_namespace(),
            start_time=process_start_time(os.getpid()),
            segments=[ShmSegmentDesc(s.name, address, s.size) for s, address in self._segments],
        )
        return msgspec.structs.replace(super().describe(), shm=endpoint)

    def _check_servable(self, region: RegionDesc) -> None:
        for segment, address in self._segments:
            if (
                address <= region.address
                and region.address + region.length <= address + segment.size
            ):
                return
        raise ValueError(
            f"shm agents serve memory from their own allocate() only; address="
            f"{region.address:#x} length={region.length} is outside every segment"
        )

    def _attach(self, remote: AgentMetadata, previous: AgentMetadata | None) -> None:
        endpoint = remote.shm
        if endpoint is None or endpoint.domain != shm_domain():
            raise TransportUnavailable(
                f"{remote.name!r} has no shared memory on this host", remote_name=remote.name
            )
        pidfd = open_owner_pidfd(
            remote.name, endpoint.pid, endpoint.pid_namespace, endpoint.start_time
        )
        mappings: list[_Mapping] = []
        try:
            for desc in sorted(endpoint.segments, key=lambda d: d.address):
                mappings.append(_map(desc, remote.name))
        except BaseException:
            _RemoteSegments(remote.name, endpoint.pid, mappings, pidfd).unmap()
            raise
        self._detach(remote.name)
        self._remote_segments[remote.name] = _RemoteSegments(
            remote.name, endpoint.pid, mappings, pidfd, starts=[m.desc.address for m in mappings]
        )

    def _detach(self, name: str) -> None:
        segments = self._remote_segments.pop(name, None)
        if segments is not None:
            segments.is_retired = True
            if segments.num_reads == 0:
                segments.unmap()

    async def _read(self, remote: AgentMetadata, transfers: list[Transfer]) -> None:
        segments = self._remote_segments[remote.name]
        copies: list[Copy] = [
            (local, segments.translate(address, length), length)
            for address, local, length in transfers
        ]
        segments.check_alive()
        segments.num_reads += 1
        try:
            is_done = await self._copier.copy(copies)
        finally:
            segments.num_reads -= 1
            if segments.is_retired and segments.num_reads == 0:
                segments.unmap()
        if not is_done:
            raise RemoteUnavailable(f"agent {self.name!r} closed during the read")
        segments.check_alive()

    def _close(self) -> None:
        self._copier.close()  # no copy thread reads a mapping past this point
        for segments in self._remote_segments.values():
            segments.unmap()
        self._remote_segments.clear()
        for segment, _ in self._segments:
            try:
                segment.close()
            except BufferError:
                # The engine's KV view of this memory outlives the agent (a worker closes the
                # agent before its engine is gone). Unlinking frees the name now; the mapping
                # goes when the last view does. Detach it so that SharedMemory.__del__ does not
                # retry the close at exit and print a BufferError.
                logger.debug("kv shm segment still viewed at close name=%s", segment.name)
                segment._buf = None  # type: ignore[attr-defined]  # see above
                segment._mmap = None  # type: ignore[attr-defined]  # see above
            segment.unlink()
        self._segments.clear()
