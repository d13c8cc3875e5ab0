"""The data dir lock: one holder, named to whoever else tries; the descriptor
`flowport up` hands its servers counts as theirs, any other does not."""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowport.server.datadir import LOCK_FD_ENV, DataDirError, open_data_dir

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock and POSIX modes")


@pytest.fixture(autouse=True)
def _keep_umask() -> Iterator[None]:
    """open_data_dir tightens the process umask; the rest of the suite keeps its own."""
    umask = os.umask(0o022)
    os.umask(umask)
    yield
    os.umask(umask)


def test_a_second_holder_is_refused_with_the_first_ones_name(tmp_path: Path) -> None:
    first = open_data_dir(tmp_path / "data", "flowport serve")
    try:
        with pytest.raises(DataDirError) as refused:
            open_data_dir(tmp_path / "data", "flowport up")
        message = str(refused.value)
        assert message.startswith(f"data dir {tmp_path / 'data'} (--data-dir) is in use by flowport serve ")
        assert f"(pid {os.getpid()}, started " in message
        assert "\n" not in message
    finally:
        first.close()
    # Released: the next one gets it (and the file stays, for everyone to lock the same one).
    open_data_dir(tmp_path / "data", "flowport up").close()
    assert (tmp_path / "data" / "lock").exists()


def test_a_new_data_dir_and_its_lock_file_are_private(tmp_path: Path) -> None:
    held = open_data_dir(tmp_path / "data", "flowport serve")
    try:
        assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "data" / "lock").stat().st_mode) == 0o600
        assert held.warnings == []
    finally:
        held.close()


def test_the_descriptor_handed_over_by_the_holder_counts_as_held(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = open_data_dir(tmp_path / "data", "flowport up")
    assert holder.fd is not None
    shared = os.dup(holder.fd)  # what a child inherits: the same open file
    try:
        monkeypatch.setenv(LOCK_FD_ENV, str(shared))
        server = open_data_dir(tmp_path / "data", "flowport serve")
        assert server.inherited and server.fd == shared
        assert LOCK_FD_ENV not in os.environ, "not passed on to what the server starts"
        assert not os.get_inheritable(shared)
        # The record still names the holder, not the server it started.
        with pytest.raises(DataDirError, match="in use by flowport up "):
            open_data_dir(tmp_path / "data", "flowport serve")
    finally:
        os.close(shared)
        holder.close()


def test_any_other_descriptor_does_not_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    holder = open_data_dir(tmp_path / "data", "flowport up")
    # The same file opened again: flock's unit is the open file, so this one does not hold the lock.
    other = os.open(tmp_path / "data" / "lock", os.O_RDONLY)
    try:
        monkeypatch.setenv(LOCK_FD_ENV, str(other))
        with pytest.raises(DataDirError, match="in use by flowport up "):
            open_data_dir(tmp_path / "data", "flowport serve")
    finally:
        os.close(other)
        holder.close()


def test_a_symlink_planted_in_the_data_dir_is_neither_followed_nor_chmodded(tmp_path: Path) -> None:
    # In a data dir others can write to, a link in place of our file must not reach its target.
    from flowport.server.datadir import write_private

    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    target = tmp_path / "victim"
    target.write_text("keep me")
    target.chmod(0o644)
    (data / "flowport.db").symlink_to(target)
    (data / "envoy.json").symlink_to(target)
    open_data_dir(data, "flowport serve").close()
    with pytest.raises(OSError):
        write_private(data / "envoy.json", "{}")
    assert target.read_text() == "keep me"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
