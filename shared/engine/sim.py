"""The simulated engine: real scheduling and KV-block accounting, modelled time, fake tokens.

It runs thousands of streams on a CPU with the batching, preemption, prefix caching and KV
events of a real engine, so services and the router can be tested without a GPU (as Dynamo's
mocker does). Tokens are a pure function of the request, never of timing or batch makeup:

- greedy (``temperature < 1e-5``, as vLLM): the engine seed, the prompt and the position;
- seeded (``sampling.seed`` set): the same plus that seed;
- otherwise: the same plus the request id.

Each request also draws a natural length from a geometric distribution with mean
``mean_output_tokens`` (from the same key) and emits EOS as that token, but not before
``min_tokens`` and never under ``ignore_eos``. All mixing is splitmix64 and BLAKE2b on ints and
bytes, so two processes and two runs agree (``hash()`` of a str is salted per process).
"""

import hashlib
import logging
import math
from array import array
from dataclasses import dataclass, field

from proto.messages import KVEvent, RequestId, SamplingParams
from shared.engine.interface import EngineRequest, EngineStats, RequestOutput, StepResult
from shared.engine.scheduler import Scheduler, SchedulerConfig
from shared.engine.sequence import Sequence
from shared.engine.timing import TimingModel
from shared.errors import InvalidRequest

logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_GAMMA = 0x9E3779B97F4A7C15
_SEED_TAG = 0x5EED5EED5EED5EED
_LENGTH_TAG = 0x1E6971E6971E6971
_GREEDY_EPS = 1e-5
_MAX_REDRAWS = 16


def splitmix64(x: int) -> int:
    """SplitMix64's output function on ``x + gamma``: a fast, well-mixed, portable 64-bit hash
    of an int. ``splitmix64(key + i * gamma)`` is the i-th value of the stream seeded by key."""
    z = (x + _GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _digest64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


@dataclass(frozen=True, slots=True, kw_only=True)
class SimEngineConfig:
    """Shape of the simulated model and its cache.

    ``output_token_ids`` lists the tokens the engine may emit (say, whole words of the
    tokenizer, so text reads as words); None means any id below ``vocab_size``. EOS is emitted
    only at a request's natural end. ``mean_output_tokens`` None turns natural ends off.
    """

    num_kv_blocks: int = 8192
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    vocab_size: int = 32000
    output_token_ids: tuple[int, ...] | None = None
    eos_token_id: int | None = 2
    mean_output_tokens: float | None = 128.0
    seed: int = 0
    timing: TimingModel = field(default_factory=TimingModel)

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.eos_token_id is not None and not 0 <= self.eos_token_id < self.vocab_size:
            raise ValueError(f"eos_token_id {self.eos_token_id} is outside [0, {self.vocab_size})")
        if self.mean_output_tokens is not None and not self.mean_output_tokens >= 1:
            raise ValueError(f"mean_output_tokens must be >= 1, got {self.mean_output_tokens}")
        if self.output_token_ids is not None:
            ids = tuple(self.output_token_ids)  # accept any sequence; store a tuple
            object.__setattr__(self, "output_token_ids", ids)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"output_token_ids must lie in [0, {self.vocab_size})")
            if not any(t != self.eos_token_id for t in ids):
                raise ValueError("output_token_ids must hold a token other than eos_token_id")
        elif self.vocab_size == 1 and self.eos_token_id == 0:
            raise ValueError("the vocabulary must hold a token other than eos_token_id")
        _ = self.scheduler_config  # raises ValueError for bad scheduler fields now

    @property
    def scheduler_config(self) -> SchedulerConfig:
        """The scheduler's share of this config."""
        return SchedulerConfig(
            num_kv_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            eos_token_id=self.eos_token_id,
        )


class _TokenStream:
    """A request's deterministic token source: ``key`` seeds the stream, EOS comes at output
    index ``eos_index`` (-1: never), and ``stop_token_ids`` are redrawn before ``min_tokens``."""

    __slots__ = ("eos_index", "key", "min_tokens", "stop_token_ids")

    def __init__(self, key: int, eos_index: int, sampling: SamplingParams) -> None:
        self.key = key
        self.eos_index = eos_index
        self.min_tokens = sampling.min_tokens if sampling.stop_token_ids else 0
        self.stop_token_ids = frozenset(sampling.stop_token_ids)


class SimEngine:
    """An ``Engine`` whose steps cost modelled time instead of GPU time (see the module doc)."""

    def __init__(self, config: SimEngineConfig) -> None:
        self.config = config
        self.scheduler = Scheduler(config.scheduler_config)
        eos = config.eos_token_id
        candidates = config.output_token_ids or range(config.vocab_size)
        self._allowed_token_ids: tuple[int, ...] = tuple(t for t in candidates if t != eos)
        self._seed_key = splitmix64(config.seed & _MASK64)
        self._streams: dict[RequestId, _TokenStream] = {}

    @property
    def block_size(self) -> int:
        """Tokens per KV block (the router hashes prompts with the same size)."""
        return self.config.block_size

    @property
    def max_model_len(self) -> int:
        """Most tokens (prompt plus output) one request may reach."""
        return self.config.max_model_len

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; raises ``InvalidRequest`` if it could never run here."""
        self._validate(request)
        seq = Sequence(
            request.request_id, request.token_ids, request.sampling, request.arrival_time_s
        )
        self._streams[request.request_id] = self._make_stream(request)
        self.scheduler.add(seq)

    def abort(self, request_id: RequestId) -> bool:
        """Drop a request and free its blocks now; False if it is unknown or already finished."""
        self._streams.pop(request_id, None)
        return self.scheduler.abort(request_id) is not None

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return self.scheduler.has_unfinished()

    def step(self) -> StepResult:
        """Schedule a batch, sample one token per scheduled sequence, and model the step time
        from its prefill tokens, decode batch size and KV usage during the step."""
        scheduler = self.scheduler
        plan = scheduler.schedule()
        if plan.is_empty:
            return StepResult()
        kv_usage = scheduler.block_manager.usage
        streams = self._streams
        sample = self._sample
        token_ids = [sample(seq, streams[seq.request_id]) for seq in plan.seqs]
        finished = scheduler.postprocess(plan, token_ids)
        outputs = [
            RequestOutput(
                seq.request_id,
                [token_id],
                seq.finish_reason,
                seq.num_prompt_tokens,
                seq.num_cached_tokens,
            )
            for seq, token_id in zip(plan.seqs, token_ids, strict=True)
        ]
        for seq in finished:
            del streams[seq.request_id]
        step_ms = self.config.timing.step_ms(
            plan.num_new_tokens[: plan.num_prefill_seqs], plan.num_decode_seqs, kv_usage
        )
        return StepResult(
            outputs=outputs,
            duration_s=step_ms / 1000.0,
            num_prefill_tokens=plan.num_prefill_tokens,
            num_decode_tokens=plan.num_decode_seqs,
        )

    def stats(self) -> EngineStats:
        """Queue lengths and free blocks now (evictable cached blocks count as free)."""
        bm = self.scheduler.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=bm.num_free_blocks,
            num_total_blocks=bm.num_blocks,
        )

    def take_kv_events(self) -> list[KVEvent]:
        """The block manager's KV events since the last call, oldest first."""
        return self.scheduler.block_manager.take_events()

    # --- tokens --------------------------------------------------------------------------------

    def _sample(self, seq: Sequence, stream: _TokenStream) -> int:
        index = len(seq.token_ids) - seq.num_prompt_tokens
        if index == stream.eos_index:
            assert self.config.eos_token_id is not None, "eos_index is set only with an EOS"
            return self.config.eos_token_id
        allowed = self._allowed_token_ids
        x = splitmix64(stream.key + index * _GAMMA)
        token_id = allowed[x % len(allowed)]
        if index < stream.min_tokens:  # a stop token may not end the output yet: draw again
            for _ in range(_MAX_REDRAWS):
                if token_id not in stream.stop_token_ids:
                    break
                x = splitmix64(x)
                token_id = allowed[x % len(allowed)]
        return token_id

    def _make_stream(self, request: EngineRequest) -> _TokenStream:
        sampling = request.sampling
        key = splitmix64(_digest64(array("q", request.token_ids).tobytes()) ^ self._seed_key)
        if sampling.temperature >= _GREEDY_EPS:
            if sampling.seed is not None:
                key = splitmix64(key ^ splitmix64((sampling.seed & _MASK64) ^ _SEED_TAG))
            else:
                key = splitmix64(key ^ _digest64(request.request_id.encode()))
        return _TokenStream(key, self._eos_index(key, sampling), sampling)

    def _eos_index(self, key: int, sampling: SamplingParams) -> int:
        mean = self.config.mean_output_tokens
        if self.config.eos_token_id is None or mean is None or sampling.ignore_eos:
            return -1
        natural_len = 1
        if mean > 1:
            u = (splitmix64(key ^ _LENGTH_TAG) >> 11) * 2.0**-53  # uniform in [0, 1)
            natural_len = 1 + int(math.log1p(-u) / math.log1p(-1.0 / mean))
        return max(natural_len, sampling.min_tokens) - 1

    def _validate(self, request: EngineRequest) -> None:
        config = self.config
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
        if sampling.temperature < 0:
            raise InvalidRequest(f"temperature must be >= 0, got {sampling.temperature}")
        if num_prompt + sampling.max_tokens > config.max_model_len:
            raise InvalidRequest(
                f"prompt has {num_prompt} tokens and max_tokens is {sampling.max_tokens}; "
                f"together they exceed max_model_len {config.max_model_len}"
            )
        # The last sampled token never needs KV, so the most a sequence holds is this:
        num_blocks = -(-(num_prompt + sampling.max_tokens - 1) // config.block_size)
        if num_blocks > config.num_kv_blocks:
            raise InvalidRequest(
                f"prompt plus max_tokens needs {num_blocks} KV blocks; "
                f"the cache has {config.num_kv_blocks}"
            )
        low, high = min(prompt), max(prompt)
        if low < 0 or high >= config.vocab_size:
            bad = low if low < 0 else high
            raise InvalidRequest(
                f"token id {bad} is outside the vocabulary [0, {config.vocab_size})"
            )
        if self.scheduler.get(request.request_id) is not None:
            raise InvalidRequest(f"request {request.request_id} is already running here")
