"""How fast this engine really is: step time learned from its own steps (pure, no clock).

A worker must know its speed to keep a time-per-output-token objective and to predict a new
request's time to first token. Reading a simulator's timing model would not carry over to a
GPU engine, so ``SpeedModel`` learns from what every engine reports after each step: how long
it took, how many sequences it decoded, how many prompt tokens it prefilled. It fits

    step_s ≈ base_s + per_seq_s * num_decode_seqs + per_token_s * num_prefill_tokens
             + prefill_base_s * (num_prefill_tokens > 0)

by exponentially weighted least squares (recent steps count more, so the model follows a
change of load or of KV usage within seconds), with a small ridge toward zero so that a
window of identical steps still gives an answer. ``StepBudget`` turns the fit and the
objectives into the scheduler's limits, and ``predict_ttft_s`` into an admission estimate.
"""

import math
from dataclasses import dataclass

_NUM_FEATURES = 4


@dataclass(frozen=True, slots=True)
class StepSpeed:
    """A fitted step-time model (seconds); all zero until enough steps were seen."""

    base_s: float = 0.0
    per_seq_s: float = 0.0
    per_token_s: float = 0.0
    prefill_base_s: float = 0.0

    @property
    def is_known(self) -> bool:
        return self.base_s > 0.0 or self.per_seq_s > 0.0 or self.per_token_s > 0.0

    def step_s(self, num_decode_seqs: int, num_prefill_tokens: int) -> float:
        """Predicted time of one step."""
        t = self.base_s + self.per_seq_s * num_decode_seqs + self.per_token_s * num_prefill_tokens
        if num_prefill_tokens > 0:
            t += self.prefill_base_s
        return max(0.0, t)


class SpeedModel:
    """Exponentially weighted least squares over steps; ``speed`` is refitted lazily, at most
    once per ``refit_steps`` steps. A fit is a small linear solve, about as costly as a fast
    step's own bookkeeping, while the weights move by a few percent over that many steps
    (their half-life is ``half_life_steps``): refitting after every step bought nothing."""

    def __init__(
        self, *, half_life_steps: float = 200.0, min_steps: int = 8, refit_steps: int = 8
    ) -> None:
        if refit_steps < 1:
            raise ValueError(f"refit_steps must be >= 1, got {refit_steps}")
        self._decay = 0.5 ** (1.0 / half_life_steps)
        self._min_steps = min_steps
        self._refit_steps = refit_steps
        self._fitted_at = 0  # num_steps at the last fit (0: none yet)
        self._xtx = [[0.0] * _NUM_FEATURES for _ in range(_NUM_FEATURES)]
        self._xty = [0.0] * _NUM_FEATURES
        self._weight = 0.0
        self.num_steps = 0
        self._speed = StepSpeed()
        self._is_stale = False

    def observe(self, duration_s: float, num_decode_seqs: int, num_prefill_tokens: int) -> None:
        """Record one step that did some work."""
        if num_decode_seqs <= 0 and num_prefill_tokens <= 0:
            return
        if not math.isfinite(duration_s) or duration_s < 0:
            return
        x = (1.0, float(num_decode_seqs), float(num_prefill_tokens), float(num_prefill_tokens > 0))
        decay = self._decay
        xtx, xty = self._xtx, self._xty
        for i in range(_NUM_FEATURES):
            xi = x[i]
            row = xtx[i]
            for j in range(_NUM_FEATURES):
                row[j] = row[j] * decay + xi * x[j]
            xty[i] = xty[i] * decay + xi * duration_s
        self._weight = self._weight * decay + 1.0
        self.num_steps += 1
        self._is_stale = True

    @property
    def speed(self) -> StepSpeed:
        num_steps = self.num_steps
        if (
            self._is_stale
            and num_steps >= self._min_steps
            and (not self._fitted_at or num_steps - self._fitted_at >= self._refit_steps)
        ):
            self._speed = self._fit()
            self._is_stale = False
            self._fitted_at = num_steps
        return self._speed

    def _fit(self) -> StepSpeed:
        n = _NUM_FEATURES
        # Ridge on every coefficient but the intercept, scaled to the data so that it only
        # settles what the steps seen cannot tell apart.
        a = [[*row, self._xty[i]] for i, row in enumerate(self._xtx)]
        for i in range(1, n):
            a[i][i] += 1e-6 * (a[i][i] + 1.0)
        a[0][0] += 1e-9
        coef = _solve(a)
        if coef is None:
            return self._speed
        # Time never shrinks with more work: a negative slope is noise, fold it into the rest.
        base, per_seq, per_token, prefill_base = (max(0.0, c) for c in coef)
        return StepSpeed(base, per_seq, per_token, prefill_base)


def _solve(a: list[list[float]]) -> list[float] | None:
    """Gauss-Jordan with partial pivoting on an augmented n x (n+1) matrix."""
    n = len(a)
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(a[r][col]))
        if abs(a[pivot][col]) < 1e-18:
            return None
        a[col], a[pivot] = a[pivot], a[col]
        inv = 1.0 / a[col][col]
        a[col] = [v * inv for v in a[col]]
        for r in range(n):
            if r != col and a[r][col] != 0.0:
                factor = a[r][col]
                a[r] = [vr - factor * vc for vr, vc in zip(a[r], a[col], strict=True)]
    return [a[r][n] for r in range(n)]


@dataclass(frozen=True, slots=True)
class StepBudget:
    """The scheduler's limits for the next step: at most ``max_num_running`` sequences in the
    batch and ``max_prefill_tokens`` prompt tokens prefilled (one prompt is always allowed
    when nothing else runs, so the engine never stalls). None: no limit."""

    max_num_running: int | None = None
    max_prefill_tokens: int | None = None


def step_budget(
    speed: StepSpeed, *, tpot_s: float | None, num_running: int, headroom: float = 0.8
) -> StepBudget:
    """Limits that keep each step within ``headroom * tpot_s``: every running sequence gains
    one token per step, so the step time is its time per output token."""
    if tpot_s is None or not speed.is_known:
        return StepBudget()
    target = headroom * tpot_s
    room = target - speed.base_s
    max_running = max(1, int(room / speed.per_seq_s)) if speed.per_seq_s > 0 else None
    left = target - speed.step_s(num_running, 0) - speed.prefill_base_s
    max_tokens = max(0, int(left / speed.per_token_s)) if speed.per_token_s > 0 else None
    return StepBudget(max_running, max_tokens)


def predict_ttft_s(
    speed: StepSpeed,
    *,
    num_running: int,
    num_tokens_ahead: int,
    num_own_tokens: int,
    max_prefill_tokens: int,
) -> float:
    """Time until a new request's first token: the prompt tokens queued ahead of it and its
    own are prefilled at most ``max_prefill_tokens`` a step, each step also decoding the
    running batch."""
    total = num_tokens_ahead + num_own_tokens
    if total <= 0:
        return speed.step_s(num_running, 0)
    per_step = max(1, max_prefill_tokens)
    num_steps = -(-total // per_step)
    step_overhead = speed.base_s + speed.per_seq_s * num_running + speed.prefill_base_s
    return num_steps * step_overhead + speed.per_token_s * total
