"""Tool calls read out of a model's text as it streams (pure; no I/O).

Baton reads the convention most open chat templates that render ``tools`` teach their models
(Hermes, Qwen 2.5 and 3, and others): a call is a JSON object ``{"name": ..., "arguments":
{...}}`` between ``<tool_call>`` and ``</tool_call>``. Text outside the tags stays content. A
block whose JSON does not parse, or is not such an object, stays content too (the client sees
what the model wrote rather than losing it). While a tag may be starting, its characters are
held back, so no client ever sees half of ``<tool_call>`` as content.
"""

import json
import uuid
from dataclasses import dataclass
from typing import Any

OPEN = "<tool_call>"
CLOSE = "</tool_call>"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        """The ``tool_calls`` entry (with ``index`` in a streamed delta)."""
        call: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        if index is not None:
            call = {"index": index, **call}
        return call


def _held_back(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_call(body: str) -> ToolCall | None:
    """The call in one tag's body, or None when it is not one."""
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict):
        return None
    name = value.get("name")
    arguments = value.get("arguments", value.get("parameters", {}))
    if not isinstance(name, str) or not name:
        return None
    if isinstance(arguments, str):
        text = arguments
    elif isinstance(arguments, dict):
        text = json.dumps(arguments, ensure_ascii=False)
    else:
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", name, text)


class ToolCallParser:
    """Splits a stream of text into content and tool calls."""

    def __init__(self) -> None:
        self._buffer = ""
        self._inside = False  # after an opening tag, before its closing one
        self.num_calls = 0

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content that is certain now, and the calls completed by ``text``."""
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            buffer = self._buffer
            if not self._inside:
                start = buffer.find(OPEN)
                if start < 0:
                    keep = _held_back(buffer, OPEN)
                    content.append(buffer[: len(buffer) - keep])
                    self._buffer = buffer[len(buffer) - keep :]
                    break
                content.append(buffer[:start])
                self._buffer = buffer[start + len(OPEN) :]
                self._inside = True
            else:
                end = buffer.find(CLOSE)
                if end < 0:
                    break
                body = buffer[:end]
                self._buffer = buffer[end + len(CLOSE) :]
                self._inside = False
                call = parse_call(body)
                if call is None:
                    content.append(OPEN + body + CLOSE)
                else:
                    calls.append(call)
        self.num_calls += len(calls)
        return "".join(content), calls

    def flush(self) -> tuple[str, list[ToolCall]]:
        """The end of the output: an unclosed call is taken if its JSON is whole (a model may
        stop at its end-of-turn token without closing the tag), else given back as text."""
        buffer, self._buffer = self._buffer, ""
        if not self._inside:
            return buffer, []
        self._inside = False
        call = parse_call(buffer)
        if call is None:
            return OPEN + buffer, []
        self.num_calls += 1
        return "", [call]
