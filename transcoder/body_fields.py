"""The Lua filter that refuses unknown fields in REST request bodies, and query
parameters given twice for a field of one value.

Envoy's gRPC-JSON transcoder drops JSON keys its descriptor does not know
(the transcoding library parses with unknown fields ignored and Envoy has no
option to refuse them), so `{"userid": "ada"}` on POST /api/sessions made a
session with no user. `body_fields.lua` walks each REST body against the
message it becomes and answers 400 naming the keys; this module writes the
tables it walks with (every message a body can reach, every route that takes
a body) from the descriptor set, so they always match what the transcoder does.

The transcoder also weaves the fields a route's path binds, and its query
parameters, into the body, and a body key for the same field won: on
`POST /workflows/wfa/execute` a body `{"workflow_id": "wfb"}` ran wfb while
the path (and Envoy's access log) named wfa, and on `POST /api/executions?
workflow_id=wfb` the query's value was dropped for the body's. `tables` writes,
with each route that takes a body, the fields its path binds that the body can
set too (by the body keys that reach them, both names), for the filter to
refuse a body key for one unless it holds the path's very value, and which
request message and body field the route has, for it to refuse a query
parameter for a field the body also sets.

The transcoder also sets a field once per query parameter naming it, so a
field of one value given twice (`?page_size=10&page_size=500`, or as
`page_size` and `pageSize`, or in the path and again in the query) kept the
last value, silently. `query_tables` writes, from the same descriptor set,
which names each route's query takes and which field each sets (repeated
fields marked: they take every value), for the same filter to refuse those.

Within a body, too, a field of one value given twice, by both its names
(`{"workflow_id": "wfa", "workflowId": "wfb"}` ran wfb) or as the same key
twice, kept one value silently. `json_names` writes which JSON name is which
field's, for the filter to know both names of a field as one as it walks.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import NamedTuple

from google.protobuf import descriptor_pb2

from flowport.transcoder.http_rules import descriptor_set, methods

FieldType = descriptor_pb2.FieldDescriptorProto
# Types whose JSON form is not an object of their fields: any key (Struct,
# Any), a scalar (Timestamp, Duration, FieldMask, wrappers) or `{}` (Empty).
# The transcoder checks those forms itself; the walk does not enter them.
OPAQUE_PREFIX = "google.protobuf."
# Of those, the ones written as one JSON scalar (a string, number or bool),
# never an object or a list.
SCALAR_TYPES = frozenset(
    f"google.protobuf.{name}"
    for name in (
        "Duration",
        "Timestamp",
        "FieldMask",
        "DoubleValue",
        "FloatValue",
        "Int64Value",
        "UInt64Value",
        "Int32Value",
        "UInt32Value",
        "BoolValue",
        "StringValue",
        "BytesValue",
    )
)
# Kinds of value in the tables (see _kind): any JSON value, one scalar, a list of elements of a kind.
ANY = ""
SCALAR = "="
REPEATED = "[]"
# A path template's variable: `{name}` or `{name=pattern}`.
_VARIABLE = re.compile(r"\{([^}=]+)(?:=([^}]*))?\}")
_LUA_MAGIC = re.compile(r"([\^$()%.\[\]*+\-?])")


def _messages(path: Path | None) -> dict[str, descriptor_pb2.DescriptorProto]:
    """Every message of the descriptor set by full name, nested ones included."""
    found: dict[str, descriptor_pb2.DescriptorProto] = {}

    def add(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}" if prefix else message.name
        found[name] = message
        for nested in message.nested_type:
            add(name, nested)

    for file in descriptor_set(path).file:
        for message in file.message_type:
            add(file.package, message)
    return found


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _names(field: descriptor_pb2.FieldDescriptorProto) -> tuple[str, str]:
    """A field's two names, as the transcoder takes them: its proto name and its JSON name."""
    return field.name, field.json_name or _camel(field.name)


def _kind(field: descriptor_pb2.FieldDescriptorProto, messages: dict[str, descriptor_pb2.DescriptorProto]) -> str:
    """What the walk does with a field's value: ANY (not entered), SCALAR (one JSON scalar, not
    entered), a message name, 'map:' + the values' kind, or REPEATED + the elements' kind."""
    element = _element_kind(field, messages)
    if field.label == FieldType.LABEL_REPEATED and not element.startswith("map:"):
        return REPEATED + element
    return element


def _element_kind(
    field: descriptor_pb2.FieldDescriptorProto, messages: dict[str, descriptor_pb2.DescriptorProto]
) -> str:
    if field.type != FieldType.TYPE_MESSAGE:
        return SCALAR
    name = field.type_name.lstrip(".")
    message = messages.get(name)
    if message is None:
        return ANY
    if message.options.map_entry:
        value = next(f for f in message.field if f.number == 2)
        return "map:" + _kind(value, messages)
    if name in SCALAR_TYPES:
        return SCALAR
    if name.startswith(OPAQUE_PREFIX):
        return ANY
    return name


# Body keys (both names of each field) -> the path-bound field they set (its proto names,
# "session.user_id"), or the keys of the message they lead into.
BoundKeys = dict[str, "str | BoundKeys"]


class BodyRoute(NamedTuple):
    """A REST binding that takes a body, as ROUTES holds it."""

    method: str
    # The path as an anchored Lua pattern; each variable captured when the body can set a
    # field the path binds (`bound_keys`), so the filter reads the path's values.
    pattern: str
    # What the body is (see _kind): the request message for `body: "*"`, else its body field's.
    kind: str
    # The request message.
    message: str
    # What prefixes a field of the request message the body sets: "" for `body: "*"`, else
    # the body field and "." ("session.").
    prefix: str
    # The field each captured variable binds, in order; None for a variable of several
    # segments (`{name=**}`), whose value the filter does not decode: a body key for it is refused.
    bound: tuple[str | None, ...]
    # The fields the path binds that the body can set too, by the keys that reach them.
    bound_keys: BoundKeys


def tables(path: Path | None = None) -> tuple[dict[str, dict[str, str]], list[BodyRoute]]:
    """(TYPES, ROUTES) for body_fields.lua: each message a body reaches with its
    keys (proto and JSON names) and their kinds; each REST binding that takes a body."""
    messages = _messages(path)
    types: dict[str, dict[str, str]] = {}

    def reach(name: str) -> None:
        pending = [name]
        while pending:
            current = pending.pop()
            if current in types or current not in messages:
                continue
            keys: dict[str, str] = {}
            for field in messages[current].field:
                kind = _kind(field, messages)
                for key in _names(field):
                    keys[key] = kind
                target = kind
                while target.startswith(("map:", REPEATED)):
                    target = target.removeprefix("map:").removeprefix(REPEATED)
                if target not in (ANY, SCALAR):
                    pending.append(target)
            types[current] = keys

    routes: list[BodyRoute] = []
    for method in methods(path):
        for binding in method.bindings:
            if not binding.body:
                continue
            if binding.body == "*":
                kind, prefix, body_message = method.input_type, "", method.input_type
            else:
                field = next(f for f in messages[method.input_type].field if f.name == binding.body)
                # A repeated body is left to the transcoder (ANY: not walked).
                kind = ANY if field.label == FieldType.LABEL_REPEATED else _kind(field, messages)
                prefix, body_message = binding.body + ".", kind
            if kind not in (ANY, SCALAR) and not kind.startswith("map:"):
                reach(kind)
            variables = list(_VARIABLE.finditer(binding.template))
            bound_keys: BoundKeys = {}
            if kind not in (ANY, SCALAR) and not kind.startswith(("map:", REPEATED)):
                for found in variables:
                    member = found.group(1).strip()
                    if member.startswith(prefix) and member != binding.body:
                        _add_bound_keys(messages, body_message, member.removeprefix(prefix), member, bound_keys)
            bound = tuple(
                found.group(1).strip() if (found.group(2) or "*").strip() == "*" else None for found in variables
            )
            routes.append(
                BodyRoute(
                    binding.verb.upper(),
                    _path_pattern(binding.template, capture=bool(bound_keys)),
                    kind,
                    method.input_type,
                    prefix,
                    bound if bound_keys else (),
                    bound_keys,
                )
            )
    return types, routes


def _add_bound_keys(
    messages: dict[str, descriptor_pb2.DescriptorProto], message: str, relative: str, member: str, into: BoundKeys
) -> None:
    """Adds to `into` the body keys that reach field `relative` (dot-separated proto names) of
    `message`, both names of each field on the way, ending at `member` (its full proto path)."""
    head, _, rest = relative.partition(".")
    field = next(f for f in messages[message].field if f.name == head)
    for key in _names(field):
        if not rest:
            into[key] = member
            continue
        inner = into.setdefault(key, {})
        if isinstance(inner, dict):
            _add_bound_keys(messages, field.type_name.lstrip("."), rest, member, inner)


def json_names(path: Path | None = None) -> dict[str, dict[str, str]]:
    """JSON_NAMES for body_fields.lua: for each message of TYPES, each JSON name that is not its
    field's proto name -> that proto name (`userId` -> `user_id`). The filter reads both names of
    a field as one field, so that a body giving it twice, by either name, is refused."""
    messages = _messages(path)
    found: dict[str, dict[str, str]] = {}
    for name in tables(path)[0]:
        renamed = {json: proto for proto, json in map(_names, messages[name].field) if json != proto}
        if renamed:
            found[name] = renamed
    return found


def _path_pattern(template: str, capture: bool = False) -> str:
    """A path template as an anchored Lua pattern: a variable is one segment (`**`: any rest),
    each captured with `capture`.

    A segment may be empty: the transcoder binds a variable to one, so
    `/workflows//execute` is a CreateExecution.
    """
    out = []
    position = 0
    for found in _VARIABLE.finditer(template):
        out.append(_LUA_MAGIC.sub(r"%\1", template[position : found.start()]))
        variable = ".*" if (found.group(2) or "").endswith("**") else "[^/]*"
        out.append(f"({variable})" if capture else variable)
        position = found.end()
    out.append(_LUA_MAGIC.sub(r"%\1", template[position:]))
    return "^" + "".join(out) + "$"


def _lua_string(text: str) -> str:
    """`text` as a Lua string literal."""
    escaped = "".join(
        ch if (" " <= ch <= "~" and ch not in '"\\') else "".join(f"\\{b}" for b in ch.encode()) for ch in text
    )
    return f'"{escaped}"'


def verbs(path: Path | None = None) -> list[str]:
    """The custom verbs of every REST binding (`validate` of `/api/workflows:validate`): the
    transcoder splits only these off a path, and matches every route with the rest."""
    return sorted({b.template.rsplit(":", 1)[1] for m in methods(path) for b in m.bindings if _has_verb(b.template)})


def _has_verb(template: str) -> bool:
    return ":" in template.rsplit("/", 1)[-1] and "}" not in template.rsplit(":", 1)[1]


# Messages a query name may reach into (`resource.database.pool_size` is 2); deeper ones are left unchecked.
MAX_QUERY_DEPTH = 4
QueryRoute = tuple[str, str, str, tuple[str, ...]]


def query_name_key(name: str) -> str:
    """How body_fields.lua compares query names before it finds their route: both names of a
    field alike (`page_size`, `pageSize` and `PageSize` are `pagesize`)."""
    return name.replace("_", "").lower()


def _query_fields(messages: dict[str, descriptor_pb2.DescriptorProto], name: str) -> dict[str, str | bool]:
    """Each query name the transcoder takes for message `name` (every field, by its proto or JSON
    name, dot-separated into the non-repeated messages it holds) -> the field it sets, by its
    proto names; False for a repeated field. What is inside a repeated message or a map, and
    free-form values (Struct, Any), are left out: unchecked, the transcoder's to take or refuse."""
    found: dict[str, str | bool] = {}

    def walk(type_name: str, prefixes: list[str], parent: str, depth: int) -> None:
        for field in messages[type_name].field:
            names = sorted(set(_names(field)))
            keys = [prefix + n for prefix in prefixes for n in names]
            member = parent + field.name
            repeated = field.label == FieldType.LABEL_REPEATED
            if field.type == FieldType.TYPE_MESSAGE:
                target = field.type_name.lstrip(".")
                if repeated or target not in messages:
                    continue
                if target not in SCALAR_TYPES:
                    if not target.startswith(OPAQUE_PREFIX) and depth < MAX_QUERY_DEPTH:
                        walk(target, [key + "." for key in keys], member + ".", depth + 1)
                    continue
            for key in keys:
                found[key] = False if repeated else member

    walk(name, [""], "", 0)
    return found


def query_tables(path: Path | None = None) -> tuple[dict[str, dict[str, str | bool]], list[QueryRoute], set[str]]:
    """(QUERY_TYPES, QUERY_ROUTES, QUERY_SUSPECTS) for body_fields.lua's query check: the names
    each request message takes in a query (see _query_fields); each (method, Lua path pattern,
    request message, fields its path binds) of every REST binding; and the names (as
    query_name_key makes them) that send a query to be checked even when given once: fields some
    route binds in its path, and any field whose JSON name is not its proto name camel-cased."""
    messages = _messages(path)
    types: dict[str, dict[str, str | bool]] = {}
    routes: list[QueryRoute] = []
    suspects: set[str] = set()
    for method in methods(path):
        if method.input_type not in types:
            types[method.input_type] = _query_fields(messages, method.input_type)
        for binding in method.bindings:
            bound = tuple(found.group(1).strip() for found in _VARIABLE.finditer(binding.template))
            suspects.update(query_name_key(member) for member in bound)
            routes.append((binding.verb.upper(), _path_pattern(binding.template), method.input_type, bound))
    for fields in types.values():
        by_member: dict[str | bool, set[str]] = {}
        for key, member in fields.items():
            by_member.setdefault(member if member else key, set()).add(query_name_key(key))
        for keys in by_member.values():
            if len(keys) > 1:
                suspects.update(keys)
    return types, routes, suspects


def _query_lua(path: Path | None) -> list[str]:
    types, routes, suspects = query_tables(path)
    lines = ["local QUERY_TYPES = {"]
    for name in sorted(types):
        entries = ", ".join(
            f"[{_lua_string(k)}] = {_lua_string(v) if isinstance(v, str) else 'false'}"
            for k, v in sorted(types[name].items())
        )
        lines.append(f"  [{_lua_string(name)}] = {{ {entries} }},")
    lines.append("}")
    lines.append("local QUERY_ROUTES = {")
    for verb, pattern, message, bound in routes:
        members = ", ".join(_lua_string(m) for m in bound)
        lines.append(f"  {{ {_lua_string(verb)}, {_lua_string(pattern)}, {_lua_string(message)}, {{ {members} }} }},")
    lines.append("}")
    lines.append("local QUERY_SUSPECTS = { " + " ".join(f"[{_lua_string(k)}] = true," for k in sorted(suspects)) + " }")
    return lines


def _lua_bound_keys(keys: BoundKeys) -> str:
    entries = ", ".join(
        f"[{_lua_string(key)}] = {_lua_string(value) if isinstance(value, str) else _lua_bound_keys(value)}"
        for key, value in sorted(keys.items())
    )
    return f"{{ {entries} }}"


def lua_source(path: Path | None = None) -> str:
    """body_fields.lua with its TYPES, JSON_NAMES, ROUTES, VERBS and QUERY_* tables in front."""
    types, routes = tables(path)
    lines = ["local TYPES = {"]
    for name in sorted(types):
        keys = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in sorted(types[name].items()))
        lines.append(f"  [{_lua_string(name)}] = {{ {keys} }},")
    lines.append("}")
    lines.append("local JSON_NAMES = {")
    for name, renamed in sorted(json_names(path).items()):
        keys = ", ".join(f"[{_lua_string(k)}] = {_lua_string(v)}" for k, v in sorted(renamed.items()))
        lines.append(f"  [{_lua_string(name)}] = {{ {keys} }},")
    lines.append("}")
    lines.append("local ROUTES = {")
    for route in routes:
        bound = ", ".join("false" if m is None else _lua_string(m) for m in route.bound)
        head = ", ".join(_lua_string(v) for v in (route.method, route.pattern, route.kind, route.message, route.prefix))
        keys = _lua_bound_keys(route.bound_keys) if route.bound_keys else "false"
        lines.append(f"  {{ {head}, {{ {bound} }}, {keys} }},")
    lines.append("}")
    lines.append("local VERBS = { " + " ".join(f"[{_lua_string(v)}] = true," for v in verbs(path)) + " }")
    lines += _query_lua(path)
    code = resources.files("flowport.transcoder").joinpath("body_fields.lua").read_text("utf-8")
    return "\n".join(lines) + "\n\n" + code
