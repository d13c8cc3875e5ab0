"""The Kailash gateway's own virtual environment, made once and reused.

Kailash is installed from PyPI into a venv of its own, so none of its
dependencies meets flowport's: `kailash[server]==2.65.0`, the release the
comparison is about. The venv lives under $FLOWPORT_BENCH_CACHE (default
~/.cache/flowport-benchmarks) and is reused while its marker file names the
same requirement.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

REQUIREMENT = "kailash[server]==2.65.0"


def cache_dir() -> Path:
    return Path(os.environ.get("FLOWPORT_BENCH_CACHE", Path.home() / ".cache" / "flowport-benchmarks"))


def ensure() -> Path:
    """The venv's python, installing Kailash first when needed (a minute or so, once)."""
    root = cache_dir() / "kailash-2.65.0"
    python = root / "bin" / "python"
    marker = root / "installed.txt"
    if python.exists() and marker.exists() and marker.read_text().strip() == REQUIREMENT:
        return python
    print(f"installing {REQUIREMENT} into {root} (once)…", file=sys.stderr, flush=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", REQUIREMENT],
        check=True,
    )
    marker.write_text(REQUIREMENT + "\n")
    return python
