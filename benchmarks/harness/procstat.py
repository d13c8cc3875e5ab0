"""CPU time and resident memory of a process and its children, from /proc (Linux)."""

from __future__ import annotations

import os
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat(pid: int) -> list[str]:
    # Fields after the command name, which may itself hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Every descendant of pid (sandbox workers, Envoy, server workers)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process and of its children that exited (recycled
    sandbox workers); 0 once it has gone."""
    try:
        fields = _stat(pid)
    except OSError:
        return 0.0
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


def command(pid: int) -> str:
    """The process's command name (`envoy`, `python`…); empty once it has gone."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def rss_bytes(pid: int) -> int:
    """Resident set size of one process; 0 once it has gone."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def tree_cpu_seconds(pids: list[int]) -> float:
    """CPU of these processes and their living descendants."""
    return sum(cpu_seconds(p) for root in pids for p in [root, *children(root)])


def tree_rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes and their living descendants."""
    return sum(rss_bytes(p) for root in pids for p in [root, *children(root)])
