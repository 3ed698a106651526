"""Tokenizer: loading the builtin and local directories, encode/decode, eos ids, word ids."""

import json
import shutil
from pathlib import Path

import pytest

from shared.tokenizer import Tokenizer
from shared.tokenizer.tokenizer import builtin_dir

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "tokenizer"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load("builtin")


def test_load_builtin_reports_vocab_and_special_ids(tokenizer):
    assert tokenizer.vocab_size == 6144
    assert tokenizer.bos_token == "<|startoftext|>"
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_ids == [3, 0]  # <|im_end|>, then generation_config's <|endoftext|>
    assert tokenizer.model_max_length == 32768


def test_builtin_dir_is_package_data_of_shared():
    assert Path(str(builtin_dir())) == ASSETS
    assert sorted(p.name for p in ASSETS.iterdir()) == [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sum(p.stat().st_size for p in ASSETS.iterdir()) < 1_000_000


def test_encode_adds_bos_only_with_special_tokens(tokenizer):
    assert tokenizer.encode("Hello world") == [1, 5647, 569]
    assert tokenizer.encode("Hello world", add_special_tokens=False) == [5647, 569]


def test_encode_reads_special_tokens_written_in_text(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    assert ids == [2, 3380, 14, 108, 109, 3]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
        "  leading and trailing spaces  \n\n\ttabs",
        "naïve café — 日本語 🙂 and 12345 numbers",
        "the " * 500,
    ],
)
def test_encode_gives_the_ids_of_the_plain_encode(tokenizer, text):
    hf = tokenizer.hf_tokenizer
    for special in (True, False):
        expected = hf.encode(text, add_special_tokens=special).ids
        assert tokenizer.encode(text, add_special_tokens=special) == expected


def test_encode_spells_multibyte_characters_with_byte_tokens(tokenizer):
    assert tokenizer.encode("你好😀", add_special_tokens=False) == [4984, 5408, 156, 132]
    # Ids 4-259 are the bytes: any text encodes, and an unseen character falls back to them.
    assert tokenizer.encode("\x00\x7f", add_special_tokens=False) == [4, 4 + 0x7F]


@pytest.mark.parametrize(
    "text",
    [
        "The user asked a question.",
        "def f(x):\n    return x + 1\n",
        "emoji 😀👍🏽 and flags 🇯🇵",
        "你好\uff0c世界\uff01这是中文。日本語のテキスト",  # with fullwidth , and !
        "naïve café, straße; привет",
        "\t tabs,  double  spaces\r\n",
    ],
)
def test_decode_round_trips_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text


def test_decode_skips_special_tokens_unless_asked(tokenizer):
    ids = [1, 2, 3380, 14, 108, 109, 3]
    assert tokenizer.decode(ids) == "user\nhi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|startoftext|><|im_start|>user\nhi<|im_end|>"
    )


def test_word_token_ids_are_letters_after_at_most_one_space(tokenizer):
    word_ids = tokenizer.word_token_ids()
    assert 5000 < len(word_ids) < tokenizer.vocab_size
    assert word_ids == sorted(set(word_ids))
    for token_id in word_ids:
        text = tokenizer.decode([token_id], skip_special_tokens=False)
        assert text.removeprefix(" ").isalpha(), (token_id, text)
    assert 569 in word_ids  # " world"
    assert 4 + ord("a") in word_ids
    assert not {0, 1, 2, 3, 4 + ord(" "), 4 + ord("."), 4 + ord("7")} & set(word_ids)


def copy_builtin(tmp_path: Path) -> Path:
    model_dir = tmp_path / "model"
    shutil.copytree(ASSETS, model_dir)
    return model_dir


def test_load_local_dir_reads_config_and_generation_config(tmp_path):
    model_dir = copy_builtin(tmp_path)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|endoftext|>", "special": True}  # AddedToken form
    config["model_max_length"] = int(1e30)  # Hugging Face's "no limit"
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}))
    (model_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")

    tokenizer = Tokenizer.load(str(model_dir))

    assert tokenizer.eos_token_ids == [0, 3]
    assert tokenizer.model_max_length is None
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "hi!"


def test_load_local_dir_without_configs_has_no_eos_or_template(tmp_path):
    model_dir = tmp_path / "bare"
    model_dir.mkdir()
    shutil.copy(ASSETS / "tokenizer.json", model_dir)

    tokenizer = Tokenizer.load(str(model_dir))

    assert tokenizer.eos_token_ids == []
    assert tokenizer.bos_token_id is None
    assert tokenizer.chat_template is None
    assert tokenizer.vocab_size == 6144


def test_load_dir_without_tokenizer_json_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no tokenizer\.json"):
        Tokenizer.load(str(tmp_path))
