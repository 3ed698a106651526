import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from safetensors.torch import save_file  # noqa: E402

from shared.engine.checkpoint import (  # noqa: E402
    config_from_hf,
    config_to_hf,
    load_pretrained,
    random_model,
    random_state_dict,
    save_pretrained,
)
from shared.engine.model import ModelConfig, RopeScaling  # noqa: E402

TOKENS = [(i * 37 + 11) % 6144 for i in range(40)]

CONFIGS = {
    "llama": ModelConfig(num_layers=2),
    "llama_tied": ModelConfig(num_layers=2, tie_word_embeddings=True),
    "qwen2_bias": ModelConfig(num_layers=2, attention_bias=True, rope_theta=1e6),
    "llama3_rope": ModelConfig(
        num_layers=2,
        rope_theta=500000.0,
        rope_scaling=RopeScaling(
            rope_type="llama3", factor=8.0, original_max_position_embeddings=64
        ),
    ),
}


def test_random_state_dict_is_deterministic_for_a_seed():
    config = ModelConfig(num_layers=2)
    a, b = random_state_dict(config, 7), random_state_dict(config, 7)
    other = random_state_dict(config, 8)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], other["lm_head.weight"])


def test_random_state_dict_is_the_same_in_another_process():
    code = (
        "from shared.engine.checkpoint import random_state_dict\n"
        "from shared.engine.model import ModelConfig\n"
        "sd = random_state_dict(ModelConfig(num_layers=2), 7)\n"
        "print(repr(sum(float(t.double().sum()) for t in sd.values())))\n"
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    here = sum(
        float(t.double().sum()) for t in random_state_dict(ModelConfig(num_layers=2), 7).values()
    )
    assert float(out.stdout) == here


@pytest.mark.parametrize("name", CONFIGS)
def test_save_and_load_round_trip_gives_same_logits(tmp_path, name):
    model = random_model(CONFIGS[name], seed=1)
    save_pretrained(model, tmp_path)
    loaded = load_pretrained(tmp_path)
    assert loaded.config == model.config
    assert loaded.dtype == torch.float32
    assert torch.equal(loaded.dense_logits(TOKENS), model.dense_logits(TOKENS))


def test_load_reads_sharded_checkpoint_with_index(tmp_path):
    model = random_model(ModelConfig(num_layers=2), seed=2)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
        weight_map.update(dict.fromkeys(keys, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    loaded = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.embed_tokens, state["model.embed_tokens.weight"].bfloat16())


def test_load_rejects_checkpoint_missing_a_weight(tmp_path):
    model = random_model(ModelConfig(num_layers=2), seed=3)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    del state["model.layers.1.mlp.down_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(model.config)))
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.down_proj.weight'\]"):
        load_pretrained(tmp_path)


def test_config_from_hf_reads_qwen2_and_llama3_fields():
    qwen = config_from_hf(
        {
            "model_type": "qwen2",
            "hidden_size": 896,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "intermediate_size": 4864,
            "vocab_size": 151936,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
        }
    )
    assert (qwen.head_dim, qwen.attention_bias, qwen.tie_word_embeddings) == (64, True, True)
    llama = config_from_hf(
        {
            "model_type": "llama",
            "hidden_size": 2048,
            "num_hidden_layers": 16,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 64,
            "intermediate_size": 8192,
            "vocab_size": 128256,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        }
    )
    assert llama.rope_scaling == RopeScaling(rope_type="llama3", factor=32.0)
    assert not llama.attention_bias


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model_type": "mixtral"}, "model_type"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
    ],
)
def test_config_from_hf_rejects_what_it_cannot_run(change, match):
    hf = config_to_hf(ModelConfig()) | change
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_logits_match_transformers(tmp_path):
    """The strongest check of the conventions (RoPE halves, GQA head order, biases, llama3
    scaling): the same checkpoint in Hugging Face transformers. Skipped where it is absent."""
    transformers = pytest.importorskip("transformers")
    for i, config in enumerate(CONFIGS.values()):
        model = random_model(config, seed=4)
        save_pretrained(model, tmp_path / str(i))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path / str(i), attn_implementation="eager"
            )
        with torch.no_grad():
            expected = hf(torch.tensor([TOKENS])).logits[0].float()
        torch.testing.assert_close(model.dense_logits(TOKENS), expected, rtol=1e-4, atol=1e-4)
