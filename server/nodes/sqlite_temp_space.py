"""A floor under the free disk space of SQLite's temporary files, for tenants' statements.

SQLite sorts and de-duplicates in temporary files once a statement's rows
outgrow its cache: an `ORDER BY` over a recursive CTE that never ends wrote
800 MB in 3 s to /var/tmp, until the node's timeout (up to 600 s). No
setting of a connection bounds those files (`temp.max_page_count` covers
TEMP tables only, not sorters or the tables behind DISTINCT and GROUP BY),
and SQLite unlinks them as soon as it makes them. So each tenant connection
gets `TempSpaceGuard` as its progress handler: every `CHECK_STEPS` steps of
SQLite's virtual machine (some milliseconds of a busy statement; a short
statement never reaches it) it reads the free space of the filesystem
SQLite writes them to, and interrupts the statement once less than
`reserve_bytes` is left. A statement spills while the disk has room; no
tenant fills it, and the gateway's own store, its logs and the other
tenants' databases keep the reserve. The check is of the filesystem, not of
one statement's files (the kernel does not say which thread made a file): a
tenant's statement that is busy while the disk is down to the reserve stops
too, whoever filled it.
"""

from __future__ import annotations

import functools
import os
from typing import Final

# Progress handler period, in SQLite virtual machine steps: 100 to 200 checks a second of a
# statement writing its sorter out as fast as it can (about 0.3 GB/s measured).
CHECK_STEPS: Final = 100_000
# Free space kept: 1 GiB, or 5% of a smaller filesystem.
RESERVE_BYTES: Final = 2**30
RESERVE_SHARE: Final = 0.05


@functools.cache
def temp_directory() -> str:
    """Where SQLite's Unix VFS puts temporary files: $SQLITE_TMPDIR, $TMPDIR, then /var/tmp, /usr/tmp,
    /tmp and the working directory, the first that is a directory it may write to (as SQLite looks;
    the environment is read once, as a server's does not change)."""
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


class TempSpaceGuard:
    """A connection's progress handler (module docstring); `tripped` says it stopped the statement
    (`reset` before each)."""

    def __init__(self, directory: str | None = None) -> None:
        self.directory = directory or temp_directory()
        self.tripped = False

    def reset(self) -> None:
        self.tripped = False

    def __call__(self) -> int:
        try:
            found = os.statvfs(self.directory)
        except OSError:
            return 0  # the folder went away: SQLite's own open of a file there fails instead
        if found.f_bavail * found.f_frsize < reserve_bytes(found.f_blocks * found.f_frsize):
            self.tripped = True
            return 1  # nonzero: SQLite interrupts the statement
        return 0
