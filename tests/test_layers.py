"""Import layering: only the API layer and the code that assembles the server import flowport.server.api."""

from __future__ import annotations

import ast
import time
from pathlib import Path

from flowport.server.clock import now_us, timestamp

ROOT = Path(__file__).resolve().parent.parent
# Folders of the import root `flowport` whose modules are checked (pyproject's package-dir).
PACKAGES = {"server": "flowport.server", "transcoder": "flowport.transcoder", "clients": "flowport.clients"}
API = "flowport.server.api"
# The modules outside server/api/ that may import from it, and what they may import.
ALLOWED: dict[str, set[str] | None] = {
    "server/app.py": None,  # builds the server from the services: any of them
    "server/interceptor.py": {"flowport.server.api.in_band"},  # ends REST streams with the services' error event
}


def module_name(path: Path) -> str:
    """The dotted name of a file under PACKAGES: server/engine/executor.py is flowport.server.engine.executor."""
    relative = path.relative_to(ROOT)
    parts = [PACKAGES[relative.parts[0]], *relative.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module `source` (the text of `module`) imports, anywhere in it, relative imports resolved.

    For `from X import y` both X and X.y are reported, since y may be a submodule.
    """
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            origin = ".".join([*base, *([node.module] if node.module else [])])
            found.add(origin)
            found.update(f"{origin}.{alias.name}" for alias in node.names)
    return found


def api_imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """The modules of flowport.server.api that `source` imports."""
    return {name for name in imported_modules(source, module, is_package) if name == API or name.startswith(API + ".")}


def _checked_files() -> list[Path]:
    return sorted(path for folder in PACKAGES for path in (ROOT / folder).rglob("*.py"))


def test_only_the_api_layer_and_the_server_assembly_import_the_api_layer() -> None:
    offenders: list[str] = []
    for path in _checked_files():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("server/api/"):
            continue
        imported = api_imports(path.read_text(), module_name(path), path.name == "__init__.py")
        allowed = ALLOWED.get(relative, set())
        if allowed is None:
            continue
        # `from flowport.server.api import in_band` reports the package too: that alone is not a use of it.
        extra = {name for name in imported - {API} if not any(name == a or name.startswith(a + ".") for a in allowed)}
        if API in imported and not extra and not allowed & imported:
            extra.add(API)
        if extra:
            offenders.append(f"{relative}: {', '.join(sorted(extra))}")
    assert not offenders, "lower layers import the API layer (move what they need below it):\n" + "\n".join(offenders)


def test_the_layering_check_sees_every_form_of_import() -> None:
    module = "flowport.server.engine.executor"
    assert api_imports("from flowport.server.api.common import now_us\n", module) >= {"flowport.server.api.common"}
    assert "flowport.server.api.common" in api_imports("import flowport.server.api.common as c\n", module)
    assert "flowport.server.api" in api_imports("from flowport.server import api\n", module)
    assert "flowport.server.api.common" in api_imports("from ..api import common\n", module)
    assert "flowport.server.api.common" in api_imports("from . import common\n", "flowport.server.api", is_package=True)
    assert "flowport.server.api.common" in api_imports("def f():\n    from flowport.server.api import common\n", module)
    assert not api_imports("from flowport.server.apiary import x\nfrom flowport.server.clock import now_us\n", module)


def test_the_clock_is_a_leaf() -> None:
    path = ROOT / "server" / "clock.py"
    imported = imported_modules(path.read_text(), module_name(path))
    assert not {name for name in imported if name.startswith("flowport")}, sorted(imported)


def test_the_clock_reads_wall_clock_microseconds() -> None:
    before = time.time_ns() // 1000
    now = now_us()
    assert before <= now <= time.time_ns() // 1000
    stamp = timestamp(1_700_000_000_123_456)
    assert (stamp.seconds, stamp.nanos) == (1_700_000_000, 123_456_000)
    assert (timestamp(-1).seconds, timestamp(-1).nanos) == (-1, 999_999_000)
