"""Tool calls read out of streamed text, whatever the cuts between pieces."""

import json
import random

import pytest

from services.frontend.tool_calls import ToolCallParser, parse_call

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>'
TEXT = "Let me check. " + CALL + "\n" + CALL.replace("Zürich", "Bern")


def run(pieces: list[str]) -> tuple[str, list[tuple[str, dict]]]:
    parser = ToolCallParser()
    content = ""
    calls = []
    for piece in pieces:
        text, new = parser.push(piece)
        content += text
        calls += new
    text, new = parser.flush()
    content += text
    calls += new
    return content, [(c.name, json.loads(c.arguments)) for c in calls]


def cuts(text: str, rng: random.Random) -> list[str]:
    points = sorted(rng.sample(range(1, len(text)), rng.randint(0, 12)))
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


EXPECTED = (
    "Let me check. \n",
    [("get_weather", {"city": "Zürich"}), ("get_weather", {"city": "Bern"})],
)


@pytest.mark.parametrize("seed", range(40))
def test_calls_and_content_survive_any_cuts(seed):
    assert run(cuts(TEXT, random.Random(seed))) == EXPECTED


def test_every_single_character_cut():
    assert run(list(TEXT)) == EXPECTED


def test_no_partial_tag_ever_reaches_the_client_as_content():
    parser = ToolCallParser()
    seen = ""
    for ch in "hi <tool_ca":
        seen += parser.push(ch)[0]
    assert seen == "hi "  # "<tool_ca" held back: it may become a tag
    assert parser.push("ke>")[0] == "<tool_cake>"  # it did not


def test_bad_json_stays_content_and_unclosed_whole_call_is_taken():
    bad = "<tool_call>{not json}</tool_call>"
    assert run([bad]) == (bad, [])
    assert run(['<tool_call>{"name": "f", "arguments": {}}']) == ("", [("f", {})])
    assert run(["<tool_call>{half"]) == ("<tool_call>{half", [])


def test_call_shapes():
    assert parse_call('{"name": "f", "arguments": "{\\"a\\": 1}"}').arguments == '{"a": 1}'
    assert parse_call('{"name": "f", "parameters": {"a": 1}}').arguments == '{"a": 1}'
    assert parse_call('{"arguments": {}}') is None
    assert parse_call("[1]") is None
    assert parse_call('{"name": "f", "arguments": 3}') is None
    one, two = parse_call('{"name": "f"}'), parse_call('{"name": "f"}')
    assert one is not None
    assert two is not None
    assert one.id != two.id
    assert one.id.startswith("call_")
