"""A Llama-architecture decoder (Llama 2/3, TinyLlama, Qwen2): its weights and its math.

The model computes hidden states for a flat batch of tokens and leaves attention to a callback,
so the same weights serve the paged KV cache of ``TorchRunner`` and the dense, cache-free
reference forward (``dense_logits``) the tests compare it with. Weights come as a Hugging Face
state dict (standard parameter names); ``shared.engine.checkpoint`` reads and writes checkpoint
directories and draws seeded random weights. This module reads no files.
"""

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F

AttentionFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``attend(layer, q, k, v) -> out``: q is ``[N, num_heads, head_dim]`` and k, v are
``[N, num_kv_heads, head_dim]`` for the N new tokens (RoPE applied); out is like q."""

_LAYER_PREFIX: Final = "model.layers."


@dataclass(frozen=True, slots=True, kw_only=True)
class RopeScaling:
    """Llama 3's rotary-frequency rescaling (``rope_type="llama3"``) or plain position
    interpolation (``"linear"``), as in a checkpoint's ``rope_scaling``."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(f"rope_type must be 'llama3' or 'linear', got {self.rope_type!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """The shape of a Llama-style model. The defaults are a small model (about 8M parameters,
    milliseconds a step on one CPU core) whose vocabulary matches the bundled tokenizer.

    ``attention_bias`` gives q, k and v projections a bias (Qwen2); a loaded checkpoint uses
    whatever biases it holds.
    """

    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 768
    vocab_size: int = 6144
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def q_size(self) -> int:
        """Width of the query projection (all heads)."""
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        """Width of the key (or value) projection (all KV heads)."""
        return self.num_kv_heads * self.head_dim


@dataclass(slots=True)
class LayerWeights:
    """One decoder layer, with q/k/v and gate/up fused so each is one matmul."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q_size + 2 * kv_size, hidden]
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * intermediate, hidden]
    down: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back before the weight, as Hugging Face Llama."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[N, heads, head_dim]`` by position, halves convention (``rotate_half``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaModel:
    """Weights of a Llama-style decoder on one device and dtype, and its forward pass.

    Built from a Hugging Face state dict (any dtype, any device); the tensors are copied to
    ``device`` and ``dtype``. Stateless between calls: the KV cache belongs to the caller.
    """

    def __init__(
        self,
        config: ModelConfig,
        state_dict: Mapping[str, torch.Tensor],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.device = torch.device(device)
        self.dtype = dtype
        known = set(hf_parameter_names(config, state_dict))
        unknown = sorted(k for k in state_dict if k not in known and "rotary_emb" not in k)
        missing = sorted(k for k in known if k not in state_dict)
        if missing or unknown:
            raise ValueError(
                f"checkpoint mismatch: missing {missing[:5]}, unexpected {unknown[:5]}"
            )

        def get(name: str) -> torch.Tensor:
            return state_dict[name].to(self.device, dtype)

        def opt(name: str) -> torch.Tensor | None:
            return get(name) if name in state_dict else None

        self.embed_tokens = get("model.embed_tokens.weight")
        self.norm = get("model.norm.weight")
        tied = config.tie_word_embeddings
        self.lm_head = self.embed_tokens if tied else get("lm_head.weight")
        self.layers: list[LayerWeights] = []
        for i in range(config.num_layers):
            p = f"{_LAYER_PREFIX}{i}."
            a, m = p + "self_attn.", p + "mlp."
            biases = [opt(a + f"{x}_proj.bias") for x in "qkv"]
            qkv_bias = None
            if any(b is not None for b in biases):
                sizes = (config.q_size, config.kv_size, config.kv_size)
                qkv_bias = torch.cat(
                    [
                        b if b is not None else self._zeros(n)
                        for b, n in zip(biases, sizes, strict=True)
                    ]
                )
            self.layers.append(
                LayerWeights(
                    input_norm=get(p + "input_layernorm.weight"),
                    qkv=torch.cat([get(a + f"{x}_proj.weight") for x in "qkv"]),
                    qkv_bias=qkv_bias,
                    o=get(a + "o_proj.weight"),
                    o_bias=opt(a + "o_proj.bias"),
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]),
                    down=get(m + "down_proj.weight"),
                )
            )
        self._inv_freq = _inv_freq(config).to(self.device)

    def _zeros(self, n: int) -> torch.Tensor:
        return torch.zeros(n, device=self.device, dtype=self.dtype)

    @property
    def num_parameters(self) -> int:
        """Parameter count (a tied head counted once)."""
        return sum(t.numel() for t in self.state_dict().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under their Hugging Face names (views of this model's tensors; the head
        is left out when tied, as checkpoints do)."""
        c = self.config
        out = {"model.embed_tokens.weight": self.embed_tokens, "model.norm.weight": self.norm}
        if not c.tie_word_embeddings:
            out["lm_head.weight"] = self.lm_head
        for i, layer in enumerate(self.layers):
            p = f"{_LAYER_PREFIX}{i}."
            a, m = p + "self_attn.", p + "mlp."
            out[p + "input_layernorm.weight"] = layer.input_norm
            out[p + "post_attention_layernorm.weight"] = layer.post_norm
            splits = [c.q_size, c.kv_size, c.kv_size]
            for x, w in zip("qkv", torch.split(layer.qkv, splits), strict=True):
                out[a + f"{x}_proj.weight"] = w
            if layer.qkv_bias is not None:
                for x, b in zip("qkv", torch.split(layer.qkv_bias, splits), strict=True):
                    out[a + f"{x}_proj.bias"] = b
            out[a + "o_proj.weight"] = layer.o
            if layer.o_bias is not None:
                out[a + "o_proj.bias"] = layer.o_bias
            gate, up = layer.gate_up.chunk(2)
            out[m + "gate_proj.weight"], out[m + "up_proj.weight"] = gate, up
            out[m + "down_proj.weight"] = layer.down
        return out

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, attend: AttentionFn
    ) -> torch.Tensor:
        """Hidden states ``[N, hidden]`` (before the final norm) of N tokens at ``positions``,
        every layer's attention delegated to ``attend``. Call under ``torch.inference_mode``."""
        c = self.config
        n = token_ids.shape[0]
        x = F.embedding(token_ids, self.embed_tokens)
        freqs = positions.float()[:, None] * self._inv_freq[None, :]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [N, 1, head_dim]
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        eps = c.rms_norm_eps
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.input_norm, eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            q, k, v = torch.split(qkv, [c.q_size, c.kv_size, c.kv_size], dim=-1)
            q = apply_rope(q.view(n, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(k.view(n, c.num_kv_heads, c.head_dim), cos, sin)
            a = attend(i, q, k, v.view(n, c.num_kv_heads, c.head_dim))
            x = x + F.linear(a.reshape(n, c.q_size), layer.o, layer.o_bias)
            gate, up = F.linear(rms_norm(x, layer.post_norm, eps), layer.gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, layer.down)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[N, vocab]`` of hidden states from ``forward``."""
        return F.linear(rms_norm(hidden, self.norm, self.config.rms_norm_eps), self.lm_head).float()

    def dense_logits(self, token_ids: list[int]) -> torch.Tensor:
        """Logits ``[T, vocab]`` at every position of one sequence, recomputed from scratch with
        explicit causal softmax attention: the reference the paged runner is tested against."""
        c = self.config
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device)
        group = c.num_heads // c.num_kv_heads
        causal = positions[None, :] <= positions[:, None]

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * c.head_dim**-0.5
            probs = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)
            return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)

        with torch.inference_mode():
            return self.compute_logits(self.forward(ids, positions, attend))


def hf_parameter_names(
    config: ModelConfig, present: Mapping[str, object] | None = None
) -> Iterator[str]:
    """Every Hugging Face parameter name the config implies, in a fixed order; biases (and a
    tied head) are listed when ``config`` says so or ``present`` holds them."""
    present = present or {}
    yield "model.embed_tokens.weight"
    for i in range(config.num_layers):
        p = f"{_LAYER_PREFIX}{i}."
        yield p + "input_layernorm.weight"
        for x in "qkvo":
            yield p + f"self_attn.{x}_proj.weight"
            bias = p + f"self_attn.{x}_proj.bias"
            if (config.attention_bias and x != "o") or bias in present:
                yield bias
        for x in ("gate", "up", "down"):
            yield p + f"mlp.{x}_proj.weight"
        yield p + "post_attention_layernorm.weight"
    yield "model.norm.weight"
    if not config.tie_word_embeddings or "lm_head.weight" in present:
        yield "lm_head.weight"


def _inv_freq(c: ModelConfig) -> torch.Tensor:
    """RoPE inverse frequencies, rescaled as ``c.rope_scaling`` says."""
    exponents = torch.arange(0, c.head_dim, 2, dtype=torch.float64) / c.head_dim
    inv_freq = 1.0 / (c.rope_theta**exponents)
    s = c.rope_scaling
    if s is None:
        return inv_freq.float()
    if s.rope_type == "linear":
        return (inv_freq / s.factor).float()
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the middle blended.
    wavelen = 2 * torch.pi / inv_freq
    old_len = s.original_max_position_embeddings
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / s.low_freq_factor, inv_freq / s.factor, blended)
    out = torch.where(wavelen < old_len / s.high_freq_factor, inv_freq, out)
    return out.float()
