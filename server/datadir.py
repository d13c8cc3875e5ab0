"""The data dir: private to its owner, and held by one `flowport up` or `serve` at a time.

`open_data_dir` creates the dir with mode 0700, makes the process's umask
0077 (so the SQLite database and its -wal/-shm, Envoy's access log and
everything else written there is 0600), tightens flowport's own files that
an older version left readable to 0600, and takes an exclusive lock on
`<data-dir>/lock` for the life of the process. A second process on the same
dir is refused with a message naming the one that holds it.

An existing dir whose mode lets others in is left as it is, with a warning:
it may be a directory the operator shares on purpose (`--data-dir .`), and
what is inside is 0600 anyway.

`flowport up` holds the lock itself and hands the locked descriptor to the
server processes it starts (LOCK_FD_ENV), so its own servers, and one it
restarts, do not refuse each other.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import stat
import sys
import time
from pathlib import Path

LOCK_FILE = "lock"
# The descriptor of a lock `flowport up` holds, inherited by the servers it starts.
LOCK_FD_ENV = "FLOWPORT_DATA_DIR_LOCK_FD"
# Files flowport writes in the data dir; an older version left them 0644.
OWN_FILES = (
    "flowport.db",
    "flowport.db-wal",
    "flowport.db-shm",
    "envoy.json",
    "access.log",
    "admin-api-key",
    "secrets-key",
    LOCK_FILE,
)
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# How long to wait for the holder to finish writing who it is (it writes right after locking).
HOLDER_WAIT = 0.5


class DataDirError(Exception):
    """The data dir cannot be used; the one-line message names it and why."""


class DataDirLock:
    """This process's hold on a data dir (released when closed, or when the process ends)."""

    def __init__(self, fd: int | None, path: Path, warnings: list[str], *, inherited: bool = False) -> None:
        self.fd = fd
        self.path = path
        # Said once, by whoever took the lock (not again by the servers `flowport up` starts).
        self.warnings = warnings
        self.inherited = inherited

    def close(self) -> None:
        """Let go of the lock (the file stays: removing it would let two processes lock different files)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def open_data_dir(data_dir: Path, command: str) -> DataDirLock:
    """Make the data dir private and lock it for this process; DataDirError when either cannot be done.

    `command` says what this process is, for the message another one gets.
    """
    _private_umask()
    path = Path(os.path.abspath(data_dir))
    warnings = _prepare(path)
    inherited = _inherited(path)
    if inherited is not None:
        return inherited
    return _lock(path, command, warnings)


def write_private(path: Path, text: str) -> None:
    """Write `path` readable and writable by its owner only, whatever mode it had."""
    # No symlink is followed: in a data dir others can write to, one planted in
    # place of our file must not make us truncate or chmod its target.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW, PRIVATE_FILE)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        _make_private(fd, path)  # an existing file keeps its mode through O_CREAT
        f.write(text)


# Windows has neither O_NOFOLLOW nor (before 3.13) fchmod.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _make_private(fd: int, path: Path) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, PRIVATE_FILE)
    else:
        os.chmod(path, PRIVATE_FILE)


def _private_umask() -> None:
    # Whatever else the umask takes away stays taken away.
    os.umask(os.umask(0o077) | 0o077)


def _prepare(path: Path) -> list[str]:
    where = f"data dir {path} (--data-dir)"
    try:
        path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
    except FileExistsError:
        raise DataDirError(f"{where} is not a directory") from None
    except NotADirectoryError:
        raise DataDirError(f"{where} cannot be created: part of its path is a file") from None
    except OSError as exc:
        raise DataDirError(f"{where} cannot be created: {exc.strerror}") from None
    # os.access also answers for root: a read-only file system is refused to everyone.
    if not os.access(path, os.W_OK | os.X_OK):
        raise DataDirError(f"{where} is not writable")
    warnings = []
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        warnings.append(
            f"data dir {path} has mode {mode:04o}: other users can list it (its files are {PRIVATE_FILE:04o}); "
            f"`chmod {PRIVATE_DIR:o} {path}` makes it private"
        )
    for name in OWN_FILES:
        # Not owned by us, or on a read-only mount: whatever opens it next says so.
        with contextlib.suppress(OSError):
            fd = os.open(path / name, os.O_RDONLY | _NOFOLLOW)  # a symlink raises: left alone
            try:
                if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
                    _make_private(fd, path / name)
            finally:
                os.close(fd)
    return warnings


def _lock(path: Path, command: str, warnings: list[str]) -> DataDirLock:
    if sys.platform == "win32":  # no flock: the lock is POSIX-only
        return DataDirLock(None, path, warnings)
    import fcntl

    where = f"data dir {path} (--data-dir)"
    try:
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, PRIVATE_FILE)  # not inherited (PEP 446)
    except OSError as exc:
        raise DataDirError(f"{where} is not writable: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise DataDirError(
            f"{where} is in use by {holder}; stop that one first, or give this one another --data-dir"
        ) from None
    except OSError as exc:
        os.close(fd)
        raise DataDirError(f"{where} cannot be locked: {exc.strerror}") from None
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    record = json.dumps({"pid": os.getpid(), "command": command, "started": started}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record + b"\n", 0)
    return DataDirLock(fd, path, warnings)


def _holder(fd: int) -> str:
    """Who holds the lock, as its record says."""
    deadline = time.monotonic() + HOLDER_WAIT
    while True:
        try:
            record = json.loads(os.pread(fd, 4096, 0))
            return f"{record['command']} (pid {int(record['pid'])}, started {record['started']})"
        except (OSError, ValueError, KeyError, TypeError):
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.02)


def _inherited(path: Path) -> DataDirLock | None:
    """The lock of the `flowport up` that started this server, if it handed one over."""
    value = os.environ.pop(LOCK_FD_ENV, None)
    if value is None or sys.platform == "win32":
        return None
    import fcntl

    try:
        fd = int(value)
        held, expected = os.fstat(fd), os.stat(path / LOCK_FILE)
    except (ValueError, OSError):
        return None
    if (held.st_dev, held.st_ino) != (expected.st_dev, expected.st_ino):
        return None
    try:
        # Succeeds when this descriptor shares the holder's open file (flock's unit), and only then.
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return None
    os.set_inheritable(fd, False)
    return DataDirLock(fd, path, [], inherited=True)
