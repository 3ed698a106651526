"""What every engine refuses before a request reaches it, with the same messages (pure)."""

from dataclasses import dataclass

from shared.engine.interface import EngineRequest
from shared.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class RequestBounds:
    """An engine's sizes, as a request is checked against them."""

    max_model_len: int
    block_size: int
    num_kv_blocks: int
    vocab_size: int


def check_request(request: EngineRequest, bounds: RequestBounds) -> None:
    """``InvalidRequest`` for a request that could never run within ``bounds``: an empty
    prompt, sampling out of range (NaN included), more tokens than the context or blocks than
    the cache, resumed tokens past ``max_tokens``, or a token id outside the vocabulary."""
    prompt = request.token_ids
    sampling = request.sampling
    num_prompt = len(prompt)
    if num_prompt == 0:
        raise InvalidRequest("prompt is empty")
    if sampling.max_tokens < 1:
        raise InvalidRequest(f"max_tokens must be >= 1, got {sampling.max_tokens}")
    if not 0 <= sampling.min_tokens <= sampling.max_tokens:
        raise InvalidRequest(
            f"min_tokens must be in [0, max_tokens={sampling.max_tokens}], "
            f"got {sampling.min_tokens}"
        )
    if not sampling.temperature >= 0:  # NaN too: it compares false with everything
        raise InvalidRequest(f"temperature must be >= 0, got {sampling.temperature}")
    if not 0 < sampling.top_p <= 1:
        raise InvalidRequest(f"top_p must be in (0, 1], got {sampling.top_p}")
    if num_prompt + sampling.max_tokens > bounds.max_model_len:
        raise InvalidRequest(
            f"prompt has {num_prompt} tokens and max_tokens is {sampling.max_tokens}; "
            f"together they exceed max_model_len {bounds.max_model_len}"
        )
    # The last sampled token never needs KV, so the most a sequence holds is this:
    num_blocks = -(-(num_prompt + sampling.max_tokens - 1) // bounds.block_size)
    if num_blocks > bounds.num_kv_blocks:
        raise InvalidRequest(
            f"prompt plus max_tokens needs {num_blocks} KV blocks; "
            f"the cache has {bounds.num_kv_blocks}"
        )
    resumed = request.resumed_token_ids
    if len(resumed) >= sampling.max_tokens:
        raise InvalidRequest(
            f"{len(resumed)} tokens to resume after; max_tokens is {sampling.max_tokens}"
        )
    for token_ids in (prompt, resumed):
        if token_ids:
            low, high = min(token_ids), max(token_ids)
            if low < 0 or high >= bounds.vocab_size:
                bad = low if low < 0 else high
                raise InvalidRequest(
                    f"token id {bad} is outside the vocabulary [0, {bounds.vocab_size})"
                )
