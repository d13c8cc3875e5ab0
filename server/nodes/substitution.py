"""`${name}` references in node configs, resolved from a node's parameters.

`substitute(value, params)` walks strings inside dicts and lists (dict keys
are left alone) and replaces each `${name}` with `params[name]`:

- a string that is exactly one reference becomes the value itself, keeping
  its type (`"${limit}"` → `100`); inside a longer string the value is
  `str()`-ed (`"Bearer ${token}"` → `"Bearer abc"`);
- dotted names navigate dicts (and lists by index): `${rows.0.id}`; a
  parameter whose own name contains the dot wins over navigation;
- the execution's own variables (`Parameters.variables`: `${tenant_id}`,
  `${session_id}`, `${execution_id}`, `${workflow_id}`, and
  `${session.tenant_id}` / `${session.id}` as Kailash configs write them)
  win over parameters of the same name, so an input cannot pose as another
  tenant;
- `${secret:NAME}` is replaced from `secrets` when given (a node's secret
  values; the syntax is server/secrets/references.py's), else left untouched;
- `$${x}` is the literal text `${x}`;
- an unknown name raises `NodeError(reason="UNRESOLVED_REFERENCE")`. There
  is no default syntax (`${name:-x}` names a parameter `name:-x`);
- strings whose substituted text would pass MAX_SUBSTITUTED_CHARS together,
  in one `substitute` call or the calls sharing a `Budget` (a node's
  parameters), raise `NodeError(reason="SUBSTITUTION_TOO_LARGE")` as they
  grow past it (a value is measured before it is written out).

`input_references` names the execution inputs a config's references need:
the first part of each reference that is not an execution variable (nor a
secret). The plan makes them required inputs of the workflow unless a
connection or the node's config gives them (server/engine/plan.py).

Substituted values are not themselves searched for references, so a value
coming from a user cannot inject another reference.

`check_params` applies a node type's config schema to the merged parameters
it reads at run time (connections may bring values of any shape).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator

from flowport.server.errors import shown
from flowport.server.nodes.base import NodeError, NodeType
from flowport.server.nodes.json_size import json_size
from flowport.server.nodes.paths import is_index
from flowport.server.secrets.references import TOKEN, is_secret, secret_value

# `$${` (escape), `${secret:…}`, or `${name}`: the secrets' syntax, which plain references share.
_TOKEN = TOKEN
# The most text one substitution may make, in all its strings (16 Mi characters): past any request
# or output a node may send or keep.
MAX_SUBSTITUTED_CHARS = 16 * 2**20
_MISSING = object()

# The execution's own scalar variables: `${tenant_id}` and the like in configs, and the variables
# of the same names in PythonCodeNode code. Never taken from an input or a connection.
EXECUTION_VARIABLE_NAMES = frozenset({"tenant_id", "session_id", "execution_id", "workflow_id"})


class Parameters(dict[str, Any]):
    """A node's merged parameters, with the execution's variables that `${...}` resolves first."""

    __slots__ = ("variables",)

    def __init__(self, params: Mapping[str, Any], variables: Mapping[str, Any]) -> None:
        super().__init__(params)
        self.variables = variables


def execution_variables(tenant: str, session_id: str, execution_id: str, workflow_id: str) -> dict[str, Any]:
    """What `${tenant_id}`, `${session.tenant_id}` and the like mean in an execution's node configs."""
    return {
        "tenant_id": tenant,
        "session_id": session_id,
        "execution_id": execution_id,
        "workflow_id": workflow_id,
        "session": {"id": session_id, "session_id": session_id, "tenant_id": tenant},
    }


# Any execution's variables: which references they resolve does not depend on their values.
_ANY_VARIABLES = execution_variables("tenant", "session", "execution", "workflow")


def is_execution_variable(name: str) -> bool:
    """Whether `${name}` is resolved by the execution's variables, whatever the parameters hold
    (`tenant_id`, `session.tenant_id`; not `session.user_id`, which the parameters resolve)."""
    return _lookup(name.strip(), _ANY_VARIABLES) is not _MISSING


class Budget:
    """Characters substitutions may still make, shared by the `substitute` calls given it (a
    node's parameters: each call otherwise has MAX_SUBSTITUTED_CHARS of its own)."""

    def __init__(self, most: int = MAX_SUBSTITUTED_CHARS) -> None:
        self.most = most
        self.produced = 0


def substitute(
    value: Any, params: Mapping[str, Any], secrets: Mapping[str, str] | None = None, budget: Budget | None = None
) -> Any:
    """`value` with every `${name}` in its strings replaced from `params`
    (and every `${secret:NAME}` from `secrets`, when given), within `budget`."""
    return _Substitution(params, secrets, budget or Budget()).value(value)


def references(value: Any) -> list[str]:
    """Names referenced by `${name}` in `value` (secrets and escapes excluded), in order."""
    # A dict keeps the order and finds a name at once: a list searched at each name (and again at
    # each level of nesting) took seconds for a config of 6,000 references.
    found: dict[str, None] = {}
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            for match in _TOKEN.finditer(item):
                name = match.group(1)
                if name is not None and not is_secret(name):
                    found.setdefault(name.strip())
        elif isinstance(item, dict):
            pending.extend(reversed(list(item.values())))
        elif isinstance(item, list):
            pending.extend(reversed(item))
    return list(found)


def input_references(value: Any) -> set[str]:
    """The inputs `value`'s `${name}` references need: each reference's first part (`order` for
    `${order.id}`), execution variables, secrets and escapes excluded."""
    return {
        root
        for name in references(value)
        if not is_execution_variable(name) and (root := name.split(".", 1)[0].strip())
    }


def lookup(name: str, params: Mapping[str, Any]) -> Any:
    """The value `name` refers to in `params`; raises UNRESOLVED_REFERENCE when there is none."""
    value = _lookup(name, params)
    if value is _MISSING:
        raise NodeError(f"unresolved reference: no parameter named {shown(name)}", reason="UNRESOLVED_REFERENCE")
    return value


def _lookup(name: str, params: Mapping[str, Any]) -> Any:
    variables = getattr(params, "variables", None)
    if variables is not None and name.split(".", 1)[0] in variables:
        value = _lookup(name, variables)
        if value is not _MISSING:
            return value
    if name in params:
        return params[name]
    if not name or "." not in name:
        return _MISSING
    current: Any = params
    for part in name.split("."):
        if isinstance(current, Mapping) and part in current:
            current = current[part]
        elif isinstance(current, list) and is_index(part) and int(part) < len(current):
            current = current[int(part)]
        else:
            return _MISSING
    return current


class _Substitution:
    """One `substitute` call: every string it makes counts toward its Budget, so that many strings,
    each within it, cannot make gigabytes together."""

    def __init__(self, params: Mapping[str, Any], secrets: Mapping[str, str] | None, budget: Budget) -> None:
        self._params = params
        self._secrets = secrets
        self._budget = budget

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._string(value)
        if isinstance(value, dict):
            return {key: self.value(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.value(item) for item in value]
        return value

    def _count(self, characters: int) -> None:
        # Counted as it grows: a config of many references to one long input would otherwise
        # build gigabytes on the event loop.
        self._budget.produced += characters
        if self._budget.produced > self._budget.most:
            raise self._too_large()

    def _too_large(self) -> NodeError:
        return NodeError(
            f"the strings of a node's parameters with their references substituted would pass {self._budget.most} "
            "characters",
            reason="SUBSTITUTION_TOO_LARGE",
        )

    def _written(self, found: Any) -> str:
        """`found` as text in a longer string, measured first (a lower bound of its text, which
        stops once past what is left): str() of a list of a million numbers is megabytes."""
        if isinstance(found, str):
            return found
        left = self._budget.most - self._budget.produced
        if json_size(found, left) > left:
            raise self._too_large()
        return str(found)

    def _string(self, text: str) -> Any:
        if "$" not in text:
            return text
        whole = _TOKEN.fullmatch(text)
        if whole is not None and whole.group(1) is not None:
            name = whole.group(1).strip()
            if is_secret(name):
                return text if self._secrets is None else secret_value(name, self._secrets)
            return lookup(name, self._params)  # the value itself, by reference: not written out here
        self._count(len(text))
        return _TOKEN.sub(self._piece, text)

    def _piece(self, match: re.Match[str]) -> str:
        inner = match.group(1)
        if inner is None:  # `$${` escape
            return "${"
        name = inner.strip()
        if is_secret(name):
            piece = match.group(0) if self._secrets is None else secret_value(name, self._secrets)
        else:
            piece = self._written(lookup(name, self._params))
        self._count(len(piece))
        return piece


@cache
def _params_validator(cls: type[NodeType]) -> Draft202012Validator:
    """The config schema applied to merged parameters (other names are allowed there)."""
    schema = {key: value for key, value in cls.config_schema.items() if key != "additionalProperties"}
    return Draft202012Validator(schema)


def check_params(cls: type[NodeType], params: Mapping[str, Any]) -> None:
    """Raise INVALID_PARAMETER when a parameter the node reads has the wrong shape."""
    known = cls.config_schema.get("properties", {})
    relevant = {key: value for key, value in params.items() if key in known}
    error = next(iter(sorted(_params_validator(cls).iter_errors(relevant), key=lambda e: list(e.absolute_path))), None)
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "parameters"
        raise NodeError(f"parameter {where}: {error.message}", reason="INVALID_PARAMETER")
