"""How the CLI prints API messages: `--output json` (proto3 JSON, proto field
names, as the REST API answers) or `--output table` (a few columns per kind
of message, for people)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2

from flowport.clients.values import plain

FORMATS = ("table", "json")
# Nodes whose outputs a table shows; a workflow may have hundreds.
OUTPUT_NODES_SHOWN = 50


def as_dict(message: Message) -> dict[str, Any]:
    """`message` as the REST API answers it: the API's field names, fields at their defaults
    included, whole numbers in Structs as integers."""
    shown: dict[str, Any] = plain(
        json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    )
    return shown


def _state(value: Any) -> str:
    return str(value).removeprefix("STATE_").lower() if value else ""


def _time(value: Any) -> str:
    return str(value)[:19].replace("T", " ") if value else ""


def _duration(value: Any) -> str:
    """A JSON Duration ("0.000958985s") as a person reads it: "0.96 ms", "1.5 s"."""
    if not isinstance(value, str) or not value.endswith("s"):
        return ""
    try:
        seconds = float(value[:-1])
    except ValueError:
        return value
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


Column = tuple[str, Callable[[dict[str, Any]], Any]]
# Columns by message type; a type without columns prints its fields.
COLUMNS: dict[str, list[Column]] = {
    "flowport.v1.Session": [
        ("SESSION", lambda d: d.get("session_id", "")),
        ("USER", lambda d: d.get("user_id", "")),
        ("CREATED", lambda d: _time(d.get("create_time"))),
        ("EXPIRES", lambda d: _time(d.get("expire_time"))),
    ],
    "flowport.v1.Workflow": [
        ("WORKFLOW", lambda d: d.get("workflow_id", "")),
        ("VERSION", lambda d: d.get("version", "")),
        ("NODES", lambda d: len(d.get("nodes", []))),
        ("CREATED", lambda d: _time(d.get("create_time"))),
    ],
    "flowport.v1.Execution": [
        ("EXECUTION", lambda d: d.get("execution_id", "")),
        ("WORKFLOW", lambda d: f"{d.get('workflow_id', '')} v{d.get('workflow_version', '')}"),
        ("STATE", lambda d: _state(d.get("state"))),
        ("CREATED", lambda d: _time(d.get("create_time"))),
        ("DURATION", lambda d: _duration(d.get("duration"))),
        ("ERROR", lambda d: d.get("error", {}).get("message", "")),
    ],
    "flowport.v1.Event": [
        ("ID", lambda d: d.get("id", "")),
        ("TIME", lambda d: _time(d.get("time"))),
        ("TYPE", lambda d: d.get("type", "")),
        ("SUBJECT", lambda d: d.get("execution_id") or d.get("session_id") or d.get("workflow_id") or ""),
    ],
    "flowport.v1.Webhook": [
        ("WEBHOOK", lambda d: d.get("webhook_id", "")),
        ("URL", lambda d: d.get("url", "")),
        ("EVENTS", lambda d: ",".join(d.get("event_types", [])) or "*"),
        ("SECRET", lambda d: "yes" if d.get("has_secret") else "no"),
    ],
    "flowport.v1.Secret": [
        ("SECRET", lambda d: d.get("name", "")),
        ("VERSION", lambda d: d.get("version", "")),
        ("UPDATED", lambda d: _time(d.get("update_time") or d.get("create_time"))),
        ("DESCRIPTION", lambda d: d.get("description", "")),
    ],
    "flowport.v1.RegisteredService": [
        ("SERVICE", lambda d: d.get("service_id", "")),
        ("ENDPOINT", lambda d: d.get("endpoint", "")),
        ("CAPABILITIES", lambda d: ",".join(d.get("capabilities", []))),
        ("PROVIDER", lambda d: d.get("provider", "")),
        ("STATUS", lambda d: str(d.get("status", "")).removeprefix("STATUS_").lower() or "unchecked"),
        ("LATENCY_MS", lambda d: d.get("latency_ms", "")),
    ],
    "flowport.v1.Resource": [
        ("RESOURCE", lambda d: d.get("name", "")),
        ("KIND", lambda d: "database" if "database" in d else "http" if "http" in d else ""),
        (
            "TARGET",
            lambda d: d.get("database", {}).get("connection_string", "") or d.get("http", {}).get("base_url", ""),
        ),
        ("POOL", lambda d: d.get("database", {}).get("pool_size", "")),
        ("FROM", lambda d: "settings" if d.get("from_settings") else "api"),
    ],
    "flowport.v1.WebhookDelivery": [
        ("DELIVERY", lambda d: d.get("delivery_id", "")),
        ("EVENT", lambda d: d.get("event_type", "") or d.get("event_id", "")),
        ("STATE", lambda d: _state(d.get("state"))),
        ("ATTEMPTS", lambda d: d.get("attempts", 0)),
    ],
}


def _field(name: str) -> Callable[[dict[str, Any]], Any]:
    return lambda d: d.get(name, "")


def table(messages: Sequence[Message]) -> str:
    """Aligned columns, a header line first; empty string for no messages."""
    if not messages:
        return ""
    columns = COLUMNS.get(messages[0].DESCRIPTOR.full_name)
    rows = [as_dict(m) for m in messages]
    if columns is None:
        names = sorted({key for row in rows for key in row})
        columns = [(name.upper(), _field(name)) for name in names]
    cells = [[title for title, _ in columns]] + [[str(get(row)) for _, get in columns] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def render(messages: Sequence[Message], fmt: str, *, single: bool = False) -> str:
    """`messages` in `fmt`: JSON (one object when `single`, else a list) or a table."""
    if fmt == "json":
        payload: Any = as_dict(messages[0]) if single and messages else [as_dict(m) for m in messages]
        return json.dumps(payload, indent=2)
    return table(messages)


def execution_outputs(execution: Message, width: int) -> tuple[list[str], bool]:
    """An execution's outputs for a terminal: a NODE/OUTPUTS header, then one line per node
    (its outputs as one line of JSON), in the order the nodes ran, each cut to `width` columns.

    Returns the lines (none when there are no outputs) and whether anything was left out.
    """
    outputs = as_dict(execution).get("outputs") or {}
    ran = [r.node_id for r in getattr(execution, "node_runs", ()) if r.node_id in outputs]
    order = list(dict.fromkeys([*ran, *sorted(outputs)]))
    if not order:
        return [], False
    shown = order[:OUTPUT_NODES_SHOWN]
    name_width = max(len("NODE"), *(len(node) for node in shown))
    cut = len(order) > len(shown)
    lines = [f"{'NODE'.ljust(name_width)}  OUTPUTS"]
    for node in shown:
        line = f"{node.ljust(name_width)}  {json.dumps(plain(outputs[node]), ensure_ascii=False)}"
        if len(line) > width:
            line, cut = line[: max(width - 1, name_width + 3)] + "…", True
        lines.append(line)
    if len(order) > len(shown):
        lines.append(f"… and {len(order) - len(shown)} more nodes")
    return lines, cut


def describe_status(status: status_pb2.Status) -> str:
    """A google.rpc.Status as one line: `CODE [REASON]: message` (the reason when an ErrorInfo gives one)."""
    code = code_pb2.Code.Name(status.code) if status.code in code_pb2.Code.values() else str(status.code)
    reason = ""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason = info.reason
    return f"{code}{f' [{reason}]' if reason else ''}: {status.message}"
