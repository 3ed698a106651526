"""What one pool's load reports say, reduced to the planner's two questions (pure).

Load mode asks "is this pool over its thresholds, or would it fit on one worker fewer?";
SLA mode asks "how many workers does the demand, and where it is heading, need?". Both read
only the workers' own ``LoadMetrics`` (queue, predicted wait, KV usage, running batch and the
measured speed behind the batch cap and the wait per token).
"""

import math
from dataclasses import dataclass, replace
from enum import Enum


class Role(Enum):
    """The pools the planner sizes (the worker's ``--role``)."""

    DECODE = "decode"
    PREFILL = "prefill"


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerLoad:
    """One worker's latest report, as the policy reads it."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_tokens: int = 0
    kv_usage: float = 0.0
    predicted_wait_s: float = 0.0
    wait_per_token_s: float = 0.0  # measured: how much longer the wait gets per queued token
    prefill_s_per_token: float = 0.0  # measured: what a prompt token adds to its step
    max_num_running: int = 0  # the batch cap its TPOT objective sets now (0: none)
    max_num_seqs: int = 0  # its configured batch limit (WorkerInfo), the cap without one
    arrival_rate: float = 0.0  # requests per second arriving lately (its counters' rate)
    prefill_token_rate: float = 0.0  # prompt tokens per second arriving that it prefills
    mean_output_tokens: float = 0.0  # output tokens of the requests it finished lately (0: none)
    full_step_s: float = 0.0  # measured: a step with its batch at capacity (0: not measured)

    @property
    def sequence_lifetime_s(self) -> float:
        """How long a request stays in its batch when the batch is full: its output tokens,
        one a step, at the step time of a full batch (0: unknown)."""
        return self.mean_output_tokens * self.full_step_s

    @property
    def batch_capacity(self) -> int:
        """The most sequences it runs at once now (0: unknown)."""
        return self.max_num_running or self.max_num_seqs

    @property
    def prefill_busy(self) -> float:
        """Seconds of prefill a second brings it: the prompt tokens arriving for it to
        prefill, each at its measured cost in a step (``prefill_s_per_token``; not
        ``wait_per_token_s``, which adds the decode steps a queued prompt waits through).
        Above 1 it cannot keep up."""
        return self.prefill_token_rate * self.prefill_s_per_token


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolView:
    """One pool at one instant: ``num_workers`` registered and not draining, and the fresh
    reports of those workers (a worker that has not reported lately is missing from
    ``loads``: it counts as a worker but says nothing about the load)."""

    role: Role
    num_workers: int
    loads: tuple[WorkerLoad, ...] = ()
    # The share of requests the frontends shed lately for want of this pool (the planner
    # gives the frontends' sheds to the pools that are short: ``shed_pools``).
    shed_fraction: float = 0.0
    # A decode pool with no prefill pool planned beside it: its workers prefill every prompt
    # themselves, so its demand is prompt tokens as well as sequences.
    prefills_locally: bool = False

    @property
    def mean_wait_s(self) -> float:
        return _mean([load.predicted_wait_s for load in self.loads])


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """Load mode's limits. A pool is over when, on average per worker, any one is passed;
    it is under when all of them, spread over one worker fewer, stay below
    ``down_fraction`` of the limit (the gap between the two is the hysteresis)."""

    max_wait_fraction: float = 0.5  # predicted wait over this fraction of admission's bound
    max_waiting: float = 4.0  # queued requests per worker
    max_kv_usage: float = 0.85
    max_batch_fraction: float = 0.9  # running sequences over the batch capacity
    max_prefill_busy: float = 0.8  # a prefill pool's seconds of prefill a second, per worker
    max_shed_fraction: float = 0.02  # of requests the frontends shed for want of the pool
    down_fraction: float = 0.5

    def __post_init__(self) -> None:
        names = ("max_wait_fraction", "max_kv_usage", "max_batch_fraction", "down_fraction")
        for name in (*names, "max_shed_fraction"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        if not self.max_prefill_busy > 0:  # above 1: past saturation (in effect, off)
            raise ValueError(f"max_prefill_busy must be > 0, got {self.max_prefill_busy}")
        if self.max_waiting <= 0:
            raise ValueError(f"max_waiting must be > 0, got {self.max_waiting}")


@dataclass(frozen=True, slots=True)
class Pressure:
    """Load mode's reading: ``label`` names the signal that decided (``shed``, ``queue``,
    ``wait``, ``kv``, ``batch``, ``busy``; ``idle`` when under; ``ok`` when neither),
    ``detail`` the numbers."""

    is_over: bool
    is_under: bool
    label: str
    detail: str


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def pressure(
    view: PoolView, limits: Thresholds, wait_budget_s: float | None, tpot_s: float | None = None
) -> Pressure:
    """Whether ``view`` is over its limits, under them, or neither. ``wait_budget_s`` is the
    longest predicted wait admission lets a request take on (``PolicyConfig.wait_budget_s``;
    None without a TTFT objective): the ``wait`` reading is over at ``max_wait_fraction`` of
    it, so that a pool reads over as admission nears shedding (a shed request leaves no queue
    for the planner to see). The two are not the same prediction: the reported wait is the
    queue's, while admission adds the new request's own prompt (and a frontend what it sent
    since the last report), so a pool of long prompts can shed before it reads over.

    A pool the frontends shed requests for (``PoolView.shed_fraction``) reads over past
    ``max_shed_fraction`` of them (``shed``): the one reading of demand no worker sees.

    A prefill pool also reads its prefill time per worker (``busy``). With no prefill worker
    that is the time the decode workers spend on their own prompts, and it counts only with a
    TPOT objective: without one, a decode worker's own prefill costs its streams nothing
    they were promised, and two workers that both prefill clear more prompts than one prefill
    worker would (the queue and wait readings still ask for one when prompts wait)."""
    loads = view.loads
    waiting = _mean([load.num_waiting for load in loads])
    wait_s = view.mean_wait_s
    kv = _mean([load.kv_usage for load in loads])
    batch = _mean([load.num_running / load.batch_capacity for load in loads if load.batch_capacity])
    readings = [
        ("queue", waiting, limits.max_waiting, f"waiting {waiting:.1f}/worker"),
        ("kv", kv, limits.max_kv_usage, f"kv usage {kv:.2f}"),
        ("batch", batch, limits.max_batch_fraction, f"batch {batch:.2f} of capacity"),
    ]
    if wait_budget_s is not None:
        max_wait_s = limits.max_wait_fraction * wait_budget_s
        readings.insert(1, ("wait", wait_s, max_wait_s, f"predicted wait {wait_s:.3f} s"))
    if view.shed_fraction > 0:
        shed = view.shed_fraction
        readings.insert(0, ("shed", shed, limits.max_shed_fraction, f"shed {shed:.1%}"))
    if view.role is Role.PREFILL and (view.num_workers > 0 or tpot_s is not None):
        # Per worker; a pool with none yet reads what its first worker would take on.
        prefill_s = sum(load.prefill_busy for load in loads) / max(1, view.num_workers)
        text = f"prefill {prefill_s:.2f} s/s per worker"
        readings.append(("busy", prefill_s, limits.max_prefill_busy, text))
    for label, value, limit, text in readings:
        if value >= limit:
            return Pressure(True, False, label, f"{text} >= {limit:.3g}")
    # Under: the same total load on one worker fewer stays well below every limit. For the
    # last worker of a pool that may be empty, that is: no request on it (a KV cache that
    # keeps finished requests' blocks for reuse is not work), and, for a prefill worker, no
    # more than a little prefill arriving (between two prompts it holds none for an instant).
    fewer = view.num_workers - 1
    if fewer == 0:
        if any(load.num_running or load.num_waiting for load in loads):
            return Pressure(False, False, "ok", "requests on the last worker")
        for label, value, limit, text in readings:
            if label == "busy" and value >= limits.down_fraction * limit:
                return Pressure(False, False, "ok", f"{text}: prompts keep arriving")
        return Pressure(False, True, "idle", "no request on the last worker")
    spread = view.num_workers / fewer if fewer > 0 else math.inf
    for label, value, limit, text in readings:
        # Sheds under their limit (a burst, a frontend's moment of lag) say nothing of one
        # worker fewer; the queue, wait and batch readings do.
        if label != "shed" and value > 0 and value * spread >= limits.down_fraction * limit:
            return Pressure(False, False, "ok", f"{text}: {fewer} workers would hold {label}")
    return Pressure(False, True, "idle", f"load fits on {fewer} workers")


MAX_SHED_SIZING = 0.9  # the most of the requests read as shed when sizing a pool from it


def unshed_factor(shed_fraction: float) -> float:
    """How many times the work served the demand is, when ``shed_fraction`` of the requests
    are shed (at most ``1 / (1 - MAX_SHED_SIZING)``)."""
    return 1.0 / (1.0 - min(max(shed_fraction, 0.0), MAX_SHED_SIZING))


def shed_pool(views: dict[Role, PoolView]) -> Role:
    """The pool the frontends' sheds are for: the prefill pool when it is planned and its
    workers' predicted wait is the longer (with no prefill worker, its view holds the decode
    workers' own prompts: ``with_local_prefill``), else the decode pool. Admission sheds a
    request for its predicted wait, so the longer wait is the shortage."""
    prefill = views.get(Role.PREFILL)
    if prefill is not None and prefill.loads:
        decode = views.get(Role.DECODE)
        if decode is None or prefill.mean_wait_s > decode.mean_wait_s:
            return Role.PREFILL
    return Role.DECODE


def shed_pools(
    views: dict[Role, PoolView], wait_budget_s: float | None, max_wait_fraction: float
) -> tuple[Role, ...]:
    """The pools the frontends' sheds are for: each pool whose workers' mean predicted wait
    reads over (``max_wait_fraction`` of ``wait_budget_s``, the ``wait`` reading), when more
    than one does, since then either alone would use up most of a request's budget and both
    are short; else the one ``shed_pool`` names."""
    if wait_budget_s is not None:
        limit = max_wait_fraction * wait_budget_s
        over = tuple(role for role, v in views.items() if v.loads and v.mean_wait_s >= limit)
        if len(over) > 1:
            return over
    return (shed_pool(views),)


MAX_LOCAL_PREFILL_SHARE = 0.9  # the most of a decode worker's time read as its own prefill


def with_local_prefill(
    decode: PoolView, prefill: PoolView, limits: Thresholds
) -> tuple[PoolView, PoolView]:
    """The two pools' views when the prefill pool has no worker: the decode workers prefill
    their own prompts, so a decode worker's queue is prefill work, unless its batch or its
    KV cache is at its limit without the prompts (below; then the queue waits for a batch
    slot or for blocks: decode work). That work moves to the prefill view, which keeps
    ``num_workers`` 0 and holds one load per decode worker (prompts queued, their predicted
    wait, the prompt tokens arriving, whether the queue moved or not; nothing running): the
    planner sees the demand for a first prefill worker.

    The decode pool's reading is left with its batch and its KV cache, as they would be
    without the prefill: a worker that spends a share ``s`` of its time prefilling
    (``WorkerLoad.prefill_busy``, at most ``MAX_LOCAL_PREFILL_SHARE``) gives its decode steps
    ``1 - s`` of it, so each sequence lives ``1 / (1 - s)`` times longer than it would, and
    at the same arrival rate the pool holds that many times more sequences and KV (Little's
    law). Both are read scaled by ``1 - s``; unscaled, a prefill-heavy load would make the
    decode pool look full of the very work a prefill worker would take off it. With a
    prefill worker registered, or no decode report, both views are returned as they are."""
    if prefill.num_workers > 0 or not decode.loads:
        return decode, prefill
    decode_loads: list[WorkerLoad] = []
    prefill_loads: list[WorkerLoad] = []
    for load in decode.loads:
        capacity = load.batch_capacity
        kept = 1.0 - min(load.prefill_busy, MAX_LOCAL_PREFILL_SHARE)
        num_running = math.ceil(load.num_running * kept)
        kv_usage = load.kv_usage * kept
        rates = WorkerLoad(
            wait_per_token_s=load.wait_per_token_s,
            prefill_s_per_token=load.prefill_s_per_token,
            arrival_rate=load.arrival_rate,
            prefill_token_rate=load.prefill_token_rate,
        )
        without_prompts = replace(
            load, num_running=num_running, kv_usage=kv_usage, prefill_token_rate=0.0
        )
        is_full = capacity and num_running >= limits.max_batch_fraction * capacity
        if is_full or kv_usage >= limits.max_kv_usage:
            # Full even without the prompts: its queue waits for decode room. Its prompts'
            # time still counts as prefill work (they stall its streams all the same).
            decode_loads.append(without_prompts)
            prefill_loads.append(rates)
            continue
        decode_loads.append(
            replace(without_prompts, num_waiting=0, num_waiting_tokens=0, predicted_wait_s=0.0)
        )
        prefill_loads.append(
            replace(
                rates,
                num_waiting=load.num_waiting,
                num_waiting_tokens=load.num_waiting_tokens,
                predicted_wait_s=load.predicted_wait_s,
            )
        )
    return (
        replace(decode, loads=tuple(decode_loads)),
        replace(prefill, loads=tuple(prefill_loads)),
    )


@dataclass(frozen=True, slots=True)
class Demand:
    """SLA mode's reading: the work in the pool (``amount``, in ``unit``) and what one worker
    holds within the objectives (``per_worker``; 0: not measured yet); ``basis`` says what
    the amount was read from."""

    amount: float
    per_worker: float
    unit: str
    basis: str = ""


def demand(view: PoolView, ttft_s: float | None, max_wait_fraction: float) -> Demand:
    """Decode: the sequences the pool must hold, against each worker's batch capacity (the
    cap its TPOT objective and measured speed set). That is the larger of those in it now
    (running and waiting) and those the arrivals bring (Little's law: each worker's arrival
    rate times how long a request stays in a full batch, from the output lengths it has seen
    and its measured step time). The arrivals read a step in the load at once, where the
    batch fills over a request's lifetime; what is in the pool keeps a drop from reading
    as room before its requests have finished.

    Prefill: the prompt tokens to compute within a window of ``max_wait_fraction`` of the
    TTFT objective (one second without one), those queued plus those arriving meanwhile at
    the pool's measured arrival rate, against the tokens one worker clears in that window,
    from its measured wait per token. The arrivals keep a pool that keeps up from looking
    empty between bursts."""
    loads = view.loads
    if view.role is Role.DECODE:
        in_pool = float(sum(load.num_running + load.num_waiting for load in loads))
        arriving = sum(load.arrival_rate * load.sequence_lifetime_s for load in loads)
        per_worker = _mean([float(load.batch_capacity) for load in loads if load.batch_capacity])
        basis = f"{in_pool:.0f} in the pool, {arriving:.0f} by arrivals"
        return Demand(max(in_pool, arriving), per_worker, "sequences", basis)
    window_s = max_wait_fraction * ttft_s if ttft_s is not None else 1.0
    queued = sum(load.num_waiting_tokens for load in loads)
    arriving = window_s * sum(load.prefill_token_rate for load in loads)
    rates = [1.0 / load.wait_per_token_s for load in loads if load.wait_per_token_s > 0]
    basis = f"{queued} queued, {arriving:.0f} arriving in {window_s:g} s"
    return Demand(float(queued) + arriving, window_s * _mean(rates), "prompt tokens", basis)


def slope_per_s(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(time_s, value)`` samples (0 with fewer than two times)."""
    if len(samples) < 2:
        return 0.0
    mean_t = _mean([t for t, _ in samples])
    mean_v = _mean([v for _, v in samples])
    var_t = sum((t - mean_t) ** 2 for t, _ in samples)
    if var_t <= 0:
        return 0.0
    return sum((t - mean_t) * (v - mean_v) for t, v in samples) / var_t


def steady_slope_per_s(samples: list[tuple[float, float]]) -> float:
    """The slope of ``samples`` that the whole window agrees on, and that still holds at its
    end: the least-squares slopes of the older half, the newer half (the middle sample in
    both when their number is odd) and the newest three samples; the smallest of the three
    when they all have the same sign, else 0. A ramp reads the same everywhere and keeps its
    slope. A step does not: the load jumps, the readings climb for a few intervals while the
    rates and the batch behind them settle, then stay flat, so the older half reads flat
    while the climb is in the newer, and the newest samples read flat once it is over.
    Fewer than three samples have nothing to compare: 0."""
    if len(samples) < 3:
        return 0.0
    size = (len(samples) + 1) // 2
    slopes = [slope_per_s(part) for part in (samples[:size], samples[-size:], samples[-3:])]
    if all(slope > 0 for slope in slopes):
        return min(slopes)
    if all(slope < 0 for slope in slopes):
        return max(slopes)
    return 0.0
