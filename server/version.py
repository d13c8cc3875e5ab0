"""The installed flowport version."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("flowport")
except metadata.PackageNotFoundError:  # running from a tree that is not installed
    VERSION = "0+unknown"
