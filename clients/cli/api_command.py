"""What the API commands share (`flowport sessions|workflows|executions|...`).

Each command is a handler: one or a few SDK calls (flowport.clients.Client)
against a running server (`--target`, default the server's gRPC address from
the settings; Envoy's address works too). Results go to stdout as a table or,
with `--output json`, as proto3 JSON with the API's field names; progress and
errors go to stderr, errors as one line: `flowport: CODE: message [REASON]
(field: problem)`.

Most commands are one RPC whose request comes from the arguments: `Call`
is their one handler (get, list, delete, and the creates that need no file).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from google.protobuf.message import Message

from flowport.clients.cli.connect import (
    API_KEY_ENV,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    TARGET_ENV,
    CliError,
    explain,
    run_client_command,
)
from flowport.clients.cli.output import FORMATS, render

if TYPE_CHECKING:
    from flowport.clients import Client

EPILOG = f"""\
The server is --target, else ${TARGET_ENV}, else the server's gRPC address from the
settings (the data dir's or --config's; Envoy's HOST:PORT, 127.0.0.1:8080 by default,
works too). The API key is taken from --api-key, else ${API_KEY_ENV}, else the
admin_api_key setting, else <data-dir>/admin-api-key.

exit codes: 0 done; 1 the server refused the request (the message says why);
2 bad usage, a bad file or no key; 3 server unreachable; 4 key not accepted;
5 the execution ended FAILED or CANCELLED (run --wait, watch); 141 the output
went into a pipe its reader closed (`| head`)."""
# A page never asks for more than the API's largest page.
MAX_PAGE_SIZE = 100

Out = Callable[[str], None]
Handler = Callable[["Client", argparse.Namespace, Out], int]


def add_group(commands: Any, name: str, help_text: str, epilog: str | None = None) -> Any:
    """A command group (`sessions`), whose subparsers take its actions; `epilog`, as written, ends its help."""
    if epilog is None:
        parser = commands.add_parser(name, help=help_text, description=help_text)
    else:
        parser = add_action(commands, name, help_text, epilog)
    return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def add_action(actions: Any, name: str, help_text: str, epilog: str) -> argparse.ArgumentParser:
    """An action of a group, its help ending with `epilog` as written (exit codes, where keys come from)."""
    parser: argparse.ArgumentParser = actions.add_parser(
        name, help=help_text, description=help_text, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return parser


def add_command(actions: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    """An action of a group, with the flags every API command takes, run by `handler`."""
    parser = add_action(actions, name, help_text, EPILOG)
    parser.add_argument(
        "--target", metavar="HOST:PORT", help=f"server or Envoy address (default: ${TARGET_ENV}, else the settings')"
    )
    parser.add_argument("--api-key", metavar="KEY", help=f"API key (default: ${API_KEY_ENV}, see below)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR", help="the server's data dir (env FLOWPORT_DATA_DIR)")
    parser.add_argument("--config", type=Path, metavar="FILE", help="TOML file with settings (env FLOWPORT_CONFIG)")
    parser.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS", help="per call (default 30)")
    parser.add_argument("-o", "--output", choices=FORMATS, default="table", help="table (default) or json")
    parser.set_defaults(handler=handler)
    return parser


def add_limit(parser: argparse.ArgumentParser, default: int = 50) -> None:
    """`--limit` of a list command."""
    parser.add_argument("--limit", type=int, default=default, help=f"at most this many (default {default})")


def run_api_command(args: argparse.Namespace, out: Out = print) -> int:
    """Run the API command `args.handler`; returns the exit code."""
    from flowport.clients import ApiError, Client

    def call(target: str, api_key: str) -> int:
        with Client(target, api_key=api_key, timeout=args.timeout) as client:
            try:
                code: int = args.handler(client, args, out)
            except ApiError as error:
                raise explain(error, target, admin_needed=False) from None
        return code

    try:
        return run_client_command(args, call)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


@dataclass(frozen=True)
class Call:
    """The handler of a command that is one RPC: `client.<service>.<rpc>(request(args))`.

    What it prints depends on `shows`: "one" the answer (a table row, or a JSON
    object), "list" every item of every page up to `--limit` (the request's
    page_size is set here), "done" nothing on stdout and `done` (formatted with
    the arguments, e.g. "deleted session {session_id}") on stderr.
    """

    service: str
    rpc: str
    request: Callable[[argparse.Namespace], Message]
    shows: Literal["one", "list", "done"] = "one"
    done: str = ""

    def __call__(self, client: Client, args: argparse.Namespace, out: Out) -> int:
        method = getattr(getattr(client, self.service), self.rpc)
        request: Any = self.request(args)  # a list request has a page_size
        if self.shows == "list":
            request.page_size = min(args.limit, MAX_PAGE_SIZE)
            show(out, args, limited(client.paginate(method, request), args.limit))
        elif self.shows == "done":
            method(request)
            print(self.done.format_map(vars(args)), file=sys.stderr)
        else:
            show(out, args, [method(request)], single=True)
        return 0


def show(out: Out, args: argparse.Namespace, messages: list[Any], *, single: bool = False) -> None:
    """`messages` in the format `--output` asks for; nothing for an empty table."""
    text = render(messages, args.output, single=single)
    if text:
        out(text)


def flush() -> None:
    """Each line of a stream as it comes, also into a pipe (`| head`, `| grep`), not when a buffer fills."""
    sys.stdout.flush()


def limited(items: Iterator[Any], limit: int) -> list[Any]:
    """The first `limit` items, without asking for a page beyond them."""
    taken: list[Any] = []
    for item in items:
        if len(taken) >= limit:
            break
        taken.append(item)
    return taken


def read_message(path: Path, message: Any, what: str) -> Any:
    """`message` filled from the JSON file at `path` ('-': stdin); exit 2 naming the file when it cannot be."""
    from google.protobuf import json_format

    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}", EXIT_USAGE) from None
    try:
        return json_format.Parse(text, message)
    except json_format.ParseError as exc:
        raise CliError(f"{path} is not {what} in JSON: {exc}", EXIT_USAGE) from None


def add_file(parser: argparse.ArgumentParser, what: str) -> None:
    """`-f/--file` of a command that reads `what` from a JSON file."""
    parser.add_argument("-f", "--file", type=Path, required=True, help=f"the {what} as JSON ('-' reads stdin)")
