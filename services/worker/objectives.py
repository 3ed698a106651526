"""A worker's objectives: its measured speed, the batch limits that keep the time-per-output-
token objective, and admission by predicted time to first token.

After every step the shell feeds the step's size and duration to a ``SpeedModel`` and sets
the engine's ``StepBudget`` from the fit. A new request with a time-to-first-token budget is
admitted only if the prompt tokens queued ahead of it plus its own, prefilled at the rate the
budget allows, would reach its first token within ``slo_admit_fraction`` of the time left
(admitting up to the deadline itself would let the queue grow until every first token comes
just in time, and the prediction's error then makes half of them late); otherwise it is
refused at once with ``Shed`` (429) and a ``Retry-After`` of when the queue should have
drained enough. Admitted
work is never dropped to make room: what waits past its deadline anyway is shed by the engine
(``FinishReason.SHED``) before it starts, never streamed late.
"""

from dataclasses import dataclass

from proto.messages import GenerateRequest, PrefillRequest
from shared.engine.config import WorkerConfig
from shared.engine.interface import EngineStats, StepResult
from shared.engine.speed import SpeedModel, StepBudget, predict_ttft_s, step_budget
from shared.errors import Shed


@dataclass(frozen=True, slots=True)
class Admission:
    """What admission settled for one request: its deadline on the engine clock (None: no
    time-to-first-token objective) and its priority (lower is served first)."""

    deadline_s: float | None = None
    priority: int = 0


class Objectives:
    """Speed, limits and admission for one worker (pure: the caller passes stats and time)."""

    def __init__(self, config: WorkerConfig, *, max_num_batched_tokens: int) -> None:
        self.ttft_s = config.slo.ttft_s
        self.tpot_s = config.slo.tpot_s
        self.admit_fraction = config.slo.slo_admit_fraction
        self.max_num_batched_tokens = max_num_batched_tokens
        self.speed_model = SpeedModel()
        self.budget = StepBudget()
        self.num_shed_at_admission = 0

    def after_step(self, result: StepResult, stats: EngineStats) -> StepBudget:
        """Learn from a step; the limits for the next ones."""
        self.speed_model.observe(
            result.duration_s, result.num_decode_tokens, result.num_prefill_tokens
        )
        self.budget = step_budget(
            self.speed_model.speed, tpot_s=self.tpot_s, num_running=stats.num_running
        )
        return self.budget

    def predicted_wait_s(self, stats: EngineStats, num_tokens_ahead: int, own: int = 0) -> float:
        """Time until a request behind ``num_tokens_ahead`` queued tokens, of ``own`` tokens,
        gets its first token here."""
        speed = self.speed_model.speed
        if not speed.is_known:
            return 0.0
        per_step = self.budget.max_prefill_tokens
        if per_step is None or per_step <= 0:
            per_step = self.max_num_batched_tokens
        return predict_ttft_s(
            speed,
            num_running=stats.num_running,
            num_tokens_ahead=num_tokens_ahead,
            num_own_tokens=own,
            max_prefill_tokens=per_step,
        )

    def wait_per_token_s(self, stats: EngineStats) -> float:
        """How much a queued prompt token adds to the wait of those behind it: its prefill,
        plus its share of the steps it takes (a frontend sheds early by this)."""
        speed = self.speed_model.speed
        per_step = self.budget.max_prefill_tokens
        if per_step is None or per_step <= 0:
            per_step = self.max_num_batched_tokens
        overhead = speed.base_s + speed.per_seq_s * stats.num_running + speed.prefill_base_s
        return speed.per_token_s + overhead / per_step

    def admit(
        self,
        request: GenerateRequest | PrefillRequest,
        stats: EngineStats,
        num_tokens_ahead: int,
        now_s: float,
        *,
        prefills_here: bool,
    ) -> Admission:
        """Admit or raise ``Shed``. ``prefills_here`` False (the KV comes from a prefill
        worker) skips the prediction: that worker checks its own queue."""
        budget_s = request.ttft_budget_s if request.ttft_budget_s is not None else self.ttft_s
        if budget_s is None:
            return Admission(priority=request.priority)
        if prefills_here:
            own = len(request.token_ids)
            predicted = self.predicted_wait_s(stats, num_tokens_ahead, own)
            # A request admitted before (it moved here) has only its deadline to keep.
            fraction = 1.0 if request.admitted else self.admit_fraction
            allowed_s = fraction * budget_s
            if predicted > allowed_s:
                self.num_shed_at_admission += 1
                raise Shed(
                    f"predicted time to first token {predicted * 1000:.0f} ms is over "
                    f"{fraction:.0%} of the {budget_s * 1000:.0f} ms the objective "
                    "leaves",
                    retry_after_s=max(1.0, predicted - allowed_s),
                )
        return Admission(deadline_s=now_s + budget_s, priority=request.priority)
