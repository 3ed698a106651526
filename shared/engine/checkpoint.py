"""Where a model's weights come from: a Hugging Face checkpoint directory or a seeded draw.

``load_pretrained`` reads a local directory (``config.json`` plus one ``*.safetensors`` file or
shards, with or without ``model.safetensors.index.json``) written by ``transformers`` for a
``llama`` or ``qwen2`` model; ``save_pretrained`` writes the same layout. ``random_model``
draws small deterministic weights, so tests and CPU workers need no download.
"""

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import load_file, save_file

from shared.engine.model import LlamaModel, ModelConfig, RopeScaling, hf_parameter_names

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES: Final = ("llama", "qwen2")
_DTYPES: Final = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A ``ModelConfig`` from the fields of a Hugging Face ``config.json``. Raises
    ``ValueError`` for an architecture or feature this model does not implement (sliding
    window, rope scaling other than llama3/linear), rather than serving wrong tokens."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
    if hf.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported")
    num_heads = int(hf["num_attention_heads"])
    scaling = hf.get("rope_scaling")
    rope_scaling = None
    if scaling:
        fields = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        rope_scaling = RopeScaling(
            rope_type=scaling.get("rope_type", scaling.get("type")),
            factor=float(scaling["factor"]),
            **{k: scaling[k] for k in fields if k in scaling},
        )
    return ModelConfig(
        hidden_size=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        intermediate_size=int(hf["intermediate_size"]),
        vocab_size=int(hf["vocab_size"]),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
        rope_scaling=rope_scaling,
    )


def config_to_hf(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The ``config.json`` fields ``transformers`` needs to load this model: ``qwen2`` when the
    attention has biases, ``llama`` otherwise."""
    is_qwen2 = config.attention_bias
    hf: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if is_qwen2 else "LlamaForCausalLM"],
        "model_type": "qwen2" if is_qwen2 else "llama",
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    if not is_qwen2:
        hf["attention_bias"] = False
    if config.rope_scaling is not None:
        s = config.rope_scaling
        hf["rope_scaling"] = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            hf["rope_scaling"].update(
                low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_position_embeddings,
            )
    return hf


def load_pretrained(
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> LlamaModel:
    """Load the model in directory ``path`` onto ``device``. ``dtype`` None keeps the
    checkpoint's ``torch_dtype`` (float32 when it names none)."""
    root = Path(path)
    hf = json.loads((root / "config.json").read_text())
    config = config_from_hf(hf)
    if dtype is None:
        dtype = _DTYPES.get(str(hf.get("torch_dtype")), torch.float32)
    index = root / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [root / name for name in names]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {root}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    model = LlamaModel(config, state, device=device, dtype=dtype)
    logger.info(
        "model loaded path=%s num_parameters=%d device=%s dtype=%s",
        root,
        model.num_parameters,
        model.device,
        dtype,
    )
    return model


def save_pretrained(model: LlamaModel, path: str | Path) -> None:
    """Write ``config.json`` and one ``model.safetensors`` (the model's dtype, Hugging Face
    names) into directory ``path``, creating it."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.config, model.dtype)
    (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(tensors, root / "model.safetensors", metadata={"format": "pt"})


def random_state_dict(
    config: ModelConfig,
    seed: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Weights drawn from one generator seeded with ``seed``, in a fixed order. On the CPU
    (the default) every process and machine gets the same model; a CUDA draw (fast, for a
    large benchmark model) repeats only on the same GPU model and torch version.

    Scales keep activations and logits near unit size (norm weights near 1, projections and a
    tied embedding ~1/sqrt(fan_in)), so attention is far from uniform and greedy tokens are
    not near-ties."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = _parameter_shapes(config)
    out: dict[str, torch.Tensor] = {}
    for name in hf_parameter_names(config):
        shape = shapes(name)
        w = torch.randn(shape, generator=gen, device=device, dtype=dtype)
        if name.endswith("norm.weight"):
            w = 1.0 + 0.1 * w
        elif name.endswith(".bias"):
            w = 0.1 * w
        elif name != "model.embed_tokens.weight" or config.tie_word_embeddings:
            w = w * shape[-1] ** -0.5
        out[name] = w
    return out


def random_model(
    config: ModelConfig,
    seed: int = 0,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LlamaModel:
    """A model with ``random_state_dict(config, seed)`` weights (drawn on the CPU, so the same
    in every process) on ``device`` in ``dtype``."""
    return LlamaModel(config, random_state_dict(config, seed), device=device, dtype=dtype)


def _parameter_shapes(c: ModelConfig) -> Callable[[str], tuple[int, ...]]:
    h = c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (c.vocab_size, h),
        "lm_head.weight": (c.vocab_size, h),
        "norm.weight": (h,),
        "q_proj.weight": (c.q_size, h),
        "k_proj.weight": (c.kv_size, h),
        "v_proj.weight": (c.kv_size, h),
        "o_proj.weight": (h, c.q_size),
        "q_proj.bias": (c.q_size,),
        "k_proj.bias": (c.kv_size,),
        "v_proj.bias": (c.kv_size,),
        "o_proj.bias": (h,),
        "gate_proj.weight": (c.intermediate_size, h),
        "up_proj.weight": (c.intermediate_size, h),
        "down_proj.weight": (h, c.intermediate_size),
    }

    def shape(name: str) -> tuple[int, ...]:
        key = ".".join(name.split(".")[-2:])
        return shapes["norm.weight" if key.endswith("norm.weight") else key]

    return shape
