"""A worker's admission (pure): a new request gets a share of its TTFT budget; one that was
admitted before and moved here (a role switch, a drain, a failure) keeps its whole budget."""

import pytest

from proto.messages import GenerateRequest, PrefillRequest, RequestId
from services.worker.config import WorkerConfig
from services.worker.objectives import Objectives
from shared.engine.interface import EngineStats, StepResult
from shared.errors import Shed
from shared.slo import SLOConfig

STATS = EngineStats(num_running=0, num_waiting=0, num_free_blocks=100, num_total_blocks=100)


def objectives() -> Objectives:
    config = WorkerConfig(slo=SLOConfig(slo_ttft_ms=4000, slo_admit_fraction=0.25))
    o = Objectives(config, max_num_batched_tokens=4096)
    for num_tokens in (1000, 2000, 3000, 4000) * 4:  # 1 ms a prompt token
        result = StepResult(duration_s=num_tokens / 1000, num_prefill_tokens=num_tokens)
        o.after_step(result, STATS)
    return o


@pytest.mark.parametrize("kind", [GenerateRequest, PrefillRequest])
def test_a_moved_request_keeps_its_whole_budget_where_a_new_one_gets_a_share(kind):
    o = objectives()
    fields = {"request_id": RequestId("r"), "token_ids": [1] * 1500, "ttft_budget_s": 2.0}
    if kind is GenerateRequest:
        fields["model"] = "m"
    # About 1.5 s to a first token: over a quarter of the 2 s left, within all of it.
    with pytest.raises(Shed, match="over 25% of the 2000 ms"):
        o.admit(kind(**fields), STATS, 0, now_s=10.0, prefills_here=True)
    admission = o.admit(kind(**fields, admitted=True), STATS, 0, now_s=10.0, prefills_here=True)
    assert admission.deadline_s == pytest.approx(12.0)
    # Past the whole budget it is shed all the same: it would miss its objective anyway.
    late = kind(**{**fields, "ttft_budget_s": 1.0}, admitted=True)
    with pytest.raises(Shed, match="over 100% of the 1000 ms"):
        o.admit(late, STATS, 0, now_s=10.0, prefills_here=True)
    assert o.num_shed_at_admission == 2
