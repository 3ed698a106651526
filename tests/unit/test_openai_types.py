"""OpenAI request parsing and its mapping to the engine's SamplingParams."""

import msgspec
import pytest

from proto.messages import SamplingParams
from services.frontend.openai_types import (
    FieldError,
    RequestLimits,
    chat_decoder,
    chat_messages,
    check_limits,
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
        ({"min_tokens": 9}, 5, 5, "min_tokens"),
        ({"logprobs": True}, 5, 5, "logprobs"),
    ],
)
def test_invalid_sampling_is_refused(fields, max_tokens, prompt_len, match):
    with pytest.raises(InvalidRequest, match=match):
        sampling_params(chat(**fields), max_tokens, prompt_len, 100)


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"n": 3}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"priority": 10**7}, "priority"),
        ({"slo_ttft_ms": 0}, "slo_ttft_ms"),
        ({"messages": []}, "messages"),
    ],
)
def test_out_of_range_fields_fail_on_decode_with_their_path(fields, path):
    with pytest.raises(msgspec.ValidationError, match=rf"\$\.{path}`"):
        chat(**fields)


def test_wrong_types_fail_with_the_field_path():
    with pytest.raises(msgspec.ValidationError, match=r"\$\.max_tokens"):
        chat_decoder.decode(b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": "ten"}')


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


LIMITS = RequestLimits(max_messages=2, max_prompt_chars=10, max_stop_strings=1)


def completion(**fields):
    body = {"model": "m", "prompt": "hi", **fields}
    return completion_decoder.decode(msgspec.json.encode(body))


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(messages=[{"role": "user", "content": "a"}] * 3), "messages"),
        (
            chat(messages=[{"role": "user", "content": [{"type": "text", "text": "b" * 11}]}]),
            "messages",
        ),
        (completion(prompt="c" * 11), "prompt"),
        (completion(prompt=["d" * 11]), "prompt"),
        (chat(stop=["x", "y"]), "stop"),
    ],
)
def test_check_limits_names_the_field_over_its_limit(body, param):
    with pytest.raises(FieldError) as caught:
        check_limits(body, LIMITS)
    assert caught.value.param == param


def test_check_limits_passes_requests_at_the_limits():
    check_limits(chat(messages=[{"role": "user", "content": "e" * 5}] * 2, stop="z"), LIMITS)
    check_limits(completion(prompt="f" * 10), LIMITS)
    check_limits(completion(prompt=list(range(1000))), LIMITS)  # token ids: the context bounds them


def test_echo_is_refused_rather_than_ignored():
    with pytest.raises(FieldError, match="echo"):
        completion_prompt(completion(echo=True))
