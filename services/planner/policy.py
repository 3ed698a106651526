"""The planner's decision: how many workers one pool should run (pure and synchronous).

Each interval the service hands a :class:`PoolPlanner` the pool as the workers report it
(:class:`~services.planner.signals.PoolView`) and the time; it answers a :class:`Decision`:
the desired number of workers and why. The rules, in order:

1. **Pending**: while the pool has not yet reached the last target (workers take seconds to
   start and to drain), hold, up to ``settle_timeout_s``. Otherwise every decision starts
   from the workers the pool has (not from an earlier target), so a planner that starts
   or restarts, or whose connector does nothing (dry run), never acts on a stale count.
2. **No reports**: without a fresh report from any worker of the pool, hold.
3. **Reading**: load mode compares the reports with thresholds (``signals.pressure``); SLA
   mode sizes the pool from its demand, forecast ``horizon_s`` ahead along its trend, over
   what one worker holds at ``target_utilization`` (``signals.demand``).
4. **Hysteresis**: act only when the reading has said "up" ``up_intervals`` times in a row, or
   "down" ``down_intervals`` times in a row; anything else resets the count.
5. **Cool-down**: no action within ``up_cooldown_s`` (for an increase) or ``down_cooldown_s``
   (for a decrease) of the last one.
6. **Limits**: never outside ``[min_replicas, max_replicas]``; a target outside is clamped at
   once (reason ``min``/``max``), a step past a limit is held (``at_min``/``at_max``). A cap
   on the total of both pools (``max_total``) holds a step up too (``at_total``), a floor
   under it (``min_total``) a step down (``at_total_min``): with both equal the total is
   fixed, and only role switches move capacity.

Load mode moves one worker per action, except up while the frontends shed requests for the
pool: then it goes to the pool's size times demand over what is served (``1 / (1 - shed
share)``) in one action. SLA mode counts the shed requests in the demand, goes up to its
target in one action and down one worker per action (a worker removed drains its requests,
which takes a while).

**Role switching** (:func:`plan_switch`) runs over both pools' decisions: when one pool wants
a worker more (it steps up, or is held ``at_total``) while the other's reading says it can
spare one, a worker of the other pool changes role (a second) instead of a process starting
(seconds or minutes). :func:`choose_worker` picks the one that has the least work to move.
"""

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from proto.messages import InstanceId
from services.planner.signals import (
    PoolView,
    Role,
    Thresholds,
    WorkerLoad,
    demand,
    pressure,
    steady_slope_per_s,
    unshed_factor,
)


class Mode(Enum):
    LOAD = "load"
    SLA = "sla"


@dataclass(frozen=True, slots=True, kw_only=True)
class PolicyConfig:
    mode: Mode = Mode.LOAD
    ttft_s: float | None = None  # the TTFT objective, if any
    tpot_s: float | None = None  # the TPOT objective, if any
    # The share of the TTFT objective admission lets a predicted wait take (the workers'
    # --slo-admit-fraction); 1.0 as if every request were admitted.
    admit_fraction: float = 1.0
    thresholds: Thresholds = field(default_factory=Thresholds)
    up_intervals: int = 3
    down_intervals: int = 10
    up_cooldown_s: float = 10.0
    down_cooldown_s: float = 30.0
    settle_timeout_s: float = 60.0
    target_utilization: float = 0.7  # SLA mode: the share of a worker's capacity to plan for
    horizon_s: float = 10.0  # SLA mode: how far ahead the trend is followed
    trend_window: int = 10  # SLA mode: intervals the trend is fitted over

    @property
    def wait_budget_s(self) -> float | None:
        """The longest predicted wait admission takes a request on with (None: no TTFT
        objective, so none is shed)."""
        return None if self.ttft_s is None else self.ttft_s * self.admit_fraction

    def __post_init__(self) -> None:
        if self.up_intervals < 1 or self.down_intervals < 1:
            raise ValueError(
                f"up_intervals and down_intervals must be >= 1, "
                f"got {self.up_intervals} and {self.down_intervals}"
            )
        for name in ("up_cooldown_s", "down_cooldown_s", "settle_timeout_s", "horizon_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization must be in (0, 1], got {self.target_utilization}")
        if not 0 < self.admit_fraction <= 1:
            raise ValueError(f"admit_fraction must be in (0, 1], got {self.admit_fraction}")
        if self.trend_window < 2:
            raise ValueError(f"trend_window must be >= 2, got {self.trend_window}")


@dataclass(frozen=True, slots=True)
class Limits:
    min_replicas: int
    max_replicas: int

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas, "
                f"got {self.min_replicas} and {self.max_replicas}"
            )

    def clamp(self, n: int) -> int:
        return max(self.min_replicas, min(self.max_replicas, n))


@dataclass(frozen=True, slots=True)
class Decision:
    """``desired`` workers (``previous`` before this decision); ``reason`` is one word from a
    small set (a metrics label: up/down by ``queue``, ``wait``, ``kv``, ``batch``, ``busy``,
    ``idle``, ``sla``, ``min``, ``max``; held by ``steady``, ``streak``, ``cooldown``, ``pending``,
    ``no_reports``, ``at_min``, ``at_max``, ``at_total``, ``at_total_min``, ``no_capacity``),
    ``detail`` a sentence with the numbers. ``direction`` is what this interval's reading
    said, whether or not it was acted on: +1 more workers, -1 fewer, 0 neither (or no
    reading), and ``streak`` for how many intervals in a row it has said so."""

    desired: int
    previous: int
    reason: str
    detail: str
    direction: int = 0
    streak: int = 0  # intervals in a row the reading has said ``direction`` (0: neither)

    @property
    def is_change(self) -> bool:
        return self.desired != self.previous


class PoolPlanner:
    """The decision state of one pool: its target, the streaks and the last action."""

    def __init__(self, config: PolicyConfig, limits: Limits) -> None:
        self.config = config
        self.limits = limits
        self.desired: int | None = None  # set from the pool at the first decision
        self._planned_from = 0  # the pool's size at the last decision that read it
        self._num_up = 0  # consecutive intervals that said "up"
        self._num_down = 0
        self._last_action_s = -math.inf
        self._history: deque[tuple[float, float]] = deque(maxlen=config.trend_window)

    def decide(
        self,
        view: PoolView,
        now_s: float,
        max_total: int | None = None,
        min_total: int | None = None,
    ) -> Decision:
        """The desired number of workers for ``view`` at ``now_s`` (a monotonic clock); a
        step up holds (``at_total``) past ``max_total`` workers in this pool (what the cap on
        both pools together leaves it), a step down (``at_total_min``) below ``min_total``
        (what the floor under both leaves it)."""
        target = self.desired
        is_settling = now_s - self._last_action_s < self.config.settle_timeout_s
        if target is not None and view.num_workers != target and is_settling:
            return self._hold(target, "pending", f"{view.num_workers} of {target} workers")
        # Plan from the pool as it is: a target it did not reach in time is given up.
        previous = self.desired = self._planned_from = view.num_workers
        clamped = self.limits.clamp(previous)
        if clamped != previous:
            reason = "min" if clamped > previous else "max"
            return self._act(clamped, previous, reason, f"limits {self.limits}", now_s)
        if not view.loads:
            self._num_up = self._num_down = 0
            return self._hold(previous, "no_reports", "no fresh load report from the pool")
        totals = (max_total, min_total)
        if self.config.mode is Mode.LOAD:
            return self._decide_load(view, previous, now_s, totals)
        return self._decide_sla(view, previous, now_s, totals)

    def _decide_load(
        self, view: PoolView, previous: int, now_s: float, totals: tuple[int | None, int | None]
    ) -> Decision:
        config = self.config
        reading = pressure(view, config.thresholds, config.wait_budget_s, config.tpot_s)
        direction = 1 if reading.is_over else -1 if reading.is_under else 0
        candidate = previous + direction
        if direction > 0 and view.shed_fraction > 0:
            # The sheds say how far demand is past what the pool serves: go there at once.
            candidate = max(candidate, math.ceil(previous * unshed_factor(view.shed_fraction)))
        return self._step(direction, candidate, reading.label, reading.detail, now_s, totals)

    def _decide_sla(
        self, view: PoolView, previous: int, now_s: float, totals: tuple[int | None, int | None]
    ) -> Decision:
        config = self.config
        max_wait_fraction = config.thresholds.max_wait_fraction
        needs = [demand(view, config.ttft_s, max_wait_fraction)]
        if view.prefills_locally:  # its workers' prompts are its work too
            prompts = replace(view, role=Role.PREFILL)
            needs.append(demand(prompts, config.ttft_s, max_wait_fraction))
        # What was shed never reached the pool's queues: it is demand all the same.
        unshed = unshed_factor(view.shed_fraction)
        known = [replace(n, amount=n.amount * unshed) for n in needs if n.per_worker > 0]
        if not known:
            self._num_up = self._num_down = 0
            return self._hold(previous, "no_capacity", "worker capacity not measured yet")
        # In workers, so that sequences and prompt tokens compare (and the trend keeps its
        # unit when the larger of the two changes).
        need = max(known, key=lambda n: n.amount / n.per_worker)
        workers = need.amount / need.per_worker
        self._history.append((now_s, workers))
        trend = steady_slope_per_s(list(self._history))
        forecast = max(0.0, workers + trend * config.horizon_s)
        target = self.limits.clamp(math.ceil(forecast / config.target_utilization))
        detail = (
            f"{need.amount:.0f} {need.unit} ({need.basis}), {need.per_worker:.0f} per worker: "
            f"{workers:.2f} workers (trend {trend:+.3f}/s, forecast {forecast:.2f}) at "
            f"{config.target_utilization:.0%}: {target} workers"
        )
        direction = (target > previous) - (target < previous)
        # Up to the target at once; down one worker at a time (each drains first).
        candidate = target if direction > 0 else previous - 1
        return self._step(direction, candidate, "sla", detail, now_s, totals)

    def _step(
        self,
        direction: int,
        candidate: int,
        label: str,
        detail: str,
        now_s: float,
        totals: tuple[int | None, int | None] = (None, None),
    ) -> Decision:
        """Count the streak of ``direction`` (+1 up, -1 down, 0 neither) and act on it when
        it is long enough, the cool-down has passed and the limits allow (``totals``: what
        the cap and the floor on both pools together leave this one)."""
        previous = self.desired
        assert previous is not None  # set by decide()
        self._num_up = self._num_up + 1 if direction > 0 else 0
        self._num_down = self._num_down + 1 if direction < 0 else 0
        if direction == 0:
            return self._hold(previous, "steady", detail, direction)
        streak = self._num_up if direction > 0 else self._num_down  # an action resets it
        decision = self._step_on(direction, candidate, label, detail, now_s, totals)
        return replace(decision, streak=streak)

    def _step_on(
        self,
        direction: int,
        candidate: int,
        label: str,
        detail: str,
        now_s: float,
        totals: tuple[int | None, int | None],
    ) -> Decision:
        """The rest of :meth:`_step` for a reading that says up or down."""
        max_total, min_total = totals
        config = self.config
        previous = self.desired
        assert previous is not None
        streak, needed = (
            (self._num_up, config.up_intervals)
            if direction > 0
            else (self._num_down, config.down_intervals)
        )
        if streak < needed:
            text = f"{detail} ({streak}/{needed} intervals)"
            return self._hold(previous, "streak", text, direction)
        bounded = self.limits.clamp(candidate)
        if bounded == previous:
            edge = "at_max" if direction > 0 else "at_min"
            return self._hold(previous, edge, f"{detail}; limits {self.limits}", direction)
        cooldown_s = config.up_cooldown_s if direction > 0 else config.down_cooldown_s
        since_s = now_s - self._last_action_s
        if since_s < cooldown_s:
            text = f"{detail}; {since_s:.1f} of {cooldown_s} s"
            return self._hold(previous, "cooldown", text, direction)
        if direction > 0 and max_total is not None and bounded > max_total:
            bounded = max(previous, max_total)
            if bounded == previous:
                text = f"{detail}; the total of both pools is at its cap"
                return self._hold(previous, "at_total", text, direction)
        if direction < 0 and min_total is not None and bounded < min_total:
            bounded = min(previous, min_total)
            if bounded == previous:
                text = f"{detail}; the total of both pools is at its floor"
                return self._hold(previous, "at_total_min", text, direction)
        return self._act(bounded, previous, label, detail, now_s, direction)

    def note_switch(self, delta: int, now_s: float) -> None:
        """A worker joined (+1) or left (-1) this pool by changing role at ``now_s``: that is
        an action (the cool-down counts from it) whose target is the pool as it was plus
        ``delta`` (pending until the directory shows it)."""
        assert self.desired is not None  # set by decide()
        self.desired = self.limits.clamp(self._planned_from + delta)
        self._last_action_s = now_s
        self._num_up = self._num_down = 0

    def _act(
        self,
        desired: int,
        previous: int,
        reason: str,
        detail: str,
        now_s: float,
        direction: int = 0,
    ) -> Decision:
        self.desired = desired
        self._last_action_s = now_s
        self._num_up = self._num_down = 0
        return Decision(desired, previous, reason, detail, direction)

    @staticmethod
    def _hold(desired: int, reason: str, detail: str, direction: int = 0) -> Decision:
        return Decision(desired, desired, reason, detail, direction)


# --- role switching ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Switch:
    """Move one worker from the ``source`` pool to the ``target`` pool by changing its role;
    ``detail`` says why, with both pools' readings."""

    source: Role
    target: Role
    detail: str


def plan_switch(
    decisions: Mapping[Role, Decision],
    views: Mapping[Role, PoolView],
    limits: Mapping[Role, Limits],
    min_spare_streak: int = 1,
) -> Switch | None:
    """A switch rather than this interval's decisions, or None (apply them as they are).

    Only with both pools planned. The *target* pool wants a worker more: it steps up, or it
    would but the cap on the total holds it (``at_total``). The *source* pool can spare one:
    its reading has said fewer workers for ``min_spare_streak`` intervals in a row, or once
    when the target is only raised to its minimum (the
    planner passes its up streak: a prefill worker between two prompts has no request on
    it for an instant; it need not have reached its down streak, since a switch is undone
    in a second and a retired process is not), it has more than its minimum, and the
    target has fewer than its maximum. The pool that wants more goes first: a pool stepping
    down with no pool short of workers is left to the connector (it retires a process)."""
    if len(decisions) != 2 or any(role not in views or role not in limits for role in decisions):
        return None
    for target, wanted in decisions.items():
        if not (wanted.desired > wanted.previous or wanted.reason == "at_total"):
            continue
        [source] = [role for role in decisions if role is not target]
        spare = decisions[source]
        # A target raised to its minimum (a limit, not a reading) takes any worker to spare.
        needed_streak = 1 if wanted.reason == "min" else min_spare_streak
        if spare.direction >= 0 or spare.streak < needed_streak:
            return None
        if views[source].num_workers <= limits[source].min_replicas:
            return None
        if views[target].num_workers >= limits[target].max_replicas:
            return None
        return Switch(
            source,
            target,
            f"{target.value} {wanted.reason} ({wanted.detail}); "
            f"{source.value} {spare.reason} ({spare.detail})",
        )
    return None


@dataclass(frozen=True, slots=True)
class Candidate:
    """A worker of the source pool as the planner sees it: its last fresh report (None: none
    lately) and whether it can become a prefill worker (it has a KV transfer agent)."""

    worker_id: InstanceId
    load: WorkerLoad | None
    can_prefill: bool = True


def choose_worker(candidates: Sequence[Candidate], target: Role) -> InstanceId | None:
    """The worker to switch to ``target``: one that reported lately, with the fewest
    requests running and queued (the least to hand off or finish); ties by id, so that a
    decision is repeatable. None when no worker fits (none reported, or none can prefill)."""
    fit = [
        c
        for c in candidates
        if c.load is not None and (target is not Role.PREFILL or c.can_prefill)
    ]
    if not fit:
        return None

    def work(candidate: Candidate) -> tuple[int, str]:
        load = candidate.load
        assert load is not None
        return (load.num_running + load.num_waiting, candidate.worker_id)

    return min(fit, key=work).worker_id
