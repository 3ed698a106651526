"""Flags and environment variables derived from a service's frozen config dataclass.

One name, three spellings: field ``max_num_seqs``, flag ``--max-num-seqs``, and the env vars
``BATON_<SERVICE>_MAX_NUM_SEQS`` (this service only) and ``BATON_MAX_NUM_SEQS`` (every service,
so that ``BATON_NATS_URL`` configures a whole cluster). Precedence: flag > service env >
global env > default. This is the only module that reads ``os.environ``.
"""

import argparse
import dataclasses
import logging
import os
import re
import socket
import types
import typing
import urllib.parse
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)


class DataclassInstance(Protocol):
    __dataclass_fields__: typing.ClassVar[dict[str, Any]]


ConfigT = TypeVar("ConfigT", bound=DataclassInstance)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def doc(text: str) -> dict[str, str]:
    """Field metadata carrying a setting's ``--help`` text."""
    return {"help": text}


def instance_id(role: str) -> str:
    """A fresh id for a process of ``role``: role, host, pid and a random suffix (a restarted
    process on the same pid still gets a new id), all subject-safe characters."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{role}-{host[:24]}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _scalar_type(annotation: Any) -> tuple[type, bool]:
    """(base type, is_optional) of a field annotation such as ``int`` or ``str | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config annotation {annotation!r}")
        return args[0], True
    return annotation, False


def _converter(base: type) -> Any:
    if base is bool:
        return _parse_bool
    if base in (int, float, str):
        return base
    raise TypeError(f"unsupported config field type {base!r}")


def env_names(service: str, field_name: str) -> tuple[str, str]:
    upper = field_name.upper()
    return f"BATON_{service.upper()}_{upper}", f"BATON_{upper}"


def _leaf_fields(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    """Every scalar field with its annotation, nested config dataclasses flattened in place:
    a field whose type is itself a dataclass contributes its fields under their own names
    (shared settings such as the engine's are declared once and reused by several services)."""
    hints = typing.get_type_hints(cls)
    leaves: list[tuple[dataclasses.Field[Any], Any]] = []
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            leaves.extend(_leaf_fields(hints[field.name]))
        else:
            leaves.append((field, hints[field.name]))
    return leaves


def build_parser(cls: type[ConfigT], service: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field; help text comes from field metadata."""
    parser = argparse.ArgumentParser(
        prog=f"baton-{service}",
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for field, annotation in _leaf_fields(cls):
        base, _ = _scalar_type(annotation)
        flag = "--" + field.name.replace("_", "-")
        env_service, env_global = env_names(service, field.name)
        help_text = field.metadata.get("help", "")
        help_text = f"{help_text} [env {env_service} or {env_global}]".strip()
        parser.add_argument(
            flag,
            dest=field.name,
            type=_converter(base),
            default=None,
            help=help_text,
            metavar=base.__name__.upper(),
        )
    return parser


def _build(cls: type[Any], values: Mapping[str, Any]) -> Any:
    """Construct ``cls`` (and its nested config dataclasses) from the flat values given."""
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[field.name]):
            kwargs[field.name] = _build(hints[field.name], values)
        elif field.name in values:
            kwargs[field.name] = values[field.name]
    return cls(**kwargs)


def load_config(
    cls: type[ConfigT],
    service: str,
    argv: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    description: str = "",
) -> ConfigT:
    """Build ``cls`` from flags, then env vars, then the dataclass defaults.

    Invalid values exit with a usage error that names the flag or variable.
    """
    env = os.environ if env is None else env
    parser = build_parser(cls, service, description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for field, annotation in _leaf_fields(cls):
        from_flag = getattr(args, field.name)
        if from_flag is not None:
            values[field.name] = from_flag
            continue
        base, is_optional = _scalar_type(annotation)
        for name in env_names(service, field.name):
            if name in env:
                raw = env[name]
                try:
                    values[field.name] = (
                        None if is_optional and raw == "" else _converter(base)(raw)
                    )
                except ValueError as exc:
                    parser.error(f"{name}={raw!r}: {exc}")
                break
    try:
        config: ConfigT = _build(cls, values)
    except ValueError as exc:
        parser.error(str(exc))
    return config


_SECRET_NAME = re.compile(r"(^|_)(password|token|api_key|secret)$")


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo replaced (``nats://u:secret@h`` -> ``u:***``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.password is None:
            return url
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _is_secret(field: dataclasses.Field[Any]) -> bool:
    """A field marked ``metadata={"secret": True}``, or named ``*password``, ``*token``,
    ``*api_key`` or ``*secret``."""
    return bool(field.metadata.get("secret")) or bool(_SECRET_NAME.search(field.name))


def _redacted(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` fit for a log: set secrets as ``'***'``, passwords in URLs
    masked, nested configs as nested dicts."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            values[field.name] = _redacted(value)
        elif _is_secret(field) and value:
            values[field.name] = "***"
        elif isinstance(value, str) and "@" in value and "://" in value:
            values[field.name] = redact_url(value)
        else:
            values[field.name] = value
    return values


def describe(config: DataclassInstance) -> str:
    """``key=value`` pairs of a config, for the startup log line; secrets are redacted."""
    return " ".join(f"{k}={v!r}" for k, v in _redacted(config).items())
