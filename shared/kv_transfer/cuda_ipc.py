"""Same-machine GPU transport: the owner exports CUDA IPC handles, the reader copies with the GPU.

The owner's ``register`` finds the device allocation that holds the range (a torch tensor lives
inside one ``cudaMalloc`` block of torch's caching allocator) and exports its IPC handle; the
metadata carries the handle with the allocation's base address, size and GPU UUID, and the
machine's boot id. Descriptors stay ``(address, length)`` in the owner's address space: the
reader turns an address into an offset from the allocation's base.

A reader opens each of a peer's handles once, when the peer is added (``cuIpcOpenMemHandle``;
``cuda_driver``), and a read is device-to-device copies: many blocks as one gather kernel
(``device_copy``), enqueued on a stream of the agent's own and waited for before ``read``
returns. The owner's code does nothing per read. As with shm, the reader polls a pidfd of the
owner before and after each copy, so a dead owner raises ``RemoteUnavailable``.

torch is imported when the first agent is made, not at import: workers of the simulated engine
never pay for it, and without CUDA the agent's constructor raises ``TransportUnavailable``
saying why. Memory from torch's ``expandable_segments`` allocator (CUDA virtual memory) has no
legacy IPC handle; ``register`` then raises ``ValueError``.
"""

import asyncio
import bisect
import importlib
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Final

import msgspec

from shared.kv_transfer.base import (
    RangeNotRegistered,
    RemoteUnavailable,
    SingleTransportAgent,
    TransportUnavailable,
)
from shared.kv_transfer.cuda_driver import CudaDriver, CudaError, load_driver
from shared.kv_transfer.device_copy import Copy, copy_bytes
from shared.kv_transfer.liveness import OwnerWatch
from shared.kv_transfer.metadata import (
    AgentMetadata,
    CudaIpcAllocation,
    CudaIpcEndpoint,
    RegionDesc,
    boot_id,
    pid_namespace,
    process_start_time,
)
from shared.kv_transfer.regions import Transfer, parse_device

logger = logging.getLogger(__name__)

NUM_BUSY_POLLS: Final = 100
"""Polls of the copy's event with ``sleep(0)`` between them before backing off to 0.2 ms."""


@cache
def cuda_ipc_status() -> tuple[bool, str]:
    """``(True, "")`` when this process can serve and read GPU memory over CUDA IPC, else
    ``(False, why not)``. Imports torch (once) when it is installed."""
    if importlib.util.find_spec("torch") is None:
        return False, "CUDA IPC copies with torch, which is not installed (pip install torch)"
    torch = importlib.import_module("torch")
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    try:
        load_driver()
    except TransportUnavailable as exc:
        return False, exc.message
    return True, ""


def check_same_machine(remote: AgentMetadata) -> CudaIpcEndpoint:
    """The remote's CUDA IPC endpoint; ``TransportUnavailable`` when it has none or runs on
    another machine (its handles would mean nothing here)."""
    endpoint = remote.cuda_ipc
    if endpoint is None:
        raise TransportUnavailable(
            f"{remote.name!r} offers no cuda_ipc endpoint", remote_name=remote.name
        )
    if endpoint.boot_id != boot_id():
        raise TransportUnavailable(
            f"{remote.name!r} runs on another machine (host {remote.host!r}, boot id "
            f"{endpoint.boot_id}; ours is {boot_id()}): CUDA IPC works within one machine",
            remote_name=remote.name,
        )
    return endpoint


def is_same_process(endpoint: CudaIpcEndpoint) -> bool:
    """Whether the owner is this very process (its addresses are then ours: no handle to open,
    and CUDA would refuse to open our own)."""
    return (
        endpoint.boot_id == boot_id()
        and endpoint.pid == os.getpid()
        and endpoint.pid_namespace == pid_namespace()
    )


@dataclass(slots=True)
class _OpenedRemote:
    """A peer's allocations mapped here, sorted by owner address."""

    name: str
    allocations: list[CudaIpcAllocation]
    addresses: list[int]  # where each allocation is mapped in this process
    devices: list[int]  # the local device index each was opened with
    watch: OwnerWatch | None
    num_reads: int = 0  # reads in flight; closing the handles waits for zero
    is_retired: bool = False
    starts: list[int] = field(default_factory=list)

    def locate(self, address: int, length: int) -> tuple[int, int]:
        """``(allocation index, offset)`` of the owner's range; it must fit one allocation."""
        i = bisect.bisect_right(self.starts, address) - 1
        if i >= 0:
            allocation = self.allocations[i]
            offset = address - allocation.address
            if offset + length <= allocation.size_bytes:
                return i, offset
        raise RangeNotRegistered(
            f"remote range address={address:#x} length={length} is in no exported allocation "
            f"of {self.name!r}",
            remote_name=self.name,
        )


def _load_torch() -> Any:
    ok, why = cuda_ipc_status()
    if not ok:
        raise TransportUnavailable(why)
    return importlib.import_module("torch")


class _DevicePointer:
    """Just enough ``__cuda_array_interface__`` for ``torch.as_tensor`` to view raw device memory
    as a uint8 tensor, without a copy; the tensor keeps this object alive."""

    def __init__(self, address: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (address, False),
            "version": 2,
        }


class CudaIpcAgent(SingleTransportAgent):
    """Serves registered GPU memory to readers on the same machine through CUDA IPC handles and
    reads such peers with device-to-device copies. Raises ``TransportUnavailable`` when made
    without CUDA (no torch with CUDA, no NVIDIA driver)."""

    kind = "cuda_ipc"
    device_types = frozenset({"cuda"})

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._torch = _load_torch()
        self._driver: CudaDriver = load_driver()
        self._exports: dict[int, CudaIpcAllocation] = {}  # by allocation base
        self._opened: dict[str, _OpenedRemote] = {}
        self._streams: dict[int, Any] = {}  # local device index -> torch.cuda.Stream
        self._uuids: dict[str, int] | None = None  # GPU UUID -> local device index

    def allocate(self, num_bytes: int) -> memoryview:
        raise ValueError(
            "cuda_ipc agents serve GPU memory the caller allocated (a torch tensor); "
            "register its data_ptr() with its device"
        )

    def describe(self) -> AgentMetadata:
        me = os.getpid()
        endpoint = CudaIpcEndpoint(
            boot_id=boot_id(),
            pid=me,
            pid_namespace=pid_namespace(),
            start_time=process_start_time(me),
            allocations=sorted(self._exports.values(), key=lambda a: a.address),
        )
        return msgspec.structs.replace(super().describe(), cuda_ipc=endpoint)

    def _register(self, region: RegionDesc) -> None:
        index = parse_device(region.device)[1]
        base, size = self._driver.allocation_of(region.address, index)
        if region.address + region.length > base + size:
            raise ValueError(
                f"range address={region.address:#x} length={region.length} runs past its "
                f"device allocation ({base:#x}, {size} bytes)"
            )
        if base in self._exports:
            return
        try:
            handle = self._driver.export(base, index)
        except CudaError as exc:
            raise ValueError(
                f"cuda:{index} memory at {base:#x} has no CUDA IPC handle ({exc.message}); "
                "memory from torch's expandable_segments allocator has none: unset it in "
                "PYTORCH_CUDA_ALLOC_CONF"
            ) from exc
        self._exports[base] = CudaIpcAllocation(base, size, self._driver.device_uuid(index), handle)

    def _local_device(self, uuid: str) -> int:
        """The index here of the GPU with ``uuid``; without one, the first device this agent
        registered memory on (the handle is then opened with peer access)."""
        if self._uuids is None:
            self._uuids = {self._driver.device_uuid(i): i for i in range(self._driver.num_devices)}
        if uuid in self._uuids:
            return self._uuids[uuid]
        for region in self._local.regions:
            return parse_device(region.device)[1]
        raise TransportUnavailable(f"GPU {uuid} is not visible in this process")

    def _attach(self, remote: AgentMetadata, previous: AgentMetadata | None) -> None:
        endpoint = check_same_machine(remote)
        allocations = sorted(endpoint.allocations, key=lambda a: a.address)
        addresses: list[int] = []
        devices: list[int] = []
        watch = None
        try:
            if is_same_process(endpoint):
                addresses = [a.address for a in allocations]
                devices = [-1] * len(allocations)  # nothing opened
            else:
                watch = OwnerWatch(
                    remote.name, endpoint.pid, endpoint.pid_namespace, endpoint.start_time
                )
                for allocation in allocations:
                    device = self._local_device(allocation.device_uuid)
                    addresses.append(self._driver.open(allocation.handle, device))
                    devices.append(device)
        except BaseException:
            self._close_handles(allocations[: len(addresses)], devices)
            if watch is not None:
                watch.close()
            raise
        self._detach(remote.name)
        self._opened[remote.name] = _OpenedRemote(
            remote.name,
            allocations,
            addresses,
            devices,
            watch,
            starts=[a.address for a in allocations],
        )

    def _close_handles(self, allocations: list[CudaIpcAllocation], devices: list[int]) -> None:
        for allocation, device in zip(allocations, devices, strict=True):
            if device >= 0:
                self._driver.close(allocation.handle, device)

    def _release(self, opened: _OpenedRemote) -> None:
        self._close_handles(opened.allocations, opened.devices)
        opened.addresses = []
        if opened.watch is not None:
            opened.watch.close()

    def _detach(self, name: str) -> None:
        opened = self._opened.pop(name, None)
        if opened is not None:
            opened.is_retired = True
            if opened.num_reads == 0:
                self._release(opened)

    def _stream(self, index: int) -> Any:
        stream = self._streams.get(index)
        if stream is None:
            stream = self._streams[index] = self._torch.cuda.Stream(device=index)
        return stream

    def _copies(
        self, opened: _OpenedRemote, transfers: list[Transfer]
    ) -> dict[tuple[int, int], list[Copy]]:
        """Group the transfers by (remote allocation, local region index), as offsets."""
        groups: dict[tuple[int, int], list[Copy]] = {}
        local = self._local.regions
        for address, local_address, length in transfers:
            i, src = opened.locate(address, length)
            region = self._local.region_at(local_address)
            if region is None or local_address + length > region.address + region.length:
                raise RangeNotRegistered(
                    f"local range address={local_address:#x} length={length} does not fit "
                    f"one region {self.name!r} registered"
                )
            key = (i, local.index(region))
            groups.setdefault(key, []).append((local_address - region.address, src, length))
        return groups

    async def _read(self, remote: AgentMetadata, transfers: list[Transfer]) -> None:
        opened = self._opened[remote.name]
        groups = self._copies(opened, transfers)
        if opened.watch is not None:
            opened.watch.check()
        opened.num_reads += 1
        try:
            await _wait(self._enqueue(opened, groups))
        finally:
            opened.num_reads -= 1
            if opened.is_retired and opened.num_reads == 0:
                self._release(opened)
        if opened.watch is not None:
            opened.watch.check()
        if self.is_closed:
            raise RemoteUnavailable(
                f"agent {self.name!r} closed during the read", remote_name=remote.name
            )

    def _enqueue(
        self, opened: _OpenedRemote, groups: dict[tuple[int, int], list[Copy]]
    ) -> list[Any]:
        """Launch every group's copies on the stream of its local device; one event each."""
        torch = self._torch
        events: list[Any] = []
        try:
            for (i, j), copies in groups.items():
                region = self._local.regions[j]
                index = parse_device(region.device)[1]
                allocation = opened.allocations[i]
                stream = self._stream(index)
                with torch.cuda.device(index), torch.cuda.stream(stream):
                    source = torch.as_tensor(
                        _DevicePointer(opened.addresses[i], allocation.size_bytes)
                    )
                    destination = torch.as_tensor(_DevicePointer(region.address, region.length))
                    copy_bytes(torch, destination, source, copies)
                    event = torch.cuda.Event()
                    event.record(stream)
                events.append(event)
        except BaseException:
            for stream in self._streams.values():  # what was launched finishes first
                stream.synchronize()
            raise
        return events

    def _close(self) -> None:
        for stream in self._streams.values():  # no copy reads a mapping past this point
            stream.synchronize()
        self._streams.clear()
        for opened in self._opened.values():
            self._release(opened)
        self._opened.clear()


async def _wait(events: list[Any]) -> None:
    """Wait for the events without blocking the loop; on cancellation, block until they are
    done, so nothing lands in local memory after ``read`` has ended."""
    try:
        num_polls = 0
        while not all(event.query() for event in events):
            num_polls += 1
            await asyncio.sleep(0 if num_polls < NUM_BUSY_POLLS else 0.0002)
    except BaseException:
        for event in events:
            event.synchronize()
        raise
