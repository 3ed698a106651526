"""The sampler's logit bias, penalties and log-probabilities, on hand-made logits."""

import math

import pytest

torch = pytest.importorskip("torch")

from proto.messages import RequestId, SamplingParams  # noqa: E402
from shared.engine.sampler import Sampler  # noqa: E402
from shared.engine.sequence import Sequence  # noqa: E402

VOCAB = 8


def seq(prompt, output=(), **sampling) -> Sequence:
    s = Sequence(RequestId("r"), list(prompt), SamplingParams(temperature=0.0, **sampling))
    s.token_ids.extend(output)
    return s


def logits(*values):
    return torch.tensor([list(values)], dtype=torch.float32)


def sample(row, s):
    tokens, reports = Sampler(VOCAB, eos_token_id=None, device=torch.device("cpu")).sample(
        row.clone(), [s]
    )
    return tokens[0], (reports[0] if reports else None)


BASE = (4.0, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0)


def test_plain_greedy_has_no_reports():
    assert sample(logits(*BASE), seq([5])) == (0, None)


def test_logit_bias_moves_the_choice():
    assert sample(logits(*BASE), seq([5], logit_bias={0: -100.0}))[0] == 1
    assert sample(logits(*BASE), seq([5], logit_bias={7: 8.0}))[0] == 7


def test_repetition_penalty_follows_hf_rule_over_prompt_and_output():
    # Token 0 (logit 4) was seen: 4 / 3 < 3, so token 1 wins; a negative seen logit gets
    # multiplied (more negative), never raised.
    assert sample(logits(*BASE), seq([0], repetition_penalty=3.0))[0] == 1
    assert sample(logits(*BASE), seq([5], output=[0], repetition_penalty=3.0))[0] == 1
    low = logits(-1.0, -1.5, -9, -9, -9, -9, -9, -9)
    assert sample(low, seq([0], repetition_penalty=2.0))[0] == 1  # -2 < -1.5


def test_frequency_and_presence_penalties_count_output_tokens_only():
    prompt_only = seq([0, 0, 0], frequency_penalty=2.0, presence_penalty=2.0)
    assert sample(logits(*BASE), prompt_only)[0] == 0  # the prompt is not penalised
    # Token 0 appeared twice in the output: 4 - 2 * 0.6 = 2.8 < 3.
    assert sample(logits(*BASE), seq([5], output=[0, 0], frequency_penalty=0.6))[0] == 1
    assert sample(logits(*BASE), seq([5], output=[0, 0], frequency_penalty=0.4))[0] == 0
    # Presence counts once however often: 4 - 1.5 < 3.
    assert sample(logits(*BASE), seq([5], output=[0], presence_penalty=1.5))[0] == 1
    # Negative penalties encourage repeats.
    assert sample(logits(*BASE), seq([5], output=[3], presence_penalty=-3.5))[0] == 3


def test_logprobs_are_of_the_raw_distribution_with_top_alternatives():
    row = logits(*BASE)
    expected = torch.log_softmax(row[0], dim=-1)
    token, report = sample(row, seq([5], logprobs=3, logit_bias={0: -100.0}))
    assert token == 1  # the bias changed the choice ...
    assert math.isclose(report.logprob, float(expected[1]), rel_tol=1e-6)  # ... not the report
    assert [t for t, _ in report.top] == [0, 1, 2]
    assert [lp for _, lp in report.top] == pytest.approx(expected[:3].tolist())
    _, only_chosen = sample(row, seq([5], logprobs=0))
    assert only_chosen.top == []
    assert math.isclose(only_chosen.logprob, float(expected[0]))


def test_reports_align_with_a_mixed_batch():
    rows = torch.tensor([BASE, tuple(reversed(BASE))], dtype=torch.float32)
    asks = seq([5], logprobs=1)
    plain = seq([5])
    sampler = Sampler(VOCAB, eos_token_id=None, device=torch.device("cpu"))
    tokens, reports = sampler.sample(rows.clone(), [plain, asks])
    assert tokens == [0, 7]
    assert reports is not None
    assert reports[0] is None
    second = reports[1]
    assert second is not None
    assert second.top[0][0] == 7
