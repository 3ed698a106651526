"""Many small copies between two byte tensors as few kernels as possible (torch; any device).

A KV read is a list of blocks scattered over both caches. One ``copy_`` per block costs a
launch each (~5-10 us of Python and driver time; 1,024 blocks would take ~10 ms), so blocks
are moved as rows instead: with ``unit`` the greatest common divisor of every offset and
length, both tensors are viewed as ``[rows, unit]`` and one ``index_select`` gathers the
source rows that one ``index_copy_`` scatters into the destination. Long contiguous copies stay
plain ``copy_`` calls (a copy engine transfer), and so do a handful of copies.
"""

import math
from typing import Any, Final

Copy = tuple[int, int, int]
"""``(destination_offset, source_offset, length)`` in bytes within two tensors."""

MIN_GATHER_COPIES: Final = 8
"""Fewer copies than this are launched one by one."""

MIN_ROW_BYTES: Final = 512
"""A gather over rows smaller than this is slower than the launches it saves."""

DIRECT_COPY_BYTES: Final = 4 * 1024 * 1024
"""Copies at least this long are launched on their own: they are bandwidth, not launches."""

GATHER_BYTES: Final = 256 * 1024 * 1024
"""Bytes per gather: the gathered rows are a temporary of this size on the device."""


def row_bytes(copies: list[Copy]) -> int:
    """The largest row size that every length of ``copies``, and every offset from the lowest
    offset of its side, is a multiple of (the rows start at the lowest offsets)."""
    dst0 = min(dst for dst, _, _ in copies)
    src0 = min(src for _, src, _ in copies)
    return math.gcd(*(v for dst, src, n in copies for v in (dst - dst0, src - src0, n)))


def plan(copies: list[Copy]) -> tuple[list[Copy], list[list[Copy]]]:
    """Split ``copies`` into ``(direct, gathers)``: copies launched alone, and groups of at most
    ``GATHER_BYTES`` to move as rows."""
    direct = [c for c in copies if c[2] >= DIRECT_COPY_BYTES]
    small = [c for c in copies if c[2] < DIRECT_COPY_BYTES]
    if len(small) < MIN_GATHER_COPIES or row_bytes(small) < MIN_ROW_BYTES:
        return direct + small, []
    gathers: list[list[Copy]] = [[]]
    num_bytes = 0
    for copy in small:
        if num_bytes + copy[2] > GATHER_BYTES and gathers[-1]:
            gathers.append([])
            num_bytes = 0
        gathers[-1].append(copy)
        num_bytes += copy[2]
    return direct, gathers


def row_indices(torch: Any, starts: list[int], counts: list[int]) -> Any:
    """``cat(arange(s, s + n) for s, n in zip(starts, counts))`` without a Python loop."""
    counts_t = torch.tensor(counts, dtype=torch.int64)
    first = torch.cumsum(counts_t, 0) - counts_t  # where each run begins in the output
    total = int(counts_t.sum())
    within = torch.arange(total, dtype=torch.int64) - torch.repeat_interleave(first, counts_t)
    return torch.repeat_interleave(torch.tensor(starts, dtype=torch.int64), counts_t) + within


def copy_bytes(torch: Any, destination: Any, source: Any, copies: list[Copy]) -> None:
    """Enqueue ``copies`` from the 1-D uint8 tensor ``source`` into ``destination`` on the
    current stream (``non_blocking``: synchronise before relying on the bytes). Ranges must lie
    inside both tensors."""
    direct, gathers = plan(copies)
    if destination.device != source.device:  # a gather would need a staging copy anyway
        direct, gathers = copies, []
    for dst, src, n in direct:
        destination[dst : dst + n].copy_(source[src : src + n], non_blocking=True)
    for group in gathers:
        unit = row_bytes(group)
        dst0 = min(dst for dst, _, _ in group)
        src0 = min(src for _, src, _ in group)
        dst_rows = _rows(destination, dst0, unit)
        src_rows = _rows(source, src0, unit)
        counts = [n // unit for _, _, n in group]
        dst_idx = row_indices(torch, [(dst - dst0) // unit for dst, _, _ in group], counts)
        src_idx = row_indices(torch, [(src - src0) // unit for _, src, _ in group], counts)
        device = destination.device
        gathered = src_rows.index_select(0, src_idx.to(device, non_blocking=True))
        dst_rows.index_copy_(0, dst_idx.to(device, non_blocking=True), gathered)


def _rows(tensor: Any, start: int, unit: int) -> Any:
    """``tensor[start:]`` as whole rows of ``unit`` bytes."""
    return tensor[start : start + (tensor.numel() - start) // unit * unit].view(-1, unit)
