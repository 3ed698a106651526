"""What an agent publishes so that peers can read its memory: typed msgpack, never pickle.

An agent's metadata travels as opaque bytes inside bus messages (``WorkerInfo.kv_agent_metadata``),
so these structs are transport metadata, not bus messages, and live beside the transports that
produce and consume them rather than in ``proto/``. They are still a wire contract between
processes of different versions: new fields go at the end with defaults, nothing is renamed, and
decoding validates every field (a bad peer raises ``TransportUnavailable``, not a ``KeyError``).

A region is plain data, ``(address, length, device)`` in the owner's address space; NIXL's own
descriptor lists serialise with pickle, so we rebuild them from these tuples on the reader.
"""

import os
import socket
from functools import cache
from typing import Final

import msgspec


class RegionDesc(msgspec.Struct, frozen=True, array_like=True):
    """A registered byte range in the owner's address space."""

    address: int
    length: int
    device: str = "cpu"  # "cpu" or "cuda:N"


class ShmSegmentDesc(msgspec.Struct, frozen=True, array_like=True):
    """A POSIX shared-memory segment and where the owner mapped it (to turn addresses into
    offsets)."""

    name: str
    address: int
    size_bytes: int


class ShmEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """How a same-host reader maps the owner's memory and tells whether the owner is alive."""

    domain: str  # equal exactly where the segments are visible (boot id + /dev/shm device)
    pid: int
    pid_namespace: str  # the pid is only meaningful to readers in the same namespace
    start_time: int  # /proc/<pid>/stat start time, so a reused pid is not mistaken for the owner
    segments: list[ShmSegmentDesc]


class TcpEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """Where the owner's read server listens."""

    host: str
    port: int


class NixlEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """NIXL's own agent metadata (its serialisation of backend connection info, not pickle)."""

    agent_metadata: bytes


class CudaIpcAllocation(msgspec.Struct, frozen=True, array_like=True):
    """One device allocation holding registered memory: where it starts in the owner's address
    space, its size, the GPU it lives on (``nvidia-smi``'s UUID, equal in every process, unlike
    device indices) and its CUDA IPC handle (``CUipcMemHandle``, 64 opaque bytes)."""

    address: int
    size_bytes: int
    device_uuid: str
    handle: bytes


class CudaIpcEndpoint(msgspec.Struct, frozen=True, kw_only=True):
    """How a reader on the same machine opens the owner's GPU memory and watches the owner."""

    boot_id: str  # CUDA IPC handles mean nothing on another machine
    pid: int
    pid_namespace: str
    start_time: int
    allocations: list[CudaIpcAllocation]


class AgentMetadata(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Everything a peer needs to read this agent's registered memory.

    An agent of kind ``auto`` fills several endpoints; a reader uses the first it can reach:
    for host memory shm on the same host, then nixl, then tcp; for GPU memory cuda_ipc on the
    same machine, then nixl.
    """

    kind: str
    name: str
    host: str
    regions: list[RegionDesc] = []
    shm: ShmEndpoint | None = None
    tcp: TcpEndpoint | None = None
    nixl: NixlEndpoint | None = None
    cuda_ipc: CudaIpcEndpoint | None = None


encoder: Final = msgspec.msgpack.Encoder()
metadata_decoder: Final = msgspec.msgpack.Decoder(AgentMetadata)


@cache
def boot_id() -> str:
    """This kernel's boot id: equal in two processes exactly when they run on one machine
    (containers included), and new after every reboot."""
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
        return f.read().strip()


@cache
def shm_domain() -> str:
    """An id equal in two processes exactly when they see the same ``/dev/shm`` segments.

    Hostnames are not enough: two pods on one node share the boot id but not ``/dev/shm``,
    and two containers may share a hostname. The tmpfs device number is unique per boot.
    """
    st = os.stat("/dev/shm")
    return f"{boot_id()}/{st.st_dev}/{st.st_ino}"


def pid_namespace() -> str:
    """This process's pid namespace (``pid:[4026531836]``), so pids are compared only within
    one."""
    return os.readlink("/proc/self/ns/pid")


def process_start_time(pid: int) -> int:
    """Field 22 of ``/proc/<pid>/stat``: clock ticks from boot to the process's start.

    Raises ``OSError`` when the process does not exist.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    # The command name (field 2) may hold spaces and parentheses; fields resume after the last ")".
    return int(stat.rpartition(")")[2].split()[19])


def host_name() -> str:
    """This machine's hostname, for humans and as the default TCP host hint."""
    return socket.gethostname()
