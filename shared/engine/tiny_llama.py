"""A small random-weight Llama written as a Hugging Face model directory, so that engines that
load checkpoints from disk (vLLM) serve a real transformer with no download.

The weights are ``shared.engine.checkpoint.random_model``'s: the same seed and shape give the
torch engine's ``--model-path random`` model, so both engines can be compared token for token.
The directory holds ``config.json``, ``model.safetensors``, ``generation_config.json`` and the
bundled tokenizer's files.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from shared.engine.checkpoint import random_model, save_pretrained
from shared.engine.model import ModelConfig
from shared.tokenizer.tokenizer import builtin_dir

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def write_tiny_llama(
    path: str | Path,
    config: ModelConfig | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write ``random_model(config, seed)`` and the bundled tokenizer into directory ``path``
    (created) and return it. ``config`` defaults to ``ModelConfig()``, whose vocabulary is the
    bundled tokenizer's. The model's ``bos``/``eos`` ids are the tokenizer's."""
    root = Path(path)
    model = random_model(config or ModelConfig(), seed, dtype=_DTYPES[dtype])
    save_pretrained(model, root)
    tokenizer_dir = builtin_dir()
    for name in _TOKENIZER_FILES:
        (root / name).write_bytes(tokenizer_dir.joinpath(name).read_bytes())
    generation = json.loads((root / "generation_config.json").read_text())
    hf = json.loads((root / "config.json").read_text())
    hf["bos_token_id"] = generation.get("bos_token_id")
    hf["eos_token_id"] = generation.get("eos_token_id")
    (root / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return root


def cached_tiny_llama(
    config: ModelConfig, *, seed: int, dtype: str, cache_dir: str | Path | None = None
) -> Path:
    """The directory of ``write_tiny_llama(config, seed, dtype)`` under ``cache_dir`` (the
    system temp directory by default), written once: a second worker on the host, or a
    restart, reuses it. Written beside its final name and renamed, so a concurrent writer
    never exposes a half-written model."""
    shape = hashlib.blake2b(repr(config).encode(), digest_size=8).hexdigest()
    key = f"{seed}-{dtype}-{shape}"
    root = Path(cache_dir or tempfile.gettempdir()) / f"baton-tiny-llama-{key}"
    if (root / "config.json").is_file():
        return root
    staging = Path(tempfile.mkdtemp(prefix=f"{root.name}.", dir=root.parent))
    try:
        write_tiny_llama(staging, config, seed=seed, dtype=dtype)
        try:
            os.rename(staging, root)
        except OSError:  # another process renamed its copy first: use that one
            if not (root / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("tiny llama written path=%s", root)
    return root
