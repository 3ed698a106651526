"""Next-token sampling from a batch of logits: greedy, or temperature and top-p, after the
request's logit bias and penalties; with each token's log-probability when asked.

A sampled token is a pure function of the request's key, its output index and the logits: the
random draw for output index ``k`` comes from a generator seeded with ``hash(key, k)``, where
the key is the request's ``sampling.seed`` when set and its request id otherwise. So a request
prefilled on one engine and decoded on another gives the tokens it would have given on one,
and a preempted request regenerates the same tokens (given the same logits).
"""

import hashlib
import struct

import torch

from proto.messages import RequestId, SamplingParams, TokenLogprobs
from shared.engine.sequence import Sequence

GREEDY_EPS = 1e-5  # below this temperature sampling is argmax, as in vLLM
_MASK64 = (1 << 64) - 1
_MIN_NOISE = 1e-20  # an exponential draw of exactly 0 would turn a zero probability into NaN


def _hash64(*parts: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b"\x00".join(parts), digest_size=8).digest(), "little")


def request_key(request_id: RequestId, sampling: SamplingParams) -> int:
    """The 64-bit key of a request's random stream: from ``sampling.seed`` when set (so it
    does not depend on where or under which id the request runs), else from its id."""
    if sampling.seed is not None:
        return _hash64(b"seed", struct.pack("<Q", sampling.seed & _MASK64))
    return _hash64(b"request", request_id.encode())


def draw_seed(key: int, output_index: int) -> int:
    """The generator seed for output token ``output_index`` of the request with ``key``."""
    return _hash64(struct.pack("<QQ", key, output_index))


class Sampler:
    """Samples one token per row of a logits batch, for the sequences that produced them.

    ``add``/``remove`` cache each request's key (a sequence never added still samples, with
    its key computed on the spot). EOS (unless ``ignore_eos``) and ``stop_token_ids`` are
    masked while a sequence has fewer than ``min_tokens`` outputs, so it cannot stop early.

    Order, per row: log-probabilities of the raw logits (reported, as vLLM's default), then
    ``logit_bias``, the repetition penalty (HF's rule: a seen token's positive logit divided by
    it, a negative one multiplied), frequency and presence penalties (over output tokens only,
    OpenAI's rule), the stop mask, temperature and top-p.
    """

    def __init__(self, vocab_size: int, eos_token_id: int | None, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.device = device
        self._keys: dict[RequestId, int] = {}
        self._generator = torch.Generator()  # CPU: draws agree across devices and processes

    def add(self, seq: Sequence) -> None:
        """Cache the request's key."""
        self._keys[seq.request_id] = request_key(seq.request_id, seq.sampling)

    def remove(self, request_id: RequestId) -> None:
        """Forget the request. Idempotent."""
        self._keys.pop(request_id, None)

    def sample(
        self, logits: torch.Tensor, seqs: list[Sequence]
    ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """One token per row of float32 ``logits`` ``[len(seqs), vocab]`` (modified in place):
        the token that follows ``seqs[i].token_ids``; and, when any sequence asked for them,
        each row's ``TokenLogprobs`` (None for rows that did not ask)."""
        logprob_rows = [i for i, s in enumerate(seqs) if s.sampling.logprobs is not None]
        raw = (
            logits.index_select(0, torch.tensor(logprob_rows, device=self.device)).log_softmax(
                dim=-1
            )
            if logprob_rows
            else None
        )
        for i, seq in enumerate(seqs):
            sampling = seq.sampling
            if (
                sampling.logit_bias
                or sampling.repetition_penalty != 1.0
                or sampling.presence_penalty
                or sampling.frequency_penalty
            ):
                self._adjust(logits[i], seq)
        self._mask_stops(logits, seqs)
        token_ids = logits.argmax(dim=-1)
        rows = [i for i, seq in enumerate(seqs) if seq.sampling.temperature >= GREEDY_EPS]
        if rows:
            row_index = torch.tensor(rows, device=self.device)
            picked = [seqs[i] for i in rows]
            temps = torch.tensor([s.sampling.temperature for s in picked], device=self.device)
            probs = (logits.index_select(0, row_index) / temps[:, None]).softmax(dim=-1)
            top_ps = [s.sampling.top_p for s in picked]
            if any(p < 1.0 for p in top_ps):
                probs = _top_p(probs, torch.tensor(top_ps, device=self.device))
            noise = torch.stack([self._noise(s) for s in picked]).to(self.device)
            token_ids.index_copy_(0, row_index, (probs / noise).argmax(dim=-1))
        chosen = [int(t) for t in token_ids.tolist()]
        if raw is None:
            return chosen, None
        reports: list[TokenLogprobs | None] = [None] * len(seqs)
        for row, i in enumerate(logprob_rows):
            reports[i] = _report(raw[row], chosen[i], seqs[i].sampling.logprobs or 0)
        return chosen, reports

    def _adjust(self, row: torch.Tensor, seq: Sequence) -> None:
        """Apply ``seq``'s logit bias and penalties to its logits row, in place."""
        sampling = seq.sampling
        dev = self.device
        if sampling.logit_bias:
            ids = [t for t in sampling.logit_bias if 0 <= t < self.vocab_size]
            if ids:
                bias = torch.tensor([sampling.logit_bias[t] for t in ids], device=dev)
                row.index_add_(0, torch.tensor(ids, device=dev), bias)
        if sampling.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=dev)
            seen = seen[seen < self.vocab_size]
            values = row.index_select(0, seen)
            penalty = sampling.repetition_penalty
            row.index_copy_(0, seen, torch.where(values > 0, values / penalty, values * penalty))
        if sampling.presence_penalty or sampling.frequency_penalty:
            output = seq.token_ids[seq.num_prompt_tokens :]
            if output:
                counts = torch.bincount(
                    torch.tensor(output, dtype=torch.long), minlength=self.vocab_size
                )[: self.vocab_size].to(dev, row.dtype)
                row -= counts * sampling.frequency_penalty
                row -= (counts > 0).to(row.dtype) * sampling.presence_penalty

    def _noise(self, seq: Sequence) -> torch.Tensor:
        """Exponential(1) draws over the vocabulary; ``argmax(probs / noise)`` is then a sample
        from ``probs`` (the exponential race), with no device-side randomness."""
        key = self._keys.get(seq.request_id)
        if key is None:
            key = request_key(seq.request_id, seq.sampling)
        self._generator.manual_seed(draw_seed(key, seq.num_output_tokens))
        noise = torch.empty(self.vocab_size).exponential_(generator=self._generator)
        return noise.clamp_min_(_MIN_NOISE)

    def _mask_stops(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        rows: list[int] = []
        cols: list[int] = []
        for i, seq in enumerate(seqs):
            sampling = seq.sampling
            if seq.num_output_tokens >= sampling.min_tokens:
                continue
            banned = set(sampling.stop_token_ids)
            if self.eos_token_id is not None and not sampling.ignore_eos:
                banned.add(self.eos_token_id)
            for token_id in banned:
                if 0 <= token_id < self.vocab_size:
                    rows.append(i)
                    cols.append(token_id)
        if rows:
            index = (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
            logits.index_put_(index, torch.tensor(float("-inf"), device=self.device))


def _report(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    """The chosen token's log-probability and the ``num_top`` likeliest alternatives."""
    top: list[tuple[int, float]] = []
    if num_top > 0:
        values, ids = logprobs.topk(min(num_top, logprobs.numel()))
        top = list(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprobs(float(logprobs[token_id]), top)


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set whose mass reaches ``top_p`` (per row); the
    most likely token always stays. Rows are not renormalised: the race is scale-free."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs[mass_before > top_p[:, None]] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
