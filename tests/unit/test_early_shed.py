"""The connection-level shed's reading of raw request bytes: only one whole, plain completion
request is answered there; everything else is left to aiohttp."""

import json

import pytest

from services.frontend.early_shed import EarlyShed, is_supported, plain_completion, reply_429

LIMIT = 16 * 1024


def request(*headers: str, body: bytes = b"{}", line: str = "POST /v1/completions HTTP/1.1"):
    head = "\r\n".join([line, "Host: x", *headers]) + "\r\n\r\n"
    return head.encode() + body


def test_a_whole_completion_request_is_plain():
    data = request("Content-Type: application/json", "Content-Length: 2")
    assert plain_completion(data, LIMIT) is not None
    chat = request("content-length: 2", line="POST /v1/chat/completions HTTP/1.1")
    found = plain_completion(chat, LIMIT)
    assert found is not None
    assert not found.close
    assert found.bearer is None


def test_close_and_the_bearer_key_are_read():
    found = plain_completion(
        request("Content-Length: 2", "Connection: Close", "Authorization: Bearer  k1 "), LIMIT
    )
    assert found is not None
    assert found.close
    assert found.bearer == "k1"


def test_the_path_headers_and_body_are_kept_for_the_check():
    data = request("Content-Length: 2", "X-Baton-SLO-TTFT-Ms: 5")
    found = plain_completion(data, LIMIT)
    assert found is not None
    assert (found.is_chat, found.body) == (False, b"{}")
    assert ("X-Baton-SLO-TTFT-Ms", "5") in found.headers
    chat = plain_completion(
        request("Content-Length: 2", line="POST /v1/chat/completions HTTP/1.1"), LIMIT
    )
    assert chat is not None
    assert chat.is_chat


def test_the_check_answers_only_while_it_is_on_and_sheds():
    checked: list[bytes] = []
    state = {"lagging": False, "checking": False, "shed": True}

    def check(request):
        checked.append(request.body)
        return (b'{"error": {}}', 3) if state["shed"] else None

    early = EarlyShed(
        lambda: state["lagging"],
        lambda: b"lag",
        max_header_bytes=LIMIT,
        is_checking=lambda: state["checking"],
        check=check,
    )
    data = request("Content-Length: 2")
    assert not early.is_active()
    assert early.answer(data) is None
    state["checking"] = True
    assert early.is_active()
    reply, close = early.answer(data)
    assert not close
    assert b"Retry-After: 3" in reply
    assert reply.endswith(b'{"error": {}}')
    state["shed"] = False
    assert early.answer(data) is None  # passed: aiohttp serves it
    state["lagging"] = True  # the lag sheds unread, before any check
    reply, _ = early.answer(data)
    assert reply.endswith(b"lag")
    assert checked == [b"{}", b"{}"]


def test_while_the_loop_lags_only_the_drawn_requests_are_shed_and_the_others_say_so():
    draws = iter([True, False])
    early = EarlyShed(
        lambda: True, lambda: b"lag", max_header_bytes=LIMIT, draws_shed=lambda: next(draws)
    )
    data = request("Content-Length: 2")
    reply, _ = early.answer(data)
    assert reply.endswith(b"lag")
    assert not early.passed_draw
    assert early.answer(data) is None  # not drawn: aiohttp serves it
    assert early.passed_draw  # and the handler does not draw for it again
    assert early.answer(b"GET /health HTTP/1.1\r\n\r\n") is None
    assert not early.passed_draw  # not looked at: the handler decides


@pytest.mark.parametrize(
    "data",
    [
        request("Content-Length: 2", line="GET /v1/models HTTP/1.1"),
        request("Content-Length: 2", line="POST /v1/completions?x=1 HTTP/1.1"),
        request("Content-Length: 2", line="POST /v1/completions HTTP/1.0"),
        request("Content-Length: 5"),  # the body is still on its way
        request("Content-Length: 2", body=b"{}POST"),  # a second request behind it
        request(),  # no length
        request("Content-Length: 2", "Content-Length: 2"),
        request("Content-Length: -2"),
        request("Transfer-Encoding: chunked", body=b"2\r\n{}\r\n0\r\n\r\n"),
        request("Content-Length: 2", "Expect: 100-continue"),
        request("Content-Length: 2", "X-Baton-Priority: high"),
        request("Content-Length: 2", "X-Baton-Priority: -3"),
        request("Content-Length: 2", "not a header"),
        b"POST /v1/completions HTTP/1.1\r\nContent-Length: 2\r\n",  # headers not ended
    ],
)
def test_anything_else_is_left_to_aiohttp(data):
    assert plain_completion(data, LIMIT) is None


def test_headers_past_the_limit_are_left_to_aiohttp():
    data = request("Content-Length: 2", "X-Pad: " + "a" * 200)
    assert plain_completion(data, 100) is None
    assert plain_completion(data, LIMIT) is not None


def test_a_low_priority_request_is_plain():
    assert plain_completion(request("Content-Length: 2", "X-Baton-Priority: low"), LIMIT)


def test_the_reply_is_a_whole_http_response():
    body = json.dumps({"error": {"message": "m", "type": "rate_limit_error"}}).encode()
    reply = reply_429(body, close=True)
    head, _, rest = reply.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 429 Too Many Requests"
    assert b"Retry-After: 1" in lines
    assert b"Connection: close" in lines
    assert f"Content-Length: {len(body)}".encode() in lines
    assert rest == body
    assert b"Connection" not in reply_429(body, close=False)


def test_the_installed_aiohttp_has_what_the_early_answer_reads():
    # Where an aiohttp upgrade renames these fields, the frontend falls back to answering
    # through aiohttp (correct, at about twice the CPU a shed): this says so in CI.
    assert is_supported()


def test_both_shed_series_are_exported_from_the_start():
    """A dashboard's rate() needs the zero before the first shed, on each path."""
    from prometheus_client import generate_latest

    from services.frontend.metrics import FrontendMetrics

    text = generate_latest(FrontendMetrics(60.0).registry).decode()
    for where in ("connection", "handler"):
        assert f'baton_frontend_overload_sheds_total{{where="{where}"}} 0.0' in text


def test_a_kept_child_counts_in_the_exported_series():
    from prometheus_client import generate_latest

    from services.frontend.metrics import FrontendMetrics

    metrics = FrontendMetrics(60.0)
    first = metrics.child(metrics.requests, "m", "completions", "429")
    assert metrics.child(metrics.requests, "m", "completions", "429") is first
    first.inc()
    metrics.child(metrics.requests, "m", "completions", "429").inc()
    metrics.child(metrics.shed_latency, "frontend").observe(0.001)
    text = generate_latest(metrics.registry).decode()
    assert (
        'baton_frontend_requests_total{endpoint="completions",model="m",status="429"} 2.0' in text
    )
    assert 'baton_frontend_shed_seconds_count{stage="frontend"} 1.0' in text


@pytest.mark.parametrize(
    ("prompt", "tokens"),
    [
        ("x" * 400, 101),  # about four characters a token
        (list(range(200)), 200),  # token ids: exact, without walking them
        ([list(range(30))], 30),
        (["x" * 40], 11),
    ],
)
def test_the_early_check_guesses_a_prompt_s_length_without_tokenizing(prompt, tokens):
    import msgspec

    from services.frontend.app import _approx_prompt_tokens
    from services.frontend.openai_types import completion_decoder

    body = completion_decoder.decode(msgspec.json.encode({"model": "m", "prompt": prompt}))
    assert _approx_prompt_tokens(body) == tokens
