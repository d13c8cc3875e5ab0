"""Lint, format and types are part of the suite: ruff clean, mypy --strict clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The import root `flowport` maps onto top-level folders (pyproject's
# package-dir); mypy sees that layout through a tree of symlinks.
PACKAGES = {"server": "server", "transcoder": "transcoder", "clients": "clients", "v1": "proto/flowport/v1"}


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0])
    assert tool is not None, f"{argv[0]} comes with the dev extra"
    return subprocess.run([tool, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def link_typecheck_tree() -> Path:
    """(Re)create `.typecheck/flowport/*` pointing at the package folders."""
    tree = ROOT / ".typecheck" / "flowport"
    tree.mkdir(parents=True, exist_ok=True)
    for name, target in PACKAGES.items():
        link = tree / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(ROOT / target, target_is_directory=True)
    return tree


def test_ruff_lint_is_clean() -> None:
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_strict_is_clean() -> None:
    link_typecheck_tree()
    result = _run("mypy", "-p", "flowport")
    assert result.returncode == 0, result.stdout + result.stderr


# A Lua pattern opening with ".*" and no "^": string.match/find try it again from each character of
# the subject, so a 30 KB request path cost Envoy seconds of CPU (quadratic). Anchored, it is linear.
_UNANCHORED_LUA = re.compile(r"""\b(?:match|find)\([^()"]*,\s*"\.\*""")


def test_lua_patterns_that_open_with_a_wildcard_are_anchored() -> None:
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted((ROOT / "transcoder").glob("*.lua"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _UNANCHORED_LUA.search(line)
    ]
    assert not found, found
    assert _UNANCHORED_LUA.search('local colon = match(path, ".*():")')  # the check sees the old form
