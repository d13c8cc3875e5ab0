"""The wheel holds every module of the source tree.

pyproject.toml lists the packages by hand (the top-level folders map onto
`flowport.*` through `package-dir`, which setuptools' package discovery cannot
follow): a new `server/x/` works in the editable install and would be silently
missing from the wheel. This builds the wheel from a clean copy and compares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "server", "transcoder", "clients", "proto")


def _modules(package_dirs: dict[str, str]) -> set[str]:
    """Every .py file under the mapped folders, as its path inside the wheel."""
    expected = set()
    for package, folder in package_dirs.items():
        root = ROOT / folder
        for module in root.rglob("*.py"):
            if "__pycache__" in module.parts:
                continue
            expected.add("/".join([*package.split("."), *module.relative_to(root).parts]))
    return expected


@pytest.mark.timeout(300)
def test_the_wheel_holds_every_module_and_package_of_the_tree(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif path.exists():
            shutil.copy2(path, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    [wheel] = tmp_path.glob("flowport-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    missing = sorted(_modules(config["package-dir"]) - names)
    assert not missing, f"add their packages to [tool.setuptools] packages in pyproject.toml: {missing}"
    # And the data files Envoy, the store and the console read, and the PEP 561 markers type checkers look for.
    data = ["flowport/transcoder/descriptor.pb", "flowport/transcoder/edge.lua", "flowport/transcoder/openapi.json"]
    data += ["flowport/transcoder/body_fields.lua", "flowport/transcoder/request_ids.lua"]
    data += ["flowport/server/storage/sqlite_schema.sql"]  # a new database's schema
    data += [f"flowport/{package}/py.typed" for package in ("server", "transcoder", "clients", "v1")]
    assert not [name for name in data if name not in names]
    assert any(name.startswith("flowport/clients/console/") for name in names)
