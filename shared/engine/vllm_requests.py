"""How Baton's requests become vLLM's, for ``VllmEngine``: validation (``ScheduledEngine``'s
rules and messages), sampling parameters, and the first token of a disaggregated request.
vLLM's outputs become Baton's in ``shared.engine.vllm_outputs``."""

from dataclasses import dataclass
from typing import Any

from vllm import SamplingParams as VllmSamplingParams
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

from proto.messages import FinishReason, SamplingParams
from shared.engine.interface import EngineRequest
from shared.engine.scheduler import finish_reason
from shared.engine.validation import RequestBounds, check_request
from shared.engine.vllm_connector import MODE_FIELD


@dataclass(frozen=True, slots=True, kw_only=True)
class VllmShape:
    """The sizes the adapter validates and reports in (Baton's blocks, not vLLM's)."""

    block_size: int
    max_model_len: int
    num_kv_blocks: int  # in Baton blocks
    vocab_size: int
    eos_token_id: int | None
    vllm_block_size: int = 0  # tokens per vLLM block (Reservation and held blocks count these)
    num_vllm_blocks: int = 0  # vLLM's KV tensors' block count (its null block included)


def validate(shape: VllmShape, request: EngineRequest) -> None:
    """``InvalidRequest`` for what ``ScheduledEngine`` refuses, with the same messages."""
    bounds = RequestBounds(
        shape.max_model_len, shape.block_size, shape.num_kv_blocks, shape.vocab_size
    )
    check_request(request, bounds)


def sampling_params(
    shape: VllmShape, sampling: SamplingParams, num_resumed: int, mode: str | None
) -> Any:
    """vLLM's sampling parameters for Baton's, past ``num_resumed`` output tokens; ``mode``
    marks the request for the KV connector (hold or reserve)."""
    stop_token_ids = list(sampling.stop_token_ids)
    eos = shape.eos_token_id
    if eos is not None and not sampling.ignore_eos and eos not in stop_token_ids:
        stop_token_ids.append(eos)
    return VllmSamplingParams(
        # A reserved request whose first token is its last still needs one (commit ends it).
        max_tokens=max(1, sampling.max_tokens - num_resumed),
        min_tokens=max(0, sampling.min_tokens - num_resumed),
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        seed=sampling.seed,
        ignore_eos=sampling.ignore_eos,
        stop_token_ids=stop_token_ids,
        presence_penalty=sampling.presence_penalty,
        frequency_penalty=sampling.frequency_penalty,
        repetition_penalty=sampling.repetition_penalty,
        logit_bias=dict(sampling.logit_bias) or None,
        logprobs=sampling.logprobs,
        structured_outputs=(
            None
            if sampling.json_schema is None
            else StructuredOutputsParams(json=sampling.json_schema)
        ),
        detokenize=False,
        skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA,
        extra_args=None if mode is None else {"kv_transfer_params": {MODE_FIELD: mode}},
    )


def first_token_ends(
    shape: VllmShape, sampling: SamplingParams, token_id: int, num_prompt: int
) -> FinishReason | None:
    """Baton's rule (``shared.engine.scheduler.finish_reason``) for the first token of a
    committed request."""
    return finish_reason(
        sampling,
        token_id,
        num_output=1,
        num_tokens=num_prompt + 1,
        eos_token_id=shape.eos_token_id,
        max_model_len=shape.max_model_len,
    )


def write_first_token(request: Any, token_id: int, block_size: int) -> None:
    """Put the first token in place of a reserved vLLM request's placeholder (its last prompt
    token), before vLLM ever schedules it, and rehash the block that holds it."""
    request.prompt_token_ids[-1] = token_id
    request._all_token_ids[-1] = token_id
    del request.block_hashes[(request.num_tokens - 1) // block_size :]
    request.update_block_hashes()
