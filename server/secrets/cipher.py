"""Sealing secret values: AES-256-GCM bound to the tenant and the name.

A sealed value is `nonce (12 random bytes) || ciphertext || tag`, stored
with the id of the key that sealed it. The associated data names the tenant
and the secret, so a ciphertext copied to another tenant's row or another
name fails authentication instead of decrypting there.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from flowport.server.secrets.keyring import Keyring

NONCE_BYTES = 12
_AAD_LABEL = b"flowport.secrets.value.v1"


class SecretDecryptError(Exception):
    """A sealed value could not be opened: unknown key, wrong key, or tampered row.

    The message names the key id and never any key or value material.
    """


@dataclass(frozen=True)
class Sealed:
    """A value as stored: which key sealed it, and the sealed bytes."""

    key_id: str
    blob: bytes


def associated_data(tenant: str, name: str) -> bytes:
    """The AAD binding a ciphertext to one tenant's secret; length-prefixed, so no two pairs collide."""
    parts = [_AAD_LABEL, tenant.encode(), name.encode()]
    return b"".join(struct.pack(">I", len(p)) + p for p in parts)


def seal(ring: Keyring, tenant: str, name: str, value: bytes) -> Sealed:
    """Encrypt `value` under the primary key of `ring`."""
    nonce = os.urandom(NONCE_BYTES)  # random 96-bit nonces: safe far beyond any number of puts we will see
    blob = nonce + AESGCM(ring.primary).encrypt(nonce, value, associated_data(tenant, name))
    return Sealed(ring.primary_id, blob)


def open_sealed(ring: Keyring, tenant: str, name: str, sealed: Sealed) -> bytes:
    """Decrypt `sealed`; SecretDecryptError when `ring` lacks its key or authentication fails."""
    key = ring.get(sealed.key_id)
    if key is None:
        raise SecretDecryptError(f"the keyring does not hold key {sealed.key_id}")
    nonce, ciphertext = sealed.blob[:NONCE_BYTES], sealed.blob[NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, ciphertext, associated_data(tenant, name))
    except (InvalidTag, ValueError):
        raise SecretDecryptError(
            f"a value sealed with key {sealed.key_id} does not authenticate (wrong key, or moved or altered)"
        ) from None
