"""The torch runner: a real Llama-style model over a paged, block-major KV cache.

The cache is one tensor ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``, so
block ``i`` (every layer's K and V for ``block_size`` tokens) is one contiguous byte range that
a KV-transfer agent moves with one descriptor. A step runs every scheduled token through the
model as one flat batch (matmuls batched over sequences); attention then takes two shapes:

- decode-shaped sequences (one new token) attend together: their blocks are gathered into a
  padded ``[B, max_context]`` batch and one SDPA call per layer runs it under a length mask,
  with each KV head's query heads folded into the query-length axis (no K/V repeat for GQA);
- prefill sequences attend one at a time: causal SDPA over the new tokens, or, after a prefix
  cache hit, over the cached blocks plus the new tokens under an offset causal mask.
"""

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from proto.messages import FEATURE_LOGIT_BIAS, FEATURE_LOGPROBS, FEATURE_PENALTIES, RequestId
from shared.engine.model import LlamaModel, ModelConfig
from shared.engine.runner import KVRegion, RunResult
from shared.engine.sampler import Sampler
from shared.engine.scheduler import BatchPlan
from shared.engine.sequence import Sequence

logger = logging.getLogger(__name__)


def kv_block_shape(config: ModelConfig, block_size: int) -> tuple[int, int, int, int, int]:
    """The shape of one KV block: ``[num_layers, 2 (K, V), block_size, kv_heads, head_dim]``."""
    return (config.num_layers, 2, block_size, config.num_kv_heads, config.head_dim)


def kv_block_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one KV block, so a caller can size an external ``kv_buffer``."""
    n = 1
    for dim in kv_block_shape(config, block_size):
        n *= dim
    return n * dtype.itemsize


@dataclass(slots=True)
class _Prefill:
    start: int  # rows [start, end) of the step's flat token batch
    end: int
    context_start: int  # tokens already in the cache (positions < context_start)
    block_ids: torch.Tensor | None  # the blocks to gather when context_start > 0
    mask: torch.Tensor | None  # [new, context] offset causal mask when context_start > 0


@dataclass(slots=True)
class _DecodeBatch:
    indices: torch.Tensor  # [B] rows of the decode-shaped sequences in the flat batch
    halves: torch.Tensor  # [B * max_blocks] (block, layer 0, K) half ids, padded with block 0
    mask: torch.Tensor  # [B, 1, 1, max_blocks * block_size] additive: 0 or -inf past the end
    keys: torch.Tensor  # [B * max_blocks, half] gather workspace, reused by every layer
    values: torch.Tensor


@dataclass(slots=True)
class _StepInputs:
    token_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    slot_rows: torch.Tensor  # [N] row of each token's K in layer 0 of the cache's row view
    last_indices: torch.Tensor  # [num_seqs] the row each sequence samples from
    prefills: list[_Prefill]
    decode: _DecodeBatch | None


class TorchRunner:
    """A ``Runner`` that computes steps with ``model`` and samples real tokens.

    The cache holds ``num_kv_blocks`` blocks of ``block_size`` tokens in the model's device and
    dtype. ``kv_buffer`` (CPU only) puts the cache in caller-owned memory, e.g. a region a
    transfer agent registered; it must be writable and at least ``num_kv_blocks *
    kv_block_bytes(...)`` bytes. ``num_threads`` sets torch's intra-op threads on a CPU device
    (a worker passes 1 so several engines share a machine); None leaves the process setting.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        num_kv_blocks: int,
        block_size: int,
        eos_token_id: int | None = None,
        kv_buffer: memoryview | bytearray | None = None,
        num_threads: int | None = None,
    ) -> None:
        if num_kv_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_kv_blocks and block_size must be >= 1, got {num_kv_blocks}, {block_size}"
            )
        self.model = model
        self.config = model.config
        self.device = model.device
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        if num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(num_threads)
        shape = (num_kv_blocks, *kv_block_shape(self.config, block_size))
        self.block_bytes = kv_block_bytes(self.config, block_size, model.dtype)
        self._kv_buffer = kv_buffer  # keeps caller memory alive as long as the cache
        if kv_buffer is None:
            self.kv_cache = torch.zeros(shape, dtype=model.dtype, device=self.device)
        else:
            self.kv_cache = self._cache_in(kv_buffer, shape)
        c = self.config
        # Views of the cache: one row per (block, layer, K|V, slot), one half per (block, layer,
        # K|V), one chunk per (block, layer).
        self._kv_rows = self.kv_cache.view(-1, c.num_kv_heads, c.head_dim)
        self._kv_halves = self.kv_cache.view(num_kv_blocks * c.num_layers * 2, -1)
        self._kv_chunks = self.kv_cache.view(num_kv_blocks * c.num_layers, *shape[2:])
        self._sampler = Sampler(c.vocab_size, eos_token_id, self.device)
        logger.info(
            "kv cache ready num_blocks=%d block_size=%d block_bytes=%d device=%s external=%s",
            num_kv_blocks,
            block_size,
            self.block_bytes,
            self.device,
            kv_buffer is not None,
        )

    def _cache_in(self, kv_buffer: memoryview | bytearray, shape: tuple[int, ...]) -> torch.Tensor:
        if self.device.type != "cpu":
            raise ValueError(f"kv_buffer is host memory; the model is on {self.device}")
        view = memoryview(kv_buffer)
        size_bytes = self.num_kv_blocks * self.block_bytes
        if view.readonly or not view.c_contiguous:
            raise ValueError("kv_buffer must be writable and contiguous")
        if view.nbytes < size_bytes:
            raise ValueError(f"kv_buffer holds {view.nbytes} bytes; the cache needs {size_bytes}")
        raw = torch.frombuffer(view.cast("B"), dtype=torch.uint8, count=size_bytes)
        return raw.view(self.model.dtype).view(shape)

    @property
    def kv_region(self) -> KVRegion:
        """The cache's memory: block ``i`` is ``[address + i * block_bytes, +block_bytes)``."""
        return KVRegion(
            address=self.kv_cache.data_ptr(),
            num_blocks=self.num_kv_blocks,
            block_bytes=self.block_bytes,
            device=str(self.kv_cache.device),
        )

    @property
    def features(self) -> frozenset[str]:
        """Real logits: log-probabilities, penalties and logit bias all apply."""
        return frozenset({FEATURE_LOGPROBS, FEATURE_PENALTIES, FEATURE_LOGIT_BIAS})

    def add(self, seq: Sequence) -> None:
        """Set up the request's sampler state."""
        self._sampler.add(seq)

    def remove(self, request_id: RequestId) -> None:
        """Drop the request's sampler state. Idempotent."""
        self._sampler.remove(request_id)

    def sync_kv(self, seq: Sequence) -> None:
        """Nothing: each step writes its KV (and ``execute`` synchronises the device)."""

    def execute(self, plan: BatchPlan, kv_usage: float) -> RunResult:
        """Write the KV of every scheduled token into its sequence's blocks and sample each
        sequence's next token; ``duration_s`` is the measured wall time (device synchronised).
        ``kv_usage`` is unused: the time is measured, not modelled."""
        start = time.perf_counter()
        if plan.is_empty:
            return RunResult([], 0.0)
        logits = self.compute_logits(plan)
        with torch.inference_mode():
            token_ids, logprobs = self._sampler.sample(logits, plan.seqs)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return RunResult(token_ids, time.perf_counter() - start, logprobs)

    def compute_logits(self, plan: BatchPlan) -> torch.Tensor:
        """The model half of ``execute``: write the KV of every scheduled token and return the
        float32 logits ``[len(plan.seqs), vocab]`` at each sequence's last new token (the
        distribution of its next token, before any sampling rule)."""
        with torch.inference_mode():
            inputs = self._prepare(plan)

            def attend(
                layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
            ) -> torch.Tensor:
                return self._attend(inputs, layer, q, k, v)

            hidden = self.model.forward(inputs.token_ids, inputs.positions, attend)
            return self.model.compute_logits(hidden.index_select(0, inputs.last_indices))

    # --- step inputs ---------------------------------------------------------------------------

    def _prepare(self, plan: BatchPlan) -> _StepInputs:
        bs = self.block_size
        num_layers = self.config.num_layers
        dev = self.device
        token_ids: list[int] = []
        positions: list[int] = []
        slot_blocks: list[int] = []
        last_indices: list[int] = []
        prefills: list[_Prefill] = []
        decode_indices: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        cursor = 0
        for seq, n in zip(plan.seqs, plan.num_new_tokens, strict=True):
            c = seq.num_computed_tokens
            end = c + n
            table = seq.block_table
            if n < 1 or end > len(seq.token_ids) or len(table) * bs < end:
                raise ValueError(
                    f"request {seq.request_id}: cannot compute tokens [{c}, {end}) of "
                    f"{len(seq.token_ids)} with {len(table)} blocks of {bs}"
                )
            token_ids.extend(seq.token_ids[c:end])
            new_positions = range(c, end)
            positions.extend(new_positions)
            slot_blocks.extend([table[p // bs] for p in new_positions])
            if n == 1:
                decode_indices.append(cursor)
                decode_tables.append(table)
                decode_lens.append(end)
            else:
                prefills.append(self._prefill(cursor, c, n, table))
            cursor += n
            last_indices.append(cursor - 1)
        pos = torch.tensor(positions, device=dev)
        blocks = torch.tensor(slot_blocks, device=dev)
        # Row of (block, layer 0, K, offset) in the row view; layer l adds l * 2 * bs, V adds bs.
        slot_rows = blocks * (num_layers * 2 * bs) + pos % bs
        return _StepInputs(
            token_ids=torch.tensor(token_ids, device=dev),
            positions=pos,
            slot_rows=slot_rows,
            last_indices=torch.tensor(last_indices, device=dev),
            prefills=prefills,
            decode=self._decode_batch(decode_indices, decode_tables, decode_lens),
        )

    def _decode_batch(
        self, indices: list[int], tables: list[list[int]], lens: list[int]
    ) -> _DecodeBatch | None:
        if not indices:
            return None
        bs = self.block_size
        dev = self.device
        dtype = self.model.dtype
        max_blocks = -(-max(lens) // bs)
        padded = [t[:max_blocks] + [0] * (max_blocks - len(t)) for t in tables]
        span = torch.arange(max_blocks * bs, device=dev)
        masked = span[None, :] >= torch.tensor(lens, device=dev)[:, None]
        mask = torch.zeros(masked.shape, dtype=dtype, device=dev).masked_fill_(masked, -torch.inf)
        # The gathers write into these: allocated once a step, not once a layer.
        shape = (len(indices) * max_blocks, self._kv_halves.shape[1])
        return _DecodeBatch(
            indices=torch.tensor(indices, device=dev),
            halves=torch.tensor(padded, device=dev).view(-1) * (self.config.num_layers * 2),
            mask=mask[:, None, None, :],
            keys=torch.empty(shape, dtype=dtype, device=dev),
            values=torch.empty(shape, dtype=dtype, device=dev),
        )

    def _prefill(self, start: int, context_start: int, n: int, table: list[int]) -> _Prefill:
        if context_start == 0:
            return _Prefill(start, start + n, 0, None, None)
        dev = self.device
        num_blocks = -(-(context_start + n) // self.block_size)
        block_ids = torch.tensor(table[:num_blocks], device=dev)
        q_pos = torch.arange(context_start, context_start + n, device=dev)
        k_pos = torch.arange(context_start + n, device=dev)
        mask = k_pos[None, :] <= q_pos[:, None]
        return _Prefill(start, start + n, context_start, block_ids, mask)

    # --- attention -----------------------------------------------------------------------------

    def _attend(
        self, inputs: _StepInputs, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        bs = self.block_size
        k_rows = inputs.slot_rows + layer * 2 * bs
        self._kv_rows.index_copy_(0, torch.cat((k_rows, k_rows + bs)), torch.cat((k, v)))
        out = torch.empty_like(q)
        for p in inputs.prefills:
            out[p.start : p.end] = self._attend_prefill(p, layer, q, k, v)
        if inputs.decode is not None:
            out.index_copy_(0, inputs.decode.indices, self._attend_decode(inputs.decode, layer, q))
        return out

    def _attend_prefill(
        self, p: _Prefill, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        c = self.config
        group = c.num_heads // c.num_kv_heads
        if p.block_ids is None:
            keys, values = k[p.start : p.end], v[p.start : p.end]
        else:
            gathered = self._kv_chunks.index_select(0, p.block_ids * c.num_layers + layer)
            context = p.end - p.start + p.context_start
            keys = gathered[:, 0].reshape(-1, c.num_kv_heads, c.head_dim)[:context]
            values = gathered[:, 1].reshape(-1, c.num_kv_heads, c.head_dim)[:context]
        # [1, heads, tokens, head_dim]; K/V repeated per query head (prefill is compute-bound).
        qs = q[p.start : p.end].transpose(0, 1)[None]
        ks = keys.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        vs = values.repeat_interleave(group, dim=1).transpose(0, 1)[None]
        out = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=p.mask, is_causal=p.mask is None)
        return out[0].transpose(0, 1)

    def _attend_decode(self, d: _DecodeBatch, layer: int, q: torch.Tensor) -> torch.Tensor:
        c = self.config
        b = d.indices.shape[0]
        halves = d.halves + layer * 2
        keys = torch.index_select(self._kv_halves, 0, halves, out=d.keys)
        values = torch.index_select(self._kv_halves, 0, halves + 1, out=d.values)
        keys = keys.view(b, -1, c.num_kv_heads, c.head_dim).transpose(1, 2)
        values = values.view(b, -1, c.num_kv_heads, c.head_dim).transpose(1, 2)
        # A KV head's query heads ride the query-length axis: [B, kv_heads, group, head_dim].
        qd = q.index_select(0, d.indices).view(b, c.num_kv_heads, -1, c.head_dim)
        out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=d.mask)
        return out.reshape(b, c.num_heads, c.head_dim)
