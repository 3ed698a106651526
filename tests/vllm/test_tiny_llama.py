"""The random Llama written as a Hugging Face directory is the torch engine's random model."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from shared.engine.checkpoint import load_pretrained, random_model  # noqa: E402
from shared.engine.model import ModelConfig  # noqa: E402
from shared.engine.tiny_llama import cached_tiny_llama, write_tiny_llama  # noqa: E402
from shared.engine.vllm_build import kv_bytes_per_token, vllm_block_size  # noqa: E402

SMALL = ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def test_write_tiny_llama_writes_a_loadable_checkpoint_with_tokenizer(tmp_path):
    root = write_tiny_llama(tmp_path / "m", SMALL, seed=3)
    names = {p.name for p in root.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    hf = json.loads((root / "config.json").read_text())
    assert hf["architectures"] == ["LlamaForCausalLM"]
    assert hf["eos_token_id"] == [3, 0]
    loaded = load_pretrained(root)
    drawn = random_model(SMALL, 3)
    for name, tensor in drawn.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_cached_tiny_llama_writes_once(tmp_path):
    first = cached_tiny_llama(SMALL, seed=1, dtype="float32", cache_dir=tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    again = cached_tiny_llama(SMALL, seed=1, dtype="float32", cache_dir=tmp_path)
    assert again == first
    assert (again / "model.safetensors").stat().st_mtime_ns == mtime
    assert cached_tiny_llama(SMALL, seed=2, dtype="float32", cache_dir=tmp_path) != first
    assert [p.name for p in tmp_path.iterdir() if "." in p.name] == []  # no staging left


def test_vllm_block_size_is_a_multiple_of_32_and_of_batons():
    assert [vllm_block_size(n) for n in (16, 32, 48, 64, 8)] == [32, 32, 96, 64, 32]


def test_kv_bytes_per_token_counts_k_and_v_of_every_layer():
    hf = {"num_attention_heads": 8, "num_key_value_heads": 2, "hidden_size": 256}
    assert kv_bytes_per_token({**hf, "num_hidden_layers": 4}, "float32") == 2 * 4 * 2 * 32 * 4
