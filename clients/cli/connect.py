"""How a command reaches a running server, and how its failures end it.

Every command that calls a server finds the address (`--target`, else
`FLOWPORT_TARGET`, else the server's gRPC address from the settings) and
an API key (`--api-key`, `FLOWPORT_API_KEY`, the `admin_api_key` setting,
`<data-dir>/admin-api-key`), then reports any failure as one
`flowport: …` line on stderr with an exit code below.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from flowport.server.settings import Settings, SettingsError

if TYPE_CHECKING:
    from flowport.clients import ApiError

API_KEY_ENV = "FLOWPORT_API_KEY"
TARGET_ENV = "FLOWPORT_TARGET"
# UNAVAILABLE answers the server itself gives (ErrorInfo reasons): it was reached.
ANSWERED_UNAVAILABLE = frozenset({"STORE_UNAVAILABLE", "RATE_LIMIT_UNAVAILABLE"})
ADMIN_KEY_FILE = "admin-api-key"
# Exit codes; scripts rely on them, and each command's --help lists those it uses.
EXIT_API_ERROR = 1  # the server refused the request
EXIT_USAGE = 2  # bad usage or settings (argparse's own), a bad file, or no key
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4  # the key was not accepted
EXIT_EXECUTION_FAILED = 5  # an execution ended FAILED or CANCELLED
EXIT_INTERRUPTED = 130  # 128 + SIGINT: Ctrl-C
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool that a closed pipe ended


class CliError(Exception):
    """A failure to report as `flowport: <message>` with an exit code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def run_client_command(args: argparse.Namespace, call: Callable[[str, str], int]) -> int:
    """Find the server (`--target`, `FLOWPORT_TARGET`, else the settings') and the key, then
    `call(target, api_key)`.

    Every command that calls a running server goes through here: bad settings
    and CliErrors print as one `flowport: …` line and become the exit code.
    """
    try:
        settings = Settings.load({"data_dir": args.data_dir}, config_file=args.config)
        api_key = find_api_key(args.api_key, settings)
        return call(find_target(args.target, settings), api_key)
    except SettingsError as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return exc.code


def find_target(given: str | None, settings: Settings) -> str:
    """The HOST:PORT to call; CliError for a URL (what `flowport up` prints is one)."""
    target = given or os.environ.get(TARGET_ENV) or settings.grpc_target
    if "://" in target:
        where = "--target" if given else TARGET_ENV
        raise CliError(f"{where} takes HOST:PORT, not a URL: leave out {target.split('://', 1)[0]}://", EXIT_USAGE)
    return target


def find_api_key(given: str | None, settings: Settings) -> str:
    """The key to call with; CliError when there is none."""
    if given:
        return given
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    if settings.admin_api_key is not None:
        return settings.admin_api_key.get_secret_value()
    path = settings.data_dir / ADMIN_KEY_FILE
    try:
        key = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CliError(
            f"no API key: pass --api-key or set {API_KEY_ENV} ({path} cannot be read: {exc.strerror}; "
            "--data-dir names the server's data dir)",
            EXIT_USAGE,
        ) from None
    if not key:
        raise CliError(f"no API key: {path} is empty; pass --api-key or set {API_KEY_ENV}", EXIT_USAGE)
    return key


def explain(error: ApiError, target: str, *, admin_needed: bool = True) -> CliError:
    """A failed call as one line and the exit code scripts can rely on.

    `admin_needed`: the command manages keys, so a refusal says the key is not
    an admin key and an invalid request lists its field violations one a line.
    """
    import grpc

    code = error.code()
    if code is grpc.StatusCode.UNAVAILABLE and error.reason in ANSWERED_UNAVAILABLE:
        # The server answered: something behind it (its database, the rate limits' Redis) is away.
        return CliError(f"the server at {target} is up but cannot serve this now: {error}", EXIT_API_ERROR)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return CliError(
            f"cannot reach the server at {target} ({error.message}); is `flowport up` or `flowport serve` "
            "running? --target names another address",
            EXIT_UNREACHABLE,
        )
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return CliError("the server did not accept the API key (unknown, revoked or expired)", EXIT_REFUSED)
    if code is grpc.StatusCode.PERMISSION_DENIED:
        # An admin of one tenant naming another is refused as well: the server's message says so.
        if admin_needed and "tenant" not in error.metadata:
            return CliError("the API key is not an admin key: managing keys needs the admin role", EXIT_REFUSED)
        return CliError(str(error), EXIT_REFUSED)
    if admin_needed:
        details = "".join(f"\n  {field}: {description}" for field, description in error.violations)
        return CliError(f"{error.message}{details}", EXIT_API_ERROR)
    return CliError(str(error), EXIT_API_ERROR)
