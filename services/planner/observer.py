"""The pools as the workers report them: the directory's members and their latest load."""

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from proto.messages import FrontendLoad, InstanceId, LoadMetrics, WorkerInfo, WorkerRole
from services.planner.policy import Candidate
from services.planner.signals import PoolView, Role, WorkerLoad

_POOL_OF_ROLE = {
    WorkerRole.DECODE: Role.DECODE,
    WorkerRole.AGGREGATED: Role.DECODE,
    WorkerRole.PREFILL: Role.PREFILL,
}


@dataclass(frozen=True, slots=True)
class _Report:
    metrics: LoadMetrics
    received_s: float


RATE_WINDOW_S = 3.0  # arrival rates are measured over the reports of this long
# The frontends' shed share, over a shorter window: a step in the load must read whole by the
# time the up streak acts on it, not averaged with the seconds before it.
SHED_WINDOW_S = 1.5
MIN_RATE_SPAN_S = 0.5  # ... once they span at least this long (before: 0)


MIN_FINISHED = 4  # finished requests in the window for their mean output length (else all)


@dataclass(frozen=True, slots=True)
class _WorkerCounters:
    """A worker's arrival and finish counters at one report."""

    at_s: float
    num_requests: int
    num_prefill_tokens: int
    num_finished: int = 0
    num_finished_output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class _Answers:
    """A frontend process's counters at one report."""

    at_s: float
    num_requests: int
    num_shed: int


_Sample = TypeVar("_Sample", _WorkerCounters, _Answers)


def _append(history: deque[_Sample], sample: _Sample, window_s: float) -> None:
    """Add a sample of a process's counters; keep the newest one at or before the window's
    start, so that a rate spans the whole window. Counters that went back are another run of
    the process (a restart under the same id): its history starts again."""
    if history and sample.num_requests < history[-1].num_requests:
        history.clear()
    history.append(sample)
    while len(history) > 2 and history[1].at_s <= sample.at_s - window_s:
        history.popleft()


class PoolObserver:
    """Keeps the last ``LoadMetrics`` of every registered worker, and its arrival and finish
    counters over the last ``RATE_WINDOW_S``; :meth:`view` gives one pool with the workers
    that are registered and not draining, and their reports not older than ``stale_s`` (with
    the arrival rates and output lengths the counters give). Pure: the caller passes the
    time."""

    def __init__(self, stale_s: float) -> None:
        self.stale_s = stale_s
        self.workers: dict[InstanceId, WorkerInfo] = {}
        self._reports: dict[InstanceId, _Report] = {}
        self._counters: dict[InstanceId, deque[_WorkerCounters]] = {}
        self._frontends: dict[InstanceId, deque[_Answers]] = {}

    def sync_workers(self, workers: Mapping[InstanceId, WorkerInfo]) -> None:
        """Take the directory's current members; forget the reports of those that left."""
        self.workers = dict(workers)
        for worker_id in [w for w in self._reports if w not in self.workers]:
            del self._reports[worker_id]
            self._counters.pop(worker_id, None)

    def record(self, metrics: LoadMetrics, now_s: float) -> None:
        self._reports[metrics.worker_id] = _Report(metrics, now_s)
        history = self._counters.setdefault(metrics.worker_id, deque())
        sample = _WorkerCounters(
            now_s,
            metrics.num_arrived,
            metrics.num_arrived_prefill_tokens,
            metrics.num_finished,
            metrics.num_finished_output_tokens,
        )
        _append(history, sample, RATE_WINDOW_S)

    def record_frontend(self, load: FrontendLoad, now_s: float) -> None:
        """A frontend process's request and shed counters (``FrontendLoad``)."""
        history = self._frontends.setdefault(load.frontend_id, deque())
        _append(history, _Answers(now_s, load.num_requests, load.num_shed), SHED_WINDOW_S)

    def shed_fraction(self, now_s: float) -> float:
        """The share of the completion requests the frontends answered 429 lately (over the
        last ``SHED_WINDOW_S``; frontends silent for ``stale_s`` are forgotten). A shed
        request reaches no worker: this is the demand the workers' reports do not show."""
        requests = shed = 0
        for frontend_id, history in list(self._frontends.items()):
            first, last = history[0], history[-1]
            if now_s - last.at_s > self.stale_s:
                del self._frontends[frontend_id]
                continue
            if last.at_s - first.at_s >= MIN_RATE_SPAN_S:
                requests += last.num_requests - first.num_requests
                shed += last.num_shed - first.num_shed
        return shed / requests if requests > 0 else 0.0

    def arrival_rates(self, worker_id: InstanceId) -> tuple[float, float]:
        """(requests, prompt tokens it prefills) per second arriving at a worker lately; 0
        until its reports span ``MIN_RATE_SPAN_S``."""
        history = self._counters.get(worker_id)
        if not history:
            return 0.0, 0.0
        first, last = history[0], history[-1]
        span_s = last.at_s - first.at_s
        if span_s < MIN_RATE_SPAN_S:
            return 0.0, 0.0
        return (
            (last.num_requests - first.num_requests) / span_s,
            (last.num_prefill_tokens - first.num_prefill_tokens) / span_s,
        )

    def mean_output_tokens(self, worker_id: InstanceId) -> float:
        """Output tokens per request of those a worker finished lately: over the rate window
        once ``MIN_FINISHED`` finished in it, else over all it has reported (0: none yet)."""
        history = self._counters.get(worker_id)
        if not history:
            return 0.0
        first, last = history[0], history[-1]
        finished = last.num_finished - first.num_finished
        if finished >= MIN_FINISHED:
            return (last.num_finished_output_tokens - first.num_finished_output_tokens) / finished
        if last.num_finished > 0:
            return last.num_finished_output_tokens / last.num_finished
        return 0.0

    def view(self, role: Role, now_s: float) -> PoolView:
        members = self._members(role)
        loads = [load for info in members if (load := self._fresh(info, now_s)) is not None]
        return PoolView(role=role, num_workers=len(members), loads=tuple(loads))

    def candidates(self, role: Role, now_s: float) -> list[Candidate]:
        """The pool's workers that could change role: only workers of that role exactly (an
        aggregated worker is no decode worker to switch), with their fresh reports."""
        return [
            Candidate(info.worker_id, self._fresh(info, now_s), can_prefill=bool(info.kv_agent))
            for info in self._members(role)
            if info.role in (WorkerRole.DECODE, WorkerRole.PREFILL)
        ]

    def _members(self, role: Role) -> list[WorkerInfo]:
        return [
            info
            for info in self.workers.values()
            if _POOL_OF_ROLE.get(info.role) is role and not info.is_draining
        ]

    def _fresh(self, info: WorkerInfo, now_s: float) -> WorkerLoad | None:
        report = self._reports.get(info.worker_id)
        if report is None or now_s - report.received_s > self.stale_s:
            return None
        if report.metrics.is_draining:
            return None
        requests_per_s, tokens_per_s = self.arrival_rates(info.worker_id)
        return replace(
            _load(report.metrics, info),
            arrival_rate=requests_per_s,
            prefill_token_rate=tokens_per_s,
            mean_output_tokens=self.mean_output_tokens(info.worker_id),
        )


def _load(metrics: LoadMetrics, info: WorkerInfo) -> WorkerLoad:
    capacity = metrics.max_num_running or info.max_num_seqs
    return WorkerLoad(
        # A request waiting for its prompt's KV is the prefill pool's work (in its queue),
        # not a decode batch slot: a prefill bottleneck must not look like decode load.
        num_running=max(0, metrics.num_running - metrics.num_awaiting_kv),
        num_waiting=metrics.num_waiting,
        num_waiting_tokens=metrics.num_waiting_tokens,
        kv_usage=metrics.kv_usage,
        predicted_wait_s=metrics.predicted_wait_s,
        wait_per_token_s=metrics.wait_per_token_s,
        prefill_s_per_token=metrics.step_per_token_s,
        max_num_running=metrics.max_num_running,
        max_num_seqs=info.max_num_seqs,
        # The measured step time with its batch full (the reported base holds a step's fixed
        # prefill cost too: a full batch keeps taking new requests in).
        full_step_s=metrics.step_base_s + metrics.step_per_seq_s * capacity,
    )
