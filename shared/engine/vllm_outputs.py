"""How vLLM's request outputs become Baton's, for ``VllmEngine``: what the adapter tracks of
each request vLLM holds, and one step's ``DELTA`` outputs turned into ``RequestOutput``s
(new tokens, Baton's finish reasons, cached prompt tokens, log-probabilities), with the
prompt tokens the step prefilled and the tokens it decoded."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from proto.messages import FinishReason, RequestId, TokenLogprobs
from shared.engine.interface import RequestOutput

_FINISH_REASONS: Final = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "abort": FinishReason.ABORT,
    "error": FinishReason.ERROR,
}

# A held request just finished: (Baton's id, vLLM's id) -> the blocks vLLM keeps for it.
HoldBlocks = Callable[[RequestId, str], list[int] | None]


@dataclass(slots=True)
class LiveRequest:
    """What the adapter tracks of one request vLLM holds."""

    num_prompt_tokens: int
    priority: int
    deadline_s: float | None
    num_resumed: int
    num_top_logprobs: int | None  # None: no log-probabilities asked for
    num_output_tokens: int = 0
    vllm_id: str = ""  # vLLM's id for it (what its scheduler and the connector see)
    is_held: bool = False  # added with hold_kv: its blocks outlive it
    # A committed request's prefix cache hit at reserve (vLLM would count the pulled tokens).
    num_reserved_cached_tokens: int | None = None


@dataclass(slots=True)
class StepOutputs:
    """One vLLM step's outputs in Baton's terms."""

    outputs: list[RequestOutput]
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0


def step_outputs(
    raw: list[Any], live_requests: dict[RequestId, LiveRequest], hold: HoldBlocks
) -> StepOutputs:
    """Baton's outputs for vLLM's ``raw`` ones, in order. Outputs of requests no longer in
    ``live_requests`` are skipped; a finished request leaves it (``hold`` keeps a held
    one's blocks)."""
    result = StepOutputs([])
    for out in raw:
        live = live_requests.get(out.request_id)
        if live is None:  # aborted by us since: already forgotten
            continue
        completion = out.outputs[0]
        new_token_ids = list(completion.token_ids)
        num_cached = out.num_cached_tokens or 0
        if live.num_reserved_cached_tokens is not None:  # its prompt KV was pulled
            num_cached = live.num_reserved_cached_tokens
            result.num_decode_tokens += 1
        elif live.num_output_tokens == live.num_resumed:
            result.num_prefill_tokens += live.num_prompt_tokens + live.num_resumed - num_cached
        else:
            result.num_decode_tokens += 1
        live.num_output_tokens += len(new_token_ids)
        reason = None
        held_block_ids = None
        if out.finished:
            reason = _FINISH_REASONS.get(completion.finish_reason or "", FinishReason.STOP)
            del live_requests[out.request_id]
            if live.is_held:
                held_block_ids = hold(RequestId(out.request_id), live.vllm_id)
        result.outputs.append(
            RequestOutput(
                RequestId(out.request_id),
                new_token_ids,
                reason,
                live.num_prompt_tokens,
                num_cached,
                held_block_ids,
                live.num_output_tokens,
                logprobs(completion, new_token_ids, live.num_top_logprobs),
            )
        )
    return result


def logprobs(
    completion: Any, token_ids: list[int], num_top: int | None
) -> list[TokenLogprobs] | None:
    """Baton's report per new token from vLLM's (a dict per position of token id to
    ``Logprob``: the chosen token and the ``num_top`` likeliest, each with its rank)."""
    if num_top is None or completion.logprobs is None:
        return None
    reports: list[TokenLogprobs] = []
    for token_id, position in zip(token_ids, completion.logprobs, strict=True):
        ranked = sorted(position.items(), key=lambda item: item[1].rank)
        top = [(tid, float(lp.logprob)) for tid, lp in ranked if lp.rank <= num_top][:num_top]
        reports.append(TokenLogprobs(float(position[token_id].logprob), top))
    return reports
