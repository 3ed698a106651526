"""KV transfer between workers: register memory, publish metadata, read remote blocks.

One module per transport (``shm``, ``tcp``, ``nixl``, ``cuda_ipc``) behind the
``TransferAgent`` interface; ``create_agent("auto", name)`` serves them all and picks per remote
and device. See docs/decisions/0003-kv-transfer.md.
"""

from shared.kv_transfer.auto import AutoAgent, available_kinds, create_agent
from shared.kv_transfer.base import (
    AgentKind,
    RangeNotRegistered,
    RemoteUnavailable,
    TransferAgent,
    TransferError,
    TransportUnavailable,
)
from shared.kv_transfer.cuda_ipc import CudaIpcAgent, cuda_ipc_status
from shared.kv_transfer.metadata import AgentMetadata, RegionDesc
from shared.kv_transfer.nixl import NixlAgent, nixl_status
from shared.kv_transfer.regions import Transfer
from shared.kv_transfer.shm import ShmAgent
from shared.kv_transfer.simulated import SimulatedTimeAgent
from shared.kv_transfer.tcp import TcpAgent

__all__ = [
    "AgentKind",
    "AgentMetadata",
    "AutoAgent",
    "CudaIpcAgent",
    "NixlAgent",
    "RangeNotRegistered",
    "RegionDesc",
    "RemoteUnavailable",
    "ShmAgent",
    "SimulatedTimeAgent",
    "TcpAgent",
    "Transfer",
    "TransferAgent",
    "TransferError",
    "TransportUnavailable",
    "available_kinds",
    "create_agent",
    "cuda_ipc_status",
    "nixl_status",
]
