"""The pools as the workers report them: the directory's members and their latest load."""

from collections.abc import Mapping
from dataclasses import dataclass

from proto.messages import InstanceId, LoadMetrics, WorkerInfo, WorkerRole
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
        members = [
            info
            for info in self.workers.values()
            if _POOL_OF_ROLE.get(info.role) is role and not info.is_draining
        ]
        loads = []
        for info in members:
            report = self._reports.get(info.worker_id)
            if report is None or now_s - report.received_s > self.stale_s:
                continue
            if report.metrics.is_draining:
                continue
            loads.append(_load(report.metrics, info))
        return PoolView(role=role, num_workers=len(members), loads=tuple(loads))


def _load(metrics: LoadMetrics, info: WorkerInfo) -> WorkerLoad:
    return WorkerLoad(
        num_running=metrics.num_running,
        num_waiting=metrics.num_waiting,
        num_waiting_tokens=metrics.num_waiting_tokens,
        kv_usage=metrics.kv_usage,
        predicted_wait_s=metrics.predicted_wait_s,
        wait_per_token_s=metrics.wait_per_token_s,
        max_num_running=metrics.max_num_running,
        max_num_seqs=info.max_num_seqs,
    )
