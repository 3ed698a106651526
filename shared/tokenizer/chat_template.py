"""Render a model's Jinja chat template over OpenAI-style messages, in a sandbox.

Templates come from model files we did not write, so they run in Jinja's immutable sandbox with
the helpers Hugging Face templates expect (``raise_exception``, ``strftime_now``, a ``tojson``
that does not HTML-escape). Message content is flattened to a string first: a list of
``{"type": "text", "text": ...}`` parts becomes the texts joined by newlines, as vLLM does for
templates that expect string content.
"""

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import NoReturn

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from shared.errors import InvalidRequest


def _raise_exception(message: str) -> NoReturn:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(
    value: object, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols], autoescape=False
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


def content_text(content: object) -> str:
    """A message's content as one string.

    Accepts a string, None (an assistant turn with only tool calls) or a list of text parts;
    anything else, such as an image part, raises InvalidRequest.
    """
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise InvalidRequest(f"content part must be of type 'text', got {kind!r}")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"text part needs a string 'text', got {type(text).__name__}")
            texts.append(text)
        return "\n".join(texts)
    raise InvalidRequest(
        f"message content must be a string or a list, got {type(content).__name__}"
    )


def normalize_messages(messages: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Copies of ``messages`` with string content; raises InvalidRequest on a malformed one."""
    normalized: list[dict[str, object]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequest(f"messages[{index}] must be an object, got {type(message)}")
        role = message.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(f"messages[{index}].role must be a string, got {role!r}")
        normalized.append({**message, "content": content_text(message.get("content"))})
    return normalized


class ChatTemplate:
    """A compiled chat template; rendering is thread-safe and raises InvalidRequest on bad input."""

    def __init__(self, source: str, *, bos_token: str | None, eos_token: str | None) -> None:
        """Compile ``source``; a syntax error raises ValueError (a broken model, not a request)."""
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"chat template does not compile: {exc}") from exc
        self.source = source
        self._special = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    def render(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        add_generation_prompt: bool,
        template_kwargs: Mapping[str, object] | None = None,
    ) -> str:
        """The prompt for ``messages``; ``template_kwargs`` (such as ``tools``) pass through."""
        variables: dict[str, object] = {**self._special, **(template_kwargs or {})}
        variables["messages"] = normalize_messages(messages)
        variables["add_generation_prompt"] = add_generation_prompt
        try:
            return self._template.render(variables)
        except jinja2.TemplateError as exc:
            raise InvalidRequest(f"chat template rejected the messages: {exc}") from exc
