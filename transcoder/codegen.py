"""Regenerate everything derived from `proto/`: one command, reproducible.

    python -m flowport.transcoder.codegen          # write generated files
    python -m flowport.transcoder.codegen --check  # exit 1 when they are stale

Outputs:
- `proto/flowport/v1/*_pb2.py`, `*_pb2_grpc.py` and their `.pyi` stubs
  (package `flowport.v1`);
- `transcoder/descriptor.pb`, the descriptor set (with imports and source
  info) that Envoy's gRPC-JSON transcoder and the OpenAPI generator read;
- `transcoder/openapi.json`, the OpenAPI 3.1 document Envoy serves.

The googleapis protos come from the installed `googleapis-common-protos`
and the well-known types from `grpcio-tools`; none is copied here.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
API_DIR = PROTO_ROOT / "flowport" / "v1"
DESCRIPTOR_SET = REPO_ROOT / "transcoder" / "descriptor.pb"
OPENAPI = REPO_ROOT / "transcoder" / "openapi.json"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


class CodegenError(RuntimeError):
    """protoc or a plugin failed, or a tool it needs is missing."""


def include_paths() -> list[Path]:
    """Import roots for protoc: ours, googleapis', and the well-known types."""
    import google.api  # googleapis-common-protos ships its .proto files

    googleapis_root = Path(next(iter(google.api.__path__))).parent.parent
    well_known = Path(str(resources.files("grpc_tools") / "_proto"))
    return [PROTO_ROOT, googleapis_root, well_known]


def proto_files() -> list[Path]:
    """The API's .proto files, sorted so output never depends on listing order."""
    return sorted(API_DIR.glob("*.proto"))


def _plugin(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise CodegenError(f"{name} not found on PATH: install the dev extra (pip install -e '.[dev]')")
    return path


def generate(python_out: Path, descriptor_out: Path) -> None:
    """Run protoc once for the Python code and once for the descriptor set."""
    from grpc_tools import protoc

    includes = [f"-I{p}" for p in include_paths()]
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    python_out.mkdir(parents=True, exist_ok=True)
    descriptor_out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[list[str]] = [
        [
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={python_out}",
            f"--grpc_python_out={python_out}",
            f"--mypy_out={python_out}",
            f"--mypy_grpc_out={python_out}",
        ],
        [
            f"--descriptor_set_out={descriptor_out}",
            "--include_imports",
            "--include_source_info",
        ],
    ]
    for options in runs:
        code = protoc.main(["protoc", *includes, *options, *sources])
        if code != 0:
            raise CodegenError(f"protoc failed (exit {code}) with {options}")


def write_openapi(descriptor: Path, out: Path) -> None:
    """Render the OpenAPI document for `descriptor` into `out` (stable JSON)."""
    from flowport.transcoder.openapi import document

    text = json.dumps(document(_version(), descriptor), indent=2, sort_keys=False, ensure_ascii=False)
    out.write_text(text + "\n", encoding="utf-8")


def _version() -> str:
    # The API's version, not the package's: the document changes with the protos only.
    return "v1"


def _generated_in(root: Path) -> dict[str, Path]:
    api = root / "flowport" / "v1"
    return {p.name: p for p in sorted(api.iterdir()) if p.name.endswith(GENERATED_SUFFIXES)}


def stale_files() -> list[str]:
    """Generated files that differ from a fresh generation, or are missing or extra."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        generate(out, out / "descriptor.pb")
        fresh, current = _generated_in(out), _generated_in(PROTO_ROOT)
        stale = sorted(set(fresh) ^ set(current))
        stale += [n for n in sorted(set(fresh) & set(current)) if not filecmp.cmp(fresh[n], current[n], shallow=False)]
        if not DESCRIPTOR_SET.exists() or not filecmp.cmp(out / "descriptor.pb", DESCRIPTOR_SET, shallow=False):
            stale.append(str(DESCRIPTOR_SET.relative_to(REPO_ROOT)))
        write_openapi(out / "descriptor.pb", out / "openapi.json")
        if not OPENAPI.exists() or not filecmp.cmp(out / "openapi.json", OPENAPI, shallow=False):
            stale.append(str(OPENAPI.relative_to(REPO_ROOT)))
        return stale


def write() -> None:
    """Replace the checked-in generated files with a fresh generation."""
    for path in _generated_in(PROTO_ROOT).values():
        path.unlink()
    generate(PROTO_ROOT, DESCRIPTOR_SET)
    write_openapi(DESCRIPTOR_SET, OPENAPI)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flowport.transcoder.codegen", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report stale generated files instead of writing them")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name}", file=sys.stderr)
        if stale:
            print("run: python -m flowport.transcoder.codegen", file=sys.stderr)
        return 1 if stale else 0
    write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
