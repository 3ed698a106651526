"""The shipped tokenizer files: reproducible from tools/make_tokenizer.py, small, byte-level."""

import os
import subprocess
import sys
from pathlib import Path

from tokenizers import pre_tokenizers

from shared.tokenizer.byte_level import byte_to_char

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "shared" / "assets" / "tokenizer"


def test_make_tokenizer_reproduces_shipped_files_byte_for_byte(tmp_path):
    # Another hash seed than this process's, so set/dict order cannot leak into the output.
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, str(ROOT / "tools" / "make_tokenizer.py"), "--out", str(tmp_path)],
        check=True,
        env=env,
        capture_output=True,
        timeout=60,
    )
    built = sorted(p.name for p in tmp_path.iterdir())
    assert built == sorted(p.name for p in ASSETS.iterdir())
    for name in built:
        assert (tmp_path / name).read_bytes() == (ASSETS / name).read_bytes(), name


def test_byte_alphabet_matches_tokenizers_byte_level():
    assert len(set(byte_to_char())) == 256
    assert set(byte_to_char()) == set(pre_tokenizers.ByteLevel.alphabet())
    text = "".join(chr(c) for c in range(1, 0x800)) + "😀"
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(
        text
    )
    assert "".join(piece for piece, _ in pieces) == "".join(
        byte_to_char()[b] for b in text.encode()
    )
