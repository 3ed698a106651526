"""The planner's Prometheus metrics, in a registry of its own (no module-level state)."""

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.planner.policy import Decision
from services.planner.signals import PoolView, Role


class PlannerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.desired = Gauge(
            "baton_planner_desired_workers",
            "workers the planner wants in the pool",
            ["role"],
            registry=self.registry,
        )
        self.actual = Gauge(
            "baton_planner_actual_workers",
            "workers registered in the pool and not draining",
            ["role"],
            registry=self.registry,
        )
        self.reporting = Gauge(
            "baton_planner_reporting_workers",
            "workers of the pool with a fresh load report",
            ["role"],
            registry=self.registry,
        )
        self.decisions = Counter(
            "baton_planner_decisions",
            "decisions by pool and reason (one per pool per interval)",
            ["role", "reason"],
            registry=self.registry,
        )
        self.actions = Counter(
            "baton_planner_scale_actions",
            "changes of the target by pool and direction",
            ["role", "direction"],
            registry=self.registry,
        )

    def observe(self, role: Role, view: PoolView, decision: Decision) -> None:
        self.desired.labels(role.value).set(decision.desired)
        self.actual.labels(role.value).set(view.num_workers)
        self.reporting.labels(role.value).set(len(view.loads))
        self.decisions.labels(role.value, decision.reason).inc()
        if decision.is_change:
            direction = "up" if decision.desired > decision.previous else "down"
            self.actions.labels(role.value, direction).inc()
