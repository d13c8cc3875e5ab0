"""Where a process gets its keyring, and how it notices a rotation.

From the `secrets_key` setting (FLOWPORT_SECRETS_KEY) when set, otherwise
from a key file: `secrets_key_file`, or `<data-dir>/secrets-key`, which
the first start creates (mode 0600) just as it creates the admin key.
Nothing is built in: without one of these there are no secrets.

`flowport secrets rotate-key` rewrites the key file while servers run. A
server re-reads the file when it changed (checked at most every
RELOAD_INTERVAL seconds, and at once when it meets a key id it does not
hold), so every server seals with the new primary soon after the file
changes and opens values resealed by the rotation straight away.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flowport.server.secrets.keyring import Keyring, KeyringError, create_key_file, parse, read_key_file
from flowport.server.settings import Settings

log = logging.getLogger(__name__)

KEY_FILE = "secrets-key"
RELOAD_INTERVAL = 1.0  # seconds; rotate-key waits several of these before resealing


def key_file_path(settings: Settings) -> Path | None:
    """The key file in use; None when the key comes from the `secrets_key` setting."""
    if settings.secrets_key is not None:
        return None
    return settings.secrets_key_file or settings.data_dir / KEY_FILE


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_mtime_ns, info.st_size


class KeySource:
    """The current keyring of this process."""

    def __init__(self, ring: Keyring, path: Path | None = None) -> None:
        self._ring = ring
        self._path = path
        self._stamp = _stamp(path) if path is not None else None
        self._checked = time.monotonic()

    @property
    def path(self) -> Path | None:
        """The key file read, if any."""
        return self._path

    def current(self) -> Keyring:
        """The keyring, re-read first when the file changed since the last look."""
        if self._path is not None and time.monotonic() - self._checked >= RELOAD_INTERVAL:
            self.refresh()
        return self._ring

    def refresh(self) -> Keyring:
        """Re-read the key file now if it changed; a file that became unreadable keeps the last keyring."""
        if self._path is None:
            return self._ring
        self._checked = time.monotonic()
        stamp = _stamp(self._path)
        if stamp is not None and stamp != self._stamp:
            try:
                ring = read_key_file(self._path)
            except KeyringError as exc:
                log.error("keeping the current secrets keys: %s", exc)
            else:
                if ring.ids != self._ring.ids:
                    log.info(
                        "secrets keys reloaded from %s: primary %s, %d keys",
                        self._path,
                        ring.primary_id,
                        len(ring.keys),
                    )
                self._ring = ring
                self._stamp = stamp
        return self._ring


def open_key_source(settings: Settings, *, create: bool = True) -> KeySource:
    """The keyring `settings` name; with `create`, make the default key file on first start.

    Raises KeyringError (naming the setting or file) when key material is
    missing or malformed.
    """
    if settings.secrets_key is not None:
        return KeySource(parse(settings.secrets_key.get_secret_value(), "setting secrets_key"))
    path = key_file_path(settings)
    assert path is not None
    # Only the default location is created: a configured path that is
    # missing is a mistake to report, not a place to invent a key.
    if settings.secrets_key_file is None and create and not path.exists() and create_key_file(path) is not None:
        log.warning("first start: created the secrets key %s (readable by you only; back it up)", path)
    ring = read_key_file(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077 and os.name == "posix":
        log.warning("secrets key file %s is readable by others (mode %o); chmod 600 it", path, mode)
    return KeySource(ring, path)
