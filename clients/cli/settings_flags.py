"""The server's settings as command-line flags (`up`, `serve`, `envoy-config`, `secrets rotate-key`).

Every setting is a flag, a FLOWPORT_<NAME> environment variable, or a key
in the TOML file given with --config; flags win over the environment, which
wins over the file.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flowport.server.settings import ENV_PREFIX, Settings


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """A flag per setting (`--grpc-port`), and `--config`."""
    group = parser.add_argument_group("settings (flag > FLOWPORT_* environment > --config file > default)")
    group.add_argument("--config", type=Path, metavar="FILE", help="TOML file with settings (env FLOWPORT_CONFIG)")
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        shown = "none" if default in (None, []) else default
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        metavar = str(extra.get("metavar", name.split("_")[-1].upper()))
        kind: dict[str, Any] = {}
        if field.annotation is bool:
            # A switch may stand alone (`--dev`) or take a value (`--dev false`, as in the environment).
            kind, metavar = {"nargs": "?", "const": "true"}, "BOOL"
        elif field.annotation == list[str]:
            # A list flag may be repeated; each value may itself be comma-separated.
            kind = {"action": "append"}
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=metavar,
            default=None,
            help=f"{field.description} (default {shown}; env {ENV_PREFIX}{name.upper()})",
            **kind,
        )


def load_settings(args: argparse.Namespace) -> Settings:
    """Settings from the parsed flags, the environment and the config file; SettingsError when invalid."""
    flags: dict[str, Any] = {name: getattr(args, name) for name in Settings.model_fields}
    # A repeated list flag reads as one comma-separated value, as in the environment.
    flags = {name: ",".join(value) if isinstance(value, list) else value for name, value in flags.items()}
    return Settings.load(flags, config_file=args.config)
