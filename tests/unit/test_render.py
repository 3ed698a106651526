"""Response bodies and SSE events have OpenAI's shape."""

import json

from services.frontend.render import DONE, Renderer, usage
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
    body = json.loads(r.full_response("hello", "stop", usage(1, 2, 0)))
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    error = event(r.error_event(Overloaded("busy")))["error"]
    assert error == {"message": "busy", "type": "overloaded_error", "param": None, "code": 503}
