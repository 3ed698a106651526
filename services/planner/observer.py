"""The pools as the workers report them: the directory's members and their latest load."""

from collections.abc import Mapping
from dataclasses import dataclass

from proto.messages import InstanceId, LoadMetrics, WorkerInfo, WorkerRole
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


class PoolObserver:
    """Keeps the last ``LoadMetrics`` of every registered worker; :meth:`view` gives one pool
    with the workers that are registered and not draining, and their reports not older than
    ``stale_s``. Pure: the caller passes the time."""

    def __init__(self, stale_s: float) -> None:
        self.stale_s = stale_s
        self.workers: dict[InstanceId, WorkerInfo] = {}
        self._reports: dict[InstanceId, _Report] = {}

    def sync_workers(self, workers: Mapping[InstanceId, WorkerInfo]) -> None:
        """Take the directory's current members; forget the reports of those that left."""
        self.workers = dict(workers)
        for worker_id in [w for w in self._reports if w not in self.workers]:
            del self._reports[worker_id]

    def record(self, metrics: LoadMetrics, now_s: float) -> None:
        self._reports[metrics.worker_id] = _Report(metrics, now_s)

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
        return _load(report.metrics, info)


def _load(metrics: LoadMetrics, info: WorkerInfo) -> WorkerLoad:
    return WorkerLoad(
        # A request waiting for its prompt's KV is the prefill pool's work (in its queue),
        # not a decode batch slot: a prefill bottleneck must not look like decode load.
        num_running=max(0, metrics.num_running - metrics.num_awaiting_kv),
        num_waiting=metrics.num_waiting,
        num_waiting_tokens=metrics.num_waiting_tokens,
        kv_usage=metrics.kv_usage,
        predicted_wait_s=metrics.predicted_wait_s,
        wait_per_token_s=metrics.wait_per_token_s,
        max_num_running=metrics.max_num_running,
        max_num_seqs=info.max_num_seqs,
    )
