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


# Lua patterns that string.match/find/gsub try again from each character of the subject, each try
# going through the rest (quadratic: a 30 KB path, cookie or body run cost Envoy seconds of CPU):
# one opening with ".*" and no "^", one with no "^" ending in a repetition at "$" ("/+$", "[^.]*$"),
# and a lazy capture before a trailing repetition ("(.-)%s*$"). Anchored or found by position instead.
_UNANCHORED_LUA = re.compile(r"""\b(?:match|find|gsub)\([^()"]*,\s*"(?:\.\*|[^"^][^"]*[*+-]\)?\$"|[^"]*\.-\)%s\*\$")""")


def test_lua_patterns_that_open_with_a_wildcard_are_anchored() -> None:
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted((ROOT / "transcoder").glob("*.lua"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if _UNANCHORED_LUA.search(line)
    ]
    assert not found, found
    for old_form in (  # each once found in these filters
        'local colon = match(path, ".*():")',
        'return (string.gsub(path, "/+$", ""))',
        'local last = match(seen.field, "[^.]*$")',
        'local name, value = string.match(pair, "^%s*([^=]-)%s*=%s*(.-)%s*$")',
    ):
        assert _UNANCHORED_LUA.search(old_form), old_form
