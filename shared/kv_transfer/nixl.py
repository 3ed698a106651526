"""Transport over NIXL (UCX): one-sided READ of registered memory, where NIXL is installed.

NIXL is imported lazily (``nixl``, or the ``nixl_cu12``/``nixl_cu13`` wheels' modules), when
the first ``NixlAgent`` is made: without it that raises ``TransportUnavailable``, and
``nixl_status`` says why.

Tuning (measured on 2 CPU cores, same host, UCX picks CMA): with NIXL's defaults (a progress
thread, UCX peer error handling) a 64 KiB read took ~12 ms; with no progress thread and
``ucx_error_handling_mode="none"`` it takes ~15-60 us. With "peer" error handling and no
progress thread a read never completes, because the endpoint handshake needs the owner to make
progress. Over UCX's TCP transport (no RDMA) the owner must run a progress thread
(``progress_thread=True``). A dead owner still fails fast: NIXL raises a disconnect error.

NIXL copies on the thread that posts or polls the transfer and holds the GIL while it does, so
a worker thread would not free the event loop; instead reads are posted in batches of at most
``BATCH_BYTES`` with a loop turn between them.

GPU memory (a region on ``cuda:N``) is registered as NIXL ``VRAM`` of device N, so UCX can
read it GPU-direct (RDMA) from another machine; on one machine ``cuda_ipc`` is the transport
(NIXL between two processes on one H200 moved 0.5 GB/s, CUDA IPC 2,100 GB/s). An owner of GPU
memory needs the progress thread: without it, READs of VRAM never completed on the H200.
"""

import asyncio
import importlib
import importlib.util
import logging
from functools import cache
from typing import Any, Final

import msgspec

from shared.kv_transfer.base import (
    RangeNotRegistered,
    RemoteUnavailable,
    SingleTransportAgent,
    TransferError,
    TransportUnavailable,
)
from shared.kv_transfer.metadata import AgentMetadata, NixlEndpoint, RegionDesc
from shared.kv_transfer.regions import RegionSet, Transfer, parse_device, split

logger = logging.getLogger(__name__)

BATCH_BYTES: Final = 4 * 1024 * 1024
"""Bytes per posted transfer: ~0.7 ms of copying on the loop thread at 6 GiB/s."""

NUM_BUSY_POLLS: Final = 200
"""Polls with ``sleep(0)`` between them before backing off to 1 ms sleeps."""

_PACKAGES: Final = ("nixl", "nixl_cu12", "nixl_cu13")


@cache
def nixl_status() -> tuple[bool, str]:
    """``(True, "")`` when a NIXL package is installed, else ``(False, why not)``.

    Looks without importing: importing NIXL configures logging process-wide (a stdout handler
    on the ``nixl`` logger, ``logging.raiseExceptions = False``), which shm/tcp users need not
    pay for.
    """
    if any(importlib.util.find_spec(package) is not None for package in _PACKAGES):
        return True, ""
    return False, (
        "NIXL is not installed (none of " + ", ".join(_PACKAGES) + "); "
        "pip install --no-deps nixl-cu12 numpy"
    )


@cache
def _load_api() -> Any:
    """NIXL's ``_api`` module; ``TransportUnavailable`` if none imports."""
    reasons = []
    for package in _PACKAGES:
        if importlib.util.find_spec(package) is None:
            continue
        try:
            return importlib.import_module(f"{package}._api")
        except ImportError as exc:
            reasons.append(f"{package}: {exc}")
    raise TransportUnavailable(
        "NIXL cannot be imported: " + ("; ".join(reasons) or nixl_status()[1])
    )


def _wrap(exc: Exception, what: str, remote_name: str = "") -> TransferError:
    """Map NIXL's exceptions (``nixlRemoteDisconnectError`` ...) to ours, by class name."""
    kind = type(exc).__name__
    message = f"nixl {what} failed: {kind}: {exc}"
    if kind == "nixlRemoteDisconnectError":
        return RemoteUnavailable(message, remote_name=remote_name)
    if kind == "nixlNotFoundError":
        return RangeNotRegistered(message, remote_name=remote_name)
    return TransferError(message, remote_name=remote_name)


def memory_type(device: str) -> tuple[str, int]:
    """NIXL's memory type and device id for a region's device: ``("DRAM", 0)`` for host memory,
    ``("VRAM", N)`` for ``cuda:N``."""
    kind, index = parse_device(device)
    return ("VRAM", index) if kind == "cuda" else ("DRAM", 0)


def group_by_memory(
    transfers: list[Transfer], remote: RegionSet, local: RegionSet
) -> dict[tuple[tuple[str, int], tuple[str, int]], list[Transfer]]:
    """Transfers grouped by ``(remote memory type, local memory type)``: a NIXL descriptor list
    holds one memory type. A range outside every region counts as host memory (the range
    checks have already passed, so that is a region registered under two devices)."""
    kinds = [{memory_type(r.device) for r in side.regions} for side in (remote, local)]
    if all(len(kind) == 1 for kind in kinds):  # the usual case: no per-range lookup
        return {(next(iter(kinds[0])), next(iter(kinds[1]))): transfers}
    groups: dict[tuple[tuple[str, int], tuple[str, int]], list[Transfer]] = {}
    for transfer in transfers:
        sides = []
        for regions, address in ((remote, transfer[0]), (local, transfer[1])):
            region = regions.region_at(address)
            sides.append(memory_type(region.device if region is not None else "cpu"))
        groups.setdefault((sides[0], sides[1]), []).append(transfer)
    return groups


class NixlAgent(SingleTransportAgent):
    """A NIXL agent with the UCX backend, tuned for latency (see the module docstring); it
    serves host memory (DRAM) and GPU memory (VRAM)."""

    kind = "nixl"
    device_types = frozenset({"cpu", "cuda"})

    def __init__(self, name: str, *, progress_thread: bool = False) -> None:
        super().__init__(name)
        api = _load_api()
        config = api.nixl_agent_config(
            enable_prog_thread=progress_thread, enable_listen_thread=False, backends=[]
        )
        try:
            self._agent: Any = api.nixl_agent(name, config)
            self._agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
        except Exception as exc:
            raise TransportUnavailable(f"nixl UCX backend did not start: {exc!r}") from exc
        self._registrations: list[Any] = []

    def describe(self) -> AgentMetadata:
        endpoint = NixlEndpoint(agent_metadata=bytes(self._agent.get_agent_metadata()))
        return msgspec.structs.replace(super().describe(), nixl=endpoint)

    def _register(self, region: RegionDesc) -> None:
        try:
            memory, device_id = memory_type(region.device)
            descs = self._agent.register_memory(
                [(region.address, region.length, device_id, "")], memory
            )
        except Exception as exc:
            raise _wrap(exc, "register_memory") from exc
        self._registrations.append(descs)

    def _attach(self, remote: AgentMetadata, previous: AgentMetadata | None) -> None:
        if remote.nixl is None:
            raise TransportUnavailable(
                f"{remote.name!r} offers no nixl endpoint", remote_name=remote.name
            )
        if previous is not None:
            self._detach(remote.name)
        try:
            loaded = self._agent.add_remote_agent(remote.nixl.agent_metadata)
        except Exception as exc:
            raise _wrap(exc, "add_remote_agent", remote.name) from exc
        loaded_name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if loaded_name != remote.name:
            self._agent.remove_remote_agent(loaded_name)
            raise TransportUnavailable(
                f"nixl metadata names {loaded_name!r}, the agent metadata {remote.name!r}",
                remote_name=remote.name,
            )

    def _detach(self, name: str) -> None:
        try:
            self._agent.remove_remote_agent(name)
        except Exception as exc:  # already gone: nothing left to release
            logger.debug("nixl remove_remote_agent failed remote=%s error=%r", name, exc)

    async def _read(self, remote: AgentMetadata, transfers: list[Transfer]) -> None:
        remote_regions = self._remotes[remote.name][2]
        groups = group_by_memory(transfers, remote_regions, self._local)
        i = 0
        for (remote_memory, local_memory), group in groups.items():
            for batch in split(group, BATCH_BYTES):
                if i:
                    await asyncio.sleep(0)  # a posted batch often completes without yielding
                i += 1
                await self._read_batch(remote.name, batch, remote_memory, local_memory)

    async def _read_batch(
        self,
        remote_name: str,
        batch: list[Transfer],
        remote_memory: tuple[str, int],
        local_memory: tuple[str, int],
    ) -> None:
        agent = self._agent
        (remote_type, remote_device), (local_type, local_device) = remote_memory, local_memory
        local = agent.get_xfer_descs([(a, n, local_device) for _, a, n in batch], local_type)
        remote = agent.get_xfer_descs([(a, n, remote_device) for a, _, n in batch], remote_type)
        try:
            handle = agent.initialize_xfer("READ", local, remote, remote_name)
        except Exception as exc:
            raise _wrap(exc, "initialize_xfer", remote_name) from exc
        state = "PROC"
        try:
            state = agent.transfer(handle)
            num_polls = 0
            while state == "PROC":
                num_polls += 1
                await asyncio.sleep(0 if num_polls < NUM_BUSY_POLLS else 0.001)
                state = agent.check_xfer_state(handle)
            if state != "DONE":
                raise TransferError(f"nixl READ from {remote_name!r} ended in state {state}")
        except Exception as exc:
            if isinstance(exc, TransferError):
                raise
            raise _wrap(exc, "READ", remote_name) from exc
        finally:
            self._release(handle, state)

    def _release(self, handle: Any, state: str) -> None:
        """Free a transfer handle; for one still running NIXL tries to abort it first."""
        try:
            self._agent.release_xfer_handle(handle)
        except Exception as exc:  # NIXL keeps the handle and retries when the agent goes
            logger.warning("nixl transfer handle not released state=%s error=%r", state, exc)

    def _close(self) -> None:
        for descs in self._registrations:
            try:
                self._agent.deregister_memory(descs)
            except Exception as exc:
                logger.warning("nixl deregister_memory failed error=%r", exc)
        self._registrations.clear()
        self._agent = None
