"""The sampling surface end to end: ``n`` choices on every engine; log-probabilities, penalties
and logit bias on the torch engine (aggregated and with the prefill remote: the first token's
report crosses from the prefill worker); refused with a 400 by an engine that cannot honour
them (the simulated one), never ignored."""

import json
import shutil

import aiohttp
import openai
import pytest

from shared.tokenizer import Tokenizer
from shared.tokenizer.tokenizer import builtin_dir
from tests.e2e.args import start_remote_prefill

MODEL = "baton-sim"
TORCH = ("--engine", "torch", "--num-kv-blocks", "512", "--max-model-len", "2048")
PROMPTS = [[11, 12, 13], list(range(100, 140)), [7] * 17]


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.json()


async def sse(session: aiohttp.ClientSession, url: str, body: dict) -> list[dict]:
    events = []
    async with session.post(url, json={**body, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: "):
                data = line[6:].strip()
                events.append({"done": True} if data == b"[DONE]" else json.loads(data))
    return events


async def test_n_choices_stream_and_collect_on_the_simulated_engine(start_cluster):
    cluster = await start_cluster(num_workers=2)
    url = f"{cluster.api}/chat/completions"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "three ways"}],
        "n": 3,
        "max_tokens": 7,
        "ignore_eos": True,
        "seed": 40,
    }
    async with aiohttp.ClientSession() as session:
        status, whole = await post(session, url, body)
        assert status == 200, whole
        assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
        assert [c["finish_reason"] for c in whole["choices"]] == ["length"] * 3
        assert whole["usage"]["completion_tokens"] == 21
        texts = [c["message"]["content"] for c in whole["choices"]]
        assert len(set(texts)) == 3  # seeds 40, 41, 42 draw differently
        # Choice 1 is what a single request with the next seed gives.
        _, single = await post(session, url, {**body, "n": 1, "seed": 41})
        assert single["choices"][0]["message"]["content"] == texts[1]

        events = await sse(session, url, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == {"done": True}
    streamed = ["", "", ""]
    finishes: dict[int, str] = {}
    for event in events[:-2]:
        for choice in event["choices"]:
            streamed[choice["index"]] += choice["delta"].get("content", "")
            if choice["finish_reason"]:
                finishes[choice["index"]] = choice["finish_reason"]
    assert streamed == texts
    assert finishes == {0: "length", 1: "length", 2: "length"}
    assert events[-2]["usage"]["completion_tokens"] == 21


async def test_the_simulated_engine_refuses_what_it_cannot_do(start_cluster):
    cluster = await start_cluster(num_workers=1)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    cases = [
        ({**chat, "logprobs": True}, "logprobs"),
        ({**chat, "presence_penalty": 0.5}, "presence_penalty"),
        ({**chat, "repetition_penalty": 1.3}, "repetition_penalty"),
        ({**chat, "logit_bias": {"5": 10}}, "logit_bias"),
        ({**chat, "response_format": {"type": "json_object"}}, "response_format"),
        ({**chat, "tools": [tool]}, "tools"),
        ({**chat, "n": 2, "best_of": 3}, "best_of"),
    ]
    async with aiohttp.ClientSession() as session:
        for body, param in cases:
            status, payload = await post(session, f"{cluster.api}/chat/completions", body)
            assert status == 400, body
            assert payload["error"]["param"] == param
            assert payload["error"]["type"] == "invalid_request_error"
        # Fields every engine honours pass.
        plain = {**chat, "response_format": {"type": "text"}, "stop_token_ids": [3]}
        status, payload = await post(session, f"{cluster.api}/chat/completions", plain)
        assert status == 200, payload


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("torch")
    return Tokenizer.load("builtin")


def completions(api: str, prompt: list[int], **fields):
    sdk = openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120)
    return sdk.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, temperature=0, extra_body=fields
    )


@pytest.mark.timeout(300)
async def test_torch_logprobs_penalties_and_bias_agree_aggregated_and_disaggregated(
    start_cluster, tokenizer
):
    aggregated = await start_cluster(num_workers=1, worker_args=TORCH, namespace="sampagg")
    disagg = await start_remote_prefill(
        start_cluster, (*TORCH, "--kv-transfer", "shm"), namespace="sampdis"
    )
    forced = tokenizer.word_token_ids()[3]
    for prompt in PROMPTS:
        outs = []
        for cluster in (aggregated, disagg):
            got = completions(cluster.api, prompt, logprobs=3, ignore_eos=True)
            choice = got.choices[0]
            lp = choice.logprobs
            assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
            # Greedy: the chosen token is the likeliest, so it heads the alternatives.
            for token, logprob, top in zip(
                lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True
            ):
                assert logprob <= 0
                assert 1 <= len(top) <= 3  # keyed by text: two tokens may read the same
                assert max(top.values()) == pytest.approx(logprob, abs=1e-5)
                assert token in top
            biased = completions(
                cluster.api, prompt, logit_bias={str(forced): 100}, ignore_eos=True
            ).choices[0]
            penalised = completions(
                cluster.api, prompt, presence_penalty=2, repetition_penalty=1.5, ignore_eos=True
            ).choices[0]
            outs.append((choice.text, lp.token_logprobs, biased.text, penalised.text))
        (text, logprobs, biased, penalised), other = outs
        assert other[0] == text
        assert other[2] == biased
        assert other[3] == penalised
        assert other[1] == pytest.approx(logprobs, abs=1e-4)
        assert biased == tokenizer.decode([forced] * 4)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{disagg.url}/metrics") as resp:
            metrics = await resp.text()
        chat_url = f"{disagg.api}/chat/completions"
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 3,
            "logprobs": True,
            "top_logprobs": 2,
            "ignore_eos": True,
            "temperature": 0,
        }
        events = await sse(session, chat_url, body)
    remote = [m for m in metrics.splitlines() if m.startswith("baton_frontend_remote_prefills")]
    assert float(remote[0].split()[-1]) >= 3 * len(PROMPTS)
    content = [
        entry
        for event in events[:-1]
        for choice in event.get("choices", [])
        if choice["logprobs"]
        for entry in choice["logprobs"]["content"]
    ]
    assert len(content) == 3
    assert all(len(entry["top_logprobs"]) == 2 for entry in content)
    assert all(entry["bytes"] == list(entry["token"].encode()) for entry in content)


TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
)


async def test_tools_go_into_the_prompt_of_a_template_that_renders_them(start_cluster, tmp_path):
    tokenizer_dir = tmp_path / "tokenizer"
    shutil.copytree(str(builtin_dir()), tokenizer_dir)
    config_path = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = TOOLS_TEMPLATE + config["chat_template"]
    config_path.write_text(json.dumps(config))
    builtin = await start_cluster(num_workers=1, namespace="toolsno")
    tools = await start_cluster(
        num_workers=1, worker_args=("--tokenizer", str(tokenizer_dir)), namespace="toolsyes"
    )
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "max_tokens": 3,
        "ignore_eos": True,
    }
    async with aiohttp.ClientSession() as session:
        status, refused = await post(
            session, f"{builtin.api}/chat/completions", {**body, "tools": [tool]}
        )
        assert status == 400
        assert "does not render tools" in refused["error"]["message"]
        status, plain = await post(session, f"{tools.api}/chat/completions", body)
        assert status == 200, plain
        status, offered = await post(
            session, f"{tools.api}/chat/completions", {**body, "tools": [tool]}
        )
        assert status == 200, offered
        status, declined = await post(
            session,
            f"{tools.api}/chat/completions",
            {**body, "tools": [tool], "tool_choice": "none"},
        )
        assert status == 200, declined
        events = await sse(session, f"{tools.api}/chat/completions", {**body, "tools": [tool]})
    # The tool's description went into the prompt (and only when offered).
    assert offered["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"] + 20
    assert declined["usage"]["prompt_tokens"] == plain["usage"]["prompt_tokens"]
    # The simulated engine writes words, never a call: content and a plain finish.
    message = offered["choices"][0]["message"]
    assert message["content"]
    assert "tool_calls" not in message
    assert offered["choices"][0]["finish_reason"] == "length"
    assert events[-1] == {"done": True}
