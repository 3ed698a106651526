"""OpenAI request parsing and its mapping to the engine's SamplingParams."""

import msgspec
import pytest

from proto.messages import SamplingParams
from services.frontend.openai_types import (
    chat_decoder,
    chat_messages,
    completion_decoder,
    completion_prompt,
    sampling_params,
    stop_strings,
)
from shared.errors import InvalidRequest


def chat(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return chat_decoder.decode(msgspec.json.encode(body))


def test_max_tokens_defaults_to_the_room_left_in_the_context():
    assert sampling_params(chat(), None, 100, 1000) == SamplingParams(max_tokens=900)


def test_fields_map_to_sampling_params():
    body = chat(temperature=0, top_p=0.5, seed=7, ignore_eos=True, min_tokens=2)
    assert sampling_params(body, 10, 5, 100) == SamplingParams(
        max_tokens=10, min_tokens=2, temperature=0.0, top_p=0.5, seed=7, ignore_eos=True
    )


@pytest.mark.parametrize(
    ("fields", "max_tokens", "prompt_len", "match"),
    [
        ({}, 0, 5, "max_tokens must be >= 1"),
        ({}, 96, 5, "exceeds the model's context of 100"),
        ({}, None, 100, "context is 100"),
        ({"n": 3}, 5, 5, "n=1"),
        ({"temperature": 2.5}, 5, 5, "temperature"),
        ({"top_p": 0}, 5, 5, "top_p"),
        ({"min_tokens": 9}, 5, 5, "min_tokens"),
        ({"presence_penalty": 0.5}, 5, 5, "not supported"),
        ({"logprobs": True}, 5, 5, "logprobs"),
    ],
)
def test_invalid_sampling_is_refused(fields, max_tokens, prompt_len, match):
    with pytest.raises(InvalidRequest, match=match):
        sampling_params(chat(**fields), max_tokens, prompt_len, 100)


def test_wrong_types_fail_with_the_field_path():
    with pytest.raises(msgspec.ValidationError, match=r"\$\.max_tokens"):
        chat_decoder.decode(b'{"model": "m", "messages": [], "max_tokens": "ten"}')


def test_text_parts_are_joined_and_images_refused():
    body = chat(
        messages=[
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            }
        ]
    )
    assert chat_messages(body) == [{"role": "user", "content": "ab"}]
    image = chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}])
    with pytest.raises(InvalidRequest, match="only text parts"):
        chat_messages(image)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("hello", "hello"), ([1, 2, 3], [1, 2, 3]), (["only"], "only"), ([[4, 5]], [4, 5])],
)
def test_completion_prompt_forms(prompt, expected):
    body = completion_decoder.decode(msgspec.json.encode({"model": "m", "prompt": prompt}))
    assert completion_prompt(body) == expected


def test_several_prompts_are_refused():
    body = completion_decoder.decode(msgspec.json.encode({"model": "m", "prompt": ["a", "b"]}))
    with pytest.raises(InvalidRequest, match="one prompt"):
        completion_prompt(body)


def test_stop_strings():
    assert stop_strings(None) == []
    assert stop_strings("x") == ["x"]
    with pytest.raises(InvalidRequest):
        stop_strings([""])
    with pytest.raises(InvalidRequest):
        stop_strings(["s"] * 17)
