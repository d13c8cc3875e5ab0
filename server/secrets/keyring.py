"""Keyrings: the AES-256 keys that seal secret values.

A keyring is an ordered list of 32-byte keys. The first (the primary) seals
new values; every key opens values sealed with it, so a rotation can add a
new primary while values sealed with the old one are still readable. Each
key is named by an id derived from the key itself (a truncated SHA-256
under a fixed label), stored beside each ciphertext; a key id reveals
nothing about the key.

Text form, for the key file and the `secrets_key` setting: base64 keys
separated by newlines or commas, primary first; `#` starts a comment line.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

KEY_BYTES = 32
_ID_LABEL = b"flowport.secrets.key-id.v1\x00"


class KeyringError(ValueError):
    """Key material is missing or malformed; the message says where and how."""


def key_id(key: bytes) -> str:
    """The public name of `key`: 16 hex digits that cannot be turned back into it."""
    return "k" + hashlib.sha256(_ID_LABEL + key).hexdigest()[:16]


def generate_key() -> bytes:
    """A new random 256-bit key."""
    return secrets.token_bytes(KEY_BYTES)


@dataclass(frozen=True)
class Keyring:
    """Keys, primary first, each known by its id."""

    keys: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyringError("a keyring needs at least one key")
        if any(len(k) != KEY_BYTES for k in self.keys):
            raise KeyringError(f"every key must be {KEY_BYTES} bytes")

    @property
    def primary(self) -> bytes:
        """The key that seals new values."""
        return self.keys[0]

    @property
    def primary_id(self) -> str:
        """The id of the primary key."""
        return key_id(self.keys[0])

    @property
    def ids(self) -> tuple[str, ...]:
        """Every key's id, primary first."""
        return tuple(key_id(k) for k in self.keys)

    def get(self, wanted: str) -> bytes | None:
        """The key with id `wanted`, or None when this keyring does not hold it."""
        return next((k for k in self.keys if key_id(k) == wanted), None)

    def with_primary(self, key: bytes) -> Keyring:
        """This keyring with `key` added in front (it seals from now on)."""
        return Keyring((key, *(k for k in self.keys if k != key)))

    def only(self, wanted: set[str]) -> Keyring:
        """This keyring without the keys whose ids are not in `wanted` (the primary always stays)."""
        return Keyring(tuple(k for i, k in enumerate(self.keys) if i == 0 or key_id(k) in wanted))


def parse(text: str, source: str) -> Keyring:
    """The keyring written in `text`; KeyringError naming `source` when malformed."""
    keys: list[bytes] = []
    items = [i.strip() for line in text.splitlines() if not line.lstrip().startswith("#") for i in line.split(",")]
    for n, item in enumerate((i for i in items if i), start=1):
        # Standard or URL-safe alphabet, padding optional.
        standard = item.replace("-", "+").replace("_", "/") + "=" * (-len(item) % 4)
        try:
            key = base64.b64decode(standard, validate=True)
        except (binascii.Error, ValueError):
            raise KeyringError(f"{source}: key {n} is not base64") from None
        if len(key) != KEY_BYTES:
            raise KeyringError(f"{source}: key {n} is {len(key)} bytes; keys are {KEY_BYTES} bytes")
        if key not in keys:
            keys.append(key)
    if not keys:
        raise KeyringError(f"{source} holds no key")
    return Keyring(tuple(keys))


def render(ring: Keyring) -> str:
    """The key file text for `ring`."""
    lines = [
        "# flowport secrets keys: base64, one per line; the first seals new values,",
        "# the others only open values sealed before a rotation. Keep this file secret.",
    ]
    lines += [base64.b64encode(k).decode("ascii") for k in ring.keys]
    return "\n".join(lines) + "\n"


def read_key_file(path: Path) -> Keyring:
    """The keyring in the file at `path`."""
    try:
        text = path.read_text("ascii")
    except FileNotFoundError:
        raise KeyringError(f"secrets key file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyringError(f"cannot read secrets key file {path}: {exc}") from None
    return parse(text, f"secrets key file {path}")


def _write_temp(path: Path, ring: Keyring) -> Path:
    """`ring` in a new 0600 file next to `path` (same file system, so it can be renamed or linked)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o600)  # mkstemp makes 0600 already; say it regardless of umask quirks
        with os.fdopen(descriptor, "w", encoding="ascii") as f:
            f.write(render(ring))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def write_key_file(path: Path, ring: Keyring) -> None:
    """Replace the key file atomically: readers see the old keyring or the new one, never a mix."""
    temp = _write_temp(path, ring)
    os.replace(temp, path)


def create_key_file(path: Path) -> Keyring | None:
    """Write a new one-key file at `path` unless one exists; the new keyring, or None when there was one.

    Linking a finished file into place is atomic and fails when the name is
    taken, so server processes starting together agree on one key.
    """
    temp = _write_temp(path, Keyring((generate_key(),)))
    try:
        os.link(temp, path)
    except FileExistsError:
        return None
    finally:
        temp.unlink(missing_ok=True)
    return read_key_file(path)
