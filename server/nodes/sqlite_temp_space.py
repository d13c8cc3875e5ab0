"""A floor under the free disk space of SQLite's temporary files, for tenants' statements.

SQLite sorts and de-duplicates in temporary files once a statement's rows
outgrow its cache: an `ORDER BY` over a recursive CTE that never ends wrote
800 MB in 3 s to /var/tmp, until the node's timeout (up to 600 s). No
setting of a connection bounds those files (`temp.max_page_count` covers
TEMP tables only, not sorters or the tables behind DISTINCT and GROUP BY),
and SQLite unlinks them as soon as it makes them. So while a tenant's SQLite
statement runs, its watchdog (server/nodes/sql.py) reads the free space of
the filesystem SQLite writes them to every CHECK_SECONDS, and interrupts the
statement once less than `reserve_bytes` is left: about 30 MB more at the
rate measured. A statement spills while the disk has room; no tenant fills
it, and the gateway's own store, its logs and the other tenants' databases
keep the reserve.

Time, not SQLite's steps: a progress handler every 100,000 virtual machine
steps let rows of 16 MB blobs (26 steps each) spill about 60 GB between two
checks. The check is of the filesystem, not of one statement's files (the
kernel does not say which thread made a file): a tenant's statement that is
running while the disk is down to the reserve stops too, whoever filled it.
"""

from __future__ import annotations

import functools
import os
from typing import Final

# How often a running statement's watchdog reads the free space.
CHECK_SECONDS: Final = 0.1
# Free space kept: 1 GiB, or 5% of a smaller filesystem.
RESERVE_BYTES: Final = 2**30
RESERVE_SHARE: Final = 0.05


@functools.cache
def temp_directory() -> str:
    """Where SQLite's Unix VFS puts temporary files: $SQLITE_TMPDIR, $TMPDIR, then /var/tmp, /usr/tmp,
    /tmp and the working directory, the first that is a directory it may write to (SQLite reads the
    environment once too)."""
    # Read, not written: these are the folders SQLite picks from.
    fixed = ["/var/tmp", "/usr/tmp", "/tmp", "."]  # noqa: S108
    candidates = [os.environ.get("SQLITE_TMPDIR"), os.environ.get("TMPDIR"), *fixed]
    for candidate in candidates:
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return "."


def reserve_bytes(total: int) -> int:
    """The free space kept on a filesystem of `total` bytes."""
    return min(RESERVE_BYTES, int(total * RESERVE_SHARE))


def below_reserve(directory: str | None = None) -> bool:
    """Whether the filesystem of `directory` (SQLite's temporary files') has less than its reserve free."""
    try:
        found = os.statvfs(directory or temp_directory())
    except OSError:
        return False  # the folder went away: SQLite's own open of a file there fails instead
    return found.f_bavail * found.f_frsize < reserve_bytes(found.f_blocks * found.f_frsize)
