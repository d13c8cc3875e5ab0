"""`flowport keys create|list|revoke`: manage API keys on a running server.

The commands call `ApiKeyService` over gRPC with an admin key. The key is
the first of `--api-key`, `FLOWPORT_API_KEY`, the `admin_api_key` setting
(`FLOWPORT_ADMIN_API_KEY`) and the file `<data-dir>/admin-api-key` that the
server's first start wrote.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from flowport.clients.cli.api_command import add_action, add_group
from flowport.clients.cli.connect import ADMIN_KEY_FILE, API_KEY_ENV, TARGET_ENV, explain, run_client_command

if TYPE_CHECKING:
    from flowport.clients import Client
    from flowport.v1 import apikey_pb2

_DURATION = re.compile(r"(\d+)([wdhms])")
_UNITS = {"w": "weeks", "d": "days", "h": "hours", "m": "minutes", "s": "seconds"}
EPILOG = f"""\
The admin key is taken from --api-key, else ${API_KEY_ENV}, else the
admin_api_key setting (FLOWPORT_ADMIN_API_KEY), else <data-dir>/{ADMIN_KEY_FILE}.

exit codes: 0 done; 1 the server refused the request (message says why);
2 bad usage or settings, or no key found; 3 server unreachable;
4 key not accepted (unknown, revoked, or not an admin key)."""


def add_keys_parser(commands: Any) -> None:
    """Add `keys` and its subcommands to the top-level subparsers."""
    help_text = "create, list and revoke API keys on a running server (needs an admin key)"
    actions = add_group(commands, "keys", help_text, epilog=EPILOG)
    create = _action(actions, "create", "create a key and print it (it is shown only this once)")
    create.add_argument("--tenant", help="tenant the key acts for (default: the admin key's tenant)")
    create.add_argument(
        "--role",
        dest="roles",
        action="append",
        choices=["user", "admin"],
        help="a role of the key; repeat for several (default: user)",
    )
    create.add_argument("--description", default="", metavar="TEXT", help="what the key is for")
    create.add_argument(
        "--expires",
        metavar="WHEN",
        type=parse_expiry,
        help="when the key stops working: an ISO 8601 time (2026-01-31, 2026-01-31T12:00:00+01:00; "
        "UTC when no zone is given) or a duration from now (90d, 12h, 1w2d, 30m); default: never",
    )
    listing = _action(actions, "list", "list keys, newest first, revoked ones included")
    listing.add_argument("--tenant", help="only keys of this tenant")
    revoke = _action(actions, "revoke", "revoke a key; calls with it are refused at once")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's public id (fpk_...), as `list` shows it")


def _action(actions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = add_action(actions, name, help_text, EPILOG)
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help=f"the server's gRPC address, or Envoy's (default: ${TARGET_ENV}, else the grpc_host and grpc_port"
        " settings)",
    )
    parser.add_argument("--api-key", metavar="KEY", help=f"an admin API key (default: ${API_KEY_ENV}, see below)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="the server's data dir (env FLOWPORT_DATA_DIR)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file with settings (env FLOWPORT_CONFIG)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per call (default 10)")
    parser.add_argument(
        "-o", "--output", choices=["table", "json"], default="table", help="table (default) or json, for scripts"
    )
    parser.add_argument("--json", action="store_true", help="the same as --output json")
    return parser


def parse_expiry(value: str, now: datetime | None = None) -> datetime:
    """An absolute time from an ISO 8601 time or a duration such as "90d" or "1w2d"."""
    text = value.strip()
    if _DURATION.sub("", text) == "" and text:
        parts = {_UNITS[unit]: float(amount) for amount, unit in _DURATION.findall(text)}
        return (now or datetime.now(UTC)) + timedelta(**parts)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither an ISO 8601 time (2026-01-31T12:00:00Z) nor a duration (90d, 12h, 1w2d)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def run_keys(args: argparse.Namespace, out: Callable[[str], None] = print) -> int:
    """Run one `flowport keys` action; returns the exit code."""
    return run_client_command(args, lambda target, api_key: _call(args, target, api_key, out))


def _call(args: argparse.Namespace, target: str, api_key: str, out: Callable[[str], None]) -> int:
    import grpc

    from flowport.clients import ApiError, Client

    with Client(target, api_key=api_key) as client:
        try:
            if args.keys_command == "create":
                _create(client, args, out)
            elif args.keys_command == "list":
                _list(client, args, out)
            else:
                _revoke(client, args, out)
        except grpc.RpcError as exc:
            raise explain(ApiError.from_rpc_error(exc), target) from None
    return 0


def _create(client: Client, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    from flowport.v1 import apikey_pb2

    given = apikey_pb2.ApiKey(tenant=args.tenant or "", roles=args.roles or [], description=args.description)
    if args.expires is not None:
        given.expire_time.FromDatetime(args.expires.astimezone(UTC))
    created = client.keys.CreateApiKey(apikey_pb2.CreateApiKeyRequest(api_key=given), timeout=args.timeout)
    if args.json or args.output == "json":
        out(json.dumps({**_as_dict(created.api_key), "key": created.key}, indent=2))
        return
    described = created.api_key
    print(
        f"created API key {described.key_id} for tenant {described.tenant} with roles {', '.join(described.roles)}"
        + (f", expiring {_time(described, 'expire_time')}" if described.HasField("expire_time") else "")
        + ". The key is below; it is shown only this once:",
        file=sys.stderr,
    )
    # Alone on stdout, so `KEY=$(flowport keys create ...)` captures just the key.
    out(created.key)


def _pages(client: Client, tenant: str, timeout: float) -> Iterator[apikey_pb2.ApiKey]:
    from flowport.v1 import apikey_pb2

    token = ""
    while True:
        page = client.keys.ListApiKeys(
            apikey_pb2.ListApiKeysRequest(tenant=tenant, page_size=1000, page_token=token), timeout=timeout
        )
        yield from page.api_keys
        token = page.next_page_token
        if not token:
            return


def _list(client: Client, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    keys = list(_pages(client, args.tenant or "", args.timeout))
    if args.json or args.output == "json":
        out(json.dumps([_as_dict(k) for k in keys], indent=2))
        return
    header = ("ID", "TENANT", "ROLES", "CREATED", "EXPIRES", "REVOKED", "DESCRIPTION")
    rows = [
        (
            k.key_id,
            k.tenant,
            ",".join(k.roles),
            _time(k, "create_time"),
            _time(k, "expire_time") or "never",
            _time(k, "revoke_time") or "-",
            k.description,
        )
        for k in keys
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        out("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


def _revoke(client: Client, args: argparse.Namespace, out: Callable[[str], None]) -> None:
    from flowport.v1 import apikey_pb2

    key = client.keys.RevokeApiKey(apikey_pb2.RevokeApiKeyRequest(key_id=args.key_id), timeout=args.timeout)
    if args.json or args.output == "json":
        out(json.dumps(_as_dict(key), indent=2))
        return
    out(f"revoked {key.key_id} (tenant {key.tenant}) at {_time(key, 'revoke_time')}")


def _time(key: apikey_pb2.ApiKey, field: Literal["create_time", "expire_time", "revoke_time"]) -> str:
    if not key.HasField(field):
        return ""
    when: datetime = getattr(key, field).ToDatetime(tzinfo=UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _as_dict(key: apikey_pb2.ApiKey) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(key, preserving_proto_field_name=True)
