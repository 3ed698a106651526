"""The KV connector: how an engine's KV blocks are offered to peers and pulled from them.

Shaped after vLLM v1's KV connector. The engine keeps the request state (a reserved request
waits for its KV in blocks the scheduler set aside, ``Engine.reserve``; ``Engine.commit`` puts
it in the batch); the connector only moves bytes, through the KV transfer layer:

- the side that has the KV (a prefill worker after a prefill, or later a decode worker giving
  up a running sequence) ``describe``s the blocks as ``(address, length)`` descriptors, which
  travel on the bus with the agent's name;
- the side that wants it ``pull``s every block past its own cached prefix into its reserved
  blocks, with one-sided reads from the owner's registered memory.

One implementation serves every engine whose cache is a block-major ``KVRegion`` (the
simulated and the torch engine); an engine with another layout brings its own.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from proto.messages import InstanceId
from shared.engine.interface import Reservation
from shared.engine.runner import KVRegion
from shared.kv_transfer import TransferAgent, TransferError


@dataclass(frozen=True, slots=True)
class KVSource:
    """Where a request's KV lies on a peer: the peer's agent (its name and the metadata it
    registered under) and one descriptor per block, in order from the first block."""

    worker_id: InstanceId
    agent_name: str
    agent_metadata: bytes
    block_descriptors: Sequence[tuple[int, int]]


class KVConnector(Protocol):
    """Offers this engine's blocks to peers and pulls peers' blocks into it."""

    def describe(self, block_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Descriptors of these local blocks, for a peer to read."""

    async def pull(self, source: KVSource, reservation: Reservation) -> int:
        """Read every block of ``source`` past ``reservation.num_cached_tokens`` into the
        reserved blocks; returns how many blocks moved. Raises ``TransferError``. Bounded by
        the caller's ``asyncio.timeout``."""


class RegionConnector:
    """A ``KVConnector`` over a block-major ``KVRegion`` registered with ``agent``."""

    def __init__(self, agent: TransferAgent, region: KVRegion, block_size: int) -> None:
        self.agent = agent
        self.region = region
        self.block_size = block_size
        self._known: dict[str, bytes] = {}  # peer agent name -> metadata added

    def describe(self, block_ids: Sequence[int]) -> list[tuple[int, int]]:
        region = self.region
        return [(region.block_address(b), region.block_bytes) for b in block_ids]

    async def pull(self, source: KVSource, reservation: Reservation) -> int:
        region = self.region
        if len(source.block_descriptors) != len(reservation.block_ids):
            raise TransferError(
                f"the peer described {len(source.block_descriptors)} blocks; "
                f"{len(reservation.block_ids)} were reserved",
                remote_name=source.agent_name,
            )
        first = reservation.num_cached_tokens // self.block_size
        transfers = []
        for (address, length), block_id in zip(
            source.block_descriptors[first:], reservation.block_ids[first:], strict=True
        ):
            if length != region.block_bytes:
                raise TransferError(
                    f"the peer's block has {length} bytes; ours have {region.block_bytes}",
                    remote_name=source.agent_name,
                )
            transfers.append((address, region.block_address(block_id), length))
        if not transfers:
            return 0
        if self._known.get(source.agent_name) != source.agent_metadata:
            self.agent.add_remote(source.agent_metadata)
            self._known[source.agent_name] = source.agent_metadata
        await self.agent.read(source.agent_name, transfers)
        return len(transfers)
