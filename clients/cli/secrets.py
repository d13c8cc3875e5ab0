"""`flowport secrets ...`: a tenant's secrets, and the keys that encrypt them.

`put`, `list` and `delete` call a running server like the other API
commands (api_command.py). `rotate-key` and `generate-key` work on the data
directory itself (the key file and the database), so run them on the
server's machine with the same settings as the server (`--data-dir`,
`--secrets-key-file`, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowport.clients.cli.api_command import Call, add_action, add_command, add_group, add_limit
from flowport.clients.cli.connect import EXIT_USAGE, CliError
from flowport.clients.cli.settings_flags import add_setting_flags
from flowport.server.settings import Settings
from flowport.v1 import secret_pb2

ROTATE_HELP = "re-encrypt every secret under a new key, while servers keep running"
ROTATE_EPILOG = """\
With a key file (the default <data-dir>/secrets-key, or --secrets-key-file):
  1. a new random key is written first in the file; the old keys stay, so
     every value can still be read;
  2. rotate-key waits --wait seconds while running servers load the file
     (they check it every second), so new values use the new key;
  3. every secret still under an old key is re-encrypted, in batches;
  4. keys no secret uses any more are removed from the file.
Servers keep serving throughout. Database backups made before the rotation
need the old key: keep a copy of the old key file with them.

With FLOWPORT_SECRETS_KEY (no file to edit): generate a key with
`flowport secrets generate-key`, put it first in FLOWPORT_SECRETS_KEY
("new,old") and restart the servers one by one; then run rotate-key with
that setting to re-encrypt, and remove the keys it reports unused.

exit codes: 0 done; 1 a secret could not be decrypted (nothing removed);
2 bad settings, no key file or no database."""


def add_secrets_parser(commands: Any) -> None:
    """Add `secrets` and its subcommands to the top-level subparsers."""
    help_text = "a tenant's secrets (put, list, delete) and the keys that encrypt them (rotate-key, generate-key)"
    actions = add_group(commands, "secrets", help_text)
    rotate = add_action(actions, "rotate-key", ROTATE_HELP, ROTATE_EPILOG)
    rotate.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long running servers get to load the new key before re-encrypting starts (default 3)",
    )
    add_setting_flags(rotate)
    generate = actions.add_parser(
        "generate-key",
        help="print a new random key (base64) for FLOWPORT_SECRETS_KEY",
        description="print a new random key (base64) for FLOWPORT_SECRETS_KEY",
    )
    add_setting_flags(generate)
    put = add_command(
        actions,
        "put",
        "store (or replace) a secret; its value is never shown again",
        Call("secrets", "PutSecret", _put_request),
    )
    put.add_argument("name")
    put.add_argument(
        "--value-file",
        type=Path,
        metavar="FILE",
        help="read the value from FILE (default: stdin; never an argument, which shell history would keep)",
    )
    put.add_argument("--description", default="", help="what the secret is for")
    listing = add_command(
        actions,
        "list",
        "the tenant's secrets (names and versions, never values)",
        Call("secrets", "ListSecrets", lambda _: secret_pb2.ListSecretsRequest(), shows="list"),
    )
    add_limit(listing, default=100)
    delete = Call(
        "secrets",
        "DeleteSecret",
        lambda a: secret_pb2.DeleteSecretRequest(name=a.name),
        shows="done",
        done="deleted secret {name}",
    )
    add_command(actions, "delete", "delete a secret", delete).add_argument("name")


def _put_request(args: argparse.Namespace) -> secret_pb2.PutSecretRequest:
    """The value from --value-file or stdin (one final newline dropped), never from an argument."""
    try:
        value = args.value_file.read_text(encoding="utf-8") if args.value_file else sys.stdin.read()
    except OSError as exc:
        raise CliError(f"cannot read {args.value_file}: {exc.strerror}", EXIT_USAGE) from None
    value = value.removesuffix("\n")
    return secret_pb2.PutSecretRequest(name=args.name, value=value, description=args.description)


def run_secrets(args: argparse.Namespace, settings: Settings) -> int:
    """Run `secrets rotate-key` or `generate-key` (the other actions are API commands)."""
    if args.secrets_command == "generate-key":
        from flowport.server.secrets.keyring import generate_key

        print(base64.b64encode(generate_key()).decode("ascii"))
        return 0
    from flowport.server.secrets.rotation import DEFAULT_WAIT

    wait = DEFAULT_WAIT if args.wait is None else args.wait
    if wait < 0:
        print("flowport: --wait must not be negative", file=sys.stderr)
        return 2
    return asyncio.run(rotate_key(settings, wait))


async def rotate_key(settings: Settings, wait: float, out: Callable[[str], None] | None = None) -> int:
    """`flowport secrets rotate-key`; returns the exit code."""
    from flowport.server.audit import AuditRecorder, actions
    from flowport.server.secrets.cipher import SecretDecryptError
    from flowport.server.secrets.keyring import KeyringError
    from flowport.server.secrets.rotation import rotate
    from flowport.server.secrets.source import open_key_source
    from flowport.server.storage import MigrationError, open_store

    say = out or (lambda line: print(line, flush=True))
    if settings.database_url is None and not settings.database_path.exists():
        # Opening would create an empty database: most likely the wrong --data-dir.
        print(f"flowport: no database at {settings.database_path}: check --data-dir", file=sys.stderr)
        return 2
    try:
        keys = open_key_source(settings, create=False)
        store = await open_store(settings)
    except (KeyringError, MigrationError) as exc:
        print(f"flowport: {exc}", file=sys.stderr)
        return 2
    try:
        rotation = await rotate(store, keys, wait=wait, out=say)
        AuditRecorder(store).record(actions.SECRET_KEY_ROTATED, resource=f"secret_keys/{rotation.primary}")
    except SecretDecryptError as exc:
        print(f"flowport: {exc}; no key was removed", file=sys.stderr)
        return 1
    finally:
        await store.close()
    if not rotation.remaining:
        say(f"done: every secret is encrypted with key {rotation.primary}")
    return 0
