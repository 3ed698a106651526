"""Registered byte ranges and the transfer lists checked against them (pure, no I/O)."""

import bisect
from collections.abc import Iterable
from typing import Final

from shared.kv_transfer.metadata import RegionDesc

Transfer = tuple[int, int, int]
"""``(remote_address, local_address, length)``: one contiguous copy of a read."""


DEVICE_TYPES: Final = ("cpu", "cuda")


def parse_device(device: str) -> tuple[str, int]:
    """``"cpu"`` -> ``("cpu", 0)``, ``"cuda:1"`` -> ``("cuda", 1)`` (``"cuda"`` is device 0).

    Raises ``ValueError`` for anything else, so a typo never reaches a transport.
    """
    kind, _, index = device.partition(":")
    if kind in DEVICE_TYPES and (not index or (index.isdigit() and kind != "cpu")):
        return kind, int(index or 0)
    raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


class RegionSet:
    """A set of registered ranges that answers "is ``[address, address + length)`` inside one
    of them?" in O(log n). One thread may add while others check.

    Overlapping or touching registrations are merged for the check, so a transfer may span two
    adjacent registered blocks; ``regions`` keeps them as registered, for metadata.
    """

    def __init__(self, regions: Iterable[RegionDesc] = ()) -> None:
        self.regions: list[RegionDesc] = []
        # Merged (starts, ends), swapped in whole so a server thread never sees half an update.
        self._bounds: tuple[list[int], list[int]] = ([], [])
        for region in regions:
            self.add(region)

    def add(self, region: RegionDesc) -> None:
        """Register ``region``; a zero or negative length is a caller bug."""
        if region.length <= 0 or region.address < 0:
            raise ValueError(
                f"region must have address >= 0 and length > 0, got "
                f"address={region.address} length={region.length}"
            )
        starts, ends = list(self._bounds[0]), list(self._bounds[1])
        start, end = region.address, region.address + region.length
        i = bisect.bisect_left(ends, start)  # first merged range that ends at/after start
        j = bisect.bisect_right(starts, end)  # ranges i..j-1 touch [start, end)
        if i < j:
            start = min(start, starts[i])
            end = max(end, ends[j - 1])
        starts[i:j] = [start]
        ends[i:j] = [end]
        self._bounds = (starts, ends)
        self.regions = [*self.regions, region]

    def region_at(self, address: int) -> RegionDesc | None:
        """The registered region holding ``address`` (the first registered, if several do)."""
        return next((r for r in self.regions if r.address <= address < r.address + r.length), None)

    def covers(self, address: int, length: int) -> bool:
        """Whether the whole range lies inside registered memory."""
        starts, ends = self._bounds
        i = bisect.bisect_right(starts, address) - 1
        return i >= 0 and address + length <= ends[i]

    def __len__(self) -> int:
        return len(self.regions)


def first_uncovered(
    regions: RegionSet, ranges: Iterable[tuple[int, int]]
) -> tuple[int, int] | None:
    """The first ``(address, length)`` not inside ``regions``, or None when all are."""
    for address, length in ranges:
        if not regions.covers(address, length):
            return address, length
    return None


def coalesce(transfers: Iterable[Transfer]) -> list[Transfer]:
    """Merge transfers that are contiguous on both sides into single copies.

    KV blocks are often read in runs (block 7, 8, 9 into local 40, 41, 42); one copy per run
    moves the same bytes with a fraction of the per-copy overhead. Order is by remote address,
    which is also the order a TCP server streams them in. Raises ``ValueError`` on a length
    <= 0 or a negative address.
    """
    ordered = sorted(transfers)
    merged: list[Transfer] = []
    for remote, local, length in ordered:
        if length <= 0 or remote < 0 or local < 0:
            raise ValueError(
                f"transfer needs addresses >= 0 and length > 0, got "
                f"remote={remote} local={local} length={length}"
            )
        if merged:
            last_remote, last_local, last_length = merged[-1]
            if remote == last_remote + last_length and local == last_local + last_length:
                merged[-1] = (last_remote, last_local, last_length + length)
                continue
        merged.append((remote, local, length))
    return merged


def split(transfers: Iterable[Transfer], max_bytes: int) -> list[list[Transfer]]:
    """Cut a transfer list into batches of at most ``max_bytes`` each, splitting long copies.

    Transports that copy on the calling thread (NIXL over CMA) hold it for the whole batch;
    bounded batches bound how long the event loop waits between them.
    """
    batches: list[list[Transfer]] = [[]]
    room = max_bytes
    for remote, local, length in transfers:
        offset = 0
        while offset < length:
            if room == 0:
                batches.append([])
                room = max_bytes
            n = min(length - offset, room)
            batches[-1].append((remote + offset, local + offset, n))
            offset += n
            room -= n
    return [batch for batch in batches if batch]
