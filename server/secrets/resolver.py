"""`${secret:NAME}` for node types: which values may hold them, opening them, and cleaning up after.

A node type that takes secrets lists the config keys it resolves them in
(`NodeType.secret_fields`) and, when its plan is compiled, keeps the
config values of those keys that reference secrets (`ConfigSecrets`). At
run time a parameter gets secrets only while it still holds that config
value: one replaced by an execution input or a connection (data from
callers or from remote services) is not searched, so such data cannot
pull a secret into a request. Nor can it send one elsewhere: when any
field that says where the request goes (`secret_targets`: the URL, the
SQL connection and query) differs from the config, no secret is resolved
at all.

`revealed(ctx, scope, params)` opens the needed secrets of the execution's
tenant for one attempt and, while it is open, keeps them out of every log
record; an error leaving the block has them masked in its message, and
`Revealed.redact` masks them in the node's outputs.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Collection, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from flowport.server.nodes.base import NodeContext, NodeError
from flowport.server.secrets.cipher import SecretDecryptError
from flowport.server.secrets.redaction import Redactor, scrubbing_logs
from flowport.server.secrets.references import secret_references

log = logging.getLogger(__name__)
_ABSENT = object()


@dataclass(frozen=True)
class ConfigSecrets:
    """A node's config values that reference secrets, by key, with the names each references."""

    fields: Mapping[str, tuple[Any, frozenset[str]]] = field(default_factory=dict)
    # The config values (or their absence) of the fields that say where the
    # request goes: secrets only travel to the destination the config names.
    targets: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Mapping[str, Any], keys: Iterable[str], targets: Iterable[str] = ()) -> ConfigSecrets:
        """The secret-referencing values of `keys` in `config`, and the values of its `targets`."""
        found: dict[str, tuple[Any, frozenset[str]]] = {}
        for key in keys:
            names = frozenset(name for _, name in secret_references(config.get(key)))
            if names:
                found[key] = (config[key], names)
        return cls(found, {key: config.get(key, _ABSENT) for key in targets} if found else {})

    def applicable(self, params: Mapping[str, Any]) -> dict[str, frozenset[str]]:
        """Keys whose parameter is still the config's value, with their secret names.

        None at all when a target field no longer holds the config's value.
        """
        if any(params.get(key, _ABSENT) != value for key, value in self.targets.items()):
            return {}
        return {key: names for key, (value, names) in self.fields.items() if params.get(key) == value}


class Revealed:
    """The secret values one node attempt may use, and where it may use them."""

    def __init__(self, values: Mapping[str, str], keys: Iterable[str]) -> None:
        self._values = dict(values)
        self._keys = frozenset(keys)
        self._redactor = Redactor(self._values.values())

    def for_key(self, key: str) -> Mapping[str, str] | None:
        """Secrets for the parameter `key`: None when its value is not the config's (left as written)."""
        return self._values if key in self._keys else None

    def redact(self, outputs: dict[str, Any]) -> dict[str, Any]:
        """`outputs` with every revealed value masked (e.g. echoed back by the remote service)."""
        masked: dict[str, Any] = self._redactor.value(outputs)
        return masked

    def text(self, text: str) -> str:
        """`text` with every revealed value masked."""
        return self._redactor.text(text)


NONE = Revealed({}, ())


async def open_secrets(ctx: NodeContext, names: frozenset[str]) -> dict[str, str]:
    """The values of `names` for `ctx.tenant`; NodeError SECRET_NOT_FOUND, SECRET_UNREADABLE or SECRETS_UNAVAILABLE."""
    reader = ctx.services.secrets
    if reader is None:
        raise NodeError(
            "this server has no secret store, so ${secret:…} cannot be resolved", reason="SECRETS_UNAVAILABLE"
        )
    try:
        values = await reader.reveal(ctx.tenant, names)
    except SecretDecryptError as exc:
        # The operator needs to know (a key is missing from the keyring); the workflow only that it failed.
        log.error("cannot open a secret of tenant %s for node %s: %s", ctx.tenant, ctx.node_id, exc)
        raise NodeError("a secret this node references cannot be decrypted", reason="SECRET_UNREADABLE") from None
    missing = sorted(names - values.keys())
    if missing:
        raise NodeError(
            f"unknown secret{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
            "create it with PUT /api/secrets/{name}",
            reason="SECRET_NOT_FOUND",
        )
    return values


@asynccontextmanager
async def revealed(ctx: NodeContext, scope: ConfigSecrets | None, params: Mapping[str, Any]) -> AsyncIterator[Revealed]:
    """Open the secrets the node's config references for `ctx.tenant`, for the duration of the block.

    Fails with NodeError SECRET_NOT_FOUND (naming the missing names, never a
    value), SECRET_UNREADABLE or SECRETS_UNAVAILABLE. Any error leaving the
    block becomes a NodeError whose message has the values masked.
    """
    applicable = scope.applicable(params) if scope is not None else {}
    names = frozenset().union(*applicable.values()) if applicable else frozenset()
    if not names:
        yield NONE
        return
    values = await open_secrets(ctx, names)
    secrets = Revealed(values, applicable)
    with masking(ctx, values.values()):
        yield secrets


@contextmanager
def masking(ctx: NodeContext, values: Collection[str]) -> Iterator[Redactor]:
    """Keep `values` out of log records made in the block and out of any error leaving it.

    A NodeError keeps its reason with its message masked; another exception
    is logged (still scrubbed) and becomes NODE_CRASHED. With no values the
    block runs as it is.
    """
    redactor = Redactor(values)
    if not redactor:
        yield redactor
        return
    with scrubbing_logs(list(values)):
        try:
            yield redactor
        except NodeError as exc:
            raise NodeError(
                redactor.text(exc.message), reason=exc.reason, retryable=exc.retryable, retry_after=exc.retry_after
            ) from None
        except TimeoutError:
            raise  # the engine reports it with its own message
        except Exception as exc:
            # Logged here, while the values are still scrubbed from log records.
            log.exception("node %s (%s) failed unexpectedly", ctx.node_id, ctx.execution_id)
            raise NodeError(redactor.text(f"{type(exc).__name__}: {exc}"), reason="NODE_CRASHED") from None
