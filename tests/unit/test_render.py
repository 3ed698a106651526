"""Response bodies and SSE events have OpenAI's shape."""

import json

from proto.messages import TokenLogprobs
from services.frontend.render import (
    DONE,
    Choice,
    LogprobsRenderer,
    Renderer,
    merge_logprobs,
    usage,
)
from services.frontend.tool_calls import ToolCall
from shared.errors import Overloaded


def event(data: bytes) -> dict:
    assert data.startswith(b"data: ")
    assert data.endswith(b"\n\n")
    return json.loads(data[6:-2])


def test_chat_text_event_is_a_chunk_with_a_content_delta():
    r = Renderer("chat", "abc", "m", include_usage=True)
    body = event(r.text_event('say "hi"\n'))
    assert body["id"] == "chatcmpl-abc"
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"] == [
        {"index": 0, "delta": {"content": 'say "hi"\n'}, "logprobs": None, "finish_reason": None}
    ]
    assert body["usage"] is None


def test_chat_stream_opens_with_role_and_closes_with_finish_and_usage():
    r = Renderer("chat", "abc", "m", include_usage=True)
    assert event(r.first_event())["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert event(r.finish_event("length"))["choices"][0]["finish_reason"] == "length"
    final = event(r.usage_event(usage(3, 4, 1)))
    assert final["choices"] == []
    assert final["usage"]["total_tokens"] == 7
    assert final["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    assert DONE == b"data: [DONE]\n\n"


def test_completion_events_carry_text():
    r = Renderer("completion", "x", "m", include_usage=False)
    assert r.first_event() == b""
    body = event(r.text_event("abc"))
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "abc"
    assert "usage" not in body


def test_full_response_and_error_shape():
    r = Renderer("chat", "abc", "m", include_usage=False)
    body = json.loads(r.full_response([Choice("hello", "stop")], usage(1, 2, 0)))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    error = event(r.error_event(Overloaded("busy")))["error"]
    assert error == {"message": "busy", "type": "overloaded_error", "param": None, "code": 503}


def test_several_choices_are_indexed():
    r = Renderer("chat", "abc", "m", include_usage=False)
    opened = r.first_event(3).split(b"\n\n")[:-1]
    assert [event(e + b"\n\n")["choices"][0]["index"] for e in opened] == [0, 1, 2]
    assert event(r.text_event("x", 2))["choices"][0] == {
        "index": 2,
        "delta": {"content": "x"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert event(r.finish_event("stop", 1))["choices"][0]["index"] == 1
    body = json.loads(r.full_response([Choice("a", "stop"), Choice("b", "length")], usage(1, 2, 0)))
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in body["choices"]] == [
        (0, "a", "stop"),
        (1, "b", "length"),
    ]


TEXTS = {1: "he", 2: "llo", 3: "é"}


def test_chat_logprobs_have_openai_shape():
    lp = LogprobsRenderer("chat", lambda t: TEXTS[t].encode())
    out = lp.render([1, 3], [TokenLogprobs(-0.5, [(1, -0.5), (2, -1.5)]), TokenLogprobs(-2.0)])
    assert out == {
        "content": [
            {
                "token": "he",
                "logprob": -0.5,
                "bytes": [104, 101],
                "top_logprobs": [
                    {"token": "he", "logprob": -0.5, "bytes": [104, 101]},
                    {"token": "llo", "logprob": -1.5, "bytes": [108, 108, 111]},
                ],
            },
            {"token": "é", "logprob": -2.0, "bytes": [195, 169], "top_logprobs": []},
        ]
    }
    r = Renderer("chat", "abc", "m", include_usage=False)
    assert event(r.text_event("hé", 0, out))["choices"][0]["logprobs"] == out
    assert merge_logprobs("chat", [out, out])["content"] == out["content"] * 2


def test_completion_logprobs_have_legacy_shape_with_text_offsets():
    lp = LogprobsRenderer("completion", lambda t: TEXTS[t].encode())
    first = lp.render([1, 2], [TokenLogprobs(-0.1, [(1, -0.1)]), TokenLogprobs(-0.2, [(2, -0.2)])])
    second = lp.render([3], [TokenLogprobs(-0.3, [(3, -0.3)])])
    assert merge_logprobs("completion", [first, second]) == {
        "tokens": ["he", "llo", "é"],
        "token_logprobs": [-0.1, -0.2, -0.3],
        "top_logprobs": [{"he": -0.1}, {"llo": -0.2}, {"é": -0.3}],
        "text_offset": [0, 2, 5],
    }
    assert merge_logprobs("completion", []) is None


def test_tool_calls_render_as_openai_tool_calls():
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    r = Renderer("chat", "abc", "m", include_usage=False)
    delta = event(r.tool_calls_event(1, [(0, call)]))["choices"][0]
    assert delta["index"] == 1
    assert delta["delta"]["tool_calls"] == [
        {
            "index": 0,
            "id": "call_1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }
    ]
    body = json.loads(r.full_response([Choice("\n", "tool_calls", None, [call])], usage(1, 2, 0)))
    message = body["choices"][0]["message"]
    assert message["content"] is None  # only whitespace around the call
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert body["choices"][0]["finish_reason"] == "tool_calls"


def test_a_piece_of_a_character_keeps_its_own_bytes():
    pieces = {1: "é".encode()[:1], 2: "é".encode()[1:]}
    out = LogprobsRenderer("chat", pieces.__getitem__).render([1, 2], [TokenLogprobs(-1.0)] * 2)
    assert [e["bytes"] for e in out["content"]] == [[195], [169]]
    assert [e["token"] for e in out["content"]] == ["\ufffd", "\ufffd"]
