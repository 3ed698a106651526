"""A transfer agent that makes a simulated engine's transfers take modelled time.

The simulated engine keeps a small real KV buffer (a few bytes per block), so its transfers
really move bytes between workers, but far fewer than a real model's. ``SimulatedTimeAgent``
wraps the real agent and, after each read, waits out the rest of the time that the modelled
hardware would have needed for those bytes (``time_s(num_bytes)``). The worker wraps its agent
this way only when its engine asks for it, so nothing in the request path knows whether the
engine is simulated.
"""

import asyncio
from collections.abc import Callable

from shared.kv_transfer.base import TransferAgent
from shared.kv_transfer.regions import Transfer


class SimulatedTimeAgent(TransferAgent):
    """Delegates everything to ``inner``; a read lasts at least ``time_s(bytes read)``."""

    def __init__(self, inner: TransferAgent, time_s: Callable[[int], float]) -> None:
        self.inner = inner
        self._time_s = time_s

    @property
    def name(self) -> str:
        return self.inner.name

    def allocate(self, num_bytes: int) -> memoryview:
        return self.inner.allocate(num_bytes)

    def register(self, address: int, length: int, device: str = "cpu") -> None:
        self.inner.register(address, length, device)

    def metadata(self) -> bytes:
        return self.inner.metadata()

    def add_remote(self, metadata: bytes) -> str:
        return self.inner.add_remote(metadata)

    def remove_remote(self, name: str) -> None:
        self.inner.remove_remote(name)

    async def read(self, remote_name: str, transfers: list[Transfer]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await self.inner.read(remote_name, transfers)
        modelled_s = self._time_s(sum(length for _, _, length in transfers))
        await asyncio.sleep(max(0.0, started + modelled_s - loop.time()))

    def close(self) -> None:
        self.inner.close()
