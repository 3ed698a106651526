"""The queue of sequences waiting for a prefill: priority first, then earliest deadline,
then arrival (pure).

A lower ``priority`` number is served first (vLLM's convention). Within a priority the
sequence whose time-to-first-token deadline comes first goes first, so under load the queue
serves the requests that can still meet their objective; sequences without a deadline follow
in arrival order. A preempted sequence keeps its key, so it goes back ahead of everything that
arrived after it.

Removal is lazy (an aborted sequence is skipped when it reaches the top), but every count is
exact: ``len`` and ``num_tokens_ahead`` only see live sequences. A second heap by deadline
finds the sequences whose deadline passed (``pop_expired``) without a scan.
"""

import heapq
import itertools
import math
from collections.abc import Iterator

from shared.engine.sequence import Sequence


class WaitingQueue:
    """Waiting sequences in service order; see the module docstring."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Sequence]] = []
        self._deadlines: list[tuple[float, int, Sequence]] = []
        self._keys: dict[int, tuple[int, float, int]] = {}  # id(seq) -> key while queued
        self._order = itertools.count()
        self._tokens_by_priority: dict[int, int] = {}
        self._num_tokens = 0

    def push(self, seq: Sequence) -> None:
        """Queue a new or preempted sequence (a preempted one keeps its first key)."""
        key = seq.queue_key
        if key is None:
            deadline = seq.deadline_s if seq.deadline_s is not None else math.inf
            key = (seq.priority, deadline, next(self._order))
            seq.queue_key = key
        self._keys[id(seq)] = key
        heapq.heappush(self._heap, (*key, seq))
        if seq.deadline_s is not None and seq.num_output_tokens == 0:
            heapq.heappush(self._deadlines, (seq.deadline_s, key[2], seq))
        self._count(seq, +1)

    def peek(self) -> Sequence | None:
        """The next sequence to serve, or None."""
        heap = self._heap
        while heap:
            seq = heap[0][3]
            if self._keys.get(id(seq)) == heap[0][:3]:
                return seq
            heapq.heappop(heap)  # removed, or queued again under another entry
        return None

    def pop(self) -> Sequence:
        """Remove and return the next sequence; ``IndexError`` if there is none."""
        seq = self.peek()
        if seq is None:
            raise IndexError("no waiting sequence")
        heapq.heappop(self._heap)
        self.remove(seq)
        return seq

    def remove(self, seq: Sequence) -> bool:
        """Take a sequence out (it started, or was aborted); False if it was not queued."""
        if self._keys.pop(id(seq), None) is None:
            return False
        self._count(seq, -1)
        return True

    def pop_expired(self, now_s: float) -> list[Sequence]:
        """Remove and return, earliest first, the sequences that have produced no token yet
        and whose deadline is before ``now_s``."""
        expired = []
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] < now_s:
            _, _, seq = heapq.heappop(deadlines)
            if id(seq) in self._keys and seq.num_output_tokens == 0:
                self.remove(seq)
                expired.append(seq)
        return expired

    def num_tokens_ahead(self, priority: int) -> int:
        """Tokens to prefill for the queued sequences served before a new one of
        ``priority`` (its own priority or a lower number; new ones come last within it)."""
        return sum(n for p, n in self._tokens_by_priority.items() if p <= priority)

    @property
    def num_tokens(self) -> int:
        """Tokens to prefill for every queued sequence (their cached prefix counted too)."""
        return self._num_tokens

    def __len__(self) -> int:
        return len(self._keys)

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __iter__(self) -> Iterator[Sequence]:
        """Live sequences in service order (a sorted copy; for tests and inspection)."""
        live = [e for e in self._heap if self._keys.get(id(e[3])) == e[:3]]
        return iter([e[3] for e in sorted(live, key=lambda e: e[:3])])

    def _count(self, seq: Sequence, sign: int) -> None:
        n = sign * seq.num_tokens
        self._num_tokens += n
        by_priority = self._tokens_by_priority
        by_priority[seq.priority] = by_priority.get(seq.priority, 0) + n
        if not by_priority[seq.priority]:
            del by_priority[seq.priority]
