"""Secure by default: the first start creates the admin key, nothing is built in.

With `admin_api_key` set (FLOWPORT_ADMIN_API_KEY), that key is created for
tenant `default` with the admin role if the store does not know it. With
no key in the store at all (a new data dir), a random admin key is made and
written to `<data-dir>/admin-api-key`, readable by its owner only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flowport.server.auth.keys import describe, key_hash, new_key
from flowport.server.auth.principal import ADMIN, USER
from flowport.server.ids import new_id
from flowport.server.settings import Settings
from flowport.server.storage.api_keys import ApiKeyTables
from flowport.server.tenancy import DEFAULT_TENANT

log = logging.getLogger(__name__)

ADMIN_KEY_FILE = "admin-api-key"


def admin_key_path(settings: Settings) -> Path:
    """Where a generated admin key is written."""
    return settings.data_dir / ADMIN_KEY_FILE


async def ensure_admin_key(store: ApiKeyTables, settings: Settings) -> Path | None:
    """Create the admin key if needed; returns the file a new key was written to."""
    configured = settings.admin_api_key.get_secret_value() if settings.admin_api_key is not None else None
    if configured is not None:
        if await store.api_key_by_hash(key_hash(configured)) is None:
            key_id = new_id("fpk")
            await store.create_api_key(
                describe(key_id, DEFAULT_TENANT, [ADMIN, USER], "admin key from FLOWPORT_ADMIN_API_KEY", "bootstrap"),
                key_hash(configured),
                None,
                DEFAULT_TENANT,
                capped=False,  # the operator's: a start must not fail on a full tenant
            )
            log.info("created the admin API key %s from the admin_api_key setting", key_id)
        return None
    if await store.count_api_keys():
        return None
    key_id, key = new_key()
    await store.create_api_key(
        describe(key_id, DEFAULT_TENANT, [ADMIN, USER], "admin key made at first start", "bootstrap"),
        key_hash(key),
        None,
        DEFAULT_TENANT,
        capped=False,
    )
    path = admin_key_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with 0600 from the start: never readable by others, even briefly.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as f:
        f.write(key + "\n")
    # The id names the key in lists and the audit log; the key itself is only in the file.
    log.warning(
        "first start: created an admin API key (id %s); the key is in %s (readable by you only): cat it", key_id, path
    )
    return path
