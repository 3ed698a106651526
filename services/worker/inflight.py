"""The requests a worker still owes an answer or tokens to, and whether there are none."""

import asyncio
from collections.abc import Iterator
from typing import Generic, TypeVar

from proto.messages import RequestId

E = TypeVar("E")


class InFlight(Generic[E]):
    """Request id -> what its role keeps for it (a stream subject, a reply subject and a hold
    deadline). Adding and removing keep ``idle`` set exactly while it is empty, so a drain
    waits on it without anyone having to remember to say that a request ended."""

    def __init__(self) -> None:
        self._entries: dict[RequestId, E] = {}
        self.idle = asyncio.Event()
        self.idle.set()

    def add(self, request_id: RequestId, entry: E) -> None:
        if request_id in self._entries:
            raise ValueError(f"request {request_id} is already in flight")
        self._entries[request_id] = entry
        self.idle.clear()

    def pop(self, request_id: RequestId) -> E | None:
        """Remove and return the entry; None if it is not (or no longer) in flight."""
        entry = self._entries.pop(request_id, None)
        if not self._entries:
            self.idle.set()
        return entry

    def get(self, request_id: RequestId) -> E | None:
        return self._entries.get(request_id)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[RequestId]:
        return iter(list(self._entries))
