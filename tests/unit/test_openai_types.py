"""OpenAI request parsing and its mapping to the engine's SamplingParams."""

import msgspec
import pytest

from proto.messages import SamplingParams
from services.frontend.openai_types import (
    FieldError,
    RequestLimits,
    chat_decoder,
    chat_messages,
    check_features,
    check_limits,
    check_tools,
    completion_decoder,
    completion_prompt,
    sampling_params,
    stop_strings,
    uses_tools,
)
from shared.errors import InvalidRequest


def chat(**fields):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return chat_decoder.decode(msgspec.json.encode(body))


def completion(**fields):
    body = {"model": "m", "prompt": "hi", **fields}
    return completion_decoder.decode(msgspec.json.encode(body))


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
        ({"top_logprobs": 2}, 5, 5, "top_logprobs needs logprobs"),
        ({"logit_bias": {"x": 1}}, 5, 5, "keys are token ids"),
        ({"logit_bias": {"1000": 1}}, 5, 5, "outside the vocabulary"),
        ({"stop_token_ids": [1000]}, 5, 5, "outside the vocabulary"),
    ],
)
def test_invalid_sampling_is_refused(fields, max_tokens, prompt_len, match):
    with pytest.raises(InvalidRequest, match=match):
        sampling_params(chat(**fields), max_tokens, prompt_len, 100, vocab_size=1000)


def test_engine_features_map_to_sampling_params():
    body = chat(
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.2,
        logit_bias={"7": 5, "9": -100},
        logprobs=True,
        top_logprobs=3,
        stop_token_ids=[4],
    )
    assert sampling_params(body, 10, 5, 100, vocab_size=1000) == SamplingParams(
        max_tokens=10,
        stop_token_ids=[4],
        presence_penalty=0.5,
        frequency_penalty=-0.25,
        repetition_penalty=1.2,
        logit_bias={7: 5.0, 9: -100.0},
        logprobs=3,
    )
    assert sampling_params(chat(logprobs=True), 10, 5, 100).logprobs == 0
    assert sampling_params(chat(logprobs=False), 10, 5, 100).logprobs is None
    assert sampling_params(completion(logprobs=2), 10, 5, 100).logprobs == 2


ALL = ["logit_bias", "logprobs", "penalties", "structured_outputs"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (chat(logprobs=True), "logprobs"),
        (completion(logprobs=0), "logprobs"),
        (chat(presence_penalty=0.1), "presence_penalty"),
        (chat(frequency_penalty=0.1), "frequency_penalty"),
        (chat(repetition_penalty=1.1), "repetition_penalty"),
        (chat(logit_bias={"1": 1}), "logit_bias"),
        (chat(response_format={"type": "json_object"}), "response_format"),
    ],
)
def test_a_field_the_engine_cannot_honour_is_refused_not_ignored(body, param):
    with pytest.raises(FieldError, match="not supported by the engine serving 'm'") as caught:
        check_features(body, "m", [])
    assert caught.value.param == param
    check_features(body, "m", ALL)


def test_plain_requests_need_no_feature():
    for body in (
        chat(),
        chat(logprobs=False, presence_penalty=0, repetition_penalty=1.0, logit_bias={}),
        chat(response_format={"type": "text"}, tools=[], tool_choice="none"),
        chat(tools=[{"type": "function", "function": {"name": "f"}}]),  # check_tools' call
        completion(logprobs=None),
    ):
        check_features(body, "m", [])


def test_tools_need_a_template_that_renders_them_and_auto_or_none():
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with_tools = "{% for t in tools %}{{ t }}{% endfor %}"
    check_tools(chat(tools=[tool]), with_tools)
    check_tools(chat(tools=[tool], tool_choice="auto"), with_tools)
    check_tools(chat(tools=[tool], tool_choice="none"), "no tools here")  # never rendered
    with pytest.raises(FieldError, match="does not render tools") as caught:
        check_tools(chat(tools=[tool]), "{{ messages }}")
    assert caught.value.param == "tools"
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        with pytest.raises(FieldError, match="only") as caught:
            check_tools(chat(tools=[tool], tool_choice=choice), with_tools)
        assert caught.value.param == "tool_choice"
    with pytest.raises(FieldError, match="tool_choice needs tools"):
        check_tools(chat(tool_choice="required"), with_tools)
    with pytest.raises(FieldError, match="chat completions"):
        check_tools(completion(tools=[tool]), with_tools)
    assert uses_tools(chat(tools=[tool]))
    assert not uses_tools(chat(tools=[tool], tool_choice="none"))


def test_tool_turns_reach_the_template():
    body = chat(
        messages=[
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        ]
    )
    messages = chat_messages(body)
    assert messages[1]["tool_calls"] == [
        {"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}
    ]
    assert messages[2] == {"role": "tool", "content": "sunny", "tool_call_id": "c1"}


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"n": 17}, "n"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"1": 101}}, r"logit_bias\[\.\.\.\]"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
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


def test_a_list_of_ids_with_text_in_it_is_refused_before_it_is_tokenized():
    """check_limits reads a list that starts with an id as ids (it does not walk it, on
    every request); such a list with text in it is refused as it is turned into a prompt,
    which comes before any tokenizing, so the text's length never matters."""
    body = completion(prompt=[1, "g" * 11])
    check_limits(body, LIMITS)
    with pytest.raises(InvalidRequest, match="only token ids"):
        completion_prompt(body)


def test_echo_and_suffix_are_refused_rather_than_ignored():
    with pytest.raises(FieldError, match="echo"):
        completion_prompt(completion(echo=True))
    with pytest.raises(FieldError, match="suffix"):
        completion_prompt(completion(suffix="end"))


def test_best_of_must_equal_n():
    check_limits(chat(n=3, best_of=3), RequestLimits())
    with pytest.raises(FieldError, match="best_of") as caught:
        check_limits(chat(n=2, best_of=4), RequestLimits())
    assert caught.value.param == "best_of"


def test_response_format_becomes_a_json_schema():
    assert sampling_params(chat(response_format={"type": "text"}), 5, 5, 100).json_schema is None
    assert (
        sampling_params(chat(response_format={"type": "json_object"}), 5, 5, 100).json_schema
        == '{"type":"object"}'
    )
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    assert msgspec.json.decode(sampling_params(body, 5, 5, 100).json_schema) == schema
    with pytest.raises(FieldError, match="schema") as caught:
        sampling_params(chat(response_format={"type": "json_schema"}), 5, 5, 100)
    assert caught.value.param == "response_format"
