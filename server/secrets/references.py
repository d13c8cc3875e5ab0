"""`${secret:NAME}` references: where they are in a value, and filling them in.

Node configs, resource definitions and headers name a tenant's secret as
`${secret:NAME}`. This module reads that syntax; opening the values is the
vault's (server/secrets/vault.py) and deciding which fields may hold them is
the resolver's (server/secrets/resolver.py). `$${` escapes a reference and
other `${name}` references are left to server/nodes/substitution.py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flowport.server.errors import shown
from flowport.server.nodes.base import NodeError

# `$${` (escape), or `${…}` (a secret when it starts with PREFIX).
TOKEN = re.compile(r"\$\$\{|\$\{([^{}]*)\}")
PREFIX = "secret:"
# Env-var style, so `${secret:NAME}` reads unambiguously and names never differ only in case.
SECRET_NAME = re.compile(r"\A[A-Z_][A-Z0-9_]{0,127}\Z")


def is_secret(inner: str) -> bool:
    """Whether the text inside `${…}` names a secret."""
    return inner.strip().startswith(PREFIX)


def secret_value(inner: str, secrets: Mapping[str, str]) -> str:
    """The value of the secret `inner` (`secret:NAME`) names; NodeError SECRET_NOT_FOUND when not open."""
    name = inner.strip()[len(PREFIX) :].strip()
    if name not in secrets:
        raise NodeError(f"unknown secret {shown(name)}", reason="SECRET_NOT_FOUND")
    return secrets[name]


def insert_secrets(text: str, secrets: Mapping[str, str]) -> str:
    """`text` with only its `${secret:NAME}` references replaced; everything else stays as written."""

    def replace(match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner is None or not is_secret(inner):
            return match.group(0)
        return secret_value(inner, secrets)

    return TOKEN.sub(replace, text)


def stand_in(text: str, placeholder: str) -> str:
    """`text` with each `${secret:NAME}` replaced by `placeholder` (to check its shape without the value)."""
    return TOKEN.sub(lambda m: placeholder if m.group(1) is not None and is_secret(m.group(1)) else m.group(0), text)


def secret_references(value: Any, path: str = "") -> list[tuple[str, str]]:
    """(path, NAME) of every `${secret:NAME}` in `value`'s strings; paths like `headers.Authorization`."""
    found: list[tuple[str, str]] = []
    if isinstance(value, str):
        for match in TOKEN.finditer(value):
            inner = match.group(1)
            if inner is not None and is_secret(inner):
                found.append((path, inner.strip()[len(PREFIX) :].strip()))
    elif isinstance(value, dict):
        for key, item in value.items():
            found += secret_references(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += secret_references(item, f"{path}[{i}]")
    return found
