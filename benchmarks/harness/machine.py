"""What a result records about where and with what it was taken."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _tool_version(command: list[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def _package(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict[str, Any]:
    """Cores, CPU model, memory, kernel and the versions of everything measured."""
    memory_kb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_kb = int(line.split()[1])
    except OSError:
        pass
    from flowport.server.envoy_binary import find_envoy

    try:
        envoy = _tool_version([str(find_envoy(None)), "--version"]).split("version:")[-1].strip()
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: a result without Envoy still says so
        envoy = f"unavailable ({exc})"
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "flowport": _package("flowport"),
            "grpcio": _package("grpcio"),
            "protobuf": _package("protobuf"),
            "uvloop": _package("uvloop"),
            "envoy": envoy,
            "h2load": _tool_version(["h2load", "--version"]),
            "wrk": _tool_version(["wrk", "-v"]),
        },
    }
