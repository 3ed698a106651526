"""The planner's Prometheus metrics, in a registry of its own (no module-level state)."""

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.planner.policy import Decision, Switch
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
            "changes of the target by pool and direction (a role switch counts in both pools)",
            ["role", "direction"],
            registry=self.registry,
        )
        self.switches = Counter(
            "baton_planner_role_switches",
            "workers that changed role at the planner's request, by old and new role",
            ["from", "to"],
            registry=self.registry,
        )
        self.switch_failures = Counter(
            "baton_planner_role_switch_failures",
            "role switches a worker refused or did not answer (the connector acts instead)",
            ["from", "to"],
            registry=self.registry,
        )
        self.switch_seconds = Gauge(
            "baton_planner_role_switch_seconds",
            "the last role switch as the worker measured it (command to new registration)",
            registry=self.registry,
        )

    def observe(self, role: Role, view: PoolView, decision: Decision) -> None:
        self.desired.labels(role.value).set(decision.desired)
        self.actual.labels(role.value).set(view.num_workers)
        self.reporting.labels(role.value).set(len(view.loads))
        self.decisions.labels(role.value, decision.reason).inc()

    def applied(self, role: Role, decision: Decision) -> None:
        """The decision went to the connector."""
        if decision.is_change:
            direction = "up" if decision.desired > decision.previous else "down"
            self.actions.labels(role.value, direction).inc()

    def switched(self, switch: Switch, switch_s: float, desired: dict[Role, int]) -> None:
        self.switches.labels(switch.source.value, switch.target.value).inc()
        self.switch_seconds.set(switch_s)
        self.actions.labels(switch.target.value, "up").inc()
        self.actions.labels(switch.source.value, "down").inc()
        for role, num in desired.items():
            self.desired.labels(role.value).set(num)
