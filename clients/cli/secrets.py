"""`flowport secrets rotate-key|generate-key`: the keys that encrypt secrets.

Unlike `flowport keys`, these work on the data directory itself (the key
file and the database), so run them on the server's machine with the same
settings as the server (`--data-dir`, `--secrets-key-file`, ...). The
tenant's secrets themselves (`secrets put|list|delete`) go through the API
like any client call (clients/commands.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import sys
from collections.abc import Callable
from typing import Any

from flowport.server.settings import Settings

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


def add_secrets_parser(commands: Any, add_setting_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add `secrets` and its subcommands to the top-level subparsers."""
    help_text = "a tenant's secrets (put, list, delete) and the keys that encrypt them (rotate-key, generate-key)"
    secrets = commands.add_parser("secrets", help=help_text, description=help_text)
    actions = secrets.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")
    rotate = actions.add_parser(
        "rotate-key",
        help=ROTATE_HELP,
        description=ROTATE_HELP,
        epilog=ROTATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
    from flowport.clients.cli.commands import add_secret_actions

    add_secret_actions(actions)


def run_secrets(args: argparse.Namespace, settings: Settings) -> int:
    """Run the `secrets` subcommand `args` names."""
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
