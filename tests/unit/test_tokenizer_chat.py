"""Chat templates: exact rendering of the builtin ChatML template, content parts, the sandbox."""

import pytest
import tokenizers

from shared.errors import InvalidRequest
from shared.tokenizer import Tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.load("builtin")


def with_template(source: str) -> Tokenizer:
    hf = Tokenizer.load("builtin").hf_tokenizer
    return Tokenizer(tokenizers.Tokenizer.from_str(hf.to_str()), chat_template=source)


def test_apply_chat_template_renders_chatml_with_generation_prompt(tokenizer):
    assert tokenizer.apply_chat_template(CONVERSATION) == (
        "<|startoftext|>"
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_apply_chat_template_without_generation_prompt_ends_after_last_turn(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=False)
    assert text.endswith("France?<|im_end|>\n")


def test_rendered_prompt_encodes_to_one_bos_and_its_special_tokens(tokenizer):
    ids = tokenizer.encode(tokenizer.apply_chat_template(CONVERSATION), add_special_tokens=False)
    assert ids[:2] == [1, 2]  # <|startoftext|><|im_start|>
    assert ids.count(1) == 1
    assert ids.count(3) == 2  # one <|im_end|> per turn


def test_apply_chat_template_joins_text_parts_with_newlines(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
    ]
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False) == (
        "<|startoftext|><|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([{"type": "image_url", "image_url": {"url": "x"}}], "got 'image_url'"),
        ([{"type": "text", "text": 5}], "needs a string 'text'"),
        (42, "got int"),
    ],
)
def test_apply_chat_template_rejects_non_text_content(tokenizer, content, message):
    with pytest.raises(InvalidRequest, match=message):
        tokenizer.apply_chat_template([{"role": "user", "content": content}])


def test_apply_chat_template_turns_raise_exception_into_invalid_request(tokenizer):
    with pytest.raises(InvalidRequest, match="unsupported role: wizard"):
        tokenizer.apply_chat_template([{"role": "wizard", "content": "hi"}])


def test_apply_chat_template_rejects_message_without_role(tokenizer):
    with pytest.raises(InvalidRequest, match=r"messages\[0\].role"):
        tokenizer.apply_chat_template([{"content": "hi"}])


def test_apply_chat_template_without_template_raises_invalid_request():
    tokenizer = with_template("x")
    no_template = Tokenizer(tokenizer.hf_tokenizer)
    with pytest.raises(InvalidRequest, match="no chat template"):
        no_template.apply_chat_template(CONVERSATION)


def test_chat_template_runs_in_sandbox():
    escape = with_template("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(InvalidRequest):
        escape.apply_chat_template(CONVERSATION)


def test_chat_template_tojson_does_not_html_escape_and_kwargs_pass_through():
    tokenizer = with_template("{{ tools | tojson }}|{{ messages | length }}")
    tools = [{"name": "a<b>&'c"}]
    assert tokenizer.apply_chat_template(CONVERSATION, tools=tools) == '[{"name": "a<b>&\'c"}]|2'


def test_chat_template_with_syntax_error_fails_at_load():
    with pytest.raises(ValueError, match="does not compile"):
        with_template("{% for %}")
