"""The simulated engine: real scheduling and KV-block accounting, modelled time, fake tokens.

``SimEngine`` is a ``ScheduledEngine`` over ``SimRunner``. It runs thousands of streams on a CPU
with the batching, preemption, prefix caching and KV events of a real engine, so services and
the router can be tested without a GPU (as Dynamo's mocker does). Tokens are a pure function of
the request, never of timing or batch makeup:

- greedy (``temperature < 1e-5``, as vLLM): the engine seed, the prompt and the position;
- seeded (``sampling.seed`` set): the same plus that seed;
- otherwise: the same plus the request id.

Each request also draws a natural length from a geometric distribution with mean
``mean_output_tokens`` (from the same key) and emits EOS as that token, but not before
``min_tokens`` and never under ``ignore_eos``. All mixing is splitmix64 and BLAKE2b on ints and
bytes, so two processes and two runs agree (``hash()`` of a str is salted per process).

The runner also keeps a small real KV cache (``kv_block_bytes`` per block, block-major) and
writes each block it computes with bytes derived from the block's tokens and its prefix
(``block_kv_bytes``), so a disaggregated cluster moves real bytes between workers and a test can
check what arrived. A prefill writes its blocks in its step; decodes write a block once it is
full, and the part-filled last block when a peer is about to read it (``sync_kv``), so the
per-token cost is not a hash per token. The time a real transfer of those blocks would take
is modelled by the transfer layer, not here: ``SimEngine.transfer_time_s`` is the function a
worker hands to ``shared.kv_transfer.simulated.SimulatedTimeAgent``, which pads each read to it.
"""

import ctypes
import hashlib
import logging
import math
from array import array
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

from proto.messages import BlockHash, RequestId, SamplingParams
from shared.engine.engine import ScheduledEngine
from shared.engine.runner import KVRegion, RunResult
from shared.engine.scheduler import BatchPlan, SchedulerConfig
from shared.engine.sequence import Sequence
from shared.engine.timing import TimingModel
from shared.kv_hash import hash_block_tokens

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


def block_kv_bytes(parent_hash: BlockHash | None, token_ids: SequenceABC[int], size: int) -> bytes:
    """The simulated KV of one block: BLAKE2b-512 of its parent block's chained hash (as in
    ``hash_block_tokens``; None for the first block) and the tokens it holds so far, repeated to
    ``size`` bytes. Like real KV it depends on the whole prefix, so equal bytes in two engines
    mean the same tokens at the same place."""
    data = array("q", token_ids).tobytes()
    if parent_hash is not None:
        data = parent_hash.to_bytes(8, "little") + data
    digest = hashlib.blake2b(data, digest_size=64).digest()
    return digest if size == 64 else (digest * -(-size // 64))[:size]


@dataclass(frozen=True, slots=True, kw_only=True)
class SimEngineConfig:
    """Shape of the simulated model and its cache.

    ``output_token_ids`` lists the tokens the engine may emit (say, whole words of the
    tokenizer, so text reads as words); None means any id below ``vocab_size``. EOS is emitted
    only at a request's natural end. ``mean_output_tokens`` None turns natural ends off.

    ``kv_block_bytes`` is the size of a block in the runner's real, small KV buffer (0: no
    buffer, no ``kv_region``). ``kv_bytes_per_block_modelled`` is what a block of the modelled
    model would hold, which sets the modelled transfer time; the default is 16 tokens x 28
    layers x 2 (K and V) x 2 KV heads x 128 dims x 2 bytes (bf16).
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
    kv_block_bytes: int = 64
    kv_bytes_per_block_modelled: int = 16 * 28 * 2 * 2 * 128 * 2

    def __post_init__(self) -> None:
        for name in ("kv_block_bytes", "kv_bytes_per_block_modelled"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
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


class SimRunner:
    """A ``Runner`` that samples deterministic tokens (see the module doc), models each step's
    time with ``config.timing`` and writes ``block_kv_bytes`` into its KV buffer.

    ``kv_buffer``, if given, is the KV memory (at least ``num_kv_blocks * kv_block_bytes``
    writable, contiguous bytes, say a shared-memory segment a transfer agent registered); by
    default the runner allocates its own. Its address stays fixed while the runner lives, which
    also keeps the buffer exported (a ``SharedMemory`` cannot close before the runner goes).
    """

    def __init__(self, config: SimEngineConfig, *, kv_buffer: memoryview | None = None) -> None:
        self.config = config
        eos = config.eos_token_id
        candidates = config.output_token_ids or range(config.vocab_size)
        self._allowed_token_ids: tuple[int, ...] = tuple(t for t in candidates if t != eos)
        self._seed_key = splitmix64(config.seed & _MASK64)
        self._streams: dict[RequestId, _TokenStream] = {}
        self._kv_view, self._kv_region = _kv_memory(config, kv_buffer)

    @property
    def num_requests(self) -> int:
        """Requests with per-request state (a token stream): added and not yet removed."""
        return len(self._streams)

    @property
    def kv_region(self) -> KVRegion | None:
        """The KV buffer, block-major; None when ``kv_block_bytes`` is 0."""
        return self._kv_region

    @property
    def features(self) -> frozenset[str]:
        """None: its tokens come from no distribution, so there are no log-probabilities to
        report and no logits to bias or penalise (such requests are refused, not ignored)."""
        return frozenset()

    def add(self, seq: Sequence) -> None:
        """Set up the request's token stream (a pure function of the request)."""
        self._streams[seq.request_id] = self._make_stream(seq)

    def remove(self, request_id: RequestId) -> None:
        """Drop the request's token stream. Idempotent."""
        self._streams.pop(request_id, None)

    def execute(self, plan: BatchPlan, kv_usage: float) -> RunResult:
        """Write the KV bytes of every block the step computes, sample one token per sequence
        and model the step's time from its prefill tokens, decode batch and ``kv_usage``."""
        if self._kv_region is not None:
            for seq, num_new in zip(plan.seqs, plan.num_new_tokens, strict=True):
                self._write_kv(seq, num_new)
        streams = self._streams
        sample = self._sample
        token_ids = [sample(seq, streams[seq.request_id]) for seq in plan.seqs]
        step_ms = self.config.timing.step_ms(
            plan.num_new_tokens[: plan.num_prefill_seqs], plan.num_decode_seqs, kv_usage
        )
        return RunResult(token_ids=token_ids, duration_s=step_ms / 1000.0)

    # --- KV ------------------------------------------------------------------------------------

    def _write_kv(self, seq: Sequence, num_new: int) -> None:
        bs = self.config.block_size
        start = seq.num_computed_tokens
        if num_new == 1 and start >= seq.num_prompt_tokens:
            # A decode (an output token's KV): its block is written once full; the part
            # filled before that, when a peer is about to read it (``sync_kv``).
            if (start + 1) % bs == 0:
                self._write_block(seq, start // bs, start + 1)
            return
        size = self.config.kv_block_bytes
        view = self._kv_view
        tokens = seq.token_ids
        first = start // bs
        parent = _parent_hash(seq, first, bs)
        hashes = seq.block_hashes
        end = start + num_new
        for i in range(first, -(-end // bs)):
            chunk = tokens[i * bs : min((i + 1) * bs, end)]
            offset = seq.block_table[i] * size
            view[offset : offset + size] = block_kv_bytes(parent, chunk, size)
            if len(chunk) == bs:
                parent = hashes[i] if i < len(hashes) else hash_block_tokens(parent, chunk)

    def sync_kv(self, seq: Sequence) -> None:
        """Write the block that decodes have filled only in part (a decode writes a block
        once it is full: one BLAKE2b per block rather than one per token)."""
        num_tokens = seq.num_computed_tokens
        if self._kv_region is not None and num_tokens % self.config.block_size:
            self._write_block(seq, num_tokens // self.config.block_size, num_tokens)

    def _write_block(self, seq: Sequence, index: int, end: int) -> None:
        """Write block ``index`` of ``seq`` with the KV of its tokens before ``end``."""
        bs = self.config.block_size
        size = self.config.kv_block_bytes
        offset = seq.block_table[index] * size
        self._kv_view[offset : offset + size] = block_kv_bytes(
            _parent_hash(seq, index, bs), seq.token_ids[index * bs : end], size
        )

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

    def _make_stream(self, seq: Sequence) -> _TokenStream:
        sampling = seq.sampling
        prompt = array("q", seq.token_ids[: seq.num_prompt_tokens])
        key = splitmix64(_digest64(prompt.tobytes()) ^ self._seed_key)
        if sampling.temperature >= _GREEDY_EPS:
            if sampling.seed is not None:
                key = splitmix64(key ^ splitmix64((sampling.seed & _MASK64) ^ _SEED_TAG))
            else:
                key = splitmix64(key ^ _digest64(seq.request_id.encode()))
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


def _parent_hash(seq: Sequence, block_index: int, block_size: int) -> BlockHash | None:
    """The chained hash of the block before ``block_index``: from ``seq.block_hashes`` when the
    block manager has hashed that far (it always has, for blocks a step writes), else computed."""
    if block_index == 0:
        return None
    hashes = seq.block_hashes
    if block_index <= len(hashes):
        return hashes[block_index - 1]
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), block_index):
        parent = hash_block_tokens(parent, seq.token_ids[i * block_size : (i + 1) * block_size])
    return parent


def _kv_memory(
    config: SimEngineConfig, kv_buffer: memoryview | None
) -> tuple[memoryview, KVRegion | None]:
    size = config.num_kv_blocks * config.kv_block_bytes
    if kv_buffer is None:
        kv_buffer = memoryview(bytearray(size))
    if kv_buffer.readonly or not kv_buffer.c_contiguous:
        raise ValueError("kv_buffer must be writable and contiguous")
    if kv_buffer.nbytes < size:
        raise ValueError(f"kv_buffer has {kv_buffer.nbytes} bytes; the KV cache needs {size}")
    view = kv_buffer.cast("B")[:size]
    if size == 0:
        return view, None
    address = ctypes.addressof((ctypes.c_char * size).from_buffer(view))
    region = KVRegion(address, config.num_kv_blocks, config.kv_block_bytes)
    return view, region


class SimEngine(ScheduledEngine):
    """A ``ScheduledEngine`` over a ``SimRunner``: steps and transfers cost modelled time
    instead of GPU time (see the module doc). ``kv_buffer`` goes to the runner."""

    runner: SimRunner

    def __init__(self, config: SimEngineConfig, *, kv_buffer: memoryview | None = None) -> None:
        self.config = config
        super().__init__(
            config.scheduler_config,
            SimRunner(config, kv_buffer=kv_buffer),
            vocab_size=config.vocab_size,
        )

    def transfer_time_s(self, num_bytes: int) -> float:
        """Modelled time to move ``num_bytes`` of this engine's small real KV buffer: each of
        its ``kv_block_bytes`` stands for ``kv_bytes_per_block_modelled`` bytes of the modelled
        model, priced by ``config.timing.transfer_ms``."""
        config = self.config
        if num_bytes <= 0 or config.kv_block_bytes == 0:
            return 0.0
        modelled = num_bytes * config.kv_bytes_per_block_modelled / config.kv_block_bytes
        return config.timing.transfer_ms(round(modelled)) / 1000.0
